"""Training any classifier on any map-style dataset (or DataLoader): seeded D4 augmentation, bf16 autocast,
model selection on validation loss, atomic per-epoch checkpoints with resume, progress output, and
data-parallel training with torch.distributed (torchrun).

    config = TrainConfig(epochs=10, batch_size=32)
    result = train(model, train_data, valid_data, config, run_dir="runs/mine", preprocess=normalizer)
    model.load_state_dict(result["best_state"])

Items of a dataset are ``(image, label)`` pairs; a dataset with a ``batch(positions)`` method (such as
:class:`mobilenet.PCam`) is read a batch at a time. ``preprocess`` (e.g. a :class:`mobilenet.Normalizer`)
runs on each batch on the training device. Errors name the config field or argument at fault
(:class:`UsageError`), never a command-line option.

Data parallelism: every global batch (the same for any number of processes, drawn from a seeded
permutation) is split evenly over the processes; gradients are averaged by DistributedDataParallel and
batch-norm statistics are computed over the whole global batch (:mod:`mobilenet.training.distributed`), so a run on R
processes computes what a run on one process does with the same seeds, up to floating-point summation order.
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import pickle
import warnings
from dataclasses import asdict, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rotconv.files import clean_temporary_files
from rotconv.modes import eval_mode

from ..data import PCamError, augment_batch, stain_jitter
from ..inference import CPU_BATCH_SIZE
from .checkpoints import load_checkpoint, restore_checkpoint, save_atomically
from .config import DivergedError, TrainConfig, UsageError, resolve_precision, resolve_stain_jitter
from .distributed import Distributed, convert_batchnorm
from .progress import Progress

__all__ = ["train", "training_step", "evaluate_loss", "learning_rate", "patience_spent"]


# -- data --------------------------------------------------------------------------------------------------
def _reader(data: torch.utils.data.Dataset, name: str) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """``positions -> (images (B, C, H, W), labels (B,))`` for a map-style dataset: its own ``batch`` method
    where it has one, else its items stacked (:class:`_ItemReader`; both pickle, as DataLoader workers started
    by "spawn" or "forkserver" need, where the dataset does)."""
    return data.batch if hasattr(data, "batch") else _ItemReader(data, name)


class _ItemReader:
    """Reads ``positions`` of a dataset of ``(image, label)`` items, one item at a time."""

    def __init__(self, data: torch.utils.data.Dataset, name: str) -> None:
        self.data, self.name = data, name

    def __call__(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for position in positions:
            item = self.data[int(position)]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise UsageError(self.name, f"items must be (image, label) pairs, got {type(item).__name__}")
            images.append(torch.as_tensor(item[0]))
            labels.append(_class_indices(item[1], 1, self.name, f"item {int(position)}"))
        return torch.stack(images), torch.cat(labels)


def _class_indices(labels, count: int, name: str, where: str) -> torch.Tensor:
    """The labels of ``count`` images as int64 class indices ``(count,)``: integers (whole-number floats too),
    one per image in any shape of ``count`` elements (PCam's label files hold ``(N, 1, 1, 1)``). A
    :class:`UsageError` naming ``name`` and ``where`` (an item or a batch) for anything else: a fractional
    or soft label would otherwise be truncated or read as class probabilities."""
    try:
        values = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(name, f"{where}: label {labels!r} is not a class index") from None
    if values.numel() != count:
        raise UsageError(name, f"{where}: labels of shape {tuple(values.shape)} for {count} image(s); expected "
                               "one class index per image")
    values = values.reshape(count)
    if values.dtype == torch.bool or values.is_complex() or (values.is_floating_point() and not bool(
            (torch.isfinite(values) & (values == values.round())).all())):
        example = values[0].item() if values.dtype == torch.bool or values.is_complex() else next(
            value for value in values.tolist() if not (math.isfinite(value) and value == round(value)))
        raise UsageError(name, f"{where}: labels must be integer class indices, got {values.dtype} value "
                               f"{example!r}")
    return values.long()


def _check_classes(labels: torch.Tensor, classes: int, name: str, where: str) -> None:
    """:class:`UsageError` naming ``name`` and ``where`` when a label (int64 ``(B,)``) is not a class index of
    a model with ``classes`` outputs."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        label = next(value for value in labels.tolist() if not 0 <= value < classes)
        raise UsageError(name, f"{where} holds label {label}, not a class of the model's {classes} outputs "
                               f"(0-{classes - 1})")


def _output_classes(network: nn.Module, inputs: torch.Tensor, name: str) -> int:
    """The number of classes ``network`` (or the model a DistributedDataParallel wraps) answers for, from one
    input in eval mode without gradients (the model's own input checks run: a :class:`UsageError` naming
    ``name`` when it refuses the batch)."""
    model = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    with torch.no_grad(), eval_mode(model):
        try:
            return int(model(inputs[:1]).shape[-1])
        except ValueError as error:
            raise UsageError(name, f"the model refuses its first batch: {error}") from None


def _check_data(data: object, name: str) -> None:
    if isinstance(data, torch.utils.data.DataLoader):
        return
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise UsageError(name, f"expected a map-style dataset (__getitem__ and __len__) or a DataLoader, got "
                               f"{type(data).__name__}")
    if len(data) == 0:
        raise UsageError(name, "the dataset is empty")


@torch.no_grad()
def _check_fits_model(model: nn.Module, data, name: str, preprocess: Callable | None, device: str) -> int | None:
    """Before any step: the first and last items of a map-style ``data``, read as training reads them, go
    through ``preprocess`` and ``model`` (eval mode: the model's own input checks, such as MobileNetV2's refusal
    of raw 0-255 pixels, run only there), and their labels are class indices of the model's output. Returns
    the model's number of classes. A DataLoader is not checked here (its collate function may change what the
    items are; its batches are checked as they come) and gives None."""
    if isinstance(data, torch.utils.data.DataLoader):
        return None
    positions = np.unique([0, len(data) - 1])
    images, labels = _reader(data, name)(positions)
    with eval_mode(model):
        try:
            logits = model(_prepare(images, preprocess, device, torch.contiguous_format))
        except UsageError:  # preprocess missing for uint8 images: it names its argument already
            raise
        except ValueError as error:  # the model's own input checks
            raise UsageError(name, f"the model refuses its items {', '.join(map(str, positions))}: {error}") from None
    classes = int(logits.shape[-1])
    for position, label in zip(positions.tolist(), labels.tolist()):
        _check_classes(torch.tensor([label]), classes, name, f"item {position}")
    return classes


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


class _TrainSteps(torch.utils.data.Dataset):
    """Item ``(epoch, step)`` = this process's share of global batch ``step`` of ``epoch``, read and augmented
    by the epoch's plan (:func:`_epoch_plan`, a function of (seed, epoch) alone, made where the item is read
    and kept for the epoch's other steps). One DataLoader over it serves the whole training: its workers start
    once, not once an epoch, and prepare the next batches while the current one trains (the same batches, in
    the same order, whatever the number of workers)."""

    def __init__(self, read: Callable, config: TrainConfig, size: int, rank: int, local: int, steps: int) -> None:
        self.read, self.config, self.size = read, config, size
        self.rank, self.local, self.steps = rank, local, steps
        self.planned: tuple[int, tuple] | None = None  # (epoch, its plan)

    def __len__(self) -> int:
        return self.steps

    def plan(self, epoch: int) -> tuple[np.ndarray, ...]:
        if self.planned is None or self.planned[0] != epoch:
            self.planned = (epoch, _epoch_plan(self.config, epoch, self.size))
        return self.planned[1]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | str:
        epoch, step = key
        order, turns, flips, stains = self.plan(epoch)
        start = step * self.config.batch_size + self.rank * self.local
        positions = slice(start, start + self.local)  # into the epoch's order (and its augmentation)
        try:
            images, labels = self.read(order[positions])
        except PCamError as error:  # returned, not raised: a worker's exception would carry its traceback text
            return str(error)
        images = _apply_stain_jitter(images, None if stains is None else stains[positions])
        return augment_batch(images, torch.from_numpy(turns[positions]),
                             torch.from_numpy(flips[positions])), labels


class _EpochSteps(torch.utils.data.Sampler):
    """The keys ``(epoch, 0), ..., (epoch, steps - 1)`` of :class:`_TrainSteps`, for the epoch last set."""

    def __init__(self, steps: int) -> None:
        self.steps, self.epoch = steps, 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, step) for step in range(self.steps))

    def __len__(self) -> int:
        return self.steps


