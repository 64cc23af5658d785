"""Per-tensor INT8 quantization plans: where activations are quantized and with which ranges.

Quantized region: every Conv2d (with a directly following ReLU fused into it) and every residual add.
Activations are quantized where a conv takes a float input (the network input after the input mask), at
each conv(+ReLU) output and each add output; they are dequantized where a non-quantized op (pooling,
classifier) reads them. Ranges are data-free (from the folded BN statistics: ``beta +- 6 gamma``, clipped
by the ReLU; sums of ranges for adds; ``input_range`` for the network input, carried through modules that
keep ranges, see :mod:`quant.registry`) or measured on calibration batches. A conv fed by anything else
(a SiLU, a Linear, a reshape, ...) has no data-free range: planning raises unless calibration is given.
Simulated quantization (the reference) and the real int8 model use the same plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from rotconv.validation import check_choice, check_int

from .arithmetic import (WEIGHT_SCHEME_DEFAULT, WEIGHT_SCHEMES, fake_quantize_weight, quantization_parameters,
                         weight_bits_for, weight_quantization_parameters)
from .graph import describe, is_add, is_conv, module_of, trace
from .registry import ModuleRule, rule_for

__all__ = ["QuantPlan", "plan_quantization", "FakeQuantize", "simulate", "input_range_of", "DEFAULT_INPUT_RANGE"]

#: the network input's data-free range where neither ``input_range`` nor a normaliser on the model gives one:
#: per-channel normalised images stay within a few units (PCam: -3.1 to 1.7)
DEFAULT_INPUT_RANGE = (-3.0, 3.0)


def input_range_of(model: nn.Module, input_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The range of ``model``'s input for data-free quantization: ``input_range`` where given, else the range
    of ``model.normalizer`` (anything with ``value_range()``, such as the :class:`mobilenet.Normalizer` that
    ``mobilenet.load`` and ``mobilenet.pretrained`` attach and ``export()`` keeps), else
    :data:`DEFAULT_INPUT_RANGE`. ValueError for a range that is not two finite numbers, low < high."""
    if input_range is None:
        normalizer = getattr(model, "normalizer", None)
        input_range = normalizer.value_range() if callable(getattr(normalizer, "value_range", None)) \
            else DEFAULT_INPUT_RANGE
    try:
        low, high = (float(value) for value in input_range)
    except (TypeError, ValueError):
        raise ValueError(f"input_range: expected (low, high), got {input_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"input_range: expected finite numbers with low < high, got {input_range!r}")
    return low, high

DATA_FREE_SIGMAS = 6.0


@dataclass
class QuantPlan:
    """Where and how a traced network is quantized.

    Attributes:
        graph_module: the traced float network.
        points: node name -> (low, high) activation range for every quantization point.
        fused: conv node name -> activation node name fused into it.
        inputs: names of nodes whose (float) output is quantized on entry to the region.
        weight_bits, act_bits, reduce_range: bit widths; ``reduce_range`` (x86/fbgemm) uses 7-bit activations
            (kernels without VNNI can saturate 16-bit intermediate sums with 8 bits) and 7-bit weights in
            depthwise convs (see :meth:`weight_bits_of`).
        weight_scheme: ``"asymmetric"`` or ``"symmetric"`` per-tensor weights.
        integer_bias: the backend adds conv biases as int32 multiples of ``input scale * weight scale``
            (qnnpack, XNNPACK, ONNX QLinearConv; fbgemm and oneDNN add them in float): the simulation rounds
            them alike.
    """

    graph_module: fx.GraphModule
    points: dict[str, tuple[float, float]]
    fused: dict[str, str]
    inputs: list[str]
    weight_bits: int
    act_bits: int
    reduce_range: bool
    weight_scheme: str = WEIGHT_SCHEME_DEFAULT
    integer_bias: bool = False

    def activation_qparams(self, name: str) -> tuple[float, int, int, int]:
        low, high = self.points[name]
        bits = self.act_bits - 1 if self.reduce_range else self.act_bits
        return quantization_parameters(low, high, bits, signed=False)

    def weight_bits_of(self, conv: nn.Conv2d) -> int:
        """Bits of ``conv``'s weights (:func:`quant.arithmetic.weight_bits_for`)."""
        return weight_bits_for(conv, self.weight_bits, self.reduce_range)

    def weight_qparams(self, conv: nn.Conv2d) -> tuple[float, int, int, int]:
        return weight_quantization_parameters(conv.weight, self.weight_bits_of(conv), self.weight_scheme)


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, names: set[str], ranges: dict[str, list[float]]) -> None:
        super().__init__(module)
        self.names, self.ranges = names, ranges

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.name in self.names:
            low, high = out.min().item(), out.max().item()
            old = self.ranges.get(node.name)
            self.ranges[node.name] = [low, high] if old is None else [min(old[0], low), max(old[1], high)]
        return out


