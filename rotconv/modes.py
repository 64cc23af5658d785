"""Running a module in eval mode for a while, giving the caller's mode back afterwards.

    with rotconv.eval_mode(model):      # batch norm on running statistics, dropout off
        logits = model(x)
    # model.training is what it was before, also when the block raised
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards ``model.train(previous)`` with the mode it had
    (as ``Module.train``, for the whole tree). Yields ``model``."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
