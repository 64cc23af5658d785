"""An image-folder PCam written in the official HDF5 layout.

:func:`convert_to_hdf5` reads ``root/{train,valid,test}/{0,1}/*.{png,jpg,...}`` (see :mod:`.dataset`) and writes
``camelyonpatch_level_2_split_{split}_{x,y}.h5``: ``x`` of shape ``(N, 96, 96, 3)`` uint8 (whole patches, not
cropped) and ``y`` of shape ``(N, 1, 1, 1)`` uint8, the patches in the order :class:`PCam` reads the folder, so
``PCam(converted, split)[i]`` is ``PCam(root, split)[i]`` and seeded subsets pick the same patches in both.

    python -m benchmarks.pcam --data DATA/pcam-20k --convert-to DATA/pcam-20k-h5
"""
from __future__ import annotations

import os
from typing import Callable

import h5py
import numpy as np

from rotconv.files import OutputError, atomic_write, check_path

from .dataset import PATCH_SHAPE, SPLITS, PCam, PCamError, image_folder, read_patch_files, split_name, split_paths

__all__ = ["convert_to_hdf5"]

_CHUNK = 64  # patches per HDF5 chunk (and per decoded block): ~1.8 MB


def convert_to_hdf5(root: str, directory: str, splits: tuple[str, ...] | None = None, overwrite: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, int]:
    """Write the image-folder PCam at ``root`` to ``directory`` in the official HDF5 layout; returns the
    number of patches written per split.

    Args:
        root: an image-folder PCam (every split named in ``splits`` must be there as a folder).
        directory: where the ``.h5`` files go (created if needed; must not be ``root``).
        splits: the splits to convert (default: those ``root`` holds).
        overwrite: replace ``.h5`` files already in ``directory`` (without it they are refused, before any work).
        progress: called as ``progress(split, patches_done, patches_total)`` after each block of patches.

    Every image's header is checked before anything is written (:class:`PCamError` names a bad file, as reading
    does); a file whose pixels do not decode stops the conversion there, named. Every ``.h5`` file is written
    atomically: a stopped or interrupted conversion leaves the splits already written, whole, and nothing else.
    """
    check_path(root, "root")
    check_path(directory, "directory")
    if not os.path.isdir(root):
        raise PCamError(f"{root}: not a directory (expected an image-folder PCam in it)")
    if splits is None:
        splits = tuple(split for split in SPLITS if image_folder(root, split) is not None)
        if not splits:
            held = any(os.path.exists(path) for split in SPLITS for path in split_paths(root, split))
            raise PCamError(f"{root}: already in the HDF5 layout" if held else
                            f"{root}: no image folders ({'/'.join(SPLITS)} with 0/1 label folders) in it")
    splits = tuple(split_name(split) for split in splits)
    for split in splits:
        if image_folder(root, split) is None:
            raise PCamError(f"{os.path.join(root, split)}: no image folder for the {split} split "
                            "(expected 0/1 label folders)")
    if os.path.exists(directory) and os.path.samefile(root, directory):
        raise ValueError(f"directory: {directory} is the source folder; choose another directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{directory}: not a directory")
    outputs = {split: split_paths(directory, split) for split in splits}
    if not overwrite:
        for paths in outputs.values():
            for path in paths:
                if os.path.exists(path):
                    raise OutputError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    sources = {split: PCam(root, split) for split in splits}  # scans and checks every file's header first
    written = {}
    for split, source in sources.items():
        x_path, y_path = outputs[split]
        total = len(source.files)

        def write_x(handle, source=source, split=split, total=total) -> None:
            with h5py.File(handle, "w") as out:
                x = out.create_dataset("x", shape=(total,) + PATCH_SHAPE, dtype=np.uint8,
                                       chunks=(min(_CHUNK, total),) + PATCH_SHAPE)
                for start in range(0, total, _CHUNK):
                    x[start:start + _CHUNK] = read_patch_files(source.files[start:start + _CHUNK])
                    if progress is not None:
                        progress(split, min(start + _CHUNK, total), total)

        def write_y(handle, labels=source.all_labels) -> None:
            with h5py.File(handle, "w") as out:
                out.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1))

        atomic_write(x_path, write_x)
        atomic_write(y_path, write_y)
        written[split] = total
    return written
