"""What this machine offers the kernels: CPU model (with x86's family and model, and the L2 size), instruction
set as torch dispatches it, native bf16, the integer dot-product instructions (VNNI), quantized engines,
threads. One line of it heads every timing.

    >>> rotconv.hardware_line()      # doctest: +SKIP
    'AMD EPYC, family 26 model 2, L2 1 MiB (2 cores) | ATen AVX512 | VNNI yes | bf16 yes | AMX no | ...'

"bf16 yes" means native bf16 instructions; "bf16 no (emulated)" an AVX-512 CPU where oneDNN runs bf16 slower
than float32.
"""
from __future__ import annotations

import glob
import os
import platform

import torch

__all__ = ["cpu_report", "hardware_line", "cpu_flags", "cache_sizes", "is_x86", "has_avx2", "has_vnni", "has_avx_vnni",
           "cpuid", "has_amx", "has_native_bf16", "onednn_has_bf16", "ISA_SWITCHES", "nnpack_unusable",
           "turn_off_unusable_nnpack"]


#: where the kernel describes the CPU and its caches (read at each call)
CPUINFO = "/proc/cpuinfo"
CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields in :data:`CPUINFO` (``{}`` where there is none), first value of each."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO) as handle:
            for line in handle:
                if not line.strip() and fields:
                    break
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; empty elsewhere)."""
    fields = _cpuinfo_fields()
    return set(fields.get("flags", fields.get("Features", "")).split())


def _cpu_model(fields: dict[str, str]) -> str:
    return fields.get("model name") or platform.processor() or platform.machine()


def _cpu_family_model(fields: dict[str, str]) -> tuple[int, int] | None:
    """x86's cpuid family and model (``cpu family``, ``model`` in cpuinfo ``fields``): what tells CPU
    generations apart where a virtual machine names its CPU only "AMD EPYC" or "Intel(R) Xeon(R) Processor"."""
    try:
        return int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None


def _read_line(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


def cache_sizes() -> dict[str, int]:
    """The first core's caches in KiB by name (``L1d``, ``L1i``, ``L2``, ``L3``), as the kernel reports them
    under :data:`CACHE_DIR`; ``{}`` where it does not. L1 and L2 are per core on current x86 and Arm server
    CPUs, L3 is shared."""
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    sizes = {}
    for entry in sorted(glob.glob(os.path.join(CACHE_DIR, "index*"))):
        try:
            level, kind, size = (_read_line(os.path.join(entry, name)) for name in ("level", "type", "size"))
            kib = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size) // 1024
        except (OSError, ValueError):
            continue
        sizes[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = kib
    return sizes


def _cpu_answers(probe_name: str, flag: str) -> bool:
    """torch's cpuid probe ``torch.cpu.<probe_name>`` where this torch has it, else the kernel's ``flag``."""
    probe = getattr(torch.cpu, probe_name, None)
    return bool(probe()) if probe is not None else flag in cpu_flags()


def is_x86() -> bool:
    """Whether this is an x86 CPU (x86-64 or 32-bit), where the VNNI question and the AVX2 kernels arise."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def has_avx2() -> bool:
    """Whether the CPU has AVX2, asked of the CPU itself like :func:`has_vnni` (an emulated CPU answers for itself;
    a CPU held to AVX2 by ``python -m benchmarks.isa`` still has it)."""
    return _cpu_answers("_is_avx2_supported", "avx2")


def nnpack_unusable() -> bool:
    """Whether torch's NNPACK (which torch considers for float convolutions that oneDNN does not take, such as the
    1x1 convs of a batch-1 forward) cannot start on this CPU: an x86 CPU without AVX2, which its x86 kernels need
    (Sandy and Ivy Bridge, AMD Bulldozer to Piledriver, Jaguar)."""
    return is_x86() and not has_avx2()


def turn_off_unusable_nnpack() -> bool:
    """Where :func:`nnpack_unusable`, turn NNPACK off in torch (``torch.backends.nnpack.set_flags(False)``) and
    return True. There torch would otherwise try to start it, and print "Could not initialize NNPACK! Reason:
    Unsupported hardware.", at every convolution it considers for it: 25 lines a forward of MobileNetV2 on one
    image. Nothing else changes: NNPACK could not have run. Called when rotconv is imported."""
    if not nnpack_unusable():
        return False
    torch.backends.nnpack.set_flags(False)
    return True


