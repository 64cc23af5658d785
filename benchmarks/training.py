"""Training for the PCam benchmark: D4 augmentation, model selection on validation loss, atomic per-epoch
checkpoints with resume, progress output, and data-parallel training with torch.distributed (torchrun).

Data parallelism: every global batch (the same for any number of processes, drawn from a seeded
permutation) is split evenly over the processes; gradients are averaged by DistributedDataParallel and
batch-norm statistics are computed over the whole global batch (torch's SyncBatchNorm on GPUs,
:class:`CrossProcessBatchNorm` on CPUs, where SyncBatchNorm is not supported), so a run on R processes
computes what a run on one process does with the same seeds, up to floating-point summation order.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.nn import all_reduce  # differentiable: the backward pass all-reduces too
import torch.nn as nn
import torch.nn.functional as F

from rotconv.validation import check_positive_int

from .common import atomic_write, clean_temporary_files, differences
from .data import Normalizer, PCamError, PCamSplit, augment_batch

__all__ = ["UsageError", "DivergedError", "load_checkpoint", "training_step", "TrainConfig", "PRECISIONS", "bf16_supported", "resolve_precision", "Distributed", "CrossProcessBatchNorm", "train", "save_atomically", "Progress",
           "evaluate_loss"]


class UsageError(ValueError):
    """A setting or a checkpoint does not fit the run (the message names the option or file)."""


@dataclass
class TrainConfig:
    """Optimisation settings (stored in every checkpoint; a resumed run must match them)."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    augment: bool = True
    seed: int = 0
    precision: str = "auto"
    channels_last: bool = True

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")


