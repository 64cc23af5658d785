"""Instructions the INT8 programs execute per forward on an AVX2-only CPU, counted by valgrind: the .pte against
stock ExecuTorch, without timing noise and on any x86-64 machine.

    python -m benchmarks.instructions [--group C12] [--batches 1 32] [--calls 5] [--cache-kib KIB] [--out FILE]

Valgrind runs each program on its own virtual x86-64 CPU, which has AVX2 and FMA but no AVX-512, VNNI or AMX
(whatever the host has beyond that is hidden from the program), so ExecuTorch's XNNPACK picks the kernels it
runs on an AVX2-only CPU; its callgrind tool counts the instructions executed inside ExecuTorch's
``Method::execute`` (one thread, so that all of a forward runs where it is counted). The count is the same on
every run of the same files and does not depend on what else the machine is doing, where timings on a shared
machine vary by 10 % and more. Compared, as in :mod:`benchmarks.speed`: the .pte :func:`quant.to_executorch`
writes and the stock ExecuTorch program of the same network (torchao PT2E, ``XNNPACKQuantizer``, per-tensor
symmetric, calibrated; :func:`benchmarks.speed.stock_executorch`), for each batch size.

An instruction count is not a time: memory stalls, caches and how well the instructions overlap differ
between programs and CPUs. It tells whether one program does more work than the other on these kernels.
``--cache-kib KIB`` adds callgrind's cache model, also deterministic: 32 KiB 8-way first-level instruction and
data caches and a KIB KiB 8-way second level (64-byte lines, no prefetcher; 512 for a Zen 2/3 core), and
reports each program's first- and second-level data misses (reads and writes) per forward: where the programs'
data does not fit that second level, which one goes beyond it more often.
Needs valgrind (``apt-get install valgrind``) and the deploy extra; each counted forward runs ~50x slower than
natively (12 minutes for ``--calls 3`` on 2 cores of an Intel Xeon, 2026-12-04).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch

import mobilenet
import quant
import rotconv

from .common import check_outputs, emulated_cpu_environment, report, untrained_but_generic
from .exits import command
from mobilenet.training import UsageError
from quant.executorch import require_executorch

__all__ = ["COUNTED_FUNCTION", "count_instructions", "collected_events", "cache_options", "seen_on_valgrind", "main"]

#: the function whose instructions are counted (inclusive): one call per forward of a program
COUNTED_FUNCTION = "executorch::runtime::Method::execute()"


def collected_events(valgrind_log: str) -> dict[str, int]:
    """The event counts callgrind reports at exit (``==PID== Events : Ir ...`` and ``==PID== Collected : N ...``),
    by event name (``Ir``: instructions; with the cache model also ``D1mr``, ``DLmw``, ...)."""
    names = re.findall(r"^==\d+== Events\s*:\s*(.+?)\s*$", valgrind_log, flags=re.MULTILINE)
    counts = re.findall(r"^==\d+== Collected\s*:\s*([\d ]+?)\s*$", valgrind_log, flags=re.MULTILINE)
    if not names or not counts or len(names[-1].split()) != len(counts[-1].split()):
        raise RuntimeError("callgrind reported no instruction count; its output ends:\n" + valgrind_log[-2000:])
    return dict(zip(names[-1].split(), map(int, counts[-1].split())))


def cache_options(second_level_kib: int) -> list[str]:
    """Callgrind's cache model: 32 KiB 8-way first-level caches and a ``second_level_kib`` KiB 8-way second
    level, 64-byte lines (valgrind needs a power-of-two number of sets: the size a power of two, >= 64 KiB)."""
    if second_level_kib < 64 or second_level_kib & (second_level_kib - 1):
        raise ValueError(f"--cache-kib: expected a power of two >= 64 (KiB), got {second_level_kib}")
    return ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64", f"--LL={second_level_kib * 1024},8,64"]


def _on_valgrind(tool_options: list[str], program: str, inputs: str, calls: int) -> tuple[dict, str]:
    """Run the child on valgrind: what it saw (its last line of output, JSON) and valgrind's log."""
    completed = subprocess.run(["valgrind", *tool_options, sys.executable, "-m", "benchmarks.instructions",
                                "--child", program, inputs, str(calls)], capture_output=True, text=True,
                               env=emulated_cpu_environment(PYTHONHASHSEED="0"))
    if completed.returncode != 0:
        raise RuntimeError(f"the run of {program} on valgrind failed (exit {completed.returncode}):\n"
                           + completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def seen_on_valgrind(program: str, inputs: str) -> dict:
    """What a process running ``program`` once on valgrind's CPU sees, without counting (~30 s): torch's CPU
    capability, the instruction set XNNPACK picks its kernels for, the output's sum."""
    return _on_valgrind(["--tool=none"], program, inputs, 1)[0]


def count_instructions(program: str, inputs: str, calls: int, cache_kib: int | None = None) -> dict:
    """Run ``program`` (.pte) on the tensor saved in ``inputs`` ``calls`` times under callgrind: the instructions
    per call (the first call included) and what the process saw (:func:`seen_on_valgrind`); with ``cache_kib``
    (:func:`cache_options`) also the first- and second-level data misses per call, reads and writes."""
    cache = cache_options(cache_kib) if cache_kib else []
    seen, log = _on_valgrind(["--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={COUNTED_FUNCTION}",
                              *cache, "--callgrind-out-file=" + os.devnull], program, inputs, calls)
    events = collected_events(log)
    if events["Ir"] == 0:
        raise RuntimeError(f"no instruction was counted: {COUNTED_FUNCTION} was never entered (another ExecuTorch?)")
    result = {"instructions_per_call": events["Ir"] / calls, **seen}
    if cache_kib:
        result["first_level_data_misses_per_call"] = (events["D1mr"] + events["D1mw"]) / calls
        result["second_level_data_misses_per_call"] = (events["DLmr"] + events["DLmw"]) / calls
        result["second_level_kib"] = cache_kib
    return result


def _child(program: str, inputs: str, calls: int) -> None:
    """In the counted process: one ExecuTorch thread, ``calls`` forwards, then what this process saw."""
    from executorch.extension.pybindings import portable_lib

    from .isa import xnnpack_isa
    # ExecuTorch's only handle on its thread pool: with one thread every operator runs in the counted call
    portable_lib._unsafe_reset_threadpool(1)
    module = quant.load_executorch(program)
    x = torch.load(inputs)
    for _ in range(calls):
        out = module(x)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "xnnpack": xnnpack_isa(),
                      "output_sum": float(out.sum())}))


