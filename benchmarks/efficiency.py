"""Data efficiency: accuracy against training-set size, conventional vs C_N-equivariant MobileNetV2.

For each training-set size (nested, class-balanced subsets of the train split: every smaller set is inside
every larger one) and seed, both models train with the same recipe and the same budget in optimizer *steps*
(``TrainConfig.steps_per_epoch``: a small set is passed over more often, with fresh augmentation, rather than
trained for fewer steps), are selected on the
validation split, and are evaluated on the test split in FP32 and INT8 (DFQ, data-free). Prints a Markdown
table (mean ± std over seeds per size), writes JSON and, with --plots, a PNG of the curve.

    python -m benchmarks.efficiency --data DIR                     # sizes 256 512 1024 2048 3000, seeds 0 1 2
    python -m benchmarks.efficiency --data DIR --sizes 500 3000 --seeds 0 --steps 400
    python -m benchmarks.efficiency --quick                        # seconds, synthetic data (tests)
    python -m benchmarks.efficiency --from-results results/efficiency --plots docs   # table + PNG from files

``--results DIR`` also writes each finished run's small result (figures and training history, no
checkpoint) to ``DIR/<run>.json``: files meant to be kept under version control, so that a curve measured
run by run, on several machines, is never lost; ``--from-results DIR`` builds the table and the PNG from
them without training (each model variant is its own series).

Every run keeps its checkpoint, its best model (model.pt) and its result in
RUNS/size<S>-<model>-lr<LR>[-<variant>...]-seed<k>/ (a variant suffix for every recipe or architecture option
away from its default, e.g. -stain0.1, -min8, -w0.8, so a variant never resumes another's runs); --resume
continues interrupted runs and skips finished ones. --valid-only
(recipe studies) reports validation figures and never opens the test split. Exit codes as benchmarks.pcam
(2 bad arguments or data, 3 diverged).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import mobilenet
import quant
import rotconv
from rotconv.files import RunLock, atomic_write, check_writable, write_json
from mobilenet.data import Normalizer, PCam, open_pcam
from mobilenet.training import PRECISIONS, TrainConfig, UsageError, resolve_precision, train

from . import pcam
from .common import add_memory_argument, check_outputs, initialize_rotconv_layers, report
from .rotation import angle_count
from .synthetic import write_synthetic_pcam
from .exits import command

__all__ = ["main", "nested_balanced_order", "format_curve", "plot_curve", "load_results", "series_label"]

DEFAULT_SIZES = [256, 512, 1024, 2048, 3000]
QUICK = {"sizes": [16, 32], "seeds": [0], "steps": 4, "evaluations": 2, "batch_size": 8, "width_mult": 0.25,
         "group": ["C4"], "valid_size": 16, "test_size": 16, "stability_samples": 4}


def nested_balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """An order of the indices of ``labels`` (binary) whose every prefix is as class-balanced as the data
    allow: the classes, each shuffled, alternate until one runs out. Prefixes are the nested subsets."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    common = min(len(by_class[0]), len(by_class[1]))
    first = rng.integers(0, 2)  # which class leads, so neither is favoured at odd sizes
    pairs = np.stack([by_class[first][:common], by_class[1 - first][:common]], axis=1).reshape(-1)
    rest = by_class[0][common:] if len(by_class[0]) > common else by_class[1][common:]
    return np.concatenate([pairs, rest]).astype(np.int64)


