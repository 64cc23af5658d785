"""benchmarks.efficiency: the nested balanced sampler (property test) and --quick end to end with resume."""
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mobilenet
import quant
from benchmarks import efficiency
from benchmarks.synthetic import write_synthetic_pcam

# the plots need matplotlib (the optional plot extra); without it these tests check everything else
PLOTS = importlib.util.find_spec("matplotlib") is not None


def plot_options(directory) -> list[str]:
    return ["--plots", str(directory)] if PLOTS else []


def assert_plotted(directory) -> None:
    if PLOTS:
        assert os.path.getsize(directory / "efficiency.png") > 1000
    else:  # said in the summary, as a skip would be
        warnings.warn("matplotlib (extra 'plot') not installed: efficiency.png not checked", stacklevel=2)


@settings(max_examples=40)
@given(zeros=st.integers(0, 40), ones=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_order_is_nested_and_balanced(zeros, ones, seed):
    labels = np.array([0] * zeros + [1] * ones)
    order = efficiency.nested_balanced_order(labels, seed)
    assert sorted(order.tolist()) == list(range(labels.size))  # a permutation: every prefix is a subset
    for size in range(1, labels.size + 1):
        prefix = labels[order[:size]]
        # as balanced as the data allow: the classes differ by at most one while both last
        expected_minority = min(size // 2, zeros, ones)
        assert min((prefix == 0).sum(), (prefix == 1).sum()) >= expected_minority
    assert np.array_equal(order, efficiency.nested_balanced_order(labels, seed))  # seeded


def test_quick_end_to_end_with_plot_and_resume(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 32, "valid": 16, "test": 16}, seed=4)
    out, plots, runs = tmp_path / "curve.json", tmp_path / "plots", tmp_path / "runs"
    kept = tmp_path / "results"
    arguments = ["--quick", "--data", data, "--runs", str(runs), "--out", str(out), "--threads", "1",
                 "--int8-backend", "torch-ao"]  # the ExecuTorch export is tested once, below (~10 s a model)
    assert efficiency.main(arguments + plot_options(plots) + ["--results", str(kept)]) == 0
    results = json.loads(out.read_text())
    # every finished run left its small result file; the table built from those files alone is the same
    assert sorted(os.listdir(kept)) == sorted(f"{r['run']}.json" for r in results["runs"])
    assert all(os.path.getsize(kept / name) < 20_000 for name in os.listdir(kept))
    recipe = json.loads((kept / os.listdir(kept)[0]).read_text())["recipe"]
    assert recipe["data"] == "data" and recipe["precision"] in ("bf16", "fp32")  # as trained, never "auto"
    rebuilt = tmp_path / "rebuilt.json"
    assert efficiency.main(["--from-results", str(kept), "--out", str(rebuilt)] + plot_options(tmp_path / "p2")) == 0
    again = json.loads(rebuilt.read_text())
    # the same figures; each series is named by its model and recipe variant (here the default stain jitter)
    assert {size: {series.split("-")[0]: stats for series, stats in models.items()}
            for size, models in again["curve"].items()} == results["curve"]
    assert "MobileNetV2, C_4-equivariant (stain0.1)" in again["table"]
    assert_plotted(tmp_path / "p2")
    assert efficiency.main(["--from-results", str(tmp_path / "nothing-here")]) == 2
    assert set(results["curve"]) == {"16", "32"}
    for size, models in results["curve"].items():
        assert set(models) == {"conventional", "C4"}
        for stats in models.values():
            assert 0.0 <= stats["fp32_accuracy"]["mean"] <= 1.0 and 0.0 <= stats["int8_accuracy"]["mean"] <= 1.0
    steps = {run["steps"] for run in results["runs"]}
    assert min(steps) >= 4 and len(steps) == 1  # the same step budget at every size
    assert_plotted(plots)
    assert "| 16 |" in results["table"] and "| 32 |" in results["table"]
    # a resumed run reuses every finished result (nothing retrains) and reports the same numbers
    before = {(r["size"], r["model"]): r["fp32_accuracy"] for r in results["runs"]}
    os.remove(
        runs / "size32-C4-lr0.003-stain0.1-seed0" / "result.json"
    )  # as if killed after training, before the result
    capsys.readouterr()
    assert efficiency.main(arguments + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("== size") == 1  # only the run without a result ran again (from its checkpoint)
    again = json.loads(out.read_text())
    assert {(r["size"], r["model"]): r["fp32_accuracy"] for r in again["runs"]} == before


def test_resume_with_another_int8_backend_evaluates_again_without_training(tmp_path, capsys):
    pytest.importorskip("executorch", reason="the .pte export is the optional deploy extra")
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 16, "valid": 8, "test": 8}, seed=8)
    out, runs = tmp_path / "curve.json", tmp_path / "runs"
    arguments = ["--quick", "--data", data, "--runs", str(runs), "--out", str(out), "--threads", "1", "--sizes", "16",
                 "--models", "conventional"]
    assert efficiency.main(arguments + ["--int8-backend", "torch-ao"]) == 0
    first = json.loads(out.read_text())
    assert first["runs"][0]["int8_backend"] == "torch-ao"
    assert f"{quant.default_backend()} int8 kernels" in first["table"]
    capsys.readouterr()
    assert efficiency.main(arguments + ["--int8-backend", "executorch", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "INT8 on executorch, relu6 keep (was torch-ao, keep), no retraining" in printed
    assert "INT8: data-free quantization, lowering to ExecuTorch XNNPACK ..." in printed  # the export is announced
    second = json.loads(out.read_text())
    (before,), (after,) = first["runs"], second["runs"]
    assert after["int8_backend"] == "executorch" and "ExecuTorch XNNPACK" in second["table"]
    assert after["history"] == before["history"] and after["fp32_accuracy"] == before["fp32_accuracy"]
    assert os.path.getsize(runs / "size16-conventional-lr0.003-stain0.1-seed0" / "model.pte") > 0
    capsys.readouterr()
    assert efficiency.main(arguments + ["--int8-backend", "executorch", "--resume"]) == 0
    assert "== size" not in capsys.readouterr().out  # now up to date: nothing runs
    # another DFQ variant (ReLU6 replaced and equalized across) is another INT8 model: evaluated again
    assert efficiency.main(arguments + ["--int8-backend", "executorch", "--relu6", "replace", "--resume"]) == 0
    assert "relu6 replace (was executorch, keep), no retraining" in capsys.readouterr().out
    third = json.loads(out.read_text())
    assert third["runs"][0]["relu6"] == "replace" and third["runs"][0]["history"] == before["history"]


def test_bad_sizes_exit_2(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 8, "valid": 4, "test": 4}, seed=5)
    assert efficiency.main(["--quick", "--data", data, "--sizes", "64", "--runs", str(tmp_path / "r")]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_valid_only_never_opens_the_test_split(tmp_path):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 32, "valid": 16, "test": 16}, seed=6)
    os.remove(os.path.join(data, "camelyonpatch_level_2_split_test_x.h5"))  # a test split that cannot be read
    out = tmp_path / "study.json"
    arguments = ["--quick", "--data", data, "--runs", str(tmp_path / "runs"), "--out", str(out), "--threads", "1",
                 "--valid-only", "--lr", "conventional=3e-3", "C4=1e-2"]
    assert efficiency.main(arguments) == 0
    results = json.loads(out.read_text())
    for run in results["runs"]:
        assert "fp32_accuracy" not in run and 0.0 <= run["valid_accuracy"] <= 1.0 and run["valid_loss"] > 0
        best = next(entry for entry in run["history"] if entry["epoch"] == run["best_epoch"])
        assert run["valid_loss"] == min(entry["valid_loss"] for entry in run["history"]) == best["valid_loss"]
        assert run["lr"] == {"conventional": 3e-3, "C4": 1e-2}[run["model"]]
    assert "VALIDATION split only" in results["table"]
    # the same runs are kept per learning rate, so a study of several rates shares one --runs directory
    assert sorted(os.listdir(tmp_path / "runs"))[:2] == [
        "size16-C4-lr0.01-stain0.1-seed0",
        "size16-conventional-lr0.003-stain0.1-seed0",
    ]


