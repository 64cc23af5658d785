"""Accuracy under arbitrary rotation: each test patch rotated by its own random angle, FP32 and INT8.

    python -m benchmarks.rotation --data DIR --runs runs/efficiency [--results results/efficiency] [--angles K]
    python -m benchmarks.rotation --data DIR --runs runs/efficiency --split valid --controls

The situation of a slide scanned, or a phone held, at any angle. Every test patch is normalised, rotated
by an angle drawn uniformly from [0, 360) degrees (one fixed seed: the same angles for every model;
bicubic interpolation, :func:`rotconv.rotate_image`) and seen through a circular field of view (outside the
inscribed disc the input is 0, the training mean). The upright reference is the same patches through the
same disc, unrotated, so the drop measures the rotation alone. With ``--angles K`` (default 4) every patch
is seen at K independent angles and the rotated accuracy is the mean over them: a model whose answers
change with the angle then shows its expected drop rather than one draw of it (the first set of angles is
the one a single-angle evaluation uses). ``consistent`` is the share of patches given the same class upright
and at all K angles; ``consistent_across_angles`` the same among the K rotated inputs only (all of them
resampled, unlike the upright one).

``--controls`` adds, for the FP32 model, the share of patches classed as upright after changes that are not
a rotation to an arbitrary angle: a one-pixel shift (whole pixels, nothing resampled), a 2-degree turn, and a
turn by the first random angle and back (resampled twice, no net turn); and after a turn by the first angle
plus 90 degrees, against the first angle alone. They tell which part of a class change under random angles is
the angle and which is where the image falls on the pixel and stride grid. ``--split valid`` measures on the
validation patches instead (``rotation-valid.json``; not added to result files, which hold test figures).

For every run directory under ``--runs`` with a ``model.pt`` (written by ``benchmarks.pcam`` and
``benchmarks.efficiency``): FP32 accuracy upright and rotated, and the same for the INT8 ExecuTorch program
kept beside it (``model.pte``) where there is one. Writes ``rotation.json`` into each run directory and,
with ``--results``, adds the figures (key ``random_rotation``) to the run's result file there, unless that
file is another run of the same name (its model, size, seed, steps or test accuracy differ from the run
directory's ``result.json``: said, left unchanged). A run whose ``rotation.json`` is newer than its model files
and was made with the same angle seed, patch count and angles is not evaluated again (``--again``
re-evaluates every run), so the figures grow run by run as the study does.
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
from mobilenet.training import Progress, UsageError
from rotconv.files import write_json

from . import pcam
from .exits import command

__all__ = ["rotated_inputs", "control_inputs", "predictions", "rotation_figures", "evaluate_run",
           "current_figures", "other_run", "figures_file", "angle_count", "main"]


def rotated_inputs(images: torch.Tensor, normalizer: mobilenet.Normalizer, seed: int = 0,
                   rotate: bool = True, draw: int = 0) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> normalised float inputs, each rotated by its own angle (uniform in [0, 2 pi),
    drawn with ``seed``; ``rotate=False``: upright) and masked to the inscribed disc. ``draw`` k takes the
    (k+1)-th set of N angles of the seed's sequence, so that draws 0..K-1 are K independent angles per patch."""
    x = normalizer(images)
    if rotate:
        x = _turned(x, _random_angles(seed, images.shape[0], draw))
    return x * rotconv.disc_mask(x.shape[-2], x.shape[-1], edge_width=0)


def _random_angles(seed: int, count: int, draw: int = 0) -> np.ndarray:
    """The ``draw``-th set of ``count`` angles (radians, uniform in [0, 2 pi)) of ``seed``'s sequence."""
    return np.random.default_rng(seed).uniform(0, 2 * math.pi, (draw + 1) * count)[draw * count:]


def _turned(x: torch.Tensor, angles) -> torch.Tensor:
    """``(N, C, H, W)`` -> each image turned by its own angle (radians, bicubic about the centre pixel)."""
    return torch.stack([rotconv.rotate_image(patch, float(angle)) for patch, angle in zip(x, angles)])


