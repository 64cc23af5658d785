"""INT8 quarter-turn exactness on CPUs other than the one running the suite.

The int8 kernels take different paths by instruction set: without VNNI (AVX2, AVX-512 F/BW) fbgemm and
onnxruntime multiply uint8 by int8 with ``vpmaddubsw``, whose int16 pair sums saturate. Two ways to check
those paths on any x86 machine, each in a subprocess (tests/isa_worker.py):

* the libraries' own switches, ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
  ``ATEN_CPU_CAPABILITY=avx2`` (torch's kernels only; onnxruntime and XNNPACK read the CPU themselves), and
  the same switches plus ExecuTorch's XNNPACK held to AVX2 by ``python -m benchmarks.isa avx2`` (the .pte's
  AVX2 kernels at native speed), and every library held to AVX-512 without VNNI or BF16 (Skylake-SP) by
  ``python -m benchmarks.isa avx512``; that command also holds what the CPU answers to CPUID (where a C
  compiler and CPUID faulting are at hand), so that onnxruntime runs the level's kernels too;
* the whole process on an emulated AVX2 CPU (``qemu-x86_64 -cpu Haswell``, user-mode emulation), where every
  library, onnxruntime and ExecuTorch's XNNPACK included, sees a CPU without AVX-512. Skipped, with the
  reason printed, where qemu-user is not installed (``.ci/run`` installs it where apt-get can), and on a CPU
  that is itself AVX2-only, where the rest of the suite runs those kernels natively;
* the whole process on an emulated CPU with AVX but not AVX2 (``qemu-x86_64 -cpu SandyBridge``), where torch
  offers no x86 or fbgemm engine and the default is qnnpack.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest

import quant
import rotconv.hardware
from benchmarks.common import child_environment, emulated_cpu_environment
from benchmarks.emulated_arm import ARM_CPUS
from benchmarks.emulated_arm import ready as arm_ready

WORKER = os.path.join(os.path.dirname(__file__), "isa_worker.py")
AVX2_SWITCHES = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _qemu_version() -> tuple[int, int] | None:
    """qemu-x86_64's version (major, minor), or None where it is not installed or does not say."""
    if shutil.which("qemu-x86_64") is None:
        return None
    try:
        completed = subprocess.run(["qemu-x86_64", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\d+)\.(\d+)", completed.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


# qemu's CPU emulation (TCG) runs AVX and AVX2 code from version 7.2 on; an older one would start the CPU model
# without them, and numpy would stop at its first AVX instruction
QEMU_RUNS_AVX = (_qemu_version() or (0, 0)) >= (7, 2)
NO_QEMU_REASON = ("qemu-user 7.2 or later is not installed (apt-get install qemu-user; older ones cannot run AVX "
                  "code): no emulated {}")


def _run_worker(prefix: list[str], env: dict, arguments: list[str] = (), timeout: int = 900,
                script_prefix: bool = True, emulated: bool = False, stderr: list | None = None) -> dict:
    """The worker's report; ``prefix`` runs before it (an emulator, then the interpreter; or, with
    ``script_prefix=False``, a whole command that takes the worker's path, such as ``python -m benchmarks.isa``).
    ``stderr``: a list that receives what the worker printed there."""
    # the repository on the path, installed or not (the worker imports the packages under test from here)
    command = prefix + [sys.executable, WORKER] if script_prefix else prefix + [WORKER]
    # on an emulated CPU the library switches this suite may run under (python -m benchmarks.isa avx512) would
    # name instructions that CPU lacks
    environment = (emulated_cpu_environment if emulated else child_environment)(**env)
    completed = subprocess.run(command + list(arguments), env=environment, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    if stderr is not None:
        stderr.append(completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory) -> list[str]:
    """A random C_4 network as an ONNX QDQ file (weights as uint8, the default), the same with int8 weights, and a
    .pte, written once for the held and emulated CPUs."""
    pytest.importorskip("executorch", reason="the .pte runtime is the optional deploy extra")
    pytest.importorskip("onnxruntime", reason="the ONNX runtime is the optional deploy extra")
    import test_onnx

    model = test_onnx._random_model("C4")
    directory = tmp_path_factory.mktemp("int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [quant.to_onnx(model, str(directory / "int8.onnx"), group="C4"),
                quant.to_onnx(model, str(directory / "int8-weights.onnx"), group="C4", weight_dtype="int8"),
                quant.to_executorch(model, str(directory / "int8.pte"), group="C4")]


def _check(report: dict) -> None:
    exact = {name: difference for name, difference in report["engines"].items() if "unclamped" not in name}
    assert exact and all(difference == 0.0 for difference in exact.values()), report
    assert all(difference == 0.0 for difference in report["files"].values()), report


def _avx512_without_vnni() -> bool:
    """Whether this CPU answers AVX-512 but not VNNI (a Skylake-SP kind, or one held to it by benchmarks.isa)."""
    import torch
    return bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)()) and not rotconv.hardware.has_vnni()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set switches")
