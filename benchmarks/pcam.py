"""Reproduce Table 1 of Mohamed et al.: conventional vs C_N-equivariant MobileNetV2 on PatchCamelyon, FP32 and
INT8 (data-free quantization on real int8 kernels).

For every model and seed: train (D4 augmentation), keep the weights with the lowest validation loss,
measure FP32 test accuracy, export to plain torch.nn, quantize with DFQ (field-shared equalization for
the equivariant model) on int8 CPU kernels, measure INT8 test accuracy, and the stability of predictions
under rotation (same class for all 4 rotations by 90 degrees / all 12 by 30 degrees). Prints a Markdown
table beside the paper's figures and writes JSON.

    python -m benchmarks.pcam                                   # quick profile on SYNTHETIC data
    python -m benchmarks.pcam --data /path/to/pcam             # quick profile on real PCam files
    python -m benchmarks.pcam --data /path/to/pcam --profile medium   # the studied recipe, 3 seeds
    python -m benchmarks.pcam --data DIR --profile paper --device cuda
    python -m benchmarks.pcam --data IMAGE_FOLDERS --convert-to DIR   # image-folder PCam -> official HDF5
    torchrun --nproc_per_node 4 -m benchmarks.pcam --data DIR --profile paper --device cuda

Without --data a seeded synthetic PCam-like set is generated (data cannot be downloaded here); every table
made from it says so. Exit code 2 for bad arguments or bad data files.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv

from mobilenet.training import Distributed
from mobilenet.data import Normalizer, PCam, PCamError, convert_to_hdf5, data_fingerprint, open_pcam
from mobilenet import training
from mobilenet.training import PRECISIONS, DivergedError, Progress, TrainConfig, UsageError, resolve_precision, train

from rotconv.files import OutputError, RunLock, check_writable, write_json

from .common import add_memory_argument, apply_memory_argument, serialized_bytes
from .synthetic import DEFAULT_SIZES, write_synthetic_pcam
from .exits import command

__all__ = ["main", "PAPER", "PROFILES", "format_table", "mean_std", "percent", "model_label"]

#: Test accuracy (%) in the paper: mean, std over runs.
PAPER = {
    "conventional": {"fp32": (84.67, 1.91), "int8": (84.32, 1.76)},
    "equivariant": {"fp32": (89.19, 0.79), "int8": (88.94, 0.66)},
    "p4m_densenet": {"fp32": (89.8, None)},
}

PROFILES = {
    # 2 CPU cores, both models, one seed: under 10 minutes on an AVX2-only CPU too (docs/experiments.md)
    "quick": {"train_size": 768, "valid_size": 256, "test_size": 512, "epochs": 4, "batch_size": 32,
              "lr": 3e-3, "stability_samples": 64, "seeds": [0], "simulated_int8": False},
    # the recipe of docs/training.md's validation study (3,000 patches, ~750 steps, lr 3e-3): ~10 min per seed
    "medium": {"train_size": 3000, "valid_size": 512, "test_size": 1024, "epochs": 8, "batch_size": 32,
               "lr": 3e-3, "stability_samples": 192, "seeds": [0, 1, 2], "simulated_int8": False},
    # the paper's setting: full PCam (262,144 / 32,768 / 32,768), for a GPU
    "paper": {"train_size": None, "valid_size": None, "test_size": None, "epochs": 300, "batch_size": 128,
              "lr": 1e-3, "stability_samples": None, "seeds": [0, 1, 2, 3, 4], "simulated_int8": True},
}
MODELS = ("conventional", "equivariant")  # --models; "equivariant" means one model per --group
#: --stain-jitter default (benchmarks.pcam and benchmarks.efficiency): selected on the validation split, 3 seeds,
#: 3,000 patches: +2.3 points for the conventional model, level for C_12 (docs/training.md section 8)
STAIN_JITTER = training.STAIN_JITTER  # the library's default for uint8 RGB patches
GROUP_POOL_MODES = rotconv.GroupPool.MODES  # --group-pool: the invariant readout of the equivariant models


def model_names(models: list[str], groups: list[str]) -> list[str]:
    """Result keys of the models a run trains: "conventional" and the name of each group (e.g. "C12")."""
    return (["conventional"] if "conventional" in models else []) + (list(groups) if "equivariant" in models else [])


def group_of(name: str) -> rotconv.Group | None:
    """The group of the model called ``name`` (None for the conventional one)."""
    return None if name == "conventional" else rotconv.as_group(name)


def paper_figures(name: str) -> dict:
    """The paper's figures for the model called ``name`` (it reports the conventional model and C_12)."""
    return PAPER["conventional"] if name == "conventional" else PAPER["equivariant"] if name == "C12" else {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pcam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory with the official PCam HDF5 files (default: synthetic data)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="default settings (quick)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--group", nargs="+", help="group(s) of the equivariant model(s): C4 C8 C12 D4 D8 D12 ... "
                                                   "(default C12); one model is trained per group")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (profile: quick 0; medium 0-2; paper 0-4)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    parser.add_argument("--lr", type=float, help="peak learning rate (quick and medium 3e-3, paper 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--no-augment", action="store_true", help="no random 90-degree rotations and flips")
    parser.add_argument("--stain-jitter", type=float, default=STAIN_JITTER, metavar="SIGMA",
                        help=f"H&E stain augmentation strength (default {STAIN_JITTER}, chosen on the validation "
                             "split: docs/training.md section 8; 0 = off)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="training precision: auto (default) = bf16 autocast where the device has native "
                             "bf16 (AVX512-BF16/AMX, CUDA), else fp32; bf16; fp32")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="train in channels_last memory layout (default: on; faster on CPU and GPU)")
    add_memory_argument(parser)
    parser.add_argument("--train-size", type=int, help="balanced random subset of the train split")
    parser.add_argument("--valid-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--stability-samples", type=int, help="test patches used for rotation stability")
    add_model_arguments(parser, width_default=1.0)
    parser.add_argument("--backend", choices=("x86", "qnnpack"), default=quant.default_backend(),
                        help="torch.ao int8 engine (default: this CPU's, %(default)s; qnnpack on ARM)")
    parser.add_argument("--int8-backend", choices=INT8_BACKENDS, default="auto",
                        help="where the INT8 model runs: an ExecuTorch XNNPACK program (RUNS/<model>-seed<k>/"
                             "model.pte), an ONNX QDQ file in onnxruntime (RUNS/<model>-seed<k>/model.onnx), both "
                             "from rotconv[deploy], or torch.ao's int8 kernels in this process; auto (default): "
                             "executorch where rotconv[deploy] is installed, else torch-ao (docs/quantization.md)")
    parser.add_argument("--weight-scheme", choices=quant.WEIGHT_SCHEMES, default=quant.WEIGHT_SCHEME_DEFAULT,
                        help="INT8 per-tensor weights: symmetric (default: fbgemm's fast depthwise kernels, "
                             "bit-exact rotations on x86) or asymmetric (DFQ's choice)")
    parser.add_argument("--relu6", choices=quant.RELU6_MODES, default=RELU6_DEFAULT,
                        help=f"DFQ with ReLU6: keep it (its clip is the top of the int8 range; no equalization "
                             f"across it) or replace it by ReLU and equalize (the DFQ paper); default "
                             f"{RELU6_DEFAULT}, chosen on the validation split (docs/quantization.md)")
    parser.add_argument("--simulated-int8", action=argparse.BooleanOptionalAction,
                        help="also measure simulated INT8 accuracy (default: paper profile only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0,
                        help="background processes that read and augment the next training batches (0)")
    parser.add_argument("--runs", default=os.path.join("runs", "pcam"), help="checkpoint directory (runs/pcam)")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --runs after the last epoch")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints already in --runs (without it, a fresh run refuses to); "
                             "with --convert-to, the .h5 files already in DIR")
    parser.add_argument("--convert-to", metavar="DIR",
                        help="write the image-folder PCam of --data to DIR in the official HDF5 layout, and stop")
    parser.add_argument("--out", help="JSON results file (default: RUNS/results.json)")
    parser.add_argument("--synthetic-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rotconv",
                                                                "synthetic-pcam"),
                        help="where the synthetic data set is generated and kept")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, width_default: float | None) -> None:
    """The model options benchmarks.pcam and benchmarks.efficiency share (checked by
    :func:`check_shared_arguments`); ``width_default`` None lets the caller's profile choose."""
    parser.add_argument("--width-mult", type=float, default=width_default, help="MobileNetV2 width multiplier (1.0)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier (0.2)")
    parser.add_argument("--group-pool", choices=GROUP_POOL_MODES, default="max",
                        help="invariant readout of the equivariant models: max over each field's rotations (the "
                             "paper's), mean, or sort (every order statistic; mobilenet_v2(group_pool=...); "
                             "benchmarks.efficiency's run dirs end -<mode> when not max)")
    parser.add_argument("--min-fields", type=int, default=1, metavar="K",
                        help="the fewest regular fields of any equivariant layer (default 1: round(c / N) as the "
                             "paper; mobilenet_v2(min_fields=...); benchmarks.efficiency's run dirs end -min<K> when "
                             "not 1)")
    parser.add_argument("--depthwise", choices=mobilenet.DEPTHWISE_MODES, default="channel",
                        help="spatial conv of the equivariant blocks: channel (default, MobileNetV2's FLOPs) or field "
                             "(each field's channels mixed by a regular filter: |G| x the depthwise MACs; "
                             "mobilenet_v2(depthwise=...); benchmarks.efficiency's run dirs end -dwfield)")
    parser.add_argument("--antialias", action="store_true",
                        help="blur before every stride-2 layer, both models (a binomial low-pass folded into the "
                             "strided 3x3 filters, which become 5x5; mobilenet_v2(antialias=True); "
                             "benchmarks.efficiency's run dirs end -aa)")
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="STEPS",
                        help="linear learning-rate warm-up over the first STEPS steps (default 0; "
                             "benchmarks.efficiency's run dirs end -warm<STEPS>)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                        help="label smoothing of the training loss (default 0; selection stays on plain validation "
                             "cross-entropy; benchmarks.efficiency's run dirs end -ls<EPS>)")
    parser.add_argument("--patience", type=int, metavar="EPOCHS",
                        help="early stopping: end a run after EPOCHS evaluations without a lower validation loss "
                             "(default: none; the schedule stays planned over all epochs; benchmarks.efficiency's "
                             "run dirs end -pat<EPOCHS>)")


