"""The rotation group C_N, the rotation-and-reflection group D_N, and their action on feature tensors.

Elements are integers ``0 .. order-1``. In C_N element ``k`` is the rotation by ``2*pi*k/N``; in D_N element
``m*N + k`` is ``R_k F^m``: first the mirror ``F`` (left-right, ``torch.flip(x, dims=(-1,))``) when
``m = 1``, then the rotation ``R_k``. Rotations are counter-clockwise as displayed (the direction of
``torch.rot90(x, 1, dims=(-2, -1))``).

Channel layout of a *regular* feature tensor: ``(B, F*|G|, H, W)``; channel ``f*|G| + e`` belongs to element
``e`` of field ``f`` (for D_N: the N rotations, then the N reflections). Acting with ``g`` transforms every
channel spatially and permutes each field's channels: new channel ``h`` is old channel ``g^-1 h`` (for C_N a
cyclic shift by ``k``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .validation import as_int, check_positive_int

__all__ = ["Group", "CyclicGroup", "DihedralGroup", "rotate_image", "mirror_image", "as_group"]


def mirror_image(x: torch.Tensor) -> torch.Tensor:
    """Mirror the last dim (left-right): the reflection ``F`` of D_N. Exact on any grid. ``(..., H, W)``."""
    return torch.flip(x, dims=(-1,))


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


class Group:
    """Common interface of :class:`CyclicGroup` and :class:`DihedralGroup` (finite groups of isometries of the
    square grid about its centre pixel). Subclasses define ``N`` (rotations), ``order``, :meth:`compose`,
    :meth:`inverse` and :meth:`decompose`."""

    N: int
    #: the letter of the group's name ("C12", "D12")
    letter = "?"

    @property
    def order(self) -> int:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.N == self.N

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.N))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.N})"

    def __str__(self) -> str:
        return f"{self.letter}{self.N}"

    @property
    def has_reflections(self) -> bool:
        return self.order != self.N

    def compose(self, a: int, b: int) -> int:
        """The element ``a b`` (apply ``b`` first)."""
        raise NotImplementedError

    def inverse(self, a: int) -> int:
        raise NotImplementedError

    def decompose(self, element: int) -> tuple[int, int]:
        """``(k, m)`` with ``element = R_k F^m`` (``m = 0`` in C_N)."""
        raise NotImplementedError

    def angle(self, k: int) -> float:
        """The rotation angle of element ``k`` (its rotation part ``R_k``) in radians."""
        return 2.0 * math.pi * (self.decompose(k % self.order)[0]) / self.N

    def is_exact(self, k: int) -> bool:
        """Whether element ``k`` maps the pixel grid onto itself (its rotation part is a multiple of 90
        degrees; mirrors are always exact)."""
        rotation = self.decompose(k % self.order)[0]
        return (4 * rotation) % self.N == 0

    def exact_elements(self) -> list[int]:
        """The elements that are exact symmetries of the grid."""
        return [k for k in range(self.order) if self.is_exact(k)]

    def permutation(self, g: int) -> torch.Tensor:
        """``(order,)`` int64: new channel ``h`` of a field acted on by ``g`` is old channel ``permutation[h]``
        (``= g^-1 h``)."""
        g_inverse = self.inverse(g % self.order)
        return torch.tensor([self.compose(g_inverse, h) for h in range(self.order)], dtype=torch.int64)

    def regular_representation(self, k: int) -> torch.Tensor:
        """The ``order x order`` permutation matrix P with ``(P v)[h] = v[k^-1 h]``."""
        return torch.eye(self.order)[self.permutation(k)]

    def transform_image(self, x: torch.Tensor, element: int) -> torch.Tensor:
        """The spatial action of ``element`` on ``(..., H, W)``: mirror (if any), then rotate."""
        k, m = self.decompose(element % self.order)
        return rotate_image(mirror_image(x) if m else x, 2.0 * math.pi * k / self.N)

    def act(self, x: torch.Tensor, element: int, regular: bool = True) -> torch.Tensor:
        """Act with ``element`` on a feature tensor.

        Args:
            x: ``(B, C, H, W)`` (or ``(B, C)`` with no spatial dims, e.g. pooled features). With
                ``regular=True`` ``C`` must be a multiple of the group order (regular fields).
            element: group element (see the module docstring for the numbering).
            regular: ``True`` for regular fields (spatial transform + permutation of every field's channels),
                ``False`` for scalar channels (spatial transform only, e.g. RGB).
        Returns:
            tensor of the same shape.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("x: expected a tensor of shape (B, C, H, W) or (B, C)")
        out = self.transform_image(x, element) if x.dim() >= 4 else x
        if regular:
            channels = x.shape[1]
            if channels % self.order != 0:
                raise ValueError(f"x: with regular=True the channel count must be a multiple of the group order "
                                 f"{self.order}, got {channels}")
            shape = out.shape
            out = out.reshape(shape[0], channels // self.order, self.order, *shape[2:])
            out = out.index_select(2, self.permutation(element).to(out.device)).reshape(shape)
        return out

    def rotate(self, x: torch.Tensor, k: int, regular: bool = True) -> torch.Tensor:
        """Act with the rotation ``R_k`` (angle ``2*pi*k/N``); see :meth:`act`."""
        return self.act(x, k % self.N, regular)


class CyclicGroup(Group):
    """The rotation group C_N = {rotations by 2*pi*k/N : k = 0..N-1} and its regular representation.

    Args:
        N: the number of rotations (here also the group's ``order``), at least 1. Rotations by multiples
            of 90 degrees are exact symmetries of the pixel grid; when ``N % 4 == 0`` the elements ``k``
            with ``4*k/N`` integer are such rotations.

    Example::

        >>> g = CyclicGroup(12)
        >>> y = g.rotate(x, 3)            # 90 degrees, exact; x is (B, F*12, H, W)
    """

    letter = "C"

    def __init__(self, N: int) -> None:
        self.N = check_positive_int(N, "N")

    @property
    def order(self) -> int:
        return self.N

    def compose(self, a: int, b: int) -> int:
        return (a + b) % self.N

    def inverse(self, a: int) -> int:
        return (-a) % self.N

    def decompose(self, element: int) -> tuple[int, int]:
        return element % self.N, 0



class DihedralGroup(Group):
    """D_N: the N rotations by ``2*pi*k/N`` and the N reflections ``R_k F`` (``F`` mirrors left-right), order 2N.

    Element ``m*N + k`` is ``R_k F^m``; composition follows ``F R_k = R_{-k} F``. When ``4 | N`` the 8
    symmetries of the square (D_4 inside D_N) are exact on the pixel grid.

    Example::

        >>> g = DihedralGroup(12)
        >>> y = g.act(x, 12)              # the mirror F, exact; x is (B, F*24, H, W)
        >>> y = g.reflect(x)              # the same
    """

    letter = "D"

    def __init__(self, N: int) -> None:
        self.N = check_positive_int(N, "N")

    @property
    def order(self) -> int:
        return 2 * self.N

    def decompose(self, element: int) -> tuple[int, int]:
        element %= 2 * self.N
        return element % self.N, element // self.N

    def compose(self, a: int, b: int) -> int:
        (k1, m1), (k2, m2) = self.decompose(a), self.decompose(b)
        return ((m1 + m2) % 2) * self.N + (k1 + (-k2 if m1 else k2)) % self.N

    def inverse(self, a: int) -> int:
        k, m = self.decompose(a)
        return a % (2 * self.N) if m else (-k) % self.N

    def reflect(self, x: torch.Tensor, regular: bool = True) -> torch.Tensor:
        """Act with the mirror ``F`` (element N); see :meth:`act`."""
        return self.act(x, self.N, regular)



def as_group(group: Group | int | str, name: str = "group") -> Group:
    """Accept a group, an integer N (C_N: a Python, numpy or 0-d torch integer, or its digits as a string, as a
    command line hands it over) or a name such as ``"C12"`` / ``"D12"``, validated."""
    if isinstance(group, Group):
        return group
    if as_int(group) is not None:
        return CyclicGroup(check_positive_int(group, name))
    if isinstance(group, str):  # "C12", "d4", or "12" for C_12
        kind, digits = (group[0].upper(), group[1:]) if group[:1] in ("C", "c", "D", "d") else ("C", group)
        if digits.isascii() and digits.isdigit() and int(digits) > 0:
            return (CyclicGroup if kind == "C" else DihedralGroup)(int(digits))
    raise ValueError(f"{name}: expected a rotconv group (CyclicGroup, DihedralGroup), its name ('C12', 'D12') or "
                     f"N, the number of rotations of C_N (an int), got {group!r}")
