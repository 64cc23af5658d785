"""Image files: mobilenet.data.read_image's rules (bit depth, modes, frames, bad files) and the image-folder
PCam layout root/{train,valid,test}/{0,1}/*.png|jpg (same reader, same errors, same pixels as HDF5)."""
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from benchmarks import pcam as pcam_cli
from mobilenet.data import ImageError, read_image
from mobilenet.data import PCam, PCamError, data_fingerprint, open_pcam

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")


def write_folder(root, sizes=(("train", 6), ("valid", 4), ("test", 4)), seed=0, suffix=".png"):
    """A tiny image-folder PCam (lossless PNG by default); returns {split: (images (N,96,96,3), labels)}."""
    sizes = dict(sizes)
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in sizes.items():
        images = rng.integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)
        labels = np.arange(count) % 2
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"patch{index:07d}{suffix}"))
        written[split] = (images, labels)
    return written


def test_image_folder_reads_the_pixels_and_labels(tmp_path):
    written = write_folder(str(tmp_path))
    for split, (images, labels) in written.items():
        dataset = PCam(str(tmp_path), split)
        order = np.argsort(labels, kind="stable")  # files are listed label 0 first, each sorted by name
        x, y = dataset.batch(np.arange(len(dataset)))
        assert torch.equal(y, torch.from_numpy(labels[order]).long())
        assert torch.equal(x, torch.from_numpy(images[order][:, :95, :95]).permute(0, 3, 1, 2))
    preloaded = open_pcam(str(tmp_path))["train"]
    assert torch.equal(preloaded.batch(np.arange(3))[0], PCam(str(tmp_path), "train").batch(np.arange(3))[0])
    assert PCam(str(tmp_path), "val").split == "valid"
    assert set(data_fingerprint(str(tmp_path))) == {"train", "valid", "test"}


