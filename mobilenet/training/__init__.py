"""Training any classifier on any map-style dataset: the recipe (:mod:`.config`), the loop (:mod:`.loop`),
checkpoints and resume (:mod:`.checkpoints`), progress lines (:mod:`.progress`), data-parallel processes
(:mod:`.distributed`) and freed-memory reuse for CPU processes (:mod:`.memory`)."""
from .checkpoints import CHECKPOINT_KEYS, load_checkpoint, restore_checkpoint, save_atomically
from .config import (PRECISIONS, STAIN_JITTER, DivergedError, TrainConfig, UsageError, bf16_supported,
                     resolve_precision, resolve_stain_jitter)
from .distributed import CrossProcessBatchNorm, Distributed, convert_batchnorm
from .loop import evaluate_loss, learning_rate, patience_spent, train, training_step
from .memory import reuse_freed_memory
from .progress import Progress

__all__ = ["TrainConfig", "train", "training_step", "evaluate_loss", "learning_rate", "patience_spent", "UsageError",
           "DivergedError", "PRECISIONS", "STAIN_JITTER", "bf16_supported", "resolve_precision", "resolve_stain_jitter",
           "CHECKPOINT_KEYS", "load_checkpoint", "restore_checkpoint", "save_atomically", "Distributed",
           "CrossProcessBatchNorm", "convert_batchnorm", "reuse_freed_memory", "Progress"]
