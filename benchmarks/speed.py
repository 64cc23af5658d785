"""The cost of equivariance, measured side by side: rotconv layers and models against plain torch, INT8 against
FP32.

    python -m benchmarks.speed [--quick] [--threads T] [--out speed.json]

Every comparison runs its two candidates interleaved in one process (A, B, A, B, ...) after warm-up and
reports the median time of each and the median of the per-pair ratios, so drifts of the machine's speed
affect both alike. ``--group`` picks the group (default C12; e.g. D12). Layers (C_12, batch 32, 47x47): a
train step (forward + backward of a mean-square loss,
filter expansion from the coefficients included) and an eval forward (expanded filter cached) against
``nn.Conv2d`` with the same channel counts. Models (95x95): conventional vs C_12 MobileNetV2 (train step,
inference), the exported C_12 network vs the conventional one, INT8 (DFQ, real int8 kernels) vs FP32 at
batch 1 and 32, the same INT8 model vs stock torch.ao FX quantization of the same network, serialised size.
Training throughput of both models in each precision x memory layout, and the equivariant model against its plain
twin (the same channel counts in nn.Conv2d / nn.BatchNorm2d), which tells rotconv's own overhead apart from the
cost of the equivariant channel table. bf16 autocast against fp32 for both models' train step wherever oneDNN runs
bf16, saying whether natively (AVX512-BF16/AMX) or emulated (other AVX-512 CPUs, where ``--precision auto`` trains
in fp32). Freed-memory reuse (:mod:`mobilenet.training`, on unless ``--no-reuse-memory``)
against the system allocator, each in fresh processes: wall time, system time and page faults of train steps and
inference.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Callable

import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv

from rotconv.files import atomic_write
from rotconv.hardware import has_native_bf16, onednn_has_bf16

from .common import (REPOSITORY, add_memory_argument, apply_memory_argument, check_outputs, child_environment,
                     report, serialized_bytes, untrained_but_generic)
from .isa import ISAError, cpuid_held, xnnpack_capped, xnnpack_isa
from mobilenet.training import UsageError, bf16_supported, training_step
from quant.int8 import quantized_engine
from quant.notices import upstream_notices_hidden
from .exits import command

__all__ = ["compare", "layer_benchmarks", "model_benchmarks", "training_throughput", "plain_training_twin",
           "allocator_probe", "allocator_benchmarks", "main"]


def _timed(function: Callable[[], object], block: int = 1) -> float:
    """Seconds of one call; with ``block > 1`` the median of that many consecutive calls."""
    if block > 1:
        return statistics.median(_timed(function) for _ in range(block))
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def compare(first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int = 2,
            block: int = 1) -> dict:
    """Interleaved timing of two callables: medians (seconds), the median of per-pair ratios first/second and
    the ratios' quartiles (``ratio_quartiles``: where they straddle 1, this run does not tell the two apart).

    With ``block > 1`` each side of a pair is the median of ``block`` consecutive calls. Use it when the two
    run on different runtimes: a runtime's worker threads spin for milliseconds after their last task (torch's
    OpenMP pool, XNNPACK's, onnxruntime's) and compete for the cores with the other runtime's first call
    (measured on 2 cores: a .pte call right after a torch FP32 forward 28.5 ms instead of 21 ms, the FP32
    forward right after a .pte call 141 instead of 111 ms). The median of three drops that first call, so each
    side is timed as it runs on a device serving a stream of requests."""
    for _ in range(warmup):
        first()
        second()
    pairs = []
    for index in range(repeats):
        if index % 2:  # alternate which one runs first
            b = _timed(second, block)
            a = _timed(first, block)
        else:
            a = _timed(first, block)
            b = _timed(second, block)
        pairs.append((a, b))
    ratios = [a / b for a, b in pairs]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"first_s": statistics.median(a for a, _ in pairs), "second_s": statistics.median(b for _, b in pairs),
            "ratio": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]],
            "repeats": repeats, "block": block}


def ratio_text(timing: dict) -> str:
    """``0.920x`` or, where the timing has them, ``0.920x (0.905-0.944)``: the median ratio and its quartiles."""
    quartiles = timing.get("ratio_quartiles")
    spread = f" ({quartiles[0]:.3f}-{quartiles[1]:.3f})" if quartiles else ""
    return f"{timing['ratio']:.3f}x{spread}"


def _train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    module.train()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    return step


def _inference(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    module.eval()

    def forward() -> None:
        with torch.no_grad():
            module(x)

    return forward


def _plain_twin(layer: nn.Module) -> nn.Conv2d:
    """``nn.Conv2d`` with the channel counts, kernel, stride, padding and groups of a rotconv conv."""
    exported = layer.export(47)
    conv = exported[-1] if isinstance(exported, nn.Sequential) else exported
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     groups=conv.groups, bias=conv.bias is not None)


def layer_cases(group: rotconv.CyclicGroup, quick: bool) -> dict[str, nn.Module]:
    fields = 4 if quick else 8  # 48 / 96 channels with N = 12
    return {
        "LiftingConv2d k5 (3 -> %d fields)" % fields: rotconv.LiftingConv2d(3, fields, 5, group),
        "GroupConv2d k1 (%d -> %d fields)" % (2 * fields, 2 * fields): rotconv.GroupConv2d(
            2 * fields, 2 * fields, 1, group
        ),
        "GroupConv2d k3 (%d -> %d fields)" % (fields, fields): rotconv.GroupConv2d(fields, fields, 3, group),
        "GroupConv2d k5 (%d -> %d fields)" % (fields, fields): rotconv.GroupConv2d(fields, fields, 5, group),
        "DepthwiseGroupConv2d k3 (%d fields)" % (4 * fields): rotconv.DepthwiseGroupConv2d(4 * fields, 3, group),
    }


def _name(group: str) -> str:
    """'C12' -> 'C_12' (as the tables write groups)."""
    return f"{group[0]}_{group[1:]}"


def layer_benchmarks(quick: bool, repeats: int, batch: int = 32, size: int = 47, group: str = "C12") -> list[dict]:
    group = rotconv.as_group(group)
    rows = []
    for name, layer in layer_cases(group, quick).items():
        plain = _plain_twin(layer)
        x = torch.randn(batch, layer.in_channels, size, size)
        train = compare(_train_step(layer, x), _train_step(plain, x), repeats)
        evaluate = compare(_inference(layer, x), _inference(plain, x), repeats)
        rows.append({"layer": name, "channels": f"{layer.in_channels} -> {layer.out_channels}",
                     "train": train, "eval": evaluate})
        print(f"  {name}: train {train['ratio']:.3f}x, eval {evaluate['ratio']:.3f}x", file=sys.stderr)
    return rows


def construction_cost(fields: int = 32, kernel_size: int = 5, group: str = "C12") -> dict:
    """Time and memory to build ``GroupConv2d(fields, fields, kernel_size, group)``: cold (basis not cached
    yet) and warm, its parameters and buffers (the gather indices of the expansion), and one filter expansion."""
    rotconv.basis.clear_cache()
    name = _name(str(group))
    group = rotconv.as_group(group)
    tracemalloc.start()
    cold = _timed(lambda: rotconv.GroupConv2d(fields, fields, kernel_size, group))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    warm = statistics.median(_timed(lambda: rotconv.GroupConv2d(fields, fields, kernel_size, group)) for _ in range(5))
    layer = rotconv.GroupConv2d(fields, fields, kernel_size, group)
    with torch.no_grad():
        expansion = statistics.median(_timed(layer.expand_filter) for _ in range(5))
    return {"layer": f"GroupConv2d({fields}, {fields}, {kernel_size}, {name})", "cold_s": cold, "warm_s": warm,
            "python_peak_bytes": peak, "parameter_bytes": sum(p.numel() * p.element_size() for p in layer.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in layer.buffers()),
            "expanded_filter_bytes": layer.out_channels * layer.in_channels * kernel_size**2 * 4,
            "filter_expansion_s": expansion}


def stock_fx_int8(model: nn.Module, group: str, backend: str, calibration: torch.Tensor) -> nn.Module:
    """The stock torch.ao FX INT8 model of the same DFQ-prepared network, for comparison: ``prepare_fx`` /
    ``convert_fx`` with per-tensor symmetric int8 weights and per-tensor affine uint8 activations (7-bit on
    x86, as torch's x86 qconfig), min/max observers calibrated on ``calibration``. Not bit-exact in general
    (fbgemm's adds round by memory position); timed only."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    prepared = quant.prepare(model, group=group, weight_scheme="symmetric")
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=backend != "qnnpack"),
                      weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    with quantized_engine(backend), upstream_notices_hidden(), torch.no_grad():
        observed = prepare_fx(prepared, QConfigMapping().set_global(qconfig), example_inputs=(calibration[:1],))
        observed(calibration)
        converted = convert_fx(observed)

    class _Engine(nn.Module):  # run under the backend's engine, as quant.Int8Model does
        def __init__(self) -> None:
            super().__init__()
            self.network = converted

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with quantized_engine(backend):
                return self.network(x)

    return _Engine().eval()


def stock_executorch(model: nn.Module, group: str, calibration: torch.Tensor, path: str) -> nn.Module:
    """The stock ExecuTorch program of the same DFQ-prepared network, for comparison: torchao PT2E with
    ``XNNPACKQuantizer`` set globally (every supported op quantized, per-tensor symmetric), calibrated on
    ``calibration``, lowered to XNNPACK, written to ``path`` and loaded. Not bit-exact (a float pool); timed only."""
    from quant.executorch import require_executorch
    api = require_executorch()
    prepared = quant.prepare(model, group=group, weight_scheme="symmetric")
    with upstream_notices_hidden(), torch.no_grad():
        exported = torch.export.export(prepared.eval(), (calibration,)).module()
        quantizer = api["XNNPACKQuantizer"]().set_global(api["get_symmetric_quantization_config"](is_per_channel=False))
        observed = api["prepare_pt2e"](exported, quantizer)
        observed(calibration)
        converted = api["convert_pt2e"](observed)
        program = api["to_edge_transform_and_lower"](torch.export.export(converted, (calibration,)),
                                                     partitioner=[api["XnnpackPartitioner"]()]).to_executorch()
    atomic_write(path, lambda handle: handle.write(program.buffer))
    return quant.load_executorch(path)


def model_benchmarks(repeats: int, backend: str, group: str = "C12") -> dict:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 95, 95)
    conventional = untrained_but_generic(mobilenet.mobilenet_v2(), images)
    equivariant = untrained_but_generic(mobilenet.mobilenet_v2(group=group), images)
    exported = equivariant.export().eval()
    int8 = {scheme: quant.dfq(exported, group=group, mode="int8", backend=backend, weight_scheme=scheme)
            for scheme in ("symmetric", "asymmetric")}
    result: dict = {}
    x32 = torch.randn(32, 3, 95, 95)
    x1 = torch.randn(1, 3, 95, 95)

    def inference(first: nn.Module, second: nn.Module, x: torch.Tensor) -> dict:
        """first vs second on x, each side the median of 3 consecutive calls (other runtimes: see compare)."""
        return compare(_inference(first, x), _inference(second, x), repeats * (2 if x.shape[0] == 1 else 1),
                       block=3)

    result["train_step_b32"] = compare(_train_step(equivariant, x32), _train_step(conventional, x32), repeats)
    print(f"  train step: {result['train_step_b32']['ratio']:.3f}x", file=sys.stderr)
    result["inference_b32"] = inference(equivariant, conventional, x32)
    result["exported_inference_b32"] = inference(exported, conventional, x32)
    print(
        f"  inference: {result['inference_b32']['ratio']:.3f}x, "
        f"exported {result['exported_inference_b32']['ratio']:.3f}x",
        file=sys.stderr,
    )
    for scheme, network in int8.items():
        for batch, x in ((1, x1), (32, x32)):
            key = f"int8_{scheme}_vs_fp32_b{batch}"
            result[key] = inference(network, exported, x)
            print(f"  INT8 ({scheme} weights) / FP32 at batch {batch}: {result[key]['ratio']:.3f}x", file=sys.stderr)
    stock = stock_fx_int8(exported, group, backend, x32)
    for batch, x in ((1, x1), (32, x32)):
        key = f"int8_symmetric_vs_stock_fx_b{batch}"
        result[key] = inference(int8["symmetric"], stock, x)
        print(f"  INT8 (dfq, symmetric) / stock torch.ao FX INT8 at batch {batch}: {result[key]['ratio']:.3f}x",
              file=sys.stderr)
    result["size"] = {"fp32_bytes": serialized_bytes(exported), "int8_bytes": serialized_bytes(int8["symmetric"])}
    if importlib.util.find_spec("executorch") is not None:  # the optional rotconv[deploy] extra
        with tempfile.TemporaryDirectory() as directory:
            for batch, x in ((1, x1), (32, x32)):
                path = quant.to_executorch(exported, os.path.join(directory, f"b{batch}.pte"), group=group,
                                           example_batch=batch)
                program = quant.load_executorch(path)
                key = f"executorch_vs_fp32_b{batch}"
                result[key] = inference(program, exported, x)
                result["size"]["pte_bytes"] = os.path.getsize(path)
                print(f"  ExecuTorch .pte / FP32 at batch {batch}: {result[key]['ratio']:.3f}x", file=sys.stderr)
                stock = stock_executorch(exported, group, x, os.path.join(directory, f"stock-b{batch}.pte"))
                key = f"executorch_vs_stock_b{batch}"
                result[key] = inference(program, stock, x)
                print(f"  ExecuTorch .pte / stock ExecuTorch PT2E at batch {batch}: {ratio_text(result[key])}",
                      file=sys.stderr)
    if all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnxscript", "executorch")):
        with tempfile.TemporaryDirectory() as directory:
            files = {"fp32": quant.to_onnx(exported, os.path.join(directory, "fp32.onnx"), int8=False),
                     "int8": quant.to_onnx(exported, os.path.join(directory, "int8.onnx"), group=group)}
            sessions = {name: quant.load_onnx(path) for name, path in files.items()}
            for batch, x in ((1, x1), (32, x32)):
                for name, session in sessions.items():
                    key = f"onnx_{name}_vs_fp32_b{batch}"
                    result[key] = inference(session, exported, x)
                    print(f"  onnxruntime {name.upper()} / torch FP32 at batch {batch}: {result[key]['ratio']:.3f}x",
                          file=sys.stderr)
            result["size"]["onnx_int8_bytes"] = os.path.getsize(files["int8"])
    result["macs"] = {
        "conventional": mobilenet.summary(conventional).macs,
        "equivariant": mobilenet.summary(equivariant).macs,
    }
    return result


