"""PatchCamelyon (PCam) as a ``torch.utils.data.Dataset``: validation, lazy reading, cropping, normalisation.

A PCam root holds ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (the official layout), or
keeps them in ``root/pcam/`` (torchvision's ``PCAM`` layout, whose split is called ``"val"``: both names
work), or is an image folder ``root/{train,valid,test}/{0,1}/*.{png,jpg,jpeg,tif,tiff}`` (the layout of
several public re-releases; the folder name is the label; ``val`` also names the validation folder), each
file a 96x96 8-bit RGB patch, decoded lazily with Pillow (:func:`mobilenet.data.read_image`). Each ``x``
file has a dataset ``x`` of shape ``(N, 96, 96, 3)`` uint8 (RGB patches) and each ``y``
file a dataset ``y`` of shape ``(N, 1, 1, 1)`` uint8 (label 1 = tumour tissue in the central 32x32).
Patches are read lazily with h5py (the official train split is 7 GB) and cropped to 95x95 (last row and
column dropped, so the grid has a centre pixel); :class:`mobilenet.data.Normalizer` normalises batches
per channel.

    train = PCam("/data/pcam", "train")          # items: (uint8 tensor (3, 95, 95), int label)
    valid = PCam("/data/pcam", "val", transform=Normalizer.fit(train))
"""
from __future__ import annotations

import copy
import os

from typing import Callable

import h5py
import numpy as np
import torch

from rotconv import check_choice

from rotconv.files import check_path, file_fingerprint
from .images import IMAGE_SUFFIXES, ImageError, read_image, require_pillow

__all__ = [
    "SPLITS",
    "split_name",
    "PCamError",
    "PCam",
    "split_paths",
    "image_folder",
    "open_pcam",
    "data_fingerprint",
    "balanced_subset",
    "CROP",
    "PATCH_SHAPE",
    "read_patch_files",
]

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}
PATCH_SHAPE = (96, 96, 3)
CROP = 95


class PCamError(ValueError):
    """A PCam file is missing, unreadable or not in the official layout (the message names the file)."""


