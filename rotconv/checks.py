"""Numerical equivariance checks, and the inputs and networks they are best run on."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

from .group import Group, as_group
from .pooling import disc_mask

__all__ = ["equivariance_error", "smooth_noise", "randomize_batchnorm"]


@torch.no_grad()
def equivariance_error(
    module: nn.Module,
    group: Group | int | str,
    x: torch.Tensor,
    k: int,
    input_regular: bool = False,
    output_regular: bool = True,
    mask: bool | None = None,
) -> float:
    """Relative error ``||module(g x) - g module(x)|| / ||g module(x)||`` for the group element ``k``.

    Args:
        module: maps ``x`` to ``(B, C, H, W)`` or ``(B, C)`` (e.g. logits).
        group: the group acting on input and output (:class:`~rotconv.CyclicGroup`, :class:`~rotconv.DihedralGroup`).
        x: input, ``(B, C, H, W)``.
        k: group element (for C_N the rotation by ``2*pi*k/N``; for D_N see :mod:`rotconv.group`).
        input_regular: whether the input channels are regular fields (else scalars, e.g. RGB).
        output_regular: whether the output channels are regular fields (else scalars/invariant).
        mask: compare only inside the centred disc of the output grid, where a rotation by any angle keeps
            the pixels on the grid. Default (None): masked exactly when the rotation is not a multiple of 90
            degrees and the output is spatial.
    Returns:
        the relative L2 error as a Python float (0 for an exactly equivariant module).
    """
    group = as_group(group)
    expected = group.act(module(x), k, regular=output_regular)
    actual = module(group.act(x, k, regular=input_regular))
    if actual.shape != expected.shape:
        raise ValueError(
            f"module: output shapes differ under rotation: {tuple(actual.shape)} vs {tuple(expected.shape)}"
        )
    if mask is None:
        mask = expected.dim() == 4 and not group.is_exact(k)
    if mask:
        if expected.dim() != 4:
            raise ValueError("mask: masking needs a spatial output (B, C, H, W)")
        # hard disc one pixel inside the border: interpolation near the edge sees the zero padding
        weights = disc_mask(expected.shape[-2], expected.shape[-1], (min(expected.shape[-2:]) - 1) / 2 - 1,
                            edge_width=0, dtype=expected.dtype, device=expected.device)
        expected, actual = expected * weights, actual * weights
    denominator = torch.linalg.vector_norm(expected).item()
    numerator = torch.linalg.vector_norm(actual - expected).item()
    return numerator / max(denominator, torch.finfo(expected.dtype).tiny)


def smooth_noise(batch: int, channels: int, size: int, sigma: float, seed: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(batch, channels, size, size)`` Gaussian-smoothed white noise (std ``sigma`` pixels), scaled to unit
    std and multiplied by the disc mask: band-limited and rotatable by any angle, the input on which
    equivariance errors of non-90-degree rotations measure the layers rather than the interpolation."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((batch, channels, size, size)), (0, 0, sigma, sigma))
    x = torch.from_numpy(x / x.std())
    return (x * disc_mask(size, size, dtype=torch.float64)).to(dtype)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, inputs: torch.Tensor | list[torch.Tensor],
                        weight: tuple[float, float] = (0.5, 1.5), bias: tuple[float, float] = (-0.2, 0.2),
                        seed: int | None = None) -> nn.Module:
    """Make an untrained ``model`` a generic function for checks: batch-norm scales and shifts drawn uniformly
    from ``weight`` and ``bias``, running statistics measured on ``inputs`` (one batch or a list; a
    cumulative average). Untrained statistics would make eval-mode networks near-constant, which looks
    trivially invariant. Returns ``model`` in eval mode."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
            if module.affine:
                module.weight.copy_(
                    torch.empty_like(module.weight, device="cpu").uniform_(*weight, generator=generator)
                )
                module.bias.copy_(torch.empty_like(module.bias, device="cpu").uniform_(*bias, generator=generator))
    model.train()
    for batch in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        model(batch)
    return model.eval()
