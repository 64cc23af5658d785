"""Anti-aliased strided convolutions: a fixed binomial low-pass folded into the learned filter.

A stride-s conv keeps every s-th output; what its input holds above the coarser grid's Nyquist frequency
aliases into the result, which then changes under one-pixel shifts and under the resampling of an image turned
by an angle other than a quarter turn. Blurring the input first with the binomial filter
``b = [1, 2, 1]^T [1, 2, 1] / 16`` removes most of it (Zhang 2019, "Making convolutional networks
shift-invariant again"). Blur and conv are both linear, so the pair is one conv whose ``(k+2) x (k+2)`` filter is
the full 2-D convolution ``b * w`` of the learned ``k x k`` filter ``w``, with one more pixel of padding: the
output size is that of the ``k x k`` conv, and it equals blurring the zero-extended input, then convolving. One
conv in training, export and INT8. ``b`` is symmetric under the grid's dihedral group D_4, so a blurred
steerable filter bank keeps its exact quarter-turn (and flip) symmetry; ``b`` is close to isotropic (a sampled
Gaussian of variance 1/2), so other angles stay as nearly equivariant as the filters themselves.

    LowpassConv2d        a plain conv (free ``k x k`` filters) with the low-pass folded in
    lowpass_basis        a steerable basis blurred the same way, for the rotconv layers (``basis=``)
    binomial_filter      ``b`` itself
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import SteerableBasis
from .validation import check_int, check_positive_int

__all__ = ["LowpassConv2d", "lowpass_basis", "binomial_filter"]


def binomial_filter(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(3, 3)``: ``[1, 2, 1]^T [1, 2, 1] / 16`` (entries are powers of two over 16: exact in every float type)."""
    row = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    return (torch.outer(row, row) / 16.0).to(dtype)


def _blur_filters(filters: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``(..., k, k) -> (..., k+2, k+2)``: every filter fully convolved with ``kernel``, the ``(1, 1, 3, 3)``
    :func:`binomial_filter`."""
    k = filters.shape[-1]
    flat = filters.reshape(-1, 1, k, k)
    return F.conv2d(flat, kernel, padding=2).view(*filters.shape[:-2], k + 2, k + 2)  # b is symmetric: conv = corr


@functools.lru_cache(maxsize=64)
def lowpass_basis(basis: SteerableBasis) -> SteerableBasis:
    """``basis`` with every function fully convolved with the binomial low-pass: ``kernel_size + 2``, the same
    rings, frequencies and rotation matrices (rotating ``b * psi`` in coefficient space blurs the rotated
    ``psi``). A rotconv layer built with ``kernel_size=basis.kernel_size + 2, basis=lowpass_basis(basis)`` has
    the free coefficients of the ``k x k`` layer and the low-pass before its stride. Cached per basis."""
    if not isinstance(basis, SteerableBasis):
        raise ValueError(f"basis: expected a SteerableBasis, got {type(basis).__name__}")
    functions = _blur_filters(torch.from_numpy(np.ascontiguousarray(basis.functions)),
                              binomial_filter().view(1, 1, 3, 3)).numpy()
    return SteerableBasis(kernel_size=basis.kernel_size + 2, functions=functions, rings=basis.rings,
                          frequencies=basis.frequencies, parities=basis.parities, radii=basis.radii,
                          sigmas=basis.sigmas)


class LowpassConv2d(nn.Module):
    """A conv with free ``k x k`` filters and the binomial low-pass folded in: ``nn.Conv2d`` with the filter
    ``b * weight`` (``(k+2) x (k+2)``) and ``padding + 1``, so the output has the size of
    ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)``.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H', W')``. Parameters: ``weight``
    ``(out_channels, in_channels // groups, k, k)`` and ``bias`` ``(out_channels,)`` or None, initialised as
    :class:`torch.nn.Conv2d`'s. :meth:`export` gives the plain ``nn.Conv2d`` with identical outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        stride = check_positive_int(stride, "stride")
        padding = check_int(padding, "padding", minimum=0)
        groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups, got groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        template = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, groups=groups, device=device,
                             dtype=dtype)  # torch's initialisation of a k x k conv
        self.weight = template.weight
        self.bias = template.bias
        # made once; follows the module through .to() / .double(); not part of the state_dict
        self.register_buffer("lowpass", binomial_filter(self.weight.dtype).to(self.weight.device).view(1, 1, 3, 3),
                             persistent=False)

    def filter(self) -> torch.Tensor:
        """``(out_channels, in_channels // groups, k+2, k+2)``: the blurred filter (differentiable)."""
        return _blur_filters(self.weight, self.lowpass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H', W')``."""
        return F.conv2d(x, self.filter(), self.bias, self.stride, self.padding + 1, 1, self.groups)

    def export(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` (kernel ``k+2``, padding ``padding+1``) with the same outputs."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size + 2, self.stride, self.padding + 1,
                         groups=self.groups, bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.filter())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size} (+2 low-pass), "
                f"stride={self.stride}, padding={self.padding}")
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + (", bias=False" if self.bias is None else "")
