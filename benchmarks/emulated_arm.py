"""Run a Python script on an emulated ARM (aarch64) CPU with onnxruntime, from an x86-64 Linux machine.

    python -m benchmarks.emulated_arm prepare            # once: an aarch64 Python with numpy and onnxruntime
    python -m benchmarks.emulated_arm run neoverse-n1 script.py [ARGS ...]

``prepare`` builds a small aarch64 root in ``~/.cache/rotconv/aarch64`` (or ``--root``): Debian's arm64
Python and the C libraries it needs (``apt-get download``, unpacked with ``dpkg -x``; the arm64 architecture is
added to dpkg where it is missing), and PyPI's aarch64 wheels of numpy and onnxruntime for that Python (``pip
download``, unpacked). No torch: the aarch64 torch of the pinned version is a CUDA build whose libraries are not
on the index, so the emulated CPU runs what a deployment there runs, an ONNX file in onnxruntime.

``run`` starts that Python under ``qemu-aarch64 -cpu CPU`` (qemu-user 7.2 or later) with ``/proc/cpuinfo``
replaced, in a private mount namespace (``unshare -m``, root only), by an ARM one for that CPU: onnxruntime's
cpuinfo reads the host's x86 ``/proc/cpuinfo`` otherwise and crashes on import. :data:`ARM_CPUS` are three
generations whose int8 kernels differ in onnxruntime (MLAS): plain NEON (ARMv8.0), the dot-product
instructions (ARMv8.2), and the int8 matrix multiply with SVE2 (ARMv9). Behaviour only: an emulated CPU's
times mean nothing.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

__all__ = ["ARM_CPUS", "DEFAULT_ROOT", "ArmError", "prepare", "ready", "run", "main"]

#: qemu's CPU model -> (what it stands for, the kernel's Features line, MIDR part number) for /proc/cpuinfo
ARM_CPUS = {
    "cortex-a57": ("ARMv8.0, NEON only (Raspberry Pi 3/4 class)",
                   "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "0xd07"),
    "neoverse-n1": ("ARMv8.2 with dot products (AWS Graviton2, Ampere Altra, Raspberry Pi 5 class)",
                    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                    "asimddp ssbs", "0xd0c"),
    "max": ("ARMv9 with SVE2 and the int8 matrix multiply (Graviton3/4 class)",
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
            "sha3 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb dcpodp sve2 svei8mm svebf16 i8mm bf16",
            "0xd4f"),
}
#: where ``prepare`` builds the root by default
DEFAULT_ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "rotconv", "aarch64")
# Debian packages of the arm64 Python and what it and onnxruntime load
_PACKAGES = ("libc6 libgcc-s1 libstdc++6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib zlib1g "
             "libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libtinfo6 libncursesw6 libreadline8 "
             "libsqlite3-0 libdb5.3 libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 "
             "libkrb5support0 libkeyutils1").split()
_WHEELS = ("numpy", "onnxruntime", "flatbuffers", "packaging", "protobuf")
_READY = "READY"


class ArmError(RuntimeError):
    """The emulated ARM CPU cannot be prepared or started here; the message says why."""


def _python(root: str) -> str | None:
    found = sorted(glob.glob(os.path.join(root, "sysroot", "usr", "bin", "python3.*")))
    return found[-1] if found else None


def ready(root: str = DEFAULT_ROOT) -> str | None:
    """None where ``run`` can start here, else why not (in words)."""
    if os.uname().machine != "x86_64" or not sys.platform.startswith("linux"):
        return "an emulated ARM CPU is started from x86-64 Linux"
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (apt-get install qemu-user)"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "replacing /proc/cpuinfo for the emulated CPU needs root and unshare (util-linux)"
    if not os.path.exists(os.path.join(root, _READY)) or _python(root) is None:
        return f"no aarch64 root in {root} (python -m benchmarks.emulated_arm prepare)"
    return None


def _check(command: list[str], what: str, cwd: str | None = None) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or completed.stdout.strip().splitlines() or ["no message"])[-1]
        raise ArmError(f"{what}: {last}")


def prepare(root: str = DEFAULT_ROOT) -> str:
    """Build the aarch64 root (see the module docstring) in ``root``, whole or not at all; returns ``root``.
    Raises :class:`ArmError` naming the step that failed."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ArmError("the arm64 Python comes from Debian packages: apt-get and dpkg are needed")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in foreign:
        _check(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
        _check(["apt-get", "update", "-q"], "apt-get update")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix="aarch64-", dir=parent)
    try:
        debs = os.path.join(partial, "debs")
        os.makedirs(debs)
        command = ["apt-get", "download", "-q", *(f"{name}:arm64" for name in _PACKAGES)]
        if subprocess.run(command, cwd=debs, capture_output=True).returncode != 0:  # stale package lists
            _check(["apt-get", "update", "-q"], "apt-get update")
            _check(command, "apt-get download", cwd=debs)
        for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
            _check(["dpkg", "-x", deb, os.path.join(partial, "sysroot")], f"dpkg -x {os.path.basename(deb)}")
        shutil.rmtree(debs)
        python = _python(partial)
        if python is None:
            raise ArmError("the arm64 packages held no python3.X")
        version = os.path.basename(python)[len("python"):]
        wheels = os.path.join(partial, "wheels")
        _check([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", wheels,
                "--python-version", version, "--implementation", "cp", "--platform", "manylinux2014_aarch64",
                "--platform", "manylinux_2_28_aarch64", *_WHEELS], "pip download (aarch64 wheels)")
        for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(os.path.join(partial, "site"))
        shutil.rmtree(wheels)
        with open(os.path.join(partial, _READY), "w") as handle:
            handle.write("\n".join(sorted(os.listdir(os.path.join(partial, "site")))) + "\n")
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(partial, root)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return root


