"""The upstream libraries' notices about their own code, hidden while this package calls them; every other
warning reaches the caller.

torch, torchao, ExecuTorch and onnx print, while a model is quantized, traced or exported, dozens of notices a
user cannot act on: deprecations of their own APIs (as DeprecationWarning, FutureWarning, or a UserWarning
that says so), ExecuTorch's "This API is experimental", and the TorchScript tracer's note that a shape check
is frozen into the trace (the traced programs have a fixed input shape). A warning about the model itself (a
``warnings.warn`` in its forward, a numerical notice, a UserWarning of its own that says "deprecated") is not
among them and still shows; DeprecationWarning, FutureWarning and tracer notes are hidden by category,
whoever raises them (Python itself hides DeprecationWarning outside ``__main__``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

__all__ = ["upstream_notices_hidden"]

#: UserWarning texts (regular expressions, matched at the start) that announce an upstream deprecation or
#: experimental API; hidden only when raised from code of :data:`_NOTICE_MODULES`, so that a model's own
#: warning saying "deprecated" still shows
_NOTICE_MESSAGES = (r"(?i).*\bdeprecat", r"This API is experimental")
#: the modules (regular expression on the warning's module name) those notices come from: the upstream
#: libraries, and this project's packages where a library warns at its caller's line
_NOTICE_MODULES = r"(torch|torchao|executorch|onnx|onnxscript|onnxruntime|quant|rotconv|mobilenet)(\.|$)"


@contextlib.contextmanager
def upstream_notices_hidden(*messages: str) -> Iterator[None]:
    """Within the block, hide deprecation, experimental-API and tracer notices (module docstring) and the
    warnings whose text matches one of ``messages`` (regular expressions matched at the start)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.filterwarnings("ignore", category=category)
        for message in _NOTICE_MESSAGES:
            warnings.filterwarnings("ignore", message=message, module=_NOTICE_MODULES)
        for message in messages:
            warnings.filterwarnings("ignore", message=message)
        yield