def test_int8_is_bit_exact_under_the_libraries_avx2_switches():
    if _avx512_without_vnni():
        # fbgemm switched to AVX2 on such a CPU overruns a pointwise conv's row offsets (the test below); python -m
        # benchmarks.isa avx2, which also holds CPUID, checks the level instead
        pytest.skip("fbgemm's AVX2 switch on a CPU answering AVX-512 without VNNI: checked by benchmarks.isa avx2")
    report = _run_worker([], AVX2_SWITCHES)
    assert report["capability"] == "AVX2", report  # the switches took effect
    _check(report)
    # the control: without ClampCodes the AVX2 kernels saturate and a quarter turn moves the logits, so the
    # switches reached fbgemm's AVX2 path and this test can fail
    assert max(v for k, v in report["engines"].items() if "unclamped" in k) > 0, report


def _lacks_level(level: str) -> bool:
    from benchmarks.isa import cpu_has_level
    return platform.machine() not in ("x86_64", "AMD64") or not cpu_has_level(level)


# A pointwise (1x1) quantized conv on fbgemm: its row-offset buffer is sized for the CPU's own instruction set
# (PackAWithRowOffset::rowOffsetBufferSize asks cpuinfo: 56 rows a block with AVX-512 and no VNNI, 384 with
# VNNI, 120 with AVX2) and filled in blocks of the instruction set FBGEMM_ENABLE_INSTRUCTIONS selects (120 rows
# for AVX2). Prints what the CPU answers, then "ran" after 20 forwards of `rows` output pixels.
POINTWISE_CONV = """
import sys, torch
from benchmarks.isa import cpuid_held
torch.backends.quantized.engine = "fbgemm"
print(cpuid_held(), torch.cpu._is_vnni_supported(), flush=True)
weight = torch.quantize_per_tensor(torch.randn(16, 16, 1, 1), 0.05, 0, torch.qint8)
packed = torch.ops.quantized.conv2d_prepack(weight, None, [1, 1], [0, 0], [1, 1], 1)
x = torch.quantize_per_tensor(torch.rand(1, 16, 1, int(sys.argv[1])), 0.01, 0, torch.quint8)
for _ in range(20):
    torch.ops.quantized.conv2d(x, packed, 0.1, 0)
print("ran", flush=True)
"""


@pytest.mark.skipif(_lacks_level("avx512"),
                    reason="holding CPUID to AVX-512 without VNNI needs an x86-64 CPU with AVX-512 F, CD, BW, DQ, VL")
