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

# (category, text, the module the warning is raised from: its frame's __name__, as Python's filters see it)
HIDDEN = [
    (DeprecationWarning, "torch.jit.script_method is deprecated", "torch.jit._script"),
    (FutureWarning, "isinstance(treespec, LeafSpec) is deprecated", "copyreg"),  # torch's, at pickling's line
    (PendingDeprecationWarning, "will go", "importlib.resources._legacy"),
    (torch.jit.TracerWarning, "Converting a tensor to a Python boolean might cause the trace to be incorrect",
     "rotconv.pooling"),
    (UserWarning, "Deprecation: TorchAODType is deprecated, please use the torch.intN dtype", "torchao.core"),
    (UserWarning, "torch.quantize_per_tensor ... are deprecated and will be removed",
     "torch.ao.nn.quantized.modules.conv"),
    (UserWarning, "This API is experimental and subject to change without notice.",
     "executorch.extension.pybindings.portable_lib"),
    (UserWarning, "foo is deprecated", "quant.int8"),  # an upstream call warning at this package's line
]
SHOWN = [
    (UserWarning, "the model's own note: weights look untrained", "my_model"),
    (UserWarning, "MyBlock is deprecated; use MyBlock2", "my_model"),  # the model's own deprecation note
    (UserWarning, "This API is experimental (my_model's)", "my_model"),
    (RuntimeWarning, "overflow encountered in exp", "numpy"),
    # hidden only where asked (the ONNX export)
    (UserWarning, "Exporting a model while it is in training mode", "torch.onnx._internal"),
]


def caught_within_block(category, message, module, *extra):
    """What reaches the caller of ``upstream_notices_hidden(*extra)`` when ``module`` warns inside it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream_notices_hidden(*extra):
            warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1,
                                   module=module)
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("category, message, module", HIDDEN)
def test_upstream_notices_are_hidden(category, message, module):
    assert caught_within_block(category, message, module) == []


@pytest.mark.parametrize("category, message, module", SHOWN)
def test_other_warnings_reach_the_caller(category, message, module):
    assert caught_within_block(category, message, module) == [(category, message)]


def test_a_warning_is_matched_by_the_module_it_is_raised_from():
    """warnings.warn in a module's code: its __name__ decides (the test's own module is not upstream)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream_notices_hidden():
            warnings.warn("OldLayer is deprecated", UserWarning)
            exec(compile('import warnings; warnings.warn("x is deprecated", UserWarning)', "torch_like.py", "exec"),
                 {"__name__": "torch.nn.modules.module"})
    assert [str(w.message) for w in caught] == ["OldLayer is deprecated"]


def test_a_named_message_is_hidden_and_the_filters_end_with_the_block():
    assert caught_within_block(UserWarning, "Exporting a model while it is in training mode. Please ensure",
                               "quant.onnx", "Exporting a model while it is in training mode") == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream_notices_hidden():
            pass
        warnings.warn("after the block", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["after the block"]


class WarnsInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("WarnsInForward: the model's own note", UserWarning)
        warnings.warn("WarnsInForward: this block is deprecated", UserWarning)  # its own, not an upstream one
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
    assert "WarnsInForward: this block is deprecated" in messages
    upstream = [m for m in messages if ("deprecat" in m.lower() or "training mode" in m)
                and not m.startswith("WarnsInForward")]
    assert not upstream  # upstream's own: hidden


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