class _TrainBatches:
    """This process's (augmented) training batches, epoch by epoch: :meth:`epoch` gives an epoch's batches and
    their number (a DataLoader's own length; ``config.steps_per_epoch`` applies to datasets). For a dataset,
    one DataLoader for the whole training, its ``workers`` persistent: where they are started by "spawn" or
    "forkserver" the data is pickled to them once, not once an epoch."""

    def __init__(self, data, config: TrainConfig, processes: Distributed, workers: int, device: str) -> None:
        self.data, self.config, self.workers, self.loader = data, config, workers, None
        if isinstance(data, torch.utils.data.DataLoader):  # the loader decides order and batches; D4 is ours
            return
        if len(data) < config.batch_size:
            raise UsageError("config.batch_size", f"{config.batch_size} is larger than the training set ({len(data)})")
        read = _reader(data, "train_data")
        if config.stain_jitter:  # checked here: raised inside a loader worker, the error would lose its type
            _apply_stain_jitter(read(np.zeros(1, dtype=np.int64))[0], np.zeros((1, 2, 3)))
        steps = config.steps_per_epoch or len(data) // config.batch_size
        local = config.batch_size // processes.world_size
        self.sampler = _EpochSteps(steps)
        self.loader = torch.utils.data.DataLoader(
            _TrainSteps(read, config, len(data), processes.rank, local, steps), batch_size=None,
            sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.startswith("cuda"))

    def epoch(self, epoch: int) -> tuple[Iterator, int]:
        if self.loader is None:
            return self._loader_batches(epoch), len(self.data)
        self.sampler.epoch = epoch
        return _start_workers(self.loader, self.workers), self.sampler.steps

    def _loader_batches(self, epoch: int) -> Iterator:
        config, rng = self.config, np.random.default_rng([self.config.seed, epoch])
        for item in self.data:
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


