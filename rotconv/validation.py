"""Argument checks shared by every package: a ValueError that names the argument, raised up front."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx

__all__ = ["as_int", "check_int", "check_positive_int", "check_choice", "is_symbolic", "input_checks_skipped",
           "shape_of", "NORMALISED_LIMIT", "check_normalised"]

# A per-channel normalised image, (x / 255 - mean) / std, stays within a few units for any real image set
# (PCam: -2.4 to 2.7); raw 0-255 pixel values passed as floats reach 100 or more. Beyond this bound an input
# is refused as not normalised.
NORMALISED_LIMIT = 50.0


def is_symbolic(x: object) -> bool:
    """Whether ``x`` is a torch.fx tracing placeholder (shapes unknown: input checks are skipped)."""
    return isinstance(x, torch.fx.Proxy)


def input_checks_skipped(x: object) -> bool:
    """Whether a module's input checks are skipped for ``x``: a torch.fx placeholder (:func:`is_symbolic`), or
    any input while ``torch.jit.trace`` records (the trace has a fixed input shape; a shape check would only be
    frozen into it, with a TracerWarning)."""
    return is_symbolic(x) or torch.jit.is_tracing()


def shape_of(x: object) -> object:
    """The shape of a tensor as a tuple, or the type name of anything else (for error messages)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def as_int(value: object) -> int | None:
    """``value`` as a plain int where it is an integer scalar: a Python int, a numpy integer, a 0-d integer
    array or tensor (bools of every kind excluded); None for anything else."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (np.ndarray, torch.Tensor)) and
                                               (value.ndim != 0 or value.dtype in (np.bool_, torch.bool))):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value: object, name: str, minimum: int | None = 1, maximum: int | None = None,
              odd: bool = False) -> int:
    """``value`` as a plain int if it is an integer scalar (:func:`as_int`: numpy and 0-d torch integers too,
    bools excluded) in ``[minimum, maximum]`` (odd, with ``odd=True``), else a ValueError naming ``name`` and
    what was expected."""
    number = as_int(value)
    valid = number is not None
    valid = valid and (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
    valid = valid and (not odd or number % 2 == 1)
    if not valid:
        bounds = (f" from {minimum} to {maximum}" if minimum is not None and maximum is not None
                  else f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name}: expected {'an odd' if odd else 'an'} integer{bounds}, got {value!r}")
    return number


def check_choice(value: object, name: str, choices) -> object:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if value not in tuple(choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an integer >= 1 (bools excluded), else a ValueError naming ``name``."""
    return check_int(value, name, minimum=1)



def check_normalised(largest: float, name: str = "input") -> None:
    """ValueError naming ``name`` when ``largest`` (the largest absolute input value) shows raw pixel values
    instead of normalised ones (beyond :data:`NORMALISED_LIMIT`), or is NaN or infinite (so is some input)."""
    if not math.isfinite(largest):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if largest > NORMALISED_LIMIT:
        raise ValueError(f"{name}: values up to {largest:.4g}: the model takes normalised images ((x / 255 - mean) "
                         f"/ std, within a few units); normalise raw pixels first (mobilenet.Normalizer, or "
                         f"mobilenet.predict, which takes uint8 or [0, 1] images)")
