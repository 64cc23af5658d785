"""torch.fx helpers: trace a plain network into a canonical graph and find the conv patterns DFQ works on.

Canonical means every ReLU and ReLU6 is a module call: ``F.relu``, ``torch.relu``, ``x.relu()``,
``F.relu6``, ``F.hardtanh(x, 0, 6)`` and ``clamp(x, min=0[, max=6])`` are rewritten to ``nn.ReLU`` /
``nn.ReLU6`` modules, so the pattern finder, the quantization plan and the int8 conversion see one form.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import rotconv

from .registry import rule_for

__all__ = ["trace", "ConvPair", "conv_pairs", "module_of", "ACTIVATIONS", "describe"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_CLAMP_FUNCTIONS = (torch.clamp, torch.clip, torch.clamp_min)
_CLAMP_METHODS = ("clamp", "clip", "clamp_min", "clamp_", "clamp_min_")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        rule = rule_for(m)
        return (rule is not None and rule.leaf) or super().is_leaf_module(m, qualname)


def describe(graph_module: fx.GraphModule, node: fx.Node) -> str:
    """``node`` in words, for error messages: its name and what it computes."""
    if node.op == "call_module":
        return f"{node.target} ({type(graph_module.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', str(node.target))})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return f"{node.name} ({node.op})"


def _argument(node: fx.Node, position: int, keyword: str):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword)


def _canonical_activation(node: fx.Node) -> type[nn.Module] | None:
    """nn.ReLU / nn.ReLU6 when ``node`` computes exactly that as a function or method call, else None."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return nn.ReLU
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return nn.ReLU
    if node.op == "call_function" and node.target is F.relu6:
        return nn.ReLU6
    if node.op == "call_function" and node.target is F.hardtanh:
        low, high = _argument(node, 1, "min_val"), _argument(node, 2, "max_val")
        return nn.ReLU6 if (low, high) == (0.0, 6.0) else None
    clamp = (node.op == "call_function" and node.target in _CLAMP_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _CLAMP_METHODS)
    if not clamp:
        return None
    low = _argument(node, 1, "min")
    high = None if node.target in (torch.clamp_min, "clamp_min", "clamp_min_") else _argument(node, 2, "max")
    if isinstance(low, (int, float)) and low == 0 and high is None:
        return nn.ReLU
    if isinstance(low, (int, float)) and low == 0 and isinstance(high, (int, float)) and high == 6:
        return nn.ReLU6
    return None


def _canonicalize_activations(graph_module: fx.GraphModule) -> None:
    """Rewrite functional ReLU/ReLU6 forms as module calls (see the module docstring)."""
    graph = graph_module.graph
    for index, node in enumerate(list(graph.nodes)):
        activation = _canonical_activation(node)
        if activation is None:
            continue
        name = f"{activation.__name__.lower()}_{index}"
        graph_module.add_submodule(name, activation())
        with graph.inserting_after(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    graph_module.recompile()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` (registered modules stay leaves, see :mod:`quant.registry`)
    and canonicalize its activations; a GraphModule is deep-copied (and canonicalized)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        module = copy.deepcopy(model)
        _canonicalize_activations(module)
        return module
    if rotconv.needs_export(model):
        raise ValueError("model: export the network to plain torch.nn first (model.export() or rotconv.export)")
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # torch.fx raises many types; name what failed
        raise ValueError(f"model: could not be traced by torch.fx ({error})") from error
    for node in graph.nodes:  # string annotations (from __future__ import annotations) would not pickle
        if isinstance(node.type, str):
            node.type = None
    module = fx.GraphModule(copy.deepcopy(model), graph)
    module.train(model.training)
    _canonicalize_activations(module)
    return module


def module_of(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def is_conv(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(graph_module, node), nn.Conv2d)


def is_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(graph_module, node), ACTIVATIONS)


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
        (node.op == "call_method" and node.target == "add")


def remove_identities(graph_module: fx.GraphModule) -> None:
    """Erase ``nn.Identity`` calls (left by BN folding) so conv -> activation patterns are adjacent."""
    for node in list(graph_module.graph.nodes):
        if isinstance(module_of(graph_module, node), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()


@dataclass
class ConvPair:
    """``first -> activation -> second``: consecutive convs joined by a positively homogeneous activation,
    where the first conv's output feeds nothing else."""

    first: nn.Conv2d
    activation: nn.Module
    second: nn.Conv2d
    first_name: str
    second_name: str


def _pairable(first: nn.Conv2d, second: nn.Conv2d) -> bool:
    """Channel-wise scaling between the two is expressible: first is dense or depthwise, second dense or
    depthwise with as many outputs as inputs."""
    if first.groups != 1 and first.groups != first.out_channels:
        return False
    return second.groups == 1 or second.groups == second.in_channels == second.out_channels


def conv_pairs(graph_module: fx.GraphModule, warn: bool = False) -> list[ConvPair]:
    """All conv -> ReLU/ReLU6 -> conv chains (BN already folded), in graph order. With ``warn=True`` a
    conv -> op -> conv chain through an op that is not ReLU/ReLU6 (SiLU, GELU, ...) is named in a
    warning: it is left unequalized (scaling through it would change the function)."""
    pairs, skipped = [], []
    for node in graph_module.graph.nodes:
        if not is_conv(graph_module, node) or len(node.users) != 1:
            continue
        (act,) = node.users
        if len(act.users) != 1:
            continue
        (nxt,) = act.users
        if not is_conv(graph_module, nxt):
            continue
        if not is_activation(graph_module, act):
            if len(act.all_input_nodes) == 1:  # an elementwise op of this conv alone (not an add of two)
                skipped.append(f"{node.target} -> {describe(graph_module, act)} -> {nxt.target}")
            continue
        first, second = module_of(graph_module, node), module_of(graph_module, nxt)
        if _pairable(first, second):
            pairs.append(ConvPair(first, module_of(graph_module, act), second, node.target, nxt.target))
    if warn and skipped:
        warnings.warn(f"equalize: {len(skipped)} conv -> activation -> conv chain(s) left unequalized, the "
                      f"activation is not ReLU/ReLU6: {'; '.join(skipped[:3])}", stacklevel=3)
    return pairs
