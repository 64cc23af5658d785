"""Classify patches with a trained model file (``model.pt``, written by ``python -m benchmarks.pcam`` beside
each run's checkpoint, or by ``mobilenet.save``) or a shipped model's name (``mobilenet.list_pretrained()``).

    python -m benchmarks.predict runs/pcam/C12-seed0/model.pt patches_x.h5 [more.h5 image.png ...]
    python -m benchmarks.predict model.pt slide_region.png --tiles --out map.csv   # a probability per tile
    python -m benchmarks.predict pcam-c12 patch.jpg                                # the shipped C_12 model
    python -m benchmarks.predict pcam-c12 patches/ --out probabilities.csv         # every patch file under it
    python -m benchmarks.predict runs/pcam/C12-seed0/model.pte patches/ --normalizer runs/pcam/C12-seed0/model.pt

The model may also be a deployed INT8 program, an ExecuTorch ``.pte`` or an ONNX ``.onnx`` file (``quant``'s
``to_executorch`` / ``to_onnx``; needs the ``deploy`` extra). A program takes normalised input and holds no
normaliser: ``--normalizer`` names the model file (or shipped model) whose normaliser it was made with.

Inputs: HDF5 files with a dataset ``x`` of patches ``(N, H, W, 3)``, uint8 as in PCam or float in [0, 1] (the
rule of :func:`mobilenet.predict`; read in batches,
so memory does not grow with the file), ``.npy`` arrays of the same layout, or image files (PNG, JPEG,
TIFF, BMP; needs Pillow; every frame of a multi-frame file is a patch; 16-bit grayscale is scaled to 8
bits; an EXIF orientation tag is applied, so positions are those of the image as shown:
:func:`mobilenet.data.read_image`). A directory stands for those files under it, at any depth, sorted by
path (hidden files are not read; other files are left out with a note). Patches larger than the model's
input are centre-cropped (a notice says so), or with ``--tiles`` cut into non-overlapping tiles, one CSV line
each with its position.

Writes one CSV line per patch (``source,index,probability_tumour,predicted``; with ``--tiles``
``source,index,top,left,probability_tumour,predicted``) to ``--out`` or stdout. ``--out`` is checked before
any work and never replaces an input or the model. Exit code 2 for a bad model, input or output path; 141
when stdout is closed early (``| head``), without a traceback.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from typing import Iterator

import h5py
import numpy as np
import torch

import mobilenet
import quant
from rotconv.files import OutputError, atomic_write, check_writable
from mobilenet.data import IMAGE_SUFFIXES, ImageError, read_image

from .common import add_memory_argument, apply_memory_argument
from .exits import command

__all__ = ["main", "read_patches", "iter_patches", "expand_inputs", "PATCH_SUFFIXES", "InputError",
           "check_output_path", "load_classifier", "PROGRAM_LOADERS"]


class InputError(ValueError):
    """An input file cannot be read as patches (the message names it)."""


def _patch_array(array) -> bool:
    """Whether ``array`` (numpy or h5py) holds patches ``(N, H, W, 3)`` of a dtype predict takes: uint8 or float
    (whose values :func:`mobilenet.as_images` checks)."""
    return (array.ndim == 4 and array.shape[-1] == 3
            and (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)))


def _hdf5_patches(path: str, chunk: int) -> Iterator[np.ndarray]:
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: not a readable HDF5 file ({error})") from None
    with handle:
        if "x" not in handle:
            raise InputError(f"{path}: expected a dataset named 'x', found {list(handle.keys())}")
        try:
            x = handle["x"]
        except (KeyError, OSError) as error:  # a dangling external or soft link
            raise InputError(f"{path}: its entry 'x' cannot be opened (a broken link?): {error}") from None
        if not isinstance(x, h5py.Dataset):
            raise InputError(f"{path}: 'x' is a {type(x).__name__}, expected a dataset of patches (N, H, W, 3)")
        if not _patch_array(x):
            raise InputError(f"{path}: expected 'x' to hold uint8 or float patches (N, H, W, 3), got {x.shape} "
                             f"{x.dtype}")
        for start in range(0, x.shape[0], chunk):
            try:
                yield x[start:start + chunk]
            except OSError as error:
                raise InputError(f"{path}: could not read patches {start}-{start + chunk} (truncated?): "
                                 f"{error}") from None


def iter_patches(path: str, chunk: int = 256) -> Iterator[np.ndarray]:
    """``(n, H, W, 3)`` batches (uint8, or float in [0, 1]) of at most ``chunk`` patches from an HDF5 file
    (dataset ``x``, read batch by batch), a ``.npy`` array (memory-mapped) or an image file (all its frames)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".h5", ".hdf5"):
        yield from _hdf5_patches(path, chunk)
        return
    if suffix == ".npy":
        try:
            patches = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable .npy array ({error})") from None
    elif suffix in IMAGE_SUFFIXES:
        try:
            patches = read_image(path)
        except ImageError as error:
            raise InputError(str(error)) from None
    else:
        raise InputError(f"{path}: unknown kind of file; expected .h5, .npy or an image ({', '.join(IMAGE_SUFFIXES)})")
    if not _patch_array(patches):
        raise InputError(f"{path}: expected uint8 or float patches (N, H, W, 3), got {patches.shape} "
                         f"{patches.dtype}")
    for start in range(0, patches.shape[0], chunk):
        yield np.array(patches[start:start + chunk])