def split_name(split: str) -> str:
    """The official name of ``split`` (``"val"``, torchvision's name, is ``"valid"``); ValueError otherwise."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS} (or 'val'), got {split!r}")
    return name


def _files(directory: str, split: str) -> tuple[str, str]:
    stem = os.path.join(directory, f"camelyonpatch_level_2_split_{split}")
    return f"{stem}_x.h5", f"{stem}_y.h5"


def split_paths(root: str, split: str) -> tuple[str, str]:
    """The ``(x, y)`` file paths of ``split`` under ``root``: in ``root`` itself (official layout) or, when
    they are not there but in ``root/pcam``, there (torchvision's layout)."""
    split = split_name(split)
    official = _files(root, split)
    torchvision = _files(os.path.join(root, "pcam"), split)
    if not os.path.exists(official[0]) and os.path.exists(torchvision[0]):
        return torchvision
    return official


def image_folder(root: str, split: str) -> str | None:
    """The image-folder directory of ``split`` under ``root`` (``root/<split>`` with a ``0`` or ``1``
    subfolder; ``val``/``valid`` both name the validation split), or None where ``root`` has none."""
    split = split_name(split)
    names = [split] + [alias for alias, name in _SPLIT_ALIASES.items() if name == split]
    for name in names:
        directory = os.path.join(root, name)
        if any(os.path.isdir(os.path.join(directory, label)) for label in ("0", "1")):
            return directory
    return None


def _scan_image_folder(directory: str) -> tuple[list[str], np.ndarray]:
    """The image files of a split folder (sorted within each label) and their labels; PCamError for a label
    folder other than 0/1, an empty label folder or a split with no images."""
    entries = sorted(os.listdir(directory))
    strays = [name for name in entries if os.path.isdir(os.path.join(directory, name)) and name not in ("0", "1")
              and not name.startswith(".")]
    if strays:
        raise PCamError(f"{os.path.join(directory, strays[0])}: a label folder must be named 0 or 1 "
                        "(1 = tumour in the central 32x32)")
    files, labels = [], []
    for label in ("0", "1"):
        folder = os.path.join(directory, label)
        if not os.path.isdir(folder):
            continue
        names = sorted(name for name in os.listdir(folder)
                       if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)
        if not names:
            raise PCamError(f"{folder}: the label folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [os.path.join(folder, name) for name in names]
        labels += [int(label)] * len(names)
    return files, np.asarray(labels, dtype=np.uint8)


def _check_image_headers(files: list[str]) -> None:
    """Each file opens as one 96x96 8-bit RGB frame (headers only; pixels are decoded when read)."""
    Image = require_pillow(files[0])
    for path in files:
        try:
            with Image.open(path) as image:
                size, mode, frames = image.size, image.mode, getattr(image, "n_frames", 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise PCamError(f"{path}: not a readable image ({error})") from None
        if mode != "RGB":
            raise PCamError(f"{path}: image mode {mode!r}, expected 8-bit RGB (a PCam patch)")
        if size != PATCH_SHAPE[:2] or frames != 1:
            raise PCamError(f"{path}: {size[0]}x{size[1]} pixels in {frames} frame(s), expected one 96x96 frame "
                            "(a PCam patch)")


def read_patch_files(files: list[str]) -> np.ndarray:
    """The image files ``files`` decoded as whole PCam patches, ``(len(files), 96, 96, 3)`` uint8;
    :class:`PCamError` names a file that is not one readable 96x96 RGB patch."""
    for slot, path in enumerate(files):
        check_path(path, f"files[{slot}]")
    batch = np.empty((len(files),) + PATCH_SHAPE, dtype=np.uint8)
    for slot, path in enumerate(files):
        try:
            image = read_image(path, max_frames=1)[0]
        except ImageError as error:
            raise PCamError(str(error)) from None
        if image.shape != PATCH_SHAPE:
            raise PCamError(f"{path}: decoded to {image.shape}, expected {PATCH_SHAPE} (a PCam patch)")
        batch[slot] = image
    return batch


def _open_dataset(path: str, name: str) -> tuple[h5py.File, h5py.Dataset]:
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.exists(path + ".gz"):
            raise PCamError(f"{path}: only the compressed {os.path.basename(path)}.gz is there; "
                            f"decompress it first: gunzip -k {path}.gz") from None
        raise PCamError(f"{path}: file not found (expected the official PCam HDF5 file here, or in a pcam/ "
                        "subdirectory as torchvision keeps it; or image folders train/{0,1}/, valid/{0,1}/, "
                        "test/{0,1}/ beside it)") from None
    except OSError as error:  # permission denied, a symlink loop, ...
        raise PCamError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise PCamError(f"{path}: not a readable HDF5 file (truncated or corrupt download?): {error}") from None
    if name not in handle:
        keys = list(handle.keys())
        handle.close()
        raise PCamError(f"{path}: expected a dataset named {name!r}, found {keys}")
    try:
        dataset = handle[name]
    except (KeyError, OSError) as error:  # a dangling external or soft link
        handle.close()
        raise PCamError(f"{path}: its entry {name!r} cannot be opened (a broken link?): {error}") from None
    if not isinstance(dataset, h5py.Dataset):
        handle.close()
        raise PCamError(f"{path}: {name!r} is a {type(dataset).__name__}, expected a dataset")
    return handle, dataset


def _check_split(x_path: str, y_path: str) -> int:
    """Validate the x/y files of a split (PCamError names the file and what was expected); their length."""
    x_file, x = _open_dataset(x_path, "x")
    y_file, y = _open_dataset(y_path, "y")
    try:
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != PATCH_SHAPE:
            raise PCamError(f"{x_path}: expected x of shape (N, 96, 96, 3) and dtype uint8, "
                            f"got {tuple(x.shape)} {x.dtype}")
        if y.dtype != np.uint8 or y.ndim != 4 or tuple(y.shape[1:]) != (1, 1, 1):
            raise PCamError(
                f"{y_path}: expected y of shape (N, 1, 1, 1) and dtype uint8, got {tuple(y.shape)} {y.dtype}"
            )
        if x.shape[0] != y.shape[0]:
            raise PCamError(f"{x_path}: {x.shape[0]} patches but {os.path.basename(y_path)} has {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise PCamError(f"{x_path}: the split is empty")
        try:
            labels = y[:].reshape(-1)
            x[-1]  # a truncated file fails on its last chunk
        except OSError as error:
            raise PCamError(f"{x_path}: could not read the data (truncated file?): {error}") from None
        bad = np.setdiff1d(np.unique(labels), [0, 1])
        if bad.size:
            raise PCamError(f"{y_path}: labels must be 0 or 1, found {bad[:5].tolist()}")
        return int(x.shape[0])
    finally:
        x_file.close()
        y_file.close()


class PCam(torch.utils.data.Dataset):
    """One split of PCam, read lazily (or preloaded with ``preload=True``).

    Args:
        root: the directory with the HDF5 files (official layout, or torchvision's ``root/pcam/``).
        split: ``"train"``, ``"valid"`` (or ``"val"``) or ``"test"``.
        transform: applied to each item's image (e.g. a :class:`Normalizer`); None keeps uint8.
        indices: a subset of the split (default: all patches).
        preload: read the (subset's) patches into memory once.

    Items are ``(image, label)``: ``transform(uint8 tensor (3, 95, 95))`` and an int. :meth:`batch` reads many
    patches at once (uint8, no transform), which the trainer uses. Files are validated on construction
    (:class:`PCamError` names a bad file) and opened on first access in each process, so the dataset works
    with DataLoader workers under any start method (it pickles without its open file).
    """

    def __init__(self, root: str, split: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: np.ndarray | None = None, preload: bool = False):
        self.split = split_name(split)
        self.root = root
        check_path(root, "root")
        if not os.path.isdir(root):
            raise PCamError(f"{root}: not a directory (expected the PCam HDF5 files in it)")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.folder = image_folder(root, self.split)
        if self.folder is not None:
            self.files, self.all_labels = _scan_image_folder(self.folder)
            _check_image_headers(self.files)
            self.x_path = self.y_path = self.folder
            self.total = len(self.files)
        else:
            self.x_path, self.y_path = split_paths(root, self.split)
            self.total = _check_split(self.x_path, self.y_path)
            with h5py.File(self.y_path, "r") as handle:
                self.all_labels = handle["y"][:].reshape(-1)
        self._x: h5py.Dataset | None = None
        self._pid: int | None = None
        self._images: torch.Tensor | None = None
        self._select(np.arange(self.total) if indices is None else indices, preload)

    def _select(self, indices: np.ndarray, preload: bool) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.total):
            raise ValueError(f"indices: must lie in [0, {self.total}) for {self.x_path}")
        self.labels = torch.from_numpy(self.all_labels[self.indices].astype(np.int64))
        self._images = None
        if preload:
            self._images = self.read(np.arange(len(self)))

    def subset(self, indices: np.ndarray, preload: bool = False) -> "PCam":
        """The patches at ``indices`` (into the whole split) as a new split object, without re-validating."""
        chosen = copy.copy(self)
        chosen._x, chosen._pid = None, None
        chosen._select(indices, preload)
        return chosen

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getstate__(self) -> dict:
        # an open HDF5 handle cannot be pickled: a worker started by "spawn" or "forkserver" (macOS, Windows,
        # Linux from Python 3.14) reopens the file on first access, as a forked one does
        return {**self.__dict__, "_x": None, "_pid": None}

    def _dataset(self) -> h5py.Dataset:
        if self._x is None or self._pid != os.getpid():
            self._x = h5py.File(self.x_path, "r")["x"]
            self._pid = os.getpid()
        return self._x

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """Patches at ``positions`` (into this subset), cropped: ``(len(positions), 3, 95, 95)`` uint8."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._images is not None:
            return self._images[torch.from_numpy(positions)]
        rows = self.indices[positions]
        if self.folder is not None:
            return self._decode(rows)
        order = np.argsort(rows, kind="stable")
        unique, inverse = np.unique(rows[order], return_inverse=True)  # h5py wants increasing indices
        try:
            data = self._dataset()[unique.tolist(), :CROP, :CROP, :]
        except OSError as error:
            raise PCamError(f"{self.x_path}: could not read patches (truncated file?): {error}") from None
        batch = np.empty((rows.size, CROP, CROP, 3), dtype=np.uint8)
        batch[order] = data[inverse]
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def _decode(self, rows: np.ndarray) -> torch.Tensor:
        batch = read_patch_files([self.files[row] for row in rows.tolist()])[:, :CROP, :CROP]
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} patches")
        image = self.read(np.array([position % len(self)]))[0]
        return (image if self.transform is None else self.transform(image)), int(self.labels[position])

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 (B, 3, 95, 95), int64 (B,))`` for ``positions``."""
        return self.read(positions), self.labels[torch.as_tensor(np.asarray(positions, dtype=np.int64))]


def data_fingerprint(root: str) -> dict:
    """Size and sampled content hash of every split file (see :func:`rotconv.files.file_fingerprint`):
    what identifies a data set for resuming, wherever it lies (symlinked, moved, copied). An image folder:
    per split, the count of files per label and a hash of their names and sizes."""
    check_path(root, "root")
    if any(image_folder(root, split) for split in SPLITS):
        return {split: _folder_fingerprint(image_folder(root, split)) for split in SPLITS if image_folder(root, split)}
    return {os.path.basename(path).replace("camelyonpatch_level_2_split_", ""): file_fingerprint(path)
            for split in SPLITS for path in split_paths(root, split) if os.path.isfile(path)}


def _folder_fingerprint(directory: str) -> dict:
    import hashlib

    files, labels = _scan_image_folder(directory)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.relpath(path, directory)}:{os.path.getsize(path)}\n".encode())
    return {"files": len(files), "positives": int(labels.sum()), "sha256": digest.hexdigest()}


def open_pcam(directory: str, limits: dict[str, int | None] | None = None, seed: int = 0,
              preload_bytes: int = 2 * 2**30, splits: tuple[str, ...] | None = None) -> dict[str, PCam]:
    """Open the splits of ``directory`` (all three, or those named in ``splits``; each validated:
    :class:`PCamError` names a bad file).

    ``limits`` maps a split to a maximum number of patches: a class-balanced random subset (seeded) is taken.
    Splits whose (subset) size fits in ``preload_bytes`` are read into memory once.
    """
    check_path(directory, "directory")
    if not os.path.isdir(directory):
        raise PCamError(f"{directory}: not a directory (expected the PCam HDF5 files in it)")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise PCamError(f"{directory}: the directory cannot be read (permission denied)")
    limits = limits or {}
    names = SPLITS if splits is None else tuple(check_choice(split, "splits", SPLITS) for split in splits)
    splits = {}
    for split in names:
        whole = PCam(directory, split)
        limit = limits.get(split)
        indices = balanced_subset(whole.all_labels, limit, seed) if limit is not None and limit < whole.total \
            else np.arange(whole.total)
        splits[split] = whole.subset(indices, preload=indices.size * CROP * CROP * 3 <= preload_bytes)
    return splits


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` indices, half from each class where possible, in increasing order."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
    first = min(size // 2, by_class[0].size)
    second = min(size - first, by_class[1].size)
    first = min(size - second, by_class[0].size)
    chosen = [rng.choice(members, count, replace=False) for members, count in zip(by_class, (first, second))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
