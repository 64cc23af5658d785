"""Odd-grid stride policy: which padding keeps a strided convolution rotation-symmetric.

A convolution with stride s samples the input at the centres ``c0, c0 + s, c0 + 2s, ...`` of its receptive
fields. The sampled set is symmetric under 90-degree rotations of the grid exactly when it is symmetric about
the grid centre, i.e. when the centre pixel ``(H-1)/2`` of an odd grid is itself sampled. The policy therefore
picks ``c0 = ((H-1)/2) mod s``, i.e. ``padding = (k-1)/2 - c0``; the output has the odd size
``2*floor(((H-1)/2)/s) + 1`` (95 -> 47 -> 23 -> 11 -> 5 -> 3 for stride 2). A negative padding crops.
With stride 1 the padding is the usual ``(k-1)/2`` and any size (odd or even) is symmetric.
"""
from __future__ import annotations

__all__ = ["equivariant_padding", "equivariant_output_size"]


def equivariant_padding(size: int, kernel_size: int, stride: int, name: str = "input") -> int:
    """Padding (negative: crop) per side that keeps a strided conv centred on an odd grid.

    Raises:
        ValueError: even ``kernel_size``, or an even ``size`` with ``stride > 1`` (no pixel at the centre).
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: padding='equivariant' needs an odd kernel size, got {kernel_size}")
    if stride == 1:
        return (kernel_size - 1) // 2
    if size % 2 == 0:
        raise ValueError(
            f"{name}: padding='equivariant' with stride {stride} needs odd spatial sizes (a pixel at the "
            f"rotation centre), got {size}"
        )
    first_centre = ((size - 1) // 2) % stride
    return (kernel_size - 1) // 2 - first_centre


def equivariant_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial output size of a conv that uses :func:`equivariant_padding`."""
    padding = equivariant_padding(size, kernel_size, stride)
    return (size + 2 * padding - kernel_size) // stride + 1
