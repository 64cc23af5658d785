"""Where a data-free INT8 model's answers part from the float model's: weight rounding (per tensor, as the INT8
models quantize, or per output channel), bias correction, and activation quantization, each alone.

    python -m benchmarks.int8_error --data DATA/pcam-20k --model pcam-c12            # validation split
    python -m benchmarks.int8_error --data DATA/pcam-20k --model runs/C12-seed0/model.pt --patches 1000
    python -m benchmarks.int8_error --data DATA/pcam-20k --model pcam-conventional --pte   # + the .pte programs

Every variant runs in float arithmetic on the same patches (weights rounded to signed 8 bits and back; the last
line is ``quant``'s simulation of the whole INT8 model, which its integer programs follow to within one step):

    float                       the trained model (the reference)
    dfq float                   after DFQ's float steps (BN folded, equalized, high biases absorbed, biases
                                corrected for per-tensor rounding): the correction moves the float function
    weights/tensor + correction DFQ's float steps, then weights rounded per tensor
    weights/tensor              the same without bias correction
    weights/channel             weights rounded per output channel, without bias correction
    int8 (simulated)            the whole data-free INT8 model (per-tensor weights, 8-bit activations)
    .pte, weights/tensor        with --pte: the ExecuTorch program of quant.to_executorch (the deployed model)
    .pte, weights/channel       the same with per_channel_weights=True

For each: accuracy, the patches whose class differs from the float model's, and the root-mean-square and largest
logit change (the RMS says how far a variant moves the logits overall; the class changes count only the patches
near the decision boundary, so a few dozen of them move with chance as well as with the size of the error).
The validation split is the default (the test split is for final figures). Exit code 2 for a bad model, data
directory or argument.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

import mobilenet
import quant
from mobilenet.data import PCamError, open_pcam
from rotconv.files import OutputError, check_writable, write_json

from .exits import command

__all__ = ["round_weights", "variants", "compare", "format_rows", "main"]

def round_weights(model: nn.Module, per_channel: bool = False) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights are rounded to the symmetric signed 8-bit grid of their
    whole tensor (scale max|W| / 127) or, with ``per_channel``, of each output channel: the rounding of
    :func:`quant.fake_quantize_weight`, which the INT8 models and bias correction use."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(quant.fake_quantize_weight(module.weight, 8, "symmetric", per_channel))
    return model


def variants(model: mobilenet.MobileNetV2, backend: str = "qnnpack", pte_directory: str | None = None
             ) -> dict[str, nn.Module]:
    """The float model and its partly quantized versions (see the module docstring), by name; with
    ``pte_directory`` also its two ExecuTorch programs (written there; needs the ``deploy`` extra)."""
    exported = model.export().eval()
    group = model.group
    uncorrected = quant.prepare(exported, group=group, bias_correction=False)
    corrected = quant.correct_bias(uncorrected)  # a corrected copy: prepare(bias_correction=True), folded once
    int8 = quant.quantize(corrected, mode="simulated", backend=backend,
                          input_range=model.normalizer.value_range())
    found = {
        "float": exported,
        "dfq float": corrected,
        "weights/tensor + correction": round_weights(corrected),
        "weights/tensor": round_weights(uncorrected),
        "weights/channel": round_weights(uncorrected, per_channel=True),
        "int8 (simulated)": int8,
    }
    if pte_directory is not None:
        for label, per_channel in (("tensor", False), ("channel", True)):
            path = quant.to_executorch(exported, os.path.join(pte_directory, f"weights-{label}.pte"), group=group,
                                       example_batch=50, input_range=model.normalizer.value_range(),
                                       per_channel_weights=per_channel)
            found[f".pte, weights/{label}"] = quant.load_executorch(path)
    return found


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def compare(models: dict[str, nn.Module], x: torch.Tensor, labels: torch.Tensor, batch_size: int = 250,
            reference: str = "float", log=print) -> list[dict]:
    """One row per model: accuracy, class changes against ``models[reference]``, RMS and largest logit change.
    ``x``: normalised (B, 3, H, W); ``labels``: (B,)."""
    logits = {}
    for index, (name, model) in enumerate(models.items()):
        logits[name] = _logits(model, x, batch_size)
        log(f"{name}: {index + 1}/{len(models)} variants evaluated", file=sys.stderr)
    base = logits[reference]
    rows = []
    for name, out in logits.items():
        changed = int((out.argmax(1) != base.argmax(1)).sum())
        rows.append({"variant": name, "accuracy": float((out.argmax(1) == labels).float().mean()),
                     "changed": changed, "changed_share": changed / len(labels),
                     "rms_logit_change": float((out - base).square().mean().sqrt()),
                     "max_logit_change": float((out - base).abs().max())})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| variant | accuracy (%) | class changed (patches, %) | RMS logit change | largest logit change |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {100 * row['accuracy']:.2f} | {row['changed']} "
                     f"({100 * row['changed_share']:.2f} %) | {row['rms_logit_change']:.4f} | "
                     f"{row['max_logit_change']:.3f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model file (model.pt) or a shipped model's name")
    parser.add_argument("--data", required=True, help="PCam directory (HDF5 or image folders)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--patches", type=int, help="a class-balanced subset of this many (default: the split)")
    parser.add_argument("--backend", choices=quant.BACKENDS, default="qnnpack",
                        help="INT8 arithmetic simulated (qnnpack: 8-bit activations, as the .pte; x86: 7-bit)")
    parser.add_argument("--pte", action="store_true",
                        help="also the ExecuTorch programs, per-tensor and per-channel weights (deploy extra)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.patches is not None and args.patches < 2:
            raise ValueError(f"--patches: expected >= 2, got {args.patches}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: expected >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.out:
            check_writable(args.out)  # before any work
        model = mobilenet.load_or_pretrained(args.model)
        split = open_pcam(args.data, limits={args.split: args.patches}, splits=(args.split,))[args.split]
        images, labels = split.batch(np.arange(len(split)))
        x = model.normalizer(images)
        with tempfile.TemporaryDirectory() as directory:
            rows = compare(variants(model, args.backend, directory if args.pte else None), x, labels)
        print(format_rows(rows))
        if args.out:
            write_json({"model": args.model, "split": args.split, "patches": len(labels),
                        "backend": args.backend, "rows": rows}, args.out)
    except (PCamError, OutputError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