BAD = {
    "truncated": (lambda root: _truncate(root / "train" / "0" / "patch0000000.png"), "patch0000000.png"),
    "corrupt": (lambda root: (root / "train" / "1" / "patch0000001.png").write_bytes(b"\x89PNG not really"),
                "patch0000001.png"),
    "wrong size": (lambda root: Image.new("RGB", (64, 64)).save(root / "valid" / "0" / "patch0000002.png"),
                   "64x64"),
    "wrong mode": (lambda root: Image.new("L", (96, 96)).save(root / "test" / "1" / "patch0000003.png"), "mode 'L'"),
    "empty class": (lambda root: [os.remove(p) for p in (root / "test" / "0").iterdir()], "holds no images"),
    "other label": (lambda root: (root / "train" / "2").mkdir(), "named 0 or 1"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_folders_exit_2_naming_the_file(tmp_path, capsys, case):
    write_folder(str(tmp_path))
    damage, expected = BAD[case]
    damage(tmp_path)
    code = pcam_cli.main(["--data", str(tmp_path), "--runs", str(tmp_path / "runs"), "--epochs", "1",
                          "--threads", "1"])
    assert code == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error, error


def test_truncated_file_is_named_when_read_lazily(tmp_path):
    write_folder(str(tmp_path))
    path = tmp_path / "train" / "1" / "patch0000005.png"
    dataset = PCam(str(tmp_path), "train")  # headers are fine
    _truncate(path)
    with pytest.raises(PCamError, match="patch0000005.png"):
        dataset.batch(np.arange(len(dataset)))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path)
    assert image.shape == (1, 2, 3, 3)
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(image[0, :, :, 0], expected) and np.array_equal(image[0, :, :, 2], expected)


def test_float_images_are_refused(tmp_path):
    path = str(tmp_path / "float.tif")
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(path)
    with pytest.raises(ImageError, match="float.tif.*white level"):
        read_image(path)


@settings(max_examples=5)
@given(frames=st.integers(1, 4), seed=st.integers(0, 100))
def test_every_frame_of_a_multi_frame_tiff_is_read(tmp_path_factory, frames, seed):
    arrays = np.random.default_rng(seed).integers(0, 256, (frames, 5, 7, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("tiff") / "pages.tif")
    images = [Image.fromarray(a) for a in arrays]
    images[0].save(path, save_all=True, append_images=images[1:])
    assert np.array_equal(read_image(path), arrays)
    if frames > 1:
        with pytest.raises(ImageError, match=f"{frames} frames"):
            read_image(path, max_frames=1)


def test_a_decompression_bomb_is_refused_with_the_file_named(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 90,000 pixels is then a bomb (> 2x the limit)
    with pytest.raises(ImageError, match="bomb.png: declares too many pixels"):
        read_image(path)


def test_grayscale_palette_and_rgba_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(str(tmp_path / "a.png"))[0], rgb)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    assert np.array_equal(read_image(str(tmp_path / "g.png"))[0], np.repeat(rgb[:, :, :1], 3, 2))


# What a viewer shows for each EXIF orientation value, from the stored (H, W, 3) pixels (EXIF 2.3, tag 0x0112:
# 2 mirrored left-right, 3 turned 180 degrees, 4 mirrored top-bottom, 5 transposed, 6 stored a quarter turn
# anticlockwise (shown turned clockwise), 7 transversed, 8 stored a quarter turn clockwise)
SHOWN = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def save_oriented(array, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


def as_rgb(stored):
    """What read_image makes of stored pixels: RGB kept, 8-bit gray repeated, 16-bit gray scaled to 8 bits."""
    if stored.ndim == 3:
        return stored
    gray = stored if stored.dtype == np.uint8 else np.floor(stored / 257 + 0.5).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


@settings(max_examples=40, deadline=None)
@example(orientation=6, height=3, width=5, suffix=".tif", kind="gray", seed=0)  # always: the cases Pillow
@example(orientation=7, height=4, width=2, suffix=".tif", kind="gray16", seed=1)  # scrambles when mapped
@given(orientation=st.integers(1, 8), height=st.integers(2, 9), width=st.integers(2, 9),
       suffix=st.sampled_from([".png", ".tif", ".jpg"]), kind=st.sampled_from(["rgb", "gray", "gray16"]),
       seed=st.integers(0, 100))
def test_exif_orientation_gives_the_pixels_a_viewer_shows(tmp_path_factory, orientation, height, width, suffix,
                                                          kind, seed):
    # uncompressed grayscale TIFFs are what Pillow memory-maps when a file is opened by name, and it turns
    # mapped ones with orientations 5-8 into scrambled pixels (Pillow 11-13)
    assume(not (suffix == ".jpg" and kind == "gray16"))  # JPEG has no 16-bit form
    rng = np.random.default_rng(seed)
    if kind == "gray16":
        stored = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    else:
        stored = rng.integers(0, 256, (height, width, 3) if kind == "rgb" else (height, width), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("exif")
    path = str(folder / f"turned{suffix}")
    save_oriented(stored, path, orientation)
    assert Image.open(path).getexif().get(0x0112) == orientation  # the tag was written
    expected = as_rgb(stored)
    if suffix == ".jpg":  # lossy: the same pixels saved without the tag decode to the stored grid
        Image.fromarray(stored).save(folder / "plain.jpg")
        expected = read_image(str(folder / "plain.jpg"))[0]
    assert np.array_equal(read_image(path)[0], SHOWN[orientation](expected))


def test_exif_orientation_turns_image_folder_patches(tmp_path):
    written = write_folder(str(tmp_path / "pcam"), sizes=(("train", 2), ("valid", 2), ("test", 2)))
    image = written["train"][0][0]  # label 0, patch0000000
    save_oriented(image, str(tmp_path / "pcam" / "train" / "0" / "patch0000000.png"), 8)
    x, _ = PCam(str(tmp_path / "pcam"), "train")[0]  # the first 95 rows and columns, as for every patch
    assert np.array_equal(x.permute(1, 2, 0).numpy(), np.rot90(image, 1)[:95, :95])


@pytest.mark.parametrize("exif", [b"\x00\x01 not TIFF", b"II*\x00\x08\x00\x00\x00\x05\x00\x12\x01"],
                         ids=["garbage", "truncated"])
def test_an_unparsable_exif_block_leaves_the_pixels_as_stored_without_a_warning(tmp_path, exif):
    stored = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "odd.png"
    Image.fromarray(stored).save(path)
    png = path.read_bytes()
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    path.write_bytes(png[:33] + chunk + png[33:])  # after the signature (8 bytes) and the header chunk (25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_image(str(path))[0], stored)


@pytest.mark.parametrize("version", ["10.2.1", "9.5.0", "10.3.0", "11.0.0.dev0"])
def test_a_pillow_that_reads_some_files_wrong_is_refused_by_name(tmp_path, monkeypatch, version):
    import PIL
    path = str(tmp_path / "p.png")
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(PIL, "__version__", version)
    if version.startswith(("10.2", "9.")):
        message = f"p.png: reading image files needs Pillow 10.3 or later, found {version}"
        with pytest.raises(ImageError, match=message.replace(".", r"\.")):
            read_image(path)
    else:
        assert read_image(path).shape == (1, 2, 2, 3)