PATCH_SUFFIXES = (".h5", ".hdf5", ".npy") + IMAGE_SUFFIXES


def expand_inputs(paths: list[str]) -> list[str]:
    """``paths`` with each directory replaced by the patch files under it (HDF5, ``.npy`` and image files, any
    depth, sorted by path; hidden files and folders are not read). Other files in a directory are left out
    with a note on stderr; a directory without patch files and a missing path raise :class:`InputError`."""
    expanded = []
    for path in paths:
        if os.path.isfile(path):
            expanded.append(path)
            continue
        if not os.path.isdir(path):
            raise InputError(f"{path}: file not found")
        found, others = [], []
        for directory, folders, files in os.walk(path):
            folders[:] = [folder for folder in folders if not folder.startswith(".")]
            for name in files:
                if not name.startswith("."):
                    relative = os.path.relpath(os.path.join(directory, name), path)
                    (found if os.path.splitext(name)[1].lower() in PATCH_SUFFIXES else others).append(relative)
        if not found:
            raise InputError(f"{path}: a directory without HDF5, .npy or image files "
                             f"({', '.join(PATCH_SUFFIXES)}), at any depth")
        if others:
            others.sort(key=lambda name: name.split(os.sep))
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            print(f"note: {path}: {len(found)} files with patches; {len(others)} other"
                  f"{'s' if len(others) > 1 else ''} left out ({shown})", file=sys.stderr)
        expanded += [os.path.join(path, name) for name in sorted(found, key=lambda name: name.split(os.sep))]
    return expanded


