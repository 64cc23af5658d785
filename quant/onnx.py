"""The models as ONNX files for onnxruntime: FP32, or the data-free INT8 model as a QDQ graph.

``int8=False`` writes the float network as it is (onnxruntime folds the batch norms). ``int8=True`` writes
the model of :func:`quant.to_executorch` before lowering (:func:`quant.executorch.quantize_pt2e`: the DFQ
pipeline, the project's data-free activation ranges, per-tensor symmetric int8 weights, the exact integer
pool) as QuantizeLinear/DequantizeLinear pairs around every convolution and residual add; onnxruntime's
graph optimizer fuses them into integer kernels: all 52 convolutions of MobileNetV2 become QLinearConv and
the 11 residual adds QLinearAdd. For that the activations are written as **uint8** (zero point + 128, the
same real values as torchao's int8 codes): onnxruntime on x86 converts int8 activations to uint8 only in
front of convolutions, so with int8 activations the 17 projection convolutions (uint8 in, int8 out towards
an add) and the adds stayed float operations on dequantized values, 20-40% slower and not bit-exact.
The weights are written as **uint8** too (zero point 128, the same real values) unless
``weight_dtype="int8"``: onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 F/BW) add
products in saturating int16 pairs, which breaks exactness, while its uint8 x uint8 kernels widen to int16
first and never saturate. So the default file is exact in any onnxruntime session on x86 CPUs (and ARM
ones, checked emulated). With VNNI (AVX-512 VNNI, or the AVX-VNNI of Intel's client CPUs from Alder Lake on)
the uint8 x int8 kernels add into int32, exact and faster (u8u8 took 2.3-2.8x their time at batch 32), so
:func:`load_onnx` gives its session int8 weights there and uint8 ones on x86 CPUs without VNNI, whichever the
file holds. Every remaining operation on the feature maps is integer, so the logits of a patch rotated by 90
degrees are bit-identical (tested, at several batch sizes, on CPUs with and without VNNI).

Needs the optional extra: ``pip install 'rotconv[deploy]'`` (onnx, onnxscript, onnxruntime; INT8 also
executorch's quantizer).
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Iterable

import torch
import torch.nn as nn

from rotconv.files import atomic_write, check_path, check_writable
from rotconv.hardware import has_avx_vnni, has_vnni, is_x86

from .executorch import quantize_pt2e, traced_example
from .extras import output_classes, require_extra, runtime_input
from .notices import upstream_notices_hidden
from .pipeline import RELU6_DEFAULT, check_float_model

__all__ = ["to_onnx", "load_onnx", "OnnxModel"]

# how to_onnx may store the INT8 weights (the default first)
_WEIGHT_DTYPES = ("uint8", "int8")


def to_onnx(model: nn.Module, path: str, group: object = None, int8: bool = True, example_batch: int = 1,
            example_input: torch.Tensor | None = None, input_range: tuple[float, float] | None = None,
            calibration: Iterable | None = None, bias_correction: bool = True, dynamic_batch: bool = True,
            relu6: str = RELU6_DEFAULT, weight_dtype: str = "uint8") -> str:
    """Write ``model`` (a float plain network, e.g. ``model.export()``) to ``path`` as ONNX; returns ``path``.

    Args:
        model: the float network (batch norms unfolded, as trained).
        path: the ``.onnx`` file to write (atomically).
        group: the model's group (a group, its name or N), for DFQ's field-shared equalization; default: the
            group the model carries (:func:`quant.model_group`). Unused with ``int8=False``.
        int8: the data-free INT8 model as a QDQ graph (True) or the float model (False).
        example_batch, example_input: the traced input (default zeros of ``model.input_size``).
        input_range, calibration, bias_correction, relu6: as :func:`quant.to_executorch`.
        dynamic_batch: the file accepts any batch size (else only the example's).
        weight_dtype: how the INT8 weights are stored: ``"uint8"`` (zero point 128), exact under quarter turns
            in any onnxruntime session (x86, ARM); ``"int8"``, onnxruntime's faster kernels on x86 CPUs with
            AVX-512 VNNI or AVX-VNNI (a session opened on the file itself took 1/2.8 and 1/2.3 the time at batch
            32 there), but on an x86 CPU without either such a session is not exact. The same real values either
            way, and :func:`load_onnx` runs either file exactly and at the faster kernels' speed wherever they
            are exact.
    """
    require_extra(("onnx", "onnxscript"), "quant.to_onnx")
    check_writable(path)  # refused before the export, not after it
    if not isinstance(int8, bool):
        raise ValueError(f"int8: expected True or False, got {int8!r}")
    if weight_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected one of {', '.join(map(repr, _WEIGHT_DTYPES))}, got {weight_dtype!r}")
    example = traced_example(model, example_input, example_batch)
    if int8:
        network = quantize_pt2e(model, group, example, input_range, calibration, bias_correction, relu6)
    else:
        check_float_model(model)
        network = copy.deepcopy(model).eval()  # the caller's model keeps its mode
    dynamic = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    # the PT2E graph was captured in eval mode, and an exported graph cannot be switched to it: its training
    # flag, which the ONNX exporter warns about, changes nothing
    with upstream_notices_hidden("Exporting a model while it is in training mode"), \
            tempfile.TemporaryDirectory() as directory:
        program = _export(network, example, dynamic)
        temporary = os.path.join(directory, "model.onnx")
        program.save(temporary)
        if int8:
            import onnx

            proto = onnx.load(temporary)
            _activations_to_uint8(proto)
            _shift_weights(proto, weight_dtype)
            onnx.checker.check_model(proto)
            data = proto.SerializeToString()
        else:
            with open(temporary, "rb") as handle:
                data = handle.read()
    atomic_write(path, lambda handle: handle.write(data))
    return path


def _constant_reader(proto):
    """``name -> numpy array`` of an initializer or Constant node of ``proto`` (None for other values)."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    constants = {node.output[0]: node for node in proto.graph.node if node.op_type == "Constant"}

    def value(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    return value


def _activations_to_uint8(proto) -> int:
    """Rewrite every activation QuantizeLinear/DequantizeLinear of ``proto`` (an ONNX ModelProto) from int8
    to uint8 in place: zero point ``z`` becomes ``z + 128``, so ``scale * (q - z)`` is unchanged for
    ``q_uint8 = q_int8 + 128``. Weight DequantizeLinear nodes (constant input) keep int8. Returns the count."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    value = _constant_reader(proto)

    changed, outputs, replaced = 0, set(), set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and (node.input[0] in initializers or node.input[0] in constants):
            continue  # a weight: see _shift_weights
        zero_point = value(node.input[2])
        if zero_point is None or zero_point.dtype != np.int8:
            continue
        name = f"uint8_zero_point_{changed}"
        graph.initializer.append(numpy_helper.from_array((zero_point.astype(np.int16) + 128).astype(np.uint8), name))
        replaced.add(node.input[2])
        node.input[2] = name
        changed += 1
        if node.op_type == "QuantizeLinear":
            outputs.add(node.output[0])
    for info in graph.value_info:
        if info.name in outputs:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name in replaced and tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    unused_nodes = [node for node in graph.node if node.op_type == "Constant" and node.output[0] in replaced
                    and node.output[0] not in used]
    for node in unused_nodes:
        graph.node.remove(node)
    return changed


def _session_weight_dtype() -> str | None:
    """The weight dtype onnxruntime runs exactly and fastest here: int8 on x86 CPUs with AVX-512 VNNI or AVX-VNNI
    (its u8s8 kernels add products into int32 there), uint8 on x86 CPUs without (its u8s8 kernels add neighbouring
    products in saturating int16 pairs there); None elsewhere (ARM's int8 dot products do not saturate: the
    file's own)."""
    if not is_x86():
        return None
    return "int8" if has_vnni() or has_avx_vnni() else "uint8"


def _shift_weights(proto, dtype: str) -> int:
    """Store every constant weight of ``proto``'s DequantizeLinear nodes as ``dtype`` (``"uint8"``: ``q + 128``
    with zero point ``z + 128``; ``"int8"``: the reverse, for symmetric weights only, zero point 128), in place:
    the same real values ``scale * (q - z)``. Returns how many weights changed.

    onnxruntime multiplies uint8 activations by int8 weights (u8s8) with ``vpmaddubsw`` on x86 CPUs without
    VNNI (AVX2, AVX-512 F/BW): two neighbouring products are added into a saturating int16, and which two are
    neighbours depends on the channel and tap order, which a rotation permutes, so a saturated sum made
    quarter-turn logits differ by several units on an AVX2 CPU. uint8 weights (u8u8) are widened to int16
    before the multiply and never saturate: the integers are exact on every ISA.
    """
    import numpy as np
    from onnx import numpy_helper

    source, target = (np.int8, np.uint8) if dtype == "uint8" else (np.uint8, np.int8)
    offset = 128 if dtype == "uint8" else -128
    graph = proto.graph
    changed, replaced = 0, set()
    for node, weight, zero_point in _constant_weights(proto):
        if weight.dtype != source or zero_point.dtype != source:
            continue
        if dtype == "int8" and not (zero_point == 128).all():
            continue  # onnxruntime's int8-weight kernels are made for symmetric weights
        for index, values in ((0, weight), (2, zero_point)):
            name = f"{dtype}_weight_{changed}" if index == 0 else f"{dtype}_weight_zero_point_{changed}"
            graph.initializer.append(numpy_helper.from_array((values.astype(np.int16) + offset).astype(target), name))
            replaced.add(node.input[index])
            node.input[index] = name
        changed += 1
    used = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name in replaced and tensor.name not in used]:
        graph.initializer.remove(tensor)
    for node in [node for node in graph.node if node.op_type == "Constant" and node.output[0] in replaced
                 and node.output[0] not in used]:
        graph.node.remove(node)
    return changed


def _constant_weights(proto):
    """``(node, weight, zero point)`` of every DequantizeLinear of ``proto`` whose value and zero point are
    stored constants (the weights; activations are computed)."""
    array = _constant_reader(proto)
    for node in list(proto.graph.node):
        if node.op_type == "DequantizeLinear" and len(node.input) >= 3:
            weight, zero_point = array(node.input[0]), array(node.input[2])
            if weight is not None and zero_point is not None:
                yield node, weight, zero_point


def _weight_dtypes(proto) -> set[str]:
    """The dtypes (``"int8"``, ``"uint8"``) of ``proto``'s constant DequantizeLinear weights."""
    return {str(weight.dtype) for _, weight, _ in _constant_weights(proto)} & set(_WEIGHT_DTYPES)


def _export(network: nn.Module, example: torch.Tensor, dynamic: dict | None):
    import contextlib
    import io
    import logging

    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(quiet):  # the exporter prints its progress
        return torch.onnx.export(network, (example,), dynamo=True, opset_version=18, input_names=["x"],
                                 output_names=["logits"], dynamic_shapes=(dynamic["x"],) if dynamic else None,
                                 verbose=False)


class OnnxModel(nn.Module):
    """An ONNX file as a module: float ``(B, C, H, W)`` in, logits out, run by onnxruntime on the CPU with
    its full graph optimisation (which fuses QDQ pairs into integer kernels)."""

    def __init__(self, path: str, threads: int | None = None) -> None:
        super().__init__()
        require_extra(("onnxruntime", "onnx"), "quant.load_onnx")
        import onnx
        import onnxruntime

        check_path(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: ONNX file not found")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        # onnxruntime's worker threads busy-wait after each run by default, taking the cores from whatever runs
        # next in this process (torch, measured: torch FP32 2x slower right after an onnxruntime call)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            proto = onnx.load(path)
        except Exception as error:  # protobuf raises its own types for a bad file
            raise ValueError(f"{path}: not a loadable ONNX model ({type(error).__name__})") from None
        wanted = _session_weight_dtype()
        if wanted is not None:  # see the module docstring: exact integers, the fast kernels where they are exact
            _shift_weights(proto, wanted)
        #: whether the session runs uint8 weights (x86 without any VNNI; off x86 as the file holds them)
        self.uint8_weights = "uint8" in _weight_dtypes(proto)
        source = proto.SerializeToString()
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise ValueError(f"{path}: not a loadable ONNX model ({type(error).__name__})") from None
        meta = self.session.get_inputs()[0]
        self.input_name = meta.name
        self.input_shape = tuple(meta.shape)
        self.num_classes = output_classes(tuple(self.session.get_outputs()[0].shape))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = runtime_input(x, self.input_shape)
        fixed = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        if fixed is not None and x.shape[0] != fixed:
            raise ValueError(f"input: the model was written for batch {fixed} (to_onnx(dynamic_batch=True) "
                             f"accepts any), got {x.shape[0]}")
        output = self.session.run(None, {self.input_name: x.numpy()})[0]
        return torch.from_numpy(output)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, input_shape={self.input_shape}, uint8_weights={self.uint8_weights}"


def load_onnx(path: str, threads: int | None = None) -> OnnxModel:
    """The file written by :func:`to_onnx`, as a callable module (onnxruntime, CPU)."""
    return OnnxModel(path, threads)
