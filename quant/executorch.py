"""On-device INT8: the DFQ model as an ExecuTorch program for XNNPACK (a ``.pte`` file).

The float network goes through the same data-free pipeline as :func:`quant.dfq` (BN folding, ReLU6 -> ReLU,
field-shared equalization, high-bias absorption, bias correction), then through torchao's PT2E flow with
XNNPACK's quantizer (per-tensor symmetric int8 weights, int8 activations) restricted to convolutions and
residual adds, and every activation observer is given the range of the project's own
:class:`~quant.plan.QuantPlan` (data-free: from the BN statistics and the input range; no calibration data
needed), except that the map a masked pool reads may be narrowed by up to 1 % onto a grid the pool sums
exactly (:func:`exact_pool_range`). The result is lowered to XNNPACK and written as a ``.pte`` program.
``mode="simulated"`` with the same options describes it (``quant.dfq(model, group, mode="simulated",
backend="qnnpack", weight_scheme="symmetric")``: 8-bit activations and weights everywhere, as XNNPACK).

Needs the optional extra: ``pip install 'rotconv[deploy]'`` (executorch, which brings torchao).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from rotconv.files import atomic_write, check_path, check_writable

from .arithmetic import quantization_parameters
from .extras import DEPLOY_EXTRA, capture_native_stderr, output_classes, require_extra, runtime_input
from .notices import upstream_notices_hidden
from .pipeline import RELU6_DEFAULT, check_float_model, prepare
from .plan import QuantPlan, input_range_of, plan_quantization

__all__ = [
    "to_executorch",
    "load_executorch",
    "ExecuTorchModel",
    "quantize_pt2e",
    "traced_example",
    "require_executorch",
    "DEPLOY_EXTRA",
]


def require_executorch():
    require_extra(("executorch", "torchao"), "quant.to_executorch")
    try:
        with upstream_notices_hidden():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                                 get_symmetric_quantization_config)
            from executorch.exir import to_edge_transform_and_lower
            from torchao.quantization.pt2e.observer import MinMaxObserver
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as error:
        raise ImportError(f"quant.to_executorch needs ExecuTorch, which is an optional extra: {DEPLOY_EXTRA} "
                          f"({error})") from None
    return {"XnnpackPartitioner": XnnpackPartitioner, "XNNPACKQuantizer": XNNPACKQuantizer,
            "get_symmetric_quantization_config": get_symmetric_quantization_config,
            "to_edge_transform_and_lower": to_edge_transform_and_lower, "MinMaxObserver": MinMaxObserver,
            "convert_pt2e": convert_pt2e, "prepare_pt2e": prepare_pt2e}


class _PlanRanges:
    """The plan's ranges by what the exported graph can see: a conv's weight name, and the order of adds."""

    def __init__(self, plan: QuantPlan) -> None:
        self.plan = plan
        self.conv_input: dict[str, tuple[float, float]] = {}
        self.conv_output: dict[str, tuple[float, float]] = {}
        self.adds: list[tuple[float, float]] = []
        graph_module = plan.graph_module
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.Conv2d):
                self.conv_input[node.target] = plan.points[node.args[0].name]
                self.conv_output[node.target] = plan.points[plan.fused.get(node.name, node.name)]
            elif node.name in plan.points and node.name not in plan.inputs and node.op != "call_module":
                self.adds.append(plan.points[node.name])


def _conv_name(node: fx.Node) -> str:
    """The module name of an exported conv node, from its weight's attribute name (``features.0.0.weight``)."""
    weight = node.args[1]
    while weight.op == "call_module":  # the weight's observer
        weight = weight.args[0]
    return weight.target.rsplit(".", 1)[0]


