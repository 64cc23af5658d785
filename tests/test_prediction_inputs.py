"""What goes into a prediction and what comes out: one input rule (uint8 0-255 or float in [0, 1]), centre
crops and tiles, every frame, bit depths, bad files named with exit 2, outputs that never replace an input,
the usual file permissions, and memory that does not grow with the input file."""
import csv
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
import torch

import mobilenet
import quant
import rotconv
from benchmarks import efficiency, pcam, predict
from rotconv.files import OutputError, atomic_write

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    normalizer = mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.25, 0.2])
    images = normalizer(torch.from_numpy(patches(16, seed=99)).permute(0, 3, 1, 2)[:, :, :95, :95])
    # batch-norm statistics of such patches and a small random classifier: tumour probabilities that depend
    # on the input (0.55-0.74 on random patches; with the default init every patch gets ~1e-10, and no
    # comparison of probabilities could fail)
    model = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=4, width_mult=0.25), images)
    with torch.no_grad():
        model.classifier[-1].weight.normal_(0, 0.1)
        model.classifier[-1].bias.zero_()
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    mobilenet.save(model.eval(), path, normalizer)
    return path


def patches(count=4, size=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def run(arguments, capsys):
    code = predict.main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_float_images_in_0_1_give_the_uint8_answer_and_other_ranges_are_refused(model_file):
    model = mobilenet.load(model_file)
    images = patches()
    expected = mobilenet.predict(model, images)
    assert torch.allclose(mobilenet.predict(model, images.astype(np.float32) / 255), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\].*uint8"):
        mobilenet.predict(model, images.astype(np.float32))  # 0-255 as float
    with pytest.raises(ValueError, match="expected uint8"):
        mobilenet.predict(model, images.astype(np.uint16) * 257)


def test_raw_pixels_and_empty_batches_are_refused_by_every_model(model_file):
    model = mobilenet.load(model_file)
    raw = torch.from_numpy(patches(2)).permute(0, 3, 1, 2)[:, :, :95, :95].float()
    normalised = model.normalizer(raw)
    model(normalised)  # fine
    int8 = quant.dfq(model.export(), group=4, mode="int8")
    for runs in (model, int8):
        with pytest.raises(ValueError, match="normalised"):
            runs(raw)
        with pytest.raises(ValueError, match="empty batch"):
            runs(normalised[:0])
    with pytest.raises(ValueError, match="normalised"):
        quant.extras.runtime_input(raw, (1, 3, 95, 95))  # what the .pte and .onnx modules call
    with pytest.raises(ValueError, match="empty batch"):
        quant.extras.runtime_input(normalised[:0], (1, 3, 95, 95))


def test_the_int8_model_predicts_raw_patches_with_the_float_models_normaliser(model_file, tmp_path):
    model = mobilenet.load(model_file)
    images = patches(6)
    int8 = quant.dfq(model.export(), mode="int8")
    assert int8.input_size == 95 and torch.equal(int8.normalizer.mean, model.normalizer.mean)
    expected = torch.softmax(int8(model.normalizer(mobilenet.as_images(images, 95))), 1)
    assert expected[:, 1].std() > 1e-3  # probabilities that depend on the patch: the comparisons below can fail
    probabilities = mobilenet.predict(int8, images)
    assert torch.equal(probabilities, expected)
    assert (probabilities.argmax(1) == mobilenet.predict(model, images).argmax(1)).float().mean() >= 0.5
    # predicting leaves the model as it was: its graph still runs in eval mode (dropout off), so it answers
    # the same afterwards, and a file saved afterwards holds the same model
    assert torch.equal(mobilenet.predict(int8, images), expected)
    int8.train()  # an INT8 model is an inference program: its graph stays in eval mode
    assert torch.equal(mobilenet.predict(int8, images), expected) and int8.training
    path = quant.save_int8(int8, str(tmp_path / "int8.pt"), torch.zeros(1, 3, 95, 95))
    loaded = quant.load_int8(path)
    # the file keeps the input size and classes, not the normaliser
    assert loaded.input_size == 95 and loaded.num_classes == 2 and loaded.normalizer is None
    for runs in (int8, loaded):  # an empty input has the model's columns
        assert mobilenet.predict(runs, images[:0], normalizer=model.normalizer).shape == (0, 2)
    assert torch.equal(mobilenet.predict(loaded, images, normalizer=model.normalizer), expected)
    with pytest.raises(ValueError, match=r"uint8 images need the model's normalizer .*normalizer="):
        mobilenet.predict(loaded, images)
    with pytest.raises(ValueError, match=r"input_size: the model \(Sequential\) does not say its input size"):
        mobilenet.predict(torch.nn.Sequential(torch.nn.Flatten()), images, normalizer=model.normalizer)
    with pytest.raises(ValueError, match="normalizer: expected a callable"):
        mobilenet.predict(loaded, images, normalizer="imagenet")
    # an explicit input size crops there: the float model's answers on its own size
    assert torch.equal(mobilenet.predict(model, images, input_size=95), mobilenet.predict(model, images))


def test_the_command_runs_an_int8_program_with_the_normaliser_it_names(model_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional extra: rotconv[deploy])")
    model = mobilenet.load(model_file)
    directory = tmp_path / "run"
    directory.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = quant.to_onnx(model.export(), str(directory / "model.onnx"))
    images = patches(5, seed=3)
    inputs = str(tmp_path / "patches.npy")
    np.save(inputs, images)
    code, out, err = run([program, inputs, "--normalizer", model_file], capsys)
    assert code == 0, err
    expected = mobilenet.predict(quant.load_onnx(program), images, normalizer=model.normalizer)
    assert expected[:, 1].std() > 1e-3  # answers that differ from patch to patch: the comparison can fail
    assert [float(row["probability_tumour"]) for row in rows(out)] == pytest.approx(expected[:, 1].tolist(), abs=1e-6)
    # a program without --normalizer (with a hint where the run wrote model.pt beside it), --normalizer for a
    # model that has its own, and a normaliser of a model of another input size: exit 2 naming the option
    small = str(tmp_path / "small.pt")
    mobilenet.save(mobilenet.mobilenet_v2(group=4, width_mult=0.25, input_size=63), small, model.normalizer)
    shutil.copyfile(model_file, directory / "model.pt")
    for arguments, message in [
        ([program, inputs], "--normalizer: .*model.onnx is an INT8 program, which takes normalised input; name "
                            "the model file .* \\(beside it: --normalizer .*model.pt\\)"),
        ([model_file, inputs, "--normalizer", model_file], "--normalizer: only for a .pte or .onnx program"),
        ([program, inputs, "--normalizer", small], "its input is 95x95, but --normalizer .*small.pt is a model of "
                                                   "63x63 inputs"),
    ]:
        code, out, err = run(arguments, capsys)
        assert code == 2 and out == "" and re.search(message, err), err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_by_the_float_model_too(model_file, bad):
    model = mobilenet.load(model_file)
    x = torch.zeros(2, 3, 95, 95)
    x[1, 2, 50, 7] = bad  # one value in the second image
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x)
    model.train()
    model(x[:1])  # training checks no values (no device sync per step); a diverged loss stops a run instead
    unnormalised = mobilenet.load(model_file)
    unnormalised.normalizer = None  # float images taken as normalised: predict hands them to the model as they are
    with pytest.raises(ValueError, match="NaN or infinite"):
        mobilenet.predict(unnormalised, x)
    with pytest.raises(ValueError, match="images: contain NaN or infinite"):
        mobilenet.predict(model, x)  # with a normaliser: as [0, 1] images


