"""Progress lines for long jobs (sharding, downloads, training): done of total, rate, ETA. No torch import."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """H:MM:SS of a duration in seconds (negative durations show as 0:00:00)."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Done of total, rate and ETA on stderr: redrawn in place on a terminal, else a line every few seconds."""

    def __init__(self, total: int | None, stream: TextIO | None = None, every_s: float | None = None,
                 enabled: bool = True, unit: str = "files") -> None:
        """Args:
            total: files (or bytes) to do; None when unknown (no percentage or ETA).
            stream: where to write (default sys.stderr).
            every_s: seconds between updates (default 0.2 on a terminal, 5 otherwise).
            enabled: False makes every call a no-op.
            unit: "bytes" (shown in MB and MB/s), or what is counted ("files", "tiles").
        """
        self.total, self.done, self.enabled, self.unit = total, 0, enabled, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.t0 = self.last = time.monotonic()
        self.label = ""

    def line(self) -> str:
        """The current progress line (no newline)."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        if self.unit == "bytes":
            done, speed = f"{self.done / 1e6:,.1f}", f"{rate / 1e6:,.1f} MB/s"
            total = f"{self.total / 1e6:,.1f} MB" if self.total else "? MB"
        else:
            done, speed = f"{self.done:,}", f"{rate:,.0f} {self.unit}/s"
            total = f"{self.total:,} {self.unit}" if self.total else f"? {self.unit}"
        if not self.total:
            return f"{self.label}: {done}/{total}, {speed}"
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.label}: {done}/{total} ({100.0 * self.done / self.total:.0f}%), {speed}, ETA {eta}"

    def update(self, n: int = 1, label: str | None = None) -> None:
        """Count `n` more files (or bytes) done, under `label` (e.g. the split being written)."""
        self.done += n
        if label is not None:
            self.label = label
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._write()

    def _write(self, end: str = "") -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K" + end)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Write the final line."""
        if self.enabled and (self.total or self.done):
            self._write(end="\n")