def check_shared_arguments(args: argparse.Namespace, width_mult: float) -> None:
    """Validate the options both benchmarks take (the model options of :func:`add_model_arguments`,
    ``--threads``, ``--resume``/``--overwrite``) before any work: a :class:`UsageError` names the option."""
    for name, value in (("width-mult", width_mult), ("dropout", args.dropout)):
        if not math.isfinite(value):
            raise UsageError(f"--{name}", f"expected a finite number, got {value}")
    if not 0 <= args.dropout < 1:
        raise UsageError("--dropout", f"expected a probability in [0, 1), got {args.dropout}")
    if width_mult <= 0:
        raise UsageError("--width-mult", f"expected a positive number, got {width_mult}")
    if args.min_fields < 1:
        raise UsageError("--min-fields", f"expected an integer >= 1, got {args.min_fields}")
    if args.warmup_steps < 0:
        raise UsageError("--warmup-steps", f"expected an integer >= 0, got {args.warmup_steps}")
    if not (math.isfinite(args.label_smoothing) and 0 <= args.label_smoothing < 1):
        raise UsageError("--label-smoothing", f"expected a number in [0, 1), got {args.label_smoothing}")
    if args.patience is not None and args.patience < 1:
        raise UsageError("--patience", f"expected an integer >= 1, got {args.patience}")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads", f"expected >= 1, got {args.threads}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite", "choose one (continue the runs, or replace them)")


