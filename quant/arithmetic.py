"""Per-tensor quantization arithmetic shared by DFQ, the simulation and the int8 kernels: scales and zero
points, quantize-dequantize, and the one rule for how many bits a conv's weights get."""
from __future__ import annotations

import torch
import torch.nn as nn

from rotconv.validation import check_choice

__all__ = ["WEIGHT_SCHEMES", "WEIGHT_SCHEME_DEFAULT", "REDUCED_RANGE_BACKENDS", "quantization_parameters",
           "weight_quantization_parameters", "fake_quantize_tensor", "fake_quantize_weight", "is_depthwise",
           "weight_bits_for", "reduces_range"]

WEIGHT_SCHEMES = ("asymmetric", "symmetric")
#: per-tensor weights with zero point 0 (range +-127): what XNNPACK and ONNX QDQ need, and on x86/fbgemm the
#: scheme that keeps depthwise convs on their fast kernel (an asymmetric weight falls back to a generic kernel
#: 10-100x slower); DFQ's asymmetric [min, max] weights stay available with ``weight_scheme="asymmetric"``
WEIGHT_SCHEME_DEFAULT = "symmetric"
#: Engines whose kernels add u8 x s8 products in saturating int16: 7-bit activations, 7-bit depthwise weights.
REDUCED_RANGE_BACKENDS = ("x86", "fbgemm")


def reduces_range(backend: str) -> bool:
    """Whether ``backend`` needs the reduced ranges (see :data:`REDUCED_RANGE_BACKENDS`)."""
    return backend in REDUCED_RANGE_BACKENDS


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One input channel per group (``groups == in_channels > 1``)."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def weight_bits_for(conv: nn.Conv2d, weight_bits: int, reduce_range: bool) -> int:
    """Bits of ``conv``'s weights: one less for depthwise convs with ``reduce_range``. fbgemm's depthwise
    kernels add pairs of u8 x s8 products in saturating int16; with 7-bit weights no pair can overflow,
    whatever the activations (an overflow would depend on the pixel arrangement, breaking exactness).
    Bias correction and the quantizer both use this rule, so they agree on every conv."""
    return weight_bits - 1 if reduce_range and is_depthwise(conv) else weight_bits


def quantization_parameters(low: float, high: float, bits: int, signed: bool = False) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of asymmetric quantization of [low, high] (0 always representable)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale = max((high - low) / (qmax - qmin), 1e-12)
    zero_point = int(min(max(qmin - round(low / scale), qmin), qmax))
    # float32 scale, as the int8 kernels store it
    scale = float(torch.tensor(scale, dtype=torch.float32))
    return scale, zero_point, qmin, qmax


def weight_quantization_parameters(weight: torch.Tensor, bits: int, scheme: str = "asymmetric"
                                   ) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of per-tensor signed weights. ``"asymmetric"`` spans [min, max] with a
    zero point; ``"symmetric"`` spans [-max|w|, max|w|] with zero point 0 and range [-(2^(b-1) - 1), 2^(b-1) - 1]
    (what the fast depthwise kernels of fbgemm need)."""
    check_choice(scheme, "weight_scheme", WEIGHT_SCHEMES)
    if scheme == "asymmetric":
        return quantization_parameters(weight.min().item(), weight.max().item(), bits, signed=True)
    qmax = 2 ** (bits - 1) - 1
    scale = float(torch.tensor(max(weight.abs().max().item() / qmax, 1e-12), dtype=torch.float32))
    return scale, 0, -qmax, qmax


def fake_quantize_tensor(x: torch.Tensor, low: float, high: float, bits: int, signed: bool = False) -> torch.Tensor:
    """Asymmetric per-tensor quantize-dequantize of ``x`` to ``bits`` over the range [low, high] (widened to
    include 0, so that zero is exact)."""
    scale, zero_point, qmin, qmax = quantization_parameters(low, high, bits, signed)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quantize_weight(weight: torch.Tensor, bits: int, scheme: str = "asymmetric",
                         per_channel: bool = False) -> torch.Tensor:
    """Quantize-dequantize of a weight tensor: per tensor (see :func:`weight_quantization_parameters`) or, with
    ``per_channel``, each output channel (dim 0) on its own symmetric grid, scale ``max|W_c| / (2^(b-1) - 1)``
    in float32 (``scheme`` must be ``"symmetric"``), as XNNPACK's per-channel weights."""
    if per_channel:
        if check_choice(scheme, "weight_scheme", WEIGHT_SCHEMES) != "symmetric":
            raise ValueError("weight_scheme: per-channel weights are symmetric; got 'asymmetric'")
        qmax = 2 ** (bits - 1) - 1
        peak = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        scale = torch.clamp(peak / qmax, min=1e-12).float().to(weight.dtype)
        scale = scale.reshape(-1, *[1] * (weight.dim() - 1))
        return torch.clamp(torch.round(weight / scale), -qmax, qmax) * scale
    scale, zero_point, qmin, qmax = weight_quantization_parameters(weight, bits, scheme)
    return (torch.clamp(torch.round(weight / scale) + zero_point, qmin, qmax) - zero_point) * scale
