"""Parameter, multiply-accumulate and activation-memory counts of networks built from rotconv layers (and
plain torch.nn ones): a steerable conv costs what its expanded ``nn.Conv2d`` costs at inference."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .export import export, needs_export
from .layers import SteerableConv2d
from .lowpass import LowpassConv2d
from .modes import eval_mode
from .norm import GroupBatchNorm2d
from .validation import check_positive_int

__all__ = ["ModelSummary", "summary"]


@dataclass(frozen=True)
class ModelSummary:
    """Counts for one forward pass of a single input.

    Attributes:
        params: trainable parameters (for equivariant layers: the basis coefficients).
        exported_params: parameters of the exported plain network (expanded filters).
        macs: multiply-accumulates of the convolutions and linear layers.
        activation_bytes: float32 bytes of all layer outputs (convs, norms, activations, pools).
    """

    params: int
    exported_params: int
    macs: int
    activation_bytes: int

    def __str__(self) -> str:
        return (f"params {self.params:,} (exported {self.exported_params:,}), MACs {self.macs / 1e6:.1f} M, "
                f"activations {self.activation_bytes / 2**20:.2f} MiB")


@torch.no_grad()
def summary(model: nn.Module, input_size: int = 95, in_channels: int = 3) -> ModelSummary:
    """Count params, MACs and activation memory of ``model`` on one ``(1, in_channels, s, s)`` input
    (``model.export()`` is used for the exported parameter count where the model has it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    input_size = check_positive_int(input_size, "input_size")  # the side of a square input, e.g. 95 (not a shape tuple)
    in_channels = check_positive_int(in_channels, "in_channels")
    if not any(True for _ in model.parameters()):
        raise ValueError("model: has no parameters to count")
    macs = 0
    activation_elements = 0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, SteerableConv2d):
            per_output = module.in_channels // module.groups * module.kernel_size**2
        elif isinstance(module, LowpassConv2d):  # runs as its (k+2) x (k+2) conv
            per_output = module.in_channels // module.groups * (module.kernel_size + 2) ** 2
        else:
            per_output = module.in_channels // module.groups * module.weight[0, 0].numel()
        macs += output.numel() * per_output

    def linear_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    def leaf_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal activation_elements
        if isinstance(output, torch.Tensor):
            activation_elements += output.numel()

    hooks = []
    inner_norms = {id(m.norm) for m in model.modules() if isinstance(m, GroupBatchNorm2d)}
    for module in model.modules():
        if id(module) in inner_norms:  # counted as its GroupBatchNorm2d
            continue
        if isinstance(module, (nn.Conv2d, SteerableConv2d, LowpassConv2d)):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
        is_leaf = not any(True for _ in module.children()) or isinstance(module, (SteerableConv2d,
                                                                                 GroupBatchNorm2d))
        if is_leaf and not isinstance(module, nn.Dropout):
            hooks.append(module.register_forward_hook(leaf_hook))
    try:
        with eval_mode(model):
            device = next(model.parameters()).device
            model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    exported = params
    if needs_export(model):
        plain = model.export() if hasattr(model, "export") else export(
            model, torch.zeros(1, in_channels, input_size, input_size))
        exported = sum(p.numel() for p in plain.parameters())
    return ModelSummary(params=params, exported_params=exported, macs=macs, activation_bytes=4 * activation_elements)
