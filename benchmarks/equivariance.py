"""Equivariance errors, measured.

``python -m benchmarks.equivariance`` sweeps the rotation angle from 0 to 360 degrees (5-degree steps) and
measures, for each angle:

* every layer type (C_12, random weights, float64; each followed by max pooling over the rotations, which
  makes the output a stack of scalar maps that any rotation acts on): relative L2 error
  ``||P f(R x) - R P f(x)|| / ||R P f(x)||`` inside the central disc, on smooth disc-masked noise and on
  PCam-like patches; ``nn.Conv2d`` with random filters as the reference;
* the whole MobileNetV2, equivariant (C_12) and conventional, FP32 and INT8 (DFQ, this CPU's int8 kernels:
  x86, qnnpack on ARM; symmetric weights):
  relative change of the logits ``||f(R x) - f(x)|| / ||f(x)||`` and prediction stability (fraction of
  patches whose class is unchanged). Trained weights come from ``--runs`` (the checkpoints of
  ``python -m benchmarks.pcam``); without them the models have random weights and calibrated batch norms.

Writes JSON (``--out``) and, when matplotlib is installed (extra ``plot``), one PNG per curve family
(``--plots DIR``). ``--stack`` runs the e2cnn comparison test instead: a C_12 net (lifting k5 -> 4 fields,
BN, ReLU, k5, BN, ReLU, k3) on 65x65 Gaussian-smoothed noise, disc-masked, rotated by 30 degrees with cubic
interpolation; full-field relative L2 error inside the disc (e2cnn measures 6.6% at smoothing sigma 1 px and
2.7% at 2 px).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

import rotconv

from rotconv.files import atomic_write, write_json

from mobilenet.training import UsageError

from .common import check_outputs, untrained_but_generic
from .exits import command


def e2cnn_test_net(group: rotconv.CyclicGroup, seed: int, basis_options: dict | None = None) -> nn.Module:
    """The comparison network, random weights, eval mode, float64."""
    options = basis_options or {}
    b5 = rotconv.steerable_basis(5, **options.get(5, {}))
    b3 = rotconv.steerable_basis(3, **options.get(3, {}))
    torch.manual_seed(seed)
    return nn.Sequential(
        rotconv.LiftingConv2d(3, 4, 5, group, basis=b5), rotconv.GroupBatchNorm2d(4, group), nn.ReLU(),
        rotconv.GroupConv2d(4, 4, 5, group, basis=b5), rotconv.GroupBatchNorm2d(4, group), nn.ReLU(),
        rotconv.GroupConv2d(4, 4, 3, group, basis=b3),
    ).double().eval()


def stack_errors(sigmas=(1.0, 2.0), seeds=range(5), size: int = 65, element: int = 1) -> dict:
    """Mean and std over seeds (network weights and input) of the e2cnn-test error at ``element`` of C_12."""
    group = rotconv.CyclicGroup(12)
    results = {}
    for sigma in sigmas:
        errors = [rotconv.equivariance_error(e2cnn_test_net(group, seed), group,
                                             rotconv.smooth_noise(4, 3, size, sigma, seed), element)
                  for seed in seeds]
        results[f"sigma={sigma:g}"] = {"mean": float(np.mean(errors)), "std": float(np.std(errors)),
                                       "median": float(np.median(errors)), "errors": [float(e) for e in errors]}
    return results


# -- angle sweep -------------------------------------------------------------------------------------------
def angles_degrees(step: float) -> list[float]:
    count = int(round(360 / step))
    return [step * index for index in range(count + 1)]


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30)).item()


def layer_types(group: rotconv.CyclicGroup, seed: int) -> dict[str, nn.Module]:
    """Each layer type after a lifting layer (so its input is a regular field), then pooled over rotations."""
    torch.manual_seed(seed)
    pool = rotconv.GroupPool(group, "max")
    lift = lambda: rotconv.LiftingConv2d(3, 4, 5, group)  # noqa: E731
    return {
        "LiftingConv2d k5": nn.Sequential(lift(), pool),
        "+ GroupConv2d k1": nn.Sequential(lift(), nn.ReLU(), rotconv.GroupConv2d(4, 4, 1, group), pool),
        "+ GroupConv2d k3": nn.Sequential(lift(), nn.ReLU(), rotconv.GroupConv2d(4, 4, 3, group), pool),
        "+ GroupConv2d k5": nn.Sequential(lift(), nn.ReLU(), rotconv.GroupConv2d(4, 4, 5, group), pool),
        "+ DepthwiseGroupConv2d k3": nn.Sequential(lift(), nn.ReLU(), rotconv.DepthwiseGroupConv2d(4, 3, group), pool),
        "+ DepthwiseGroupConv2d k3 stride 2": nn.Sequential(lift(), nn.ReLU(),
                                                            rotconv.DepthwiseGroupConv2d(4, 3, group, stride=2), pool),
        "nn.Conv2d k5 (reference, not equivariant)": nn.Sequential(nn.Conv2d(3, 4, 5, padding=2)),
    }


@torch.no_grad()
def layer_sweep(inputs: dict[str, torch.Tensor], degrees: list[float], seed: int = 0, group: str = "C12") -> dict:
    """Relative error of every layer type per angle, for every input family (float64)."""
    group = rotconv.as_group(group)
    results: dict = {}
    for name, layer in layer_types(group, seed).items():
        layer = layer.double().eval()
        results[name] = {}
        for family, x in inputs.items():
            reference = layer(x)
            mask = rotconv.disc_mask(reference.shape[-2], reference.shape[-1], (reference.shape[-1] - 1) / 2 - 1,
                                     edge_width=0, dtype=x.dtype)
            errors = []
            for degree in degrees:
                angle = math.radians(degree)
                expected = rotconv.rotate_image(reference, angle) * mask
                errors.append(_relative(layer(rotconv.rotate_image(x, angle)) * mask, expected))
            results[name][family] = errors
    return results


def load_models(runs: str | None, images: torch.Tensor, seed: int = 0,
                groups: tuple[str, ...] = ("C12",)) -> tuple[dict[str, nn.Module], bool]:
    """Conventional and equivariant MobileNetV2s (one per group): best weights from ``runs`` where there, else
    random + calibrated BN."""
    import mobilenet

    models, trained = {}, True
    for name, group in [(g, rotconv.as_group(g)) for g in groups] + [("conventional", None)]:
        torch.manual_seed(seed)
        model = mobilenet.mobilenet_v2(group=group)
        path = os.path.join(runs, f"{name}-seed{seed}", "model.pt") if runs else None
        if path and os.path.exists(path):
            model = mobilenet.load(path)  # the best weights of the run (written by benchmarks.pcam)
        else:
            if runs:
                print(f"{path}: not found; using random weights", file=sys.stderr)
            trained = False
            untrained_but_generic(model, images)
        models[name] = model
    return models, trained


@torch.no_grad()
def model_sweep(models: dict[str, nn.Module], images: torch.Tensor, degrees: list[float], input_range) -> dict:
    """Logit error and prediction stability per angle for FP32 and INT8 versions of each model."""
    import quant

    results: dict = {}
    for name, model in models.items():
        plain = model.export().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = quant.dfq(plain, group=None if name == "conventional" else name, mode="int8",
                             input_range=input_range, weight_scheme="symmetric")
        for precision, network in (("FP32", model.eval()), ("INT8", int8)):
            reference = network(images)
            classes = reference.argmax(1)
            errors, stable = [], []
            for degree in degrees:
                logits = network(rotconv.rotate_image(images, math.radians(degree)))
                errors.append(_relative(logits, reference))
                stable.append((logits.argmax(1) == classes).float().mean().item())
            results[f"{name} {precision}"] = {"logit_error": errors, "stability": stable}
            print(f"  {name} {precision}: mean logit error {np.mean(errors):.4f}, "
                  f"mean stability {np.mean(stable):.3f}", file=sys.stderr)
    return results


def patch_inputs(count: int, data: str | None, seed: int = 0) -> tuple[torch.Tensor, str, tuple[float, float]]:
    """``count`` normalised 95x95 patches: the first of ``data``'s test split, else synthetic PCam-like ones."""
    from mobilenet.data import Normalizer, PCam
    from .synthetic import generate_patch

    if data:
        split = PCam(data, "test")
        images = split.read(np.arange(min(count, len(split))))
        source = f"{data} (test split)"
    else:
        rng = np.random.default_rng(seed)
        patches = np.stack([generate_patch(rng, bool(i % 2)) for i in range(count)])[:, :95, :95]
        images = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous()
        source = "synthetic PCam-like patches"
    pixels = images.float().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    normalizer = Normalizer(pixels.mean(1).tolist(), pixels.std(1).tolist())
    return normalizer(images), source, normalizer.value_range()