def _range_of(observer_node: fx.Node, ranges: _PlanRanges, add_index: list[int]) -> tuple[float, float] | None:
    conv2d, relu, add = torch.ops.aten.conv2d.default, torch.ops.aten.relu.default, torch.ops.aten.add.Tensor
    source = observer_node.args[0]
    if source.op == "call_function" and source.target is relu and source.args[0].target is conv2d:
        return ranges.conv_output[_conv_name(source.args[0])]
    if source.op == "call_function" and source.target is conv2d:
        return ranges.conv_output[_conv_name(source)]
    if source.op == "call_function" and source.target is add:
        add_index[0] += 1
        return ranges.adds[add_index[0] - 1]
    for user in observer_node.users:
        if user.op == "call_function" and user.target is conv2d and user.args[0] is observer_node:
            return ranges.conv_input[_conv_name(user)]
    return None


def _impose_plan(observed: fx.GraphModule, plan: QuantPlan, minmax_type: type, calibrated: bool) -> None:
    """Replace every activation observer by a min/max observer holding the plan's range for that value."""
    ranges = _PlanRanges(plan)
    add_index = [0]
    for node in list(observed.graph.nodes):
        if node.op != "call_module" or "activation_post_process" not in node.target:
            continue
        observer = observed.get_submodule(node.target)
        if node.args[0].op == "get_attr":  # a weight or constant: its own values were observed
            continue
        value_range = _range_of(node, ranges, add_index)
        if value_range is None:
            if calibrated:
                continue
            raise ValueError(f"model: the XNNPACK quantizer observes {node.args[0].name}, which the data-free plan "
                             "has no range for; pass calibration batches")
        fixed = minmax_type(dtype=observer.dtype, qscheme=observer.qscheme, quant_min=observer.quant_min,
                            quant_max=observer.quant_max, eps=getattr(observer, "eps", torch.finfo(torch.float32).eps))
        fixed(torch.tensor(value_range, dtype=torch.float32))
        observed.set_submodule(node.target, fixed)


#: 1.5 * 2**23: float32 numbers in [2**23, 2**24) are spaced 1 apart, so adding it rounds to an integer
ROUNDING_OFFSET = 12582912.0


def _round_small(y: torch.Tensor, negative_offset: float | torch.Tensor = -ROUNDING_OFFSET,
                 offset: float | torch.Tensor = ROUNDING_OFFSET) -> torch.Tensor:
    """``round(y)`` (half to even) for float32 ``|y| < 2**22``, with two subtractions: XNNPACK runs them, while
    ``torch.round`` left the delegate for a portable kernel (14 of 59 ms of the .pte at batch 32). Written as
    subtractions because the quantizer annotates every ``add`` (the residual adds) for int8. The offsets
    (``-ROUNDING_OFFSET``, ``ROUNDING_OFFSET``) may be given as tensors of a shape that broadcasts."""
    return (y - negative_offset) - offset


#: float32 has a 24-bit significand: sums of integers below 2**24 are exact in any order
EXACT_INTEGERS = 2**24

#: the most a pooled map's int8 range is narrowed to put it on a grid the pool sums exactly (relative)
GRID_NARROWING = 0.01


def step_mantissa(step: float) -> int:
    """The odd integer ``m`` with ``step = m * 2**e``: how many bits a grid step carries into products."""
    mantissa, exponent = math.frexp(step)
    integer = int(mantissa * 2**53)
    while integer % 2 == 0:
        integer //= 2
    return integer


def exact_pool_range(low: float, high: float) -> tuple[float, float] | None:
    """The int8 range for a map that an exported masked pool reads: ``[low, high]`` narrowed by at most
    :data:`GRID_NARROWING` so that its grid step is ``m * 2**e`` with ``m`` in {1, 3} (ReLU6's ``[0, 6]``,
    step 6/255, becomes ``[0, 5.977]``, step 3/128), or None where no such step is that close. On such a grid
    the dequantized values ``(q - z) * step`` are exact in float32 and so are their products with the pool's
    integer weights: the pool needs no rounding."""
    scale = quantization_parameters(low, high, 8)[0]
    exponent = math.floor(math.log2(scale))
    step = 1.5 * 2.0**exponent if 1.5 * 2.0**exponent <= scale else 2.0**exponent
    if step < (1 - GRID_NARROWING) * scale:
        return None
    below_zero = min(max(round(-min(low, 0.0) / step), 0), 255)  # levels below zero; zero stays a level
    return -below_zero * step, (255 - below_zero) * step