@pytest.mark.parametrize("shape, message", [
    ((2, 96, 96), r"got \(2, 96, 96\): a grayscale batch\?"), ((96, 96), r"got \(96, 96\): a grayscale image\?"),
    ((2, 96, 96, 4), r"got \(2, 96, 96, 4\): RGBA\?"), ((2, 96, 96, 1, 1), r"got \(2, 96, 96, 1, 1\)$"),
])
def test_wrong_image_shapes_are_named_as_given(model_file, shape, message):
    with pytest.raises(ValueError, match=r"images: expected \(N, H, W, 3\) or \(N, 3, H, W\), " + message):
        mobilenet.predict(mobilenet.load(model_file), np.zeros(shape, np.uint8))


@pytest.mark.parametrize("images, message", [
    ([np.zeros((96, 96, 3), np.uint8), np.zeros((90, 96, 3), np.uint8)],
     r"images: a list of images of different shapes \(96, 96, 3\), \(90, 96, 3\); crop or tile them"),
    ([[1, 2], [3]], r"images: a list of images of different shapes \(2,\), \(1,\)"),
    ("patch.png", r"images: expected numbers \(uint8 pixels or floats in \[0, 1\]\), got str$"),
    (np.array(["a", "b"]), r"images: expected numbers .*, got ndarray of <U1$"),
    (None, r"images: expected numbers .*, got NoneType"),
    ({"x": 1}, r"images: expected numbers .*, got dict"),
    ([np.zeros((96, 96, 3), np.uint8), None], r"images: item 1: expected numbers .*, got NoneType"),
])
def test_inputs_that_are_not_one_array_of_numbers_are_named(model_file, images, message):
    with pytest.raises(ValueError, match=message):
        mobilenet.predict(mobilenet.load(model_file), images)


