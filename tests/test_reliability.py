"""Failure behaviour (issue 14): nothing silent, nothing lost. Each test drives one failure and checks the
documented outcome: exit code, a one-line message naming the path or option, nothing half-written."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv
from benchmarks import efficiency, pcam
from rotconv.files import OutputError, RunLock, atomic_write, differences, file_fingerprint, write_json
from mobilenet.data import PCamError, split_paths
from benchmarks.synthetic import write_synthetic_pcam
from int8_engines import available, engine_params, needs_engines
from mobilenet.training import Distributed
from mobilenet.training import Progress, TrainConfig, UsageError
from mobilenet.training.loop import _train_epoch, _TrainBatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"train": 32, "valid": 16, "test": 16}
TINY = ["--width-mult", "0.25", "--group", "C4", "--batch-size", "16", "--stability-samples", "4",
        "--threads", "1", "--epochs", "1", "--models", "conventional", "--int8-backend", "torch-ao"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_pcam(str(tmp_path_factory.mktemp("pcam")), SIZES, seed=1)


def run(args, capsys):
    code = pcam.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# -- run directories ---------------------------------------------------------------------------------------
def test_a_second_run_on_a_held_directory_is_refused_and_a_stale_lock_taken_over(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    with RunLock(str(runs)):  # this process holds it, as a concurrent run would
        code, err = run(["--data", tiny_data, "--runs", str(runs), *TINY], capsys)
        assert code == 2 and "another run holds it" in err and f"pid {os.getpid()}" in err
    assert not (runs / "conventional-seed0").exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (runs / ".lock").write_text(f"{os.uname().nodename} {finished.stdout.strip()}")  # its owner has exited
    assert run(["--data", tiny_data, "--runs", str(runs), *TINY], capsys)[0] == 0
    assert not (runs / ".lock").exists()  # released at the end


def test_a_fresh_run_does_not_overwrite_finished_checkpoints(tiny_data, tmp_path, capsys):
    args = ["--data", tiny_data, "--runs", str(tmp_path / "runs"), *TINY]
    assert run(args, capsys)[0] == 0
    checkpoint = tmp_path / "runs" / "conventional-seed0" / "last.pt"
    before = checkpoint.read_bytes()
    code, err = run(args, capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert checkpoint.read_bytes() == before
    assert run([*args, "--overwrite"], capsys)[0] == 0
    code, err = run([*args, "--overwrite", "--resume"], capsys)
    assert code == 2 and "choose one" in err


# -- divergence --------------------------------------------------------------------------------------------
def test_a_diverged_run_exits_3_and_is_not_reported(tiny_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, err = run(["--data", tiny_data, "--runs", str(tmp_path / "runs"), "--out", str(out), "--lr", "1e30",
                     *TINY], capsys)
    assert code == 3 and "diverged" in err
    assert not out.exists()


def test_results_json_is_strict():
    # NaN and Infinity are not JSON: they are written as null, and a strict parser reads the file
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"strict-{os.getpid()}.json")
    write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}}, path)
    text = open(path).read()
    os.unlink(path)
    parsed = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert parsed == {"a": None, "b": [1.0, None], "c": {"d": None}}


# -- checkpoints -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "directory", "foreign"])
def test_a_damaged_checkpoint_is_named_and_exits_2(tiny_data, tmp_path, capsys, damage):
    args = ["--data", tiny_data, "--runs", str(tmp_path / "runs"), *TINY]
    assert run(args, capsys)[0] == 0
    checkpoint = tmp_path / "runs" / "conventional-seed0" / "last.pt"
    data = checkpoint.read_bytes()
    checkpoint.unlink()
    if damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        checkpoint.write_text("not a checkpoint\n")
    elif damage == "directory":
        checkpoint.mkdir()
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    stale = tmp_path / "runs" / "conventional-seed0" / ".tmp-killed-last.pt"
    stale.write_bytes(b"partial")
    code, err = run([*args, "--resume"], capsys)
    assert code == 2 and str(checkpoint) in err
    assert not stale.exists()  # temporary files of a killed write are removed on start


# -- outputs -----------------------------------------------------------------------------------------------
def test_an_unwritable_output_is_found_before_training(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run(["--data", tiny_data, "--runs", str(tmp_path / "runs"), "--out",
                     str(blocker / "results.json"), *TINY], capsys)
    assert code == 2 and str(blocker / "results.json") in err
    assert not (tmp_path / "runs" / "conventional-seed0").exists()  # refused before any training
    code, err = run(["--data", tiny_data, "--runs", str(blocker / "runs"), *TINY], capsys)
    assert code == 2 and str(blocker / "runs") in err


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_names_the_path_and_leaves_nothing_behind(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def write(handle):
        handle.write(b"partial")
        raise OSError(error, os.strerror(error))

    with pytest.raises(OutputError) as raised:
        atomic_write(str(target), write)
    assert str(target) in str(raised.value) and "\n" not in str(raised.value)
    assert ("disk full" in str(raised.value)) == (error == errno.ENOSPC)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


# -- resume identity ---------------------------------------------------------------------------------------
def test_resume_identity_is_the_data_content_not_its_path(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), SIZES, seed=2)
    args = ["--runs", str(tmp_path / "runs"), *TINY]
    assert run(["--data", data, *args], capsys)[0] == 0
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    os.symlink(moved, tmp_path / "link")
    # the same files through a symlink of a moved directory: accepted (nothing left to train: 1 epoch done)
    code, _ = run(["--data", str(tmp_path / "link"), *args, "--resume"], capsys)
    assert code == 0
    _, y_path = split_paths(str(moved), "train")
    with h5py.File(y_path, "r+") as handle:
        handle["y"][...] = 1 - handle["y"][...]  # labels flipped in place
    code, err = run(["--data", str(moved), *args, "--resume"], capsys)
    assert code == 2 and "what differs" in err and "train_y.h5.sha256_sampled" in err


@pytest.mark.parametrize("size", [10, 2**21 + 17])
def test_fingerprint_sees_an_in_place_edit_and_not_the_path(tmp_path, size):
    first, second = tmp_path / "a", tmp_path / "b"
    content = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    first.write_bytes(content)
    second.write_bytes(content)
    assert file_fingerprint(str(first)) == file_fingerprint(str(second))
    edited = bytearray(content)
    edited[-1] ^= 0xFF  # the last byte is always sampled
    second.write_bytes(bytes(edited))
    assert file_fingerprint(str(first)) != file_fingerprint(str(second))


def test_differences_name_the_fields():
    assert differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}, "e": 0}) == [
        "b.c: 2 -> 5", "b.d: 3 -> (absent)", "e: (absent) -> 0"]


# -- arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pcam", "efficiency"])
@pytest.mark.parametrize("option, value", [("--weight-decay", "nan"), ("--width-mult", "nan"), ("--width-mult", "inf"),
                                           ("--width-mult", "-1"), ("--seeds", "-1"), ("--lr", "inf"),
                                           ("--dropout", "nan"), ("--dropout", "1.5"), ("--min-fields", "0"),
                                           ("--threads", "0")])
def test_bad_numbers_exit_2_naming_the_option(tmp_path, capsys, command, option, value):
    # Both commands share the model options (one definition, one check) and refuse bad values before any
    # data is generated or any run starts: exit 2, one line naming the option, no traceback.
    runs = tmp_path / "runs"
    arguments = ["--runs", str(runs), "--synthetic-dir", str(tmp_path / "synthetic"), option, value]
    code = pcam.main(arguments) if command == "pcam" else efficiency.main(["--quick"] + arguments)
    err = capsys.readouterr().err
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "synthetic").exists() and not runs.exists()


# -- data errors in workers ---------------------------------------------------------------------------------
class _FailingSplit(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, position):
        raise AssertionError("the trainer reads PCam-like data through batch()")

    def batch(self, positions):
        raise PCamError("/data/x.h5: could not read patches (truncated file?)")


def test_a_data_error_in_a_worker_arrives_as_its_own_message():
    config = TrainConfig(precision="fp32", batch_size=2)
    batches, steps = _TrainBatches(_FailingSplit(), config, Distributed(), workers=1, device="cpu").epoch(1)
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(PCamError) as raised:
        _train_epoch(model, optimizer, batches, steps, lambda x: x, config, 1, "cpu",
                     Progress(steps, "test", enabled=False))
    assert str(raised.value) == "/data/x.h5: could not read patches (truncated file?)"


#: mobilenet.train on plain datasets (no batch() method) with workers started by argv[1] (spawn/forkserver).
TRAIN_STARTED_BY = """
import multiprocessing, os, sys
import torch, torch.nn as nn
multiprocessing.set_start_method(sys.argv[1])
from mobilenet.training import TrainConfig, UsageError, train