def parse_learning_rates(values: list[str], names: list[str]) -> dict[str, float]:
    """``["3e-3"]`` (every model) or ``["conventional=3e-3", "C12=1e-2"]`` -> {model name: learning rate}."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError("--lr", f"expected a number or MODEL=NUMBER, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise UsageError("--lr", f"expected a finite positive number, got {text}")
        return value

    if len(values) == 1 and "=" not in values[0]:
        return {name: number(values[0]) for name in names}
    rates = {}
    for item in values:
        name, separator, text = item.partition("=")
        if not separator:
            raise UsageError("--lr", f"give one number, or MODEL=NUMBER for every model; got {values}")
        try:
            key = name if name == "conventional" else str(rotconv.as_group(name))
        except ValueError:
            key = name
        if key not in names:
            raise UsageError("--lr", f"{name!r} is not a model of this run (models: {', '.join(names)})")
        rates[key] = number(text)
    missing = [name for name in names if name not in rates]
    if missing:
        raise UsageError("--lr", f"no learning rate for {', '.join(missing)}")
    return rates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory with the PCam HDF5 files (default: synthetic data)")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"training-set sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run, the same for every size (default 600)")
    parser.add_argument("--evaluations", type=int, help="validations per run (model selection points; default 8)")
    parser.add_argument("--min-passes", type=float, metavar="P",
                        help="a budget that grows with the data: at least P passes over the training set, i.e. "
                             "max(--steps, P x size / batch) steps per run (default: --steps at every size; run "
                             "dirs end -pass<P>)")
    parser.add_argument("--models", nargs="+", choices=pcam.MODELS, default=list(pcam.MODELS))
    parser.add_argument("--group", nargs="+", help="group(s) of the equivariant model(s), e.g. C12 D12 (default C12)")
    parser.add_argument("--batch-size", type=int, help="default 32")
    parser.add_argument("--lr", nargs="+", default=["3e-3"], metavar="LR",
                        help="peak learning rate of every model (3e-3), or per model: conventional=3e-3 C12=1e-2")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    pcam.add_model_arguments(parser, width_default=None)
    parser.add_argument("--no-augment", action="store_true", help="no random 90-degree rotations and flips (D4)")
    parser.add_argument("--stain-jitter", type=float, default=pcam.STAIN_JITTER, metavar="SIGMA",
                        help=f"H&E stain augmentation strength (default {pcam.STAIN_JITTER}; 0 = off; run dirs "
                             "end -stain<SIGMA>)")
    parser.add_argument("--init", choices=("fan_in", "fan_out"), default="fan_in",
                        help="Kaiming mode of the rotconv layers (recipe studies): fan_in, mobilenet_v2's default, "
                             "or fan_out (torchvision's rule, the conventional model's scale; run dirs end -fanout)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="training precision: auto (default) = bf16 where native, else fp32; bf16; fp32")
    add_memory_argument(parser)
    parser.add_argument("--valid-size", type=int, help="validation patches (default: all)")
    parser.add_argument("--test-size", type=int, help="test patches (default: all)")
    parser.add_argument("--stability-samples", type=int, help="test patches for rotation stability (default 128)")
    parser.add_argument("--backend", choices=("x86", "qnnpack"), default=quant.default_backend(),
                        help="torch.ao int8 engine (default: this CPU's, %(default)s; qnnpack on ARM)")
    parser.add_argument(
        "--int8-backend",
        choices=pcam.INT8_BACKENDS,
        default="auto",
        help="where INT8 runs, as in benchmarks.pcam (auto: the ExecuTorch program where rotconv[deploy] "
        "is installed, else torch.ao); --resume evaluates finished runs again when it changed",
    )
    parser.add_argument("--weight-scheme", choices=quant.WEIGHT_SCHEMES, default=quant.WEIGHT_SCHEME_DEFAULT)
    parser.add_argument("--relu6", choices=quant.RELU6_MODES, default=pcam.RELU6_DEFAULT,
                        help="DFQ with ReLU6, as in benchmarks.pcam; --resume evaluates finished runs again when it "
                             "changed")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--runs", default=os.path.join("runs", "efficiency"))
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, skip finished ones")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--out", help="JSON file (default RUNS/efficiency.json)")
    parser.add_argument("--plots", help="directory for the PNG curve (needs matplotlib)")
    parser.add_argument("--valid-only", action="store_true",
                        help="recipe studies: report the best validation accuracy and loss; the test split is not read")
    parser.add_argument("--results", metavar="DIR",
                        help="also write each finished run's small result JSON here (for version control)")
    parser.add_argument("--from-results", nargs="+", metavar="DIR",
                        help="build the table (and --plots PNG) from the result files in DIR, no training")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests (seconds)")
    parser.add_argument("--synthetic-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rotconv",
                                                                "synthetic-pcam"))
    return parser


def _settings(args: argparse.Namespace) -> dict:
    defaults = {"sizes": DEFAULT_SIZES, "seeds": [0, 1, 2], "steps": 600, "evaluations": 8, "batch_size": 32,
                "width_mult": 1.0, "group": None, "valid_size": None, "test_size": None, "stability_samples": 128}
    if args.quick:
        defaults.update(QUICK)
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    settings["groups"] = pcam.parse_groups(settings.pop("group"))
    for key in ("steps", "evaluations", "batch_size"):
        if settings[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')}", f"expected an integer >= 1, got {settings[key]}")
    if args.min_passes is not None and not (math.isfinite(args.min_passes) and args.min_passes > 0):
        raise UsageError("--min-passes", f"expected a positive number, got {args.min_passes}")
    settings["min_passes"] = args.min_passes
    if any(size < 2 for size in settings["sizes"]):
        raise UsageError("--sizes", f"expected sizes >= 2, got {settings['sizes']}")
    if any(seed < 0 for seed in settings["seeds"]):
        raise UsageError("--seeds", f"expected integers >= 0, got {settings['seeds']}")
    if len(set(settings["seeds"])) != len(settings["seeds"]):
        raise UsageError("--seeds", f"a seed is given twice ({settings['seeds']}); each seed is one sample")
    pcam.check_shared_arguments(args, settings["width_mult"])
    settings["lr"] = parse_learning_rates(args.lr, pcam.model_names(args.models, settings["groups"]))
    for lr in set(settings["lr"].values()):  # the training options (lr, weight decay, stain jitter, ...), up front
        _train_config(args, settings, lr, seed=0).validate()
    settings["sizes"] = sorted(set(settings["sizes"]))
    args.int8_backend = pcam.resolve_int8_backend(args.int8_backend)
    pcam.check_int8_engine_option(args)
    if args.results:
        check_writable(args.results, is_directory=True)
    return settings


def run_steps(settings: dict, size: int) -> int:
    """A run's step budget at ``size`` training patches: ``settings["steps"]``, or with ``min_passes`` at least
    that many passes over the set (``ceil(min_passes * size / batch_size)``)."""
    passes = settings.get("min_passes")
    steps = settings["steps"]
    return max(steps, math.ceil(passes * size / settings["batch_size"])) if passes else steps


def _train_config(args: argparse.Namespace, settings: dict, lr: float, seed: int, size: int = 2) -> TrainConfig:
    """One run's recipe: ``settings["evaluations"]`` epochs of ``ceil(run_steps / evaluations)`` steps each."""
    return TrainConfig(epochs=settings["evaluations"], batch_size=settings["batch_size"], lr=lr,
                       weight_decay=args.weight_decay, seed=seed, precision=args.precision,
                       steps_per_epoch=math.ceil(run_steps(settings, size) / settings["evaluations"]),
                       augment=not args.no_augment, stain_jitter=args.stain_jitter,
                       warmup_steps=args.warmup_steps, label_smoothing=args.label_smoothing,
                       patience=args.patience)