def read_patches(path: str) -> np.ndarray:
    """All patches of ``path`` at once (see :func:`iter_patches`): ``(N, H, W, 3)``."""
    batches = list(iter_patches(path))
    return np.concatenate(batches) if batches else np.empty((0, 96, 96, 3), np.uint8)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(out: str, inputs: list[str]) -> None:
    """Before any work: ``out`` is not one of ``inputs`` (nor the same file by another name), not a
    directory, and a file can be written beside it (:class:`OutputError` naming it otherwise)."""
    for path in inputs:
        if _same_file(out, path):
            raise OutputError(17, f"--out {out}: is the input {path}; refusing to replace it")
    if os.path.isdir(out):
        raise OutputError(21, f"--out {out}: is a directory, expected a CSV file path")
    if os.path.exists(out) and not os.path.isfile(out):
        raise OutputError(22, f"--out {out}: exists and is not a regular file")
    check_writable(out)
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise OutputError(13, f"--out {out}: the file cannot be replaced (permission denied)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model file (model.pt), the name of a shipped model (pcam-c12, "
                                          "pcam-conventional), or an INT8 program (.pte, .onnx)")
    parser.add_argument("inputs", nargs="+", help="HDF5 / .npy / image files with patches, or directories of "
                                                   "them (read at any depth, sorted by path)")
    parser.add_argument("--out", help="CSV file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="patches per forward (default 32: the fastest measured on a CPU, with little memory)")
    parser.add_argument("--normalizer", metavar="MODEL",
                        help="for a .pte or .onnx program: the model file or shipped model whose input normaliser "
                             "the program was made with")
    parser.add_argument("--tiles", action="store_true",
                        help="cut patches larger than the model's input into tiles (one line each) instead of "
                             "classifying their centre")
    add_memory_argument(parser)
    return parser


#: suffixes of the INT8 programs the command runs, and the loader of each (their runtimes: the deploy extra)
PROGRAM_LOADERS = {".pte": quant.load_executorch, ".onnx": quant.load_onnx}


def load_classifier(model: str, normalizer: str | None) -> tuple[torch.nn.Module, mobilenet.Normalizer, int]:
    """``(module, its input normaliser, input size)`` for the command's ``model`` argument: a model file or
    shipped name (its own normaliser; ``normalizer`` must be None), or an INT8 program file (``.pte``,
    ``.onnx``) with the normaliser of the model file or shipped model ``normalizer``. InputError naming the
    option at fault."""
    suffix = os.path.splitext(model)[1].lower()
    if suffix not in PROGRAM_LOADERS:
        if normalizer is not None:
            raise InputError(f"--normalizer: only for a .pte or .onnx program; {model} carries its own normaliser")
        loaded = mobilenet.load_or_pretrained(model)
        return loaded, loaded.normalizer, loaded.input_size
    if normalizer is None:
        sibling = os.path.join(os.path.dirname(model), "model.pt")
        hint = f" (beside it: --normalizer {sibling})" if os.path.isfile(sibling) else ""
        raise InputError(f"--normalizer: {model} is an INT8 program, which takes normalised input; name the model "
                         f"file or shipped model it was made from{hint}")
    source = mobilenet.load_or_pretrained(normalizer)
    if source.normalizer is None:
        raise InputError(f"--normalizer: {normalizer} holds no normaliser")
    try:
        program = PROGRAM_LOADERS[suffix](model)
    except ImportError as error:
        raise InputError(f"{model}: {error}") from None
    shape = program.input_shape
    if shape[-1] != source.input_size or shape[-2] != source.input_size:
        raise InputError(f"{model}: its input is {shape[-2]}x{shape[-1]}, but --normalizer {normalizer} is a model "
                         f"of {source.input_size}x{source.input_size} inputs; is it the program's model?")
    return program, source.normalizer, source.input_size


class _Batches:
    """Patches from any number of files gathered into batches of ``batch_size`` for the model (a directory of
    one-patch image files is not classified a patch at a time), their CSV lines written in input order."""

    def __init__(self, model, normalizer, input_size: int, batch_size: int, writer) -> None:
        self.model, self.normalizer, self.input_size = model, normalizer, input_size
        self.batch_size, self.writer = batch_size, writer
        self.lines: list[list] = []  # the leading columns of each pending patch's line
        self.images: list[torch.Tensor] = []  # (n, 3, s, s) uint8 or float 0-255 (mobilenet.as_images)
        self.pending = 0

    def add(self, lines: list[list], images: torch.Tensor) -> None:
        self.lines += lines
        self.images.append(images)
        self.pending += images.shape[0]
        if self.pending >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if all(part.dtype == torch.uint8 for part in self.images):
            images = torch.cat(self.images)
        else:  # float patches among them: all as float in [0, 1], what predict takes
            images = torch.cat([part.float() / 255 for part in self.images])
        probabilities = mobilenet.predict(self.model, images, batch_size=self.batch_size, normalizer=self.normalizer,
                                          input_size=self.input_size)
        for line, row in zip(self.lines, probabilities.tolist()):
            self.writer.writerow(line + [f"{row[-1]:.6f}", int(np.argmax(row))])
        self.lines, self.images, self.pending = [], [], 0


def _classify(path: str, args: argparse.Namespace, batches: _Batches) -> int:
    try:
        return _classify_file(path, args, batches)
    except InputError:
        raise
    except ValueError as error:  # mobilenet's input checks: name the file
        raise InputError(f"{path}: {error}") from None


def _classify_file(path: str, args: argparse.Namespace, batches: _Batches) -> int:
    size, count, noticed = batches.input_size, 0, False
    for patches in iter_patches(path, args.batch_size):
        height, width = patches.shape[1:3]
        if height < size or width < size:
            raise InputError(f"{path}: {height}x{width} pixels, the model needs at least {size}x{size}")
        if args.tiles:
            tiles, positions = mobilenet.tile_images(patches, size)
            batches.add([[path, count + image, top, left] for image, top, left in positions.tolist()],
                        mobilenet.as_images(tiles, size))  # uint8, or float 0-255 (checked in [0, 1] first)
        else:
            if max(height, width) > size + 1 and not noticed:  # 96x96 PCam patches lose one row and column
                print(f"note: {path}: {height}x{width} pixels, classified on the central {size}x{size} "
                      "(--tiles for one probability per tile)", file=sys.stderr)
                noticed = True
            batches.add([[path, count + index] for index in range(patches.shape[0])],
                        mobilenet.as_images(patches, size))
        count += patches.shape[0]
    return count


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_memory_argument(args)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size: expected >= 1, got {args.batch_size}")
        inputs = expand_inputs(args.inputs)
        if args.out:
            check_output_path(args.out, [args.model, *inputs] + ([args.normalizer] if args.normalizer else []))
        model, normalizer, input_size = load_classifier(args.model, args.normalizer)

        def write_csv(stream) -> int:  # line by line: memory does not grow with the inputs
            writer = csv.writer(stream)
            writer.writerow(["source", "index"] + (["top", "left"] if args.tiles else [])
                            + ["probability_tumour", "predicted"])
            batches = _Batches(model, normalizer, input_size, args.batch_size, writer)
            with torch.inference_mode():
                count = sum(_classify(path, args, batches) for path in inputs)
                batches.flush()
            return count

        if args.out:
            counted = []

            def write(handle) -> None:
                text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
                counted.append(write_csv(text))
                text.flush()
                text.detach()

            atomic_write(args.out, write)
            print(f"{counted[0]} patches classified; written to {args.out}", file=sys.stderr)
        else:
            write_csv(sys.stdout)  # a reader that stops early (`| head`): exit 141, quietly (benchmarks.exits)
    except (InputError, OutputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
