"""The oldest torch the packages run on, checked when ``rotconv`` is imported (``mobilenet`` and ``quant``
import it), so that an older torch fails with one line naming both versions instead of an AttributeError deep
inside a forward pass."""
from __future__ import annotations

import re

import torch

__all__ = ["MIN_TORCH", "check_torch_version"]

#: ``(major, minor)``: the suite passes on torch 2.7.0; 2.6 lacks ``torch.compiler.is_exporting``, 2.1 also
#: ``torch.compiler.is_compiling`` and ``nn.Module.set_submodule``
MIN_TORCH = (2, 7)


def check_torch_version(version: str) -> None:
    """Raise ImportError where ``version`` (a torch version string such as ``'2.13.0+cpu'``) is older than
    :data:`MIN_TORCH`; pre-releases of a supported minor version (``'2.7.0a0+git...'``) pass."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ImportError(f"rotconv cannot read torch's version {version!r}")
    if (int(match.group(1)), int(match.group(2))) < MIN_TORCH:
        needed = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"rotconv needs torch >= {needed}, found torch {version}: pip install 'torch>={needed}'")


check_torch_version(torch.__version__)
