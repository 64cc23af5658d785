"""Run by tests/test_pcam.py under torchrun: one float64 training step of a tiny MobileNetV2 on a shard of a
fixed global batch, with DistributedDataParallel and cross-process batch norm; rank 0 saves the gradients."""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mobilenet
import rotconv
from mobilenet.training import convert_batchnorm


def tiny_model(equivariant: bool) -> nn.Module:
    torch.manual_seed(0)
    group = rotconv.CyclicGroup(4) if equivariant else None
    return mobilenet.mobilenet_v2(group=group, width_mult=0.25, dropout=0.0).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, 95, 95, generator=generator, dtype=torch.float64),
            torch.randint(0, 2, (8,), generator=generator))


if __name__ == "__main__":
    equivariant, out = sys.argv[1] == "equivariant", sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = global_batch()
    local = len(x) // world
    model = convert_batchnorm(tiny_model(equivariant), "cpu")
    network = nn.parallel.DistributedDataParallel(model)
    F.cross_entropy(network(x[rank * local:(rank + 1) * local]), y[rank * local:(rank + 1) * local]).backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out)
    dist.destroy_process_group()