def run(cpu: str, argv: list[str], root: str = DEFAULT_ROOT, timeout: float | None = None,
        ) -> subprocess.CompletedProcess:
    """Run ``python3 argv...`` of the aarch64 root on qemu's ``cpu`` (a key of :data:`ARM_CPUS`) with that CPU's
    ``/proc/cpuinfo``; the completed process, output captured as text. :class:`ArmError` where it cannot start."""
    if cpu not in ARM_CPUS:
        raise ArmError(f"unknown ARM CPU {cpu!r} (choices: {', '.join(ARM_CPUS)})")
    why = ready(root)
    if why:
        raise ArmError(why)
    _, features, part = ARM_CPUS[cpu]
    processor = (f"BogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                 f"CPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 0\n")
    with tempfile.NamedTemporaryFile("w", suffix=".cpuinfo") as cpuinfo:
        cpuinfo.write("".join(f"processor\t: {index}\n{processor}\n" for index in range(os.cpu_count() or 1)))
        cpuinfo.flush()
        sysroot = os.path.join(root, "sysroot")
        emulated = ["qemu-aarch64", "-cpu", cpu, "-L", sysroot, "-E", f"PYTHONPATH={os.path.join(root, 'site')}",
                    _python(root), *argv]
        script = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, cpuinfo.name, *emulated], capture_output=True,
                              text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.emulated_arm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the aarch64 root (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="build the aarch64 root")
    start = commands.add_parser("run", help="run a Python script on an emulated ARM CPU")
    start.add_argument("cpu", choices=list(ARM_CPUS))
    start.add_argument("arguments", nargs=argparse.REMAINDER, help="the script and its arguments")
    options = parser.parse_args(argv)
    try:
        if options.command == "prepare":
            print(f"aarch64 root ready in {prepare(options.root)}")
            return 0
        completed = run(options.cpu, options.arguments, options.root)
    except ArmError as error:
        print(f"benchmarks.emulated_arm: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(completed.stdout)
    sys.stderr.write(completed.stderr)
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