TRAINING_SETTINGS = (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True))


def _checked_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
                  precision: str) -> None:
    """The trainer's step, refusing a non-finite loss (the trainer skips the update then: a step that fast
    would be timed as if it were one)."""
    loss, _ = training_step(model, optimizer, inputs, labels, precision)
    if not torch.isfinite(loss):
        raise RuntimeError(f"training throughput: non-finite loss {float(loss)} ({precision}, "
                           f"{'equivariant' if getattr(model, 'group', None) is not None else 'conventional'} model)")


def memory_layouts(repeats: int, batch: int = 32, group: str = "C12") -> list[dict]:
    """channels_last against contiguous memory, interleaved, for both MobileNetV2s: the trainer's step (fp32, and
    bf16 where the CPU has bf16 kernels) and an eval forward (fp32). ``ratio`` < 1: channels_last is faster. What
    ``TrainConfig(channels_last=...)`` and ``mobilenet.predict``'s layout should be on this CPU."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 95, 95)
    labels = torch.randint(0, 2, (batch,))
    rows = []
    for name, build in (("conventional", lambda: mobilenet.mobilenet_v2()),
                        (_name(group), lambda: mobilenet.mobilenet_v2(group=group))):
        for task in ("train fp32", "train bf16", "inference fp32"):
            if task == "train bf16" and not bf16_supported("cpu"):
                continue
            calls = []
            for memory_format in (torch.channels_last, torch.contiguous_format):
                torch.manual_seed(0)
                model = build().to(memory_format=memory_format)
                inputs = x.contiguous(memory_format=memory_format)
                if task.startswith("train"):
                    optimizer = torch.optim.Adam(model.train().parameters(), lr=1e-4)
                    precision = task.split()[1]
                    calls.append(lambda m=model, o=optimizer, i=inputs: _checked_step(m, o, i, labels, precision))
                else:
                    calls.append(_inference(model, inputs))
            timing = compare(calls[0], calls[1], repeats)
            rows.append({"model": name, "task": task, "batch": batch, "ratio": timing["ratio"], "timing": timing})
            print(f"  {name} {task}: channels_last / contiguous {timing['ratio']:.3f}x", file=sys.stderr)
    return rows


def precisions(repeats: int, batch: int = 32, group: str = "C12") -> list[dict]:
    """bf16 autocast against fp32, interleaved, for both MobileNetV2s: the trainer's step in channels_last,
    wherever oneDNN runs bf16 at all (:func:`rotconv.hardware.onednn_has_bf16`), natively or emulated (``native``:
    :func:`rotconv.hardware.has_native_bf16`). ``ratio`` < 1: bf16 is faster. What ``TrainConfig(precision=
    "auto")`` chooses from: bf16 where it is native, fp32 elsewhere (no rows where oneDNN has no bf16)."""
    if not onednn_has_bf16():
        return []
    native = has_native_bf16()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 95, 95).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch,))
    rows = []
    for name, build in (("conventional", lambda: mobilenet.mobilenet_v2()),
                        (_name(group), lambda: mobilenet.mobilenet_v2(group=group))):
        calls = []
        for precision in ("bf16", "fp32"):
            torch.manual_seed(0)
            model = build().to(memory_format=torch.channels_last).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            calls.append(lambda m=model, o=optimizer, p=precision: _checked_step(m, o, x, labels, p))
        timing = compare(calls[0], calls[1], repeats)
        rows.append({"model": name, "batch": batch, "native": native, "ratio": timing["ratio"], "timing": timing})
        print(f"  {name} train step bf16 ({'native' if native else 'emulated'}) / fp32 {timing['ratio']:.3f}x",
              file=sys.stderr)
    return rows


def plain_training_twin(model: mobilenet.MobileNetV2) -> nn.Module:
    """The equivariant ``model`` as plain torch layers for a training-time comparison: :meth:`export`'s
    ``nn.Conv2d`` / ``nn.BatchNorm2d`` network with the same channel counts, in training mode (its filters are free
    parameters, so it is not equivariant once trained; it separates what rotconv's layers cost, filter expansion
    and the field-shared norm, from what the channel table costs)."""
    return model.export().train()


def training_throughput(repeats: int, batch: int = 32, group: str = "C12") -> list[dict]:
    """Training throughput (patches/s) of both MobileNetV2s with the trainer's step (Adam, cross-entropy) in each
    precision x memory layout, interleaved per setting; bf16 rows only where the CPU has bf16 kernels. Each row
    also times the equivariant model against its :func:`plain_training_twin` (``plain_twin_ratio``): rotconv's
    own overhead, apart from the cost of channel counts such as C_12's 36, 60, 156 and 324."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 95, 95)
    labels = torch.randint(0, 2, (batch,))
    rows = []
    for precision, channels_last in TRAINING_SETTINGS:
        if precision == "bf16" and not bf16_supported("cpu"):
            continue
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        inputs = x.contiguous(memory_format=memory_format)
        equivariant = mobilenet.mobilenet_v2(group=group)
        models = (equivariant, mobilenet.mobilenet_v2(), plain_training_twin(equivariant))
        steps = []
        for model in models:
            model = model.to(memory_format=memory_format).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            steps.append(lambda m=model, o=optimizer: _checked_step(m, o, inputs, labels, precision))
        timing = compare(steps[0], steps[1], repeats)
        twin = compare(steps[0], steps[2], repeats)
        rows.append({"precision": precision, "channels_last": channels_last, "batch": batch,
                     "equivariant_patches_per_s": batch / timing["first_s"],
                     "conventional_patches_per_s": batch / timing["second_s"], "ratio": timing["ratio"],
                     "timing": timing, "plain_twin_ratio": twin["ratio"], "plain_twin_timing": twin})
        print(f"  training {precision}{' channels_last' if channels_last else ''}: {_name(group)} / conventional "
              f"{timing['ratio']:.3f}x, / its plain twin {twin['ratio']:.3f}x", file=sys.stderr)
    return rows


