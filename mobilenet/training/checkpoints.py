"""Training checkpoints: written atomically after every epoch, read back with every failure named, and
restored only into the run they belong to."""
from __future__ import annotations

import os
from dataclasses import asdict

import torch
import torch.nn as nn

from rotconv.files import atomic_write, differences

from .config import TrainConfig, UsageError

__all__ = ["CHECKPOINT_KEYS", "save_atomically", "load_checkpoint", "restore_checkpoint"]


def save_atomically(state: dict, path: str) -> None:
    """``torch.save`` through :func:`rotconv.files.atomic_write` (never a half-written file)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


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


def restore_checkpoint(checkpoint: dict, path: str, identity: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Load ``checkpoint`` (read from ``path``) into ``model`` and ``optimizer`` and restore the RNG state,
    after checking that its identity (config, model, data) is ``identity``; :class:`UsageError` otherwise."""
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