def _programs(directory: str, group: str, batches: list[int]) -> dict:
    """The .pte and the stock program of the untrained but generic exported model, and an input, per batch."""
    from .speed import stock_executorch
    torch.manual_seed(0)
    model = untrained_but_generic(mobilenet.mobilenet_v2(group=group), torch.randn(8, 3, 95, 95)).export().eval()
    files = {}
    for batch in batches:
        x = torch.randn(batch, 3, 95, 95)
        inputs = os.path.join(directory, f"x-b{batch}.pt")
        torch.save(x, inputs)
        stock = os.path.join(directory, f"stock-b{batch}.pte")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pte = quant.to_executorch(model, os.path.join(directory, f"b{batch}.pte"), group=group,
                                      example_batch=batch)
            stock_executorch(model, group, x, stock)
        files[batch] = {"pte": pte, "stock": stock, "inputs": inputs}
    return files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", default="C12", help="group of the equivariant model (default C12)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--calls", type=int, default=5,
                        help="forwards counted per program, the first included (default 5)")
    parser.add_argument("--cache-kib", type=int, metavar="KIB",
                        help="also simulate caches with a second level of KIB KiB (e.g. 512) and count data misses")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--child", nargs=3, metavar=("PROGRAM", "INPUTS", "CALLS"), help=argparse.SUPPRESS)
    return parser


def _table(batches: dict, cache_kib: int | None) -> str:
    lines = ["| batch | .pte, instructions per forward | stock ExecuTorch | .pte / stock |", "|---|---|---|---|"]
    lines += [f"| {batch} | {row['pte']['instructions_per_call'] / 1e6:,.1f} M | "
              f"{row['stock']['instructions_per_call'] / 1e6:,.1f} M | {row['ratio']:.3f}x |"
              for batch, row in batches.items()]
    if cache_kib:
        lines += ["", f"| batch | data misses per forward (32 KiB first level / {cache_kib} KiB second level): .pte | "
                      "stock ExecuTorch | .pte / stock, second level |", "|---|---|---|---|"]
        lines += [f"| {batch} | " + " | ".join(
                      f"{row[name]['first_level_data_misses_per_call'] / 1e3:,.1f} K / "
                      f"{row[name]['second_level_data_misses_per_call'] / 1e3:,.1f} K" for name in ("pte", "stock"))
                  + f" | {row['second_level_ratio']:.3f}x |" for batch, row in batches.items()]
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    try:
        args.group = str(rotconv.as_group(args.group))
    except ValueError as error:
        parser.error(f"--group: {error}")
    if args.calls < 1:
        parser.error("--calls: expected >= 1")
    if any(batch < 1 for batch in args.batches):
        parser.error("--batches: expected sizes >= 1")
    if args.cache_kib is not None:
        try:
            cache_options(args.cache_kib)
        except ValueError as error:
            parser.error(str(error))
    if not rotconv.hardware.is_x86():
        parser.error(f"counts the AVX2 kernels of x86-64 CPUs; this machine is {platform.machine()}")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind): it is what counts the instructions")
    try:
        check_outputs(args.out)
        require_executorch()
    except (UsageError, ImportError) as error:
        parser.error(str(error))
    print(rotconv.hardware_line(), "(the host; the programs run on valgrind's AVX2 CPU)")
    results = {"group": args.group, "calls": args.calls, "counted": COUNTED_FUNCTION, "torch": torch.__version__,
               "host": rotconv.cpu_report(), "cache_kib": args.cache_kib, "batches": {}}
    with tempfile.TemporaryDirectory() as directory:
        print(f"exporting the .pte and the stock program for batches {args.batches} ...", file=sys.stderr)
        files = _programs(directory, args.group, args.batches)
        for batch in args.batches:
            row = {}
            for name in ("pte", "stock"):
                print(f"counting {name} at batch {batch} ({args.calls} forwards under callgrind) ...", file=sys.stderr)
                row[name] = count_instructions(files[batch][name], files[batch]["inputs"], args.calls, args.cache_kib)
                if row[name]["xnnpack"] != "AVX2":  # valgrind's CPU is AVX2: anything else means another valgrind
                    raise RuntimeError(f"XNNPACK ran {row[name]['xnnpack']} kernels under valgrind, not AVX2")
            row["ratio"] = row["pte"]["instructions_per_call"] / row["stock"]["instructions_per_call"]
            if args.cache_kib:
                row["second_level_ratio"] = (row["pte"]["second_level_data_misses_per_call"]
                                             / max(row["stock"]["second_level_data_misses_per_call"], 1.0))
            results["batches"][str(batch)] = row
    results["table"] = _table(results["batches"], args.cache_kib)
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