def allocator_probe(
    reuse: bool, group: str = "C12", batch: int = 32, steps: int = 4, threads: int | None = None
) -> dict:
    """In this process (meant to be a fresh one): :func:`mobilenet.training.reuse_freed_memory` on, or glibc's
    defaults left as they are (``reuse=False``); then for both models a batch inference forward (fp32, contiguous;
    first, as in a process that only predicts) and the trainer's step in fp32 contiguous and in the default setting
    (bf16 channels_last where the CPU has bf16 kernels, else fp32 channels_last). Per measurement: median wall time,
    mean system CPU time and minor page faults per call over ``steps`` calls after two warm-up calls."""
    import resource
    from mobilenet.training import reuse_freed_memory

    if threads is not None:
        torch.set_num_threads(threads)
    # off: glibc's own defaults, untouched (reuse_freed_memory(False) would fix its thresholds at their initial
    # 128 KiB, which is slower than glibc's dynamic threshold)
    applied = reuse_freed_memory() if reuse else False
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 95, 95)
    labels = torch.randint(0, 2, (batch,))

    def measure(call: Callable[[], object]) -> dict:
        for _ in range(2):
            call()
        walls, system, faults = [], 0.0, 0
        for _ in range(steps):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            call()
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            system += after.ru_stime - before.ru_stime
            faults += after.ru_minflt - before.ru_minflt
        return {"wall_s": statistics.median(walls), "system_s": system / steps, "minor_faults": faults / steps}

    default = ("bf16" if bf16_supported("cpu") else "fp32", True)
    result = {"reuse": reuse, "applied": applied, "batch": batch, "steps": steps, "default_setting": list(default)}
    models = {"conventional": mobilenet.mobilenet_v2(), "equivariant": mobilenet.mobilenet_v2(group=group)}
    for name, model in models.items():  # inference first: a process that only predicts (nothing trained before)
        result[f"{name}_inference"] = measure(_inference(model, x))
    for name, model in models.items():
        for label, (precision, channels_last) in (
            ("train_fp32_contiguous", ("fp32", False)),
            ("train_default", default),
        ):
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            inputs = x.contiguous(memory_format=memory_format)
            network = model.to(memory_format=memory_format).train()
            optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
            result[f"{name}_{label}"] = measure(lambda: _checked_step(network, optimizer, inputs, labels, precision))
    return result


