"""INT8 quarter-turn exactness on CPUs other than the one running the suite.

The int8 kernels take different paths by instruction set: without VNNI (AVX2, AVX-512 F/BW) fbgemm and
onnxruntime multiply uint8 by int8 with ``vpmaddubsw``, whose int16 pair sums saturate. Two ways to check
those paths on any x86 machine, each in a subprocess (tests/isa_worker.py):

* the libraries' own switches, ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
  ``ATEN_CPU_CAPABILITY=avx2`` (torch's kernels only; onnxruntime and XNNPACK read the CPU themselves);
* the whole process on an emulated AVX2 CPU (``qemu-x86_64 -cpu Haswell``, user-mode emulation), where every
  library, onnxruntime and ExecuTorch's XNNPACK included, sees a CPU without AVX-512. Skipped, with the
  reason printed, where qemu-user is not installed (``.ci/run`` installs it where apt-get can).
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings

import pytest

import quant

WORKER = os.path.join(os.path.dirname(__file__), "isa_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2_SWITCHES = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _run_worker(prefix: list[str], env: dict, arguments: list[str] = (), timeout: int = 900) -> dict:
    # the repository on the path, installed or not (the worker imports the packages under test from here)
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(prefix + [sys.executable, WORKER, *arguments],
                               env={**os.environ, "PYTHONPATH": path, **env}, capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _check(report: dict) -> None:
    exact = {name: difference for name, difference in report["engines"].items() if "unclamped" not in name}
    assert exact and all(difference == 0.0 for difference in exact.values()), report
    assert all(difference == 0.0 for difference in report["files"].values()), report


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set switches")
def test_int8_is_bit_exact_under_the_libraries_avx2_switches():
    report = _run_worker([], AVX2_SWITCHES)
    assert report["capability"] == "AVX2", report  # the switches took effect
    _check(report)
    # the control: without ClampCodes the AVX2 kernels saturate and a quarter turn moves the logits, so the
    # switches reached fbgemm's AVX2 path and this test can fail
    assert max(v for k, v in report["engines"].items() if "unclamped" in k) > 0, report


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU emulation")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-user is not installed (apt-get install qemu-user): no emulated AVX2 CPU")
def test_int8_is_bit_exact_on_an_emulated_avx2_cpu(tmp_path):
    import test_onnx

    model = test_onnx._random_model("C4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = [quant.to_onnx(model, str(tmp_path / "int8.onnx"), group="C4"),
                 quant.to_executorch(model, str(tmp_path / "int8.pte"), group="C4")]
    # emulation is slow: the x86 engine on C_12 (on a CPU without VNNI it runs depthwise convs on fbgemm too,
    # which the switches above cannot reach) and the two files
    report = _run_worker(["qemu-x86_64", "-cpu", "Haswell"], {}, ["--engines", "x86", "--groups", "12", *files],
                         timeout=1500)
    assert report["capability"] == "AVX2", report  # the emulated CPU has no AVX-512
    _check(report)