def test_fbgemm_switched_to_avx2_overruns_pointwise_row_offsets_where_the_cpu_answers_avx512_without_vnni():
    """Why ``benchmarks.isa avx2`` needs CPUID held on a Skylake-SP kind of CPU, and why the plain-switch test is
    skipped there: the switch alone makes fbgemm write 120 row offsets into a buffer of 56. If a torch release
    fixes that, this test fails and both can go."""
    from benchmarks import isa

    try:
        library = isa.build_cpuid_hold()
    except isa.ISAError as error:
        pytest.skip(f"the CPU cannot be held to AVX-512 without VNNI: {error}")

    def run(rows: int, switch: str | None) -> tuple[int, list[str]]:
        environment = isa.without_cpuid_hold(child_environment())
        environment.pop("FBGEMM_ENABLE_INSTRUCTIONS", None)  # the suite may run under benchmarks.isa
        environment.update({isa.CPUID_LEVEL_VARIABLE: "avx512",
                            "LD_PRELOAD": " ".join(filter(None, [library, environment.get("LD_PRELOAD")]))})
        if switch:
            environment["FBGEMM_ENABLE_INSTRUCTIONS"] = switch
        completed = subprocess.run([sys.executable, "-c", POINTWISE_CONV, str(rows)], env=environment,
                                   capture_output=True, text=True, timeout=300)
        return completed.returncode, completed.stdout.splitlines()

    code, lines = run(240, "AVX2")
    if lines[:1] != ["avx512 False"]:
        pytest.skip(f"CPUID not held to AVX-512 without VNNI in the child (it answered {lines[:1]}): no CPUID "
                    "faulting here")
    # 240 rows: two blocks of 120 written over 56 ints each; glibc finds its heap broken and aborts
    # (at 100 rows the overrun fell into unused heap and went unnoticed: silent corruption)
    assert code in (-6, -11, 134, 139) and "ran" not in lines, (code, lines)
    # the controls: rows that fit the smaller block (48 <= 56), and the CPU's own instruction set (no switch)
    assert run(48, "AVX2") == (0, ["avx512 False", "ran"])
    assert run(240, None) == (0, ["avx512 False", "ran"])


@pytest.mark.parametrize("level, capability, xnnpack, u8s8_saturates", [
    pytest.param("avx2", "AVX2", "AVX2", True, marks=pytest.mark.skipif(
        _lacks_level("avx2"), reason="AVX2 kernels need an x86-64 CPU with AVX2")),
    # AVX-512 without VNNI or BF16 (Skylake-SP): fbgemm's AVX-512 kernels saturate in int16 pairs as its AVX2 ones do
    pytest.param("avx512", "AVX512", "AVX512", True, marks=pytest.mark.skipif(
        _lacks_level("avx512"), reason="AVX-512 kernels need an x86-64 CPU with AVX-512 F, CD, BW, DQ and VL")),
    # AVX2 with AVX-VNNI (Intel client CPUs from Alder Lake on): XNNPACK and onnxruntime have AVX-VNNI kernels, whose
    # vpdpbusd adds into int32; fbgemm and torch's VNNI probe know only AVX-512 VNNI, so torch runs fbgemm's AVX2
    # kernels there
    pytest.param("avxvnni", "AVX2", "AVX2-VNNI", False, marks=pytest.mark.skipif(
        _lacks_level("avxvnni"), reason="AVX-VNNI kernels need an x86-64 CPU with AVX-VNNI")),
])
def test_benchmarks_isa_runs_every_kernel_library_at_its_level_and_int8_stays_exact(int8_files, level, capability,
                                                                                   xnnpack, u8s8_saturates):
    pytest.importorskip("executorch", reason="the .pte runtime is the optional deploy extra")
    stderr = []
    report = _run_worker([sys.executable, "-m", "benchmarks.isa", level], {},
                         ["--engines", "x86", "--groups", "4", *int8_files], script_prefix=False, stderr=stderr)
    # the wrapper held ATen (and so torch's CPU probes: no VNNI, no AMX) and XNNPACK's feature table to the level ...
    assert report["capability"] == capability and report["xnnpack"] == xnnpack, report
    assert not report["vnni"] and not report["amx"], report
    _check(report)  # the ONNX file and the .pte exact too
    # ... and fbgemm: without ClampCodes its kernels of that level saturate
    assert max(v for k, v in report["engines"].items() if "unclamped" in k) > 0, report
    # ... and onnxruntime, through the CPU's own answers: the file with int8 weights run as written saturates on
    # the levels without VNNI (the control) and is exact with AVX-VNNI, the default file (uint8 weights) run as
    # written is exact, and quant.load_onnx runs both exactly (above): on uint8 weights without VNNI, on int8
    # ones with AVX-VNNI (its CPUID answer; torch's probe knows only AVX-512 VNNI)
    default, signed = (path for path in int8_files if path.endswith(".onnx"))
    if report["cpuid_held"] != level:
        note = re.search(r"onnxruntime not held: (.*)", stderr[0])
        pytest.skip(f"onnxruntime's {level} kernels not checked: {note.group(1) if note else stderr[0][-300:]}")
    assert (report["as_written"][signed] > 0) == u8s8_saturates and report["as_written"][default] == 0.0, report
    assert report["uint8_weights"][signed] == report["uint8_weights"][default] == u8s8_saturates, report


