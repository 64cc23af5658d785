"""rotconv.hardware: what the machine line says is read from the kernel's own descriptions (cpuinfo, the sysfs
cache directory), here written as files of the tests' own so that every layout is checked on any machine."""
from __future__ import annotations

import os
import platform
import re
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotconv
import rotconv.hardware as hardware

XEON_AND_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni

processor\t: 1
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sha1 asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def write_cpuinfo(monkeypatch, tmp_path, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(hardware, "CPUINFO", str(path))


def test_cpuinfo_is_read_from_the_first_processor(monkeypatch, tmp_path):
    write_cpuinfo(monkeypatch, tmp_path, XEON_AND_EPYC)
    report = rotconv.cpu_report()
    assert report["cpu"] == "AMD EPYC"
    assert report["family_model"] == [26, 2]
    assert rotconv.hardware.cpu_flags() == {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni"}


def test_a_cpu_without_x86_family_has_none_and_arm_features_are_its_flags(monkeypatch, tmp_path):
    write_cpuinfo(monkeypatch, tmp_path, ARM)
    report = rotconv.cpu_report()
    assert report["family_model"] is None
    assert rotconv.hardware.cpu_flags() == {"fp", "asimd", "evtstrm", "aes", "sha1", "asimddp"}
    assert report["cpu"] == (platform.processor() or platform.machine())  # Arm cpuinfo has no model name
    assert "family" not in rotconv.hardware_line(report)


def test_no_cpuinfo_means_no_flags_and_the_platform_name(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "CPUINFO", str(tmp_path / "absent"))
    monkeypatch.setattr(hardware, "CACHE_DIR", str(tmp_path / "absent-too"))
    report = rotconv.cpu_report()
    assert rotconv.hardware.cpu_flags() == set()
    assert report["family_model"] is None and report["caches_kib"] == {}
    assert rotconv.hardware_line(report).startswith(f"{report['cpu']} ({report['cores']} cores) | ATen ")


CACHE_KINDS = st.sampled_from([(1, "Data", "L1d"), (1, "Instruction", "L1i"), (2, "Unified", "L2"),
                               (3, "Unified", "L3")])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(CACHE_KINDS, st.integers(1, 4096), st.sampled_from(["K", "M", ""])),
                min_size=0, max_size=4, unique_by=lambda entry: entry[0]),
       st.booleans())
