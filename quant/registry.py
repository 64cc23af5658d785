"""What quant knows about modules it does not quantize itself: which stay leaves when tracing, which keep
their input's value range (so a data-free range can be carried through them), and which have an int8
counterpart that reads quantized tensors directly.

A user's own module gets the same treatment with :func:`register_module`::

    quant.register_module(MyMask, keeps_range=True)           # multiplies by weights in [0, 1]
    quant.register_module(MyPool, int8_reader=MyInt8Pool)     # MyInt8Pool(module) reads int8 tensors
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

import rotconv

__all__ = ["ModuleRule", "register_module", "rule_for"]


@dataclass(frozen=True)
class ModuleRule:
    """How quant treats a module type.

    Attributes:
        leaf: traced as one call (its forward is not inlined into the graph).
        keeps_range: every output value lies in the convex hull of its input values and 0 (masks with
            weights in [0, 1], max/average pooling, dropout in eval): a data-free range passes through it.
        int8_reader: ``factory(module) -> nn.Module`` that computes the module's output from a quantized
            input tensor (so no dequantize is needed in front of it), or None.
    """

    leaf: bool = True
    keeps_range: bool = False
    int8_reader: Callable[[nn.Module], nn.Module] | None = None


_RULES: dict[type, ModuleRule] = {}


def register_module(module_type: type, *, leaf: bool = True, keeps_range: bool = False,
                    int8_reader: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Tell quant how to treat ``module_type`` (and its subclasses): see :class:`ModuleRule`."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise ValueError(f"module_type: expected a subclass of torch.nn.Module, got {module_type!r}")
    if int8_reader is not None and not callable(int8_reader):
        raise ValueError(f"int8_reader: expected a callable taking the module, got {int8_reader!r}")
    _RULES[module_type] = ModuleRule(leaf, keeps_range, int8_reader)


def rule_for(module: nn.Module | None) -> ModuleRule | None:
    """The rule of the most specific registered type of ``module``, or None."""
    if module is None:
        return None
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


for _type in (rotconv.CircularMask, rotconv.MaskedGlobalAvgPool, rotconv.GroupPool):
    register_module(_type, keeps_range=True)
for _type in (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
              nn.ZeroPad2d):
    register_module(_type, keeps_range=True)
