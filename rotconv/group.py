"""The cyclic rotation group C_N and its action on feature tensors.

Channel layout of a *regular* feature tensor: ``(B, F*N, H, W)``; channel ``f*N + i`` holds rotation ``i``
of field ``f``. Rotating such a tensor by the group element ``k`` (angle ``2*pi*k/N``, counter-clockwise as
displayed, i.e. the direction of ``torch.rot90(x, 1, dims=(-2, -1))``) rotates every channel spatially and
shifts the N channels of every field cyclically by ``k``: new channel ``i`` is old channel ``i - k``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .validation import check_positive_int, renamed_flag

__all__ = ["CyclicGroup", "rotate_image"]


def rotate_image(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the last two (spatial) dims of ``x`` by ``angle`` radians, counter-clockwise as displayed.

    Multiples of 90 degrees use :func:`torch.rot90` (exact). Other angles use bicubic interpolation about
    the grid centre ``((H-1)/2, (W-1)/2)`` with zeros outside the input.

    Shapes: ``(..., H, W) -> (..., H, W)``.
    """
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor with at least 2 (spatial) dims, got shape {tuple(x.shape)}")
    quarter_turns = angle / (math.pi / 2)
    nearest = round(quarter_turns)
    if abs(quarter_turns - nearest) < 1e-9:
        return torch.rot90(x, nearest % 4, dims=(-2, -1))
    shape = x.shape
    height, width = shape[-2], shape[-1]
    if height != width:
        raise ValueError(f"x: interpolated rotation needs a square grid, got {height}x{width}")
    flat = x.reshape(-1, 1, height, width)
    # Output pixel (u, v) (u to the right, v up, origin at the grid centre) samples the input at R(-angle)(u, v).
    # grid_sample's normalised coordinates with align_corners=True map -1..1 onto pixel centres 0..W-1, and
    # its y axis points down, so v = -y.
    coords = torch.linspace(-1.0, 1.0, width, dtype=x.dtype, device=x.device)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    us, vs = xs, -ys
    src_u = cos * us + sin * vs
    src_v = -sin * us + cos * vs
    grid = torch.stack((src_u, -src_v), dim=-1).expand(flat.shape[0], height, width, 2)
    out = F.grid_sample(flat, grid, mode="bicubic", padding_mode="zeros", align_corners=True)
    return out.reshape(shape)


class CyclicGroup:
    """The rotation group C_N = {rotations by 2*pi*k/N : k = 0..N-1} and its regular representation.

    Args:
        N: group order, at least 1. Rotations by multiples of 90 degrees are exact symmetries of the
            pixel grid; when ``N % 4 == 0`` the elements ``k`` with ``4*k/N`` integer are such rotations.

    Example::

        >>> g = CyclicGroup(12)
        >>> y = g.rotate(x, 3)            # 90 degrees, exact; x is (B, F*12, H, W)
    """

    def __init__(self, N: int) -> None:
        check_positive_int(N, "N")
        self.N = N

    @property
    def order(self) -> int:
        return self.N

    def angle(self, k: int) -> float:
        """The rotation angle of element ``k`` in radians."""
        return 2.0 * math.pi * (k % self.N) / self.N

    def is_exact(self, k: int) -> bool:
        """Whether element ``k`` is a multiple of 90 degrees (an exact symmetry of the pixel grid)."""
        return (4 * (k % self.N)) % self.N == 0

    def exact_elements(self) -> list[int]:
        """The elements that are multiples of 90 degrees."""
        return [k for k in range(self.N) if self.is_exact(k)]

    def regular_representation(self, k: int) -> torch.Tensor:
        """The N x N permutation matrix P with ``(P v)[i] = v[i - k]``."""
        eye = torch.eye(self.N)
        return torch.roll(eye, shifts=k % self.N, dims=0)

    def rotate(self, x: torch.Tensor, k: int, regular: bool = True, *, fields: bool | None = None) -> torch.Tensor:
        """Act with element ``k`` on a feature tensor.

        Args:
            x: ``(B, C, H, W)`` (or ``(B, C)`` with no spatial dims, e.g. pooled features). With
                ``regular=True`` ``C`` must be a multiple of N (regular fields, layout ``f*N + i``).
            k: group element; its angle is ``2*pi*k/N`` counter-clockwise.
            regular: ``True`` for regular fields (spatial rotation + cyclic shift of every field's N
                channels), ``False`` for scalar channels (spatial rotation only, e.g. RGB).
            fields: deprecated name of ``regular``.
        Returns:
            tensor of the same shape.
        """
        regular = renamed_flag(regular, fields, "fields", "regular", default=True)
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("x: expected a tensor of shape (B, C, H, W) or (B, C)")
        if x.dim() >= 4:
            out = rotate_image(x, self.angle(k))
        else:
            out = x
        if regular:
            channels = x.shape[1]
            if channels % self.N != 0:
                raise ValueError(
                    f"x: with regular=True the channel count must be a multiple of N={self.N}, got {channels}"
                )
            shape = out.shape
            out = out.reshape(shape[0], channels // self.N, self.N, *shape[2:])
            out = torch.roll(out, shifts=k % self.N, dims=2).reshape(shape)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CyclicGroup) and other.N == self.N

    def __hash__(self) -> int:
        return hash(("CyclicGroup", self.N))

    def __repr__(self) -> str:
        return f"CyclicGroup({self.N})"


def as_group(group: CyclicGroup | int, name: str = "group") -> CyclicGroup:
    """Accept a :class:`CyclicGroup` (or an int N) and validate it."""
    if isinstance(group, CyclicGroup):
        return group
    if isinstance(group, int) and not isinstance(group, bool):
        return CyclicGroup(check_positive_int(group, name))
    raise ValueError(f"{name}: expected a rotconv.CyclicGroup or its order N (an int), got {type(group).__name__}")
