"""The two entry points: :func:`quantize` (a BN-folded network -> simulated or int8) and :func:`dfq` (the
whole data-free pipeline on a float network)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from rotconv.validation import check_choice

from .arithmetic import WEIGHT_SCHEME_DEFAULT, reduces_range
from .int8 import BACKENDS, Int8Model, check_int8_engine, convert_int8, default_backend
from .plan import FakeQuantize, input_range_of, plan_quantization, simulate
from .transforms import (absorb_high_bias, correct_bias, equalize, field_size, fold_batchnorm, model_group,
                         replace_relu6)

__all__ = ["quantize", "dfq", "prepare", "MODES", "RELU6_MODES", "RELU6_DEFAULT", "check_float_model"]

MODES = ("simulated", "int8")
#: what :func:`prepare` does with ReLU6: "replace" it by ReLU and equalize through it (the DFQ paper), or "keep"
#: it (its clip becomes the top of the quantization range) and leave the pairs through it unequalized
RELU6_MODES = ("replace", "keep")
#: ReLU6 handling of :func:`dfq` and the deployable exports: keeping ReLU6 (its clip becomes the top of the
#: conv's range) lost less accuracy on trained PCam models than DFQ's ReLU6 -> ReLU (docs/quantization.md)
RELU6_DEFAULT = "keep"


def quantize(model: nn.Module, weight_bits: int = 8, act_bits: int = 8, mode: str = "simulated",
             backend: str | None = None, calibration: Iterable | None = None,
             input_range: tuple[float, float] | None = None, weight_scheme: str = WEIGHT_SCHEME_DEFAULT) -> nn.Module:
    """Quantize a BN-folded network: per-tensor weights and activations.

    Args:
        model: plain network with batch norms folded (:func:`fold_batchnorm`) and ReLU6 replaced.
        weight_bits, act_bits: bit widths (2..8; ``mode="int8"`` needs 8).
        mode: ``"simulated"`` (float arithmetic with quantize-dequantize: the reference) or ``"int8"``
            (real int8 kernels through torch.ao's quantized modules; float in, float out).
        backend: int8 engine, ``"x86"`` (also the fbgemm kernels) or ``"qnnpack"``; default: this machine's,
            :func:`quant.default_backend` (x86 on x86 CPUs with AVX2, else qnnpack). The simulation follows the
            backend's plan too (x86/fbgemm: 7-bit activations and 7-bit depthwise weights).
        calibration: optional iterable of input batches (or (input, label) pairs) to measure activation
            ranges; without it ranges come data-free from the BN statistics, and a conv fed by anything
            whose range is not data-free (SiLU, Linear, ...) raises ValueError.
        input_range: the range of the network input used when no calibration is given (default: the
            range of ``model.normalizer`` where the model has one, else (-3, 3): :func:`input_range_of`).
        weight_scheme: ``"symmetric"`` (zero point 0; the default, :data:`WEIGHT_SCHEME_DEFAULT`) or
            ``"asymmetric"`` (per-tensor [min, max] with a zero point, as the DFQ paper). On x86/fbgemm,
            depthwise convs with a non-zero weight zero point fall back to a generic kernel 10-100x slower.
    """
    check_choice(mode, "mode", MODES)
    if mode == "int8" and (weight_bits != 8 or act_bits != 8):
        raise ValueError("weight_bits/act_bits: mode='int8' runs 8-bit kernels; use mode='simulated' for others")
    backend = default_backend() if backend is None else backend
    check_choice(backend, "backend", BACKENDS)
    if mode == "int8":
        check_int8_engine(backend)
    plan = plan_quantization(model, weight_bits, act_bits, calibration, input_range,  # None: resolved there
                             reduce_range=reduces_range(backend), weight_scheme=weight_scheme,
                             integer_bias=backend == "qnnpack")
    if mode == "simulated":
        return simulate(plan)
    return convert_int8(plan, backend)


def check_float_model(model: nn.Module) -> None:
    """Refuse what DFQ cannot start from: an already quantized model, non-finite weights or statistics."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if (
            isinstance(module, (FakeQuantize, Int8Model))
            or type(module).__module__.startswith("torch.ao.nn.quantized")
            or type(module).__module__.startswith("torch.ao.nn.intrinsic.quantized")
        ):
            raise ValueError(f"model: already quantized ({name or 'the model'} is {type(module).__name__}); "
                             "pass the float model")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model: {name} has NaN or infinite values; a diverged or corrupt model cannot be "
                             "quantized")