def _quantized_masked_pools(graph_module: fx.GraphModule, plan: QuantPlan) -> Iterable[tuple[fx.Node, nn.Module]]:
    """The (node, module) of every :class:`rotconv.MaskedGlobalAvgPool` in ``graph_module`` that reads a value
    ``plan`` quantizes (``node.args[0].name`` is in ``plan.points``)."""
    import rotconv

    for node in graph_module.graph.nodes:
        module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        if (isinstance(module, rotconv.MaskedGlobalAvgPool) and node.args and isinstance(node.args[0], fx.Node)
                and node.args[0].name in plan.points):
            yield node, module


def narrow_pooled_ranges(plan: QuantPlan) -> list[str]:
    """Narrow, in ``plan``, the range of every quantized value a :class:`rotconv.MaskedGlobalAvgPool` reads to
    :func:`exact_pool_range` where there is one; returns the values' names."""
    narrowed = []
    for node, _ in _quantized_masked_pools(plan.graph_module, plan):
        name = node.args[0].name
        grid = exact_pool_range(*plan.points[name])
        if grid is not None:
            plan.points[name] = grid
            narrowed.append(name)
    return narrowed


class _ExactMaskedGlobalAvgPool(nn.Module):
    """:class:`rotconv.MaskedGlobalAvgPool` on a dequantized int8 map, summed exactly, so that a rotated map
    gives the same bits. The map's values are ``(q - z) * step``; with ``step = m * 2**e``, ``m`` in {1, 3}
    (:func:`exact_pool_range`) they are exact, otherwise ``round(x / step)`` first recovers the integers
    ``q - z`` (``m = 1``). The pooling weights are rounded to integers ``W`` summing to about ``2**bits``, the
    most bits with ``255 * m * sum(W) < 2**24``; the products are averaged (a global average pool, which
    XNNPACK runs): every partial sum is ``2**e`` times an integer below ``2**24``, exact in float32 in any
    order, then one deterministic division. ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, pool: nn.Module, scale: float) -> None:
        super().__init__()
        if pool.size is None:
            raise ValueError("model: ExecuTorch export needs MaskedGlobalAvgPool(size=...) (fixed input size)")
        mantissa = step_mantissa(scale)
        self.rounds = mantissa not in (1, 3)
        mantissa = 1 if self.rounds else mantissa
        weights = pool.pool_weights.double()
        self.bits = max(bits for bits in range(8, 25)
                        if 255 * mantissa * torch.round(weights * 2**bits).sum().item() < EXACT_INTEGERS)
        integers = torch.round(weights * 2**self.bits).float()
        # Every constant is 4-D, (1, 1, ...): XNNPACK's layout pass then keeps the map channels-last from the last
        # conv through the mean. A 0-d or 2-D constant makes it transpose the map to NCHW for the elementwise ops
        # and back for the mean (2.4 of 42 ms of the C_12 .pte at batch 32).
        self.register_buffer("integer_weights", integers.reshape(1, 1, *integers.shape))
        if self.rounds:
            self.register_buffer("inverse_scale", torch.full((1, 1, 1, 1), 1.0 / scale))
            self.register_buffer("negative_offset", torch.full((1, 1, 1, 1), -ROUNDING_OFFSET))
            self.register_buffer("offset", torch.full((1, 1, 1, 1), ROUNDING_OFFSET))
        self.factor = (scale if self.rounds else 1.0) * pool.pool_weights.numel() / 2**self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounds:
            x = _round_small(x * self.inverse_scale, self.negative_offset, self.offset)
        return (x * self.integer_weights).mean(dim=(-2, -1), keepdim=True).flatten(1) * self.factor


def _export_graph(plan: QuantPlan) -> fx.GraphModule:
    """A copy of the plan's network whose masked average pools, where they read a quantized value, sum exactly,
    and whose ReLU6 after a conv is a ReLU: the plan's range ends at 6 there, so the int8 output saturates at 6
    (XNNPACK fuses conv + ReLU into one int8 op, not conv + hardtanh)."""
    import copy

    graph_module = copy.deepcopy(plan.graph_module)
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.name in plan.fused.values() \
                and isinstance(graph_module.get_submodule(node.target), nn.ReLU6):
            graph_module.set_submodule(node.target, nn.ReLU())
    for node, module in list(_quantized_masked_pools(graph_module, plan)):
        scale = plan.activation_qparams(node.args[0].name)[0]
        graph_module.set_submodule(node.target, _ExactMaskedGlobalAvgPool(module, scale))
    graph_module.recompile()
    return graph_module


def traced_example(model: nn.Module, example_input: torch.Tensor | None, batch: int) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
            raise ValueError("example_input: expected a (B, C, H, W) tensor")
        return example_input
    size = getattr(model, "input_size", None)
    if size is None:
        raise ValueError("example_input: the model has no input_size attribute; pass an example input")
    return torch.zeros(batch, 3, size, size)


def quantize_pt2e(model: nn.Module, group: object, example: torch.Tensor,
                  input_range: tuple[float, float] | None = None, calibration: Iterable | None = None,
                  bias_correction: bool = True, relu6: str = RELU6_DEFAULT,
                  per_channel_weights: bool = False) -> fx.GraphModule:
    """The data-free INT8 model as a PT2E graph (quantize/dequantize ops around int8 convolutions and adds,
    int8 weights, the plan's activation ranges): what :func:`to_executorch` lowers to XNNPACK and
    :func:`quant.to_onnx` writes as an ONNX QDQ model. Needs torchao (the ``deploy`` extra).
    ``per_channel_weights``: conv weights symmetric per output channel instead of per tensor."""
    api = require_executorch()
    check_float_model(model)
    input_range = input_range_of(model, input_range)  # the model's normaliser; the prepared graph drops it
    prepared = prepare(model, group, bias_correction, weight_bits=8, weight_scheme="symmetric", reduce_range=False,
                       relu6=relu6, per_channel_weights=per_channel_weights)
    plan = plan_quantization(prepared, 8, 8, calibration, input_range, reduce_range=False, weight_scheme="symmetric",
                             integer_bias=True)
    narrow_pooled_ranges(plan)  # the pool then sums the dequantized map exactly without rounding it
    with upstream_notices_hidden():
        exported = torch.export.export(_export_graph(plan).eval(), (example,)).module()
        config = api["get_symmetric_quantization_config"](is_per_channel=False)
        conv_config = api["get_symmetric_quantization_config"](is_per_channel=per_channel_weights)
        quantizer = api["XNNPACKQuantizer"]()
        quantizer.set_operator_type(torch.ops.aten.conv2d.default, conv_config)
        quantizer.set_operator_type(torch.ops.aten.add.Tensor, config)
        observed = api["prepare_pt2e"](exported, quantizer)
        with torch.no_grad():
            observed(example)  # weights and constants observe themselves
            for batch in calibration or []:
                observed(batch[0] if isinstance(batch, (tuple, list)) else batch)
        _impose_plan(observed, plan, api["MinMaxObserver"], calibration is not None)
        return api["convert_pt2e"](observed)


def to_executorch(model: nn.Module, path: str, group: object = None, example_batch: int = 1,
                  example_input: torch.Tensor | None = None, input_range: tuple[float, float] | None = None,
                  calibration: Iterable | None = None, bias_correction: bool = True, relu6: str = RELU6_DEFAULT,
                  per_channel_weights: bool = False) -> str:
    """Quantize ``model`` (a float plain network, e.g. ``model.export()``) data-free and write it to ``path``
    as an ExecuTorch program for XNNPACK; returns ``path``.

    Args:
        model: the float network (batch norms unfolded, as trained).
        path: the ``.pte`` file to write (atomically).
        group: the model's group (as everywhere: a group, its name or N), for field-shared equalization;
            default: the group the model carries (:func:`quant.model_group`), none for other networks.
        example_batch: the program's batch size (its input shape is fixed; :class:`ExecuTorchModel` splits
            other batches into programs' batches). Ignored with ``example_input``.
        example_input: an input of the right shape (default: zeros of ``model.input_size``).
        input_range: the range of the network input (the data-free range of the first activation; default:
            the range of ``model.normalizer`` where the model has one, else (-3, 3): :func:`quant.input_range_of`).
        calibration: optional batches to measure ranges instead.
        bias_correction, relu6: as :func:`quant.prepare` (``relu6="keep"``: ReLU6 kept, clipped by the range).
        per_channel_weights: each conv's weights on one symmetric int8 grid per output channel (XNNPACK's
            per-channel kernels) instead of one per tensor; biases corrected for that rounding. Quarter-turn
            exactness is kept: channels that a quarter turn maps onto each other hold the same weights,
            rotated, so they get the same scale.
    """
    api = require_executorch()
    check_writable(path)  # a directory or an unwritable place is refused before the export, not after it
    example = traced_example(model, example_input, example_batch)
    converted = quantize_pt2e(model, group, example, input_range, calibration, bias_correction, relu6,
                              per_channel_weights)
    with upstream_notices_hidden():
        program = api["to_edge_transform_and_lower"](torch.export.export(converted, (example,)),
                                                     partitioner=[api["XnnpackPartitioner"]()]).to_executorch()
    atomic_write(path, lambda handle: handle.write(program.buffer))
    return path


class ExecuTorchModel(nn.Module):
    """A ``.pte`` program as a module: float ``(B, C, H, W)`` in, logits out, any batch size (split into the
    program's fixed batch, the last one padded with zeros). Runs in the ExecuTorch runtime (XNNPACK)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        require_extra(("executorch.runtime",), "quant.load_executorch")
        from executorch.runtime import Runtime

        check_path(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: program file not found")
        # The runtime's C++ logs (a CPU probe on the first load, the reason a file is rejected) go to stderr:
        # kept out of the user's output on success, put into the error on failure.
        with capture_native_stderr() as native:
            try:
                self.program = Runtime.get().load_program(path)
                self.method = self.program.load_method("forward")
                failure = None
            except Exception as error:  # the runtime raises RuntimeError/ValueError for a bad file
                failure = error
        if failure is not None:
            detail = "; ".join(line.strip() for line in native.text.splitlines() if line.strip())
            raise ValueError(f"{path}: not a loadable ExecuTorch program ({type(failure).__name__}"
                             + (f": {detail}" if detail else "") + ")") from None
        meta = self.method.metadata.input_tensor_meta(0)
        self.input_shape = tuple(meta.sizes())
        self.num_classes = output_classes(tuple(self.method.metadata.output_tensor_meta(0).sizes()))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = runtime_input(x, self.input_shape)
        batch = self.input_shape[0]
        outputs = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            count = chunk.shape[0]
            if count < batch:
                chunk = torch.cat([chunk, chunk.new_zeros(batch - count, *chunk.shape[1:])])
            outputs.append(self.method.execute([chunk])[0][:count])
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, input_shape={self.input_shape}"


def load_executorch(path: str) -> ExecuTorchModel:
    """The program written by :func:`to_executorch`, as a callable module."""
    return ExecuTorchModel(path)
