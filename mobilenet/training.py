"""Training any classifier on any map-style dataset (or DataLoader): seeded D4 augmentation, bf16 autocast,
model selection on validation loss, atomic per-epoch checkpoints with resume, progress output, and
data-parallel training with torch.distributed (torchrun).

    config = TrainConfig(epochs=10, batch_size=32)
    result = train(model, train_data, valid_data, config, run_dir="runs/mine", preprocess=normalizer)
    model.load_state_dict(result["best_state"])

Items of a dataset are ``(image, label)`` pairs; a dataset with a ``batch(positions)`` method (such as
:class:`mobilenet.pcam.PCam`) is read a batch at a time. ``preprocess`` (e.g. a :class:`mobilenet.Normalizer`)
runs on each batch on the training device. Errors name the config field or argument at fault
(:class:`UsageError`), never a command-line option.

Data parallelism: every global batch (the same for any number of processes, drawn from a seeded
permutation) is split evenly over the processes; gradients are averaged by DistributedDataParallel and
batch-norm statistics are computed over the whole global batch (:mod:`mobilenet.distributed`), so a run on R
processes computes what a run on one process does with the same seeds, up to floating-point summation order.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rotconv.validation import check_positive_int

from .distributed import Distributed, convert_batchnorm
from rotconv.files import atomic_write, clean_temporary_files, differences
from .pcam import PCamError, augment_batch, stain_jitter

__all__ = [
    "UsageError",
    "DivergedError",
    "TrainConfig",
    "PRECISIONS",
    "bf16_supported",
    "resolve_precision",
    "resolve_stain_jitter",
    "STAIN_JITTER",
    "train",
    "training_step",
    "evaluate_loss",
    "load_checkpoint",
    "save_atomically",
    "Progress",
]


class UsageError(ValueError):
    """A setting, a checkpoint or a data set does not fit the run. ``argument`` names what is at fault: a
    config field (``"config.lr"``) or an argument of :func:`train` (``"run_dir"``, ``"train_data"``)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, or never produced a model better than its initialisation."""


@dataclass
class TrainConfig:
    """Optimisation settings (stored in every checkpoint; a resumed run must match them).

    Attributes:
        epochs, batch_size: passes over the training set; global batch size (split over processes).
        lr, weight_decay, optimizer, schedule: peak learning rate; ``"adam"`` or ``"sgd"`` (Nesterov, 0.9);
            ``"cosine"`` (to 0 over the run) or ``"constant"``.
        augment: random rotations by multiples of 90 degrees and flips (D4, exact on the pixel grid).
        stain_jitter: strength ``sigma`` of H&E stain augmentation (:func:`mobilenet.pcam.stain_jitter`): per
            patch and stain, amount * U(1 - sigma, 1 + sigma) + U(-sigma, sigma); 0 turns it off. Needs
            uint8 RGB images from the data (PCam's are). Default None: :data:`STAIN_JITTER` (0.1, selected on
            PCam's validation split, docs/training.md) where the training images are uint8 RGB, off (with a
            notice) where they are not. Tellez et al.'s "light" setting is 0.05.
        seed: seeds the initial RNG state, the sample order and the augmentation.
        precision: ``"bf16"`` autocast, ``"fp32"``, or ``"auto"`` (bf16 where the device has fast kernels).
        channels_last: train in channels_last memory layout.
        steps_per_epoch: None: an epoch is one pass over the data; an int: an epoch is that many steps,
            drawn from a continuing stream of shuffled passes (a fixed step budget whatever the data size;
            validation and checkpoints still happen per epoch).
    """

    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    augment: bool = True
    stain_jitter: float | None = None
    seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    steps_per_epoch: int | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first field that is out of range."""
        for name in ("epochs", "batch_size"):
            try:
                check_positive_int(getattr(self, name), name)
            except ValueError as error:
                raise UsageError(f"config.{name}", str(error).split(": ", 1)[1]) from None
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError("config.lr", f"expected a finite positive learning rate, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise UsageError("config.weight_decay", f"expected a finite number >= 0, got {self.weight_decay!r}")
        if self.steps_per_epoch is not None:
            try:
                check_positive_int(self.steps_per_epoch, "steps_per_epoch")
            except ValueError as error:
                raise UsageError("config.steps_per_epoch", str(error).split(": ", 1)[1]) from None
        if self.stain_jitter is not None and not (
            isinstance(self.stain_jitter, (int, float))
            and not isinstance(self.stain_jitter, bool)
            and 0 <= self.stain_jitter < 1
        ):
            raise UsageError("config.stain_jitter", f"expected a number in [0, 1), got {self.stain_jitter!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError("config.seed", f"expected an integer >= 0, got {self.seed!r}")
        choices = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "constant"), "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"config.{name}", f"expected one of {allowed}, got {getattr(self, name)!r}")


#: Training precisions: "bf16" runs forward and backward under bfloat16 autocast (batch-norm statistics, the
#: loss, the optimizer and checkpoints stay float32); "auto" is bf16 where the device has bf16 kernels.
PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` has fast bfloat16 kernels (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


#: TrainConfig(stain_jitter=None) on uint8 RGB training images (H&E patches such as PCam's)
STAIN_JITTER = 0.1


def resolve_stain_jitter(stain_jitter: float | None, data, log=print) -> float:
    """``stain_jitter`` as given, or for None :data:`STAIN_JITTER` where ``data``'s images are uint8 RGB
    (its first image is looked at) and 0 otherwise, with a one-line notice."""
    if stain_jitter is not None:
        return float(stain_jitter)
    dataset = getattr(data, "dataset", data)  # a DataLoader's dataset
    try:
        image = dataset.read(np.array([0]))[0] if hasattr(dataset, "read") else dataset[0][0]
    except Exception:  # any dataset error shows up again, named, when training reads it
        image = None
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
        return STAIN_JITTER
    log("notice: stain jitter off (the training images are not uint8 RGB); TrainConfig(stain_jitter=...) "
        "sets it explicitly")
    return 0.0


def resolve_precision(precision: str, device: str, log=print) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"`` picks bf16 where supported; an explicit ``"bf16"`` on a device
    without bf16 kernels falls back to fp32 with a one-line notice."""
    if precision == "fp32":
        return "fp32"
    if bf16_supported(device):
        return "bf16"
    if precision == "bf16":
        log(f"notice: {device} has no fast bfloat16 kernels; training in fp32")
    return "fp32"


# -- output ------------------------------------------------------------------------------------------------
class Progress:
    """A progress line on stderr: redrawn in place on a terminal, every 25% otherwise (logs, CI)."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total, self.description, self.enabled = max(total, 1), description, enabled
        self.count, self.start, self.last_draw, self.next_mark = 0, time.time(), 0.0, 0.25
        self.terminal = sys.stderr.isatty()

    def update(self, steps: int = 1, **values: float) -> None:
        self.count += steps
        if not self.enabled:
            return
        fraction = self.count / self.total
        now = time.time()
        text = ", ".join(f"{key} {value:.4g}" for key, value in values.items())
        line = (f"{self.description}: {self.count}/{self.total} ({100 * fraction:.0f}%) "
                f"{now - self.start:.0f}s{', ' + text if text else ''}")
        if self.terminal and (now - self.last_draw > 0.2 or self.count >= self.total):
            sys.stderr.write("\r" + line.ljust(100) + ("\n" if self.count >= self.total else ""))
            sys.stderr.flush()
            self.last_draw = now
        elif not self.terminal and (fraction >= self.next_mark or self.count >= self.total):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            while self.next_mark <= fraction:
                self.next_mark += 0.25


def save_atomically(state: dict, path: str) -> None:
    """``torch.save`` through :func:`rotconv.files.atomic_write` (never a half-written file)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


# -- data --------------------------------------------------------------------------------------------------
def _reader(data: torch.utils.data.Dataset, name: str) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """``positions -> (images (B, C, H, W), labels (B,))`` for a map-style dataset: its own ``batch`` method
    where it has one, else its items stacked."""
    if hasattr(data, "batch"):
        return data.batch

    def read(positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for position in positions:
            item = data[int(position)]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise UsageError(name, f"items must be (image, label) pairs, got {type(item).__name__}")
            images.append(torch.as_tensor(item[0]))
            labels.append(int(item[1]))
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    return read


def _check_data(data: object, name: str) -> None:
    if isinstance(data, torch.utils.data.DataLoader):
        return
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise UsageError(name, f"expected a map-style dataset (__getitem__ and __len__) or a DataLoader, got "
                               f"{type(data).__name__}")
    if len(data) == 0:
        raise UsageError(name, "the dataset is empty")


def _prepare(images: torch.Tensor, preprocess: Callable | None, device: str,
             memory_format: torch.memory_format) -> torch.Tensor:
    images = images.to(device)
    if preprocess is not None:
        images = preprocess(images)
    elif not images.is_floating_point():
        raise UsageError("preprocess", f"the data yields {images.dtype} images; pass preprocess= to make them "
                                       "float (e.g. mobilenet.Normalizer.fit(train_data))")
    return images.contiguous(memory_format=memory_format)


def _epoch_plan(config: TrainConfig, epoch: int, size: int) -> tuple[np.ndarray, ...]:
    """The sample order, D4 augmentation and stain factors ``(count, 2, 3)`` (None without stain jitter) of
    ``epoch``: a function of (seed, epoch) alone. With ``config.steps_per_epoch`` the order is this epoch's
    slice of a stream of shuffled passes."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.steps_per_epoch is None:
        order = rng.permutation(size)
    else:
        needed = config.steps_per_epoch * config.batch_size
        start = (epoch - 1) * needed
        passes = range(start // size, (start + needed - 1) // size + 1)
        stream = np.concatenate([np.random.default_rng([config.seed, 1 << 20, p]).permutation(size) for p in passes])
        offset = start - passes[0] * size
        order = stream[offset:offset + needed]
    count = order.size
    turns = rng.integers(0, 4, count) if config.augment else np.zeros(count, dtype=np.int64)
    flips = rng.integers(0, 2, count) if config.augment else np.zeros(count, dtype=np.int64)
    return order, turns, flips, _stain_factors(rng, config.stain_jitter, count)


def _stain_factors(rng: np.random.Generator, sigma: float, count: int) -> np.ndarray | None:
    """``(count, 2, 3)``: per patch, scales U(1 - sigma, 1 + sigma) and shifts U(-sigma, sigma) of the 3 stains
    (drawn after the D4 choices, so plans without stain jitter are those of earlier versions)."""
    if not sigma:
        return None
    factors = rng.uniform(-sigma, sigma, (count, 2, 3))
    factors[:, 0] += 1.0
    return factors


def _apply_stain_jitter(images: torch.Tensor, factors: np.ndarray | None) -> torch.Tensor:
    if factors is None:
        return images
    if images.dtype != torch.uint8:
        raise UsageError("config.stain_jitter", f"stain jitter (default 0.1, for H&E-stained RGB patches) needs "
                                                f"uint8 RGB images from the data, got {images.dtype}; set "
                                                "TrainConfig(stain_jitter=0) for other data")
    factors = torch.from_numpy(factors)
    return stain_jitter(images, factors[:, 0], factors[:, 1])


class _EpochBatches(torch.utils.data.Dataset):
    """Item ``step`` = this process's share of global batch ``step`` of an epoch, read and augmented: a
    DataLoader with workers prepares the next batches while the current one trains (the same batches,
    in the same order, whatever the number of workers)."""

    def __init__(self, read: Callable, order: np.ndarray, turns: np.ndarray, flips: np.ndarray,
                 stains: np.ndarray | None, batch_size: int, rank: int, local: int, steps: int) -> None:
        self.read, self.order, self.turns, self.flips, self.stains = read, order, turns, flips, stains
        self.batch_size, self.rank, self.local, self.steps = batch_size, rank, local, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        start = step * self.batch_size + self.rank * self.local
        positions = slice(start, start + self.local)  # into the epoch's order (and its augmentation)
        try:
            images, labels = self.read(self.order[positions])
        except PCamError as error:  # returned, not raised: a worker's exception would carry its traceback text
            return str(error)
        images = _apply_stain_jitter(images, None if self.stains is None else self.stains[positions])
        return augment_batch(images, torch.from_numpy(self.turns[positions]),
                             torch.from_numpy(self.flips[positions])), labels


def _train_batches(data, config: TrainConfig, epoch: int, processes: Distributed, workers: int,
                   device: str) -> tuple[Iterator, int]:
    """This process's (augmented) training batches of ``epoch`` and their number (a DataLoader's own length;
    ``config.steps_per_epoch`` applies to datasets)."""
    if isinstance(data, torch.utils.data.DataLoader):  # the loader decides order and batches; D4 is ours
        rng = np.random.default_rng([config.seed, epoch])

        def loader_batches():
            for item in data:
                images, labels = item[0], torch.as_tensor(item[1])
                size = images.shape[0]
                if config.augment:
                    turns, flips = (
                        torch.from_numpy(rng.integers(0, 4, size)),
                        torch.from_numpy(rng.integers(0, 2, size)),
                    )
                    images = augment_batch(images, turns, flips)
                images = _apply_stain_jitter(images, _stain_factors(rng, config.stain_jitter, size))
                yield images, labels

        return loader_batches(), len(data)
    steps = config.steps_per_epoch or len(data) // config.batch_size
    if len(data) < config.batch_size:
        raise UsageError("config.batch_size", f"{config.batch_size} is larger than the training set ({len(data)})")
    order, turns, flips, stains = _epoch_plan(config, epoch, len(data))
    local = config.batch_size // processes.world_size
    read = _reader(data, "train_data")
    if stains is not None:  # checked here: raised inside a loader worker, the error would lose its type
        _apply_stain_jitter(read(order[:1])[0], stains[:1])
    batches = _EpochBatches(read, order, turns, flips, stains, config.batch_size, processes.rank,
                            local, steps)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         pin_memory=device.startswith("cuda"))
    return iter(loader), steps


def _eval_batches(data, batch_size: int, processes: Distributed) -> tuple[Iterator, int, int]:
    """(batches, their number, examples) of this process's share of ``data`` for evaluation."""
    if isinstance(data, torch.utils.data.DataLoader):
        return ((item[0], torch.as_tensor(item[1])) for item in data), len(data), len(data.dataset)
    positions = np.arange(len(data))[processes.rank::processes.world_size]
    read = _reader(data, "valid_data")
    batches = (read(positions[start:start + batch_size]) for start in range(0, len(positions), batch_size))
    return batches, math.ceil(len(positions) / batch_size), len(positions)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, preprocess: Callable | None, batch_size: int, device: str = "cpu",
                  processes: Distributed | None = None, description: str = "valid",
                  show: bool = True) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (a dataset or DataLoader; shared out over
    the processes)."""
    processes = processes or Distributed()
    model.eval()
    batches, count, examples = _eval_batches(data, batch_size, processes)
    loss_sum = correct = 0.0
    progress = Progress(count, description, show and processes.main)
    for images, labels in batches:
        logits = model(_prepare(images, preprocess, device, torch.contiguous_format))
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        progress.update()
    loss_sum, correct, examples = processes.sum([loss_sum, correct, float(examples)])
    return loss_sum / examples, correct / examples


# -- checkpoints -------------------------------------------------------------------------------------------
CHECKPOINT_KEYS = ("identity", "epoch", "model", "optimizer", "rng", "history", "best")


def load_checkpoint(path: str, device: str = "cpu") -> dict:
    """Read a training checkpoint written by :func:`train`; every failure is a :class:`UsageError` naming
    ``path`` (missing, a directory, empty, truncated, not a checkpoint, or another program's file)."""
    if os.path.isdir(path):
        raise UsageError("run_dir", f"{path} is a directory, not a checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UsageError("run_dir", f"{path}: checkpoint not found") from None
    except Exception as error:  # torch.load raises EOFError, UnpicklingError, RuntimeError, ... for bad files
        kind = "empty" if os.path.getsize(path) == 0 else "truncated or not a checkpoint"
        raise UsageError("run_dir", f"{path}: unreadable checkpoint ({kind}: {type(error).__name__}); delete it "
                                    "or start the run with overwrite=True") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError("run_dir", f"{path}: not a checkpoint of this trainer (missing {', '.join(missing)}); "
                                    "delete it or start the run with overwrite=True")
    return checkpoint


#: the value a config field had, in effect, in checkpoints written before the field existed (where the
#: field's default is now resolved at run time, the old behaviour is what an absent field means)
_BEFORE_THE_FIELD = {"stain_jitter": 0.0}


def _restore(checkpoint: dict, path: str, identity: dict, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> None:
    stored = checkpoint["identity"]
    if isinstance(stored.get("config"), dict) and isinstance(identity.get("config"), dict):
        # a config field added since the checkpoint was written counts as unchanged at its default value
        defaults = {**asdict(TrainConfig()), **_BEFORE_THE_FIELD}
        added = {key for key, value in identity["config"].items()
                 if key not in stored["config"] and key in defaults and value == defaults[key]}
        identity = {**identity, "config": {k: v for k, v in identity["config"].items() if k not in added}}
    changed = differences(stored, identity)
    if changed:
        raise UsageError("resume", f"{path} belongs to another run; what differs (checkpoint -> this run): "
                         + "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
                         + ". Use another run_dir, or overwrite=True to start afresh")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError("run_dir", f"{path}: the checkpoint does not fit this model "
                                    f"({str(error).splitlines()[0]})") from None


# -- training ----------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay,
                           nesterov=True)


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * step / max(total_steps, 1)))


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; forward and backward under bf16 autocast for ``precision="bf16"``
    (loss and optimizer in float32). Returns the (float32) loss and logits. A non-finite loss is returned
    without a step, so the weights stay as they were."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = network(inputs)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    if torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss, logits


def _train_epoch(network: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, steps: int,
                 preprocess: Callable | None, config: TrainConfig, epoch: int, device: str,
                 progress: Progress) -> tuple[float, float, float]:
    """One epoch of optimizer steps; returns this process's (loss sum, correct count, examples). A
    non-finite loss stops training (:class:`DivergedError`)."""
    network.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    loss_sum = correct = seen = 0.0
    for step, item in enumerate(batches):
        if isinstance(item, str):  # a data error in a worker, passed on as its message
            raise PCamError(item)
        images, labels = item
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, (epoch - 1) * steps + step, config.epochs * steps)
        inputs = _prepare(images, preprocess, device, memory_format)
        labels = labels.to(device)
        loss, logits = training_step(network, optimizer, inputs, labels, config.precision)
        if not torch.isfinite(loss):
            raise DivergedError(f"training diverged: loss {loss.item()} at epoch {epoch}, step {step + 1} "
                                f"(config.lr {config.lr:g}); lower config.lr or check the data")
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
        progress.update(loss=loss.item(), acc=correct / seen)
    return loss_sum, correct, seen


def _start(model: nn.Module, config: TrainConfig, run_dir: str | None, resume: bool, overwrite: bool,
           identity: dict, device: str, processes: Distributed, log) -> tuple[torch.optim.Optimizer, dict]:
    """Model on its device and layout, the optimizer, and the state to continue from (fresh or resumed)."""
    path = os.path.join(run_dir, "last.pt") if run_dir is not None else None
    if path is not None and processes.main and os.path.isdir(run_dir):
        clean_temporary_files(run_dir)  # left by a run killed while writing a checkpoint
    if path is not None and not resume and not overwrite and os.path.exists(path):
        raise UsageError("run_dir", f"{path} already holds a run; pass resume=True to continue it or "
                                    "overwrite=True to replace it")
    torch.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if processes.world_size > 1:  # before the optimizer is made: the conversion creates new parameters
        convert_batchnorm(model, device)
    optimizer = _optimizer(model, config)
    state = {"history": [], "best": {"valid_loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())},
             "start_epoch": 1}
    if resume and path is not None and os.path.exists(path):
        checkpoint = load_checkpoint(path, device)
        _restore(checkpoint, path, identity, model, optimizer)
        state = {"history": checkpoint["history"], "best": checkpoint["best"], "start_epoch": checkpoint["epoch"] + 1}
        log(f"resumed {run_dir} after epoch {checkpoint['epoch']}")
    elif resume:
        log(f"resume: no checkpoint in {run_dir}; starting from scratch")
    return optimizer, state


def train(model: nn.Module, train_data, valid_data, config: TrainConfig, run_dir: str | None = None, *,
          preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "cpu", processes: Distributed | None = None,
          identity: dict | None = None, log=print, workers: int = 0) -> dict:
    """Train ``model`` (in place); return ``{"best_state", "best_epoch", "best_valid_loss", "history"}``.

    Args:
        model: any classifier ``(B, C, H, W) -> (B, classes)``.
        train_data, valid_data: map-style datasets of ``(image, label)`` or DataLoaders (a DataLoader's own
            batches and order are used; ``config.batch_size`` then does not apply).
        config: :class:`TrainConfig`.
        run_dir: where ``last.pt`` (everything needed to continue) is written atomically after every epoch
            (rank 0); None keeps no checkpoint.
        preprocess: applied to every input batch on ``device`` (e.g. a :class:`mobilenet.Normalizer`).
        resume: continue after the last finished epoch of ``run_dir/last.pt``; ``identity`` (a description
            of model and data) is stored and must match. Without it an existing checkpoint is refused unless
            ``overwrite=True``.
        device, processes, log, workers: where to train, the torchrun processes (default: this one alone),
            where progress lines go, DataLoader workers that read the next batches.

    The weights with the lowest validation loss are kept (``best_state``, also in the checkpoint). A
    non-finite loss, or a run in which no epoch improved on the untrained model's validation loss, raises
    :class:`DivergedError`; bad settings raise :class:`UsageError` naming the config field or argument.
    """
    if not isinstance(config, TrainConfig):
        raise UsageError("config", f"expected a TrainConfig, got {type(config).__name__}")
    config.validate()
    _check_data(train_data, "train_data")
    _check_data(valid_data, "valid_data")
    if preprocess is not None and not callable(preprocess):
        raise UsageError("preprocess", f"expected a callable or None, got {type(preprocess).__name__}")
    processes = processes or Distributed()
    if config.batch_size % processes.world_size:
        raise UsageError("config.batch_size", f"{config.batch_size} does not split evenly over "
                                              f"{processes.world_size} processes")
    quiet = log if processes.main else (lambda *a, **k: None)
    config = replace(config, precision=resolve_precision(config.precision, device, quiet),
                     stain_jitter=resolve_stain_jitter(config.stain_jitter, train_data, quiet))
    identity = {"config": asdict(config), **(identity or {})}
    if isinstance(preprocess, nn.Module):
        preprocess = preprocess.to(device)
    optimizer, state = _start(model, config, run_dir, resume, overwrite, identity, device, processes, quiet)
    history, best = state["history"], state["best"]
    network: nn.Module = model
    if processes.world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[processes.local_rank] if device.startswith("cuda") else None
        )
    for epoch in range(state["start_epoch"], config.epochs + 1):
        batches, steps = _train_batches(train_data, config, epoch, processes, workers, device)
        progress = Progress(steps, f"epoch {epoch}/{config.epochs} train", processes.main)
        loss_sum, correct, seen = processes.sum(list(_train_epoch(network, optimizer, batches, steps, preprocess,
                                                                  config, epoch, device, progress)))
        valid_loss, valid_accuracy = evaluate_loss(model, valid_data, preprocess, config.batch_size * 2, device,
                                                   processes, f"epoch {epoch}/{config.epochs} valid")
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "valid_loss": valid_loss, "valid_accuracy": valid_accuracy}
        history.append(record)
        if valid_loss < best["valid_loss"]:
            best = {"valid_loss": valid_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if processes.main:
            log(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f} acc "
                f"{record['train_accuracy']:.3f} | valid loss {valid_loss:.4f} acc {valid_accuracy:.3f}"
                f"{' (best)' if best['epoch'] == epoch else ''}")
            if run_dir is not None:
                save_atomically({"identity": identity, "epoch": epoch, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                 "history": history, "best": best}, os.path.join(run_dir, "last.pt"))
        processes.barrier()
    if best["epoch"] == 0:
        raise DivergedError(f"training never produced a finite validation loss (last: "
                            f"{history[-1]['valid_loss'] if history else 'none'}); nothing to evaluate")
    return {"best_state": best["state"], "best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
            "history": history}
