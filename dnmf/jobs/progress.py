"""Progress of a job: a one-line bar on a terminal, plain log lines otherwise.

``mode="auto"`` draws a bar when the stream is a TTY and writes log lines when it is not (a
batch job's log file, a CI log); ``"bar"`` and ``"log"`` force one; ``"none"`` is silent.

Other output must not overwrite a bar (nor a bar the other output): lines meant for the
terminal go through :func:`write` (clear the bar's line, print the line, redraw the bar; like
``tqdm.write``) and log records through :class:`ProgressHandler`, a ``logging`` handler that
does the same. ``dnmf run`` installs both.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress", "ProgressHandler", "resolve_mode", "write", "close_all"]

logger = logging.getLogger("dnmf.jobs")

#: Bars drawn right now (bar mode, not closed), in creation order; guarded by _LOCK.
_ACTIVE: list["Progress"] = []
_LOCK = threading.RLock()


def write(msg: str, stream: TextIO | None = None) -> None:
    """Print ``msg`` as a line on ``stream`` (default stderr) without breaking a drawn bar.

    A bar drawn on the same stream is cleared, the line printed and the bar redrawn below it.
    """
    stream = stream if stream is not None else sys.stderr
    with _LOCK:
        bars = [b for b in _ACTIVE if b.stream is stream and b._drawn]
        if bars:
            stream.write("\r\033[K")
        stream.write(msg + "\n")
        for b in bars[-1:]:  # one line holds one bar: redraw the newest
            b._draw()
        stream.flush()


def close_all() -> None:
    """Forget every open bar, ending a drawn bar's line (an error message then starts on its own line)."""
    with _LOCK:
        for b in _ACTIVE:
            if b._drawn:
                b.stream.write("\n")
                b.stream.flush()
            b._closed = True
        _ACTIVE.clear()


class ProgressHandler(logging.StreamHandler):
    """A ``logging.StreamHandler`` whose records do not overwrite a progress bar (see :func:`write`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record), self.stream)
        except RecursionError:  # pragma: no cover - as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


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
        self._drawn = False
        if self.mode == "bar":
            with _LOCK:
                _ACTIVE.append(self)
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
        with _LOCK:
            self.stream.write(line + "\033[K" + end)
            self.stream.flush()
            self._drawn = not end

    def close(self, text: str = "") -> None:
        """Finish the display (a final newline for the bar, a summary line for the log)."""
        if self._closed:
            return
        self._closed = True
        if text:
            self.text = text
        elapsed = time.perf_counter() - self._t0
        if self.mode == "bar":
            with _LOCK:
                if self in _ACTIVE:
                    _ACTIVE.remove(self)
                self._draw(end="\n")
        elif self.mode == "log":
            logger.info("%s: done, %d %s in %.1f s%s", self.desc, self.n, self.unit, elapsed,
                        f"  {self.text}" if self.text else "")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
