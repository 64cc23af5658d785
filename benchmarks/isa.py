"""Run a command with the kernels of a lesser x86 CPU, on any x86-64 CPU that has what that one has.

    python -m benchmarks.isa LEVEL MODULE_OR_SCRIPT [ARGS ...]
    python -m benchmarks.isa avx2 benchmarks.speed --quick
    python -m benchmarks.isa avx2 benchmarks.pcam --out run-avx2
    python -m benchmarks.isa avx512 pytest -q tests/test_quant.py

Levels:

* ``avx2``: an AVX2-only CPU (AMD Zen 1-3, Intel Haswell to Comet Lake): no AVX-512, VNNI, BF16 or AMX.
* ``avx512``: an AVX-512 CPU without VNNI or BF16 (Intel Skylake-SP, the first AVX-512 servers; AVX-512 F, CD,
  BW, DQ and VL only). int8 products go through the same saturating int16 pair sums as on AVX2 CPUs, and
  oneDNN runs bf16 emulated (slower than float32), so torch's own bf16 probe still answers yes there.
* ``avxvnni``: AVX2 with AVX-VNNI (the 256-bit VNNI of Intel's client CPUs from Alder Lake on, 12th-14th gen Core
  and Core Ultra, which have no AVX-512): oneDNN and XNNPACK have kernels for it, fbgemm and torch's VNNI probe
  do not (fbgemm runs its AVX2 kernels there).

What is held, in this process and before any of it loads:

* torch's own kernels, oneDNN and fbgemm, through their switches (``ATEN_CPU_CAPABILITY``,
  ``ONEDNN_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS``: :data:`AVX2_SWITCHES`, :data:`AVX512_SWITCHES`,
  :data:`AVXVNNI_SWITCHES`; so also in child processes). With oneDNN held to AVX2, torch reports no bf16; held
  to AVX512_CORE, no native bf16 (:func:`rotconv.hardware.has_native_bf16`); either way ``--precision auto``
  trains in fp32, as on such a CPU.
* ExecuTorch's XNNPACK (the ``.pte`` runtime), which has no switch: it picks its kernels from the CPU features
  that ExecuTorch's copy of cpuinfo detected (the ``cpuinfo_isa`` table of ``libexecutorch_threadpool.so``).
  :func:`cap_xnnpack` clears the entries the level's CPU lacks (AVX-512 beyond the level, AVX-VNNI but at
  ``avxvnni``, AMX) before XNNPACK is first initialised (in this process; child processes by the CPUID hold
  below). The library is loaded into the process's global symbol scope before torch, so torch's own CPU
  probes read the same table: ATen dispatches the level's code and ``torch.cpu._is_vnni_supported()``
  (:func:`rotconv.hardware.has_vnni`) answers no, as on such a CPU.
* What the CPU itself answers, for every library at once, onnxruntime included (it has no switch): the
  command runs again with ``benchmarks/cpuid_hold.c`` preloaded (``LD_PRELOAD``; built once with the system's C
  compiler into ``~/.cache/rotconv``), which has Linux trap the CPUID instruction (CPUID faulting) and answers
  it with the level's features: :func:`cpuid_held`. So also in child processes. Where there is no C compiler,
  or the system cannot trap CPUID, the command says so and runs with the holds above alone (onnxruntime then
  runs this CPU's kernels).

Not held: what the CPU is — caches, clocks and the cores' other units stay this machine's, so times are those
of the level's code on this CPU, not of such a CPU. Use it for ratios (the .pte against stock ExecuTorch,
channels_last against contiguous, bf16 against fp32) and to see which code path a result comes from.
``qemu-x86_64 -cpu Haswell`` (tests/test_isa.py) emulates a whole AVX2 CPU, exact in behaviour but saying
nothing about speed.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["AVX2_SWITCHES", "AVX512_SWITCHES", "AVXVNNI_SWITCHES", "LEVELS", "ISAError", "cap_xnnpack",
           "cap_xnnpack_at_avx2", "cpu_has_level", "xnnpack_capped", "xnnpack_isa", "CPUID_LEVEL_VARIABLE",
           "CPUID_LIBRARY_PREFIX", "build_cpuid_hold", "cpuid_held", "without_cpuid_hold", "main"]

#: The libraries' own switches that hold torch's kernels, oneDNN and fbgemm to AVX2
AVX2_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
#: ... and to AVX-512 without VNNI or BF16 (oneDNN's AVX512_CORE; fbgemm's AVX512 is its level before VNNI)
AVX512_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                   "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"}
#: ... and to AVX2 with AVX-VNNI (oneDNN's AVX2_VNNI; fbgemm and ATen have no level for it, AVX2 is theirs there)
AVXVNNI_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI",
                    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}

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

#: per level: its libraries' switches, the entries beyond AVX2 that its CPU has (kept in XNNPACK's table), and
#: what that CPU is, in words
LEVELS = {
    "avx2": (AVX2_SWITCHES, (), "AVX2"),
    "avx512": (AVX512_SWITCHES, ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
               "AVX-512 without VNNI or BF16"),
    "avxvnni": (AVXVNNI_SWITCHES, ("avxvnni",), "AVX2 with AVX-VNNI"),
}
# entries checked against the kernel's flags (name in /proc/cpuinfo) before the table is trusted (not AMX: Linux
# grants it per process)
_CHECKED = {"sse4_1": "sse4_1", "sse4_2": "sse4_2", "avx": "avx", "fma3": "fma", "f16c": "f16c", "avx2": "avx2",
            "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512bw": "avx512bw",
            "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "bmi2": "bmi2",
            "popcnt": "popcnt", "aes": "aes", "sha": "sha_ni", "avxvnni": "avx_vnni"}


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
    wrong = [field for field, flag in _CHECKED.items()
             if bool(table[_ISA_FIELDS.index(field)]) != (flag in flags)
             and not (field in _BEYOND_AVX2 and not table[_ISA_FIELDS.index(field)])]  # cleared by a cap
    if wrong:
        raise ISAError(f"ExecuTorch's cpuinfo feature table does not match /proc/cpuinfo (entries {', '.join(wrong)}: "
                       f"another cpuinfo layout, or an emulated CPU); XNNPACK left as it is")


def xnnpack_isa() -> str:
    """The widest x86 vector instruction set XNNPACK may pick kernels for in this process, as ExecuTorch's cpuinfo
    table now says: ``"AVX512-VNNI"``, ``"AVX512"`` (without VNNI), ``"AVX2-VNNI"`` (AVX2 with AVX-VNNI), ``"AVX2"``
    or ``"older"`` (on an emulated CPU, the emulated one's). Initialises that cpuinfo (cheap; XNNPACK itself is
    not touched)."""
    table = _isa_table()
    if table[_ISA_FIELDS.index("avx512f")]:
        return "AVX512-VNNI" if table[_ISA_FIELDS.index("avx512vnni")] else "AVX512"
    if table[_ISA_FIELDS.index("avx2")]:
        return "AVX2-VNNI" if table[_ISA_FIELDS.index("avxvnni")] else "AVX2"
    return "older"


def xnnpack_capped() -> bool:
    """Whether XNNPACK's feature table in this process lacks an instruction set the CPU has (/proc/cpuinfo):
    held lower by :func:`cap_xnnpack`."""
    table, flags = _isa_table(), _cpu_flags()
    return any(flag in flags and not table[_ISA_FIELDS.index(field)]
               for field, flag in _CHECKED.items() if field in _BEYOND_AVX2)


def cap_xnnpack(level: str = "avx2") -> None:
    """Clear the entries of ExecuTorch's cpuinfo table that a CPU of ``level`` (:data:`LEVELS`) lacks, so that
    XNNPACK takes that CPU's kernels. Must run before the first ExecuTorch program is loaded in this process
    (XNNPACK reads the table once); raises :class:`ISAError` where it cannot be done: an unknown level, no
    ExecuTorch, a runtime already loaded, a CPU without what the level has, or a table laid out otherwise than
    expected."""
    if level not in LEVELS:
        raise ISAError(f"unknown instruction set {level!r} (choices: {', '.join(LEVELS)})")
    if any(name.startswith("executorch.extension.pybindings") for name in sys.modules):
        raise ISAError("the ExecuTorch runtime is already loaded in this process; XNNPACK may have read the CPU "
                       "features already (cap it first thing, as python -m benchmarks.isa does)")
    table = _isa_table()
    _check_layout(table)
    kept = LEVELS[level][1]
    missing = [field for field in ("avx2", *kept) if not table[_ISA_FIELDS.index(field)]]
    if missing:
        raise ISAError(f"this CPU has no {', '.join(missing)}")
    for field in _BEYOND_AVX2:
        if field not in kept:
            table[_ISA_FIELDS.index(field)] = 0


def cap_xnnpack_at_avx2() -> None:
    """:func:`cap_xnnpack` at ``"avx2"``: XNNPACK takes the kernels of an AVX2-only CPU."""
    cap_xnnpack("avx2")


def cpu_has_level(level: str, flags: set[str] | None = None) -> bool:
    """Whether a CPU with these /proc/cpuinfo ``flags`` (default: this one's) has everything ``level`` runs."""
    flags = _cpu_flags() if flags is None else flags
    return "avx2" in flags and all(_CHECKED[field] in flags for field in LEVELS[level][1])


#: the variable that asks the preloaded ``cpuid_hold.c`` for a level (``avx2``, ``avx512``, ``avxvnni``)
CPUID_LEVEL_VARIABLE = "ROTCONV_CPUID_LEVEL"
#: how the built library's file name starts (then the source's hash)
CPUID_LIBRARY_PREFIX = "rotconv-cpuid-hold-"
_CPUID_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpuid_hold.c")
_CPUID_LEVELS = {1: "avx2", 2: "avx512", 3: "avxvnni"}
# another checkout's build may be in use (LD_PRELOAD of a running held process's children): removed a week on
_STALE_BUILD_SECONDS = 7 * 24 * 3600


def build_cpuid_hold() -> str:
    """The path of ``cpuid_hold.c`` built as a shared library for ``LD_PRELOAD``: in ``$XDG_CACHE_HOME/rotconv``
    (default ``~/.cache/rotconv``), named by the source's hash, built once with ``$CC`` (else ``cc``, ``gcc``)
    and moved into place whole (builds of other versions are removed once a week old: a process held with one
    may still start children that load it). Raises :class:`ISAError` without a C compiler or where the build
    fails."""
    with open(_CPUID_SOURCE, "rb") as handle:
        source = handle.read()
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "rotconv")
    library = os.path.join(cache, f"{CPUID_LIBRARY_PREFIX}{hashlib.sha256(source).hexdigest()[:16]}.so")
    if os.path.exists(library):
        return library
    compiler = next((found for found in (os.environ.get("CC"), "cc", "gcc") if found and shutil.which(found)), None)
    if compiler is None:
        raise ISAError("no C compiler (cc, gcc or $CC) to build the CPUID hold")
    try:
        os.makedirs(cache, exist_ok=True)
        descriptor, partial = tempfile.mkstemp(suffix=".so.partial", dir=cache)
        os.close(descriptor)
    except OSError as error:
        raise ISAError(f"cannot write the CPUID hold into {cache} ({error.strerror})") from None
    try:
        completed = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", partial, _CPUID_SOURCE, "-ldl"],
                                   capture_output=True, text=True)
        if completed.returncode != 0:
            last = (completed.stderr.strip().splitlines() or ["no message"])[-1]
            raise ISAError(f"{compiler} could not build the CPUID hold: {last}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    stale = time.time() - _STALE_BUILD_SECONDS
    for name in os.listdir(cache):  # builds of other versions of the source
        if name.startswith(CPUID_LIBRARY_PREFIX) and name.endswith(".so") and name != os.path.basename(library):
            try:
                if os.path.getmtime(os.path.join(cache, name)) < stale:
                    os.remove(os.path.join(cache, name))
            except OSError:
                pass
    return library


def cpuid_held() -> str | None:
    """The level (``"avx2"``, ``"avx512"``, ``"avxvnni"``) this process's CPUID answers for, held by the preloaded
    ``cpuid_hold.c``; None where it is not loaded, not asked, or cannot trap CPUID on this system."""
    return _CPUID_LEVELS.get(_cpuid_hold_state())


def _cpuid_hold_state() -> int | None:
    """The preloaded hold's own answer (1 avx2, 2 avx512, 3 avxvnni, 0 not asked, -1 no CPUID faulting), None if
    not loaded."""
    try:
        level = ctypes.CDLL(None).rotconv_cpuid_level
    except (AttributeError, OSError):
        return None
    level.restype = ctypes.c_int
    return level()


def without_cpuid_hold(environment: dict) -> dict:
    """``environment`` without the CPUID hold (its variable, its library in ``LD_PRELOAD``): for a child on an
    emulated CPU, which answers CPUID itself."""
    environment = dict(environment)
    environment.pop(CPUID_LEVEL_VARIABLE, None)
    kept = [entry for entry in environment.get("LD_PRELOAD", "").replace(":", " ").split()
            if not os.path.basename(entry).startswith(CPUID_LIBRARY_PREFIX)]
    if kept:
        environment["LD_PRELOAD"] = " ".join(kept)
    else:
        environment.pop("LD_PRELOAD", None)
    return environment


def _hold_cpuid(level: str, argv: list[str]) -> str:
    """Run this command again with the CPUID hold preloaded, asked for ``level`` (does not return), unless this
    is that run; then, in words, what holds CPUID here."""
    if os.environ.get(CPUID_LEVEL_VARIABLE) != level:
        try:
            library = build_cpuid_hold()
        except ISAError as error:
            return f"onnxruntime not held: {error}"
        preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.isa", *argv],
                  {**os.environ, CPUID_LEVEL_VARIABLE: level, "LD_PRELOAD": preload})
    if cpuid_held() == level:
        return "every library, onnxruntime included, by the CPU's answers (CPUID held)"
    if _cpuid_hold_state() is None:
        return "onnxruntime not held: the CPUID hold did not load (LD_PRELOAD)"
    return "onnxruntime not held: this system cannot trap CPUID (no CPUID faulting)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m benchmarks.isa {{{','.join(LEVELS)}}} MODULE_OR_SCRIPT [ARGS ...]"
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__ if argv[:1] in (["-h"], ["--help"]) else usage, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    isa, target, arguments = argv[0].lower(), argv[1], argv[2:]
    if isa not in LEVELS:
        print(f"{usage}\nbenchmarks.isa: unknown instruction set {argv[0]!r} (choices: {', '.join(LEVELS)})",
              file=sys.stderr)
        return 2
    flags = _cpu_flags()
    if os.uname().machine != "x86_64" or not cpu_has_level(isa, flags):
        kept = LEVELS[isa][1]
        avx512 = [field[6:].upper() for field in kept if field.startswith("avx512")]
        needs = " and ".join(["AVX2"] + ([f"AVX-512 {', '.join(avx512)}"] if avx512 else [])
                             + ["AVX-VNNI" for field in kept if field == "avxvnni"])
        print(f"benchmarks.isa: {isa} needs an x86-64 Linux CPU with {needs}", file=sys.stderr)
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
    cpuid = _hold_cpuid(isa, argv)
    if isa == "avx2" and cpuid_held() != isa and "avx512f" in flags and "avx512_vnni" not in flags:
        # fbgemm sizes a 1x1 conv's row offsets by what cpuinfo answers (56 rows a block there) and fills them in
        # blocks of the switched instruction set (120 for AVX2): tests/test_isa.py shows the overrun
        print(f"benchmarks.isa: avx2 on an AVX-512 CPU without VNNI needs CPUID held, and {cpuid}: fbgemm switched "
              "to AVX2 on such a CPU writes past its row offsets (sized for the CPU, filled for the switch)",
              file=sys.stderr)
        return 2
    os.environ.update(LEVELS[isa][0])
    try:
        cap_xnnpack(isa)
        xnnpack = "XNNPACK (.pte) by its cpuinfo table"
    except ISAError as error:
        xnnpack = f"not XNNPACK: {error}"
    print(f"benchmarks.isa: kernels held to {LEVELS[isa][2]}: torch/oneDNN/fbgemm by their switches, {xnnpack}; "
          f"{cpuid}", file=sys.stderr, flush=True)
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