def test_larger_images_are_centre_cropped_with_a_notice_or_tiled(model_file, tmp_path, capsys):
    model = mobilenet.load(model_file)
    image = patches(1, 200)[0]
    path = str(tmp_path / "big.png")
    Image.fromarray(image).save(path)
    code, out, err = run([model_file, path], capsys)
    assert code == 0 and "central 95x95" in err
    centre = mobilenet.predict(model, image[52:147, 52:147][None])
    assert float(rows(out)[0]["probability_tumour"]) == pytest.approx(float(centre[0, 1]), abs=2e-6)
    code, out, _ = run([model_file, path, "--tiles"], capsys)
    tiles = rows(out)
    assert code == 0 and [(int(r["top"]), int(r["left"])) for r in tiles] == [(0, 0), (0, 95), (95, 0), (95, 95)]
    corner = mobilenet.predict(model, image[95:190, 0:95][None])
    assert float(tiles[2]["probability_tumour"]) == pytest.approx(float(corner[0, 1]), abs=2e-6)


def test_every_frame_and_sixteen_bit_images(model_file, tmp_path, capsys):
    frames = patches(2)
    path = str(tmp_path / "two.tif")
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(frames[1])])
    code, out, _ = run([model_file, path], capsys)
    assert code == 0 and [r["index"] for r in rows(out)] == ["0", "1"]
    gray8 = patches(1)[0, :, :, 0]
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(gray8).save(tmp_path / "flat.png")
    code, out, _ = run([model_file, str(tmp_path / "deep.png"), str(tmp_path / "flat.png")], capsys)
    deep, flat = rows(out)
    assert code == 0 and deep["probability_tumour"] == flat["probability_tumour"]


def test_a_directory_stands_for_the_patch_files_under_it(model_file, tmp_path, capsys):
    folder = tmp_path / "slides"
    (folder / "1").mkdir(parents=True)
    (folder / "0" / "deeper").mkdir(parents=True)
    images = patches(3)
    names = ["1/b.png", "0/a.JPG", "0/deeper/c.tif"]
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / name, **({"quality": 100} if name.endswith("JPG") else {}))
    with h5py.File(folder / "more.h5", "w") as handle:
        handle["x"] = patches(2, seed=1)
    (folder / "notes.txt").write_text("not a patch")
    (folder / ".hidden.png").write_bytes(b"not an image either")  # hidden files are never read
    (folder / "1" / "results.csv").write_text("source\n")
    code, out, err = run([model_file, str(folder)], capsys)
    assert code == 0, err
    sources = [row["source"] for row in rows(out)]
    expected = [str(folder / name) for name in ("0/a.JPG", "0/deeper/c.tif", "1/b.png", "more.h5", "more.h5")]
    assert sources == expected  # sorted by path, every patch of every file
    assert f"{folder}: 4 files with patches; 2 others left out (1/results.csv, notes.txt)" in err
    one_by_one = [row for name in expected[:4] for row in rows(run([model_file, name], capsys)[1])]
    together = [float(row["probability_tumour"]) for row in rows(out)]  # patches of several files in one batch
    assert together == pytest.approx([float(row["probability_tumour"]) for row in one_by_one], abs=2e-6)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("")
    code, _, err = run([model_file, str(empty)], capsys)
    assert code == 2 and f"{empty}: a directory without HDF5, .npy or image files" in err and "Traceback" not in err
    code, _, err = run([model_file, str(tmp_path / "missing")], capsys)
    assert code == 2 and "missing: file not found" in err
    code, _, err = run([model_file, str(folder), "--out", str(folder / "0" / "a.JPG")], capsys)
    assert code == 2 and "refusing to replace it" in err  # an output over a file found in a directory too


