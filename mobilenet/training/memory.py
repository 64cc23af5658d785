"""Keeping freed tensor memory in the process for reuse (glibc), so that large CPU tensors stop costing page faults.

Why: glibc's ``malloc`` serves a request above its mmap threshold (128 KiB, rising with use to at most 32 MiB)
with a fresh ``mmap`` and returns it to the kernel on ``free``; heap memory above 128 KiB at the top is
trimmed back too. A batch-32 forward of MobileNetV2 at 95x95 allocates and frees tensors of tens of MB
(32 x 96 x 47 x 47 float32 is 27 MB), so in a process that only predicts the kernel zero-fills the same pages again
on every call. Measured on 2 cores (Intel Xeon, torch 2.13.0; ``python -m benchmarks.speed``, its allocator
section: fresh processes, 3 rounds): 69,000-84,000 minor page faults and 180-215 ms of system time per forward,
which reuse takes to none: 368 -> 245 ms (conventional), 392 -> 245 ms (C_12). A training process keeps most of
its heap anyway (activations live until the backward pass): 600-8,000 faults per fp32 step, none in bf16, and no
measurable change in step time. In isolation ``nn.Conv2d(16, 96, 1)`` on 32 x 16 x 47 x 47 took 25.7 ms instead
of 2.9 ms.

:func:`reuse_freed_memory` turns off mmap-served allocations and heap trimming (``mallopt``), so freed blocks
stay in the heap and the next step reuses them without faults. The price: the process keeps its peak heap until
it exits (the memory is reused by later allocations, not returned to the system), as PyTorch's CUDA caching
allocator does on a GPU. It is a process-wide setting; the command-line tools (benchmarks.pcam, .efficiency, .scales,
.speed, .predict) call it first unless told ``--no-reuse-memory``. Other allocators with the same effect
(jemalloc, tcmalloc via ``LD_PRELOAD``) work as well.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["reuse_freed_memory"]

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's initial values (its dynamic threshold adjustment is not restored once mallopt has set them)
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# the largest trim threshold mallopt takes (an int)
_NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None  # musl and others: no glibc malloc tunables
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def reuse_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory in this process for reuse (``enable=True``) or go back to glibc's initial settings.

    With ``enable=True``: no allocation is served by its own ``mmap`` and the heap is never trimmed, so the
    tensors of one training step or forward reuse the memory of the previous one. ``enable=False`` restores
    glibc's initial thresholds (128 KiB; its dynamic mmap threshold stays off once set). Returns whether the
    setting was applied: True on Linux with glibc, False elsewhere (macOS, Windows, musl), where nothing changes.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable: expected a bool, got {type(enable).__name__}")
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    else:
        settings = ((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD),
                    (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
