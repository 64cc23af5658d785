"""Run a command with the kernels an AVX2-only x86 CPU runs, on any x86-64 CPU with AVX2 (AVX-512, AMX).

    python -m benchmarks.isa avx2 MODULE_OR_SCRIPT [ARGS ...]
    python -m benchmarks.isa avx2 benchmarks.speed --quick
    python -m benchmarks.isa avx2 benchmarks.pcam --out run-avx2

What is held to AVX2, in this process and before any of it loads:

* torch's own kernels, oneDNN and fbgemm, through their switches ``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` (so also in child processes). With
  oneDNN held to AVX2, torch reports no native bf16 and ``--precision auto`` trains in fp32, as on such a CPU.
* ExecuTorch's XNNPACK (the ``.pte`` runtime), which has no switch: it picks its kernels from the CPU features
  that ExecuTorch's copy of cpuinfo detected (the ``cpuinfo_isa`` table of ``libexecutorch_threadpool.so``).
  :func:`cap_xnnpack_at_avx2` clears the AVX-512, AVX-VNNI and AMX entries of that table before XNNPACK is
  first initialised. Only in this process, not in child processes. The library is loaded into the process's
  global symbol scope before torch, so torch's own CPU probes read the same table: ATen dispatches AVX2 code and
  ``torch.cpu._is_vnni_supported()`` (:func:`rotconv.hardware.has_vnni`) answers no, as on an AVX2-only CPU.

Not held: onnxruntime (it reads the CPU itself), and what the CPU is — caches, clocks and the cores' other
units stay this machine's, so times are those of AVX2 code on this CPU, not of an AVX2-only CPU. Use it for
ratios (the .pte against stock ExecuTorch, channels_last against contiguous) and to see which code path a
result comes from; for whole-CPU behaviour (onnxruntime too) run under ``qemu-x86_64 -cpu Haswell``
(tests/test_isa.py), which is exact in behaviour but says nothing about speed.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import runpy
import sys

__all__ = ["AVX2_SWITCHES", "ISAError", "cap_xnnpack_at_avx2", "xnnpack_isa", "main"]

#: The libraries' own switches that hold torch's kernels, oneDNN and fbgemm to AVX2
AVX2_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}

# cpuinfo's ``struct cpuinfo_x86_isa`` on x86-64 (one bool per feature, in this order; 85 entries in the
# cpuinfo that ExecuTorch 1.x links). The order is checked against /proc/cpuinfo before anything is written.
_ISA_FIELDS = (
    "rdtscp rdpid sysenter msr clzero clflush clflushopt mwait mwaitx fxsave xsave 3dnow 3dnowplus prefetch "
    "prefetchw prefetchwt1 sse3 ssse3 sse4_1 sse4_2 sse4a misaligned_sse avx avxvnni fma3 fma4 xop f16c avx2 "
    "avx512f avx512pf avx512er avx512cd avx512dq avx512bw avx512vl avx512ifma avx512vbmi avx512vbmi2 "
    "avx512bitalg avx512vpopcntdq avx512vnni avx512bf16 avx512fp16 avx512vp2intersect avx512_4vnniw "
    "avx512_4fmaps avx10_1 avx10_2 amx_bf16 amx_tile amx_int8 amx_fp16 avx_vnni_int8 avx_vnni_int16 "
    "avx_ne_convert hle rtm xtest mpx cmpxchg16b clwb movbe lahf_sahf fs_gs_base lzcnt popcnt tbm bmi bmi2 adx "
    "aes vaes pclmulqdq vpclmulqdq gfni rdrand rdseed sha rng ace ace2 phe pmm lwp").split()
# what an AVX2-only CPU lacks: every entry from avx512f to avx_ne_convert, and AVX-VNNI
_BEYOND_AVX2 = ["avxvnni"] + _ISA_FIELDS[_ISA_FIELDS.index("avx512f"):_ISA_FIELDS.index("avx_ne_convert") + 1]
# entries checked against the kernel's flags (name in /proc/cpuinfo) before the table is trusted
_CHECKED = {"sse4_1": "sse4_1", "sse4_2": "sse4_2", "avx": "avx", "fma3": "fma", "f16c": "f16c", "avx2": "avx2",
            "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512bw": "avx512bw",
            "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "bmi2": "bmi2",
            "popcnt": "popcnt", "aes": "aes", "sha": "sha_ni"}  # not AMX: Linux grants it per process


class ISAError(RuntimeError):
    """The kernels cannot be held to the instruction set asked for on this machine; the message says why."""


def _cpu_flags() -> set[str]:
    # rotconv.hardware.cpu_flags reads the same, but importing it loads torch, which must come after the switches
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_table():
    """ExecuTorch's cpuinfo feature table as writable bytes (cpuinfo initialised), checked against the CPU."""
    if importlib.util.find_spec("executorch") is None:
        raise ISAError("ExecuTorch is not installed (the optional deploy extra): no XNNPACK to hold to AVX2")
    import executorch
    library = None
    for directory in executorch.__path__:
        candidate = os.path.join(directory, "lib", "libexecutorch_threadpool.so")
        if os.path.exists(candidate):
            library = candidate
    if library is None:
        raise ISAError("ExecuTorch has no lib/libexecutorch_threadpool.so (a build this tool does not know)")
    handle = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    try:
        initialize, table = handle.cpuinfo_initialize, (ctypes.c_uint8 * len(_ISA_FIELDS)).in_dll(handle, "cpuinfo_isa")
    except (AttributeError, ValueError) as error:
        raise ISAError(f"{library} does not export cpuinfo's feature table ({error})") from None
    initialize.restype = ctypes.c_bool
    if not initialize():
        raise ISAError("ExecuTorch's cpuinfo could not read this CPU")
    return table


