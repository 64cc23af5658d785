"""Progress of long work on stderr: a line redrawn in place on a terminal, a line every 25% in logs."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, every 25% otherwise (logs, CI)."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total, self.description, self.enabled = max(total, 1), description, enabled
        self.count, self.start, self.last_draw, self.next_mark = 0, time.time(), 0.0, 0.25
        self.terminal = sys.stderr.isatty()

    def update(self, steps: int = 1, **values: float) -> None:
        self.count += steps
        if not self.enabled:
            return
        fraction = self.count / self.total
        now = time.time()
        text = ", ".join(f"{key} {value:.4g}" for key, value in values.items())
        line = (f"{self.description}: {self.count}/{self.total} ({100 * fraction:.0f}%) "
                f"{now - self.start:.0f}s{', ' + text if text else ''}")
        if self.terminal and (now - self.last_draw > 0.2 or self.count >= self.total):
            sys.stderr.write("\r" + line.ljust(100) + ("\n" if self.count >= self.total else ""))
            sys.stderr.flush()
            self.last_draw = now
        elif not self.terminal and (fraction >= self.next_mark or self.count >= self.total):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            while self.next_mark <= fraction:
                self.next_mark += 0.25
