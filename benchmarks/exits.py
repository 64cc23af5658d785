"""How a command ends when its reader goes away: ``python -m benchmarks.speed | head`` closes the pipe after a
few lines, and the command then stops quietly with exit status 141 (128 + SIGPIPE, what a shell reports for a
command that signal ends) instead of a BrokenPipeError traceback. Standard library only: ``benchmarks.isa``
must not load torch before it has set the kernel switches."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

__all__ = ["command", "EXIT_READER_GONE"]

#: exit status of a command whose stdout was closed before it finished writing
EXIT_READER_GONE = 141


def command(main: Callable[..., int]) -> Callable[..., int]:
    """``main(argv=None) -> exit code`` that returns :data:`EXIT_READER_GONE` instead of raising when stdout is
    a closed pipe (stdout is flushed before it returns, so a late failure is caught here, not at exit)."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            try:
                return main(argv)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            return EXIT_READER_GONE
    return run
