"""Running a module in eval mode for a while, giving the caller's mode back afterwards.

    with rotconv.eval_mode(model):      # batch norm on running statistics, dropout off
        logits = model(x)
    # every module's training flag is what it was before, also when the block raised
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards every module of its tree has the mode it had
    before, each its own (a training model with frozen batch norms keeps them frozen; ``model.train(previous)``
    would switch every submodule alike). Yields ``model``."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