def _settings(args: argparse.Namespace) -> dict:
    """Profile defaults overridden by the given options; validated (UsageError names the option)."""
    profile = dict(PROFILES[args.profile])
    for key in ("train_size", "valid_size", "test_size", "epochs", "batch_size", "lr", "stability_samples", "seeds",
                "simulated_int8"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    for key in ("train_size", "valid_size", "test_size", "stability_samples", "epochs", "batch_size"):
        if profile[key] is not None and profile[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')}", f"expected a positive count, got {profile[key]}")
    if any(seed < 0 for seed in profile["seeds"]):
        raise UsageError("--seeds", f"expected integers >= 0, got {profile['seeds']}")
    repeated = sorted({seed for seed in profile["seeds"] if profile["seeds"].count(seed) > 1})
    if repeated:
        raise UsageError("--seeds", f"seed {repeated[0]} is given twice; each seed is one sample of the mean ± std")
    check_shared_arguments(args, args.width_mult)
    profile["groups"] = parse_groups(args.group)
    args.int8_backend = resolve_int8_backend(args.int8_backend)
    check_int8_engine_option(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda is not available on this machine")
    if args.workers < 0:
        raise UsageError("--workers", f"expected >= 0, got {args.workers}")
    config = TrainConfig(epochs=profile["epochs"], batch_size=profile["batch_size"], lr=profile["lr"],
                         weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
                         augment=not args.no_augment, stain_jitter=args.stain_jitter, precision=args.precision,
                         channels_last=args.channels_last, warmup_steps=args.warmup_steps,
                         label_smoothing=args.label_smoothing, patience=args.patience)
    config.validate()  # a UsageError naming config.<field>; main() shows it as the option
    return {**profile, "config": config}


def parse_groups(names: list[str] | None) -> list[str]:
    """Validated group names (``--group``; default C12), duplicates dropped."""
    if names is None:
        names = ["C12"]
    groups = []
    for name in names:
        try:
            group = rotconv.as_group(name)
        except ValueError:
            raise UsageError("--group", f"expected names such as C4, C12, D4, D12, got {name!r}") from None
        if str(group) not in groups:
            groups.append(str(group))
    return groups


def build_model(name: str, args: argparse.Namespace, seed: int) -> mobilenet.MobileNetV2:
    torch.manual_seed(seed)
    group = group_of(name)
    antialias = getattr(args, "antialias", False)
    if group is None:  # the conventional model has no group to pool over and no fields
        return mobilenet.mobilenet_v2(width_mult=args.width_mult, dropout=args.dropout, antialias=antialias)
    return mobilenet.mobilenet_v2(group=group, width_mult=args.width_mult, dropout=args.dropout,
                                  group_pool=args.group_pool, min_fields=args.min_fields,
                                  depthwise=getattr(args, "depthwise", "channel"), antialias=antialias)


def model_label(name: str) -> str:
    if name == "conventional":
        return "MobileNetV2"
    group = rotconv.as_group(name)
    return f"MobileNetV2, {str(group)[0]}_{group.N}-equivariant"


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def predictions(model: nn.Module, split: PCam, normalizer: Normalizer, count: int, angles: list[float],
                batch_size: int, device: str, description: str) -> np.ndarray:
    """Predicted classes ``(len(angles), count)`` of the first ``count`` patches, each input rotated by every
    angle (radians; multiples of 90 degrees exact, others bicubic about the centre pixel)."""
    model.eval()
    result = np.empty((len(angles), count), dtype=np.int64)
    progress = Progress(math.ceil(count / batch_size) * len(angles), description)
    for start in range(0, count, batch_size):
        images, _ = split.batch(np.arange(start, min(start + batch_size, count)))
        x = normalizer(images).to(device)
        for index, angle in enumerate(angles):
            logits = model(rotconv.rotate_image(x, angle) if angle else x)
            result[index, start:start + len(images)] = logits.argmax(1).cpu().numpy()
            progress.update()
    return result


def accuracy(model: nn.Module, split: PCam, normalizer: Normalizer, batch_size: int, device: str,
             description: str) -> tuple[float, str | None]:
    """Accuracy on ``split`` and, for a degenerate model, why it is one (else None)."""
    value, why, _ = scored(model, split, normalizer, batch_size, device, description)
    return value, why


def scored(model: nn.Module, split: PCam, normalizer: Normalizer, batch_size: int, device: str,
           description: str) -> tuple[float, str | None, np.ndarray]:
    """:func:`accuracy` and the predicted classes ``(len(split),)`` it was computed from."""
    predicted = predictions(model, split, normalizer, len(split), [0.0], batch_size, device, description)[0]
    labels = split.labels.numpy()
    value = float((predicted == labels).mean())
    return value, degenerate(predicted, labels, value), predicted


#: A model within this many accuracy points of always answering the majority class is flagged.
CHANCE_MARGIN = 0.02


def degenerate(predicted: np.ndarray, labels: np.ndarray, accuracy_value: float) -> str | None:
    """Why a model's predictions carry no information (one class for every patch, or accuracy within
    CHANCE_MARGIN of the majority-class rate), else None. Rotation stability means nothing for such a model."""
    classes = np.unique(predicted)
    if classes.size == 1:
        return f"predicts class {int(classes[0])} for every patch"
    chance = max(float((labels == c).mean()) for c in np.unique(labels))
    if accuracy_value <= chance + CHANCE_MARGIN:
        return (f"accuracy {100 * accuracy_value:.1f}% is within {100 * CHANCE_MARGIN:.0f} points of chance "
                f"({100 * chance:.1f}%)")
    return None


def stability(model: nn.Module, split: PCam, normalizer: Normalizer, count: int, batch_size: int,
              device: str, description: str) -> dict[str, float]:
    """Fractions of the first ``count`` patches whose predicted class is the same under all 4 rotations by 90
    degrees ("90") and all 12 by 30 degrees ("30"), and that are *correct* under all of them ("correct_90",
    "correct_30"): stability alone would call a one-class model perfect."""
    angles = [2 * math.pi * k / 12 for k in range(12)]
    predicted = predictions(model, split, normalizer, count, angles, batch_size, device, description)
    labels = split.labels[:count].numpy()
    quarter = predicted[::3]  # 0, 90, 180, 270 degrees
    return {
        "90": float((quarter == quarter[:1]).all(0).mean()),
        "30": float((predicted == predicted[:1]).all(0).mean()),
        "correct_90": float((quarter == labels).all(0).mean()),
        "correct_30": float((predicted == labels).all(0).mean()),
    }


# --int8-backend values that write a deployable file: (exporter, loader, file name, table label, report wording)
DEPLOY_BACKENDS = {
    "executorch": (
        quant.to_executorch,
        quant.load_executorch,
        "model.pte",
        "ExecuTorch XNNPACK",
        "an ExecuTorch XNNPACK program (.pte).",
    ),
    "onnx": (
        quant.to_onnx,
        quant.load_onnx,
        "model.onnx",
        "onnxruntime QDQ",
        "an ONNX QDQ file in onnxruntime (.onnx).",
    ),
}


INT8_BACKENDS = ("auto", "executorch", "onnx", "torch-ao")
#: quant.prepare(relu6=...) for the INT8 models of the benchmarks
RELU6_DEFAULT = quant.RELU6_DEFAULT


def resolve_int8_backend(choice: str, log=print) -> str:
    """``--int8-backend auto``: the ExecuTorch program where the optional extra is installed (faster than
    torch.ao, 8-bit activations, bit-exact quarter turns at every batch size), else torch.ao with a notice."""
    if choice != "auto":
        return choice
    if quant.default_int8_runtime() == "executorch":
        return "executorch"
    log("notice: --int8-backend auto: executorch is not installed (pip install 'rotconv[deploy]'); INT8 runs on "
        "torch.ao's int8 kernels in this process")
    return "torch-ao"


def check_int8_engine_option(args: argparse.Namespace) -> None:
    """Where INT8 runs on torch.ao (``--int8-backend torch-ao``, as resolved), ``--backend`` must be an engine
    torch offers here (no x86 engine on ARM or on x86 CPUs without AVX2): refused before any training."""
    unavailable = quant.int8_engine_unavailable(args.backend) if args.int8_backend == "torch-ao" else None
    if unavailable:
        raise UsageError("--backend", unavailable)


def _int8_model(name: str, plain: nn.Module, normalizer: Normalizer, args: argparse.Namespace, batch: int,
                artifact_dir: str | None) -> tuple[nn.Module, int, str]:
    """The INT8 model on the chosen backend, its serialised size and a label."""
    options = {"group": group_of(name), "input_range": normalizer.value_range(),
               "relu6": args.relu6}
    backend = args.int8_backend
    if backend in DEPLOY_BACKENDS:
        export, load, file_name, label, _ = DEPLOY_BACKENDS[backend]
        directory = artifact_dir or tempfile.mkdtemp(prefix=f"rotconv-{backend}-")
        path = export(plain, os.path.join(directory, file_name), example_batch=batch, **options)
        return load(path), os.path.getsize(path), label
    int8 = quant.dfq(plain, mode="int8", backend=args.backend, weight_scheme=args.weight_scheme, **options)
    return int8, serialized_bytes(int8), args.backend


def evaluate(name: str, model: mobilenet.MobileNetV2, splits: dict[str, PCam], normalizer: Normalizer,
             args: argparse.Namespace, settings: dict, log, artifact_dir: str | None = None) -> dict:
    """FP32 and INT8 test accuracy, rotation stability, size and cost of a trained model."""
    device = args.device
    batch = 128 if device.startswith("cuda") else mobilenet.CPU_BATCH_SIZE  # 1.8x faster on a CPU than 128
    test = splits["test"]
    count = min(settings["stability_samples"] or len(test), len(test))
    model.eval()
    fp32_accuracy, fp32_degenerate, fp32_classes = scored(model, test, normalizer, batch, device, "test FP32")
    fp32_stability = stability(model, test, normalizer, count, batch, device, "rotation stability FP32")
    plain = model.export().cpu()
    options = {"group": group_of(name), "backend": args.backend, "input_range": normalizer.value_range(),
               "weight_scheme": args.weight_scheme, "relu6": args.relu6}
    if args.int8_backend in DEPLOY_BACKENDS:  # the export is ~20 s of graph passes with nothing else to show
        log(f"INT8: data-free quantization, lowering to {DEPLOY_BACKENDS[args.int8_backend][3]} ...")
    int8, int8_bytes, int8_label = _int8_model(name, plain, normalizer, args, batch, artifact_dir)
    int8_accuracy, int8_degenerate, int8_classes = scored(int8, test, normalizer, batch, "cpu",
                                                          f"test INT8 ({int8_label})")
    agreement = float((int8_classes == fp32_classes).mean())
    simulated_accuracy = None
    if settings["simulated_int8"]:
        simulated = quant.dfq(plain, mode="simulated", **options)
        simulated_accuracy = accuracy(simulated, test, normalizer, batch, "cpu", "test INT8 (simulated)")[0]
    int8_stability = stability(int8, test, normalizer, count, batch, "cpu", "rotation stability INT8")
    counts = mobilenet.summary(model.cpu())
    model.to(device)
    log(f"{name}: test FP32 {100 * fp32_accuracy:.2f}% INT8 {100 * int8_accuracy:.2f}% "
        f"(same class as FP32 on {100 * agreement:.1f}%)"
        + (f" (simulated {100 * simulated_accuracy:.2f}%)" if simulated_accuracy is not None else "")
        + (f"; DEGENERATE: {fp32_degenerate}" if fp32_degenerate else ""))
    return {
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "int8_simulated_accuracy": simulated_accuracy,
        "int8_agreement": agreement,
        "relative_drop": (fp32_accuracy - int8_accuracy) / fp32_accuracy if fp32_accuracy else 0.0,
        "params": counts.params,
        "exported_params": counts.exported_params,
        "macs": counts.macs,
        "fp32_bytes": serialized_bytes(plain),
        "int8_bytes": int8_bytes,
        "stability": {"fp32": fp32_stability, "int8": int8_stability, "samples": count},
        "degenerate": {"fp32": fp32_degenerate, "int8": int8_degenerate},
    }


# -- report ------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
            "n": int(array.size)}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for name in dict.fromkeys(run["model"] for run in runs):
        chosen = [run for run in runs if run["model"] == name]
        if not chosen:
            continue
        summary[name] = {key: mean_std([run[key] for run in chosen])
                         for key in ("fp32_accuracy", "int8_accuracy", "relative_drop")}
        if all(run["int8_simulated_accuracy"] is not None for run in chosen):
            summary[name]["int8_simulated_accuracy"] = mean_std([run["int8_simulated_accuracy"] for run in chosen])
        for precision in ("fp32", "int8"):
            for angle in ("90", "30", "correct_90", "correct_30"):
                summary[name][f"stability_{angle}_{precision}"] = mean_std(
                    [run["stability"][precision][angle] for run in chosen])
        summary[name]["degenerate_runs"] = [f"seed {run['seed']} {precision}: {run['degenerate'][precision]}"
                                            for run in chosen for precision in ("fp32", "int8")
                                            if run["degenerate"][precision]]
        for key in ("params", "exported_params", "macs", "fp32_bytes", "int8_bytes"):
            summary[name][key] = chosen[0][key]
    return summary


def percent(stats: dict) -> str:
    value = 100 * stats["mean"]
    text = f"{0.0 if round(value, 2) == 0 else value:.2f}"  # a mean that rounds to zero has no sign
    return text + (f" ± {100 * stats['std']:.2f}" if stats["n"] > 1 else "")


def _paper(values: tuple[float, float | None] | None) -> str:
    if values is None:
        return "—"
    mean, std = values
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _int8_scheme(settings: dict) -> str:
    return "symmetric" if settings.get("int8_backend") in DEPLOY_BACKENDS else settings["weight_scheme"]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_table(results: dict) -> str:
    """The Markdown report of a results dict (as written to JSON)."""
    summary = results["summary"]
    seeds = results["settings"]["seeds"]
    lines = []
    if results["synthetic"]:
        lines.append("**SYNTHETIC DATA** (procedurally generated PCam-like patches, not tissue): these figures say "
                     "nothing about PCam; pass --data for real files.")
    sizes = results["data_sizes"]
    backend = results["settings"].get("int8_backend")
    runtime = (DEPLOY_BACKENDS[backend][4] if backend in DEPLOY_BACKENDS
               else f"{results['settings']['backend']} int8 kernels.")
    lines.append(f"Data: {results['data']} (train {sizes['train']:,} / valid {sizes['valid']:,} / test "
                 f"{sizes['test']:,} patches); {_count(results['settings']['epochs'], 'epoch')}; seeds {seeds}; "
                 f"INT8: DFQ, {_int8_scheme(results['settings'])} per-tensor weights, on "
                 + runtime)
    lines.append("")
    lines.append("| model | FP32 test acc (%) | INT8 test acc (%) | relative drop (%) | paper FP32 | paper INT8 "
                 "| params | MACs | INT8 size | stable 4x90° FP32 / INT8 (%) | correct under 4x90° FP32 / INT8 (%) "
                 "| stable 12x30° FP32 / INT8 (%) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    flagged = []
    for name, stats in summary.items():
        label = model_label(name)
        if stats.get("degenerate_runs"):
            label += " **(degenerate runs, see below)**"
            flagged += [f"{model_label(name)}, {text}" for text in stats["degenerate_runs"]]
        lines.append(
            f"| {label} | {percent(stats['fp32_accuracy'])} | "
            f"{percent(stats['int8_accuracy'])} | {percent(stats['relative_drop'])} | "
            f"{_paper(paper_figures(name).get('fp32'))} | {_paper(paper_figures(name).get('int8'))} | "
            f"{stats['params']:,} | "
            f"{stats['macs'] / 1e6:.1f} M | {stats['int8_bytes'] / 2**20:.2f} MiB "
            f"({stats['fp32_bytes'] / stats['int8_bytes']:.1f}x smaller) | "
            f"{percent(stats['stability_90_fp32'])} / {percent(stats['stability_90_int8'])} | "
            f"{percent(stats['stability_correct_90_fp32'])} / {percent(stats['stability_correct_90_int8'])} | "
            f"{percent(stats['stability_30_fp32'])} / {percent(stats['stability_30_int8'])} |"
        )
    lines.append(f"| P4M DenseNet (Veeling et al., paper only) | — | — | — | {_paper(PAPER['p4m_densenet']['fp32'])} "
                 "| — | — | — | — | — | — | — |")
    if flagged:
        lines.append("")
        lines.append("**Degenerate models** (their rotation stability means nothing): " + "; ".join(flagged) + ".")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict | None:
    """Validate the arguments and the outputs, take the run directory's lock, then train and evaluate (or,
    with --convert-to, only convert the data)."""
    if args.convert_to is not None:
        return convert(args)
    settings = _settings(args)
    processes = Distributed.from_environment(args.device)
    if not processes.main:
        return _run(args, settings, processes)
    out = args.out or os.path.join(args.runs, "results.json")
    check_writable(out)  # before hours of training, not after
    with RunLock(args.runs):
        return _run(args, settings, processes)


def convert(args: argparse.Namespace) -> dict:
    """``--convert-to``: the image-folder PCam of ``--data`` written in the official HDF5 layout."""
    if args.data is None:
        raise UsageError("--convert-to", "needs --data, the image-folder PCam to convert")
    progress: dict[str, Progress] = {}

    def show(split: str, done: int, total: int) -> None:
        bar = progress.setdefault(split, Progress(total, f"converting {split}"))
        bar.update(done - bar.count)

    try:
        written = convert_to_hdf5(args.data, args.convert_to, overwrite=args.overwrite, progress=show)
    except PCamError:
        raise  # names the data file; exit 2 as it is
    except ValueError as error:  # the target directory is the source folder
        raise UsageError("--convert-to", str(error).removeprefix("directory: ")) from None
    print(f"wrote {', '.join(f'{split} {count:,}' for split, count in written.items())} patches to "
          f"{args.convert_to} (official HDF5 layout)")
    return written


def _open_data(args: argparse.Namespace, settings: dict, processes: Distributed, log) -> tuple[dict, str, bool]:
    """The three splits (the synthetic set generated first when no --data is given), the data's label for the
    report, and whether it is synthetic."""
    synthetic = args.data is None
    directory = args.synthetic_dir if synthetic else args.data
    if synthetic:
        if processes.main:
            log(f"no --data: generating the SYNTHETIC PCam-like set in {directory} (kept for later runs)")
            sizes = {split: max(DEFAULT_SIZES[split], settings.get(f"{split}_size") or 0) for split in DEFAULT_SIZES}
            progress: dict[str, Progress] = {}

            def show(split: str, done: int, total: int) -> None:
                progress.setdefault(split, Progress(total, f"synthetic {split}")).update()

            write_synthetic_pcam(directory, sizes, progress=show)
        processes.barrier()
    splits = open_pcam(directory, {s: settings[f"{s}_size"] for s in ("train", "valid", "test")})
    for split, chosen in splits.items():
        asked = settings[f"{split}_size"]
        if asked is not None and asked > len(chosen):
            log(f"note: --{split}-size {asked:,}: the {split} split has {len(chosen):,} patches; all are used")
    label = "synthetic PCam-like (benchmarks.synthetic)" if synthetic else directory
    return {"splits": splits, "directory": directory}, label, synthetic


def _train_one(name: str, seed: int, data: dict, normalizer: Normalizer, args: argparse.Namespace,
               settings: dict, processes: Distributed, device: str, log) -> dict | None:
    """Train one model and seed; on rank 0 write its model file and return its evaluation."""
    splits = data["splits"]
    run_dir = os.path.join(args.runs, f"{name}-seed{seed}")
    config = replace(settings["config"], seed=seed)
    identity = {"model": name, "width_mult": args.width_mult,
                "dropout": args.dropout, "data": data["fingerprint"],  # content, not path, identifies a run
                "sizes": {s: len(splits[s]) for s in splits}, "normalizer": normalizer.state()}
    if name != "conventional" and args.group_pool != "max":  # (the key is absent from runs made before it existed)
        identity["group_pool"] = args.group_pool
    if name != "conventional" and args.min_fields != 1:  # (likewise)
        identity["min_fields"] = args.min_fields
    if name != "conventional" and args.depthwise != "channel":  # (likewise)
        identity["depthwise"] = args.depthwise
    if args.antialias:  # (likewise)
        identity["antialias"] = True
    log(f"== {model_label(name)}, seed {seed} ==")
    started = time.time()
    trained = train(build_model(name, args, seed), splits["train"], splits["valid"], config, run_dir,
                    preprocess=normalizer, resume=args.resume, overwrite=args.overwrite, device=device,
                    processes=processes, identity=identity, log=log, workers=args.workers)
    train_seconds = time.time() - started
    if not processes.main:
        return None
    best = build_model(name, args, seed)
    best.load_state_dict(trained["best_state"])
    model_file = os.path.join(run_dir, "model.pt")  # what inference needs: mobilenet.load(model_file)
    mobilenet.save(best, model_file, normalizer, metadata={"model": name, "seed": seed,
                                                           "best_epoch": trained["best_epoch"]})
    log(f"model written to {model_file}")
    result = evaluate(name, best.to(device), splits, normalizer, args, settings, log, artifact_dir=run_dir)
    return {"model": name, "seed": seed, **result, "best_epoch": trained["best_epoch"],
            "best_valid_loss": trained["best_valid_loss"], "history": trained["history"],
            "stopped_epoch": trained["stopped_epoch"],
            "train_seconds": train_seconds}


def _report(args: argparse.Namespace, settings: dict, data: dict, label: str, synthetic: bool, runs: list[dict],
            processes: Distributed) -> dict:
    config: TrainConfig = settings["config"]
    splits = data["splits"]
    results = {
        "synthetic": synthetic,
        "data": label,
        "data_sizes": {split: len(splits[split]) for split in splits},
        "profile": args.profile,
        "settings": {"groups": settings["groups"], "seeds": settings["seeds"], "epochs": config.epochs,
                     "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
                     "optimizer": config.optimizer, "schedule": config.schedule, "augment": config.augment,
                     "precision": resolve_precision(config.precision, args.device, lambda *a, **k: None),
                     "channels_last": config.channels_last,
                     "width_mult": args.width_mult, "dropout": args.dropout, "group_pool": args.group_pool,
                     "min_fields": args.min_fields,
                     "backend": args.backend,
                     "int8_backend": args.int8_backend, "relu6": args.relu6,
                     "weight_scheme": args.weight_scheme,
                     "stability_samples": settings["stability_samples"], "processes": processes.world_size,
                     "device": args.device, "threads": torch.get_num_threads()},
        "runs": runs,
        "summary": summarize(runs),
        "paper": {name: {key: list(value) for key, value in values.items()} for name, values in PAPER.items()},
    }
    results["table"] = format_table(results)
    return results


def _run(args: argparse.Namespace, settings: dict, processes: Distributed) -> dict | None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device == "cpu" else f"cuda:{processes.local_rank}"
    log = print if processes.main else (lambda *a, **k: None)
    data, label, synthetic = _open_data(args, settings, processes, log)
    normalizer = Normalizer.fit(data["splits"]["train"])
    data["fingerprint"] = data_fingerprint(data["directory"])
    runs = [_train_one(name, seed, data, normalizer, args, settings, processes, device, log)
            for name in model_names(args.models, settings["groups"]) for seed in settings["seeds"]]
    if not processes.main:
        return None
    results = _report(args, settings, data, label, synthetic, runs, processes)
    print()
    print(results["table"])
    out = args.out or os.path.join(args.runs, "results.json")
    write_json(results, out)
    print(f"\nresults written to {out}")
    return results


#: How the library's names for settings read on this command line.
OPTIONS = {"config.epochs": "--epochs", "config.batch_size": "--batch-size", "config.lr": "--lr",
           "config.weight_decay": "--weight-decay", "config.stain_jitter": "--stain-jitter",
           "config.warmup_steps": "--warmup-steps", "config.label_smoothing": "--label-smoothing",
           "config.patience": "--patience", "config.optimizer": "--optimizer", "config.schedule": "--schedule",
           "config.precision": "--precision", "config.seed": "--seeds", "run_dir": "--runs", "resume=True": "--resume",
           "overwrite=True": "--overwrite", "resume:": "--resume:", "workers=0": "--workers 0",
           "workers:": "--workers:"}


def command_line_message(error: Exception) -> str:
    """``error``'s message with the library's setting names replaced by this command's options."""
    text = str(error)
    for name, option in OPTIONS.items():  # whole names only: this command's own "--workers: ..." stays
        text = re.sub(r"(?<![\w.-])" + re.escape(name), option, text)
    return text


def exit_code(run, args: argparse.Namespace, interrupted: str) -> int:
    """Run ``run(args)`` as a command: 0 done, 2 bad options/data/outputs (one line naming the culprit),
    3 diverged, 130 interrupted (``interrupted`` says what is kept)."""
    try:
        apply_memory_argument(args)
        run(args)
    except (PCamError, UsageError, OutputError) as error:
        print(f"error: {command_line_message(error)}", file=sys.stderr)
        return 2
    except DivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    return exit_code(run, _parser().parse_args(argv),
                     "finished epochs are in the checkpoints; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