def test_the_cpuid_hold_is_left_to_the_system_and_out_of_emulated_children(monkeypatch, tmp_path):
    from benchmarks import isa

    # this process holds CPUID exactly where it was asked to (the suite may run under benchmarks.isa)
    assert isa.cpuid_held() == os.environ.get(isa.CPUID_LEVEL_VARIABLE)
    # an emulated CPU answers CPUID itself: its children lose the hold's variable and library, nothing else
    preload = f"/lib/other.so /cache/{isa.CPUID_LIBRARY_PREFIX}0123.so"
    monkeypatch.setenv("LD_PRELOAD", preload)
    monkeypatch.setenv(isa.CPUID_LEVEL_VARIABLE, "avx2")
    environment = emulated_cpu_environment()
    assert environment["LD_PRELOAD"] == "/lib/other.so" and isa.CPUID_LEVEL_VARIABLE not in environment
    assert child_environment()["LD_PRELOAD"] == preload  # a child on this CPU keeps it
    assert "LD_PRELOAD" not in isa.without_cpuid_hold({"LD_PRELOAD": f"/x/{isa.CPUID_LIBRARY_PREFIX}1.so"})
    # without a C compiler the hold is refused by name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(isa.ISAError, match=r"no C compiler \(cc, gcc or \$CC\)"):
        isa.build_cpuid_hold()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or "avx2" not in rotconv.hardware.cpu_flags(),
                    reason="AVX2 kernels need an x86-64 CPU with AVX2")
def test_benchmarks_isa_refuses_with_one_line_what_it_cannot_do(tmp_path, capsys):
    from benchmarks import isa

    cases = [([], "usage"),
             (["avx10", "benchmarks.speed"], "unknown instruction set 'avx10' (choices: avx2, avx512, avxvnni)"),
             (["avx2", "no_such_module_here"], "no such module: no_such_module_here"),
             (["avx2", str(tmp_path / "missing.py")], "no such script"),
             # in this process torch is loaded already, so its switches could no longer take effect
             (["avx2", "benchmarks.speed"], "torch is already loaded")]
    before = {name: os.environ.get(name) for name in isa.AVX2_SWITCHES}
    assert set(isa.AVX512_SWITCHES) == set(isa.AVX2_SWITCHES)
    for argv, message in cases:
        assert isa.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {name: os.environ.get(name) for name in isa.AVX2_SWITCHES} == before  # nothing set on refusal


