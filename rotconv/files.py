"""Files that are never half-written, and what identifies them: atomic writes, strict JSON, content
fingerprints, and a lock that gives a run directory one owner."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import socket
import tempfile
from typing import IO, Callable

__all__ = ["OutputError", "atomic_write", "clean_temporary_files", "check_path", "check_writable", "strict_json",
           "write_json", "file_fingerprint", "differences", "RunLock", "TEMPORARY_PREFIX"]

TEMPORARY_PREFIX = ".tmp-"


class OutputError(OSError):
    """An output path cannot be written (the message names it; ``errno`` says why)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror if self.strerror is not None else super().__str__()


def check_path(path, name: str = "path") -> None:
    """Refuse a ``path`` that is not a file path (str, bytes or os.PathLike) with a TypeError naming the
    argument ``name``: a tensor or a list passed in its place, or an int, which ``os.path`` would take for an
    open file descriptor."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{name}: expected a file path (str or os.PathLike), got {type(path).__name__}")


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``: readers see the
    old file or the whole new one, never a part. The file gets the permissions of a plainly created one
    (0666 less the umask), so another user, e.g. a model server, can read it. On any failure (disk full,
    permissions, interruption) the
    temporary file is removed and an :class:`OutputError` names ``path``; a ``path`` that is not one is a
    TypeError."""
    check_path(path, "path")
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX,
                                             suffix="-" + os.path.basename(path))
    except OSError as error:
        raise OutputError(error.errno, f"{path}: cannot write here ({error.strerror})") from None
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600: give the file the usual permissions
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise OutputError(
            error.errno, f"{path}: could not be written ({reason}); nothing was left half-written"
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_temporary_files(directory: str) -> list[str]:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``directory``; return them."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), TEMPORARY_PREFIX + "*")):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def check_writable(path: str, is_directory: bool = False, name: str = "path") -> None:
    """Fail early (:class:`OutputError` naming ``path``) when ``path`` (a file, or a directory) cannot be
    written: the directory is created if needed and a probe file is written and removed. A ``path`` that is
    not one (a tensor passed in its place, say) is a TypeError naming the argument ``name``."""
    check_path(path, name)
    directory = path if is_directory else (os.path.dirname(path) or ".")
    if not is_directory and os.path.isdir(path):
        raise OutputError(errno.EISDIR, f"{path}: is a directory, expected a file path")
    try:
        os.makedirs(directory, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX + "probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ENOENT and os.path.isdir(directory):  # /proc, /sys: the directory is there
            reason = f"{directory} does not accept new files"
        raise OutputError(error.errno, f"{path}: cannot write here ({reason})") from None


def strict_json(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def file_fingerprint(path: str, samples: int = 16, block: int = 1 << 16) -> dict:
    """Size and a SHA-256 of ``samples`` evenly spaced ``block``-byte pieces of ``path`` (the whole file when
    it is smaller than that): cheap for multi-GB files, and it changes when content is rewritten in place."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= samples * block:
            digest.update(handle.read())
        else:
            for index in range(samples):
                handle.seek((size - block) * index // (samples - 1))
                digest.update(handle.read(block))
    return {"bytes": size, "sha256_sampled": digest.hexdigest()}


def differences(stored, current, prefix: str = "") -> list[str]:
    """Readable ``"key.path: stored -> current"`` lines for every leaf where two nested dicts differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                lines.append(f"{name}: (absent) -> {current[key]!r}")
            elif key not in current:
                lines.append(f"{name}: {stored[key]!r} -> (absent)")
            else:
                lines.extend(differences(stored[key], current[key], name))
        return lines
    return [] if stored == current else [f"{prefix or 'value'}: {stored!r} -> {current!r}"]


class RunLock:
    """Exclusive ownership of a run directory: ``DIR/.lock`` holds the owner's host and pid.

    A second run on the same directory is refused (:class:`OutputError` naming the holder); a lock left by a
    process that no longer exists on this host is taken over. Use as a context manager.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, ".lock")
        self.held = False

    def __enter__(self) -> "RunLock":
        check_writable(self.directory, is_directory=True)
        owner = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise OutputError(errno.EBUSY, f"{self.directory}: another run holds it (host {holder[0]}, "
                                                   f"pid {holder[1]}, lock file {self.path}); wait for it or use "
                                                   "another run directory") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its owner is gone
                continue
            with os.fdopen(handle, "w") as stream:
                stream.write(owner)
            self.held = True
            return self
        raise OutputError(errno.EBUSY, f"{self.path}: could not take the run lock")

    def _holder(self) -> tuple[str, int] | None:
        try:
            host, pid = open(self.path).read().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder: tuple[str, int]) -> bool:
        host, pid = holder
        if host != socket.gethostname():
            return True  # another machine's process: cannot tell, assume it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


def write_json(data: dict, path: str) -> None:
    """Write ``data`` as strict JSON (non-finite numbers become null) atomically (:func:`atomic_write`)."""
    text = json.dumps(strict_json(data), indent=2, allow_nan=False)
    atomic_write(path, lambda handle: handle.write(text.encode()))
