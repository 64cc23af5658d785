"""torch.fx helpers: trace a plain network and find the conv patterns that DFQ works on."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

import rotconv

__all__ = ["trace", "ConvPair", "conv_pairs", "module_of", "set_module", "ACTIVATIONS"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_LEAVES = (rotconv.CircularMask, rotconv.MaskedGlobalAvgPool, rotconv.GroupPool)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` (rotconv masks and pools stay leaf modules); a GraphModule
    is deep-copied as it is."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return copy.deepcopy(model)
    if any(isinstance(m, rotconv.SteerableConv2d) for m in model.modules()):
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
    return module


def set_module(graph_module: fx.GraphModule, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(graph_module.get_submodule(parent) if parent else graph_module, child, new)


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


def conv_pairs(graph_module: fx.GraphModule) -> list[ConvPair]:
    """All conv -> ReLU/ReLU6 -> conv chains (BN already folded), in graph order."""
    pairs = []
    for node in graph_module.graph.nodes:
        if not is_conv(graph_module, node) or len(node.users) != 1:
            continue
        (act,) = node.users
        if not is_activation(graph_module, act) or len(act.users) != 1:
            continue
        (nxt,) = act.users
        if not is_conv(graph_module, nxt):
            continue
        first, second = module_of(graph_module, node), module_of(graph_module, nxt)
        if first.groups != 1 and first.groups != first.out_channels:
            continue
        if second.groups != 1 and not (second.groups == second.in_channels == second.out_channels):
            continue
        pairs.append(ConvPair(first, module_of(graph_module, act), second, node.target, nxt.target))
    return pairs