def allocator_benchmarks(rounds: int, group: str = "C12", batch: int = 32, steps: int = 4) -> dict:
    """:func:`allocator_probe` with freed-memory reuse off and on, each in a fresh interpreter (the allocator is
    process-wide), ``rounds`` times alternating which goes first; per measurement the median over rounds, and the
    ratio reuse / system allocator of the wall times. Also the default training setting with reuse against fp32
    contiguous without it (the trainer's settings of this project against plain torch's)."""
    environment = child_environment()
    probes: dict[bool, list[dict]] = {False: [], True: []}
    for index in range(rounds):
        for reuse in ((False, True) if index % 2 == 0 else (True, False)):
            code = (
                "import json, sys; from benchmarks.speed import allocator_probe; "
                f"print(json.dumps(allocator_probe({reuse}, {group!r}, {batch}, {steps}, {torch.get_num_threads()})))"
            )
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=REPOSITORY
            )
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"allocator probe (reuse={reuse}) failed: {last}")
            probes[reuse].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = [key for key, value in probes[False][0].items() if isinstance(value, dict)]
    rows = []
    for key in keys:
        side = {reuse: {metric: statistics.median(probe[key][metric] for probe in probes[reuse])
                        for metric in ("wall_s", "system_s", "minor_faults")} for reuse in (False, True)}
        rows.append({"measurement": key, "system_allocator": side[False], "reuse": side[True],
                     "ratio": side[True]["wall_s"] / side[False]["wall_s"]})
    by_key = {row["measurement"]: row for row in rows}
    speed_up = {name: by_key[f"{name}_train_fp32_contiguous"]["system_allocator"]["wall_s"]
                / by_key[f"{name}_train_default"]["reuse"]["wall_s"] for name in ("conventional", "equivariant")}
    applied = all(probe["applied"] for probe in probes[True])
    for row in rows:
        print(f"  allocator, {row['measurement']}: reuse / system {row['ratio']:.3f}x, faults "
              f"{row['system_allocator']['minor_faults']:.0f} -> {row['reuse']['minor_faults']:.0f}", file=sys.stderr)
    return {"rounds": rounds, "batch": batch, "steps": steps, "applied": applied,
            "default_setting": probes[True][0]["default_setting"], "rows": rows,
            "default_with_reuse_vs_fp32_contiguous": speed_up}


