"""Classify patches with a trained model file (``model.pt``, written by ``python -m benchmarks.pcam`` beside
each run's checkpoint, or by ``mobilenet.save``).

    python -m benchmarks.predict runs/pcam/equivariant-seed0/model.pt patches_x.h5 [more.h5 image.png ...]

Inputs: HDF5 files with a dataset ``x`` of uint8 patches ``(N, 96, 96, 3)`` (the PCam layout), ``.npy``
arrays of the same layout, or image files (PNG, JPEG, TIFF; needs Pillow). Writes one CSV line per patch
(``source,index,probability_tumour,predicted``) to ``--out`` or stdout. Exit code 2 for a bad model or input.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import h5py
import numpy as np

import mobilenet
from mobilenet.files import OutputError, atomic_write

from .common import add_memory_argument, apply_memory_argument

__all__ = ["main", "read_patches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class InputError(ValueError):
    """An input file cannot be read as patches (the message names it)."""


def read_patches(path: str) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` patches from an HDF5 file (dataset ``x``), a ``.npy`` array or an image file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".h5", ".hdf5"):
        try:
            with h5py.File(path, "r") as handle:
                if "x" not in handle:
                    raise InputError(f"{path}: expected a dataset named 'x', found {list(handle.keys())}")
                patches = handle["x"][:]
        except OSError as error:
            raise InputError(f"{path}: not a readable HDF5 file ({error})") from None
    elif suffix == ".npy":
        try:
            patches = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable .npy array ({error})") from None
    elif suffix in IMAGE_SUFFIXES:
        try:
            from PIL import Image
        except ImportError:
            raise InputError(f"{path}: reading image files needs Pillow (pip install pillow)") from None
        try:
            patches = np.asarray(Image.open(path).convert("RGB"))[None]
        except OSError as error:
            raise InputError(f"{path}: not a readable image ({error})") from None
    else:
        raise InputError(f"{path}: unknown kind of file; expected .h5, .npy or an image ({', '.join(IMAGE_SUFFIXES)})")
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise InputError(f"{path}: expected uint8 patches (N, H, W, 3), got {patches.shape} {patches.dtype}")
    return patches


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model file (model.pt)")
    parser.add_argument("inputs", nargs="+", help="HDF5 / .npy / image files with patches")
    parser.add_argument("--out", help="CSV file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=256)
    add_memory_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_memory_argument(args)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size: expected >= 1, got {args.batch_size}")
        model = mobilenet.load(args.model)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["source", "index", "probability_tumour", "predicted"])
        total = 0
        for path in args.inputs:
            probabilities = mobilenet.predict(model, read_patches(path), batch_size=args.batch_size)
            for index, row in enumerate(probabilities.tolist()):
                writer.writerow([path, index, f"{row[-1]:.6f}", int(np.argmax(row))])
            total += len(probabilities)
        if args.out:
            atomic_write(args.out, lambda handle: handle.write(buffer.getvalue().encode()))
            print(f"{total} patches classified; written to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(buffer.getvalue())
    except (InputError, OutputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