def test_a_level_is_refused_on_a_cpu_without_what_it_has(monkeypatch, capsys):
    from benchmarks import isa

    haswell = {"sse4_1", "sse4_2", "avx", "fma", "f16c", "avx2", "bmi2", "popcnt", "aes"}
    skylake_sp = haswell | {"avx512f", "avx512cd", "avx512dq", "avx512bw", "avx512vl"}
    assert isa.cpu_has_level("avx2", haswell) and not isa.cpu_has_level("avx512", haswell)
    assert isa.cpu_has_level("avx512", skylake_sp)
    assert not isa.cpu_has_level("avx512", skylake_sp - {"avx512bw"})
    assert isa.cpu_has_level("avxvnni", haswell | {"avx_vnni"}) and not isa.cpu_has_level("avxvnni", skylake_sp)
    assert not isa.cpu_has_level("avx2", {"sse4_2", "avx"})
    if os.uname().machine != "x86_64":
        return
    monkeypatch.setattr(isa, "_cpu_flags", lambda: haswell)
    before = {name: os.environ.get(name) for name in isa.AVX512_SWITCHES}
    assert isa.main(["avx512", "benchmarks.speed"]) == 2
    assert "avx512 needs an x86-64 Linux CPU with AVX2 and AVX-512 F, CD, BW, DQ, VL" in capsys.readouterr().err
    assert isa.main(["avxvnni", "benchmarks.speed"]) == 2
    assert "avxvnni needs an x86-64 Linux CPU with AVX2 and AVX-VNNI" in capsys.readouterr().err
    assert {name: os.environ.get(name) for name in isa.AVX512_SWITCHES} == before
    # avx2 on an AVX-512 CPU without VNNI (Skylake-SP) only with CPUID held: fbgemm's AVX2 switch alone writes
    # past its row offsets there (the overrun test). Here the hold is refused (no compiler; this process taken as
    # not held, whatever the suite runs under) and torch is taken as not yet loaded.
    monkeypatch.setattr(isa, "_cpu_flags", lambda: skylake_sp)
    monkeypatch.setattr(isa, "_hold_cpuid", lambda level, argv: "onnxruntime not held: no C compiler")
    monkeypatch.setattr(isa, "cpuid_held", lambda: None)
    monkeypatch.delitem(sys.modules, "torch")
    assert isa.main(["avx2", "benchmarks.speed"]) == 2
    assert ("avx2 on an AVX-512 CPU without VNNI needs CPUID held, and onnxruntime not held: no C compiler"
            in capsys.readouterr().err)
    assert {name: os.environ.get(name) for name in isa.AVX2_SWITCHES} == before


def is_emulated_kind(flags: set[str]) -> bool:
    """Whether a CPU with these feature flags is itself of the kind the emulated Haswell stands for: AVX2, no
    AVX-512, no AVX-VNNI, no AMX. There every test of the suite runs the AVX2 kernels natively (onnxruntime's and
    XNNPACK's too), so the slow emulated run would check nothing they do not."""
    return ("avx2" in flags and not any(flag.startswith(("avx512", "amx")) for flag in flags)
            and "avx_vnni" not in flags)


def test_the_emulated_run_is_left_out_only_on_an_avx2_only_cpu():
    haswell = {"sse4_2", "avx", "fma", "avx2", "bmi2"}
    assert is_emulated_kind(haswell)
    for extra in ("avx512f", "avx512_vnni", "avx_vnni", "amx_tile"):  # AVX-512 servers, Alder Lake, Sapphire Rapids
        assert not is_emulated_kind(haswell | {extra}), extra
    assert not is_emulated_kind({"sse4_2", "avx"})  # no AVX2: the emulated CPU has more than this one


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU emulation")
@pytest.mark.skipif(is_emulated_kind(rotconv.hardware.cpu_flags()),
                    reason="this CPU is AVX2-only (no AVX-512, VNNI or AMX): the suite's INT8 exactness tests run "
                           "its AVX2 kernels natively, emulating one would repeat them")
