"""Batch normalisation for regular feature fields."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import Proxy

from .group import CyclicGroup, as_group

__all__ = ["GroupBatchNorm2d"]


class GroupBatchNorm2d(nn.Module):
    """Batch norm whose statistics and affine parameters are shared by the N channels of a field.

    Sharing over the rotations keeps the layer equivariant (a rotation permutes the N channels of a field,
    which leaves their joint statistics unchanged). Shapes: ``(B, fields*N, H, W) -> same``.

    Args:
        fields: number of regular fields.
        group: :class:`~rotconv.CyclicGroup`.
        eps, momentum, affine, track_running_stats: as :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(
        self,
        fields: int,
        group: CyclicGroup,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(fields, bool) or not isinstance(fields, int) or fields < 1:
            raise ValueError(f"fields: expected an integer >= 1, got {fields!r}")
        self.group = as_group(group)
        self.fields = fields
        # The per-field statistics are those of an ordinary BatchNorm over (B, fields, N*H*W).
        self.norm = nn.BatchNorm1d(fields, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats)

    @property
    def num_channels(self) -> int:
        return self.fields * self.group.N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, Proxy) and (not isinstance(x, torch.Tensor) or x.dim() != 4
                                         or x.shape[1] != self.num_channels):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"input: GroupBatchNorm2d expects (B, {self.num_channels}, H, W) "
                f"(fields={self.fields} x N={self.group.N}), got {shape}"
            )
        return self.norm(x.flatten(2).unflatten(1, (self.fields, -1)).flatten(2)).view_as(x)

    def export(self) -> nn.BatchNorm2d:
        """A plain ``nn.BatchNorm2d(fields*N)`` with the statistics and parameters repeated per rotation."""
        src = self.norm
        bn = nn.BatchNorm2d(self.num_channels, eps=src.eps, momentum=src.momentum, affine=src.affine,
                            track_running_stats=src.track_running_stats)
        N = self.group.N
        with torch.no_grad():
            if src.affine:
                bn.weight.copy_(src.weight.repeat_interleave(N))
                bn.bias.copy_(src.bias.repeat_interleave(N))
            if src.track_running_stats:
                bn.running_mean.copy_(src.running_mean.repeat_interleave(N))
                bn.running_var.copy_(src.running_var.repeat_interleave(N))
                bn.num_batches_tracked.copy_(src.num_batches_tracked)
        bn.train(self.training)
        return bn.to(device=(src.running_mean if src.track_running_stats else src.weight).device)

    def extra_repr(self) -> str:
        return f"fields={self.fields}, group={self.group!r}"