def _check_layout(table) -> None:
    """Refuse to write into a table that does not say what the kernel says the CPU has (another cpuinfo layout,
    or an emulated CPU whose CPUID differs from the host's /proc/cpuinfo), except for entries already cleared."""
    flags = _cpu_flags()
    if not flags:
        raise ISAError("no CPU flags in /proc/cpuinfo to check ExecuTorch's cpuinfo table against")
    capped = not any(table[_ISA_FIELDS.index(field)] for field in _BEYOND_AVX2)
    wrong = [field for field, flag in _CHECKED.items()
             if bool(table[_ISA_FIELDS.index(field)]) != (flag in flags)
             and not (capped and field in _BEYOND_AVX2 and not table[_ISA_FIELDS.index(field)])]
    if wrong:
        raise ISAError(f"ExecuTorch's cpuinfo feature table does not match /proc/cpuinfo (entries {', '.join(wrong)}: "
                       f"another cpuinfo layout, or an emulated CPU); XNNPACK left as it is")


def xnnpack_isa() -> str:
    """The widest x86 vector instruction set XNNPACK may pick kernels for in this process, as ExecuTorch's cpuinfo
    table now says: ``"AVX512"``, ``"AVX2"`` or ``"older"`` (on an emulated CPU, the emulated one's). Initialises
    that cpuinfo (cheap; XNNPACK itself is not touched)."""
    table = _isa_table()
    if table[_ISA_FIELDS.index("avx512f")]:
        return "AVX512"
    return "AVX2" if table[_ISA_FIELDS.index("avx2")] else "older"


def cap_xnnpack_at_avx2() -> None:
    """Clear the AVX-512, AVX-VNNI and AMX entries of ExecuTorch's cpuinfo table, so that XNNPACK takes the
    kernels of an AVX2-only CPU. Must run before the first ExecuTorch program is loaded in this process (XNNPACK
    reads the table once); raises :class:`ISAError` where it cannot be done: no ExecuTorch, a runtime already
    loaded, a CPU without AVX2, or a table laid out otherwise than expected."""
    if any(name.startswith("executorch.extension.pybindings") for name in sys.modules):
        raise ISAError("the ExecuTorch runtime is already loaded in this process; XNNPACK may have read the CPU "
                       "features already (cap it first thing, as python -m benchmarks.isa does)")
    table = _isa_table()
    _check_layout(table)
    if not table[_ISA_FIELDS.index("avx2")]:
        raise ISAError("this CPU has no AVX2")
    for field in _BEYOND_AVX2:
        table[_ISA_FIELDS.index(field)] = 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m benchmarks.isa avx2 MODULE_OR_SCRIPT [ARGS ...]"
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__ if argv[:1] in (["-h"], ["--help"]) else usage, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    isa, target, arguments = argv[0].lower(), argv[1], argv[2:]
    if isa != "avx2":
        print(f"{usage}\nbenchmarks.isa: unknown instruction set {argv[0]!r} (choices: avx2)", file=sys.stderr)
        return 2
    if os.uname().machine != "x86_64" or "avx2" not in _cpu_flags():
        print("benchmarks.isa: needs an x86-64 Linux CPU with AVX2", file=sys.stderr)
        return 2
    is_script = target.endswith(".py")
    if is_script and not os.path.isfile(target):
        print(f"benchmarks.isa: no such script: {target}", file=sys.stderr)
        return 2
    if not is_script and importlib.util.find_spec(target.split(".")[0]) is None:
        print(f"benchmarks.isa: no such module: {target}", file=sys.stderr)
        return 2
    if "torch" in sys.modules:  # the switches are read when the libraries load
        print("benchmarks.isa: torch is already loaded; run it as python -m benchmarks.isa", file=sys.stderr)
        return 2
    os.environ.update(AVX2_SWITCHES)
    try:
        cap_xnnpack_at_avx2()
        xnnpack = "XNNPACK (.pte) by its cpuinfo table"
    except ISAError as error:
        xnnpack = f"not XNNPACK: {error}"
    print(f"benchmarks.isa: kernels held to AVX2: torch/oneDNN/fbgemm by their switches, {xnnpack}; "
          f"onnxruntime not (it reads the CPU itself)", file=sys.stderr, flush=True)
    sys.argv = [target, *arguments]
    try:
        if is_script:
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
