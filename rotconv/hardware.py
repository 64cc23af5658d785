"""What this machine offers the kernels: CPU model, instruction set as torch dispatches it, native bf16, the
integer dot-product instructions (VNNI), quantized engines, threads. One line of it heads every timing.

    >>> rotconv.hardware_line()      # doctest: +SKIP
    'AMD EPYC (2 cores) | ATen AVX512 | VNNI yes | bf16 yes | AMX no | int8 engines qnnpack, ... | 2 threads'
"""
from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_report", "hardware_line", "cpu_flags", "is_x86", "has_vnni", "has_amx"]


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_answers(probe_name: str, flag: str) -> bool:
    """torch's cpuid probe ``torch.cpu.<probe_name>`` where this torch has it, else the kernel's ``flag``."""
    probe = getattr(torch.cpu, probe_name, None)
    return bool(probe()) if probe is not None else flag in cpu_flags()


def is_x86() -> bool:
    """Whether this is an x86 CPU (x86-64 or 32-bit), where the VNNI question and the AVX2 kernels arise."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI, asked of the CPU itself (cpuid, through torch's cpuinfo; an emulated
    CPU answers for itself). Without it fbgemm and onnxruntime multiply uint8 by int8 through saturating int16
    pair sums (``vpmaddubsw``). AVX-VNNI (256-bit) is not seen here: such CPUs are treated as without."""
    return _cpu_answers("_is_vnni_supported", "avx512_vnni")


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (the int8/bf16 matrix units oneDNN uses), asked of the CPU like
    :func:`has_vnni`, so that a CPU whose feature table is held lower (``python -m benchmarks.isa``) answers no."""
    return _cpu_answers("_is_amx_tile_supported", "amx_tile")


#: the environment variables by which libraries under torch hold their kernels below what the CPU has
_ISA_SWITCHES = {"fbgemm": "FBGEMM_ENABLE_INSTRUCTIONS", "oneDNN": "ONEDNN_MAX_CPU_ISA", "ATen": "ATEN_CPU_CAPABILITY"}


def cpu_report() -> dict:
    """The facts :func:`hardware_line` prints, as a dict (kept beside timings in JSON results).

    ``vnni``: :func:`has_vnni`; ``amx``: :func:`has_amx`; ``isa_caps``: every library switch that holds kernels
    below the CPU (fbgemm, oneDNN, ATen), by library. A caller that holds other libraries (``python -m
    benchmarks.isa`` does XNNPACK) adds them to ``isa_caps``."""
    bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "vnni": has_vnni(),
        "isa_caps": {library: os.environ[name] for library, name in _ISA_SWITCHES.items() if os.environ.get(name)},
        "bf16": bf16,
        "amx": has_amx(),
        "int8_engines": list(torch.backends.quantized.supported_engines),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def hardware_line(report: dict | None = None) -> str:
    """One line naming the CPU and what the kernels can use on it (``report``: default :func:`cpu_report`)."""
    r = report or cpu_report()

    def yes(value: bool) -> str:
        return "yes" if value else "no"

    # reports stored before isa_caps existed name only fbgemm's cap, as fbgemm_isa
    caps = r.get("isa_caps") or ({"fbgemm": r["fbgemm_isa"]} if r.get("fbgemm_isa") else {})
    capped = f" (kernels capped: {', '.join(f'{k} {v}' for k, v in caps.items())})" if caps else ""
    return (f"{r['cpu']} ({r['cores']} cores) | ATen {r['capability']} | VNNI {yes(r['vnni'])}{capped} | "
            f"bf16 {yes(r['bf16'])} | AMX {yes(r['amx'])} | int8 engines {', '.join(r['int8_engines'])} | "
            f"{r['threads']} threads | torch {r['torch']}")