def _start_workers(loader: torch.utils.data.DataLoader, workers: int) -> Iterator:
    """``iter(loader)``: its worker processes start here. Where they are started by "spawn" or "forkserver"
    (macOS and Windows; Linux from Python 3.14) the data is pickled to them, and data that cannot be raises a
    :class:`UsageError` naming ``workers`` (torch would raise a bare pickling error from deep inside)."""
    try:
        with warnings.catch_warnings():  # torch's own note on the same failure, in favour of the error below
            warnings.filterwarnings("ignore", message="Got pickle error")
            return iter(loader)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        if not workers:
            raise
        method = multiprocessing.get_start_method()
        raise UsageError("workers", f"{workers} worker process(es) started by {method!r} need the training data "
                                    f"to pickle, and it does not ({type(error).__name__}: {error}); use "
                                    "workers=0, or a dataset that opens its files on first access") from None


def _eval_batches(data, batch_size: int, processes: Distributed, name: str) -> tuple[Iterator, int, int]:
    """(batches, their number, examples) of this process's share of ``data`` for evaluation."""
    if isinstance(data, torch.utils.data.DataLoader):
        return ((item[0], item[1]) for item in data), len(data), len(data.dataset)
    positions = np.arange(len(data))[processes.rank::processes.world_size]
    read = _reader(data, name)
    batches = (read(positions[start:start + batch_size]) for start in range(0, len(positions), batch_size))
    return batches, math.ceil(len(positions) / batch_size), len(positions)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, preprocess: Callable | None, batch_size: int, device: str = "cpu",
                  processes: Distributed | None = None, description: str = "valid",
                  show: bool = True, name: str = "data") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (a dataset or DataLoader; shared out over
    the processes), in eval mode; the model is left in the mode it came in. Labels that are not class
    indices of the model's output raise :class:`UsageError` naming ``name`` and the batch."""
    processes = processes or Distributed()
    batches, count, examples = _eval_batches(data, batch_size, processes, name)
    loss_sum = correct = 0.0
    progress = Progress(count, description, show and processes.main)
    with eval_mode(model):  # the caller's mode is given back afterwards
        for batch, (images, labels) in enumerate(batches, 1):
            labels = _class_indices(labels, images.shape[0], name, f"batch {batch}")
            logits = model(_prepare(images, preprocess, device, torch.contiguous_format))
            _check_classes(labels, logits.shape[-1], name, f"batch {batch}")
            labels = labels.to(device)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            progress.update()
    loss_sum, correct, examples = processes.sum([loss_sum, correct, float(examples)])
    return loss_sum / examples, correct / examples


