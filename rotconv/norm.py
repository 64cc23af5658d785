"""Batch normalisation for regular feature fields."""
from __future__ import annotations

import torch
import torch.nn as nn

from .group import Group, as_group
from .validation import check_positive_int, is_symbolic, shape_of

__all__ = ["GroupBatchNorm2d"]


class GroupBatchNorm2d(nn.Module):
    """Batch norm whose statistics and affine parameters are shared by the N channels of a field.

    Sharing over the group keeps the layer equivariant (a group element permutes the channels of a field,
    which leaves their joint statistics unchanged). Shapes: ``(B, fields*N, H, W) -> same``.

    Args:
        fields: number of regular fields.
        group: a rotconv group (C_N or D_N), its name or the order N of C_N.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self, fields: int, group: Group | int | str, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive_int(fields, "fields")
        self.group = as_group(group)
        self.fields = fields
        # The per-field statistics are those of an ordinary BatchNorm over (B, fields, N*H*W).
        self.norm = nn.BatchNorm1d(fields, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats, device=device, dtype=dtype)

    @property
    def num_channels(self) -> int:
        return self.fields * self.group.order

    def _check_input(self, x: torch.Tensor) -> None:
        if not is_symbolic(x) and (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.num_channels):
            raise ValueError(f"input: GroupBatchNorm2d expects (B, {self.num_channels}, H, W) "
                             f"(fields={self.fields} x {self.group.order}), got {shape_of(x)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, fields*N, H, W) -> same`` (export to ``nn.BatchNorm2d`` for TorchScript)."""
        self._check_input(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            if self.training and type(self.norm) is nn.BatchNorm1d and self.norm.track_running_stats:
                return _FieldBatchNorm.apply(x, self.norm.weight, self.norm.bias, self.norm, self.group.order)
            # eval, or a converted (cross-process) norm: channels_last memory is (B, H, W, fields, N)
            batch, channels, height, width = x.shape
            fields = x.permute(0, 2, 3, 1).reshape(-1, self.fields, self.group.order)
            return self.norm(fields).view(batch, height, width, channels).permute(0, 3, 1, 2)
        # contiguous memory is (B, fields, N*H*W)
        return self.norm(x.reshape(x.shape[0], self.fields, -1)).view_as(x)

    def export(self) -> nn.BatchNorm2d:
        """A plain ``nn.BatchNorm2d(fields*N)`` with the statistics and parameters repeated per rotation."""
        src = self.norm
        reference = src.running_mean if src.track_running_stats else src.weight
        bn = nn.BatchNorm2d(self.num_channels, eps=src.eps, momentum=src.momentum, affine=src.affine,
                            track_running_stats=src.track_running_stats,
                            device=None if reference is None else reference.device,
                            dtype=None if reference is None else reference.dtype)
        N = self.group.order
        with torch.no_grad():
            if src.affine:
                bn.weight.copy_(src.weight.repeat_interleave(N))
                bn.bias.copy_(src.bias.repeat_interleave(N))
            if src.track_running_stats:
                bn.running_mean.copy_(src.running_mean.repeat_interleave(N))
                bn.running_var.copy_(src.running_var.repeat_interleave(N))
                bn.num_batches_tracked.copy_(src.num_batches_tracked)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return f"fields={self.fields}, group={self.group!r}"


class _FieldBatchNorm(torch.autograd.Function):
    """Training-mode batch norm with statistics shared by the N channels of each field, for channels_last
    inputs, built on torch's fast per-channel kernels (a field is not contiguous in channels_last memory,
    so the field view of the contiguous path would cost copies).

    Forward: per-channel mean and variance (``torch.batch_norm_update_stats``), combined per field without
    cancellation (``var_f = mean(var_c) + mean((mean_c - mean_f)^2)``), then one per-channel affine pass.
    Backward: torch's kernel for the per-channel sums only (sum of dy and of dy * xhat, one reduction pass),
    combined per field; the input gradient is then a per-channel ``a * dy + b * x + c`` in two elementwise passes.
    Running statistics of ``norm`` (a BatchNorm1d over fields) are updated as BatchNorm1d would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                norm: nn.BatchNorm1d, N: int) -> torch.Tensor:
        # Per-channel statistics only (native_batch_norm would also write an output that is not used). Given
        # running buffers (left unchanged by momentum 0) the kernel returns them in float32 also for bf16 x;
        # without, it would round the means to bf16 (an error of up to 2**-9 |mean|, not small against std).
        channels = x.shape[1]
        dtype = torch.promote_types(x.dtype, torch.float32)
        mean_c, var_c = torch.batch_norm_update_stats(x, x.new_zeros(channels, dtype=dtype),
                                                      x.new_ones(channels, dtype=dtype), 0.0)
        mean_c, var_c = mean_c.view(-1, N), var_c.view(-1, N)
        mean_f = mean_c.mean(1)
        var_f = var_c.mean(1) + (mean_c - mean_f[:, None]).square().mean(1)
        count = x.numel() // channels * N
        with torch.no_grad():
            momentum = norm.momentum
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
                if momentum is None:
                    momentum = 1.0 / float(norm.num_batches_tracked)
            norm.running_mean.lerp_(mean_f.to(norm.running_mean.dtype), momentum)
            norm.running_var.lerp_((var_f * (count / max(count - 1, 1))).to(norm.running_var.dtype), momentum)
        # every per-field vector repeated for its N channels in one copy (few small ops: this runs ~50x a step)
        affine = [t for t in (weight, bias) if t is not None]
        rows = _per_channel(torch.stack([mean_f, var_f, *affine]).to(norm.running_mean.dtype), N).unbind(0)
        mean, var = rows[0], rows[1]
        weight_c = rows[2] if weight is not None else None
        bias_c = rows[-1] if bias is not None else None
        y = torch.nn.functional.batch_norm(x, mean, var, weight_c, bias_c, False, 0.0, norm.eps)
        ctx.save_for_backward(x, mean, var, weight)
        ctx.N, ctx.count, ctx.eps = N, count, norm.eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, var, weight = ctx.saved_tensors
        N, count = ctx.N, ctx.count
        # one reduction pass: per-channel sum(dy * xhat) and sum(dy) (torch's kernel, input gradient not asked
        # for), combined per field
        _, sum_dy_xhat_c, sum_dy_c = torch.ops.aten.native_batch_norm_backward(
            grad, x, None, mean, var, None, None, False, ctx.eps, [False, True, True])
        sum_dy = sum_dy_c.view(-1, N).sum(1)
        sum_dy_xhat = sum_dy_xhat_c.view(-1, N).sum(1)
        mean_f, invstd_f = mean[::N], torch.rsqrt(var[::N] + ctx.eps)
        scale = invstd_f if weight is None else weight * invstd_f
        # dx = scale * (dy - (sum_dy + xhat * sum_dy_xhat) / count) = a * dy + b * x + c, per channel:
        # two elementwise passes (b * x + c, then + a * dy)
        b = -scale * invstd_f * sum_dy_xhat / count
        c = -scale * sum_dy / count - b * mean_f
        # coefficients in x's dtype: mixed bf16/float32 operands would send both passes through dtype copies
        c_c, b_c, scale_c = _per_channel(torch.stack([c, b, scale]).to(x.dtype), N).view(3, 1, -1, 1, 1).unbind(0)
        grad_input = torch.addcmul(c_c, x, b_c).addcmul_(grad, scale_c)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None


def _per_channel(per_field: torch.Tensor, N: int) -> torch.Tensor:
    """``(..., fields) -> (..., fields*N)``: each field's value repeated for its N channels, in contiguous
    memory (``reshape`` of the expanded view would return a stride-0 view for one field, which torch's
    channels_last batch-norm kernels, called directly, read as if contiguous)."""
    return per_field.unsqueeze(-1).expand(*per_field.shape, N).contiguous().flatten(-2)