#: Training precisions: "bf16" runs forward and backward under bfloat16 autocast (batch-norm statistics, the
#: loss, the optimizer and checkpoints stay float32); "auto" is bf16 where the device has bf16 kernels.
PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` has fast bfloat16 kernels (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


# -- processes ---------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: str) -> "Distributed":
        """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all processes (any input ``(B, C, *)``), for CPU process groups.

    Per-channel sums and sums of squares are all-reduced with the differentiable
    ``torch.distributed.nn.all_reduce``, so the backward pass also sees the whole batch. Parameters and
    buffers are named as in :class:`torch.nn.BatchNorm2d` (state dicts are interchangeable).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input: expected (B, C, ...), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # two passes (mean, then centred squares), accumulated in float64 as torch's CPU batch norm does
        count = torch.tensor([x.numel() / channels], dtype=torch.float64)
        sums = all_reduce(torch.cat([x.sum(dims, dtype=torch.float64), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        centred = x - mean.to(x.dtype).reshape(shape)
        var = all_reduce((centred * centred).sum(dims, dtype=torch.float64)) / total
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = centred * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def convert_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Make every batch norm of ``model`` compute its statistics over all processes."""
    if device == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
            reference = module.running_mean if module.running_mean is not None else module.weight
            replacement = CrossProcessBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                                module.track_running_stats, device=reference.device,
                                                dtype=reference.dtype)
            replacement.load_state_dict(module.state_dict())
            replacement.train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return model


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
    """``torch.save`` through :func:`benchmarks.common.atomic_write` (never a half-written file)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


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


def _epoch_plan(config: TrainConfig, epoch: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample order and D4 augmentation of ``epoch``: a function of (seed, epoch) alone."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(size)
    turns = rng.integers(0, 4, size) if config.augment else np.zeros(size, dtype=np.int64)
    flips = rng.integers(0, 2, size) if config.augment else np.zeros(size, dtype=np.int64)
    return order, turns, flips


class _EpochBatches(torch.utils.data.Dataset):
    """Item ``step`` = this process's share of global batch ``step`` of an epoch, read and augmented: a
    DataLoader with workers prepares the next batches while the current one trains (the same batches,
    in the same order, whatever the number of workers)."""

    def __init__(self, split: PCamSplit, order: np.ndarray, turns: np.ndarray, flips: np.ndarray,
                 batch_size: int, rank: int, local: int, steps: int) -> None:
        self.split, self.order, self.turns, self.flips = split, order, turns, flips
        self.batch_size, self.rank, self.local, self.steps = batch_size, rank, local, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        start = step * self.batch_size + self.rank * self.local
        chosen = self.order[start:start + self.local]
        try:
            images, labels = self.split.batch(chosen)
        except PCamError as error:  # returned, not raised: a worker's exception would carry its traceback text
            return str(error)
        return augment_batch(images, torch.from_numpy(self.turns[chosen]), torch.from_numpy(self.flips[chosen])), labels


@torch.no_grad()
def evaluate_loss(model: nn.Module, split: PCamSplit, normalizer: Normalizer, batch_size: int, device: str,
                  processes: Distributed, description: str = "valid", show: bool = True) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (shared out over the processes)."""
    model.eval()
    positions = np.arange(len(split))[processes.rank::processes.world_size]
    loss_sum = correct = 0.0
    progress = Progress(math.ceil(len(positions) / batch_size), description, show and processes.main)
    for start in range(0, len(positions), batch_size):
        images, labels = split.batch(positions[start:start + batch_size])
        logits = model(normalizer(images.to(device)))
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        progress.update()
    loss_sum, correct, count = processes.sum([loss_sum, correct, float(len(positions))])
    return loss_sum / count, correct / count


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, or never produced a model better than its initialisation."""


CHECKPOINT_KEYS = ("identity", "epoch", "model", "optimizer", "rng", "history", "best")


def load_checkpoint(path: str, device: str = "cpu") -> dict:
    """Read a training checkpoint written by :func:`train`; every failure is a :class:`UsageError` naming
    ``path`` (missing, a directory, empty, truncated, not a checkpoint, or another program's file)."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"{path}: checkpoint not found") from None
    except Exception as error:  # torch.load raises EOFError, UnpicklingError, RuntimeError, ... for bad files
        kind = "empty" if os.path.getsize(path) == 0 else "truncated or not a checkpoint"
        raise UsageError(f"{path}: unreadable checkpoint ({kind}: {type(error).__name__}); delete it or start "
                         "the run with --overwrite") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"{path}: not a checkpoint of this trainer (missing {', '.join(missing)}); delete it or "
                         "start the run with --overwrite")
    return checkpoint


def _restore(checkpoint: dict, path: str, identity: dict, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> None:
    changed = differences(checkpoint["identity"], identity)
    if changed:
        raise UsageError(f"--resume: {path} belongs to another run; what differs (checkpoint -> this run): "
                         + "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
                         + ". Use another --runs directory, or --overwrite to start afresh")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f"{path}: the checkpoint does not fit this model ({str(error).splitlines()[0]})") from None


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


def _train_epoch(network: nn.Module, optimizer: torch.optim.Optimizer, batches: torch.utils.data.Dataset,
                 normalizer: Normalizer, config: TrainConfig, epoch: int, steps_per_epoch: int, device: str,
                 workers: int, progress: Progress) -> tuple[float, float]:
    """One epoch of optimizer steps; returns this process's (loss sum, correct count). A non-finite loss
    stops training (:class:`DivergedError`)."""
    network.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         pin_memory=device.startswith("cuda"))
    loss_sum = correct = seen = 0.0
    for step, item in enumerate(loader):
        if isinstance(item, str):  # a data error in a worker, passed on as its message
            raise PCamError(item)
        images, labels = item
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, (epoch - 1) * steps_per_epoch + step, config.epochs * steps_per_epoch)
        inputs = normalizer(images.to(device)).contiguous(memory_format=memory_format)
        labels = labels.to(device)
        loss, logits = training_step(network, optimizer, inputs, labels, config.precision)
        if not torch.isfinite(loss):
            raise DivergedError(f"training diverged: loss {loss.item()} at epoch {epoch}, step {step + 1} (lr "
                                f"{config.lr:g}); lower --lr or check the data")
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
        progress.update(loss=loss.item(), acc=correct / seen)
    return loss_sum, correct


def train(model: nn.Module, train_split: PCamSplit, valid_split: PCamSplit, normalizer: Normalizer,
          config: TrainConfig, run_dir: str, resume: bool = False, device: str = "cpu",
          processes: Distributed | None = None, identity: dict | None = None, log=print, workers: int = 0,
          overwrite: bool = False) -> dict:
    """Train ``model`` (in place); return ``{"best_state", "best_epoch", "best_valid_loss", "history"}``.

    After every epoch, ``run_dir/last.pt`` (everything needed to continue) is written atomically by rank 0;
    with ``resume=True`` a run continues after the last finished epoch of ``run_dir/last.pt``. ``identity``
    (model and data description) is stored and must match on resume. Without ``resume`` an existing
    checkpoint is refused unless ``overwrite=True``. The weights with the lowest validation loss are kept
    (``best_state``, also in the checkpoint). A non-finite loss, or a run in which no epoch improved on the
    untrained model's validation loss, raises :class:`DivergedError`.
    """
    config.validate()
    processes = processes or Distributed()
    if config.batch_size % processes.world_size:
        raise UsageError(f"--batch-size: {config.batch_size} does not split evenly over "
                         f"{processes.world_size} processes")
    quiet = log if processes.main else (lambda *a, **k: None)
    config = replace(config, precision=resolve_precision(config.precision, device, quiet))
    identity = {"config": asdict(config), **(identity or {})}
    path = os.path.join(run_dir, "last.pt")
    if processes.main and os.path.isdir(run_dir):
        clean_temporary_files(run_dir)  # left by a run killed while writing a checkpoint
    if not resume and not overwrite and os.path.exists(path):
        raise UsageError(f"--runs: {path} already holds a run; pass --resume to continue it or --overwrite to "
                         "replace it")
    torch.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if processes.world_size > 1:  # before the optimizer is made: the conversion creates new parameters
        convert_batchnorm(model, device)
    optimizer = _optimizer(model, config)
    history: list[dict] = []
    best = {"valid_loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    start_epoch = 1
    if resume and os.path.exists(path):
        checkpoint = load_checkpoint(path, device)
        _restore(checkpoint, path, identity, model, optimizer)
        history, best = checkpoint["history"], checkpoint["best"]
        start_epoch = checkpoint["epoch"] + 1
        quiet(f"resumed {run_dir} after epoch {checkpoint['epoch']}")
    elif resume:
        quiet(f"resume: no checkpoint in {run_dir}; starting from scratch")

    network: nn.Module = model
    if processes.world_size > 1:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[processes.local_rank] if device == "cuda" else None)
    steps_per_epoch = len(train_split) // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size: {config.batch_size} is larger than the training set ({len(train_split)})")
    local = config.batch_size // processes.world_size
    for epoch in range(start_epoch, config.epochs + 1):
        order, turns, flips = _epoch_plan(config, epoch, len(train_split))
        batches = _EpochBatches(train_split, order, turns, flips, config.batch_size, processes.rank, local,
                                steps_per_epoch)
        progress = Progress(steps_per_epoch, f"epoch {epoch}/{config.epochs} train", processes.main)
        loss_sum, correct = _train_epoch(network, optimizer, batches, normalizer, config, epoch, steps_per_epoch,
                                         device, workers, progress)
        loss_sum, correct = processes.sum([loss_sum, correct])
        seen = steps_per_epoch * config.batch_size
        valid_loss, valid_accuracy = evaluate_loss(model, valid_split, normalizer, config.batch_size * 2,
                                                   device, processes, f"epoch {epoch}/{config.epochs} valid")
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "valid_loss": valid_loss, "valid_accuracy": valid_accuracy}
        history.append(record)
        if valid_loss < best["valid_loss"]:
            best = {"valid_loss": valid_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if processes.main:
            log(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f} acc "
                f"{record['train_accuracy']:.3f} | valid loss {valid_loss:.4f} acc {valid_accuracy:.3f}"
                f"{' (best)' if best['epoch'] == epoch else ''}")
            save_atomically({"identity": identity, "epoch": epoch, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                             "history": history, "best": best}, path)
        processes.barrier()
    if best["epoch"] == 0:
        raise DivergedError(f"training never produced a finite validation loss (last: "
                            f"{history[-1]['valid_loss'] if history else 'none'}); nothing to evaluate")
    return {"best_state": best["state"], "best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
            "history": history}
