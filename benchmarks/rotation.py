"""Accuracy under arbitrary rotation: each test patch rotated by its own random angle, FP32 and INT8.

    python -m benchmarks.rotation --data DIR --runs runs/efficiency [--results results/efficiency]

The situation of a slide scanned, or a phone held, at any angle. Every test patch is normalised, rotated
by an angle drawn uniformly from [0, 360) degrees (one fixed seed: the same angles for every model;
bicubic interpolation, :func:`rotconv.rotate_image`) and seen through a circular field of view (outside the
inscribed disc the input is 0, the training mean). The upright reference is the same patches through the
same disc, unrotated, so the drop measures the rotation alone.

For every run directory under ``--runs`` with a ``model.pt`` (written by ``benchmarks.pcam`` and
``benchmarks.efficiency``): FP32 accuracy upright and rotated, and the same for the INT8 ExecuTorch program
kept beside it (``model.pte``) where there is one. Writes ``rotation.json`` into each run directory and,
with ``--results``, adds the figures (key ``random_rotation``) to the run's result file there. A run whose
``rotation.json`` is newer than its model files and was made with the same angle seed and patch count is
not evaluated again (``--again`` re-evaluates every run), so the figures grow run by run as the study does.
Exit code 2 for bad arguments or data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import mobilenet
import quant
import rotconv
from mobilenet.data import open_pcam
from mobilenet.training import UsageError
from rotconv.files import write_json

from . import pcam

__all__ = ["rotated_inputs", "accuracy", "evaluate_run", "current_figures", "main"]


def rotated_inputs(images: torch.Tensor, normalizer: mobilenet.Normalizer, seed: int = 0,
                   rotate: bool = True) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> normalised float inputs, each rotated by its own angle (uniform in [0, 2 pi),
    drawn with ``seed``; ``rotate=False``: upright) and masked to the inscribed disc."""
    angles = np.random.default_rng(seed).uniform(0, 2 * math.pi, images.shape[0])
    x = normalizer(images)
    if rotate:
        x = torch.stack([rotconv.rotate_image(patch, float(angle)) for patch, angle in zip(x, angles)])
    return x * rotconv.disc_mask(x.shape[-2], x.shape[-1], edge_width=0)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    predicted = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])
    return float((predicted == labels).float().mean())


def evaluate_run(run_dir: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """FP32 (and INT8 .pte, where kept) accuracy of the run's model, upright and randomly rotated."""
    model = mobilenet.load(os.path.join(run_dir, "model.pt"))
    upright = rotated_inputs(images, model.normalizer, seed, rotate=False)
    rotated = rotated_inputs(images, model.normalizer, seed)
    result = {"seed": seed, "patches": int(images.shape[0]), "fp32": {
        "upright": accuracy(model, upright, labels), "rotated": accuracy(model, rotated, labels)}}
    program = os.path.join(run_dir, "model.pte")
    if os.path.isfile(program):
        int8 = quant.load_executorch(program)
        result["int8"] = {"upright": accuracy(int8, upright, labels, 1), "rotated": accuracy(int8, rotated, labels, 1)}
    for figures in (result["fp32"], result.get("int8")):
        if figures:
            figures["drop"] = figures["upright"] - figures["rotated"]
    return result


def current_figures(run_dir: str, seed: int, patches: int) -> dict | None:
    """The run's ``rotation.json`` if it is newer than ``model.pt`` (and ``model.pte``) and was made with this
    angle seed and patch count, else None (absent, stale or unreadable: the run is evaluated again)."""
    path = os.path.join(run_dir, "rotation.json")
    if not os.path.isfile(path):
        return None
    models = [os.path.join(run_dir, name) for name in ("model.pt", "model.pte")]
    if any(os.path.isfile(model) and os.path.getmtime(model) > os.path.getmtime(path) for model in models):
        return None
    try:
        with open(path) as handle:
            figures = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(figures, dict) or figures.get("seed") != seed or figures.get("patches") != patches:
        return None
    if os.path.isfile(models[1]) != ("int8" in figures):
        return None
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rotation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="PCam directory (HDF5 or image folders); its test split")
    parser.add_argument("--runs", required=True, help="directory of run directories (each with model.pt)")
    parser.add_argument("--results", help="result files (benchmarks.efficiency --results) to add the figures to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the angles (default 0)")
    parser.add_argument("--test-size", type=int, help="test patches (default: all)")
    parser.add_argument("--again", action="store_true",
                        help="evaluate every run, also those whose rotation.json is up to date")
    return parser


def run(args: argparse.Namespace) -> dict:
    if not os.path.isdir(args.runs):
        raise UsageError("--runs", f"{args.runs}: not a directory")
    runs = sorted(name for name in os.listdir(args.runs)
                  if os.path.isfile(os.path.join(args.runs, name, "model.pt")))
    if not runs:
        raise UsageError("--runs", f"{args.runs}: no run directory with a model.pt")
    test = open_pcam(args.data, {"test": args.test_size}, splits=("test",))["test"]
    images, labels = test.batch(np.arange(len(test)))
    table = {}
    for name in runs:
        run_dir = os.path.join(args.runs, name)
        result = None if args.again else current_figures(run_dir, args.seed, int(images.shape[0]))
        print(f"== {name}{' (up to date, kept)' if result else ''} ==", flush=True)
        if result is None:
            result = evaluate_run(run_dir, images, labels, args.seed)
            write_json(result, os.path.join(run_dir, "rotation.json"))
        kept = os.path.join(args.results, name + ".json") if args.results else None
        if kept and os.path.isfile(kept):
            with open(kept) as handle:
                record = json.load(handle)
            record["random_rotation"] = result
            write_json(record, kept)
        table[name] = result
        print("  " + "; ".join(f"{kind} upright {100 * f['upright']:.2f}%, rotated {100 * f['rotated']:.2f}%"
                               for kind, f in result.items() if isinstance(f, dict)), flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    return pcam.exit_code(run, _parser().parse_args(argv), "figures of finished runs are kept")


if __name__ == "__main__":
    sys.exit(main())
