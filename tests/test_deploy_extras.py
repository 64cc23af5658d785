"""quant.extras: the input check and the missing-extra error shared by the ExecuTorch and ONNX wrappers."""
import importlib
import os
import sys
import logging

import pytest
import torch

from quant.extras import require_extra, runtime_input


def test_runtime_input_passes_finite_batches_through_as_contiguous_float32():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64).transpose(2, 3)  # non-contiguous, float64
    out = runtime_input(x, (1, 3, 5, 7))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, x.float())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_runtime_input_rejects_non_finite_values(value):
    x = torch.zeros(3, 3, 5, 5)
    x[2, 1, 4, 0] = value  # one bad value in the last image
    with pytest.raises(ValueError, match="NaN or infinite"):
        runtime_input(x, (1, 3, 5, 5))


@pytest.mark.parametrize("bad", [torch.zeros(3, 5, 5), torch.zeros(1, 1, 5, 5), torch.zeros(1, 3, 5, 6), "image"])
def test_runtime_input_names_the_expected_shape(bad):
    with pytest.raises(ValueError, match=r"input: the model expects \(B, 3, 5, 5\)"):
        runtime_input(bad, (1, 3, 5, 5))


def test_missing_extra_names_what_needed_it_and_the_extra(monkeypatch):
    real = importlib.import_module

    def without_runtime(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_runtime)
    with pytest.raises(ImportError, match=r"quant.load_executorch needs executorch.runtime.*rotconv\[deploy\]"):
        require_extra(("numpy", "executorch.runtime"), "quant.load_executorch")
    require_extra(("numpy",), "anything")  # present modules pass silently


def test_import_time_warnings_of_the_extra_are_quieted_only_during_the_import(monkeypatch, caplog):
    # torchao warns while it is imported about CUDA-only kernel libraries a CPU install lacks; require_extra
    # quiets those loggers for the import and restores them: a module that warns through them at import time
    # leaves no record, and the same logger warns as usual afterwards.
    logger = logging.getLogger("torchao")
    before = logger.level
    real = importlib.import_module

    def warning_import(name, *args, **kwargs):
        if name == "fake_torchao_like":
            logger.warning("Failed to load _C_cutlass_90a.abi3.so")
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", warning_import)
    with caplog.at_level(logging.WARNING):
        require_extra(("fake_torchao_like",), "anything")
        assert "cutlass" not in caplog.text
        assert logger.level == before
        logger.warning("after the import")
    assert "after the import" in caplog.text


def test_native_stderr_is_captured_inside_the_block_and_restored_after(capfd):
    # What C code writes to file descriptor 2 (os.write bypasses Python's sys.stderr) and what goes through
    # sys.stderr (where pybind11 modules route C++ streams) both land in the capture, not in the process's
    # stderr; after the block both reach the process's stderr again.
    from quant.extras import capture_native_stderr

    with capture_native_stderr() as native:
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\n")
        print("[method.cpp:1243] through sys.stderr", file=sys.stderr)
    assert "cpuinfo_utils.cpp:87" in native.text and "method.cpp:1243" in native.text
    print("python side after the block", file=sys.stderr)
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert "cpp:" not in err and "after the block" in err and "python side after the block" in err


def test_native_stderr_is_restored_when_the_block_raises(capfd):
    from quant.extras import capture_native_stderr

    with pytest.raises(RuntimeError, match="load failed"):
        with capture_native_stderr() as native:
            os.write(2, b"reason from C++\n")
            raise RuntimeError("load failed")
    assert native.text == "reason from C++\n"
    os.write(2, b"visible again\n")
    assert "visible again" in capfd.readouterr().err
