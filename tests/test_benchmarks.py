"""benchmarks.equivariance (angle sweep) and benchmarks.speed on small settings: structure and the exact
properties the sweep must show (not timings)."""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv
from benchmarks import efficiency, equivariance, speed


@pytest.fixture(scope="module")
def sweep():
    return equivariance.sweep(step=45.0, patches=4, data=None, runs=None)


def test_sweep_angles_and_layer_curves(sweep):
    assert sweep["degrees"] == [0, 45, 90, 135, 180, 225, 270, 315, 360]
    quarter = [i for i, d in enumerate(sweep["degrees"]) if d % 90 == 0]
    for name, families in sweep["layers"].items():
        for family, errors in families.items():
            assert len(errors) == len(sweep["degrees"])
            if "reference" in name:
                # random filters are not equivariant: clearly visible even at 90 degrees
                assert min(errors[i] for i in quarter if sweep["degrees"][i] % 360) > 0.05, (name, family)
            else:
                # float64 and exact grid rotations: equivariant to rounding
                assert max(errors[i] for i in quarter) < 1e-10, (name, family)
                # other angles: approximately (band-limited filters, interpolated inputs)
                assert 0 < max(errors) < 0.5, (name, family)


def test_sweep_models_int8_exact_at_quarter_turns(sweep):
    quarter = [i for i, d in enumerate(sweep["degrees"]) if d % 90 == 0]
    models = sweep["models"]
    assert set(models) == {"C12 FP32", "C12 INT8", "conventional FP32", "conventional INT8"}
    assert all(models["C12 INT8"]["logit_error"][i] == 0.0 for i in quarter)
    # float32 through ~50 layers with random BN statistics: rounding measures up to ~6e-6 at quarter turns;
    # 1e-4 keeps a margin and is still >1000x below what a non-equivariant model shows (~0.2)
    assert all(models["C12 FP32"]["logit_error"][i] < 1e-4 for i in quarter)
    assert all(models["C12 FP32"]["stability"][i] == 1.0 for i in quarter)
    assert max(models["conventional FP32"]["logit_error"][i] for i in quarter) > 1e-3
    table = equivariance.format_sweep(sweep)
    assert "RANDOM weights" in table and "90°" in table


def test_sweep_plots_are_written(sweep, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (extra 'plot') not installed: plots are optional")
    written = equivariance.plot(sweep, str(tmp_path))
    assert len(written) == len(next(iter(sweep["layers"].values()))) + 2
    for path in written:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_plot_that_fails_while_writing_leaves_the_old_file_whole(sweep, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib (extra 'plot') not installed: plots are optional")
    from matplotlib.figure import Figure

    from rotconv.files import OutputError

    written = equivariance.plot(sweep, str(tmp_path))
    before = {path: open(path, "rb").read() for path in written}
    original = Figure.savefig

    def fail_half_way(figure, target, **kwargs):  # a disk that fills up in the middle of a file
        original(figure, target, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_half_way)
    with pytest.raises(OutputError, match="disk full"):
        equivariance.plot(sweep, str(tmp_path))
    point = {"mean": 0.7, "std": 0.01}
    results = {"curve": {"256": {"conventional": {"fp32_accuracy": point, "int8_accuracy": point}}},
               "settings": {}, "runs": [{"model": "conventional", "size": 256}], "crossings": {}}
    (tmp_path / "efficiency.png").write_bytes(b"the previous plot")
    with pytest.raises(OutputError, match="efficiency.png"):
        efficiency.plot_curve(results, str(tmp_path))
    assert (tmp_path / "efficiency.png").read_bytes() == b"the previous plot"
    assert {path: open(path, "rb").read() for path in written} == before  # no file half-written
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in written] + ["efficiency.png"])


def test_equivariance_cli_rejects_a_bad_step(capsys):
    with pytest.raises(SystemExit) as exit_info:
        equivariance.main(["--step", "7"])
    assert exit_info.value.code == 2 and "--step" in capsys.readouterr().err


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's parser.error
        return stop.code


OUTPUT_CASES = [  # (command, the function its work starts with, options)
    (equivariance, "sweep", ["--out", "/proc/x.json"]), (equivariance, "sweep", ["--plots", "/proc/plots"]),
    (speed, "layer_benchmarks", ["--out", "/proc/x.json"]),
    (efficiency, "RunLock", ["--plots", "/proc/plots"]), (efficiency, "RunLock", ["--out", "/proc/x.json"]),
    (efficiency, "results_from_files", ["--from-results", "results", "--plots", "/proc/plots"]),
    (efficiency, "results_from_files", ["--from-results", "results", "--out", "/proc/x.json"]),
]


@pytest.mark.parametrize("command, work, argv", OUTPUT_CASES,
                         ids=[f"{c.__name__.split('.')[-1]}-{'-'.join(a)}" for c, _, a in OUTPUT_CASES])
