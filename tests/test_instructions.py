"""benchmarks.instructions: instruction counts of the INT8 programs on valgrind's AVX2 CPU."""
import os
import platform
import shutil

import pytest
import torch

import mobilenet
import quant
from benchmarks import instructions
from benchmarks.common import untrained_but_generic


def test_the_count_is_read_from_callgrinds_report_and_its_absence_said():
    log = ("==12== Callgrind, a call-graph generating cache profiler\n==12== Events    : Ir\n"
           "==12== Collected : 364035544\n==12== \n==12== I   refs:      364,035,544\n")
    assert instructions.collected_instructions(log) == 364035544
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.collected_instructions("==12== valgrind: failed to start tool 'callgrind'\n")


@pytest.mark.parametrize("arguments, message", [
    (["--calls", "0"], "--calls: expected >= 1"),
    (["--batches", "1", "0"], "--batches: expected sizes >= 1"),
    (["--group", "C5x"], "--group: "),
])
def test_bad_arguments_are_refused_naming_them(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        instructions.main(arguments)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_without_valgrind_it_says_so_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(SystemExit) as raised:
        instructions.main([])
    assert raised.value.code == 2 and "valgrind is not installed" in capsys.readouterr().err


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="valgrind's AVX2 CPU is x86-64")
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_a_program_runs_on_valgrinds_avx2_cpu_as_on_an_avx2_only_one(tmp_path, monkeypatch):
    # the counts are of AVX2 kernels only if the counted process sees an AVX2-only CPU, whatever this one has
    # (the count itself, ~3 minutes even for a small network, is left to the benchmark, which refuses a zero)
    pytest.importorskip("executorch", reason="the .pte runtime is the optional deploy extra")
    torch.manual_seed(0)
    model = untrained_but_generic(mobilenet.mobilenet_v2(group="C4", width_mult=0.25),
                                  torch.randn(4, 3, 95, 95)).export().eval()
    x = torch.randn(1, 3, 95, 95)
    torch.save(x, str(tmp_path / "x.pt"))
    program = quant.to_executorch(model, str(tmp_path / "int8.pte"), group="C4")
    monkeypatch.chdir(tmp_path)  # paths relative to the caller's directory
    seen = instructions.seen_on_valgrind(os.path.basename(program), "x.pt")
    # torch's dispatch and the feature table XNNPACK picks its kernels from
    assert seen["capability"] == "AVX2" and seen["xnnpack"] == "AVX2", seen
    assert abs(seen["output_sum"]) < float("inf")
