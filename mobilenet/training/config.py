"""The training recipe (:class:`TrainConfig`, whose defaults are the recommended ones), the precision and
stain-jitter choices resolved for a device and data set, and the errors a run reports."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rotconv.hardware import has_native_bf16, onednn_has_bf16
from rotconv.validation import check_int

__all__ = ["UsageError", "DivergedError", "TrainConfig", "PRECISIONS", "bf16_supported", "resolve_precision",
           "resolve_stain_jitter", "STAIN_JITTER"]


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
        stain_jitter: strength ``sigma`` of H&E stain augmentation (:func:`mobilenet.data.stain_jitter`): per
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
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr`` over the first
            ``warmup_steps`` optimizer steps, then follows ``schedule`` over the rest (0: no warm-up).
        label_smoothing: the training loss's label smoothing (as :func:`torch.nn.functional.cross_entropy`);
            validation loss, and so model selection, is always plain cross-entropy.
        patience: early stopping: end the run once ``patience`` epochs in a row have not lowered the best
            validation loss (None: train all ``epochs``). The schedule is still planned over ``epochs``, so a
            stopped run ends where it stopped improving, not at a shortened schedule's end. Not part of a
            run's identity: a resumed run may change it, and one that had already stopped stays stopped.
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
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    patience: int | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first field that is out of range (integer fields given as numpy
        or 0-d torch integers become plain ints)."""
        # integer fields: (name, minimum, None allowed); numpy or 0-d torch integers are stored as plain ints
        for name, minimum, optional in (("epochs", 1, False), ("batch_size", 1, False), ("steps_per_epoch", 1, True),
                                        ("warmup_steps", 0, False), ("patience", 1, True), ("seed", 0, False)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            try:
                setattr(self, name, check_int(value, name, minimum=minimum))
            except ValueError as error:
                raise UsageError(f"config.{name}", str(error).split(": ", 1)[1]
                                 + (" (or None)" if optional else "")) from None
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError("config.lr", f"expected a finite positive learning rate, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise UsageError("config.weight_decay", f"expected a finite number >= 0, got {self.weight_decay!r}")
        if self.stain_jitter is not None and not (
            isinstance(self.stain_jitter, (int, float))
            and not isinstance(self.stain_jitter, bool)
            and 0 <= self.stain_jitter < 1
        ):
            raise UsageError("config.stain_jitter", f"expected a number in [0, 1), got {self.stain_jitter!r}")
        if isinstance(self.label_smoothing, bool) or not (isinstance(self.label_smoothing, (int, float))
                                                          and 0 <= self.label_smoothing < 1):
            raise UsageError("config.label_smoothing", f"expected a number in [0, 1), got {self.label_smoothing!r}")
        choices = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "constant"), "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"config.{name}", f"expected one of {allowed}, got {getattr(self, name)!r}")


#: Training precisions: "bf16" runs forward and backward under bfloat16 autocast (batch-norm statistics, the
#: loss, the optimizer and checkpoints stay float32); "auto" is bf16 where the device has bf16 kernels.
PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` has fast bfloat16 kernels: CUDA with bf16, or a CPU with native bf16 instructions
    (:func:`rotconv.hardware.has_native_bf16`: AVX512-BF16/AMX on x86; not AVX-512 CPUs without them, where
    oneDNN emulates bf16 and trains slower than in float32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return has_native_bf16()


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
    """``"bf16"`` or ``"fp32"``: ``"auto"`` picks bf16 where it is fast (:func:`bf16_supported`). An explicit
    ``"bf16"`` is kept where oneDNN runs bf16 only by emulation (AVX-512 CPUs without AVX512-BF16: slower than
    fp32, said in a one-line notice), and falls back to fp32 with a notice on a device without bf16 kernels."""
    if precision == "fp32":
        return "fp32"
    if bf16_supported(device):
        return "bf16"
    if precision == "bf16":
        if not device.startswith("cuda") and onednn_has_bf16():
            log(f"notice: {device} has no native bfloat16 instructions; oneDNN emulates them, so bf16 trains "
                "slower than fp32 here (--precision auto would choose fp32)")
            return "bf16"
        log(f"notice: {device} has no fast bfloat16 kernels; training in fp32")
    return "fp32"