def prepare(model: nn.Module, group: object = None, bias_correction: bool = True, weight_bits: int = 8,
            weight_scheme: str = WEIGHT_SCHEME_DEFAULT, reduce_range: bool = False, *,
            relu6: str = RELU6_DEFAULT, per_channel_weights: bool = False) -> fx.GraphModule:
    """The data-free steps before quantization: fold BN, ReLU6 -> ReLU, equalize (field-shared for ``group``),
    absorb high biases, and (``bias_correction``) correct biases for the given weight quantization.

    ``relu6="keep"`` keeps every ReLU6 instead (the float network is unchanged; the clip at 6 becomes the top of
    the conv's quantization range): pairs through a ReLU6 are then neither equalized nor bias-absorbed, which
    in MobileNetV2 is every pair. Replacing ReLU6 by ReLU changes the float function wherever activations
    exceed 6; on trained PCam models that change was most of the INT8 error (docs/quantization.md).
    ``per_channel_weights``: the biases are corrected for weights rounded per output channel (what
    :func:`quant.to_executorch` with ``per_channel_weights=True`` writes)."""
    check_choice(relu6, "relu6", RELU6_MODES)
    check_float_model(model)
    size = field_size(model_group(model, group))
    prepared: fx.GraphModule = fold_batchnorm(model)
    if relu6 == "replace":
        prepared = replace_relu6(prepared)
    prepared = equalize(prepared, group=size, keep_relu6=relu6 == "keep")
    prepared = absorb_high_bias(prepared)
    if bias_correction:
        prepared = correct_bias(prepared, weight_bits, weight_scheme, reduce_range=reduce_range,
                                per_channel=per_channel_weights)
    return prepared


def dfq(model: nn.Module, group: object = None, bias_correction: bool = True, *,
        relu6: str = RELU6_DEFAULT, **quantize_kwargs) -> nn.Module:
    """The whole DFQ pipeline: fold BN, ReLU6 -> ReLU, equalize (field-shared for ``group``: a rotconv group,
    its name or N, as the network was built with; default: the group the model carries,
    :func:`quant.model_group`), absorb high biases, correct biases, quantize
    (``quantize_kwargs`` go to :func:`quantize`). An :class:`Int8Model` keeps the model's ``input_size``,
    ``normalizer`` and ``num_classes`` (what ``mobilenet.predict`` reads). ``relu6``: see :func:`prepare`
    (default: kept)."""
    # the model's own normaliser gives the input range; the prepared graph no longer carries it
    quantize_kwargs["input_range"] = input_range_of(model, quantize_kwargs.get("input_range"))
    if quantize_kwargs.get("backend") is None:
        quantize_kwargs["backend"] = default_backend()
    check_choice(quantize_kwargs["backend"], "backend", BACKENDS)  # before the work
    if quantize_kwargs.get("mode") == "int8":
        check_int8_engine(quantize_kwargs["backend"])
    prepared = prepare(model, group, bias_correction, quantize_kwargs.get("weight_bits", 8),
                       quantize_kwargs.get("weight_scheme", WEIGHT_SCHEME_DEFAULT),
                       reduces_range(quantize_kwargs["backend"]), relu6=relu6)
    quantized = quantize(prepared, **quantize_kwargs)
    if isinstance(quantized, Int8Model):  # what mobilenet.predict needs to take raw patches, as the float model
        quantized.input_size = getattr(model, "input_size", None)
        quantized.normalizer = getattr(model, "normalizer", None)
        quantized.num_classes = getattr(model, "num_classes", None)
    return quantized