def test_outputs_are_checked_before_any_work(command, work, argv, capsys, monkeypatch, tmp_path):
    def started(*args, **kwargs):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(command, work, started)
    assert _exit_code(command.main, argv) == 2
    err = capsys.readouterr().err
    option, path = argv[-2:]
    assert option in err and path in err and "Traceback" not in err, err
    if option == "--plots":  # and a plot needs matplotlib: said before the work too, not after hours of it
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                            real(name, *a))
        assert _exit_code(command.main, argv[:-1] + [str(tmp_path / "plots")]) == 2
        err = capsys.readouterr().err
        assert "--plots" in err and "plots need matplotlib, which is not installed" in err, err
        assert not os.path.exists(tmp_path / "plots")  # nothing made for a plot that cannot be drawn


def test_compare_interleaves_and_reports_medians():
    calls = []
    result = speed.compare(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert set(result) == {"first_s", "second_s", "ratio", "ratio_quartiles", "repeats", "block"}
    assert result["repeats"] == 4 and result["first_s"] >= 0 and result["ratio"] > 0
    low, high = result["ratio_quartiles"]
    assert low <= result["ratio"] <= high


def test_compare_reports_the_quartiles_of_the_pair_ratios(monkeypatch):
    # a's calls take 1, 2, 3, 4 s and b's 1 s: pair ratios 1, 2, 3, 4, median 2.5, quartiles 1.25 and 3.75
    # (the exclusive method); one pair gives its ratio as both quartiles
    durations = {"a": iter([1, 2, 3, 4, 7]), "b": iter([1] * 5)}
    now = [0.0]

    def call(name):
        def run():
            now[0] += next(durations[name])
        return run

    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])
    result = speed.compare(call("a"), call("b"), repeats=4, warmup=0)
    assert result["ratio"] == 2.5 and result["ratio_quartiles"] == [1.25, 3.75]
    assert speed.ratio_text(result) == "2.500x (1.250-3.750)"
    assert speed.compare(call("a"), call("b"), repeats=1, warmup=0)["ratio_quartiles"] == [7.0, 7.0]
    assert speed.ratio_text({"ratio": 0.5}) == "0.500x"  # results written before the quartiles were kept


