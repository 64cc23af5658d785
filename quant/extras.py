"""What the deployment paths (ExecuTorch, ONNX) share: the optional extra they need, and the input check run
before a batch is handed to another runtime."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
from typing import Iterator

import numpy as np
import torch

from rotconv.validation import check_normalised

from .notices import upstream_notices_hidden

#: how to install what :mod:`quant.executorch` and :mod:`quant.onnx` need
DEPLOY_EXTRA = "pip install 'rotconv[deploy]'  (executorch==1.5.1, onnxruntime)"


#: Loggers that warn while the deploy extra is first imported about things a CPU user cannot act on: torchao's
#: CUDA-only kernel libraries (``Failed to load ..._C_cutlass_90a.abi3.so``) and a pytree deprecation in
#: torchao's own registration code. Quieted (to errors) for the duration of the import only.
_IMPORT_TIME_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_import_logs() -> Iterator[None]:
    """Raise :data:`_IMPORT_TIME_LOGGERS` to ERROR inside the block, then restore their levels."""
    loggers = [logging.getLogger(name) for name in _IMPORT_TIME_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class NativeOutput:
    """What was written to stderr inside :func:`capture_native_stderr` (``text``, set on exit)."""

    def __init__(self) -> None:
        self.text = ""


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[NativeOutput]:
    """Capture everything written to stderr inside the block: by C/C++ code to file descriptor 2, and through
    Python's ``sys.stderr`` (where pybind11 modules may route their C++ streams).

    The ExecuTorch runtime logs from C++ while it first loads a method (``[cpuinfo_utils.cpp:87] Failed to open
    midr file ...``: its probe for ARM CPU registers, noise on x86), and explains there why it rejects a file;
    ``logging`` and ``warnings`` filters cannot reach it. The caller decides what to do with the text: drop it on
    success, put it into the error message on failure, so nothing diagnostic is lost."""
    captured = NativeOutput()
    python_side = io.StringIO()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): the Python side only
        saved = None
    with tempfile.TemporaryFile(mode="w+b") as sink:
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield captured
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace") + python_side.getvalue()


def require_extra(modules: tuple[str, ...], what: str) -> None:
    """Import ``modules`` or raise an ImportError that names ``what`` needed them and the extra to install.
    Their notices about themselves at import (ExecuTorch's "This API is experimental") are hidden."""
    for name in modules:
        try:
            with quiet_import_logs(), upstream_notices_hidden():
                importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"{what} needs {name}, which is an optional extra: {DEPLOY_EXTRA} ({error})") from None


def output_classes(shape: tuple) -> int | None:
    """The number of classes of a runtime's ``(batch, classes)`` output shape read from its file; None for
    another shape or a symbolic class dimension."""
    return shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None


def runtime_input(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``x`` as a contiguous float32 CPU tensor of shape ``(B, *shape[1:])``, ``B >= 1``, checked finite and
    normalised (:func:`rotconv.check_normalised`: raw 0-255 pixels are refused).

    The check runs in numpy, single-threaded: a torch reduction here wakes torch's OpenMP threads, which then
    spin on the cores the other runtime's thread pool is about to use (measured: 7 ms added to a 20 ms
    ExecuTorch call at batch 32 on 2 cores; numpy's check takes 0.06 ms)."""
    if not isinstance(x, torch.Tensor) or x.dim() != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"input: the model expects (B, {', '.join(map(str, shape[1:]))}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] == 0:
        raise ValueError("input: an empty batch (0 images)")
    x = x.detach().to("cpu", torch.float32).contiguous()
    values = x.numpy()
    if not np.isfinite(values).all():
        raise ValueError("input: contains NaN or infinite values")
    check_normalised(float(np.abs(values).max()))
    return x


#: the INT8 runtimes the project offers: an ExecuTorch/XNNPACK program, an ONNX QDQ file for onnxruntime, or
#: torch.ao's int8 kernels in this process (:func:`quant.dfq`)
INT8_RUNTIMES = ("executorch", "onnx", "torch-ao")


def default_int8_runtime() -> str:
    """The recommended INT8 runtime on this machine: ``"executorch"`` where the ``deploy`` extra is installed
    (the fastest measured at batch 1 on every CPU kind tried and level with torch.ao at batch 32 with AVX2
    kernels; 8-bit activations), else ``"torch-ao"``. Every runtime is bit-exact under quarter turns on CPUs
    with and without VNNI (tests/test_isa.py), so the choice is speed and installed packages only."""
    return "executorch" if importlib.util.find_spec("executorch") is not None else "torch-ao"