# -- training ----------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay,
                           nesterov=True)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) of ``total_steps``: linear warm-up over
    ``config.warmup_steps``, then ``config.schedule`` (cosine to 0 at the end, or constant) over the rest."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    step, total_steps = step - config.warmup_steps, total_steps - config.warmup_steps
    return 0.5 * config.lr * (1 + math.cos(math.pi * step / max(total_steps, 1)))


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
                  precision: str, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; forward and backward under bf16 autocast for ``precision="bf16"``
    (loss and optimizer in float32), cross-entropy with ``label_smoothing``. Returns the (float32) loss and
    logits. A non-finite loss is returned without a step, so the weights stay as they were."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = network(inputs)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss, logits


def _train_epoch(network: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, steps: int,
                 preprocess: Callable | None, config: TrainConfig, epoch: int, device: str,
                 progress: Progress, classes: int | None = None) -> tuple[float, float, float]:
    """One epoch of optimizer steps; returns this process's (loss sum, correct count, examples). A
    non-finite loss stops training (:class:`DivergedError`); labels that are not class indices of the
    model's ``classes`` outputs (None: asked of the model on the first batch) raise :class:`UsageError`."""
    network.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    loss_sum = correct = seen = 0.0
    for step, item in enumerate(batches):
        if isinstance(item, str):  # a data error in a worker, passed on as its message
            raise PCamError(item)
        images, labels = item
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, (epoch - 1) * steps + step, config.epochs * steps)
        where = f"epoch {epoch}, batch {step + 1}"
        labels = _class_indices(labels, images.shape[0], "train_data", where)
        inputs = _prepare(images, preprocess, device, memory_format)
        if classes is None:
            classes = _output_classes(network, inputs, "train_data")
        _check_classes(labels, classes, "train_data", where)
        labels = labels.to(device)
        loss, logits = training_step(network, optimizer, inputs, labels, config.precision, config.label_smoothing)
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
        restore_checkpoint(checkpoint, path, identity, model, optimizer)
        state = {"history": checkpoint["history"], "best": checkpoint["best"], "start_epoch": checkpoint["epoch"] + 1}
        log(f"resumed {run_dir} after epoch {checkpoint['epoch']}")
    elif resume:
        log(f"resume: no checkpoint in {run_dir}; starting from scratch")
    return optimizer, state