@pytest.mark.parametrize("variant, suffix, attribute, value", [
    (["--group-pool", "sort"], "-sort", "group_pool", "sort"), (["--min-fields", "2"], "-min2", "min_fields", 2),
    (["--width-mult", "0.5"], "-w0.5", "width_mult", 0.5),
    (["--depthwise", "field"], "-dwfield", "depthwise", "field"), (["--antialias"], "-aa", "antialias", True)])
def test_architecture_variant_keeps_its_own_runs(tmp_path, variant, suffix, attribute, value):
    # a recipe variant must not resume (or overwrite) the runs of the default architecture
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 16, "valid": 8, "test": 8}, seed=7)
    arguments = ["--quick", "--data", data, "--runs", str(tmp_path / "runs"), "--threads", "1", "--valid-only",
                 "--sizes", "16", "--models", "equivariant", *variant]
    assert efficiency.main(arguments) == 0
    run = f"size16-C4-lr0.003-stain0.1{suffix}-seed0"
    assert sorted(os.listdir(tmp_path / "runs")) == ["efficiency.json", run]
    model = mobilenet.load(str(tmp_path / "runs" / run / "model.pt"))
    assert getattr(model, attribute) == value


def test_learning_rates_per_model_are_checked(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 8, "valid": 4, "test": 4}, seed=5)
    base = ["--quick", "--data", data, "--runs", str(tmp_path / "r")]
    for bad, says in ((["C12=1e-2", "conventional=1e-3"], "'C12' is not a model of this run"),
                      (["C4=1e-2"], "no learning rate for conventional"),
                      (["fast"], "expected a number or MODEL=NUMBER"), (["nan"], "finite positive"),
                      (["1e-3", "C4=1e-2"], "MODEL=NUMBER for every model")):
        assert efficiency.main(base + ["--lr", *bad]) == 2
        error = capsys.readouterr().err
        assert "--lr" in error and says in error, (bad, error)