def _evaluation_args(args: argparse.Namespace, settings: dict) -> tuple[argparse.Namespace, dict]:
    """The arguments benchmarks.pcam.evaluate reads."""
    namespace = argparse.Namespace(device="cpu", backend=args.backend, int8_backend=args.int8_backend,
                                   weight_scheme=args.weight_scheme, relu6=args.relu6,
                                   width_mult=settings["width_mult"],
                                   dropout=args.dropout, group_pool=args.group_pool, min_fields=args.min_fields,
                                   depthwise=args.depthwise, antialias=args.antialias)
    return namespace, {"stability_samples": settings["stability_samples"], "simulated_int8": False}


def _run_one(size: int, seed: int, name: str, train_split: PCam, splits: dict, normalizer: Normalizer,
             args: argparse.Namespace, settings: dict) -> dict:
    equivariant = name != "conventional"
    variant = (
        ("-noaug" if args.no_augment else "")
        + (f"-stain{args.stain_jitter:g}" if args.stain_jitter else "")
        + ("-fanout" if args.init == "fan_out" and equivariant else "")
        + (f"-{args.group_pool}" if args.group_pool != "max" and equivariant else "")
        + (f"-min{args.min_fields}" if args.min_fields != 1 and equivariant else "")
        + (f"-w{args.width_mult:g}" if args.width_mult is not None and args.width_mult != 1 else "")
        + ("-dwfield" if args.depthwise == "field" and equivariant else "")
        + ("-aa" if args.antialias else "")
        + (f"-warm{args.warmup_steps}" if args.warmup_steps else "")
        + (f"-ls{args.label_smoothing:g}" if args.label_smoothing else "")
        + (f"-pat{args.patience}" if args.patience else "")
        + (f"-pass{args.min_passes:g}" if args.min_passes else "")
    )
    run_dir = os.path.join(args.runs, f"size{size}-{name}-lr{settings['lr'][name]:g}{variant}-seed{seed}")
    result_path = os.path.join(run_dir, "valid-result.json" if args.valid_only else "result.json")
    evaluation_args, evaluation_settings = _evaluation_args(args, settings)
    if args.resume and os.path.exists(result_path):
        with open(result_path) as handle:
            cached = json.load(handle)
        was = (cached.get("int8_backend", "torch-ao"), cached.get("relu6", "replace"))
        if args.valid_only or was == (args.int8_backend, args.relu6):
            return cached
        # trained by the same recipe, its INT8 made another way: evaluate the kept model again
        print(f"== size {size}, {pcam.model_label(name)}, seed {seed}: INT8 on {args.int8_backend}, relu6 "
              f"{args.relu6} (was {was[0]}, {was[1]}), no retraining ==", flush=True)
        result = pcam.evaluate(name, mobilenet.load(os.path.join(run_dir, "model.pt")), splits, normalizer,
                               evaluation_args, evaluation_settings, print, artifact_dir=run_dir)
        result.update({key: cached[key] for key in ("size", "seed", "model", "steps", "best_epoch", "history",
                                                    "train_seconds")}, int8_backend=args.int8_backend,
                      relu6=args.relu6, stopped_epoch=cached.get("stopped_epoch"))
        write_json(result, result_path)
        return result
    config = _train_config(args, settings, settings["lr"][name], seed, size)
    per_evaluation = config.steps_per_epoch
    model = pcam.build_model(name, evaluation_args, seed)
    if args.init != "fan_in":
        initialize_rotconv_layers(model, args.init)
    identity = {"benchmark": "efficiency", "size": size, "model": name,
                "width_mult": settings["width_mult"], "normalizer": normalizer.state()}
    print(f"== size {size}, {pcam.model_label(name)}, seed {seed} "
          f"({settings['evaluations']} x {per_evaluation} steps) ==", flush=True)
    started = time.time()
    trained = train(model, train_split, splits["valid"], config, run_dir, preprocess=normalizer,
                    resume=args.resume, overwrite=args.overwrite, log=print, identity=identity)
    model.load_state_dict(trained["best_state"])
    mobilenet.save(model, os.path.join(run_dir, "model.pt"), normalizer,  # for mobilenet.load / benchmarks.predict
                   metadata={"model": name, "seed": seed, "size": size, "best_epoch": trained["best_epoch"]})
    if args.valid_only:
        best = next(entry for entry in trained["history"] if entry["epoch"] == trained["best_epoch"])
        result = {"valid_accuracy": best["valid_accuracy"], "valid_loss": best["valid_loss"],
                  "lr": config.lr, "degenerate": {"fp32": None}}
    else:
        result = pcam.evaluate(name, model, splits, normalizer, evaluation_args, evaluation_settings, print,
                               artifact_dir=run_dir)
        result["int8_backend"], result["relu6"] = args.int8_backend, args.relu6
    result.update({"size": size, "seed": seed, "model": name, "steps": settings["evaluations"] * per_evaluation,
                   "best_epoch": trained["best_epoch"], "history": trained["history"],
                   "stopped_epoch": trained["stopped_epoch"], "train_seconds": time.time() - started,
                   "run": os.path.basename(run_dir),
                   "series": name + variant, "recipe": _recipe(args, settings, config)})
    write_json(result, result_path)
    return result


