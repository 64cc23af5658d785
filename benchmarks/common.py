"""Small helpers shared by the benchmark commands."""
from __future__ import annotations

import io

import torch
import torch.nn as nn

import rotconv
from mobilenet.files import (OutputError, RunLock, atomic_write, check_writable, clean_temporary_files, differences,
                             file_fingerprint, strict_json, write_json)

__all__ = ["serialized_bytes", "untrained_but_generic", "initialize_rotconv_layers", "atomic_write", "clean_temporary_files", "check_writable",
           "strict_json", "write_json", "file_fingerprint", "differences", "RunLock", "OutputError"]


def serialized_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def initialize_rotconv_layers(model: nn.Module, mode: str) -> nn.Module:
    """Re-draw every rotconv layer's coefficients with Kaiming ``mode`` ("fan_in", mobilenet_v2's default, or
    "fan_out", torchvision's rule) for the init studies of benchmarks.efficiency and benchmarks.scales."""
    for module in model.modules():
        if isinstance(module, rotconv.SteerableConv2d):
            module.reset_parameters(mode=mode)
    return model


@torch.no_grad()
def untrained_but_generic(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """A MobileNetV2 stand-in for a trained one: random batch-norm affine parameters, statistics measured on
    ``images``, unit-variance classifier weights (the default init gives near-constant, tiny logits, which
    would look trivially invariant). Returned in eval mode."""
    model.classifier[-1].weight.normal_()
    return rotconv.randomize_batchnorm(model, images)
