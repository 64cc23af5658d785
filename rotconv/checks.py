"""Numerical equivariance checks."""
from __future__ import annotations

import torch
import torch.nn as nn

from .group import CyclicGroup, as_group
from .pooling import disc_mask

__all__ = ["equivariance_error"]


@torch.no_grad()
def equivariance_error(
    module: nn.Module,
    group: CyclicGroup,
    x: torch.Tensor,
    k: int,
    in_fields: bool = False,
    out_fields: bool = True,
    mask: bool | None = None,
) -> float:
    """Relative error ``||module(g x) - g module(x)|| / ||g module(x)||`` for the group element ``k``.

    Args:
        module: maps ``x`` to ``(B, C, H, W)`` or ``(B, C)`` (e.g. logits).
        group: the :class:`~rotconv.CyclicGroup` acting on input and output.
        x: input, ``(B, C, H, W)``.
        k: group element (angle ``2*pi*k/N``).
        in_fields: whether the input channels are regular fields (else scalars, e.g. RGB).
        out_fields: whether the output channels are regular fields (else scalars/invariant).
        mask: compare only inside the centred disc of the output grid, where a rotation by any angle keeps
            the pixels on the grid. Default (None): masked exactly when the rotation is not a multiple of 90
            degrees and the output is spatial.
    Returns:
        the relative L2 error as a Python float (0 for an exactly equivariant module).
    """
    group = as_group(group)
    expected = group.rotate(module(x), k, fields=out_fields)
    actual = module(group.rotate(x, k, fields=in_fields))
    if actual.shape != expected.shape:
        raise ValueError(f"module: output shapes differ under rotation: {tuple(actual.shape)} vs {tuple(expected.shape)}")
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
