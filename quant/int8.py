"""The one place that touches a real int8 backend (torch.ao.quantization's quantized modules).

It turns a :class:`~quant.quantize.QuantPlan` into a network on int8 CPU kernels with exactly the plan's
scales and zero points, so it can later move to another backend (e.g. torchao PT2E) without touching the
DFQ code. The result takes and returns float tensors.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

import rotconv
from rotconv.files import atomic_write, check_path, check_writable
from rotconv.hardware import has_avx2, is_x86
from rotconv.validation import check_choice, check_normalised

from .graph import is_add, is_conv, module_of
from .notices import upstream_notices_hidden
from .plan import QuantPlan
from .registry import register_module, rule_for

__all__ = ["Int8Model", "convert_int8", "save_int8", "load_int8", "BACKENDS", "default_backend", "check_int8_engine",
           "int8_engine_unavailable",
           "IntegerMaskedGlobalAvgPool", "ClampCodes"]

BACKENDS = ("x86", "fbgemm", "qnnpack")

with upstream_notices_hidden():
    import torch.ao.nn.intrinsic.quantized as _nniq
    import torch.ao.nn.quantized as _nnq


def default_backend() -> str:
    """The int8 engine used where none is named: ``"x86"`` (fbgemm and oneDNN kernels) where torch has it, as on
    every x86 CPU with AVX2; else ``"qnnpack"`` (ARM CPUs, whose torch builds have no x86 engine, and x86 CPUs
    without AVX2, where fbgemm cannot run)."""
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines or "qnnpack" not in engines else "qnnpack"


def int8_engine_unavailable(backend: str) -> str | None:
    """None where torch offers the ``backend`` int8 engine here; else what an error says: why it is missing and
    the engine to use (:func:`default_backend`)."""
    if backend in torch.backends.quantized.supported_engines:
        return None
    return (f"the {backend!r} int8 engine is not available here ({_unavailable_because(backend)}); "
            f"use backend={default_backend()!r} (quant.default_backend())")


def check_int8_engine(backend: str) -> str:
    """``backend`` if torch offers that int8 engine here, else a ValueError naming the argument
    (:func:`int8_engine_unavailable`)."""
    unavailable = int8_engine_unavailable(backend)
    if unavailable:
        raise ValueError(f"backend: {unavailable}")
    return backend


def _unavailable_because(backend: str) -> str:
    """Why torch offers no ``backend`` int8 engine here, and what it offers, for an error message: fbgemm (under
    'x86' and 'fbgemm') needs AVX2, so an x86 CPU without it has neither; an ARM build of torch has neither."""
    offered = ", ".join(engine for engine in torch.backends.quantized.supported_engines if engine != "none")
    why = ("its fbgemm kernels need AVX2, which this CPU lacks" if backend in ("x86", "fbgemm") and is_x86()
           and not has_avx2() else "this torch build does not have it")
    return f"{why}; torch offers {offered or 'none'}"


@contextlib.contextmanager
def quantized_engine(backend: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class QuantizedAdd(nn.Module):
    """int8 + int8 -> int8 with fixed output parameters, computed elementwise with one correctly rounded
    float32 operation at a time (``(qa - za) sa + (qb - zb) sb``, divided by the output scale, rounded).

    The backends' own ``quantized::add`` (fbgemm) rounds the vectorised body and the scalar tail of a
    tensor differently, so an element's result depends on its position in memory, which a rotation
    changes: its int8 sums were one step off at a few rotated positions (found by benchmarks.equivariance).
    Separate eager ops give every element the same arithmetic wherever it lies.
    """

    def __init__(self, scale: float, zero_point: int, qmax: int = 255) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmax = scale, zero_point, qmax

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # in place on fresh float copies: the same operations in the same order as
        # round(((qa - za) sa + (qb - zb) sb) / s) + z, without a new buffer per step
        first = a.int_repr().float().sub_(a.q_zero_point()).mul_(a.q_scale())
        second = b.int_repr().float().sub_(b.q_zero_point()).mul_(b.q_scale())
        q = first.add_(second).div_(self.scale).round_().add_(self.zero_point).clamp_(0, self.qmax)
        return torch._make_per_tensor_quantized_tensor(q.to(torch.uint8), self.scale, self.zero_point)


class ClampCodes(nn.Module):
    """Clamp a quint8 tensor's codes to ``[0, qmax]``: the top of a reduced (7-bit) activation range.

    A quint8 kernel clamps its output to ``[0, 255]`` whatever range the plan gave it, so an input beyond its
    planned range reaches the next conv with codes up to 255. On CPUs without VNNI (AVX2, AVX-512 F/BW)
    fbgemm multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds two neighbouring
    products into a **saturating int16**: ``255 * 127 * 2`` overflows, ``127 * 128 * 2`` does not. Which two
    products are neighbours depends on the channel and tap order, and a rotation permutes both (a C_12 field
    shifts by 3 channels under a quarter turn), so a saturated sum broke quarter-turn exactness there. With
    the codes held in ``[0, 127]`` (as the plan and its simulation assume) no sum saturates on any ISA, and
    the int8 model computes the same integers on every CPU.
    """

    def __init__(self, qmax: int) -> None:
        super().__init__()
        if not 0 < qmax < 255:
            raise ValueError(f"qmax: expected 1..254, got {qmax}")
        self.qmax = qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.clamp on a quantized tensor quantizes its bound with the tensor's own (scale, zero point):
        # (qmax - z) * s quantizes back to qmax exactly (the rounding error is far below half a step)
        return torch.clamp(x, max=(self.qmax - x.q_zero_point()) * x.q_scale())

    def extra_repr(self) -> str:
        return f"qmax={self.qmax}"


def _clamp_after(graph_module: fx.GraphModule, node: fx.Node, qmax: int, name: str) -> fx.Node:
    """Insert ``ClampCodes(qmax)`` after ``node`` (all of ``node``'s users read it instead); returns it."""
    graph_module.add_submodule(name, ClampCodes(qmax))
    with graph_module.graph.inserting_after(node):
        clamp = graph_module.graph.call_module(name, (node,))
    node.replace_all_uses_with(clamp, delete_user_cb=lambda user: user is not clamp)
    return clamp


class IntegerMaskedGlobalAvgPool(nn.Module):
    """:class:`rotconv.MaskedGlobalAvgPool` on an int8 tensor, summed in integers: ``(B, C, H, W)`` quint8
    -> ``(B, C)`` float.

    The pooling weights are rounded to integers ``w = round(weight * 2**WEIGHT_BITS)`` (each weight moves by
    at most 2**-25: a relative change below 1e-6 at the 11x11 map of a 95x95 MobileNetV2) and
    ``sum_p q_p w_p`` is computed exactly, so it does not depend on the summation order:
    when the int8 feature map of a rotated input is the rotated feature map (and the weights are
    rotation-symmetric, as a disc is under quarter turns), the pooled features are bit-identical. A float
    sum would differ in the last bits, because a rotation changes the order of the terms.

    How, fast: ``w`` is split into limbs of ``limb_bits <= 8`` bits, ``w = sum_l limb_l 2**(limb_bits l)``.
    One float32 matrix product ``(B*C, H*W) @ (H*W, limbs)`` then sums exactly: every product ``q * limb``
    and every partial sum is an integer below ``H*W * 255 * (2**limb_bits - 1) <= 2**24``, which float32
    represents exactly, in any order and also where matmuls run in bf16/tf32 (8-bit operands are exact
    there). The limbs are recombined in float64 (exact below 2**53). Maps too large for a one-bit limb
    (over 65,793 pixels) are summed in float64 instead.
    """

    WEIGHT_BITS = 24
    FLOAT32_INTEGERS = 2**24  # float32 holds every integer up to this one exactly
    QMAX = 255

    def __init__(self, pool: rotconv.MaskedGlobalAvgPool) -> None:
        super().__init__()
        if pool.size is None:
            raise ValueError("model: int8 needs MaskedGlobalAvgPool(size=...) (fixed input size)")
        integer = torch.round(pool.pool_weights.double() * 2**self.WEIGHT_BITS).flatten()
        self.weight_sum = float(integer.sum())
        pixels = integer.numel()
        limb_bits = min(8, int(math.floor(math.log2(self.FLOAT32_INTEGERS / (self.QMAX * pixels) + 1))))
        self.limb_bits = limb_bits
        if limb_bits < 1:
            self.register_buffer("limbs", integer.unsqueeze(1))
            self.register_buffer("limb_scales", torch.ones(1, dtype=torch.float64))
            return
        count = max(1, math.ceil(int(integer.max()).bit_length() / limb_bits))
        limbs = [torch.remainder(torch.div(integer, 2 ** (limb_bits * index), rounding_mode="floor"), 2**limb_bits)
                 for index in range(count)]
        self.register_buffer("limbs", torch.stack(limbs, 1).float())
        self.register_buffer("limb_scales", torch.tensor([2.0 ** (limb_bits * index) for index in range(count)],
                                                         dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x.int_repr()
        if codes.dim() == 4 and codes.is_contiguous(memory_format=torch.channels_last) and not codes.is_contiguous():
            # the int8 convs write NHWC: multiply in that layout instead of copying to NCHW first
            batch, channels, height, width = codes.shape
            values = codes.permute(0, 2, 3, 1).reshape(batch, height * width, channels).to(self.limbs.dtype)
            partial = (self.limbs.t() @ values).transpose(1, 2)  # (B, C, limbs)
        else:
            partial = codes.flatten(2).to(self.limbs.dtype) @ self.limbs  # (B, C, limbs)
        # partial holds exact integers (see the class docstring)
        total = (partial.double() * self.limb_scales).sum(-1) - x.q_zero_point() * self.weight_sum
        return (total * (x.q_scale() / 2**self.WEIGHT_BITS)).float()

    def extra_repr(self) -> str:
        return f"weight_bits={self.WEIGHT_BITS}, limb_bits={self.limb_bits}, limbs={self.limbs.shape[1]}"


class Int8Model(nn.Module):
    """Float in, float out; runs ``graph_module`` (int8 kernels inside: the fx graph :func:`convert_int8` builds,
    or the TorchScript module :func:`load_int8` reads) under the quantized ``backend``.

    Inputs must be finite: a NaN or infinity would be clamped by the first quantization to a valid int8 value
    and give a confident, meaningless prediction, so it is refused with a ValueError. Save it with
    :func:`save_int8` and read it back with :func:`load_int8` (TorchScript inside): torch.ao's quantized
    modules do not unpickle, so ``torch.save`` of the whole model raises a TypeError saying so.
    """

    def __init__(self, graph_module: nn.Module, backend: str, input_size: int | None = None,
                 normalizer: nn.Module | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.backend = backend
        #: the float model's input size, input preprocessing and classes where it had them (:func:`quant.dfq`
        #: carries them over; ``forward`` takes normalised input as the float model does, ``mobilenet.predict``
        #: applies the normaliser to raw patches); a :func:`load_int8` file keeps all but the normaliser
        self.input_size = input_size
        self.normalizer = normalizer
        self.num_classes = num_classes
        self.eval()

    def train(self, mode: bool = True) -> "Int8Model":
        """Sets the module's flag only: the int8 graph always runs as in eval mode (an inference program;
        its dropout stays off, whatever mode a caller's loop or context manager puts the model in)."""
        super().train(mode)
        self.graph_module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or (self.input_size is not None and x.dim() != 4):
            expected = "a (B, C, H, W) float tensor" if self.input_size is not None else \
                "a float tensor with a batch dimension"
            raise ValueError(f"input: expected {expected}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[0] == 0:
            raise ValueError("input: an empty batch (0 images)")
        if not torch.isfinite(x).all():
            raise ValueError("input: contains NaN or infinite values; an INT8 model would clamp them into range and "
                             "answer confidently (the FP32 model gives NaN)")
        check_normalised(float(x.abs().amax()))
        with quantized_engine(self.backend), torch.no_grad():
            return self.graph_module(x)

    def __reduce__(self):
        # torch.ao's quantized modules cannot be unpickled in torch 2.13 (their state is restored after the
        # module tree is walked: AttributeError deep inside torch.load). Refuse with the way that works.
        raise TypeError("Int8Model cannot be pickled whole (torch.ao quantized modules do not unpickle); save "
                        "it with quant.save_int8(model, path, example_input) and read it with quant.load_int8(path) "
                        "(TorchScript inside); or save the float model and rerun quant.dfq (it is data-free)")

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" + (f", input_size={self.input_size}" if self.input_size else "")


def _packing_engine(backend: str, groups: int, weight_zero_point: int) -> str | None:
    """The library a conv's weights are packed for on ``backend`` (None: the engine's own choice); see below."""
    if backend != "x86":
        return None
    engine = "fbgemm" if groups == 1 or weight_zero_point != 0 else "onednn"
    return engine if engine in torch.backends.quantized.supported_engines else None


def _quantized_conv(conv: nn.Conv2d, plan: QuantPlan, out_name: str, fuse_relu: bool) -> nn.Module:
    if conv.padding_mode != "zeros":
        raise ValueError(f"model: int8 convs support padding_mode='zeros' only, got {conv.padding_mode!r}")
    cls = _nniq.ConvReLU2d if fuse_relu else _nnq.Conv2d
    quantized = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=True)
    w_scale, w_zero_point, _, _ = plan.weight_qparams(conv)
    weight = torch.quantize_per_tensor(conv.weight.detach().float(), w_scale, w_zero_point, torch.qint8)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    # The x86 engine packs a conv for oneDNN or fbgemm when its weights are packed (the packed weights then
    # run on that library whatever the engine at run time). oneDNN requantizes some pixels of a dense conv's
    # GEMM differently from the others (a 1x1 conv of a C_12 MobileNetV2 at batch 32 came out one step
    # apart at two rotated positions: see docs/quantization.md), so dense convs are packed for fbgemm, whose
    # GEMMs are position-independent with symmetric weights. Grouped and depthwise convs are packed for oneDNN:
    # the x86 engine's own choice would be oneDNN on CPUs with VNNI but fbgemm on CPUs without (AVX2), where
    # fbgemm's depthwise kernel has no fast path for channel counts that are not multiples of 8 (C_12's 36, 60,
    # 156, 324): 180 ms against oneDNN's 1 ms for a 3x3 depthwise conv of 36 channels at 47x47, batch 32.
    # oneDNN takes symmetric weights only; asymmetric ones stay with fbgemm.
    engine = _packing_engine(torch.backends.quantized.engine, conv.groups, w_zero_point)
    with quantized_engine(engine) if engine else contextlib.nullcontext():
        quantized.set_weight_bias(weight, bias)
    scale, zero_point, _, _ = plan.activation_qparams(out_name)
    quantized.scale, quantized.zero_point = scale, zero_point
    return quantized


def _quantize_entries(graph_module: fx.GraphModule, plan: QuantPlan) -> set[str]:
    """Pass 1: a Quantize module after every float value that enters the region (for its conv users)."""
    graph, added = graph_module.graph, set()
    for index, node in enumerate(list(graph.nodes)):
        if node.name not in plan.inputs:
            continue
        scale, zero_point, _, qmax = plan.activation_qparams(node.name)
        name = f"quantize_{index}"
        graph_module.add_submodule(name, _nnq.Quantize(scale, zero_point, torch.quint8))
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        for user in list(node.users):
            if user is not new and is_conv(graph_module, user):
                user.replace_input_with(node, new)
        added.add(new.name)
        if qmax < 255:
            added.add(_clamp_after(graph_module, new, qmax, f"clamp_{name}").name)
    return added


def _quantize_operations(graph_module: fx.GraphModule, plan: QuantPlan) -> set[str]:
    """Pass 2: every conv (with its fused ReLU) and every planned residual add on int8 kernels."""
    graph, quantized = graph_module.graph, set()
    for index, node in enumerate(list(graph.nodes)):
        if is_conv(graph_module, node):
            relu_name = plan.fused.get(node.name)
            conv = module_of(graph_module, node)
            graph_module.set_submodule(node.target, _quantized_conv(conv, plan, relu_name or node.name,
                                                                    relu_name is not None))
            if relu_name is not None:
                relu = next(u for u in node.users if u.name == relu_name)
                relu.replace_all_uses_with(node)
                graph.erase_node(relu)
            quantized.add(node.name)
            qmax = plan.activation_qparams(relu_name or node.name)[3]
            if qmax < 255:
                quantized.add(_clamp_after(graph_module, node, qmax, f"clamp_{index}").name)
        elif node.name in plan.points and is_add(node):
            scale, zero_point, _, qmax = plan.activation_qparams(node.name)
            name = f"quantized_add_{index}"
            graph_module.add_submodule(name, QuantizedAdd(scale, zero_point, qmax))
            with graph.inserting_after(node):
                new = graph.call_module(name, tuple(node.args[:2]))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            quantized.add(new.name)
    return quantized


def _dequantize_exits(graph_module: fx.GraphModule, quantized: set[str]) -> None:
    """Pass 3: where a float op reads an int8 value, a DeQuantize in between, unless the op has a registered
    int8 reader (:mod:`quant.registry`), which then replaces it and reads the int8 tensor itself."""
    graph = graph_module.graph
    for index, node in enumerate(list(graph.nodes)):
        if node.name not in quantized:
            continue
        float_users = []
        for user in node.users:
            if user.name in quantized or isinstance(module_of(graph_module, user), QuantizedAdd):
                continue
            rule = rule_for(module_of(graph_module, user))
            if rule is not None and rule.int8_reader is not None and len(user.args) == 1:
                graph_module.set_submodule(user.target, rule.int8_reader(module_of(graph_module, user)))
            else:
                float_users.append(user)
        if not float_users:
            continue
        name = f"dequantize_{index}"
        graph_module.add_submodule(name, _nnq.DeQuantize())
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        for user in float_users:
            user.replace_input_with(node, new)


def convert_int8(plan: QuantPlan, backend: str | None = None) -> Int8Model:
    """Build the int8 network for ``plan`` on ``backend`` ('x86', 'fbgemm' or 'qnnpack'; default:
    :func:`default_backend`): quantize the entries, swap convs and adds for int8 ones, dequantize the exits."""
    backend = default_backend() if backend is None else backend
    check_int8_engine(check_choice(backend, "backend", BACKENDS))
    graph_module = copy.deepcopy(plan.graph_module)
    with quantized_engine(backend), upstream_notices_hidden():
        quantized = _quantize_entries(graph_module, plan)
        quantized |= _quantize_operations(graph_module, plan)
        _dequantize_exits(graph_module, quantized)
        graph_module.graph.lint()
        graph_module.recompile()
    return Int8Model(graph_module, backend)


register_module(rotconv.MaskedGlobalAvgPool, keeps_range=True, int8_reader=IntegerMaskedGlobalAvgPool)


_INT8_FILE_KEY = "rotconv_int8.json"  # the metadata entry of a save_int8 file
# torch's deprecation notes on torch.jit (a FutureWarning from torch 2.15; on Python 3.14 "is not supported in
# Python 3.14+ and may break"): they ask the code that calls torch.jit to move on, which a user of
# save_int8/load_int8 cannot do; only those notes are silenced (the round trip is tested on Python 3.14 too)
_TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is (deprecated|not supported in Python 3\.1[4-9])"


def save_int8(model: Int8Model, path: str, example: torch.Tensor) -> str:
    """Write ``model`` to ``path`` as TorchScript (its int8 graph traced on ``example``, a ``(B, 3, H, W)``
    batch of the input size it runs at) with its backend, input size and classes beside it (not its normaliser);
    :func:`load_int8` reads it back. Written atomically; returns ``path``.

    TorchScript is deprecated in recent torch releases and, torch says, unsupported on Python 3.14 (torch.ao's
    quantized modules serialize through nothing else); files load as long as torch ships ``torch.jit``. For
    deployment, :func:`to_executorch` and :func:`to_onnx` write the maintained formats."""
    if not isinstance(model, Int8Model):
        raise TypeError(f"model: expected a quant Int8Model (quant.dfq(..., mode='int8')), got {type(model).__name__}")
    check_writable(path)
    output = model(example)  # the model's own input checks, before tracing
    with quantized_engine(model.backend), torch.no_grad(), upstream_notices_hidden():
        traced = torch.jit.trace(model.graph_module, example)
    size = int(example.shape[-1]) if example.dim() == 4 and example.shape[-1] == example.shape[-2] else None
    metadata = json.dumps({"format": 1, "backend": model.backend, "input_size": size,
                           "num_classes": int(output.shape[-1]) if output.dim() == 2 else None})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATED)
        atomic_write(path, lambda handle: torch.jit.save(traced, handle, _extra_files={_INT8_FILE_KEY: metadata}))
    return path


def load_int8(path: str) -> Int8Model:
    """Read a :func:`save_int8` file back as an :class:`Int8Model` (input checks included) whose outputs equal the
    saved model's bit for bit. Each int8 conv is packed again for the library :func:`convert_int8` chose on its
    backend (x86: dense convs on fbgemm, grouped ones with symmetric weights on oneDNN), not the engine's own
    choice, which depends on the CPU: a TorchScript file loaded with ``torch.jit.load`` alone runs depthwise convs
    on fbgemm's slow path on CPUs without VNNI and dense convs on oneDNN on CPUs with VNNI, which breaks
    quarter-turn exactness for some networks (docs/quantization.md)."""
    check_path(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: int8 model file not found")  # as the other loaders say it
    extra = {_INT8_FILE_KEY: ""}
    try:
        with upstream_notices_hidden():
            graph = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: not a TorchScript file ({str(error).splitlines()[0][:200]})") from None
    try:
        metadata = json.loads(extra[_INT8_FILE_KEY])
        backend = metadata["backend"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: a TorchScript file not written by quant.save_int8 (no int8 metadata)") from None
    if backend not in BACKENDS:
        raise ValueError(f"{path}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:  # an x86 file on an ARM CPU
        raise ValueError(f"{path}: written for the {backend!r} int8 engine, not available here "
                         f"({_unavailable_because(backend)}); quantize the float model here again (quant.dfq is "
                         f"data-free; backend={default_backend()!r})")
    for module in graph.modules():
        packed = getattr(module, "_packed_params", None)
        if not isinstance(packed, torch.ScriptObject) or \
                not packed._type().qualified_name().endswith("Conv2dPackedParamsBase"):
            continue
        weight, bias = packed.unpack()
        engine = _packing_engine(backend, packed.groups(), int(weight.q_zero_point())
                                 if weight.qscheme() == torch.per_tensor_affine else 1)
        with quantized_engine(engine or backend):
            module._packed_params = torch.ops.quantized.conv2d_prepack(
                weight, bias, packed.stride(), packed.padding(), packed.dilation(), packed.groups())
    size, classes = metadata.get("input_size"), metadata.get("num_classes")  # files written before: none
    return Int8Model(graph, backend, input_size=size if isinstance(size, int) and size > 0 else None,
                     num_classes=classes if isinstance(classes, int) and classes > 0 else None)