def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI, asked of the CPU itself (cpuid, through torch's cpuinfo; an emulated
    CPU answers for itself). Without it fbgemm and onnxruntime multiply uint8 by int8 through saturating int16
    pair sums (``vpmaddubsw``). AVX-VNNI (256-bit) is not seen here: such CPUs are treated as without."""
    return _cpu_answers("_is_vnni_supported", "avx512_vnni")


# x86-64 System V code for ``void f(uint32 leaf, uint32 subleaf, uint32 out[4])``: push rbx; mov r8, rdx;
# mov eax, edi; mov ecx, esi; cpuid; mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")
_cpuid_function = None


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """The CPU's answer ``(eax, ebx, ecx, edx)`` to the CPUID instruction, asked from this process (so what a
    library that asks the CPU itself sees: onnxruntime, oneDNN, XNNPACK; a CPU held lower by ``python -m
    benchmarks.isa`` answers for its level). None off Linux x86-64 or where the system refuses executable memory:
    the instruction runs from a page this function maps (written, then made read-only and executable)."""
    global _cpuid_function
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if _cpuid_function is None:
        import ctypes
        import mmap

        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            page.write(_CPUID_CODE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
                _cpuid_function = False
                return None
        except (OSError, ValueError, AttributeError):
            _cpuid_function = False
            return None
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))
        _cpuid_function = (page, prototype(address), ctypes.c_uint32 * 4)  # the page kept alive with the function
    if _cpuid_function is False:
        return None
    _, function, registers = _cpuid_function
    answer = registers()
    function(leaf, subleaf, answer)
    return tuple(answer)


def has_avx_vnni() -> bool:
    """Whether the CPU has AVX-VNNI (the 256-bit VNNI of Intel's client CPUs from Alder Lake on, and of AMD Zen 5),
    asked of the CPU itself (:func:`cpuid`, leaf 7 subleaf 1, EAX bit 4; torch has no probe for it). With it,
    onnxruntime and XNNPACK multiply uint8 by int8 into int32 (exact); fbgemm does not use it. False where CPUID
    cannot be asked."""
    highest = cpuid(0)
    if highest is None or highest[0] < 7:
        return False
    answer = cpuid(7, 1)
    return answer is not None and bool(answer[0] & (1 << 4))


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (the int8/bf16 matrix units oneDNN uses), asked of the CPU like
    :func:`has_vnni`, so that a CPU whose feature table is held lower (``python -m benchmarks.isa``) answers no."""
    return _cpu_answers("_is_amx_tile_supported", "amx_tile")


#: the environment variables by which libraries under torch hold their kernels below what the CPU has
ISA_SWITCHES = {"fbgemm": "FBGEMM_ENABLE_INSTRUCTIONS", "oneDNN": "ONEDNN_MAX_CPU_ISA", "ATen": "ATEN_CPU_CAPABILITY"}

#: the ``ONEDNN_MAX_CPU_ISA`` levels below AVX512_CORE_BF16: oneDNN held at one of them has no bf16 instructions
#: (at AVX512_CORE and AVX512_CORE_VNNI it still runs bf16, emulated; at AVX2_VNNI_2 it only converts)
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_has_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matrix products here at all (``torch.ops.mkldnn``'s own
    answer): on x86 AVX-512 CPUs natively with AVX512-BF16 or AMX, and *emulated* on those without them
    (Skylake-SP, Cascade Lake, Ice Lake), where bf16 is slower than float32 (no on AVX2-only CPUs; seen with
    oneDNN held to each level); on Arm with the bf16 extension."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_native_bf16() -> bool:
    """Whether bf16 runs on native instructions here, so that bf16 autocast is faster than float32: on x86
    AVX512-BF16 or AMX, asked of the CPU like :func:`has_vnni` and with oneDNN not held below them by
    ``ONEDNN_MAX_CPU_ISA``; on other CPUs oneDNN's answer (:func:`onednn_has_bf16`). An AVX-512 CPU without
    AVX512-BF16 answers no: oneDNN emulates bf16 there, and a MobileNetV2 training step took 1.56x (C_12) and
    1.65x (conventional) its float32 time (``python -m benchmarks.isa avx512 benchmarks.speed``, 2026-12-04)."""
    if not onednn_has_bf16():
        return False
    if not is_x86():
        return True
    held = os.environ.get(ISA_SWITCHES["oneDNN"], "").strip().upper()
    if held in _ONEDNN_BELOW_BF16:
        return False
    return _cpu_answers("_is_avx512_bf16_supported", "avx512_bf16") or has_amx()


def cpu_report() -> dict:
    """The facts :func:`hardware_line` prints, as a dict (kept beside timings in JSON results).

    ``avx2``: :func:`has_avx2` on x86, None elsewhere; ``vnni``: :func:`has_vnni`; ``avx_vnni``:
    :func:`has_avx_vnni` on x86, None elsewhere; ``amx``: :func:`has_amx`;
    ``bf16``: :func:`has_native_bf16`;
    ``bf16_emulated``: oneDNN runs bf16 without native instructions (:func:`onednn_has_bf16` but not native);
    ``isa_caps``: every library switch that holds kernels below the CPU (fbgemm, oneDNN, ATen), by library. A
    caller that holds other libraries (``python -m benchmarks.isa`` does XNNPACK) adds them to ``isa_caps``."""
    bf16 = has_native_bf16()
    fields = _cpuinfo_fields()
    family_model = _cpu_family_model(fields)
    return {
        "cpu": _cpu_model(fields),
        "family_model": list(family_model) if family_model else None,
        "caches_kib": cache_sizes(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": has_avx2() if is_x86() else None,
        "vnni": has_vnni(),
        "avx_vnni": has_avx_vnni() if is_x86() else None,
        "isa_caps": {library: os.environ[name] for library, name in ISA_SWITCHES.items() if os.environ.get(name)},
        "bf16": bf16,
        "bf16_emulated": not bf16 and onednn_has_bf16(),
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
    # reports stored before the family and caches were kept name the CPU alone
    family = f", family {r['family_model'][0]} model {r['family_model'][1]}" if r.get("family_model") else ""
    l2 = (r.get("caches_kib") or {}).get("L2")
    cache = (f", L2 {l2 // 1024} MiB" if l2 % 1024 == 0 else f", L2 {l2} KiB") if l2 else ""
    # an x86 CPU without AVX2 (ATen DEFAULT): no fbgemm, hence no x86 int8 engine, and no NNPACK
    no_avx2 = " (no AVX2)" if r.get("avx2") is False else ""
    return (f"{r['cpu']}{family}{cache} ({r['cores']} cores) | ATen {r['capability']}{no_avx2} | "
            f"VNNI {yes(r['vnni'])}{', AVX-VNNI yes' if r.get('avx_vnni') and not r['vnni'] else ''}{capped} | "
            f"bf16 {yes(r['bf16'])}{' (emulated)' if r.get('bf16_emulated') else ''} | AMX {yes(r['amx'])} | "
            f"int8 engines {', '.join(r['int8_engines'])} | "
            f"{r['threads']} threads | torch {r['torch']}")