@pytest.mark.parametrize("option, value, suffix", [("--warmup-steps", "3", "-warm3"),
                                                   ("--label-smoothing", "0.1", "-ls0.1"),
                                                   ("--patience", "1", "-pat1")])
def test_recipe_variants_keep_their_own_runs_and_bad_values_exit_2(tmp_path, capsys, option, value, suffix):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 16, "valid": 8, "test": 8}, seed=7)
    base = ["--quick", "--data", data, "--runs", str(tmp_path / "runs"), "--threads", "1", "--valid-only",
            "--sizes", "16", "--models", "conventional"]
    assert efficiency.main(base + [option, value]) == 0
    run = f"size16-conventional-lr0.003-stain0.1{suffix}-seed0"
    assert sorted(os.listdir(tmp_path / "runs")) == ["efficiency.json", run]
    capsys.readouterr()
    for bad in {"--label-smoothing": ("-1", "1.5"), "--patience": ("0", "-1")}.get(option, ("-1",)):
        assert efficiency.main(base + [option, bad]) == 2
        assert option in capsys.readouterr().err


@settings(max_examples=80)
@given(data=st.data(), count=st.integers(1, 8))
def test_gap_crossings_are_the_sign_changes_with_a_log_linear_zero_between(data, count):
    sizes = sorted(data.draw(st.sets(st.integers(2, 10**6), min_size=count, max_size=count)))
    gaps = data.draw(st.lists(st.sampled_from([0.0]) | st.floats(-0.2, 0.2), min_size=count, max_size=count))
    found = efficiency.gap_crossings(sizes, gaps)
    expected = sum(gap == 0 for gap in gaps) + sum(a * b < 0 for a, b in zip(gaps, gaps[1:]))
    assert len(found) == expected
    for crossing in found:
        a, b = crossing["between"]
        i, j = sizes.index(a), sizes.index(b)
        assert a <= crossing["size"] <= b
        if a == b:
            assert gaps[i] == 0
        else:  # neighbours with opposite signs; the interpolated gap vanishes at the crossing
            assert j == i + 1 and gaps[i] * gaps[j] < 0
            t = np.log(crossing["size"] / a) / np.log(b / a)
            assert abs(gaps[i] + t * (gaps[j] - gaps[i])) <= 1e-9


