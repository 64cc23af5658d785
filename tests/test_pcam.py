"""benchmarks.pcam end to end on tiny generated HDF5 files: report fields, bad files, resume, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import pcam, predict
from mobilenet.data import Normalizer, PCam, PCamError, augment_batch, balanced_subset, open_pcam, split_paths
from benchmarks.synthetic import write_synthetic_pcam
from mobilenet.training import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 32, "valid": 16, "test": 16}
# The smallest networks that still exercise every code path: width 0.25, C_4. INT8 on torch.ao in process:
# the default (auto) writes an ExecuTorch program where rotconv[deploy] is installed, ~15 s per model; those
# backends have their own end-to-end test (tests/test_onnx.py), and auto's choice is tested below.
TINY = ["--width-mult", "0.25", "--group", "C4", "--batch-size", "16", "--stability-samples", "4",
        "--threads", "1", "--int8-backend", "torch-ao"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_pcam(str(tmp_path_factory.mktemp("pcam")), SIZES, seed=1)


def run_cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.pcam", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kwargs)


def test_end_to_end_report_has_every_field(tiny_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = pcam.main(["--data", tiny_data, "--epochs", "2", "--runs", str(tmp_path / "runs"), "--out", str(out),
                      "--simulated-int8", "--train-size", "100000", *TINY])
    assert code == 0
    # a size beyond the split is said, not silently clamped
    assert "--train-size 100,000: the train split has 32 patches; all are used" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["synthetic"] is False  # --data was given (these happen to be generated files)
    assert results["data_sizes"] == SIZES
    assert {run["model"] for run in results["runs"]} == {"conventional", "C4"}
    for run in results["runs"]:
        for key in ("fp32_accuracy", "int8_accuracy", "int8_simulated_accuracy"):
            assert 0.0 <= run[key] <= 1.0
            assert run[key] * SIZES["test"] == pytest.approx(round(run[key] * SIZES["test"]))  # a fraction of 16
        assert run["relative_drop"] == pytest.approx((run["fp32_accuracy"] - run["int8_accuracy"])
                                                     / run["fp32_accuracy"])
        # the share of patches where INT8 and FP32 answer alike bounds how far their accuracies can differ
        assert 0.0 <= run["int8_agreement"] <= 1.0
        assert run["int8_agreement"] * SIZES["test"] == pytest.approx(round(run["int8_agreement"] * SIZES["test"]))
        assert abs(run["fp32_accuracy"] - run["int8_accuracy"]) <= 1.0 - run["int8_agreement"] + 1e-9
        assert run["params"] > 0 and run["macs"] > 0
        assert 3.0 < run["fp32_bytes"] / run["int8_bytes"] < 4.5
        assert [h["epoch"] for h in run["history"]] == [1, 2]
        assert run["best_epoch"] in (1, 2)
        assert run["best_valid_loss"] == min(h["valid_loss"] for h in run["history"])
        for precision in ("fp32", "int8"):
            for angle in ("90", "30"):
                assert 0.0 <= run["stability"][precision][angle] <= 1.0
                # correct under every rotation implies the same class under every rotation
                assert run["stability"][precision][f"correct_{angle}"] <= run["stability"][precision][angle]
            assert run["degenerate"][precision] is None or isinstance(run["degenerate"][precision], str)
    equivariant = next(run for run in results["runs"] if run["model"] == "C4")
    # exact invariance to quarter turns: the predicted class never changes (FP32 logits agree to ~1e-7,
    # INT8 logits bit for bit)
    assert equivariant["stability"]["fp32"]["90"] == 1.0
    assert equivariant["stability"]["int8"]["90"] == 1.0
    assert equivariant["params"] < next(r for r in results["runs"] if r["model"] == "conventional")["params"]
    assert "MobileNetV2, C_4-equivariant" in results["table"] and "84.67" in results["table"]
    assert "SYNTHETIC" not in results["table"] and "2 epochs" in results["table"]
    # beside each checkpoint, a model-only file: the best weights with their preprocessing, and the
    # prediction command on the test file gives the reported FP32 test accuracy
    x_path, y_path = split_paths(tiny_data, "test")
    with h5py.File(y_path, "r") as handle:
        labels = handle["y"][:].reshape(-1)
    for run in results["runs"]:
        model_file = tmp_path / "runs" / f"{run['model']}-seed0" / "model.pt"
        assert model_file.stat().st_size < (tmp_path / "runs" / f"{run['model']}-seed0" / "last.pt").stat().st_size / 2
        csv_path = tmp_path / f"{run['model']}.csv"
        assert predict.main([str(model_file), x_path, "--out", str(csv_path)]) == 0
        rows = csv_path.read_text().splitlines()[1:]
        predicted = np.array([int(row.split(",")[-1]) for row in rows])
        assert len(rows) == SIZES["test"]
        assert (predicted == labels).mean() == pytest.approx(run["fp32_accuracy"])


def test_without_data_the_report_says_synthetic(tmp_path):
    out = tmp_path / "results.json"
    code = pcam.main(["--synthetic-dir", str(tmp_path / "synthetic"), "--models", "equivariant", "--epochs", "1",
                      "--train-size", "32", "--valid-size", "16", "--test-size", "16", "--runs",
                      str(tmp_path / "runs"), "--out", str(out), *TINY])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["synthetic"] is True
    assert results["table"].startswith("**SYNTHETIC DATA**")
    assert os.path.exists(split_paths(str(tmp_path / "synthetic"), "test")[0])


def _copy_split(source: str, target, split: str, x=None, y=None):
    """Write ``split`` into ``target`` from ``source``, with x/y replaced where given."""
    os.makedirs(target, exist_ok=True)
    src_x, src_y = split_paths(source, split)
    dst_x, dst_y = split_paths(str(target), split)
    with h5py.File(src_x) as fx, h5py.File(src_y) as fy:
        data_x, data_y = fx["x"][:], fy["y"][:]
    with h5py.File(dst_x, "w") as fx, h5py.File(dst_y, "w") as fy:
        fx.create_dataset("x", data=data_x if x is None else x(data_x))
        fy.create_dataset("y", data=data_y if y is None else y(data_y))
    return dst_x, dst_y


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


BAD_FILES = {
    "wrong shape": (lambda d: _copy_split(*d, "train", x=lambda a: a[:, :64]), "(N, 96, 96, 3)", "train_x"),
    "wrong dtype": (lambda d: _copy_split(*d, "train", x=lambda a: a.astype(np.float32)), "uint8", "train_x"),
    "labels": (lambda d: _copy_split(*d, "valid", y=lambda a: a + 1), "labels must be 0 or 1", "valid_y"),
    "lengths": (lambda d: _copy_split(*d, "test", y=lambda a: a[:-1]), "labels", "test_x"),
    "missing": (lambda d: os.remove(split_paths(str(d[1]), "valid")[1]), "file not found", "valid_y"),
    "gzipped": (lambda d: os.rename(split_paths(str(d[1]), "test")[0], split_paths(str(d[1]), "test")[0] + ".gz"),
                "gunzip", "test_x"),
    "truncated": (lambda d: _truncate(split_paths(str(d[1]), "train")[0]), "truncated", "train_x"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_exit_2_with_a_message_naming_the_file(tiny_data, tmp_path, capsys, case):
    target = tmp_path / "data"
    for split in ("train", "valid", "test"):
        _copy_split(tiny_data, target, split)
    damage, message, file_part = BAD_FILES[case]
    damage((tiny_data, target))
    code = pcam.main(["--data", str(target), "--runs", str(tmp_path / "runs"), "--epochs", "1", *TINY])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error and file_part in error, error
    assert "Traceback" not in error


def test_cli_bad_option_and_bad_directory_exit_2(tmp_path):
    result = run_cli(["--data", str(tmp_path / "nowhere")])
    assert result.returncode == 2 and "not a directory" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["--data", str(tmp_path), "--epochs", "0"])
    assert result.returncode == 2 and "--epochs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["pcam", "efficiency"])
def test_an_int8_engine_torch_lacks_is_refused_before_training(tmp_path, monkeypatch, capsys, command):
    # On ARM, or an x86 CPU without AVX2, torch offers no x86 engine: --backend x86 with INT8 on torch.ao is
    # refused up front, naming the option and the engine to use, not after the models have trained.
    import benchmarks.efficiency

    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "onednn", "none"])
    monkeypatch.setattr(pcam, "train", lambda *args, **kwargs: pytest.fail("training started"))
    main = pcam.main if command == "pcam" else benchmarks.efficiency.main
    code = main(["--data", str(tmp_path / "absent"), "--int8-backend", "torch-ao", "--backend", "x86",
                 "--runs", str(tmp_path / "runs")])
    error = capsys.readouterr().err
    assert code == 2 and "--backend" in error and "'x86' int8 engine is not available here" in error, error
    assert "use backend='qnnpack'" in error and "Traceback" not in error, error


def _last_epoch(path):
    try:
        return torch.load(path, weights_only=False)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def test_resume_after_a_killed_run_continues_from_the_last_checkpoint(tiny_data, tmp_path):
    # 10 short epochs (under half a second each on 2 cores): the poll below must see the first checkpoint
    # before the run ends, also when a busy machine starves this process for a few seconds
    epochs = 10
    common = ["--data", tiny_data, "--models", "equivariant", "--epochs", str(epochs), "--dropout", "0", *TINY]
    reference = run_cli([*common, "--runs", str(tmp_path / "a"), "--out", str(tmp_path / "a.json")], timeout=600)
    assert reference.returncode == 0, reference.stderr

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.pcam", *common, "--runs", str(tmp_path / "b"),
                                "--out", str(tmp_path / "b.json")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "b" / "C4-seed0" / "last.pt"
    deadline = time.time() + 300
    while _last_epoch(checkpoint) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    code = process.wait()
    killed_after = _last_epoch(checkpoint)
    assert 1 <= killed_after < epochs, (f"the run was not killed in the middle of training: last checkpoint after "
                                        f"epoch {killed_after}, exit code {code}")
    assert not (tmp_path / "b.json").exists()

    resumed = run_cli([*common, "--runs", str(tmp_path / "b"), "--out", str(tmp_path / "b.json"), "--resume"],
                      timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {killed_after}" in resumed.stdout
    assert f"epoch {killed_after}/{epochs}:" not in resumed.stdout  # finished epochs are not trained again
    a, b = (json.loads((tmp_path / name).read_text())["runs"][0] for name in ("a.json", "b.json"))
    # same seeds, one thread, the RNG state restored: the interrupted run computes what the other did
    assert [h["valid_loss"] for h in b["history"]] == pytest.approx([h["valid_loss"] for h in a["history"]],
                                                                    rel=1e-6)
    assert b["fp32_accuracy"] == a["fp32_accuracy"] and b["int8_accuracy"] == a["int8_accuracy"]


def test_resume_refuses_a_checkpoint_of_another_run(tiny_data, tmp_path, capsys):
    common = ["--data", tiny_data, "--models", "equivariant", "--runs", str(tmp_path / "runs"), *TINY]
    assert pcam.main([*common, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert pcam.main([*common, "--epochs", "1", "--lr", "0.01", "--resume"]) == 2
    assert "another run" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["conventional", "equivariant"])
def test_two_process_gradients_equal_one_process_gradients(tmp_path, model):
    # One float64 step: the global batch of 8 split over 2 gloo processes (DDP averages the gradients, batch
    # norm uses the statistics of the whole global batch through CrossProcessBatchNorm) against the whole
    # batch in one process. Float64, so that only the summation order differs: 1e-8 relative. (Per-process
    # batch statistics would change the gradients at the 1e-1 level.)
    from ddp_worker import global_batch, tiny_model

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "tests", "ddp_worker.py"), model, str(tmp_path / "grads.pt")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "grads.pt")
    single = tiny_model(model == "equivariant")
    x, y = global_batch()
    torch.nn.functional.cross_entropy(single(x), y).backward()
    compared = 0
    for name, parameter in single.named_parameters():
        scale = parameter.grad.norm().item()
        if scale > 1e-6:  # (biases before a batch norm have zero gradient: only rounding noise to compare)
            assert (distributed[name] - parameter.grad).norm().item() <= 1e-8 * scale, name
            compared += 1
    assert compared > 20


def test_torchrun_two_processes_train_like_one(tiny_data, tmp_path):
    # The CLI under torchrun (gloo, 2 processes) against one process, same seeds and global batch (16 = 2 x 8),
    # dropout off (its masks come from per-process RNGs). The arithmetic is checked in float64 above. In float32
    # a freshly initialised network amplifies rounding: a 1e-7 relative perturbation of the weights changes
    # some batch-norm updates by more than 100% within 3 steps (measured), so the run is one step (train size
    # 16 = one global batch): its training loss is the same forward pass (3e-5: the synced batch statistics
    # are float32 sums in another order; 1.07e-5 measured on these synthetic patches), and the validation loss after
    # the one update agrees to 1e-4 (gradients and batch statistics equal to rounding). No stain jitter: its
    # colours give these synthetic patches batch statistics that amplify the rounding of the synced
    # statistics past 1e-5 (1.4e-5 measured); that the processes see the same jittered patches is tested
    # exactly in tests/test_training_api.py.
    common = [
        "--data",
        tiny_data,
        "--models",
        "conventional",
        "--epochs",
        "1",
        "--dropout",
        "0",
        "--precision",
        "fp32",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--stain-jitter",
        "0",
        *TINY,
        "--train-size",
        "16",
    ]
    single = run_cli([*common, "--runs", str(tmp_path / "one"), "--out", str(tmp_path / "one.json")], timeout=600)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "benchmarks.pcam", *common, "--runs", str(tmp_path / "two"), "--out",
                             str(tmp_path / "two.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert two["runs"][0]["history"][0]["train_loss"] == pytest.approx(
        one["runs"][0]["history"][0]["train_loss"], rel=3e-5
    )
    assert two["runs"][0]["history"][0]["valid_loss"] == pytest.approx(
        one["runs"][0]["history"][0]["valid_loss"], rel=1e-4
    )
    first = torch.load(tmp_path / "one" / "conventional-seed0" / "last.pt", weights_only=False)["model"]
    second = torch.load(tmp_path / "two" / "conventional-seed0" / "last.pt", weights_only=False)["model"]
    assert first.keys() == second.keys()  # plain batch-norm state: the checkpoint loads into either


# -- the pieces ------------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_augmentation_applies_each_samples_own_d4_element(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 7, 7), dtype=torch.uint8, generator=generator)
    turns = torch.randint(0, 4, (batch,), generator=generator)
    flips = torch.randint(0, 2, (batch,), generator=generator)
    out = augment_batch(images, turns, flips)
    for i in range(batch):
        expected = torch.rot90(images[i], int(turns[i]), dims=(-2, -1))
        expected = torch.flip(expected, dims=(-1,)) if flips[i] else expected
        assert torch.equal(out[i], expected)


@settings(max_examples=30)
@given(zeros=st.integers(0, 50), ones=st.integers(0, 50), size=st.integers(1, 60), seed=st.integers(0, 99))
def test_balanced_subset(zeros, ones, size, seed):
    labels = np.array([0] * zeros + [1] * ones, dtype=np.int64)
    np.random.default_rng(seed).shuffle(labels)
    size = min(size, labels.size)
    chosen = balanced_subset(labels, size, seed)
    assert chosen.size == size and np.unique(chosen).size == size and np.all(np.diff(chosen) > 0)
    counts = np.bincount(labels[chosen], minlength=2)
    assert abs(counts[0] - counts[1]) <= 1 or min(zeros, ones) < size // 2  # balanced unless a class runs out


def test_reader_crops_to_95_and_normalizes(tiny_data):
    splits = open_pcam(tiny_data, {"train": 10})
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [10, 16, 16]
    assert splits["train"].labels.sum().item() == 5
    lazy = PCam(tiny_data, "test")
    images, labels = lazy.batch(np.array([5, 2, 5]))
    with h5py.File(split_paths(tiny_data, "test")[0]) as handle:
        raw = handle["x"][[2, 5]]
    assert images.shape == (3, 3, 95, 95) and images.dtype == torch.uint8
    assert torch.equal(images[1], torch.from_numpy(raw[0, :95, :95]).permute(2, 0, 1))
    assert torch.equal(images[0], images[2])
    normalizer = Normalizer.fit(splits["train"])
    x = normalizer(images)
    low, high = normalizer.value_range()
    assert low <= x.min().item() and x.max().item() <= high


def test_synthetic_data_is_deterministic_and_balanced(tmp_path):
    a = write_synthetic_pcam(str(tmp_path / "a"), {"train": 8, "valid": 4, "test": 4}, seed=3)
    b = write_synthetic_pcam(str(tmp_path / "b"), {"train": 8, "valid": 4, "test": 4}, seed=3)
    for split in ("train", "valid", "test"):
        for path_a, path_b in zip(split_paths(a, split), split_paths(b, split)):
            with h5py.File(path_a) as fa, h5py.File(path_b) as fb:
                name = "x" if path_a.endswith("x.h5") else "y"
                assert np.array_equal(fa[name][:], fb[name][:])
        with h5py.File(split_paths(a, split)[1]) as handle:
            labels = handle["y"][:].reshape(-1)
        assert labels.sum() * 2 == labels.size


def test_background_workers_feed_the_same_batches(tiny_data, tmp_path):
    # batches are a function of (seed, epoch, step) alone: reading them in 2 worker processes changes nothing
    histories = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        assert pcam.main(["--data", tiny_data, "--models", "conventional", "--epochs", "1", "--workers", workers,
                          "--runs", str(tmp_path / f"runs{workers}"), "--out", str(out), *TINY]) == 0
        histories.append(json.loads(out.read_text())["runs"][0]["history"])
    assert histories[0] == histories[1]


#: benchmarks.pcam run under a given multiprocessing start method (argv: method, then the command's options).
STARTED_BY = """
import multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1])
from benchmarks import pcam
raise SystemExit(pcam.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_started_without_fork_feed_the_same_batches(tiny_data, tmp_path, method):
    # macOS and Windows start DataLoader workers by spawn, Linux from Python 3.14 by forkserver: the dataset
    # is pickled to them (an open HDF5 file cannot be) and must give the batches a forked worker does
    histories = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        arguments = ["--data", tiny_data, "--models", "conventional", "--epochs", "1", "--workers", workers,
                     "--runs", str(tmp_path / f"runs{workers}"), "--out", str(out), *TINY]
        if workers == "0":
            assert pcam.main(arguments) == 0
        else:
            env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-c", STARTED_BY, method, *arguments], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        histories.append(json.loads(out.read_text())["runs"][0]["history"])
    assert histories[0] == histories[1]


def test_library_names_in_errors_read_as_this_commands_options():
    assert pcam.command_line_message(UsageError("config.batch_size", "3 is odd")) == "--batch-size: 3 is odd"
    assert (pcam.command_line_message(UsageError("workers", "cannot pickle; use workers=0"))
            == "--workers: cannot pickle; use --workers 0")
    # the command's own option names are left as they are, not prefixed twice
    assert pcam.command_line_message(UsageError("--workers", "expected >= 0")) == "--workers: expected >= 0"


def test_degenerate_models_are_flagged():
    labels = np.array([0, 1] * 8)
    assert "predicts class 1 for every patch" == pcam.degenerate(np.ones(16, np.int64), labels, 0.5)
    near_chance = labels.copy()
    near_chance[:8] = 1 - near_chance[:8]  # half right: 50%, no better than the majority class
    assert "chance" in pcam.degenerate(near_chance, labels, 0.5)
    assert pcam.degenerate(labels, labels, 1.0) is None
    table = pcam.format_table({"summary": {"conventional": {
        **{key: {"mean": 0.5, "std": 0.0, "n": 1} for key in ("fp32_accuracy", "int8_accuracy", "relative_drop")},
        **{f"stability_{a}_{p}": {"mean": 1.0, "std": 0.0, "n": 1} for a in ("90", "30", "correct_90", "correct_30")
           for p in ("fp32", "int8")},
        "params": 1, "macs": 1, "fp32_bytes": 4, "int8_bytes": 1,
        "degenerate_runs": ["seed 0 fp32: predicts class 1 for every patch"]}},
        "settings": {"group_order": 12, "seeds": [0], "epochs": 1, "weight_scheme": "symmetric", "backend": "x86"},
        "synthetic": False, "data": "d", "data_sizes": {"train": 1, "valid": 1, "test": 1}})
    assert "degenerate runs" in table and "predicts class 1 for every patch" in table and "1 epoch;" in table


@pytest.mark.parametrize("installed", [True, False])
def test_int8_backend_auto_prefers_the_executorch_program(monkeypatch, installed):
    # auto -> executorch where rotconv[deploy] is importable, else torch.ao with a notice naming the extra;
    # an explicit choice is kept as given.
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: (real("json") if installed else None) if name == "executorch"
                        else real(name, *rest))
    notices = []
    chosen = pcam.resolve_int8_backend("auto", log=notices.append)
    assert chosen == ("executorch" if installed else "torch-ao")
    assert bool(notices) != installed and all("rotconv[deploy]" in notice for notice in notices)
    assert pcam.resolve_int8_backend("onnx", log=notices.append) == "onnx"


def test_a_directory_of_neither_layout_names_both(tmp_path):
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "a.jpg").write_bytes(b"")  # images, but not in label folders
    with pytest.raises(PCamError) as raised:
        PCam(str(tmp_path), "train")
    message = str(raised.value)
    assert "camelyonpatch_level_2_split_train_x.h5: file not found" in message
    assert "image folders train/{0,1}/, valid/{0,1}/, test/{0,1}/" in message
