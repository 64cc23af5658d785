"""mobilenet.training.reuse_freed_memory: freed large tensors are reused without page faults (glibc only).

Each case runs in a fresh interpreter, so the allocator settings of the test process stay untouched and the
measured process starts from glibc's defaults."""
import json
import subprocess
import sys

import pytest

from mobilenet.training import memory

GLIBC = memory._glibc() is not None

# Allocate, touch and free a 48 MiB float32 tensor ten times; count minor page faults over the last four. 48 MiB is
# above glibc's largest dynamic mmap threshold (32 MiB), so by default every round is a fresh mmap whose 12,288
# pages of 4 KiB fault in again when touched. With reuse on, the heap grows in the first rounds (torch's small
# allocations made meanwhile take the start of a freed block, so the next 48 MiB does not fit there: seen, growth
# in up to three rounds) and then stays put: the last four rounds reuse it.
SCRIPT = r"""
import json, resource, sys
import torch
from mobilenet.training import reuse_freed_memory
modes = sys.argv[1].split(",")
out = {}
for mode in modes:
    out[mode + "_applied"] = reuse_freed_memory(mode == "reuse")
    counts = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(12 * 2**20).fill_(1.0)
        del x
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out[mode] = sum(counts[-4:])
print(json.dumps(out))
"""
PAGES = 48 * 2**20 // 4096  # pages of one round (4 KiB pages; transparent huge pages only lower the counts)


def _faults(modes: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, modes], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="reuse_freed_memory acts on glibc's malloc only (Linux with glibc)")
def test_reused_memory_does_not_fault_again():
    result = _faults("system,reuse")
    assert result["reuse_applied"] and result["system_applied"]
    # glibc's initial settings first (a fresh process): 48 MiB is mmapped and faulted in again in each of the four
    # rounds (at least half of its pages each round; transparent huge pages would lower the count, hence the check)
    if _transparent_huge_pages() != "always":
        assert result["system"] > 0.5 * 4 * PAGES, result
    # reuse: four rounds reuse the heap; a few faults of torch's bookkeeping are allowed (< 2% of one round)
    assert result["reuse"] < 0.02 * PAGES, result


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            return file.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unknown"


def test_reuse_freed_memory_argument_and_other_platforms(monkeypatch):
    with pytest.raises(TypeError, match="enable"):
        memory.reuse_freed_memory("yes")
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.reuse_freed_memory() is False  # not glibc: nothing applied, nothing raised


@pytest.mark.parametrize("command", ["pcam", "efficiency", "scales", "speed", "predict"])
def test_command_line_tools_reuse_memory_unless_told_not_to(command, monkeypatch, capsys):
    import importlib

    from benchmarks import common
    module = importlib.import_module(f"benchmarks.{command}")
    parser = module._parser()
    required = {"predict": ["model.pt", "x.h5"]}.get(command, [])
    assert parser.parse_args(required).reuse_memory is None  # default: on where possible
    assert parser.parse_args(required + ["--reuse-memory"]).reuse_memory is True
    assert parser.parse_args(required + ["--no-reuse-memory"]).reuse_memory is False
    calls = []
    monkeypatch.setattr(common, "reuse_freed_memory", lambda: calls.append(1) or False)  # as off glibc
    common.apply_memory_argument(parser.parse_args(required + ["--no-reuse-memory"]))
    assert calls == []
    common.apply_memory_argument(parser.parse_args(required))  # default: tried, silently
    assert calls == [1] and capsys.readouterr().err == ""
    common.apply_memory_argument(parser.parse_args(required + ["--reuse-memory"]))  # asked for: a notice, no error
    assert calls == [1, 1] and "needs glibc" in capsys.readouterr().err
