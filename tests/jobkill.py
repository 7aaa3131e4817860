"""Kill a real `dnmf run` part-way and look at its checkpointed tasks (shared by the resume tests)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time


def start_run(args, cwd):
    """`python -m dnmf ARGS` in its own session (so everything it started can be cleaned up)."""
    return subprocess.Popen([sys.executable, "-m", "dnmf", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc, ready, timeout=120.0):
    """SIGKILL ``proc`` as soon as ``ready()`` is true; returns True when it was killed part-way."""
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                return False  # finished (or failed) before the kill
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return True
            time.sleep(0.01)
        raise AssertionError("the run never reached the kill point")
    finally:
        try:  # anything the run started (nothing with in-process workers, but be sure)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate(timeout=30)


def run_cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "dnmf", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def done_tasks(store: pathlib.Path) -> list[str]:
    """Keys of the tasks a run store's checkpoint marks finished."""
    tasks = pathlib.Path(store) / "checkpoint" / "tasks"
    if not tasks.is_dir():
        return []
    return sorted(d.name for d in tasks.iterdir()
                  if (d / "zarr.json").is_file() and json.loads((d / "zarr.json").read_text())["attributes"].get("done"))


def kill_after_tasks(cfg_path, cwd, store, n: int = 2, timeout: float = 240.0) -> list[str]:
    """Start ``dnmf run CFG``, SIGKILL it once ``n`` tasks are checkpointed; the finished task keys."""
    proc = start_run(["run", str(cfg_path)], cwd)
    assert kill_when(proc, lambda: len(done_tasks(store)) >= n, timeout), "the run finished before it could be killed"
    return done_tasks(store)