def plot(results: dict, directory: str) -> list[str]:
    """One PNG per curve family (needs matplotlib); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    degrees = results["degrees"]
    written = []
    figures = [(f"layers_{family}", f"layer error vs angle ({family})", "relative error",
                {name: curves[family] for name, curves in results["layers"].items()})
               for family in next(iter(results["layers"].values()))]
    figures.append(("models_logits", "MobileNetV2: relative change of the logits", "relative error",
                    {name: value["logit_error"] for name, value in results["models"].items()}))
    figures.append(("models_stability", "MobileNetV2: prediction stability", "fraction with unchanged class",
                    {name: value["stability"] for name, value in results["models"].items()}))
    for filename, title, ylabel, curves in figures:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for label, values in curves.items():
            axis.plot(degrees, values, label=label, marker=".")
        axis.set_xlabel("rotation angle (degrees)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.set_xticks(range(0, 361, 30))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(directory, filename.replace(" ", "_") + ".png")
        try:
            atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
        finally:
            plt.close(figure)
        written.append(path)
    return written


def sweep(step: float, patches: int, data: str | None, runs: str | None, groups: tuple[str, ...] = ("C12",)) -> dict:
    degrees = angles_degrees(step)
    images, source, input_range = patch_inputs(patches, data)
    smooth = rotconv.smooth_noise(4, 3, 33, 2.0, 0)
    centre = (images.shape[-1] - 33) // 2
    print("layers ...", file=sys.stderr)
    patches_label = "PCam patches" if data else "PCam-like patches (synthetic)"
    layers = layer_sweep({"smooth noise": smooth,
                          patches_label: (images[:4, :, centre:centre + 33, centre:centre + 33].double()
                                          * rotconv.disc_mask(33, 33, dtype=torch.float64))}, degrees, group=groups[0])
    print("models ...", file=sys.stderr)
    models, trained = load_models(runs, images, groups=groups)
    return {"degrees": degrees, "inputs": source, "trained_models": trained, "layers": layers, "groups": list(groups),
            "models": model_sweep(models, images, degrees, input_range)}


def format_sweep(results: dict) -> str:
    degrees = results["degrees"]
    group = (results.get("groups") or ["C12"])[0]
    shown = [d for d in (5, 30, 45, 90, 135, 180) if d in degrees]
    lines = [
        f"Inputs: {results['inputs']}; models "
        f"{'trained (from --runs)' if results['trained_models'] else 'with RANDOM weights'}.",
        "",
        f"| layer type ({group[0]}_{group[1:]}, float64) | input | "
        + " | ".join(f"{d:g}°" for d in shown)
        + " | mean |",
        "|---|---|" + "---|" * (len(shown) + 1),
    ]
    for name, families in results["layers"].items():
        for family, errors in families.items():
            values = [errors[degrees.index(d)] for d in shown]
            lines.append(f"| {name} | {family} | " + " | ".join(f"{100 * v:.2f}%" for v in values)
                         + f" | {100 * np.mean(errors):.2f}% |")
    lines += [
        "",
        "| MobileNetV2 | " + " | ".join(f"{d:g}°" for d in shown) + " | mean | stability (mean over angles) |",
        "|---|" + "---|" * (len(shown) + 2),
    ]
    for name, value in results["models"].items():
        errors = value["logit_error"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * errors[degrees.index(d)]:.2f}%" for d in shown)
                     + f" | {100 * np.mean(errors):.2f}% | {100 * np.mean(value['stability']):.1f}% |")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.equivariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", action="store_true", help="run the e2cnn comparison test instead of the sweep")
    parser.add_argument("--seeds", type=int, default=10, help="--stack: seeds to average over (default 10)")
    parser.add_argument("--step", type=float, default=5.0, help="angle step in degrees (default 5)")
    parser.add_argument("--patches", type=int, default=32, help="patches for the model sweep (default 32)")
    parser.add_argument("--quick", action="store_true", help="15-degree steps, 8 patches")
    parser.add_argument("--data", help="PCam directory: real test patches instead of synthetic ones")
    parser.add_argument("--runs", help="benchmarks.pcam checkpoint directory with trained models (e.g. runs/pcam)")
    parser.add_argument("--plots", help="directory for PNG plots (needs matplotlib)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--group", nargs="+", default=["C12"], help="group(s) of the equivariant models (C12 D12 ...)")
    args = parser.parse_args(argv)
    try:
        args.group = [str(rotconv.as_group(name)) for name in args.group]
    except ValueError as error:
        parser.error(f"--group: {error}")
    if args.seeds < 1:
        parser.error("--seeds: expected at least 1")
    if not 0 < args.step <= 360 or abs(360 / args.step - round(360 / args.step)) > 1e-9:
        parser.error(f"--step: expected a divisor of 360 degrees, got {args.step}")
    if args.patches < 1:
        parser.error("--patches: expected at least 1")
    if args.data and not os.path.isdir(args.data):
        parser.error(f"--data: {args.data} is not a directory")
    try:
        check_outputs(args.out, None if args.stack else args.plots)
    except UsageError as error:
        parser.error(str(error))
    results = {}
    if not args.stack:
        step, patches = (15.0, 8) if args.quick else (args.step, args.patches)
        results = sweep(step, patches, args.data, args.runs, tuple(args.group))
        results["table"] = format_sweep(results)
        print(results["table"])
        if args.plots:
            print("plots: " + ", ".join(plot(results, args.plots)))
    if args.stack:
        results["e2cnn_test_30deg"] = stack_errors(seeds=range(args.seeds))
        print(f"| smoothing | rotconv error at 30 deg, mean +- std ({args.seeds} seeds) | median | e2cnn |")
        print("|---|---|---|---|")
        for (key, value), reference in zip(results["e2cnn_test_30deg"].items(), ("6.6%", "2.7%")):
            print(f"| {key} px | {100 * value['mean']:.2f}% +- {100 * value['std']:.2f}% | "
                  f"{100 * value['median']:.2f}% | {reference} |")
    if args.out:
        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
