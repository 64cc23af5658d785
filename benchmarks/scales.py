"""Per-layer scales of the conventional and the C_N-equivariant MobileNetV2: why do they train differently?

For each model, at initialisation and again after ``--steps`` optimizer steps (Adam, D4 augmentation, the
trainer's step), on one fixed batch of training patches:

- activation RMS of every convolution's output (before its batch norm) and of the logits,
- RMS of the *expanded* filter (what the convolution applies; for rotconv layers the filter bank built from
  the coefficients) and of the loss gradient with respect to it,
- the relative filter change of one Adam step, ``||delta filter|| / ||filter||``: Adam moves every *parameter*
  by about ``lr`` whatever its gradient's scale, so how far a step moves the *filter* depends on the
  parametrisation (a plain weight is one filter entry; a rotconv coefficient moves a whole rotated bank).
  Measured as ``lr * expand(sign(gradient))`` (Adam's first step exactly; later steps have the same size).

Layers are grouped by kind (stem 3x3, expand 1x1, depthwise 3x3, project 1x1, last 1x1, classifier), averaged
within a kind. Reads only the train split.

    python -m benchmarks.scales                                   # synthetic data (a smoke run)
    python -m benchmarks.scales --data DIR --steps 94             # one pass over 3,000 patches at batch 32
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mobilenet
import rotconv
from rotconv.files import check_writable
from mobilenet.data import Normalizer, PCam, augment_batch
from mobilenet.training import UsageError, training_step

from . import pcam
from .common import add_memory_argument, initialize_rotconv_layers, report
from .synthetic import write_synthetic_pcam
from .exits import command

__all__ = ["main", "layer_scales", "format_scales", "KINDS"]

KINDS = ("stem 3x3", "expand 1x1", "depthwise 3x3", "project 1x1", "last 1x1", "classifier")


def _filter(module: nn.Module) -> torch.Tensor:
    return module.expand_filter() if isinstance(module, rotconv.SteerableConv2d) else module.weight


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every convolution and linear layer, in order."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, rotconv.SteerableConv2d, nn.Linear))]
    convolutions = [i for i, (_, module) in enumerate(found) if not isinstance(module, nn.Linear)]
    layers = []
    for i, (name, module) in enumerate(found):
        if isinstance(module, nn.Linear):
            kind = "classifier"
        else:
            out_channels, in_per_group, k = _filter(module).shape[:3]
            if i == convolutions[0]:
                kind = "stem 3x3"
            elif k > 1:
                kind = "depthwise 3x3"
            elif i == convolutions[-1]:
                kind = "last 1x1"
            else:
                kind = "expand 1x1" if out_channels > in_per_group else "project 1x1"
        layers.append((name, module, kind))
    return layers


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().pow(2).mean().sqrt())


def layer_scales(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, lr: float) -> list[dict]:
    """One forward/backward on ``inputs`` in train mode (batch statistics): per layer the activation, filter
    and filter-gradient RMS and the relative filter change of an Adam step of size ``lr``."""
    layers = _layers(model)
    activations: dict[str, float] = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: activations.__setitem__(name, _rms(o)))
               for name, module, _ in layers]
    filters = {}
    for name, module, _ in layers:
        if isinstance(module, rotconv.SteerableConv2d):  # keep the expanded bank to read its gradient
            filters[name] = module.expand_filter()
            filters[name].retain_grad()
    model.train()
    model.zero_grad(set_to_none=True)
    try:  # the forward uses the kept banks (an instance attribute shadows the method for this one pass)
        for name, module, _ in layers:
            if name in filters:
                module.expand_filter = lambda memory_format=None, name=name: filters[name]
        F.cross_entropy(model(inputs), labels).backward()
    finally:
        for name, module, _ in layers:
            if name in filters:
                del module.expand_filter
        for handle in handles:
            handle.remove()
    rows = []
    for name, module, kind in layers:
        weight = filters.get(name, module.weight)
        with torch.no_grad():
            step = torch.sign(module.weight.grad) * lr
            if isinstance(module, rotconv.SteerableConv2d):
                saved = module.weight.clone()
                module.weight.copy_(step)
                change = module.expand_filter().clone()
                module.weight.copy_(saved)
            else:
                change = step
        rows.append({"layer": name, "kind": kind, "parameters": module.weight.numel(),
                     "filter_entries": weight.numel(), "activation_rms": activations[name],
                     "filter_rms": _rms(weight), "gradient_rms": _rms(weight.grad),
                     "adam_relative_change": float(change.double().norm() / weight.detach().double().norm())})
    model.zero_grad(set_to_none=True)
    return rows


def by_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each figure over the layers of each kind (geometric mean for the RMS figures)."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["kind"]].append(row)
    summary = {}
    for kind in KINDS:
        if kind in grouped:
            chosen = grouped[kind]
            summary[kind] = {key: float(np.exp(np.mean([math.log(max(r[key], 1e-30)) for r in chosen])))
                             for key in ("activation_rms", "filter_rms", "gradient_rms", "adam_relative_change")}
            summary[kind]["layers"] = len(chosen)
    return summary


def format_scales(results: dict) -> str:
    """Markdown: one table per model, rows = layer kinds, columns = figures at init and after training."""
    lines = []
    if results["synthetic"]:
        lines.append("**SYNTHETIC DATA**: pass --data for real patches.")
    lines.append(f"rotconv layers initialised Kaiming {results['init']}. "
                 f"Batch of {results['batch_size']} training patches; Adam lr {results['lr']:g}; 'after' = after "
                 f"{results['steps']} training steps. Geometric means over the layers of each kind.")
    for name, stages in results["models"].items():
        lines += ["", f"**{pcam.model_label(name)}**", "",
                  "| layers | n | activation RMS init / after | filter RMS init / after | gradient RMS init / after "
                  "| Adam step / filter init / after |", "|---|---|---|---|---|---|"]
        init, after = by_kind(stages["init"]), by_kind(stages["after"])
        for kind in init:
            cells = [f"{init[kind][key]:.3g} / {after[kind][key]:.3g}"
                     for key in ("activation_rms", "filter_rms", "gradient_rms", "adam_relative_change")]
            lines.append(f"| {kind} | {init[kind]['layers']} | " + " | ".join(cells) + " |")
        lines.append(f"\nlogit RMS init / after: {stages['logits']['init']:.3g} / {stages['logits']['after']:.3g}; "
                     f"training loss over the last 10 steps: {stages['final_loss']:.3f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scales", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory with the PCam HDF5 files (default: synthetic data)")
    parser.add_argument("--group", nargs="+", help="group(s) of the equivariant model(s) (default C12)")
    parser.add_argument("--steps", type=int, default=94, help="training steps between the two measurements (94)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for training and the step size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=("fan_in", "fan_out"), default="fan_in",
                        help="Kaiming mode of the rotconv layers: fan_in (mobilenet_v2's default) or fan_out "
                             "(torchvision's rule, the conventional model's filter scale)")
    parser.add_argument("--precision", choices=mobilenet.training.PRECISIONS, default="auto")
    add_memory_argument(parser)
    parser.add_argument("--out", help="JSON file with every layer's figures")
    parser.add_argument("--synthetic-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rotconv",
                                                                "synthetic-pcam"))
    return parser


def run(args: argparse.Namespace) -> dict:
    for option in ("steps", "batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')}", f"expected an integer >= 1, got {getattr(args, option)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError("--lr", f"expected a finite positive number, got {args.lr}")
    if args.seed < 0:
        raise UsageError("--seed", f"expected an integer >= 0, got {args.seed}")
    groups = pcam.parse_groups(args.group)
    if args.out:
        check_writable(args.out)
    synthetic = args.data is None
    directory = args.synthetic_dir if synthetic else args.data
    if synthetic:
        write_synthetic_pcam(directory, {"train": 256, "valid": 64, "test": 64})
    train = PCam(directory, "train")
    normalizer = Normalizer.fit(train)
    precision = mobilenet.training.resolve_precision(args.precision, "cpu")
    rng = np.random.default_rng(args.seed)
    probe = rng.choice(len(train), min(args.batch_size, len(train)), replace=False)
    probe_inputs, probe_labels = normalizer(train.read(np.sort(probe))), train.labels[np.sort(probe)].long()
    results = {"synthetic": synthetic, "data": "synthetic PCam-like" if synthetic else directory, "lr": args.lr,
               "init": args.init,
               "steps": args.steps, "batch_size": args.batch_size, "precision": precision, "models": {}}
    for name in ["conventional", *groups]:
        torch.manual_seed(args.seed)
        model = initialize_rotconv_layers(mobilenet.mobilenet_v2(group=pcam.group_of(name)), args.init)
        stages = {"init": layer_scales(model, probe_inputs, probe_labels, args.lr)}
        logits = {"init": _rms(model.eval()(probe_inputs))}
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        losses, generator = [], torch.Generator().manual_seed(args.seed)
        model.train()
        for step in range(args.steps):
            positions = np.sort(rng.choice(len(train), args.batch_size, replace=False))
            images = augment_batch(train.read(positions), torch.randint(0, 4, (args.batch_size,), generator=generator),
                                   torch.randint(0, 2, (args.batch_size,), generator=generator).bool())
            loss, _ = training_step(model, optimizer, normalizer(images), train.labels[positions].long(), precision)
            losses.append(float(loss.detach()))
            if (step + 1) % 20 == 0 or step + 1 == args.steps:
                print(f"{name}: step {step + 1}/{args.steps} loss {np.mean(losses[-20:]):.4f}", flush=True)
        stages["after"] = layer_scales(model, probe_inputs, probe_labels, args.lr)
        logits["after"] = _rms(model.eval()(probe_inputs))
        results["models"][name] = {**stages, "logits": logits, "final_loss": float(np.mean(losses[-10:]))}
    results["table"] = format_scales(results)
    report(results, args.out)
    if args.out:
        print(f"\nresults written to {args.out}")
    return results


@command
def main(argv: list[str] | None = None) -> int:
    return pcam.exit_code(run, _parser().parse_args(argv), "")


if __name__ == "__main__":
    sys.exit(main())