def format_tables(results: dict) -> str:
    g = _name(results.get("group", "C12"))
    machine = rotconv.hardware_line(results["hardware"]) if "hardware" in results else \
        f"{results['machine']}, {results['threads']} threads, torch {results['torch']}"
    lines = [f"Machine: {machine}; time ratios are medians of interleaved pairs (lower is faster for rotconv); "
             "in the model table, in brackets, the quartiles of the pairs' ratios.", "",
             f"| layer ({g}, batch 32, 47x47) | channels | train step vs nn.Conv2d | eval forward vs nn.Conv2d |",
             "|---|---|---|---|"]
    for row in results["layers"]:
        lines.append(f"| {row['layer']} | {row['channels']} | {row['train']['ratio']:.3f}x "
                     f"({1e3 * row['train']['first_s']:.1f} vs {1e3 * row['train']['second_s']:.1f} ms) | "
                     f"{row['eval']['ratio']:.3f}x ({1e3 * row['eval']['first_s']:.1f} vs "
                     f"{1e3 * row['eval']['second_s']:.1f} ms) |")
    built = results["construction"]
    lines += [
        "",
        f"Construction of {built['layer']}: {1e3 * built['cold_s']:.1f} ms cold (basis built), "
        f"{1e3 * built['warm_s']:.2f} ms warm; parameters {built['parameter_bytes'] / 1024:.0f} KiB, buffers "
        f"{built['buffer_bytes'] / 1024:.0f} KiB, expanded filter {built['expanded_filter_bytes'] / 2**20:.2f} MiB, "
        f"expansion {1e3 * built['filter_expansion_s']:.1f} ms.",
        "",
    ]
    models = results["models"]
    lines += ["| MobileNetV2 at 95x95 | time | ratio |", "|---|---|---|"]
    labels = [
        ("train_step_b32", f"{g} vs conventional, train step, batch 32"),
        ("inference_b32", f"{g} vs conventional, inference, batch 32"),
        ("exported_inference_b32", f"exported {g} vs conventional, inference, batch 32"),
        *[
            (
                f"int8_{scheme}_vs_fp32_b{batch}",
                f"INT8 ({results['backend']}, {scheme} weights) vs FP32, exported {g}, batch {batch}",
            )
            for scheme in ("symmetric", "asymmetric")
            for batch in (1, 32)
        ],
        *[
            (
                f"int8_symmetric_vs_stock_fx_b{batch}",
                f"INT8 (dfq, symmetric) vs stock torch.ao FX INT8 (calibrated, not bit-exact), exported {g}, "
                f"batch {batch}",
            )
            for batch in (1, 32)
            if f"int8_symmetric_vs_stock_fx_b{batch}" in models
        ],
        *[
            (f"executorch_vs_fp32_b{batch}", f"INT8 ExecuTorch XNNPACK .pte vs FP32, exported {g}, batch {batch}")
            for batch in (1, 32)
            if f"executorch_vs_fp32_b{batch}" in models
        ],
        *[
            (
                f"executorch_vs_stock_b{batch}",
                f"INT8 .pte vs stock ExecuTorch PT2E (every op quantized, calibrated, "
                f"not bit-exact), exported {g}, batch {batch}",
            )
            for batch in (1, 32)
            if f"executorch_vs_stock_b{batch}" in models
        ],
        *[
            (f"onnx_{name}_vs_fp32_b{batch}", f"onnxruntime {name.upper()} vs torch FP32, exported {g}, batch {batch}")
            for name in ("fp32", "int8")
            for batch in (1, 32)
            if f"onnx_{name}_vs_fp32_b{batch}" in models
        ],
    ]
    for key, label in labels:
        row = models[key]
        lines.append(
            f"| {label} | {1e3 * row['first_s']:.1f} vs {1e3 * row['second_s']:.1f} ms | {ratio_text(row)} |"
        )
    size = models["size"]
    lines.append(f"| INT8 vs FP32 size (serialised state dict) | {size['int8_bytes'] / 2**20:.2f} vs "
                 f"{size['fp32_bytes'] / 2**20:.2f} MiB | {size['int8_bytes'] / size['fp32_bytes']:.3f}x |")
    if "pte_bytes" in size:
        lines.append(
            f"| ExecuTorch .pte vs FP32 size | {size['pte_bytes'] / 2**20:.2f} vs {size['fp32_bytes'] / 2**20:.2f} "
            f"MiB | {size['pte_bytes'] / size['fp32_bytes']:.3f}x |"
        )
    rows = results.get("training", [])
    if rows:
        base = {name: rows[0][f"{name}_patches_per_s"] for name in ("conventional", "equivariant")}
        lines += ["", f"| training step (Adam, batch 32, 95x95) | conventional patches/s | {g} patches/s | "
                      f"{g} / conventional time | {g} / plain twin time | speed-up vs fp32 contiguous (conv. / {g}) |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            label = f"{row['precision']}, {'channels_last' if row['channels_last'] else 'contiguous'}"
            lines.append(
                f"| {label} | {row['conventional_patches_per_s']:.1f} | {row['equivariant_patches_per_s']:.1f} | "
                f"{row['ratio']:.3f}x | {row['plain_twin_ratio']:.3f}x | "
                f"{row['conventional_patches_per_s'] / base['conventional']:.2f}x / "
                f"{row['equivariant_patches_per_s'] / base['equivariant']:.2f}x |"
            )
        lines += ["", f"Plain twin: the {g} network exported to nn.Conv2d / nn.BatchNorm2d with its channel counts and "
                      "trained as a plain network (what rotconv's filter expansion and field-shared norm add)."]
    layouts = results.get("layouts", [])
    if layouts:
        lines += ["", "| memory layout (batch 32, 95x95) | channels_last / contiguous time |", "|---|---|"]
        lines += [f"| {row['model']}, {row['task']} | {row['ratio']:.3f}x ({1e3 * row['timing']['first_s']:.1f} vs "
                  f"{1e3 * row['timing']['second_s']:.1f} ms) |" for row in layouts]
    bf16_rows = results.get("precisions", [])
    if bf16_rows:
        kind = "native" if bf16_rows[0]["native"] else "emulated by oneDNN: --precision auto trains in fp32 here"
        lines += ["", f"| training precision (channels_last, batch 32, 95x95) | bf16 ({kind}) / fp32 time |",
                  "|---|---|"]
        lines += [f"| {row['model']} | {row['ratio']:.3f}x ({1e3 * row['timing']['first_s']:.1f} vs "
                  f"{1e3 * row['timing']['second_s']:.1f} ms) |" for row in bf16_rows]
    allocator = results.get("allocator")
    if allocator:
        precision, channels_last = allocator["default_setting"]
        default = f"{precision}{', channels_last' if channels_last else ''}"
        lines += ["", f"| freed-memory reuse (--reuse-memory; fresh processes, {allocator['rounds']} rounds, batch "
                      f"{allocator['batch']}) | system allocator | reuse | reuse / system time |", "|---|---|---|---|"]
        what = {"inference": "inference (fp32)", "train_fp32_contiguous": "train step (fp32, contiguous)",
                "train_default": f"train step ({default})"}
        for row in allocator["rows"]:
            model, measurement = row["measurement"].split("_", 1)
            label = f"{g if model == 'equivariant' else model} {what[measurement]}"
            cells = [f"{1e3 * side['wall_s']:.0f} ms, {1e3 * side['system_s']:.0f} ms system, "
                     f"{side['minor_faults']:.0f} page faults" for side in (row["system_allocator"], row["reuse"])]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {row['ratio']:.3f}x |")
        speed_up = allocator["default_with_reuse_vs_fp32_contiguous"]
        lines += [
            "",
            f"Default training ({default}, reuse) vs fp32 contiguous with the system allocator: "
            f"conventional {speed_up['conventional']:.2f}x, {g} {speed_up['equivariant']:.2f}x the patches/s.",
        ]
        if not allocator["applied"]:
            lines.append("(reuse not applied: the C library is not glibc; both columns are the system allocator)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and narrower layers (< 2 minutes)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, help="timed pairs per comparison (default 7, quick 5)")
    parser.add_argument("--backend", choices=("x86", "qnnpack"), default=quant.default_backend(),
                        help="int8 engine (default: this CPU's, %(default)s; qnnpack on ARM)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--group", default="C12", help="group of the equivariant layers and model (C12, D12, ...)")
    add_memory_argument(parser)
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    apply_memory_argument(args)
    try:
        args.group = str(rotconv.as_group(args.group))
    except ValueError as error:
        parser.error(f"--group: {error}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads: expected >= 1")
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 7)
    if repeats < 1:
        parser.error("--repeats: expected >= 1")
    try:
        check_outputs(args.out)
    except UsageError as error:
        parser.error(str(error))
    hardware = rotconv.cpu_report()
    if importlib.util.find_spec("executorch") is not None:  # which kernels the .pte gets (benchmarks.isa)
        try:
            if xnnpack_capped():
                hardware["isa_caps"]["XNNPACK"] = xnnpack_isa()
        except ISAError:
            pass
    held = cpuid_held()  # what the CPU answers, for every library (onnxruntime too)
    if held:
        hardware["isa_caps"]["CPUID"] = held
    print(rotconv.hardware_line(hardware))
    print("layers ...", file=sys.stderr)
    results = {
        "machine": f"{hardware['cpu']} ({os.cpu_count()} cores)",
        "hardware": hardware,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": args.backend,
        "quick": args.quick,
        "group": args.group,
        "layers": layer_benchmarks(args.quick, repeats, group=args.group),
        "construction": construction_cost(group=args.group),
    }
    print("models ...", file=sys.stderr)
    results["models"] = model_benchmarks(max(3, repeats // 2) if args.quick else repeats, args.backend, args.group)
    print("training throughput ...", file=sys.stderr)
    results["training"] = training_throughput(max(3, repeats // 2) if args.quick else repeats, group=args.group)
    print("memory layouts ...", file=sys.stderr)
    results["layouts"] = memory_layouts(max(3, repeats // 2) if args.quick else repeats, group=args.group)
    print("training precisions ...", file=sys.stderr)
    results["precisions"] = precisions(max(3, repeats // 2) if args.quick else repeats, group=args.group)
    print("allocator (fresh processes) ...", file=sys.stderr)
    results["allocator"] = allocator_benchmarks(1 if args.quick else 3, args.group)
    results["table"] = format_tables(results)
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