def _result_file(directory, series, size, seed, fp32):
    run = {"series": series, "model": series.split("-")[0], "size": size, "seed": seed, "steps": 100,
           "fp32_accuracy": fp32, "int8_accuracy": fp32, "degenerate": {"fp32": None, "int8": None},
           "recipe": {"data": "pcam-20k", "lr": 0.003, "batch_size": 32}}
    (directory / f"size{size}-{series}-seed{seed}.json").write_text(json.dumps(run))


def test_table_and_plot_from_results_name_the_crossing_and_the_seeds_per_size(tmp_path):
    # C12 below the conventional model at 256 and 1,024, above at 3,000: one crossing, between 1,024 and 3,000,
    # at sqrt(1024 * 3000) ~ 1,753 for gaps -1 and +1 point (the middle on a log axis); seeds counted per row.
    kept = tmp_path / "results"
    kept.mkdir()
    for size, conventional, c12 in ((256, 0.70, 0.68), (1024, 0.75, 0.74), (3000, 0.78, 0.79)):
        _result_file(kept, "conventional-stain0.1", size, 0, conventional)
        _result_file(kept, "C12-stain0.1", size, 0, c12)
    for seed in (1, 2):
        _result_file(kept, "conventional-stain0.1", 3000, seed, 0.78)
        _result_file(kept, "C12-stain0.1", 3000, seed, 0.79)
    out = tmp_path / "curve.json"
    assert efficiency.main(["--from-results", str(kept), "--out", str(out)] + plot_options(tmp_path / "p")) == 0
    results = json.loads(out.read_text())
    (crossing,) = results["crossings"]["C12-stain0.1"]["crossings"]
    assert crossing["between"] == [1024, 3000] and crossing["size"] == pytest.approx((1024 * 3000) ** 0.5)
    assert "crosses the conventional model between 1,024 and 3,000 (about 1,753" in results["table"]
    assert "| 256 | 12 | 1 |" in results["table"] and "| 3,000 | 1.1 | 3 |" in results["table"]  # 100 steps x 32
    assert_plotted(tmp_path / "p")
    for name in os.listdir(kept):  # C12 ahead everywhere: no crossing, said so
        if name.startswith("size256-C12") or name.startswith("size1024-C12"):
            run = json.loads((kept / name).read_text())
            run["fp32_accuracy"] = 0.9
            (kept / name).write_text(json.dumps(run))
    assert efficiency.main(["--from-results", str(kept), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["crossings"]["C12-stain0.1"]["crossings"] == []
    assert "above the conventional model at every size from 256 to 3,000: the lines do not cross" in results["table"]


def test_random_angle_figures_are_summarized_where_every_seed_has_them(tmp_path):
    kept = tmp_path / "results"
    kept.mkdir()
    rng = np.random.default_rng(4)
    drops, agreement = {}, {}
    for series in ("conventional-stain0.1", "C12-stain0.1"):
        for seed in (0, 1, 2):
            _result_file(kept, series, 3000, seed, 0.8)
            path = kept / f"size3000-{series}-seed{seed}.json"
            run = json.loads(path.read_text())
            upright, rotated, consistent, across = (float(v) for v in rng.integers(600, 900, 4) / 1000)
            run["random_rotation"] = {"seed": 0, "patches": 1000, "angles": 4, "fp32": {
                "upright": upright, "rotated": rotated, "drop": upright - rotated, "consistent": consistent,
                "consistent_across_angles": across}}
            if series.startswith("C12"):  # INT8 figures for one series only
                run["random_rotation"]["int8"] = dict(run["random_rotation"]["fp32"])
            drops.setdefault(series, []).append(upright - rotated)
            agreement.setdefault(series, []).append((consistent, across))
            path.write_text(json.dumps(run))
    out = tmp_path / "curve.json"
    assert efficiency.main(["--from-results", str(kept), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for series, values in drops.items():
        summary = results["curve"]["3000"][series]["random_rotation"]
        assert summary["fp32"]["drop"]["mean"] == pytest.approx(np.mean(values))
        assert summary["fp32"]["drop"]["std"] == pytest.approx(np.std(values, ddof=1))
        with_upright, among_angles = np.mean(agreement[series], axis=0)
        assert summary["fp32"]["consistent"]["mean"] == pytest.approx(with_upright)
        assert summary["fp32"]["consistent_across_angles"]["mean"] == pytest.approx(among_angles)
        assert summary["angles"] == 4
        assert ("int8" in summary) == series.startswith("C12")
        row = next(line for line in results["table"].splitlines()
                   if line.startswith("| 3,000 | " + efficiency.series_label(series)))
        assert f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}" in row
        assert f"{100 * with_upright:.2f} ± " in row and f" / {100 * among_angles:.2f} ± " in row
        assert row.endswith("| — | — | — |") != series.startswith("C12")
    # one seed measured with other angles, or with fewer angles per patch: no mean over unlike figures
    for series, change in (("C12-stain0.1", {"seed": 1}), ("conventional-stain0.1", {"angles": 1})):
        path = kept / f"size3000-{series}-seed2.json"
        run = json.loads(path.read_text())
        run["random_rotation"].update(change)
        path.write_text(json.dumps(run))
        assert efficiency.main(["--from-results", str(kept), "--out", str(out)]) == 0
        results = json.loads(out.read_text())
        assert "random_rotation" not in results["curve"]["3000"][series]
    for seed in (0, 1):  # files from before the choice count as one angle: with seed 2's they form a cell again
        path = kept / f"size3000-conventional-stain0.1-seed{seed}.json"
        run = json.loads(path.read_text())
        del run["random_rotation"]["angles"]
        path.write_text(json.dumps(run))
    assert efficiency.main(["--from-results", str(kept), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["curve"]["3000"]["conventional-stain0.1"]["random_rotation"]["angles"] == 1


def test_results_that_would_mix_budgets_or_repeat_a_run_are_refused_by_name(tmp_path, capsys):
    # A mean over seeds must be over one recipe: the same run twice (another folder) or two step budgets at one
    # size exit 2 and say what to do, rather than averaging silently.
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    _result_file(first, "C12-stain0.1", 3000, 0, 0.8)
    _result_file(second, "C12-stain0.1", 3000, 0, 0.8)
    assert efficiency.main(["--from-results", str(first), str(second)]) == 2
    assert "twice" in capsys.readouterr().err
    run = json.loads((second / "size3000-C12-stain0.1-seed0.json").read_text())
    (second / "size3000-C12-stain0.1-seed0.json").unlink()
    run.update(seed=1, steps=200)
    (second / "size3000-C12-stain0.1-seed1.json").write_text(json.dumps(run))
    assert efficiency.main(["--from-results", str(first), str(second)]) == 2
    error = capsys.readouterr().err
    assert "--from-results" in error and "mixes step budgets [100, 200]" in error
    run.update(steps=100)
    (second / "size3000-C12-stain0.1-seed1.json").write_text(json.dumps(run))
    assert efficiency.main(["--from-results", str(first), str(second), "--out", str(tmp_path / "c.json")]) == 0


def test_min_passes_grows_the_budget_with_the_size(tmp_path, capsys):
    # --quick: 4 steps, 2 evaluations, batch 8. With 3 passes at least: 16 patches -> max(4, 3 * 16 / 8) = 6
    # steps, 32 -> 12; each run's result records its own budget, the run dirs say -pass3, bad values exit 2.
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 32, "valid": 8, "test": 8}, seed=8)
    base = ["--quick", "--data", data, "--runs", str(tmp_path / "runs"), "--threads", "1", "--valid-only",
            "--models", "conventional", "--out", str(tmp_path / "curve.json")]
    assert efficiency.main(base + ["--min-passes", "3"]) == 0
    results = json.loads((tmp_path / "curve.json").read_text())
    assert {run["size"]: run["steps"] for run in results["runs"]} == {16: 6, 32: 12}
    assert all(run["run"].endswith("-pass3-seed0") for run in results["runs"])
    assert "max(4, 3 passes over the set)" in results["table"] and "| 16 | 3.0 |" in results["table"]
    assert efficiency.run_steps({"steps": 100, "batch_size": 32, "min_passes": 2}, 1000) == 100  # never fewer
    capsys.readouterr()
    for bad in ("0", "-1", "nan"):
        assert efficiency.main(base + ["--min-passes", bad]) == 2
        assert "--min-passes" in capsys.readouterr().err
