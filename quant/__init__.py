"""Data-free quantization (DFQ; Nagel et al., ICCV 2019) and INT8 inference for plain torch.nn networks.

Typical use on an exported equivariant MobileNetV2 (``model.export()``)::

    int8_model = quant.dfq(plain_model, group=12, mode="int8")

Steps (:mod:`quant.transforms`): :func:`fold_batchnorm`, :func:`replace_relu6`, :func:`equalize`
(field-shared for ``group=N``), :func:`absorb_high_bias`, :func:`correct_bias`; then :func:`quantize`
(:mod:`quant.plan` chooses the quantization points, :mod:`quant.int8` builds the int8 network,
:mod:`quant.arithmetic` holds the scale/zero-point rules, :mod:`quant.registry` what quant knows about
other modules). Patterns it cannot quantize correctly raise ValueError naming the node.
:func:`to_executorch` writes the same data-free INT8 model as an ExecuTorch/XNNPACK program (optional extra
``rotconv[deploy]``).
"""
from .arithmetic import (REDUCED_RANGE_BACKENDS, WEIGHT_SCHEME_DEFAULT, WEIGHT_SCHEMES, fake_quantize_tensor,
                         fake_quantize_weight, quantization_parameters, weight_bits_for,
                         weight_quantization_parameters)
from .executorch import ExecuTorchModel, load_executorch, to_executorch
from .extras import INT8_RUNTIMES, default_int8_runtime
from .onnx import OnnxModel, load_onnx, to_onnx
from .int8 import (BACKENDS, ClampCodes, Int8Model, check_int8_engine, convert_int8, default_backend,
                   int8_engine_unavailable, load_int8, save_int8)
from .pipeline import MODES, RELU6_DEFAULT, RELU6_MODES, dfq, prepare, quantize
from .plan import DEFAULT_INPUT_RANGE, FakeQuantize, QuantPlan, input_range_of, plan_quantization, simulate
from .registry import ModuleRule, register_module
from .transforms import absorb_high_bias, correct_bias, equalize, fold_batchnorm, model_group, replace_relu6

__all__ = [
    "fold_batchnorm",
    "replace_relu6",
    "equalize",
    "absorb_high_bias",
    "correct_bias",
    "model_group",
    "quantize",
    "dfq",
    "plan_quantization",
    "simulate",
    "input_range_of",
    "DEFAULT_INPUT_RANGE",
    "convert_int8",
    "Int8Model",
    "save_int8",
    "load_int8",
    "ClampCodes",
    "QuantPlan",
    "FakeQuantize",
    "fake_quantize_tensor",
    "fake_quantize_weight",
    "quantization_parameters",
    "weight_quantization_parameters",
    "weight_bits_for",
    "register_module",
    "ModuleRule",
    "BACKENDS",
    "default_backend",
    "check_int8_engine",
    "int8_engine_unavailable",
    "MODES",
    "WEIGHT_SCHEMES",
    "WEIGHT_SCHEME_DEFAULT",
    "REDUCED_RANGE_BACKENDS",
    "RELU6_MODES",
    "RELU6_DEFAULT",
    "prepare",
    "to_executorch",
    "load_executorch",
    "ExecuTorchModel",
    "to_onnx",
    "load_onnx",
    "OnnxModel",
    "INT8_RUNTIMES",
    "default_int8_runtime",
]
