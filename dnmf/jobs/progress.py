"""Progress of a job: a one-line bar on a terminal, plain log lines otherwise.

``mode="auto"`` draws a bar when the stream is a TTY and writes log lines when it is not (a
batch job's log file, a CI log); ``"bar"`` and ``"log"`` force one; ``"none"`` is silent.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["Progress", "resolve_mode"]

logger = logging.getLogger("dnmf.jobs")


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"log"`` or ``"none"`` for a configured mode and an output stream."""
    if mode != "auto":
        return mode
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "log"


class Progress:
    """A progress display for ``total`` steps (iterations of a fit, tasks of a sweep).

    Parameters
    ----------
    desc : str
        What is progressing ("fit", "dfU scan").
    total : int
        Number of steps (an upper bound such as ``maxit`` is fine).
    unit : str
        "it" for iterations, "task" for sweep tasks.
    mode : {"bar", "log", "none", "auto"}
    stream : file, default sys.stderr
    initial : int
        Steps already done (a resumed fit or sweep).
    log_interval : float
        Seconds between two log lines in "log" mode (the first and last step are always logged).
    """

    def __init__(self, desc: str, total: int, *, unit: str = "it", mode: str = "auto", stream: TextIO | None = None,
                 initial: int = 0, log_interval: float = 1.0, width: int = 30):
        self.desc = desc
        self.total = max(int(total), 1)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.n = int(initial)
        self.initial = int(initial)
        self.text = ""
        self.width = width
        self.log_interval = log_interval
        self._t0 = time.perf_counter()
        self._last_log = float("-inf")
        self._closed = False
        if self.mode == "log" and initial:
            logger.info("%s: resuming at %d/%d %s", desc, initial, self.total, unit)

    def update(self, n: int = 1, text: str = "") -> None:
        """Advance by ``n`` steps; ``text`` is shown after the counter (e.g. the loss)."""
        self.set(self.n + n, text)

    def set(self, position: int, text: str = "") -> None:
        """Move to an absolute position (an iteration number)."""
        self.n = int(position)
        self.text = text
        if self.mode == "bar":
            self._draw()
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self._last_log >= self.log_interval or self.n in (self.initial + 1, self.total):
                self._last_log = now
                logger.info("%s: %d/%d %s%s", self.desc, self.n, self.total, self.unit,
                            f"  {text}" if text else "")

    def _draw(self, end: str = "") -> None:
        frac = min(self.n / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "█" * filled + "░" * (self.width - filled)
        elapsed = time.perf_counter() - self._t0
        line = f"\r{self.desc} |{bar}| {self.n}/{self.total} {self.unit}  {elapsed:.1f}s"
        if self.text:
            line += f"  {self.text}"
        self.stream.write(line + "\033[K" + end)
        self.stream.flush()

    def close(self, text: str = "") -> None:
        """Finish the display (a final newline for the bar, a summary line for the log)."""
        if self._closed:
            return
        self._closed = True
        if text:
            self.text = text
        elapsed = time.perf_counter() - self._t0
        if self.mode == "bar":
            self._draw(end="\n")
        elif self.mode == "log":
            logger.info("%s: done, %d %s in %.1f s%s", self.desc, self.n, self.unit, elapsed,
                        f"  {self.text}" if self.text else "")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
