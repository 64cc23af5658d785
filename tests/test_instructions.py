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
    assert instructions.collected_events(log)["Ir"] == 364035544
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.collected_events("==12== valgrind: failed to start tool 'callgrind'\n")


def test_cache_model_counts_are_read_by_event_name():
    # callgrind's exit report with --cache-sim=yes (a real one's numbers): the events named in order
    log = ("==7== Events    : Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\n"
           "==7== Collected : 218306204 53228510 11652745 4907 4134251 188540 3519 187631 95090\n"
           "==7== \n==7== I refs:      218,306,204\n")
    events = instructions.collected_events(log)
    assert events["Ir"] == 218306204 and events["D1mw"] == 188540 and events["DLmr"] == 187631
    with pytest.raises(RuntimeError, match="no instruction count"):  # names and counts that do not pair up
        instructions.collected_events("==7== Events    : Ir Dr\n==7== Collected : 5\n")


def test_cache_options_model_two_levels_valgrind_accepts():
    assert instructions.cache_options(512) == ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64",
                                               "--LL=524288,8,64"]
    for size in (0, 32, 500, 1280):
        with pytest.raises(ValueError, match="--cache-kib: expected a power of two"):
            instructions.cache_options(size)


def test_table_gives_misses_beside_instructions():
    side = {"instructions_per_call": 2e6, "first_level_data_misses_per_call": 1500.0,
            "second_level_data_misses_per_call": 300.0}
    row = {"pte": side, "stock": dict(side, second_level_data_misses_per_call=200.0), "ratio": 1.0,
           "second_level_ratio": 1.5}
    table = instructions._table({"1": row}, 512)
    assert "| 1 | 2.0 M | 2.0 M | 1.000x |" in table
    assert "512 KiB second level" in table and "| 1 | 1.5 K / 0.3 K | 1.5 K / 0.2 K | 1.500x |" in table
    assert "misses" not in instructions._table({"1": row}, None)


@pytest.mark.parametrize("arguments, message", [
    (["--calls", "0"], "--calls: expected >= 1"),
    (["--batches", "1", "0"], "--batches: expected sizes >= 1"),
    (["--group", "C5x"], "--group: "),
    (["--cache-kib", "500"], "--cache-kib: expected a power of two"),
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
