"""mobilenet.data.convert_to_hdf5 and ``python -m benchmarks.pcam --convert-to``: an image-folder PCam written in
the official HDF5 layout reads back patch for patch, label for label, and bad inputs or outputs are refused."""
import os

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import pcam as pcam_cli
from mobilenet.data import PCam, PCamError, convert_to_hdf5, open_pcam, split_paths
from rotconv.files import OutputError

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")


def write_folder(root, counts, seed):
    """An image-folder PCam of lossless PNGs: ``counts`` maps split -> (negatives, positives); returns
    {split: (images (N, 96, 96, 3), labels)} in the order the files are listed (label 0 first, by name)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, per_label in counts.items():
        images, labels = [], []
        for label, count in enumerate(per_label):
            if count == 0:
                continue
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder)
            for index in range(count):
                image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
                Image.fromarray(image).save(os.path.join(folder, f"p{index:04d}.png"))
                images.append(image)
                labels.append(label)
        written[split] = (np.stack(images), np.asarray(labels))
    return written


per_split = st.tuples(st.integers(0, 4), st.integers(0, 4)).filter(lambda pair: sum(pair) > 0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.fixed_dictionaries({"train": per_split, "valid": per_split, "test": per_split}),
       seed=st.integers(0, 2**16))
def test_converted_files_hold_every_whole_patch_in_the_folder_order(tmp_path_factory, counts, seed):
    root = str(tmp_path_factory.mktemp("folders"))
    out = str(tmp_path_factory.mktemp("h5"))
    written = write_folder(root, counts, seed)
    assert convert_to_hdf5(root, out) == {split: len(labels) for split, (_, labels) in written.items()}
    for split, (images, labels) in written.items():
        x_path, y_path = split_paths(out, split)
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            assert fx["x"].dtype == np.uint8 and fy["y"].dtype == np.uint8
            assert np.array_equal(fx["x"][:], images)  # whole 96x96 patches, not the 95x95 crop
            assert np.array_equal(fy["y"][:], labels.reshape(-1, 1, 1, 1))
        folder, converted = PCam(root, split), PCam(out, split)
        everything = np.arange(len(folder))
        for a, b in zip(folder.batch(everything), converted.batch(everything)):
            assert torch.equal(a, b)
    # seeded class-balanced subsets pick the same patches from both layouts
    limits = {split: max(1, len(labels) // 2) for split, (_, labels) in written.items()}
    for split, subset in open_pcam(root, limits, seed=seed).items():
        other = open_pcam(out, limits, seed=seed)[split]
        assert np.array_equal(subset.indices, other.indices)
        assert torch.equal(subset.batch(np.arange(len(subset)))[0], other.batch(np.arange(len(other)))[0])


def test_command_converts_refuses_to_overwrite_and_reports_progress(tmp_path, capsys):
    write_folder(str(tmp_path / "folders"), {"train": (3, 2), "valid": (1, 1), "test": (1, 2)}, seed=1)
    arguments = ["--data", str(tmp_path / "folders"), "--convert-to", str(tmp_path / "h5")]
    assert pcam_cli.main(arguments) == 0
    captured = capsys.readouterr()
    assert "train 5, valid 2, test 3 patches" in captured.out
    assert "converting train: 5/5 (100%)" in captured.err
    assert pcam_cli.main(arguments) == 2  # the files are there now
    error = capsys.readouterr().err
    assert "camelyonpatch_level_2_split_train_x.h5: already exists" in error and "Traceback" not in error
    assert pcam_cli.main(arguments + ["--overwrite"]) == 0
    assert len(PCam(str(tmp_path / "h5"), "test")) == 3


def test_a_bad_patch_is_named_and_leaves_no_file_of_its_split(tmp_path, capsys):
    write_folder(str(tmp_path / "folders"), {"train": (2, 2), "valid": (1, 1), "test": (1, 1)}, seed=2)
    bad = tmp_path / "folders" / "valid" / "1" / "p0000.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header still reads; the pixels do not
    assert pcam_cli.main(["--data", str(tmp_path / "folders"), "--convert-to", str(tmp_path / "h5")]) == 2
    error = capsys.readouterr().err
    assert "p0000.png" in error and "Traceback" not in error
    left = sorted(os.listdir(tmp_path / "h5"))
    assert left == ["camelyonpatch_level_2_split_train_x.h5", "camelyonpatch_level_2_split_train_y.h5"], left


def test_bad_sources_and_targets_are_refused_naming_them(tmp_path, capsys):
    write_folder(str(tmp_path / "folders"), {"train": (1, 1)}, seed=3)
    with pytest.raises(ValueError, match="is the source folder"):
        convert_to_hdf5(str(tmp_path / "folders"), str(tmp_path / "folders"))
    with pytest.raises(PCamError, match="no image folder for the valid split"):
        convert_to_hdf5(str(tmp_path / "folders"), str(tmp_path / "h5"), splits=("train", "val"))
    with pytest.raises(PCamError, match="nowhere: not a directory"):
        convert_to_hdf5(str(tmp_path / "nowhere"), str(tmp_path / "h5"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="file: not a directory"):
        convert_to_hdf5(str(tmp_path / "folders"), str(tmp_path / "file"))
    convert_to_hdf5(str(tmp_path / "folders"), str(tmp_path / "h5"))
    with pytest.raises(PCamError, match="already in the HDF5 layout"):
        convert_to_hdf5(str(tmp_path / "h5"), str(tmp_path / "again"))
    for arguments, expected in (([], "--convert-to: needs --data"),
                                (["--data", str(tmp_path / "folders")], "--convert-to: ")):
        assert pcam_cli.main(arguments + ["--convert-to", str(tmp_path / "folders")]) == 2
        error = capsys.readouterr().err
        assert expected in error and "Traceback" not in error, error
