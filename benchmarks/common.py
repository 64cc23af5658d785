"""Small helpers shared by the benchmark commands."""
from __future__ import annotations

import io
import json
import os

import torch
import torch.nn as nn

__all__ = ["serialized_bytes", "write_json", "untrained_but_generic"]


def serialized_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def write_json(data: dict, path: str) -> None:
    """Write ``data`` as JSON atomically (temporary file in the same directory, then rename)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(temporary, path)


@torch.no_grad()
def untrained_but_generic(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """A MobileNetV2 stand-in for a trained one: random batch-norm affine parameters, statistics measured on
    ``images``, unit-variance classifier weights (the default init gives near-constant, tiny logits, which
    would look trivially invariant). Returned in eval mode."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.momentum = None  # cumulative average over the calibration batch
    model.classifier[-1].weight.normal_()
    model.train()
    model(images)
    return model.eval()