def test_the_command_takes_float_arrays_in_0_1_like_predict(model_file, tmp_path, capsys):
    # one rule for what a prediction input is, in the library and on the command line: uint8, or float in [0, 1]
    images = patches(3, seed=7)
    np.save(tmp_path / "bytes.npy", images)
    np.save(tmp_path / "floats.npy", images.astype(np.float32) / 255)
    with h5py.File(tmp_path / "floats.h5", "w") as handle:
        handle["x"] = images.astype(np.float64) / 255
    code, out, err = run([model_file, str(tmp_path / "bytes.npy"), str(tmp_path / "floats.npy"),
                          str(tmp_path / "floats.h5")], capsys)  # uint8 and float patches in one batch
    assert code == 0, err
    values = [float(row["probability_tumour"]) for row in rows(out)]
    assert values[3:6] == pytest.approx(values[:3], abs=2e-6) and values[6:] == pytest.approx(values[:3], abs=2e-6)
    code, out, err = run([model_file, str(tmp_path / "floats.h5"), str(tmp_path / "bytes.npy"), "--tiles"], capsys)
    tiles = [float(row["probability_tumour"]) for row in rows(out)]  # one 95x95 tile per 96x96 patch
    assert code == 0, err
    assert tiles[:3] == pytest.approx(values[:3], abs=2e-6) and tiles[3:] == pytest.approx(values[:3], abs=2e-6)
    np.save(tmp_path / "pixels.npy", images.astype(np.float32))  # 0-255 as float: refused, naming the file
    code, _, err = run([model_file, str(tmp_path / "pixels.npy")], capsys)
    assert code == 2 and "pixels.npy: images: float images must lie in [0, 1]" in err, err