def _recipe(args: argparse.Namespace, settings: dict, config: TrainConfig) -> dict:
    """What a result file needs to say how it was made (the data set by name only: no local paths)."""
    return {"data": "synthetic" if args.data is None else os.path.basename(os.path.normpath(args.data)),
            "steps": config.steps_per_epoch * config.epochs, "min_passes": settings["min_passes"],
            "evaluations": settings["evaluations"], "batch_size": config.batch_size,
            "lr": config.lr, "weight_decay": config.weight_decay, "augment": config.augment,
            "stain_jitter": config.stain_jitter, "valid_only": args.valid_only,
            "precision": resolve_precision(config.precision, "cpu", lambda *_: None),  # as trained, not "auto"
            "int8_backend": args.int8_backend, "backend": args.backend, "relu6": args.relu6,
            "width_mult": settings["width_mult"],
            "min_fields": args.min_fields, "depthwise": args.depthwise, "antialias": args.antialias,
            "warmup_steps": config.warmup_steps,
            "label_smoothing": config.label_smoothing, "patience": config.patience, "torch": torch.__version__}


def load_results(directories: list[str]) -> list[dict]:
    """Every result file (``*.json``) under ``directories``, each a run; UsageError for an unreadable one."""
    runs = []
    for directory in directories:
        if not os.path.isdir(directory):
            raise UsageError("--from-results", f"{directory}: not a directory")
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path) as handle:
                    run = json.load(handle)
                run.setdefault("series", run["model"])
                run["size"], run["seed"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UsageError("--from-results", f"{path}: not a result file ({error})") from None
            runs.append(run)
    if not runs:
        raise UsageError("--from-results", f"no result files (*.json) in {directories}")
    return runs


def series_label(series: str) -> str:
    """``"C12-min8-w0.8"`` -> ``"MobileNetV2, C_12-equivariant (min8, w0.8)"``: the model and its variant."""
    model, _, variant = series.partition("-")
    label = pcam.model_label(model)
    return f"{label} ({variant.replace('-', ', ')})" if variant else label


def results_from_files(args: argparse.Namespace) -> dict:
    runs = load_results(args.from_results)
    modes = {_mode([run]) for run in runs}
    if len(modes) > 1:
        raise UsageError("--from-results", "the files mix validation-only and test results; keep them apart")
    seen: dict = {}
    budgets: dict = {}  # (series, size) -> the step budgets of its runs
    for run in runs:
        run["model"] = run["series"]
        key = (run["series"], run["size"], run["seed"])
        if key in seen:
            raise UsageError("--from-results", f"{run['run'] if 'run' in run else key} is in the files twice "
                                               f"({seen[key]['steps']} and {run['steps']} steps); one result per "
                                               "series, size and seed: keep other budgets in another folder")
        seen[key] = run
        budgets.setdefault((run["series"], run["size"]), set()).add(run["steps"])
    for (series, size), steps in budgets.items():
        if len(steps) > 1:
            raise UsageError("--from-results", f"{series} at {size:,} patches mixes step budgets "
                                               f"{sorted(steps)}; a mean over seeds needs one budget: keep other "
                                               "budgets in another folder")
    first = runs[0].get("recipe", {})
    settings = {"lr": {run["series"]: run.get("recipe", {}).get("lr", run.get("lr")) for run in runs},
                "steps": sorted({run["steps"] for run in runs}), "batch_size": first.get("batch_size"),
                "seeds": sorted({run["seed"] for run in runs}), "augment": first.get("augment", True),
                "valid_only": modes == {"valid"}, "int8_backend": first.get("int8_backend", "torch-ao"),
                "backend": first.get("backend", "x86")}  # files written before it was recorded: x86
    results = {"synthetic": first.get("data") == "synthetic", "data": first.get("data", "?"), "settings": settings,
               "runs": runs, "curve": summarize_curve(runs)}
    results["crossings"] = curve_crossings(results)
    results["table"] = format_curve(results)
    return results


def summarize_curve(runs: list[dict]) -> dict:
    """mean ± std per (size, model) of FP32/INT8 test accuracy (validation accuracy and loss for --valid-only),
    and of the random-angle figures (:func:`summarize_rotation`) where every run of the cell has them."""
    curve: dict = {}
    for run in runs:
        curve.setdefault(str(run["size"]), {}).setdefault(run["model"], []).append(run)
    summary: dict = {}
    for size, models in curve.items():
        for name, chosen in models.items():
            cell = {key: pcam.mean_std([r[key] for r in chosen]) for key in _FIGURES[_mode(chosen)]}
            cell["degenerate_runs"] = [r["seed"] for r in chosen if r["degenerate"]["fp32"]]
            rotation = summarize_rotation(chosen)
            if rotation:
                cell["random_rotation"] = rotation
            summary.setdefault(size, {})[name] = cell
    return summary


def summarize_rotation(runs: list[dict]) -> dict | None:
    """mean ± std over ``runs`` of ``benchmarks.rotation``'s figures (upright, rotated, drop, consistent; FP32 and
    INT8 where every run has them), or None unless every run was measured with the same angle seed, patch count
    and angles per patch."""
    figures = [run.get("random_rotation") for run in runs]
    if not all(isinstance(f, dict) for f in figures) or len(
            {(f.get("seed"), f.get("patches"), angle_count(f)) for f in figures}) != 1:
        return None
    summary: dict = {"angle_seed": figures[0].get("seed"), "patches": figures[0].get("patches"),
                     "angles": angle_count(figures[0])}
    for precision in ("fp32", "int8"):
        if all(isinstance(f.get(precision), dict) for f in figures):
            keys = ("upright", "rotated", "drop") + tuple(
                key for key in ("consistent", "consistent_across_angles")
                if all(f[precision].get(key) is not None for f in figures))
            summary[precision] = {key: pcam.mean_std([f[precision][key] for f in figures]) for key in keys}
    return summary if "fp32" in summary else None


_FIGURES = {"test": ("fp32_accuracy", "int8_accuracy"), "valid": ("valid_accuracy", "valid_loss")}


def _mode(runs: list[dict]) -> str:
    return "valid" if "valid_accuracy" in runs[0] else "test"


def gap_crossings(sizes: list[int], gaps: list[float]) -> list[dict]:
    """Where a gap measured at increasing ``sizes`` changes sign: for each consecutive pair with gaps of
    opposite signs, ``{"between": (a, b), "size": s}`` with ``s`` the zero of the gap interpolated linearly in
    log(size) (the curve's x axis); a gap of exactly zero at a measured size ``a`` is ``(a, a)`` at ``a``."""
    found = []
    for index, (a, gap_a) in enumerate(zip(sizes, gaps)):
        if gap_a == 0:
            found.append({"between": (a, a), "size": float(a)})
        elif index + 1 < len(sizes) and gap_a * gaps[index + 1] < 0:
            b = sizes[index + 1]
            fraction = gap_a / (gap_a - gaps[index + 1])
            size = math.exp(math.log(a) + fraction * math.log(b / a))
            found.append({"between": (a, b), "size": min(max(size, float(a)), float(b))})  # no rounding outside
    return found


def curve_crossings(results: dict) -> dict:
    """Per series other than the conventional baseline, over the sizes both have: the mean gap (FP32 test, or
    validation, accuracy), its standard error where both have several seeds (None otherwise), the seeds per
    size, and where the gap changes sign (:func:`gap_crossings`)."""
    names = list(dict.fromkeys(run["model"] for run in results["runs"]))
    baseline = next((name for name in names if name.split("-")[0] == "conventional"), None)
    key = "valid_accuracy" if results["settings"].get("valid_only", False) else "fp32_accuracy"
    found = {}
    for name in names:
        if baseline is None or name == baseline:
            continue
        sizes = sorted((int(size) for size, models in results["curve"].items()
                        if name in models and baseline in models))
        pairs = [(results["curve"][str(size)][name][key], results["curve"][str(size)][baseline][key])
                 for size in sizes]
        gaps = [ours["mean"] - theirs["mean"] for ours, theirs in pairs]
        errors = [math.sqrt(ours["std"] ** 2 / ours["n"] + theirs["std"] ** 2 / theirs["n"])
                  if ours["n"] > 1 and theirs["n"] > 1 else None for ours, theirs in pairs]
        found[name] = {"sizes": sizes, "gaps": gaps, "gap_errors": errors,
                       "seeds": [min(ours["n"], theirs["n"]) for ours, theirs in pairs],
                       "crossings": gap_crossings(sizes, gaps)}
    return found


def _crossing_lines(results: dict) -> list[str]:
    lines = []
    for name, found in (results.get("crossings") or curve_crossings(results)).items():
        sizes, gaps = found["sizes"], found["gaps"]
        if len(sizes) < 2:
            continue

        def gap(size: int) -> str:
            index = sizes.index(size)
            error, seeds = found["gap_errors"][index], found["seeds"][index]
            spread = f" ± {100 * error:.2f} (standard error)" if error is not None else ""
            return f"{size:,}: {100 * gaps[index]:+.2f}{spread}, {seeds} seed{'s' if seeds > 1 else ''}"

        label = series_label(name)
        if not found["crossings"]:
            side = "above" if gaps[0] > 0 else "below"
            lines.append(f"{label} is {side} the conventional model at every size from {sizes[0]:,} to "
                         f"{sizes[-1]:,}: the lines do not cross.")
        for crossing in found["crossings"]:
            a, b = crossing["between"]
            where = f"at {a:,} ({gap(a)})" if a == b else (
                f"between {a:,} and {b:,} (about {crossing['size']:,.0f} by log-linear interpolation of the mean "
                f"gap; gap in points at {gap(a)}; at {gap(b)})")
            lines.append(f"{label} crosses the conventional model {where}.")
    return lines


def _runtime(settings: dict) -> str:
    backend = settings.get("int8_backend", "torch-ao")
    return (
        pcam.DEPLOY_BACKENDS[backend][4] if backend in pcam.DEPLOY_BACKENDS else f"{settings['backend']} int8 kernels."
    )


def _passes(results: dict, size: int) -> str:
    """How many times a run at ``size`` saw its training set (steps x batch / size), e.g. "7.7"; "?" where the
    batch size is not recorded."""
    batch = results["settings"].get("batch_size")
    budgets = sorted({run["steps"] for run in results["runs"] if run["size"] == size})
    if not batch:
        return "?"
    return " / ".join(f"{steps * batch / size:.{0 if steps * batch / size >= 10 else 1}f}" for steps in budgets)


def format_curve(results: dict) -> str:
    """Markdown table of the curve (rows: sizes)."""
    valid_only = results["settings"].get("valid_only", False)
    lines = []
    if results["synthetic"]:
        lines.append("**SYNTHETIC DATA**: these figures say nothing about PCam; pass --data for real files.")
    rates = ", ".join(f"{name} {rate:g}" for name, rate in results["settings"]["lr"].items())
    augment = "D4 augmentation" if results["settings"].get("augment", True) else "no augmentation"
    steps = results["settings"]["steps"]
    steps = "/".join(map(str, steps)) if isinstance(steps, list) else steps
    if results["settings"].get("min_passes"):
        steps = f"max({steps}, {results['settings']['min_passes']:g} passes over the set)"
    lines.append(
        f"Data: {results['data']}; {steps} optimizer steps per run (batch "
        f"{results['settings']['batch_size']}, lr {rates}, {augment}), seeds {results['settings']['seeds']}, selection "
        "on validation loss; "
        + (
            "VALIDATION split only (best epoch's accuracy / loss); the test split was not read."
            if valid_only
            else "test split; INT8: DFQ, data-free, on " + _runtime(results["settings"])
        )
    )
    lines.append("")
    names = list(dict.fromkeys(run["model"] for run in results["runs"]))
    baseline = next((name for name in names if name.split("-")[0] == "conventional"), None)  # a series name too
    compared = [name for name in names if name != baseline] if baseline else []
    first, second = ("valid_accuracy", "valid_loss") if valid_only else ("fp32_accuracy", "int8_accuracy")
    columns = "validation accuracy (%) / loss" if valid_only else "FP32 / INT8 (%)"
    header = " | ".join(f"{series_label(name)} {columns}" for name in names)
    gaps = "".join(f" {name} - conventional {'validation' if valid_only else 'FP32'} (points) |" for name in compared)
    lines.append(f"| training patches | passes over them | seeds | {header} |{gaps}")
    lines.append("|---" * (3 + len(names) + len(compared)) + "|")

    def loss(stats: dict) -> str:
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats["std"] is not None else f"{stats['mean']:.3f}"

    for size in sorted(results["curve"], key=int):
        models = results["curve"][size]
        cells = []
        for name in names:
            stats = models.get(name)
            cells.append("—" if stats is None else f"{pcam.percent(stats[first])} / "
                         + (loss(stats[second]) if valid_only else pcam.percent(stats[second]))
                         + (f" (degenerate seeds {stats['degenerate_runs']})" if stats["degenerate_runs"] else ""))
        difference = "".join(
            f" {100 * (models[name][first]['mean'] - models[baseline][first]['mean']):+.2f} |"
            if name in models and baseline in models else " — |" for name in compared)
        counts = list(dict.fromkeys(models[name][first]["n"] for name in names if name in models))
        passes = _passes(results, int(size))
        lines.append(f"| {int(size):,} | {passes} | {' / '.join(map(str, counts))} | " + " | ".join(cells) + " |"
                     + difference)
    crossings = _crossing_lines(results)
    if crossings:
        lines += [""] + crossings
    lines += _rotation_table(results, names)
    return "\n".join(lines)


def _rotation_table(results: dict, names: list[str]) -> list[str]:
    """Markdown rows of the random-angle figures (``benchmarks.rotation``) per size and model, where measured."""
    rows = []
    for size in sorted(results["curve"], key=int):
        for name in names:
            rotation = results["curve"][size].get(name, {}).get("random_rotation")
            if not rotation:
                continue
            cells = []
            for precision in ("fp32", "int8"):
                figures = rotation.get(precision)
                cells += ["—", "—", "—"] if figures is None else [
                    f"{pcam.percent(figures['upright'])} -> {pcam.percent(figures['rotated'])}",
                    pcam.percent(figures["drop"]),
                    " / ".join(pcam.percent(figures[key]) for key in ("consistent", "consistent_across_angles")
                               if key in figures) or "—"]
            rows.append(f"| {int(size):,} | {series_label(name)} | {rotation['fp32']['drop']['n']} | "
                        f"{rotation.get('angles', 1)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Random angles (benchmarks.rotation: each test patch rotated by its own angles in [0, 360), "
            "rotated = mean over the angles, circular field of view; upright = the same patches through the same "
            "disc); drop in points; same class = share of patches classed alike upright and at every angle / at "
            "every angle (all resampled), upright left out:", "",
            "| training patches | model | seeds | angles | FP32 upright -> rotated (%) | FP32 drop "
            "| FP32 same class (%) | INT8 upright -> rotated (%) | INT8 drop | INT8 same class (%) |",
            "|---" * 10 + "|"] + rows


def plot_curve(results: dict, directory: str) -> str:
    """One PNG: test accuracy against training-set size, both models, FP32 and INT8, ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = sorted(results["curve"], key=int)
    valid_only = results["settings"].get("valid_only", False)
    figures = (("valid_accuracy", "validation", "-o"),) if valid_only else \
        (("fp32_accuracy", "FP32", "-o"), ("int8_accuracy", "INT8", "--s"))
    series = [(name, key, label, style) for name in dict.fromkeys(run["model"] for run in results["runs"])
              for key, label, style in figures]
    for index, (name, key, label, style) in enumerate(series):
        points = [(int(s), results["curve"][s][name][key]) for s in sizes if name in results["curve"][s]]
        if points:
            shift = 1.025 ** (index - (len(series) - 1) / 2)  # side by side, so the error bars stay readable
            axis.errorbar([p[0] * shift for p in points], [100 * p[1]["mean"] for p in points],
                          yerr=[100 * p[1]["std"] for p in points], fmt=style, capsize=3,
                          label=f"{series_label(name)} {label}")
    for name, found in (results.get("crossings") or curve_crossings(results)).items():
        for crossing in found["crossings"]:
            axis.axvline(crossing["size"], color="grey", linestyle=":", linewidth=1)
            axis.annotate(f"crossing ~{crossing['size']:,.0f}", (crossing["size"], 0.98), fontsize=7, color="grey",
                          xycoords=("data", "axes fraction"), rotation=90, ha="right", va="top")
    axis.set_xscale("log")
    axis.set_xticks([int(s) for s in sizes], [f"{int(s):,}" for s in sizes])
    axis.minorticks_off()
    counts = sorted({len([run for run in results["runs"] if str(run["size"]) == size and run["model"] == name])
                     for size in sizes for name in results["curve"][size]})
    seeds = "-".join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))
    axis.set_title(f"mean ± std over {seeds} seed{'s' if counts[-1] > 1 else ''} per point", fontsize=9)
    axis.set_xlabel("training patches")
    axis.set_ylabel("validation accuracy (%)" if valid_only else "test accuracy (%)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "efficiency.png")
    figure.tight_layout()
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict:
    check_outputs(args.out, args.plots)  # before any work (--out's default, RUNS/efficiency.json, below)
    if args.from_results:
        results = results_from_files(args)
        if args.plots:
            results["plot"] = plot_curve(results, args.plots)
        report(results, args.out)
        return results
    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(args.runs, "efficiency.json")
    check_writable(out)
    with RunLock(args.runs):
        synthetic = args.data is None
        directory = args.synthetic_dir if synthetic else args.data
        if synthetic:
            write_synthetic_pcam(directory, {"train": max(settings["sizes"]), "valid": 64, "test": 64})
        splits = open_pcam(directory, {"train": None, "valid": settings["valid_size"], "test": settings["test_size"]},
                           splits=("train", "valid") if args.valid_only else None)
        full_train = splits["train"]
        if max(settings["sizes"]) > len(full_train):
            raise UsageError("--sizes", f"{max(settings['sizes'])} is larger than the train split ({len(full_train)})")
        order = nested_balanced_order(full_train.labels.numpy(), seed=0)  # one order: nested across sizes and seeds
        normalizer = Normalizer.fit(full_train)
        runs = []
        for size in settings["sizes"]:
            subset = full_train.subset(full_train.indices[np.sort(order[:size])], preload=True)
            for seed in settings["seeds"]:
                for name in pcam.model_names(args.models, settings["groups"]):
                    runs.append(_run_one(size, seed, name, subset, splits, normalizer, args, settings))
                    if args.results and "run" in runs[-1]:
                        kept = runs[-1]["run"] + ("-valid" if args.valid_only else "") + ".json"
                        write_json(runs[-1], os.path.join(args.results, kept))
        results = {
            "synthetic": synthetic,
            "data": "synthetic PCam-like" if synthetic else directory,
            "settings": {
                **settings,
                "weight_decay": args.weight_decay,
                "backend": args.backend,
                "int8_backend": args.int8_backend,
                "valid_only": args.valid_only,
                "augment": not args.no_augment,
                "stain_jitter": args.stain_jitter,
                "init": args.init,
                "depthwise": args.depthwise,
                "antialias": args.antialias,
                "warmup_steps": args.warmup_steps,
                "label_smoothing": args.label_smoothing,
                "patience": args.patience,
                "weight_scheme": args.weight_scheme,
                "relu6": args.relu6,
                "models": args.models,
            },
            "runs": runs,
            "curve": summarize_curve(runs),
        }
        results["crossings"] = curve_crossings(results)
        results["table"] = format_curve(results)
        if args.plots:
            results["plot"] = plot_curve(results, args.plots)
        print()
        print(results["table"])
        write_json(results, out)
        print(f"\nresults written to {out}")
        return results


@command
def main(argv: list[str] | None = None) -> int:
    return pcam.exit_code(run, _parser().parse_args(argv), "finished runs are kept; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