def _check_arguments(weight_bits: int, act_bits: int, weight_scheme: str) -> tuple[int, int]:
    """The bit widths as plain ints, checked with the weight scheme (ValueError naming the argument)."""
    check_choice(weight_scheme, "weight_scheme", WEIGHT_SCHEMES)
    return (check_int(weight_bits, "weight_bits", minimum=2, maximum=8),
            check_int(act_bits, "act_bits", minimum=2, maximum=8))


def _check_folded(graph_module: fx.GraphModule) -> None:
    """Refuse batch norms (DFQ folds them into the conv before them)."""
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, nn.BatchNorm2d):
            source = node.args[0]
            if is_conv(graph_module, source) and len(source.users) == 1:
                raise ValueError(f"model: fold the batch norms first (quant.fold_batchnorm); {node.target} is not")
            raise ValueError(f"model: batch norm {node.target} follows {describe(graph_module, source)}, not a "
                             "Conv2d whose only user it is; DFQ folds conv -> batch norm pairs only")


class _Points:
    """The quantization points of a graph, found in one pass: conv(+ReLU) outputs, residual adds, and the
    float values entering the region (each with its data-free range, or None when it has none)."""

    def __init__(self, graph_module: fx.GraphModule, input_range: tuple[float, float]) -> None:
        self.graph_module, self.input_range = graph_module, tuple(float(v) for v in input_range)
        self.points: dict[str, tuple[float, float] | None] = {}
        self.producers: dict[str, str] = {}  # node name -> quant point that carries its value
        self.fused: dict[str, str] = {}
        self.inputs: list[str] = []
        self.unknown: dict[str, str] = {}  # entry point -> why it has no data-free range
        for node in graph_module.graph.nodes:
            if is_conv(graph_module, node):
                self._conv(node)
            elif is_add(node) and all(isinstance(a, fx.Node) and a.name in self.producers for a in node.args[:2]):
                a, b = (self.points[self.producers[arg.name]] for arg in node.args[:2])
                self.points[node.name] = None if a is None or b is None else (a[0] + b[0], a[1] + b[1])
                self.producers[node.name] = node.name

    def _conv(self, node: fx.Node) -> None:
        source = node.args[0]
        if source.name not in self.producers:
            self.inputs.append(source.name)
            self.producers[source.name] = source.name
            self.points[source.name] = self._entry_range(source, node)
        conv = module_of(self.graph_module, node)
        users = list(node.users)
        activation = module_of(self.graph_module, users[0]) if len(users) == 1 else None
        if isinstance(activation, (nn.ReLU, nn.ReLU6)):
            # a ReLU6 is fused like a ReLU: its clip at 6 is the top of the range, where int8 outputs saturate
            self.fused[node.name] = users[0].name
            self.producers[users[0].name] = users[0].name
            self.points[users[0].name] = _data_free_range(conv, relu=True,
                                                          ceiling=6.0 if isinstance(activation, nn.ReLU6) else None)
        else:
            self.producers[node.name] = node.name
            self.points[node.name] = _data_free_range(conv, relu=False)

    def _entry_range(self, source: fx.Node, conv: fx.Node) -> tuple[float, float] | None:
        """The network input's range when ``source`` is the input, possibly through range-keeping modules;
        otherwise None (recorded with the reason)."""
        node = source
        while node.op == "call_module" and (rule_for(module_of(self.graph_module, node)) or _NO_RULE).keeps_range:
            node = node.args[0]
        if node.op == "placeholder":
            return self.input_range
        self.unknown[source.name] = (f"conv {conv.target} reads {describe(self.graph_module, node)}, whose range "
                                     "cannot be derived from batch-norm statistics")
        return None


_NO_RULE = ModuleRule()