def test_outputs_never_replace_an_input_and_are_checked_first(model_file, tmp_path, capsys):
    data = str(tmp_path / "x.h5")
    with h5py.File(data, "w") as handle:
        handle["x"] = patches()
    before = open(data, "rb").read(), open(model_file, "rb").read()
    for target in (data, model_file, str(tmp_path / "." / "x.h5")):
        code, _, err = run([model_file, data, "--out", target], capsys)
        assert code == 2 and "refusing to replace it" in err, err
    assert (open(data, "rb").read(), open(model_file, "rb").read()) == before
    code, _, err = run([model_file, data, "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = run([model_file, data, "--out", "/proc/version"], capsys)
    assert code == 2 and "/proc/version" in err and "does not accept new files" in err and "Traceback" not in err


def test_an_export_checks_its_output_before_the_work(model_file, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (optional extra: rotconv[deploy])")
    with pytest.raises(OutputError, match="is a directory"):  # before the export, not after it
        quant.to_onnx(mobilenet.load(model_file).export(), str(tmp_path), int8=False)


def test_written_files_get_the_usual_permissions(model_file, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.bin"), lambda handle: handle.write(b"x"))
        data = str(tmp_path / "x.h5")
        with h5py.File(data, "w") as handle:
            handle["x"] = patches(2)
        assert run([model_file, data, "--out", str(tmp_path / "p.csv")], capsys)[0] == 0
    finally:
        os.umask(previous)
    for name in ("a.bin", "p.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def _bomb(path):
    Image.new("RGB", (300, 300)).save(path)


BAD_INPUTS = {
    "x is a group": (lambda p: h5py.File(p, "w").create_group("x"), "x.h5", "is a Group"),
    "dangling link": (lambda p: h5py.File(p, "w").__setitem__("x", h5py.ExternalLink("gone.h5", "x")),
                      "x.h5", "cannot be opened"),
    "scalar x": (lambda p: h5py.File(p, "w").create_dataset("x", data=3), "x.h5", "uint8 or float patches"),
    "small image": (lambda p: Image.new("RGB", (64, 64)).save(p), "small.png", "64x64 pixels"),
    "float image": (lambda p: Image.fromarray(np.ones((96, 96), np.float32)).save(p), "f.tif", "white level"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_2_naming_the_file(model_file, tmp_path, capsys, case):
    make, name, message = BAD_INPUTS[case]
    good = str(tmp_path / "good.png")
    Image.fromarray(patches(1)[0]).save(good)
    path = str(tmp_path / name)
    handle = make(path)
    if handle is not None and hasattr(handle, "close"):
        handle.close()
    code, _, err = run([model_file, good, path], capsys)
    assert code == 2 and name in err and message in err and "Traceback" not in err, err


def test_a_decompression_bomb_exits_2(model_file, tmp_path, capsys, monkeypatch):
    _bomb(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    code, _, err = run([model_file, str(tmp_path / "bomb.png")], capsys)
    assert code == 2 and "bomb.png: declares too many pixels" in err


def test_hdf5_inputs_stream_in_batches(tmp_path):
    path = str(tmp_path / "long.h5")
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=patches(1200), chunks=(64, 96, 96, 3))  # 33 MB of patches
    tracemalloc.start()
    seen = sum(batch.shape[0] for batch in predict.iter_patches(path, chunk=64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == 1200
    assert peak < 6 * 64 * 96 * 96 * 3  # a few batches (1.8 MB each), not the 33 MB file


def test_a_reader_that_stops_early_ends_the_command_quietly(model_file, tmp_path):
    # `rotconv-predict model.pt big.h5 | head`: head closes the pipe after a few lines
    path = str(tmp_path / "long.h5")
    with h5py.File(path, "w") as handle:
        handle["x"] = np.repeat(patches(1), 3000, axis=0)  # ~110 kB of CSV: more than a pipe holds
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "benchmarks.predict", model_file, path, "--batch-size", "500"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root,
                               env={**os.environ, "PYTHONPATH": root})
    assert process.stdout.readline().startswith(b"source,index,")
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, error  # 128 + SIGPIPE, as for a command the signal ends
    assert error == "", error  # no traceback, no "Exception ignored" from the interpreter's exit


@pytest.mark.parametrize("ending", ["returns", "exits", "writes late"])
def test_a_command_ends_quietly_with_141_when_its_reader_is_gone(monkeypatch, ending):
    # every command's main is wrapped so (benchmarks.exits): a pipe whose reader has gone, as after `| head`
    from benchmarks.exits import EXIT_READER_GONE, command

    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stdout", open(write, "w"))

    @command
    def main(argv=None):
        print("x" * 100_000 if ending == "returns" else "a line")  # 100 kB: past the buffer, written at once
        if ending == "exits":
            raise SystemExit(0)  # as argparse's --help does: the line fails at the flush after main
        return 0  # "writes late": the line fails when the buffer is flushed, after main

    assert main([]) == EXIT_READER_GONE == 141
    assert os.path.samefile(f"/proc/self/fd/{write}", os.devnull)  # nothing left to fail at the interpreter's exit


def test_image_inputs_give_no_warning(model_file):
    model = mobilenet.load(model_file)
    frozen = patches(1)
    frozen.flags.writeable = False  # as np.asarray(PIL image) is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = mobilenet.predict(model, frozen)
        # a PIL image itself, and a list of them (np.asarray gives read-only arrays; torch warned on them)
        image = Image.fromarray(frozen[0])
        assert torch.equal(mobilenet.predict(model, image), expected)
        assert torch.allclose(mobilenet.predict(model, [image, image]), expected.repeat(2, 1), atol=1e-6)


def test_duplicate_seeds_are_refused(tmp_path, capsys):
    assert pcam.main(["--seeds", "0", "0", "--runs", str(tmp_path)]) == 2
    assert "seed 0 is given twice" in capsys.readouterr().err
    assert efficiency.main(["--quick", "--seeds", "1", "1", "--runs", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_predict_reads_a_large_array_a_batch_at_a_time(model_file, tmp_path):
    # an HDF5 dataset or a memory-mapped array of a whole split (PCam's train x is 7 GB) is read batch by
    # batch, never whole
    model = mobilenet.load(model_file)
    images = patches(10, seed=3)

    class Reads:  # array-like, as h5py.Dataset is: records every read
        shape, ndim, dtype, reads = images.shape, 4, images.dtype, []

        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            part = images[index]
            self.reads.append(len(part) if part.ndim == 4 else 1)
            return part

    expected = mobilenet.predict(model, images)
    assert torch.allclose(mobilenet.predict(model, Reads(), batch_size=4), expected, atol=1e-6)
    assert Reads.reads == [4, 4, 2]
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as handle:
        handle["x"] = images
    with h5py.File(path, "r") as handle:
        assert torch.allclose(mobilenet.predict(model, handle["x"], batch_size=3), expected, atol=1e-6)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert torch.allclose(mobilenet.predict(model, mapped, batch_size=4), expected, atol=1e-6)