class WithOpenFile(torch.utils.data.TensorDataset):  # what no start method but fork can send to a worker
    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.log = open(os.devnull, "w")

generator = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 2)
config = TrainConfig(epochs=2, batch_size=4, precision="fp32", stain_jitter=0, channels_last=False)
histories = []
for workers in (0, 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    histories.append(train(model, data, data, config, workers=workers, log=lambda *a: None)["history"])
print("same" if histories[0] == histories[1] else histories)
try:
    train(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), WithOpenFile(*data.tensors), data, config, workers=1,
          log=lambda *a: None)
except UsageError as error:
    print(error)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_not_forked_read_items_alike_and_name_data_that_does_not_pickle(method):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRAIN_STARTED_BY, method], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same, refused = done.stdout.splitlines()
    assert same == "same"
    assert refused.startswith(f"workers: 1 worker process(es) started by '{method}' need the training data to "
                              "pickle") and "use workers=0" in refused
    assert "Got pickle error" not in done.stderr  # torch's own note gives way to the error


#: 3 epochs of mobilenet.train with 2 workers started by argv[1]; every item read writes its reader's pid to argv[2].
WORKER_PIDS = """
import multiprocessing, os, sys
import torch, torch.nn as nn
from mobilenet.training import TrainConfig, train

class ReadersNoted(torch.utils.data.TensorDataset):
    def __init__(self, path, *tensors):
        super().__init__(*tensors)
        self.path = path

    def __getitem__(self, index):
        with open(self.path, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        return super().__getitem__(index)

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    generator = torch.Generator().manual_seed(0)
    tensors = torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 2
    config = TrainConfig(epochs=3, batch_size=4, precision="fp32", stain_jitter=0, channels_last=False)
    histories = []
    for workers, data in ((0, torch.utils.data.TensorDataset(*tensors)), (2, ReadersNoted(sys.argv[2], *tensors))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
        valid = torch.utils.data.TensorDataset(*tensors)
        histories.append(train(model, data, valid, config, workers=workers, log=lambda *a: None)["history"])
    print(os.getpid(), "same" if histories[0] == histories[1] else histories)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_training_workers_start_once_not_once_an_epoch(method, tmp_path):
    # With workers started by spawn or forkserver (macOS, Windows; Linux from Python 3.14) the data is pickled to
    # each worker when it starts: 2 workers for a whole 3-epoch training, not 2 an epoch, and the same batches.
    script, noted = tmp_path / "train_with_workers.py", tmp_path / "readers.txt"
    script.write_text(WORKER_PIDS)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), method, str(noted)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    main_pid, same = done.stdout.split()
    assert same == "same"
    in_workers = [pid for pid in noted.read_text().split() if pid != main_pid]  # the trainer checks an item itself
    assert len(in_workers) == 3 * 16  # every item of every epoch, read in a worker
    assert len(set(in_workers)) == 2


@pytest.mark.parametrize("workers", [-1, True, 1.5, "2"])
def test_workers_must_be_a_count(workers):
    with pytest.raises(UsageError, match="^workers: expected an integer >= 0"):
        mobilenet.train(nn.Linear(2, 2), [], [], TrainConfig(), workers=workers)


def test_unreadable_files_are_not_called_missing(tmp_path):
    from mobilenet.data import open_pcam
    directory = write_synthetic_pcam(str(tmp_path / "data"), SIZES, seed=3)
    x_path, _ = split_paths(directory, "valid")
    os.unlink(x_path)
    os.symlink(x_path, x_path)  # a symlink loop
    with pytest.raises(PCamError) as raised:
        open_pcam(directory)
    assert x_path in str(raised.value) and "not found" not in str(raised.value)


# -- INT8 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_model():
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(width_mult=0.25, group=rotconv.CyclicGroup(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quant.dfq(model.export(), group=4, mode="int8", weight_scheme="symmetric")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_refuses_non_finite_input(int8_model, bad):
    x = torch.zeros(1, 3, 95, 95)
    x[0, 1, 40, 40] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        int8_model(x)


def test_int8_model_says_how_to_save_it_when_pickled(int8_model):
    with pytest.raises(TypeError, match="quant.save_int8"):
        torch.save(int8_model, io.BytesIO())


@pytest.fixture(scope="module")
def generic_c12_int8():
    # random batch norm: outputs that depend on every conv, so one requantization step anywhere shows
    torch.manual_seed(0)
    network = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=12, width_mult=0.5),
                                          torch.randn(4, 3, 95, 95)).export().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {backend: quant.dfq(network, group=12, mode="int8", backend=backend, weight_scheme="symmetric")
                for backend in available("x86", "qnnpack")}


@pytest.mark.parametrize("backend", engine_params("x86", "qnnpack"))
def test_int8_model_saves_and_loads_bit_exactly(generic_c12_int8, backend, tmp_path):
    # A plain torch.jit.load packs every conv with the engine's own choice of library, which depends on the CPU
    # (with VNNI: dense convs on oneDNN, which requantizes some positions differently; without: depthwise convs
    # on fbgemm's slow path): on this network its logits were 2e-4 away from the built model's, on the full-width
    # one 0.5 (AVX-512 VNNI).
    # load_int8 packs them as built: equal bit for bit, and still exactly invariant to quarter turns.
    model = generic_c12_int8[backend]
    x = 1.5 * torch.randn(3, 3, 95, 95)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = quant.save_int8(model, str(tmp_path / "int8.pt"), x[:1])
        loaded = quant.load_int8(path)
    # torch's notes that TorchScript is deprecated (FutureWarning from torch 2.15) speak to the code calling
    # torch.jit, not to the user of these two functions: kept quiet
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]
    assert isinstance(loaded, quant.Int8Model) and loaded.backend == backend
    logits = loaded(x)
    assert torch.equal(logits, model(x))
    for k in (1, 2, 3):
        assert torch.equal(loaded(torch.rot90(x, k, (2, 3))), logits), k
    with pytest.raises(ValueError, match="NaN or infinite"):  # the input checks come back with it
        loaded(torch.full((1, 3, 95, 95), float("nan")))


@needs_engines("x86", "onednn")
def test_load_int8_packs_each_conv_for_the_library_it_was_built_for(generic_c12_int8, tmp_path, monkeypatch):
    path = quant.save_int8(generic_c12_int8["x86"], str(tmp_path / "int8.pt"), torch.randn(1, 3, 95, 95))
    packed_on = []
    prepack = torch.ops.quantized.conv2d_prepack

    def recording(weight, bias, stride, padding, dilation, groups):
        packed_on.append((groups, torch.backends.quantized.engine))
        return prepack(weight, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(torch.ops.quantized, "conv2d_prepack", recording)
    quant.load_int8(path)
    assert {engine for groups, engine in packed_on if groups == 1} == {"fbgemm"}, packed_on
    assert {engine for groups, engine in packed_on if groups > 1} == {"onednn"}, packed_on


def test_save_int8_and_load_int8_refuse_what_they_cannot_use(int8_model, tmp_path):
    with pytest.raises(TypeError, match="Int8Model"):
        quant.save_int8(nn.Conv2d(3, 3, 1), str(tmp_path / "a.pt"), torch.randn(1, 3, 95, 95))
    with pytest.raises(OutputError):
        quant.save_int8(int8_model, str(tmp_path), torch.randn(1, 3, 95, 95))  # a directory
    with pytest.raises(ValueError, match="missing.pt: int8 model file not found"):
        quant.load_int8(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.pt: not a TorchScript file"):
        quant.load_int8(str(garbage))
    other = str(tmp_path / "other.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), other)
    with pytest.raises(ValueError, match="not written by quant.save_int8"):
        quant.load_int8(other)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary files left


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


NOT_PATHS = [torch.zeros(1, 3, 95, 95), 3, None, ["model.pt"]]


@pytest.mark.parametrize("not_a_path", NOT_PATHS, ids=["tensor", "int", "None", "list"])
def test_writers_name_a_path_argument_that_is_not_a_path(not_a_path, int8_model, tmp_path, monkeypatch):
    # e.g. save_int8(model, example, path): the arguments swapped gave a bare TypeError from os.path, deep inside
    monkeypatch.chdir(tmp_path)
    model = mobilenet.mobilenet_v2(width_mult=0.25, input_size=95).eval()
    writers = {"mobilenet.save": lambda: mobilenet.save(model, not_a_path),
               "quant.save_int8": lambda: quant.save_int8(int8_model, not_a_path, torch.randn(1, 3, 95, 95)),
               "write_json": lambda: write_json({"a": 1}, not_a_path),
               "atomic_write": lambda: atomic_write(not_a_path, lambda handle: handle.write(b"x"))}
    if _has_module("executorch") and _has_module("torchao"):
        writers["quant.to_executorch"] = lambda: quant.to_executorch(model.export(), not_a_path)
    if _has_module("onnx") and _has_module("onnxscript"):
        writers["quant.to_onnx"] = lambda: quant.to_onnx(model.export(), not_a_path)
    for name, write in writers.items():
        with pytest.raises(TypeError) as raised:
            write()
        expected = f"path: expected a file path (str or os.PathLike), got {type(not_a_path).__name__}"
        assert str(raised.value) == expected, name
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary file


@pytest.mark.parametrize("not_a_path", NOT_PATHS, ids=["tensor", "int", "None", "list"])
def test_readers_name_a_path_argument_that_is_not_a_path(not_a_path):
    # an int in particular: os.path takes it for an open file descriptor and would stat whatever that is
    from mobilenet.data import PCam, convert_to_hdf5, data_fingerprint, open_pcam, read_image, read_patch_files
    readers = {"path": [lambda: mobilenet.load(not_a_path), lambda: quant.load_int8(not_a_path),
                        lambda: read_image(not_a_path)],
               "directory": [lambda: open_pcam(not_a_path), lambda: convert_to_hdf5(".", not_a_path)],
               "root": [lambda: PCam(not_a_path, "train"), lambda: data_fingerprint(not_a_path),
                        lambda: convert_to_hdf5(not_a_path, "out")],
               "files[1]": [lambda: read_patch_files(["patch.png", not_a_path])]}
    if _has_module("executorch"):
        readers["path"].append(lambda: quant.load_executorch(not_a_path))
    if _has_module("onnxruntime"):
        readers["path"].append(lambda: quant.load_onnx(not_a_path))
    for argument, calls in readers.items():
        for read in calls:
            with pytest.raises(TypeError) as raised:
                read()
            assert str(raised.value) == (f"{argument}: expected a file path (str or os.PathLike), "
                                         f"got {type(not_a_path).__name__}")


def test_save_int8_names_an_example_that_is_not_an_input(int8_model, tmp_path):
    # the model has an input size (an image network): a (B, C, H, W) batch; without one any batch of rank >= 1
    assert int8_model.input_size is not None
    for example, shown in ((str(tmp_path / "x.pt"), "str"), (torch.randn(3, 95, 95), r"\(3, 95, 95\)")):
        expected = rf"^input: expected a \(B, C, H, W\) float tensor, got {shown}$"
        with pytest.raises(ValueError, match=expected):
            quant.save_int8(int8_model, str(tmp_path / "int8.pt"), example)
    sizeless = quant.Int8Model(nn.Identity(), quant.default_backend())  # e.g. a network of linear layers
    assert torch.equal(sizeless(torch.ones(2, 5)), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"^input: expected a float tensor with a batch dimension, got \(\)$"):
        sizeless(torch.tensor(1.0))
    assert os.listdir(tmp_path) == []


def test_traced_mobilenet_pickles():
    model = mobilenet.mobilenet_v2(width_mult=0.25).eval()
    traced = torch.fx.symbolic_trace(model)
    buffer = io.BytesIO()
    torch.save(traced, buffer)
    buffer.seek(0)
    x = torch.randn(1, 3, 95, 95)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))


def _conv_bn(channels_in, channels_out):
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out)]


@pytest.mark.parametrize("case, message", [
    ("bn_after_relu", "follows"),
    ("nan_weight", "NaN or infinite"),
    ("already_simulated", "already quantized"),
    ("already_int8", "already quantized"),
])
def test_dfq_names_what_it_cannot_start_from(case, message):
    model = nn.Sequential(*_conv_bn(3, 4), nn.ReLU(), *_conv_bn(4, 2)).eval()
    if case == "bn_after_relu":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), *_conv_bn(4, 2)).eval()
    elif case == "nan_weight":
        model[0].weight.data[0, 0, 0, 0] = float("nan")
    elif case == "already_simulated":
        model = quant.dfq(model)
    elif case == "already_int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = quant.dfq(model, mode="int8")
    with pytest.raises(ValueError, match=message):
        quant.dfq(model)


def test_an_output_error_says_its_message_alone():
    # printed as "error: {error}" by every command: without OSError's "[Errno 28]" in front, with or without an errno
    error = OutputError(28, "results.json: could not be written (disk full)")
    assert str(error) == "results.json: could not be written (disk full)" and error.errno == 28
    assert str(OutputError("runs: not a directory")) == "runs: not a directory"
