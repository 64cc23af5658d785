"""Data-parallel training over processes (torchrun): which process this is, and batch norm over the global
batch on CPUs, where torch's SyncBatchNorm is not supported."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["Distributed", "CrossProcessBatchNorm", "convert_batchnorm", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes with a backward that sums the gradients over processes too (each process's input
    contributes to every process's output)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all processes of the default group."""
    return _AllReduceSum.apply(tensor)


@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: str) -> "Distributed":
        """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), world_size, local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all processes (any input ``(B, C, *)``), for CPU process groups.

    Per-channel sums and sums of squares are all-reduced with the differentiable
    all-reduce (:func:`all_reduce_sum`), so the backward pass also sees the whole batch. Parameters and
    buffers are named as in :class:`torch.nn.BatchNorm2d` (state dicts are interchangeable).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input: expected (B, C, ...), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # two passes (mean, then centred squares), accumulated in float64 as torch's CPU batch norm does
        count = torch.tensor([x.numel() / channels], dtype=torch.float64)
        sums = all_reduce_sum(torch.cat([x.sum(dims, dtype=torch.float64), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        centred = x - mean.to(x.dtype).reshape(shape)
        var = all_reduce_sum((centred * centred).sum(dims, dtype=torch.float64)) / total
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = centred * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def convert_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Make every batch norm of ``model`` compute its statistics over all processes."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
            reference = module.running_mean if module.running_mean is not None else module.weight
            replacement = CrossProcessBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                                module.track_running_stats, device=reference.device,
                                                dtype=reference.dtype)
            replacement.load_state_dict(module.state_dict())
            replacement.train(module.training)
            model.set_submodule(name, replacement)
    return model