def test_compare_in_blocks_takes_the_median_of_consecutive_calls(monkeypatch):
    # Each side of a pair is the median of `block` consecutive calls: a slow first call (another runtime's
    # threads still spinning) is dropped. Clock: the first call of every block of "a" takes 10 s, the others 1 s;
    # "b" always 2 s. Without blocks a's median would be 10 s on half the pairs.
    calls = []
    durations = {"a": iter([10, 1, 1] * 5), "b": iter([2] * 15)}
    now = [0.0]

    def call(name):
        def run():
            calls.append(name)
            now[0] += next(durations[name])
        return run

    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])
    result = speed.compare(call("a"), call("b"), repeats=4, warmup=0, block=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert result["first_s"] == 1 and result["second_s"] == 2 and result["ratio"] == 0.5 and result["block"] == 3
    assert result["ratio_quartiles"] == [0.5, 0.5]


def test_plain_twins_do_the_same_work():
    # the nn.Conv2d each layer is timed against: same filter bank shape, groups and output shape
    for name, layer in speed.layer_cases(rotconv.CyclicGroup(12), quick=True).items():
        twin = speed._plain_twin(layer)
        x = torch.randn(1, layer.in_channels, 47, 47)
        assert twin(x).shape == layer(x).shape, name
        assert twin.weight.shape == layer.expand_filter().shape and twin.groups == layer.groups, name


@pytest.mark.parametrize("group", [None, 4, "D2"])
def test_scales_adam_step_is_what_adam_does(group):
    """benchmarks.scales predicts Adam's first step on every layer's (expanded) filter from the sign of the
    coefficient gradient; an actual torch.optim.Adam step must move each filter by that relative amount."""
    import mobilenet
    from benchmarks import scales

    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=group, width_mult=0.25, dropout=0.0).double()
    inputs, labels = torch.randn(4, 3, 95, 95, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    rows = scales.layer_scales(model, inputs, labels, lr=1e-3)
    assert {row["kind"] for row in rows} == set(scales.KINDS)
    layers = {name: module for name, module, _ in scales._layers(model)}
    before = {name: scales._filter(module).detach().clone() for name, module in layers.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-30)
    model.train()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    for row in rows:
        after = scales._filter(layers[row["layer"]]).detach()
        measured = float((after - before[row["layer"]]).norm() / before[row["layer"]].norm())
        # Adam's first step is lr * g / |g| (bias-corrected), i.e. lr * sign(g) for every nonzero gradient
        assert measured == pytest.approx(row["adam_relative_change"], rel=1e-6), row["layer"]
        assert row["activation_rms"] > 0 and row["gradient_rms"] > 0


def test_scales_command_on_synthetic_data(tmp_path, capsys):
    from benchmarks import scales

    out = tmp_path / "scales.json"
    assert scales.main(["--steps", "1", "--batch-size", "4", "--group", "C4", "--out", str(out),
                        "--synthetic-dir", str(tmp_path / "data"), "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC DATA" in printed and "depthwise 3x3" in printed
    results = __import__("json").loads(out.read_text())
    assert set(results["models"]) == {"conventional", "C4"}
    assert scales.main(["--steps", "0", "--synthetic-dir", str(tmp_path / "data")]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_construction_cost_builds_the_requested_group(group):
    result = speed.construction_cost(fields=2, kernel_size=3, group=group)
    layer = rotconv.GroupConv2d(2, 2, 3, group=group)
    assert result["layer"] == f"GroupConv2d(2, 2, 3, {group[0]}_{group[1:]})"
    assert result["parameter_bytes"] == sum(p.numel() * p.element_size() for p in layer.parameters())
    assert result["buffer_bytes"] == sum(b.numel() * b.element_size() for b in layer.buffers())
    assert result["expanded_filter_bytes"] == layer.out_channels * layer.in_channels * 9 * 4


def test_stock_fx_baseline_quantizes_every_conv():
    # benchmarks.speed times dfq(mode="int8") against stock torch.ao FX quantization of the same network: the
    # baseline must be a real INT8 network (every conv on an int8 kernel), not a partly float one.
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.intrinsic.quantized as nniq
    import mobilenet
    from benchmarks.common import untrained_but_generic
    torch.manual_seed(0)
    network = untrained_but_generic(mobilenet.mobilenet_v2(group="C4", width_mult=0.25),
                                    torch.randn(4, 3, 95, 95)).export().eval()
    x = torch.randn(4, 3, 95, 95)
    stock = speed.stock_fx_int8(network, "C4", quant.default_backend(), x)
    float_convs = sum(isinstance(m, torch.nn.Conv2d) for m in network.modules())
    int8_convs = sum(isinstance(m, (nnq.Conv2d, nniq.ConvReLU2d)) for m in stock.modules())
    assert int8_convs == float_convs > 0
    logits = stock(x)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_stock_executorch_baseline_is_a_runnable_program(tmp_path):
    # benchmarks.speed times the .pte against stock ExecuTorch PT2E of the same network: that baseline must
    # be a real lowered program (written, loaded, logits of the right shape).
    pytest.importorskip("executorch", reason="the deploy extra is not installed")
    import mobilenet
    from benchmarks.common import untrained_but_generic
    torch.manual_seed(0)
    network = untrained_but_generic(mobilenet.mobilenet_v2(group="C4", width_mult=0.25),
                                    torch.randn(4, 3, 95, 95)).export().eval()
    x = torch.randn(2, 3, 95, 95)
    program = speed.stock_executorch(network, "C4", x, str(tmp_path / "stock.pte"))
    assert (tmp_path / "stock.pte").stat().st_size > 0
    logits = program(x)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_plain_training_twin_is_plain_with_the_same_channels():
    # benchmarks.speed times the equivariant model's train step against this twin to tell rotconv's own overhead
    # from the cost of its channel table: it must hold no rotconv layer, train, and run the same convolutions
    model = mobilenet.mobilenet_v2(group=4)
    twin = speed.plain_training_twin(model)
    assert twin.training
    assert not any(isinstance(m, (rotconv.SteerableConv2d, rotconv.GroupBatchNorm2d)) for m in twin.modules())
    rotconv_convs = [m.expand_filter().shape for m in model.modules() if isinstance(m, rotconv.SteerableConv2d)]
    plain_convs = [m.weight.shape for m in twin.modules() if isinstance(m, nn.Conv2d)]
    assert plain_convs == rotconv_convs
    x = torch.randn(2, 3, 95, 95)
    twin(x).square().mean().backward()
    assert all(p.grad is not None for p in twin.parameters())


def test_allocator_benchmarks_run_both_allocators_in_fresh_processes():
    """Structure of benchmarks.speed's allocator section on a tiny batch (timings are not checked): every
    measurement has both sides, the reuse side really ran with reuse applied (glibc) and the table shows it."""
    from mobilenet.training.memory import _glibc

    result = speed.allocator_benchmarks(rounds=1, batch=2, steps=1)
    names = {row["measurement"] for row in result["rows"]}
    assert names == {f"{model}_{what}" for model in ("conventional", "equivariant")
                     for what in ("inference", "train_fp32_contiguous", "train_default")}
    for row in result["rows"]:
        for side in ("system_allocator", "reuse"):
            assert row[side]["wall_s"] > 0 and row[side]["minor_faults"] >= 0 and row[side]["system_s"] >= 0
        assert row["ratio"] == pytest.approx(row["reuse"]["wall_s"] / row["system_allocator"]["wall_s"])
    assert result["applied"] == (_glibc() is not None)
    assert set(result["default_with_reuse_vs_fp32_contiguous"]) == {"conventional", "equivariant"}
    table = speed.format_tables(
        {
            "machine": "m",
            "threads": 1,
            "torch": "t",
            "group": "C12",
            "layers": [],
            "construction": dict.fromkeys(
                ("cold_s", "warm_s", "parameter_bytes", "buffer_bytes", "expanded_filter_bytes", "filter_expansion_s"),
                0,
            )
            | {"layer": "l"},
            "models": {"size": {"int8_bytes": 1, "fp32_bytes": 1}}
            | {
                key: {"first_s": 1.0, "second_s": 1.0, "ratio": 1.0}
                for key in ["train_step_b32", "inference_b32", "exported_inference_b32"]
                + [f"int8_{scheme}_vs_fp32_b{batch}" for scheme in ("symmetric", "asymmetric") for batch in (1, 32)]
            },
            "backend": "x86",
            "allocator": result,
            "training": [
                {
                    "precision": "fp32",
                    "channels_last": False,
                    "equivariant_patches_per_s": 30.0,
                    "conventional_patches_per_s": 32.0,
                    "ratio": 1.05,
                    "plain_twin_ratio": 0.9,
                },
                {
                    "precision": "bf16",
                    "channels_last": True,
                    "equivariant_patches_per_s": 60.0,
                    "conventional_patches_per_s": 48.0,
                    "ratio": 0.8,
                    "plain_twin_ratio": 0.95,
                },
            ],
        }
    )
    assert "freed-memory reuse" in table and "C_12 inference (fp32)" in table
    assert table.count("page faults") == 2 * len(result["rows"])
    # the training table: the plain-twin column and the speed-up against the first (fp32 contiguous) row
    assert "| bf16, channels_last | 48.0 | 60.0 | 0.800x | 0.950x | 1.50x / 2.00x |" in table


def test_memory_layouts_time_both_layouts_of_both_models():
    # one row per model and task (bf16 training only where the CPU has bf16 kernels), each a finite positive
    # channels_last / contiguous ratio of two real timings
    from mobilenet.training import bf16_supported
    rows = speed.memory_layouts(1, batch=2, group="C4")
    tasks = ["train fp32"] + (["train bf16"] if bf16_supported("cpu") else []) + ["inference fp32"]
    assert [(row["model"], row["task"]) for row in rows] == [(m, t) for m in ("conventional", "C_4") for t in tasks]
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["timing"]["first_s"] > 0 and row["timing"]["second_s"] > 0


def test_precisions_time_bf16_against_fp32_wherever_onednn_runs_bf16_and_say_whether_natively():
    import rotconv.hardware as hardware

    rows = speed.precisions(1, batch=2, group="C4")
    if not hardware.onednn_has_bf16():  # no bf16 kernels at all (AVX2-only x86): nothing to compare
        assert rows == []
        return
    assert [row["model"] for row in rows] == ["conventional", "C_4"]
    for row in rows:
        assert row["native"] == hardware.has_native_bf16()
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["timing"]["first_s"] > 0 and row["timing"]["second_s"] > 0


@pytest.mark.parametrize("native, says", [(True, "bf16 (native) / fp32 time"),
                                          (False, "emulated by oneDNN: --precision auto trains in fp32 here")])
def test_the_precision_table_says_whether_bf16_is_native(native, says):
    timing = {"first_s": 0.5, "second_s": 0.4, "ratio": 1.25}
    rows = [{"model": name, "batch": 32, "native": native, "ratio": 1.25, "timing": timing}
            for name in ("conventional", "C_12")]
    table = speed.format_tables({
        "machine": "m", "threads": 1, "torch": "t", "group": "C12", "layers": [], "backend": "x86",
        "construction": dict.fromkeys(("cold_s", "warm_s", "parameter_bytes", "buffer_bytes",
                                       "expanded_filter_bytes", "filter_expansion_s"), 0) | {"layer": "l"},
        "models": {"size": {"int8_bytes": 1, "fp32_bytes": 1}} | {
            key: {"first_s": 1.0, "second_s": 1.0, "ratio": 1.0}
            for key in ["train_step_b32", "inference_b32", "exported_inference_b32"]
            + [f"int8_{scheme}_vs_fp32_b{batch}" for scheme in ("symmetric", "asymmetric") for batch in (1, 32)]},
        "precisions": rows})
    assert says in table
    assert "| C_12 | 1.250x (500.0 vs 400.0 ms) |" in table