@pytest.mark.skipif(not QEMU_RUNS_AVX, reason=NO_QEMU_REASON.format("AVX2 CPU"))
def test_int8_is_bit_exact_on_an_emulated_avx2_cpu(int8_files):
    # emulation is slow: the x86 engine on C_12 (on a CPU without VNNI it runs depthwise convs on fbgemm too,
    # which the switches above cannot reach) and the files
    report = _run_worker(["qemu-x86_64", "-cpu", "Haswell"], {}, ["--engines", "x86", "--groups", "12", *int8_files],
                         timeout=1500, emulated=True)
    # the emulated CPU has no AVX-512, VNNI or AMX, as ATen and ExecuTorch's cpuinfo (XNNPACK's kernels) see it
    assert report["capability"] == "AVX2" and report["xnnpack"] == "AVX2", report
    assert not report["vnni"] and not report["amx"], report
    _check(report)
    # onnxruntime's own AVX2 kernels: the default file exact in a plain session, int8 weights not (the control)
    default, signed = (path for path in int8_files if path.endswith(".onnx"))
    assert report["as_written"][default] == 0.0 and report["as_written"][signed] > 0, report


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU emulation")
@pytest.mark.skipif(not QEMU_RUNS_AVX, reason=NO_QEMU_REASON.format("CPU without AVX2"))
def test_int8_is_bit_exact_and_quiet_on_an_emulated_cpu_without_avx2(int8_files):
    # Sandy and Ivy Bridge, AMD Bulldozer to Piledriver and Jaguar have AVX but not AVX2 (qemu's SandyBridge;
    # without AVX at all numpy 2.4 and torch's wheels do not start). torch then offers no x86 or fbgemm int8
    # engine (fbgemm needs AVX2), so the library's default is qnnpack; XNNPACK (.pte) and onnxruntime take
    # their pre-AVX2 kernels. Every one stays exact under quarter turns. torch's NNPACK cannot start there either:
    # without rotconv turning it off, the worker's conversions print "Could not initialize NNPACK!" 25 times.
    stderr = []
    # numpy's OpenBLAS takes qemu's emulated Sandy Bridge for a Haswell and would run AVX2 code on it (np.dot dies
    # of SIGILL there; seen with qemu 7.2 and numpy 2.4): told which core the emulated CPU is
    default, _, pte = int8_files  # the default ONNX file (uint8 weights) and the .pte
    report = _run_worker(["qemu-x86_64", "-cpu", "SandyBridge"], {"OPENBLAS_CORETYPE": "Sandybridge"},
                         ["--engines", "x86,fbgemm,qnnpack", "--groups", "4,12", default, pte], timeout=1500,
                         emulated=True, stderr=stderr)
    assert report["capability"] == "DEFAULT" and not report["avx2"] and report["xnnpack"] == "older", report
    assert not {"x86", "fbgemm"} & set(report["offered"]) and report["default_backend"] == "qnnpack", report
    assert set(report["engines"]) == {"C4-qnnpack", "C12-qnnpack"}, report
    _check(report)
    assert report["as_written"][default] == 0.0, report  # the file exact in a plain session too
    assert "NNPACK" not in stderr[0], stderr[0][-2000:]


