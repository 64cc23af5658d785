"""Data-free quantization steps (Nagel et al., ICCV 2019) on plain torch.nn networks.

Every function takes a network (``nn.Module`` or ``torch.fx.GraphModule``) and returns a new GraphModule;
the input is left untouched. After :func:`fold_batchnorm` each conv that absorbed a BN keeps the BN's
(scaled) ``gamma`` and ``beta`` as buffers ``dfq_gamma``/``dfq_beta``: the pre-activation of output channel
``i`` is modelled as N(beta_i, gamma_i^2), which is what high-bias absorption, bias correction and the
data-free activation ranges need.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from rotconv.group import Group, as_group

from .arithmetic import WEIGHT_SCHEME_DEFAULT, fake_quantize_weight, weight_bits_for
from .graph import ConvPair, conv_pairs, module_of, remove_identities, trace

__all__ = ["fold_batchnorm", "replace_relu6", "equalize", "absorb_high_bias", "correct_bias", "field_size",
           "model_group"]


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """Fold every BatchNorm2d that directly follows a Conv2d into the conv (eval-mode statistics):
    ``W <- W * gamma / sqrt(var + eps)``, ``b <- (b - mean) * gamma / sqrt(var + eps) + beta``."""
    graph_module = trace(model)
    for node in list(graph_module.graph.nodes):
        bn = module_of(graph_module, node)
        if not isinstance(bn, nn.BatchNorm2d) or node.args[0].op != "call_module":
            continue
        conv = module_of(graph_module, node.args[0])
        if not isinstance(conv, nn.Conv2d) or len(node.args[0].users) != 1:
            continue
        if bn.running_mean is None:
            raise ValueError(f"model: {node.target} has no running statistics to fold")
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
        conv.register_buffer("dfq_gamma", (bn.weight if bn.affine else torch.ones_like(scale)).abs().clone())
        conv.register_buffer("dfq_beta", shift.clone())
        graph_module.set_submodule(node.target, nn.Identity())
    remove_identities(graph_module)
    return graph_module


def replace_relu6(model: nn.Module) -> fx.GraphModule:
    """Replace every ReLU6 by ReLU (equalization rescales channels, which would move the clip at 6)."""
    graph_module = trace(model)
    for name, module in list(graph_module.named_modules()):
        if isinstance(module, nn.ReLU6):
            graph_module.set_submodule(name, nn.ReLU())
    graph_module.recompile()
    return graph_module


def _output_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(dim=1)


def _input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    weight = conv.weight.detach().abs()
    if conv.groups == 1:
        return weight.transpose(0, 1).flatten(1).amax(dim=1)
    return weight.flatten(1).amax(dim=1)  # depthwise: input channel i is output channel i


def model_group(model: nn.Module, group: object = None) -> Group | None:
    """The group whose fields DFQ shares scales over: ``group`` where given (a group, its name or N), else the
    group ``model`` says it was built with (its ``group`` attribute, which a rotconv MobileNetV2 and its
    ``export()`` carry), else None (no group structure). A ``group`` other than the model's own is refused
    (ValueError naming both): scales shared over the wrong blocks of channels would quantize the fields of
    an equivariant network unevenly."""
    own = getattr(model, "group", None)
    own = own if isinstance(own, Group) else None
    if group is None:
        return own
    given = as_group(group)
    if own is not None and given != own:
        raise ValueError(f"group: {given} given, but the model was built with {own}; pass group={str(own)!r} "
                         "or leave it out")
    return given


def field_size(group: object = None) -> int | None:
    """The channels of one regular field for ``group`` (a rotconv group, its name, or N for C_N): the group's
    ``order``; None for a network without group structure."""
    if group is None:
        return None
    return as_group(group).order


def _share_over_fields(values: torch.Tensor, size: int | None, name: str) -> torch.Tensor:
    if size is None:
        return values
    if values.numel() % size != 0:
        raise ValueError(f"group: {name} has {values.numel()} channels, not a multiple of the group order {size}")
    return values.reshape(-1, size).amax(dim=1).repeat_interleave(size)


@torch.no_grad()
def _scale_pair(pair: ConvPair, scale: torch.Tensor) -> None:
    """Divide output channel i of ``first`` by s_i and multiply input channel i of ``second`` by s_i."""
    first, second = pair.first, pair.second
    first.weight.div_(scale.reshape(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(scale)
    for name in ("dfq_gamma", "dfq_beta"):
        if hasattr(first, name):
            getattr(first, name).div_(scale)
    if second.groups == 1:
        second.weight.mul_(scale.reshape(1, -1, 1, 1))
    else:
        second.weight.mul_(scale.reshape(-1, 1, 1, 1))


@torch.no_grad()
def equalize(model: nn.Module, group: object = None, max_iterations: int = 100, tolerance: float = 1e-6,
             *, keep_relu6: bool = False) -> fx.GraphModule:
    """Cross-layer range equalization of every conv -> ReLU -> conv pair, iterated until the scales
    converge (the depthwise-separable chains share convs between pairs).

    For output channel i of the first conv (range ``r1_i``) and input channel i of the second (``r2_i``),
    ``s_i = sqrt(r1_i * r2_i) / r2_i``; afterwards both ranges equal ``sqrt(r1_i * r2_i)``. ReLU is
    positively homogeneous, so the function is unchanged (ReLU6 is not: call :func:`replace_relu6` first, or
    pass ``keep_relu6=True`` to leave the pairs through a ReLU6 as they are).
    With ``group`` (a rotconv group, its name, or N for C_N; default: the model's own, :func:`model_group`)
    the ranges and scales are shared by the ``order`` channels of every regular field (maximum over the
    field), so an equivariant network stays exactly equivariant: a group element permutes channels within
    fields, and the scaling is the same for all of them. Chains through other activations (SiLU, ...) are
    left unequalized with a warning naming them.
    """
    size = field_size(model_group(model, group))
    graph_module = trace(model)
    pairs = conv_pairs(graph_module, warn=True)
    for pair in pairs:
        if isinstance(pair.activation, nn.ReLU6) and not keep_relu6:
            raise ValueError(f"model: {pair.first_name} -> ReLU6 -> {pair.second_name}: call replace_relu6 first "
                             "(or equalize(..., keep_relu6=True) to leave such pairs unequalized)")
    pairs = [pair for pair in pairs if not isinstance(pair.activation, nn.ReLU6)]
    for _ in range(max_iterations):
        largest_change = 0.0
        for pair in pairs:
            r1 = _share_over_fields(_output_ranges(pair.first), size, pair.first_name)
            r2 = _share_over_fields(_input_ranges(pair.second), size, pair.second_name)
            valid = (r1 > 0) & (r2 > 0)
            scale = torch.where(valid, torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
            largest_change = max(largest_change, (scale.log().abs().max().item()))
            _scale_pair(pair, scale)
        if largest_change < tolerance:
            break
    return graph_module


def _padding_free(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) or all(p == 0 for p in conv.padding)


@torch.no_grad()
def absorb_high_bias(model: nn.Module, sigmas: float = 3.0, padded: bool = False) -> fx.GraphModule:
    """Move ``c_i = max(0, beta_i - sigmas * gamma_i)`` from the bias of a conv into the next conv:
    ``b1 <- b1 - c``, ``b2 <- b2 + W2 c`` (summed over the kernel). Exact whenever the pre-activation of
    channel i stays above ``c_i`` (then ``relu(x - c) = relu(x) - c``), which the BN model says holds with
    probability ~99.9% at 3 sigma. A conv with zero padding sees the padded zeros unshifted, so pairs whose
    second conv pads are skipped unless ``padded=True`` (the paper's approximation). Pairs through a ReLU6
    are skipped: the shift would move its clip at 6.
    """
    graph_module = trace(model)
    for pair in conv_pairs(graph_module):
        first, second = pair.first, pair.second
        if not hasattr(first, "dfq_beta") or (not padded and not _padding_free(second)) \
                or isinstance(pair.activation, nn.ReLU6):
            continue
        absorbed = (first.dfq_beta - sigmas * first.dfq_gamma).clamp_min(0.0)
        if first.bias is None:
            continue
        first.bias.sub_(absorbed)
        first.dfq_beta.sub_(absorbed)
        if second.groups == 1:
            shift = second.weight.sum(dim=(2, 3)) @ absorbed
        else:
            shift = second.weight.sum(dim=(1, 2, 3)) * absorbed
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros(second.out_channels, device=shift.device, dtype=shift.dtype))
        second.bias.add_(shift)
    return graph_module


def _expected_relu(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """E[relu(z)] for z ~ N(beta, gamma^2), elementwise."""
    gamma = gamma.clamp_min(1e-12)
    ratio = beta / gamma
    pdf = torch.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(ratio / math.sqrt(2)))
    return gamma * pdf + beta * cdf


@torch.no_grad()
def correct_bias(model: nn.Module, weight_bits: int = 8, weight_scheme: str = WEIGHT_SCHEME_DEFAULT,
                 reduce_range: bool = False, per_channel: bool = False) -> fx.GraphModule:
    """Analytic bias correction: the expected output error of quantizing W is ``(Q(W) - W) E[x]``; with the
    input's expectation from the previous conv's BN statistics (``E[relu(N(beta, gamma^2))]``), subtract
    it from the bias (``E[clip(N(beta, gamma^2), 0, 6)]`` behind a ReLU6). Applies to convs fed by conv -> ReLU
    or ReLU6; others are left as they are. ``weight_bits``, ``weight_scheme``, ``reduce_range`` and
    ``per_channel`` must be those the quantizer will use (the bits of each conv follow
    :func:`quant.arithmetic.weight_bits_for`, as in the quantizer)."""
    graph_module = trace(model)
    for pair in conv_pairs(graph_module):
        first, second = pair.first, pair.second
        if not hasattr(first, "dfq_beta") or not isinstance(pair.activation, (nn.ReLU, nn.ReLU6)):
            continue
        expected_input = _expected_relu(first.dfq_beta, first.dfq_gamma)
        if isinstance(pair.activation, nn.ReLU6):  # clip(z, 0, 6) = relu(z) - relu(z - 6)
            expected_input = expected_input - _expected_relu(first.dfq_beta - 6.0, first.dfq_gamma)
        weight = second.weight
        bits = weight_bits_for(second, weight_bits, reduce_range)
        error = fake_quantize_weight(weight, bits, weight_scheme, per_channel) - weight
        if second.groups == 1:
            shift = error.sum(dim=(2, 3)) @ expected_input
        else:
            shift = error.sum(dim=(1, 2, 3)) * expected_input
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros_like(shift))
        second.bias.sub_(shift)
    return graph_module