@torch.no_grad()
def control_inputs(images: torch.Tensor, normalizer: mobilenet.Normalizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """The inputs of ``--controls`` (each normalised and masked to the inscribed disc): ``shift_1px`` (one
    pixel to the right, whole pixels), ``turn_2deg`` (every patch turned by 2 degrees), ``turned_back`` (turned
    by its first random angle of ``seed``, then back) and ``turn_plus_90`` (its first random angle + 90 degrees)."""
    count = images.shape[0]
    angles = _random_angles(seed, count)
    x = normalizer(images)
    disc = rotconv.disc_mask(x.shape[-2], x.shape[-1], edge_width=0)
    return {"shift_1px": torch.roll(x, 1, dims=-1) * disc, "turn_2deg": _turned(x, [math.radians(2)] * count) * disc,
            "turned_back": _turned(_turned(x, angles) * disc, -angles) * disc,
            "turn_plus_90": _turned(x, angles + math.pi / 2) * disc}


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch: int = mobilenet.CPU_BATCH_SIZE) -> torch.Tensor:
    """``(N, ...)`` inputs -> ``(N,)`` predicted classes, ``batch`` at a time."""
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def rotation_figures(upright: torch.Tensor, rotated: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """Predicted classes upright ``(N,)`` and at each of K angle sets (K tensors ``(N,)``) -> upright accuracy,
    rotated accuracy (mean over the K sets, and per set), drop (upright - rotated), the share of patches whose
    class is the same upright and at one angle (per set) and at every angle, and (K > 1) the share whose class
    is the same at every angle, the upright input left out: every rotated input is resampled, the upright one
    is not, so the gap between the two shares is what resampling alone changes."""
    at_angles = torch.stack(rotated)
    upright_accuracy = float((upright == labels).float().mean())
    rotated_accuracy = float((at_angles == labels).float().mean())
    return {"upright": upright_accuracy, "rotated": rotated_accuracy, "drop": upright_accuracy - rotated_accuracy,
            "consistent": float((at_angles == upright).all(0).float().mean()),
            "consistent_across_angles": float((at_angles == at_angles[0]).all(0).float().mean())
            if len(rotated) > 1 else None,
            "rotated_per_angle_set": [float((at == labels).float().mean()) for at in at_angles],
            "same_class_per_angle_set": [float((at == upright).float().mean()) for at in at_angles]}


def evaluate_run(run_dir: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, angles: int = 4,
                 controls: bool = False) -> dict:
    """FP32 (and INT8 .pte, where kept) accuracy of the run's model, upright and at ``angles`` random angles
    per patch (:func:`rotation_figures`); with ``controls``, the FP32 model's same-class shares under
    :func:`control_inputs` (``turn_plus_90`` against the first angle set, the others against upright)."""
    model = mobilenet.load(os.path.join(run_dir, "model.pt"))
    models = {"fp32": (model, mobilenet.CPU_BATCH_SIZE)}
    program = os.path.join(run_dir, "model.pte")
    if os.path.isfile(program):
        int8 = quant.load_executorch(program)
        models["int8"] = (int8, int8.input_shape[0])  # the program's own batch: a smaller one is padded to it
    progress = Progress((angles + 1) * len(models), f"{os.path.basename(run_dir)}: upright and {angles} angle sets")
    upright = rotated_inputs(images, model.normalizer, seed, rotate=False)
    classes = {}
    for kind, (network, batch) in models.items():
        classes[kind] = (predictions(network, upright, batch), [])
        progress.update()
    for draw in range(angles):
        rotated = rotated_inputs(images, model.normalizer, seed, draw=draw)
        for kind, (network, batch) in models.items():
            classes[kind][1].append(predictions(network, rotated, batch))
            progress.update()
    result = {"seed": seed, "patches": int(images.shape[0]), "angles": angles}
    for kind, (at_upright, at_angles) in classes.items():
        result[kind] = rotation_figures(at_upright, at_angles, labels)
    if controls:
        at_upright, at_angles = classes["fp32"]
        same = {}
        for name, x in control_inputs(images, model.normalizer, seed).items():
            reference = at_angles[0] if name == "turn_plus_90" else at_upright
            same[name] = float((predictions(model, x) == reference).float().mean())
        result["fp32"]["controls"] = same
    return result


def current_figures(run_dir: str, seed: int, patches: int, angles: int = 4, split: str = "test",
                    controls: bool = False) -> dict | None:
    """The run's figures file for ``split`` (:func:`figures_file`) if it is newer than ``model.pt`` (and
    ``model.pte``), was made with this angle seed, patch count and number of angles per patch (files without
    one: 1) and has the controls where asked for, else None (absent, stale or unreadable: evaluated again)."""
    path = os.path.join(run_dir, figures_file(split))
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
    if not isinstance(figures, dict) or (figures.get("seed"), figures.get("patches"), angle_count(figures)) != (
            seed, patches, angles) or (controls and "controls" not in figures.get("fp32", {})):
        return None
    if os.path.isfile(models[1]) != ("int8" in figures):
        return None
    return figures


#: what makes two result files the same run (the run directory's name leaves out the step budget)
RUN_KEYS = ("model", "size", "seed", "steps", "fp32_accuracy")


def other_run(run_dir: str, record: dict) -> str | None:
    """Why the result file ``record`` is not the run in ``run_dir`` (its ``result.json`` differs in one of
    :data:`RUN_KEYS`), or None where they agree or the run directory keeps no result.json."""
    path = os.path.join(run_dir, "result.json")
    try:
        with open(path) as handle:
            own = json.load(handle)
    except (OSError, ValueError):
        return None
    differing = [f"{key} {record.get(key)!r} there, {own.get(key)!r} in {path}" for key in RUN_KEYS
                 if key in own and record.get(key) != own.get(key)]
    return "another run of the same name (" + "; ".join(differing) + ")" if differing else None


def figures_file(split: str) -> str:
    """``rotation.json`` for the test split, ``rotation-<split>.json`` for another."""
    return "rotation.json" if split == "test" else f"rotation-{split}.json"


def angle_count(figures: dict) -> int:
    """Angles per patch of a ``rotation.json`` (figures written before there was a choice had one)."""
    return figures.get("angles", 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rotation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="PCam directory (HDF5 or image folders)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the patches to measure on (default test; valid: rotation-valid.json, no --results)")
    parser.add_argument("--controls", action="store_true",
                        help="also the FP32 same-class shares under a 1-pixel shift, a 2-degree turn, a turn and back")
    parser.add_argument("--runs", required=True, help="directory of run directories (each with model.pt)")
    parser.add_argument("--results", help="result files (benchmarks.efficiency --results) to add the figures to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the angles (default 0)")
    parser.add_argument("--angles", type=int, default=4,
                        help="random angles per patch; the rotated accuracy is their mean (default 4)")
    parser.add_argument("--patches", "--test-size", dest="test_size", type=int,
                        help="patches of the split, a class-balanced subset (default: all)")
    parser.add_argument("--again", action="store_true",
                        help="evaluate every run, also those whose rotation.json is up to date")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.angles < 1:
        raise UsageError("--angles", f"must be at least 1, got {args.angles}")
    if args.split != "test" and args.results:
        raise UsageError("--results", "result files hold test figures; leave it out with --split valid")
    if not os.path.isdir(args.runs):
        raise UsageError("--runs", f"{args.runs}: not a directory")
    runs = sorted(name for name in os.listdir(args.runs)
                  if os.path.isfile(os.path.join(args.runs, name, "model.pt")))
    if not runs:
        raise UsageError("--runs", f"{args.runs}: no run directory with a model.pt")
    split = open_pcam(args.data, {args.split: args.test_size}, splits=(args.split,))[args.split]
    images, labels = split.batch(np.arange(len(split)))
    table = {}
    for name in runs:
        run_dir = os.path.join(args.runs, name)
        result = None if args.again else current_figures(run_dir, args.seed, int(images.shape[0]), args.angles,
                                                         args.split, args.controls)
        print(f"== {name}{' (up to date, kept)' if result else ''} ==", flush=True)
        if result is None:
            result = evaluate_run(run_dir, images, labels, args.seed, args.angles, args.controls)
            write_json(result, os.path.join(run_dir, figures_file(args.split)))
        kept = os.path.join(args.results, name + ".json") if args.results else None
        if kept and os.path.isfile(kept):
            with open(kept) as handle:
                record = json.load(handle)
            other = other_run(run_dir, record)
            if other:
                print(f"  not added to {kept}: {other}", flush=True)
            else:
                record["random_rotation"] = result
                write_json(record, kept)
        table[name] = result
        print("  " + "; ".join(_summary_line(kind, f) for kind, f in result.items() if isinstance(f, dict)),
              flush=True)
    return table


def _summary_line(kind: str, figures: dict) -> str:
    line = f"{kind} upright {100 * figures['upright']:.2f}%, rotated {100 * figures['rotated']:.2f}%"
    if "consistent" in figures:
        line += f", same class upright and at every angle {100 * figures['consistent']:.1f}%"
    if figures.get("consistent_across_angles") is not None:
        line += f", at every angle {100 * figures['consistent_across_angles']:.1f}%"
    for name, share in figures.get("controls", {}).items():
        line += f"; same class, {name.replace('_', ' ')}: {100 * share:.1f}%"
    return line


@command
def main(argv: list[str] | None = None) -> int:
    return pcam.exit_code(run, _parser().parse_args(argv), "figures of finished runs are kept")


if __name__ == "__main__":
    sys.exit(main())