@pytest.mark.skipif(arm_ready() is not None, reason=f"no emulated ARM CPU: {arm_ready()}")
@pytest.mark.parametrize("cpu", list(ARM_CPUS))
def test_both_onnx_files_are_exact_in_onnxruntime_on_an_emulated_arm_cpu(int8_files, cpu):
    # ARM CPUs of three generations (NEON only, dot products, int8 matrix multiply with SVE2), each a different
    # int8 kernel family in onnxruntime: the ONNX files opened directly in onnxruntime there (a deployment's own
    # session; no torch on the emulated CPU) give bit-identical logits under quarter turns, the default file
    # (uint8 weights) and the one with int8 weights alike
    from benchmarks.emulated_arm import run

    onnx_files = [path for path in int8_files if path.endswith(".onnx")]
    completed = run(cpu, [os.path.join(os.path.dirname(__file__), "arm_onnx_worker.py"), *onnx_files], timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["machine"] == "aarch64", report
    for path in onnx_files:
        assert report["files"][path]["quarter_turn"] == 0.0 and report["files"][path]["largest_logit"] > 0, report


def test_the_emulated_arm_cpu_says_why_it_cannot_start(monkeypatch, tmp_path, capsys):
    from benchmarks import emulated_arm

    with pytest.raises(emulated_arm.ArmError, match="unknown ARM CPU 'cortex-x9' \\(choices: cortex-a57, "):
        emulated_arm.run("cortex-x9", ["x.py"], root=str(tmp_path))
    if os.uname().machine != "x86_64":
        return
    monkeypatch.setattr(emulated_arm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(emulated_arm.os, "geteuid", lambda: 0)
    assert "no aarch64 root in" in emulated_arm.ready(str(tmp_path))  # not prepared
    (tmp_path / "sysroot" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "sysroot" / "usr" / "bin" / "python3.11").write_text("")
    (tmp_path / "READY").write_text("")
    assert emulated_arm.ready(str(tmp_path)) is None
    monkeypatch.setattr(emulated_arm.os, "geteuid", lambda: 1000)
    assert "needs root" in emulated_arm.ready(str(tmp_path))
    monkeypatch.setattr(emulated_arm.shutil, "which", lambda name: None)
    assert "qemu-aarch64 is not installed" in emulated_arm.ready(str(tmp_path))
    assert emulated_arm.main(["--root", str(tmp_path), "run", "neoverse-n1", "x.py"]) == 2
    assert "benchmarks.emulated_arm: qemu-aarch64 is not installed" in capsys.readouterr().err


def test_a_child_on_an_emulated_cpu_does_not_inherit_the_library_switches(monkeypatch):
    from benchmarks.common import REPOSITORY
    from rotconv.hardware import ISA_SWITCHES

    for name in ISA_SWITCHES.values():
        monkeypatch.setenv(name, "AVX512_CORE")  # as under python -m benchmarks.isa avx512
    environment = emulated_cpu_environment(PYTHONHASHSEED="0", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    assert not any(name in environment for name in ISA_SWITCHES.values() if name != "FBGEMM_ENABLE_INSTRUCTIONS")
    assert environment["FBGEMM_ENABLE_INSTRUCTIONS"] == "AVX2"  # one asked for explicitly stays
    assert environment["PYTHONHASHSEED"] == "0" and environment["PYTHONPATH"].split(os.pathsep)[0] == REPOSITORY
    # other children inherit them
    assert all(child_environment()[name] == "AVX512_CORE" for name in ISA_SWITCHES.values())


@pytest.mark.skipif(not any(shutil.which(name) for name in ("cc", "gcc")), reason="no C compiler to build the hold")
def test_the_cpuid_hold_is_built_once_per_source_into_the_cache(monkeypatch, tmp_path):
    from benchmarks import isa

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # builds of other versions: a week-old one is removed, a recent one kept (another checkout's held process may
    # still start children that preload it)
    stale, recent = (tmp_path / "rotconv" / f"{isa.CPUID_LIBRARY_PREFIX}{digit * 16}.so" for digit in "01")
    stale.parent.mkdir()
    for build in (stale, recent):
        build.write_bytes(b"another version's build")
    week = 7 * 24 * 3600
    os.utime(stale, (time.time() - week - 60, time.time() - week - 60))
    library = isa.build_cpuid_hold()
    assert os.path.dirname(library) == str(tmp_path / "rotconv") and not stale.exists() and recent.exists()
    recent.unlink()
    assert sorted(os.listdir(tmp_path / "rotconv")) == [os.path.basename(library)]  # no partial file left
    with open(library, "rb") as handle:
        assert handle.read(4) == b"\x7fELF"
    built = os.stat(library).st_mtime_ns
    assert isa.build_cpuid_hold() == library and os.stat(library).st_mtime_ns == built  # not built again
