"""The int8 engines of the torch that runs the suite, for the tests that name one.

x86 builds of torch have the x86, fbgemm, onednn and qnnpack engines; ARM builds (Linux aarch64, macOS on Apple
silicon) have qnnpack, and onednn on Linux. A test of one engine's kernels is skipped, with the reason printed,
where this torch lacks that engine; the engine the library uses there by default (``quant.default_backend()``)
is always among those tested.
"""
import pytest
import torch


def has_engine(name: str) -> bool:
    return name in torch.backends.quantized.supported_engines


def needs_engines(*names: str) -> pytest.MarkDecorator:
    """Skip, saying which engines are missing, unless this torch has every one of ``names``."""
    missing = [name for name in names if not has_engine(name)]
    return pytest.mark.skipif(bool(missing), reason=(
        f"this torch has no {' or '.join(missing)} int8 engine (it has {torch.backends.quantized.supported_engines}; "
        "an ARM build has no x86 or fbgemm)"))


def engine_params(*names: str) -> list:
    """``names`` as parameters of ``pytest.mark.parametrize``, each skipped where this torch lacks it."""
    return [pytest.param(name, marks=needs_engines(name)) for name in names]


def available(*names: str) -> list[str]:
    """Those of ``names`` this torch has (for hypothesis strategies, which cannot skip one value)."""
    return [name for name in names if has_engine(name)]
