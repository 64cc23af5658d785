"""Invariant pooling and circular masks (circular field of view)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .group import Group, as_group
from .validation import check_choice, check_positive_int, input_checks_skipped, is_symbolic, shape_of

__all__ = ["GroupPool", "CircularMask", "MaskedGlobalAvgPool", "disc_mask"]


def disc_mask(height: int, width: int, radius: float | None = None, edge_width: float = 1.0,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``(H, W)`` disc mask centred on the grid centre.

    Value 1 inside ``radius`` (default ``(min(H, W) - 1) / 2``), falling linearly to 0 over ``edge_width``
    pixels (anti-aliased edge; ``edge_width=0`` gives a hard 0/1 disc). Symmetric under 90-degree rotations.
    """
    if radius is None:
        radius = (min(height, width) - 1) / 2
    if edge_width < 0:
        raise ValueError(f"edge_width: expected >= 0, got {edge_width}")
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    rho = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    if edge_width == 0:
        mask = (rho <= radius + 1e-9).double()
    else:
        mask = ((radius - rho) / edge_width + 0.5).clamp(0.0, 1.0)
    return mask.to(dtype=dtype, device=device)


def _transposition_sort(x: torch.Tensor) -> torch.Tensor:
    """Sort along dim 2 in ascending order with elementwise min/max only: odd-even transposition sort, whose
    ``n`` rounds of compare-exchanges on neighbouring pairs sort any ``n`` values. The min/max ops are exact, so
    the result has the values of ``torch.sort``; used where sort kernels are missing (ExecuTorch)."""
    n = x.shape[2]
    for round_index in range(n):
        start = round_index % 2
        pairs = (n - start) // 2
        if pairs == 0:
            continue
        stop = start + 2 * pairs
        left, right = x[:, :, start:stop:2], x[:, :, start + 1:stop:2]
        exchanged = torch.stack([torch.minimum(left, right), torch.maximum(left, right)], dim=3).flatten(2, 3)
        x = torch.cat([x[:, :, :start], exchanged, x[:, :, stop:]], dim=2)
    return x


class GroupPool(nn.Module):
    """Pool each regular field over its group elements, invariantly under the group's channel permutation (so
    a rotation acts on the result as on scalar channels).

    ``mode='max'`` or ``'mean'``: ``(B, F*|G|, *spatial) -> (B, F, *spatial)``.
    ``mode='sort'``: ``(B, F*|G|, *spatial) -> (B, F*|G|, *spatial)``, each field's |G| values in ascending
    order (its order statistics: max, min, median, ... all at once). Sorting is exact, so the output is
    bit-identical for a permuted field, and a linear layer on it can express max, mean and any mix, with |G|
    times the features of ``'max'``.
    """

    MODES = ("max", "mean", "sort")

    def __init__(self, group: Group | int | str, mode: str = "max") -> None:
        super().__init__()
        check_choice(mode, "mode", self.MODES)
        self.group = as_group(group)
        self.order: int = self.group.order
        self.mode = mode

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if input_checks_skipped(x):
            return
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] % self.order != 0:
            raise ValueError(f"input: GroupPool expects (B, F*{self.order}, ...) channels, got {shape_of(x)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        fields = x.unflatten(1, (-1, self.order))
        if self.mode == "sort":
            # torch.export: deployable ops only (ExecuTorch has no sort kernel), same values.
            # TorchScript cannot compile torch.compiler.is_exporting, hence the is_scripting guard.
            if not torch.jit.is_scripting():
                if torch.compiler.is_exporting():
                    return _transposition_sort(fields).flatten(1, 2)
            return torch.sort(fields, dim=2)[0].flatten(1, 2)
        return fields.amax(dim=2) if self.mode == "max" else fields.mean(dim=2)

    def out_channels(self, in_channels: int) -> int:
        """Channels of the output for ``in_channels`` input channels (``F*|G|``)."""
        return in_channels if self.mode == "sort" else in_channels // self.order

    def extra_repr(self) -> str:
        return f"group={self.group!r}, mode={self.mode!r}"


class CircularMask(nn.Module):
    """Multiply ``(B, C, size, size)`` inputs by a disc mask (see :func:`disc_mask`).

    Restricting the field of view to a disc removes the corners, which a rotation by a non-multiple of 90
    degrees would move outside the grid.
    """

    def __init__(self, size: int, radius: float | None = None, edge_width: float = 1.0) -> None:
        super().__init__()
        size = check_positive_int(size, "size")
        self.size = size
        self.radius = (size - 1) / 2 if radius is None else float(radius)
        self.edge_width = edge_width
        self.register_buffer("mask", disc_mask(size, size, self.radius, edge_width))

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if input_checks_skipped(x):
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"input: CircularMask expects (B, C, {self.size}, {self.size}), got {shape_of(x)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"size={self.size}, radius={self.radius}, edge_width={self.edge_width}"


class MaskedGlobalAvgPool(nn.Module):
    """Weighted spatial mean over a centred disc: ``(B, C, H, W) -> (B, C)``.

    The disc (radius ``(min(H, W) - 1) / 2`` unless given, see :func:`disc_mask`) gives the pooling a
    circular field of view, so the result is invariant to rotations of the input about the grid centre.
    """

    def __init__(self, radius: float | None = None, edge_width: float = 1.0, size: int | None = None) -> None:
        super().__init__()
        self.radius = radius
        self.edge_width = edge_width
        self.size = size
        self._masks: dict[tuple, torch.Tensor] = {}
        if size is not None:
            # A fixed input size stores the weights as a buffer (traceable by torch.fx / torch.export).
            size = check_positive_int(size, "size")
            mask = disc_mask(size, size, radius, edge_width, dtype=torch.float64)
            self.register_buffer("pool_weights", (mask / mask.sum()).float())

    @torch.jit.unused
    def weights(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(H, W)`` pooling weights summing to 1 (cached per size, dtype and device)."""
        key = (height, width, dtype, device)
        if key not in self._masks:
            mask = disc_mask(height, width, self.radius, self.edge_width, dtype=torch.float64)
            self._masks[key] = (mask / mask.sum()).to(dtype=dtype, device=device)
        return self._masks[key]

    @torch.jit.unused
    def _weights_for(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and return its pooling weights (eager and torch.fx; TorchScript uses the buffer)."""
        if not input_checks_skipped(x):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"input: MaskedGlobalAvgPool expects (B, C, H, W), got {shape_of(x)}")
            if self.size is not None and x.shape[-2:] != (self.size, self.size):
                raise ValueError(f"input: MaskedGlobalAvgPool(size={self.size}) expects (B, C, {self.size}, "
                                 f"{self.size}), got {tuple(x.shape)}")
        if self.size is not None:
            return self.pool_weights
        if is_symbolic(x):
            raise ValueError("model: MaskedGlobalAvgPool without size= cannot be traced; give it size=")
        return self.weights(x.shape[-2], x.shape[-1], x.dtype, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C)``. TorchScript needs ``size=`` (the weights are then a buffer)."""
        if torch.jit.is_scripting():
            weights = self.pool_weights
        else:
            weights = self._weights_for(x)
        return (x * weights).sum(dim=(-2, -1))

    def extra_repr(self) -> str:
        text = f"radius={self.radius}, edge_width={self.edge_width}"
        return text + (f", size={self.size}" if self.size is not None else "")
