"""Small helpers shared by the benchmark commands."""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys

import torch
import torch.nn as nn

import rotconv
from rotconv.hardware import ISA_SWITCHES
from mobilenet.training import UsageError, reuse_freed_memory
from rotconv.files import OutputError, check_writable, write_json

from .isa import without_cpuid_hold

__all__ = ["add_memory_argument", "apply_memory_argument", "serialized_bytes", "untrained_but_generic",
           "initialize_rotconv_layers", "check_outputs", "report", "REPOSITORY", "child_environment"]

#: the directory holding this repository's packages (a child Python imports them from here, installed or not)
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(results: dict, out: str | None) -> None:
    """A command's end: print ``results["table"]``, and write ``results`` as JSON to ``out`` where given."""
    print(results["table"])
    if out:
        write_json(results, out)


def child_environment(**variables: str) -> dict:
    """This process's environment for a child Python that imports this repository's packages (the repository on
    ``PYTHONPATH`` first), with ``variables`` set."""
    path = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **variables}


def emulated_cpu_environment(**variables: str) -> dict:
    """:func:`child_environment` for a child on an emulated CPU (valgrind's, qemu's): without the libraries' ISA
    switches (:data:`rotconv.hardware.ISA_SWITCHES`; ``python -m benchmarks.isa`` sets them), which may name more
    than that CPU has (``avx512`` under ``python -m benchmarks.isa avx512``; the child
    would then run instructions its CPU lacks), and without that command's CPUID hold. The emulated CPU alone
    decides its kernels."""
    environment = without_cpuid_hold(child_environment(**variables))
    for name in ISA_SWITCHES.values():
        if name not in variables:
            environment.pop(name, None)
    return environment


def check_outputs(out: str | None = None, plots: str | None = None) -> None:
    """Before any work: ``--out`` (a file) can be written; ``--plots`` (a directory) needs matplotlib and can be
    written. :class:`mobilenet.training.UsageError` naming the option otherwise (exit 2 in every command)."""
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plots", f"{plots}: plots need matplotlib, which is not installed "
                                    "(pip install 'rotconv[plot]')")
    for option, path, is_directory in (("--out", out, False), ("--plots", plots, True)):
        if path:
            try:
                check_writable(path, is_directory=is_directory)
            except OutputError as error:
                raise UsageError(option, str(error)) from None


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    """``--reuse-memory`` / ``--no-reuse-memory`` (default on): :func:`mobilenet.training.reuse_freed_memory`."""
    parser.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="keep freed tensor memory in the process for reuse (glibc: no page faults for the "
                             "tens of MB a step allocates; the process keeps its peak heap; default: on where the "
                             "C library is glibc)")


def apply_memory_argument(args: argparse.Namespace) -> None:
    """Apply ``--reuse-memory`` (default None: on where possible, silently; an explicit ``--reuse-memory`` where
    the C library is not glibc gets a one-line notice; ``--no-reuse-memory`` leaves the allocator alone)."""
    choice = getattr(args, "reuse_memory", None)
    if choice is False:
        return
    if not reuse_freed_memory() and choice is True:
        print("notice: --reuse-memory needs glibc's malloc (Linux); keeping the system allocator's behaviour",
              file=sys.stderr)


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
