"""quant.notices: the upstream libraries' notices about their own code are hidden while quant calls them, and
every other warning — one about the user's model above all — still reaches the caller."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import quant
from quant.notices import upstream_notices_hidden

HIDDEN = [
    (DeprecationWarning, "torch.jit.script_method is deprecated"),
    (FutureWarning, "isinstance(treespec, LeafSpec) is deprecated"),
    (PendingDeprecationWarning, "will go"),
    (torch.jit.TracerWarning, "Converting a tensor to a Python boolean might cause the trace to be incorrect"),
    (UserWarning, "Deprecation: TorchAODType is deprecated, please use the torch.intN dtype"),
    (UserWarning, "torch.quantize_per_tensor ... are deprecated and will be removed"),
    (UserWarning, "This API is experimental and subject to change without notice."),
]
SHOWN = [
    (UserWarning, "the model's own note: weights look untrained"),
    (RuntimeWarning, "overflow encountered in exp"),
    (UserWarning, "Exporting a model while it is in training mode"),  # hidden only where asked (the ONNX export)
]


def caught_within_block(category, message, *extra):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream_notices_hidden(*extra):
            warnings.warn(message, category)
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("category, message", HIDDEN)
def test_upstream_notices_are_hidden(category, message):
    assert caught_within_block(category, message) == []


@pytest.mark.parametrize("category, message", SHOWN)
def test_other_warnings_reach_the_caller(category, message):
    assert caught_within_block(category, message) == [(category, message)]


def test_a_named_message_is_hidden_and_the_filters_end_with_the_block():
    assert caught_within_block(UserWarning, "Exporting a model while it is in training mode. Please ensure",
                               "Exporting a model while it is in training mode") == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream_notices_hidden():
            pass
        warnings.warn("after the block", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["after the block"]


class WarnsInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("WarnsInForward: the model's own note", UserWarning)
        return x


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                    reason="quant.to_onnx needs the deploy extra (onnx, onnxscript), not installed")
def test_a_warning_from_the_model_reaches_the_caller_of_an_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), WarnsInForward(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quant.to_onnx(model, str(tmp_path / "model.onnx"), int8=False, example_input=torch.zeros(1, 3, 8, 8))
    messages = [str(w.message) for w in caught]
    assert "WarnsInForward: the model's own note" in messages
    assert not [m for m in messages if "deprecat" in m.lower() or "training mode" in m]  # upstream's own: hidden


#: a fresh process, every warning an error: export, load and run each INT8 format (argv[1]: a directory)
ROUND_TRIP = """
import os, sys, warnings
warnings.simplefilter("error")
import torch
import mobilenet, quant
model = mobilenet.mobilenet_v2(group=4, input_size=95, width_mult=0.25).eval().export()
x, directory = torch.zeros(1, 3, 95, 95), sys.argv[1]
print(quant.load_executorch(quant.to_executorch(model, os.path.join(directory, "m.pte")))(x).shape[-1])
print(quant.load_onnx(quant.to_onnx(model, os.path.join(directory, "m.onnx")))(x).shape[-1])
int8 = quant.dfq(model, group=4, mode="int8")
print(quant.load_int8(quant.save_int8(int8, os.path.join(directory, "m.int8.pt"), x))(x).shape[-1])
"""


@pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("executorch", "onnxruntime", "onnxscript")),
                    reason="the INT8 formats need the deploy extra (ExecuTorch, onnxruntime), not installed")
def test_a_fresh_process_exports_and_runs_every_int8_format_without_a_warning(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path)], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "2", "2"]