def test_cache_sizes_are_read_in_kib_whatever_the_unit(entries, add_broken):
    with tempfile.TemporaryDirectory() as root:
        expected = {}
        for index, ((level, kind, name), amount, unit) in enumerate(entries):
            entry = os.path.join(root, f"index{index}")
            os.mkdir(entry)
            for field, value in (("level", level), ("type", kind), ("size", f"{amount}{unit}")):
                with open(os.path.join(entry, field), "w") as handle:
                    handle.write(f"{value}\n")
            expected[name] = {"K": amount, "M": amount * 1024, "": amount // 1024}[unit]
        if add_broken:  # an entry the kernel left without a size is skipped, not a failure
            os.mkdir(os.path.join(root, "index9"))
            with open(os.path.join(root, "index9", "level"), "w") as handle:
                handle.write("4\n")
        old = hardware.CACHE_DIR
        hardware.CACHE_DIR = root
        try:
            assert rotconv.hardware.cache_sizes() == expected
        finally:
            hardware.CACHE_DIR = old


REPORT = {"cpu": "AMD EPYC", "cores": 2, "capability": "AVX2", "vnni": False, "bf16": False, "amx": False,
          "int8_engines": ["qnnpack", "x86"], "threads": 2, "torch": "2.13.0+cpu"}


@pytest.mark.parametrize("extra, head", [
    ({"family_model": [25, 1], "caches_kib": {"L1d": 32, "L2": 512, "L3": 32768}},
     "AMD EPYC, family 25 model 1, L2 512 KiB (2 cores) | ATen AVX2 | VNNI no | "),
    ({"family_model": [26, 2], "caches_kib": {"L2": 1024}}, "AMD EPYC, family 26 model 2, L2 1 MiB (2 cores) | "),
    ({"family_model": None, "caches_kib": {}}, "AMD EPYC (2 cores) | ATen AVX2 | "),
    ({}, "AMD EPYC (2 cores) | ATen AVX2 | "),  # a report stored before the family and caches were kept
])
def test_the_machine_line_names_family_and_second_level_cache_where_known(extra, head):
    line = rotconv.hardware_line({**REPORT, **extra})
    assert line.startswith(head)
    assert line.endswith("| int8 engines qnnpack, x86 | 2 threads | torch 2.13.0+cpu")


@pytest.mark.parametrize("avx2, says", [(False, "| ATen DEFAULT (no AVX2) | "), (True, "| ATen DEFAULT | "),
                                        (None, "| ATen DEFAULT | ")])  # None: Arm, or a report stored before
def test_the_machine_line_says_when_an_x86_cpu_lacks_avx2(avx2, says):
    extra = {} if avx2 is None else {"avx2": avx2}
    assert says in rotconv.hardware_line({**REPORT, "capability": "DEFAULT", **extra})


@pytest.mark.parametrize("vnni, avx_vnni, says", [
    (False, True, "| VNNI no, AVX-VNNI yes | "),  # an Alder Lake kind: onnxruntime and XNNPACK use it, fbgemm not
    (True, True, "| VNNI yes | "), (False, False, "| VNNI no | "),
    (False, None, "| VNNI no | "),  # Arm, or a report stored before AVX-VNNI was asked
])
def test_the_machine_line_names_avx_vnni_where_it_is_the_only_vnni(vnni, avx_vnni, says):
    assert says in rotconv.hardware_line({**REPORT, "vnni": vnni, "avx_vnni": avx_vnni})


@pytest.mark.skipif(not (rotconv.hardware.is_x86() and os.path.exists("/proc/cpuinfo")),
                    reason="the family and model are x86 cpuid fields, read from Linux's /proc/cpuinfo")
def test_this_x86_machine_reports_its_family_and_model():
    with open("/proc/cpuinfo") as handle:  # an independent reading: the first "cpu family" and "model" lines
        text = handle.read()
    family = int(re.search(r"^cpu family\s*:\s*(\d+)", text, re.M).group(1))
    model = int(re.search(r"^model\s*:\s*(\d+)", text, re.M).group(1))
    report = rotconv.cpu_report()
    assert report["family_model"] == [family, model]
    assert f"family {family} model {model}" in rotconv.hardware_line(report)


@pytest.mark.parametrize("native, emulated, says", [
    (True, False, "| bf16 yes | "), (False, True, "| bf16 no (emulated) | "), (False, False, "| bf16 no | "),
    (False, None, "| bf16 no | "),  # a report stored before bf16_emulated was kept
])
def test_the_machine_line_tells_native_from_emulated_bf16(native, emulated, says):
    extra = {} if emulated is None else {"bf16_emulated": emulated}
    assert says in rotconv.hardware_line({**REPORT, "bf16": native, **extra})


_BF16_PROBE = """
import json, rotconv, rotconv.hardware as h
from mobilenet.training import resolve_precision
notices = []
report = rotconv.cpu_report()
print(json.dumps({"native": h.has_native_bf16(), "onednn": h.onednn_has_bf16(), "report": report["bf16"],
                  "emulated": report["bf16_emulated"], "line": rotconv.hardware_line(report),
                  "auto": resolve_precision("auto", "cpu", notices.append),
                  "asked": resolve_precision("bf16", "cpu", notices.append), "notices": notices}))
"""


def _bf16_answers(**switches: str) -> dict:
    import json
    import subprocess
    import sys

    from benchmarks.common import child_environment
    from benchmarks.isa import without_cpuid_hold
    # the probe reads this CPU's flags, so it runs on this CPU as it is: the suite may run with oneDNN held, and
    # with CPUID answering for a lesser CPU (benchmarks.isa)
    environment = without_cpuid_hold(child_environment(**switches))
    if hardware.ISA_SWITCHES["oneDNN"] not in switches:
        environment.pop(hardware.ISA_SWITCHES["oneDNN"], None)
    completed = subprocess.run([sys.executable, "-c", _BF16_PROBE], env=environment, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (rotconv.hardware.is_x86() and os.path.exists("/proc/cpuinfo")),
                    reason="native bf16 on x86 is read from the CPU's flags; /proc/cpuinfo is Linux's")
@pytest.mark.parametrize("held", [None, "AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "avx512_core_bf16"])
def test_bf16_is_native_only_with_avx512_bf16_or_amx_and_oneDNN_not_held_below_them(held):
    """On AVX-512 CPUs without AVX512-BF16 (Skylake-SP to Ice Lake) oneDNN still answers bf16 (emulated, slower
    than fp32): training's "auto" must choose fp32 there; an explicit "bf16" is kept, with a notice."""
    answers = _bf16_answers(**({"ONEDNN_MAX_CPU_ISA": held} if held else {}))
    flags = rotconv.hardware.cpu_flags()
    # an independent reading: the kernel's flags, and oneDNN's level as held (names are case-insensitive)
    has_instructions = "avx512_bf16" in flags or "amx_bf16" in flags
    expected = answers["onednn"] and has_instructions and (held is None or held.upper() == "AVX512_CORE_BF16")
    assert answers["native"] == answers["report"] == expected, answers
    assert answers["emulated"] == (answers["onednn"] and not expected), answers
    assert ("bf16 no (emulated)" in answers["line"]) == answers["emulated"], answers
    assert answers["auto"] == ("bf16" if expected else "fp32"), answers
    # asked for explicitly, bf16 is kept wherever oneDNN runs it, emulated or not (a bf16 run resumes as one)
    assert answers["asked"] == ("bf16" if answers["onednn"] else "fp32"), answers
    if not expected:
        assert len(answers["notices"]) == 1, answers
        if answers["onednn"]:
            assert "emulates them, so bf16 trains slower than fp32" in answers["notices"][0], answers
        else:
            assert "training in fp32" in answers["notices"][0], answers
    if held in ("AVX512_CORE", "AVX512_CORE_VNNI") and "avx512f" in flags:  # the case this guards against
        assert answers["onednn"] and not answers["native"], answers


@pytest.mark.parametrize("x86, avx2, turned_off", [(True, False, True), (True, True, False), (False, False, False)])
def test_nnpack_is_turned_off_only_on_x86_cpus_without_avx2(monkeypatch, x86, avx2, turned_off):
    # NNPACK's x86 kernels need AVX2; elsewhere (AVX2 CPUs, Arm) torch's setting is left as it is. The whole
    # process on an emulated CPU without AVX2: tests/test_isa.py.
    monkeypatch.setattr(hardware, "is_x86", lambda: x86)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: avx2)
    assert hardware.has_avx2() is avx2 and hardware.nnpack_unusable() is turned_off
    before = torch.backends.nnpack.set_flags(True)[0]
    try:
        assert hardware.turn_off_unusable_nnpack() is turned_off
        assert torch._C._get_nnpack_enabled() is not turned_off
    finally:
        torch.backends.nnpack.set_flags(before)


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="CPUID on Linux x86-64")
def test_cpuid_asks_the_cpu_itself_as_the_libraries_do():
    # leaf 0: the vendor string the kernel reports, in EBX, EDX, ECX
    vendor = hardware._cpuinfo_fields().get("vendor_id")
    answer = hardware.cpuid(0)
    assert answer is not None and answer[0] >= 1
    assert b"".join(value.to_bytes(4, "little") for value in (answer[1], answer[3], answer[2])).decode() == vendor
    # leaf 1, ECX bit 28: AVX, as the kernel says
    assert bool(hardware.cpuid(1)[2] & (1 << 28)) == ("avx" in hardware.cpu_flags())
    # AVX-VNNI (leaf 7 subleaf 1): the kernel's flag, unless this process answers CPUID for a lesser CPU
    # (python -m benchmarks.isa): then only the avxvnni level has it
    from benchmarks.isa import cpuid_held

    held = cpuid_held()
    expected = held == "avxvnni" if held else "avx_vnni" in hardware.cpu_flags()
    assert hardware.has_avx_vnni() == expected


def test_without_cpuid_there_is_no_avx_vnni(monkeypatch):
    monkeypatch.setattr(hardware, "cpuid", lambda leaf, subleaf=0: None)
    assert not hardware.has_avx_vnni()
    monkeypatch.setattr(hardware, "cpuid", lambda leaf, subleaf=0: (6, 0, 0, 0xFFFFFFFF))  # highest leaf 6
    assert not hardware.has_avx_vnni()
