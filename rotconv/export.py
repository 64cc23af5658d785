"""Export a network built from rotconv layers to plain torch.nn modules with identical outputs."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .layers import SteerableConv2d
from .lowpass import LowpassConv2d
from .modes import eval_mode
from .norm import GroupBatchNorm2d

__all__ = ["export", "needs_export", "EXPORTED_TYPES"]

#: the rotconv modules :func:`export` replaces by plain ``torch.nn`` ones
EXPORTED_TYPES = (SteerableConv2d, GroupBatchNorm2d, LowpassConv2d)


def needs_export(model: nn.Module) -> bool:
    """Whether ``model`` holds a module of :data:`EXPORTED_TYPES` (one :func:`export` would replace)."""
    return any(isinstance(m, EXPORTED_TYPES) for m in model.modules())


def _strided_equivariant_convs(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if isinstance(m, SteerableConv2d) and m.padding == "equivariant" and m.stride > 1
    ]


@torch.no_grad()
def _record_input_sizes(model: nn.Module, example_input: torch.Tensor) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(id(module), tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in _strided_equivariant_convs(model)]
    try:
        with eval_mode(model):
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def export(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """Return a copy of ``model`` in which every rotconv conv (and :class:`~rotconv.LowpassConv2d`) is an
    ``nn.Conv2d`` and every :class:`~rotconv.GroupBatchNorm2d` an ``nn.BatchNorm2d``; all other modules are copied
    unchanged.

    ``example_input`` (any batch size) is needed when the model has strided layers with
    ``padding='equivariant'``: their padding depends on the input size, which a plain ``nn.Conv2d`` fixes.
    The copy is in the model's train/eval mode; outputs are identical (train-mode BN statistics aside).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    sizes: dict[int, tuple[int, int]] = {}
    if _strided_equivariant_convs(model):
        if example_input is None:
            raise ValueError("example_input: the model has strided layers with padding='equivariant'; "
                             "pass an example input so their padding can be fixed")
        sizes = _record_input_sizes(model, example_input)

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, SteerableConv2d):
            return module.export(sizes.get(id(module)))
        if isinstance(module, (GroupBatchNorm2d, LowpassConv2d)):
            return module.export()
        return None

    top = convert(model)
    if top is not None:
        return top
    replacements = {name: convert(m) for name, m in model.named_modules() if name}
    exported = copy.deepcopy(model)
    for name, new in replacements.items():
        if new is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = exported.get_submodule(parent_name) if parent_name else exported
        setattr(parent, child_name, new)
    return exported