def train(model: nn.Module, train_data, valid_data, config: TrainConfig, run_dir: str | None = None, *,
          preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "cpu", processes: Distributed | None = None,
          identity: dict | None = None, log=print, workers: int = 0) -> dict:
    """Train ``model`` (in place); return ``{"best_state", "best_epoch", "best_valid_loss", "history",
    "stopped_epoch"}`` (the last epoch of a run ended by ``config.patience``, else None).

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
            where progress lines go, DataLoader workers that read the next batches (started once for the whole
            training, not once an epoch; where the platform starts them by "spawn" or "forkserver", the dataset
            must pickle, :class:`mobilenet.PCam` does, and is pickled to each worker once).

    The weights with the lowest validation loss are kept (``best_state``, also in the checkpoint); ``model``
    is returned holding the last epoch's weights, in eval mode. A
    non-finite loss, or a run in which no epoch improved on the untrained model's validation loss, raises
    :class:`DivergedError`; bad settings raise :class:`UsageError` naming the config field or argument, and so
    does data the model cannot take, before the first step: the first and last items of each dataset go
    through ``preprocess`` and the model in eval mode (MobileNetV2 refuses raw 0-255 pixels there) and their
    labels must be class indices of its output; every later batch's labels are checked before its step
    (integers, or whole-number floats, one per image in any shape: PCam's ``(N, 1, 1, 1)`` files too).
    """
    if not isinstance(config, TrainConfig):
        raise UsageError("config", f"expected a TrainConfig, got {type(config).__name__}")
    config.validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError("workers", f"expected an integer >= 0, got {workers!r}")
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
    # patience only decides when to stop, not what a step does: a resumed run may change it
    identity = {"config": {k: v for k, v in asdict(config).items() if k != "patience"}, **(identity or {})}
    if isinstance(preprocess, nn.Module):
        preprocess = preprocess.to(device)
    optimizer, state = _start(model, config, run_dir, resume, overwrite, identity, device, processes, quiet)
    classes = _check_fits_model(model, train_data, "train_data", preprocess, device)  # not after an epoch
    _check_fits_model(model, valid_data, "valid_data", preprocess, device)
    history, best = state["history"], state["best"]
    # no gradients: a GPU takes twice the training batch; a CPU is fastest at small batches (CPU_BATCH_SIZE)
    valid_batch = config.batch_size * 2 if device.startswith("cuda") else CPU_BATCH_SIZE
    network: nn.Module = model
    if processes.world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[processes.local_rank] if device.startswith("cuda") else None
        )
    train_batches = _TrainBatches(train_data, config, processes, workers, device)
    stopped = None
    for epoch in range(state["start_epoch"], config.epochs + 1):
        if patience_spent(history, best["epoch"], config.patience):
            stopped = epoch - 1
            if processes.main:
                log(f"early stop after epoch {stopped}: no lower validation loss in {config.patience} epochs "
                    f"(best: epoch {best['epoch']}, {best['valid_loss']:.4f})")
            break
        batches, steps = train_batches.epoch(epoch)
        progress = Progress(steps, f"epoch {epoch}/{config.epochs} train", processes.main)
        loss_sum, correct, seen = processes.sum(list(_train_epoch(network, optimizer, batches, steps, preprocess,
                                                                  config, epoch, device, progress, classes)))
        valid_loss, valid_accuracy = evaluate_loss(model, valid_data, preprocess, valid_batch, device,
                                                   processes, f"epoch {epoch}/{config.epochs} valid",
                                                   name="valid_data")
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
    model.eval()
    return {"best_state": best["state"], "best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
            "history": history, "stopped_epoch": stopped}


def patience_spent(history: list[dict], best_epoch: int, patience: int | None) -> bool:
    """Whether early stopping ends a run whose finished epochs are ``history`` (records with ``"epoch"``)
    and whose lowest validation loss came at ``best_epoch``: ``patience`` epochs after it without a lower one
    (never for ``patience`` None or an empty history)."""
    return patience is not None and bool(history) and history[-1]["epoch"] - best_epoch >= patience