def _calibrate(graph_module: fx.GraphModule, names: list[str], calibration: Iterable) -> dict[str, tuple]:
    ranges: dict[str, list[float]] = {}
    recorder = _Recorder(graph_module, set(names), ranges)
    with torch.no_grad():
        for batch in calibration:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            recorder.run(x)
    if not ranges:
        raise ValueError("calibration: the loader yielded no batches")
    return {name: tuple(ranges[name]) for name in names}


def plan_quantization(model: nn.Module, weight_bits: int = 8, act_bits: int = 8,
                      calibration: Iterable | None = None, input_range: tuple[float, float] | None = None,
                      reduce_range: bool = False, weight_scheme: str = WEIGHT_SCHEME_DEFAULT,
                      integer_bias: bool = False) -> QuantPlan:
    """Trace ``model`` (BN folded: see :func:`quant.fold_batchnorm`) and choose quantization points/ranges.

    A ReLU6 after a conv is kept: its clip at 6 becomes the top of the conv's output range (where int8 outputs
    saturate). Raises ValueError for what it cannot quantize correctly: unfolded batch norms and, without
    ``calibration``, any value entering the quantized region whose
    range is not data-free (the output of a SiLU, a Linear, a reshape, ... feeding a conv)."""
    weight_bits, act_bits = _check_arguments(weight_bits, act_bits, weight_scheme)
    graph_module = trace(model).eval()
    _check_folded(graph_module)
    found = _Points(graph_module, input_range_of(model, input_range))
    points = found.points
    if calibration is not None:
        points = _calibrate(graph_module, list(points), calibration)
    else:
        if found.unknown:
            reasons = list(found.unknown.values())
            raise ValueError(f"model: {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
                             + "; pass calibration batches (calibration=...) or feed convs from ReLU/ReLU6, "
                             "convs, residual adds or the network input")
        missing = [name for name, value in points.items() if value is None]
        if missing:
            raise ValueError(f"calibration: no BN statistics for {missing[:3]}...; pass a calibration loader")
    return QuantPlan(graph_module, points, found.fused, found.inputs, weight_bits, act_bits, reduce_range,
                     weight_scheme, integer_bias)


def _data_free_range(conv: nn.Conv2d, relu: bool, ceiling: float | None = None) -> tuple[float, float] | None:
    if not hasattr(conv, "dfq_beta"):
        return None
    low = (conv.dfq_beta - DATA_FREE_SIGMAS * conv.dfq_gamma).min().item()
    high = (conv.dfq_beta + DATA_FREE_SIGMAS * conv.dfq_gamma).max().item()
    if ceiling is not None:  # a ReLU6: nothing above its clip
        high = min(high, ceiling)
        low = min(low, high)
    return (max(low, 0.0), max(high, 0.0)) if relu else (low, high)


class FakeQuantize(nn.Module):
    """Quantize-dequantize to fixed per-tensor parameters (simulated quantization)."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.3g}, zero_point={self.zero_point}, range=[{self.qmin}, {self.qmax}]"


def _insert_after(graph_module: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    graph_module.add_submodule(name, module)
    with graph_module.graph.inserting_after(node):
        new = graph_module.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


@torch.no_grad()
def simulate(plan: QuantPlan) -> fx.GraphModule:
    """The simulated-quantization network of ``plan``: conv weights quantize-dequantized per tensor,
    fake-quantize modules at every activation point; conv biases rounded to int32 steps where the backend
    does so (``plan.integer_bias``), else float, as the head."""
    import copy

    graph_module = copy.deepcopy(plan.graph_module)
    for node in list(graph_module.graph.nodes):
        if is_conv(graph_module, node):
            conv = module_of(graph_module, node)
            source = node.args[0]
            if (
                plan.integer_bias
                and conv.bias is not None
                and isinstance(source, fx.Node)
                and source.name in plan.points
            ):
                step = plan.activation_qparams(source.name)[0] * plan.weight_qparams(conv)[0]
                conv.bias.copy_(torch.round(conv.bias / step) * step)
            conv.weight.copy_(fake_quantize_weight(conv.weight, plan.weight_bits_of(conv), plan.weight_scheme))
    for index, node in enumerate(list(graph_module.graph.nodes)):
        if node.name in plan.points:
            scale, zero_point, qmin, qmax = plan.activation_qparams(node.name)
            _insert_after(graph_module, node, f"fake_quant_{index}", FakeQuantize(scale, zero_point, qmin, qmax))
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
