"""The ``dnmf`` command: run, validate, convert and inspect jobs.

::

    dnmf run CONFIG.yaml [--set model.k=5 ...] [--resume | --overwrite]
    dnmf validate CONFIG.yaml [--set ...] [--show] | dnmf validate --list | --explain PIPELINE
    dnmf convert INPUT OUTPUT.zarr [--block-nnz N] [--layer NAME]
    dnmf info STORE [--config | --json]

``python -m dnmf`` is the same command. Exit status: 0 success, 1 a run or input error,
2 a usage or configuration error, 130 interrupted (Ctrl-C). Every error ends in one or two
lines on stderr; ``--debug`` (before or after the command) prints the full traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

from .exceptions import ConfigError, DnmfError

__all__ = ["main", "build_parser"]

PROG = "dnmf"

RUN_HELP = """\
Run a job described by a YAML config: validate it, start its cluster, run its pipeline and
write one Zarr store (<output.dir>/<name>.zarr) with plots and a Dask performance report
beside it.

A config names a pipeline and gives its sections:

  pipeline: factorize            # see `dnmf validate --list`
  name: quickstart               # default: the config file's name
  input: {dataset: pbmc3k}
  model: {k: 10, maxit: 100, seed: 1}
  cluster: {kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB}
  checkpoint: {every: 10}        # iterations between checkpoints
  output: {dir: runs}

The run checkpoints into its store; after an interruption `dnmf run CONFIG --resume`
continues from the last checkpoint and skips finished sweep tasks. A store is marked
complete only after everything is written.

examples:
  dnmf run configs/quickstart.yaml
  dnmf run configs/quickstart.yaml --set model.k=5 --set name=k5
  dnmf run configs/big_synthetic.yaml --resume
"""

VALIDATE_HELP = """\
Check a config without running anything: unknown keys, wrong types, missing input files and
impossible values are reported with the key path, what is allowed and what was given.

examples:
  dnmf validate configs/quickstart.yaml --show     # print the resolved config
  dnmf validate --list                             # the pipelines
  dnmf validate --explain factorize                # every key of a pipeline, with defaults
"""

CONVERT_HELP = """\
Convert a matrix to dnmf's Zarr v3 layout: column blocks balanced by stored entries, each
block starting on a chunk boundary (blocks never share a chunk), every chunk written, and
fill values no valid store holds (NaN for values, -1 for indices), so a lost chunk file is
detected; ready for out-of-core fits on a cluster.

INPUT is a .mtx/.mtx.gz (features × samples), .npz (scipy.sparse), .npy, .h5ad (cells ×
genes AnnData, stored as genes × cells) or another Zarr store.

example:
  dnmf convert pbmc.h5ad pbmc.zarr --block-nnz 2000000
"""

INFO_HELP = """\
Show what a run wrote: status (running, failed, interrupted or complete; the error of a
failed or interrupted run), pipeline, times, seeds, package versions, every array and table
in the store, a kept checkpoint, and the files beside it.
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key (repeatable), e.g. --set model.maxit=3; "
                        "VALUE is read as YAML")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnmf`` command."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt,
        description="dnmf: distributed non-negative matrix factorization jobs on Dask.",
        epilog="Run `dnmf COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"dnmf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # `--debug` is accepted after the command too (`dnmf run CONFIG --debug`); SUPPRESS keeps a
    # subcommand from resetting a `dnmf --debug run ...` to False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")

    run = sub.add_parser("run", help="run a job from a YAML config", description=RUN_HELP, formatter_class=fmt,
                         parents=[common])
    run.add_argument("config", metavar="CONFIG.yaml", help="job config")
    _add_overrides(run)
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its last checkpoint (a complete run is left alone)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    run.add_argument("--progress", choices=("auto", "bar", "log", "none"),
                     help="progress display (overrides the config's `progress:`)")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    val = sub.add_parser("validate", help="check a config without running it", description=VALIDATE_HELP,
                         formatter_class=fmt, parents=[common])
    val.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="job config")
    _add_overrides(val)
    val.add_argument("--show", action="store_true", help="print the resolved config (defaults filled in)")
    val.add_argument("--list", action="store_true", help="list the pipelines")
    val.add_argument("--explain", metavar="PIPELINE", help="list every config key of PIPELINE with its default")

    conv = sub.add_parser("convert", help="convert a matrix to a blocked Zarr store", description=CONVERT_HELP,
                          formatter_class=fmt, parents=[common])
    conv.add_argument("input", metavar="INPUT", help=".mtx, .npz, .npy, .h5ad or .zarr")
    conv.add_argument("output", metavar="OUTPUT.zarr", help="Zarr store to write")
    conv.add_argument("--block-nnz", type=int, default=1_000_000, metavar="N",
                      help="target stored entries per column block (default 1,000,000)")
    conv.add_argument("--layer", help="AnnData layer to convert (default X)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    info = sub.add_parser("info", help="show what a run wrote", description=INFO_HELP, formatter_class=fmt,
                          parents=[common])
    info.add_argument("store", metavar="STORE", help="a run's .zarr store (or any Zarr store)")
    show = info.add_mutually_exclusive_group()
    show.add_argument("--config", action="store_true", help="print the run's resolved config as YAML")
    show.add_argument("--json", action="store_true", help="print the run record as JSON")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _setup_logging(quiet: bool = False):
    """dnmf's log records on stderr, through the progress bar's handler; returns an undo function.

    distributed's own stderr handler is swapped for one that cooperates with the bar too.
    """
    from .jobs.cluster import SHUTDOWN_LOGGERS
    from .jobs.progress import ProgressHandler

    level = logging.WARNING if quiet else logging.INFO
    handler = ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    log = logging.getLogger("dnmf")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    dist = logging.getLogger("distributed")
    saved_handlers = list(dist.handlers)
    saved_levels = {name: logging.getLogger(name).level for name in SHUTDOWN_LOGGERS}
    for i, h in enumerate(dist.handlers):
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr:
            bar_aware = ProgressHandler(sys.stderr)
            bar_aware.setFormatter(h.formatter)
            bar_aware.setLevel(h.level)
            dist.handlers[i] = bar_aware

    logging.getLogger("distributed.worker").addFilter(_DROP_COMPUTE_FAILED)  # threads of this process

    def undo() -> None:
        logging.getLogger("distributed.worker").removeFilter(_DROP_COMPUTE_FAILED)
        dist.handlers[:] = saved_handlers
        for name, lvl in saved_levels.items():  # an interrupt silenced them
            logging.getLogger(name).setLevel(lvl)

    return undo


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of ``dnmf run``: one line, through the progress bar."""
    from .jobs.progress import write

    write(f"{PROG}: warning: {' '.join(str(message).split())} ({category.__name__})")


def _on_sigint(signum, frame):
    """Ctrl-C: silence the cluster's shutdown chatter, here and on the workers, then stop the run.

    The handler runs wherever the main thread was interrupted — possibly inside another
    ``client.sync`` or a Zarr write — so the quieting is best effort and nothing but the
    KeyboardInterrupt may leave it: an asyncio ``CancelledError`` (a BaseException) escaping from
    the nested ``client.sync`` would otherwise replace it and could be taken downstream for a
    lost worker, letting the run go on.
    """
    try:
        from distributed import default_client

        from .jobs.cluster import quiet_shutdown_logs, quiet_workers_shutdown

        quiet_shutdown_logs()
        quiet_workers_shutdown(default_client())
    except BaseException:  # noqa: BLE001 - no client yet, or it is gone, or the call was cut short
        pass
    raise KeyboardInterrupt


class _DropComputeFailed(logging.Filter):
    """Drop distributed's multi-line "Compute Failed" record: the task's error reaches ``dnmf``,
    which reports it in one line (``--debug``: with the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


_DROP_COMPUTE_FAILED = _DropComputeFailed()


def dask_setup(worker) -> None:
    """Worker preload of ``dnmf run``'s own worker processes.

    Ctrl-C is left to the ``dnmf`` process: a terminal sends it to the whole process group,
    worker processes included, and each would print its own traceback; ``dnmf`` stops the run
    and closes the cluster, which stops them. A failed task's error is reported by ``dnmf``
    only (see :class:`_DropComputeFailed`).
    """
    import threading

    logging.getLogger("distributed.worker").addFilter(_DROP_COMPUTE_FAILED)
    if threading.current_thread() is threading.main_thread():  # a worker process, not a thread of ours
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def cmd_run(args) -> int:
    import dask

    from .config import load_config
    from .jobs import progress, run_job

    overrides = list(args.overrides)
    if args.progress:
        overrides.append(f"progress={args.progress}")
    config = load_config(args.config, overrides)
    undo_logging = _setup_logging(args.quiet)
    echo = (lambda msg: None) if args.quiet else progress.write
    preload = [*dask.config.get("distributed.worker.preload", []), __name__]
    previous = signal.signal(signal.SIGINT, _on_sigint)
    show_warning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        with dask.config.set({"distributed.worker.preload": preload}):
            run_job(config, resume=args.resume, overwrite=args.overwrite, echo=echo)
    finally:
        signal.signal(signal.SIGINT, previous)
        warnings.showwarning = show_warning
        progress.close_all()
        undo_logging()
    return 0


def cmd_validate(args) -> int:
    from .config import (CheckpointConfig, OutputConfig, describe_section, get_pipeline, load_config, pipeline_names,
                         pipeline_summary)

    if args.list:
        for name in pipeline_names():
            print(f"{name:12s} {pipeline_summary(name)}")
        return 0
    if args.explain:
        names = pipeline_names()
        if args.explain not in names:
            raise ConfigError(f"Unknown pipeline {args.explain!r}; available: {', '.join(names)}.")
        from .config import AddressClusterConfig, JobqueueClusterConfig, LocalClusterConfig

        pipe = get_pipeline(args.explain)
        print(f"pipeline: {args.explain}\nname: a run name (default: the config file's name)")
        for section, cls in pipe.SECTIONS.items():
            print("\n".join(describe_section(cls, section)))
        for title, cls in (("cluster (kind: local)", LocalClusterConfig),
                           ("cluster (kind: address)", AddressClusterConfig),
                           ("cluster (kind: slurm | pbs)", JobqueueClusterConfig)):
            print(f"# {title}")
            print("\n".join(describe_section(cls, "cluster")))
        print("\n".join(describe_section(CheckpointConfig, "checkpoint")))
        print("\n".join(describe_section(OutputConfig, "output")))
        print("progress: one of 'auto', 'bar', 'log', 'none' (default 'auto')")
        return 0
    if not args.config:
        raise ConfigError("dnmf validate needs a CONFIG.yaml (or --list / --explain PIPELINE).")
    config = load_config(args.config, args.overrides)
    print(f"{args.config}: valid {config.pipeline} job {config.name!r} -> {config.store_path}")
    if args.show:
        print(config.to_yaml(), end="")
    return 0


def cmd_convert(args) -> int:
    import time

    import dnmf.io

    out = Path(args.output)
    src = Path(args.input)
    if not src.exists():
        raise DnmfError(f"INPUT {str(src)!r} does not exist.")
    if out.exists() and not args.overwrite:
        raise DnmfError(f"OUTPUT {str(out)!r} exists; pass --overwrite to replace it.")
    if args.block_nnz < 1:
        raise DnmfError(f"--block-nnz must be a positive int. Got {args.block_nnz} instead.")
    t0 = time.perf_counter()
    source = dnmf.io.as_blocked(str(src), layer=args.layer) if args.layer else str(src)
    dnmf.io.write_zarr(source, str(out), block_nnz=args.block_nnz, overwrite=args.overwrite)
    blocked = dnmf.io.as_blocked(str(out))
    m, n = blocked.shape
    kind = "sparse" if blocked.sparse else "dense"
    print(f"wrote {out}: {m} × {n} {kind} {blocked.dtype}, {blocked.nnz} stored entries in "
          f"{blocked.n_blocks} column blocks ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_info(args) -> int:
    from .jobs.store import RunStore

    path = Path(args.store)
    if not path.exists():
        raise DnmfError(f"STORE {str(path)!r} does not exist.")
    if not RunStore.exists(path):
        return _info_plain_zarr(path, args)
    store = RunStore.open(path)
    meta = store.meta
    if args.json:
        print(json.dumps(meta, indent=2, default=str))
        return 0
    if args.config:
        print(meta.get("config_yaml", ""), end="")
        return 0
    status = meta.get("status")
    complete = store.is_complete
    if complete:
        state = "complete"
    elif status in ("failed", "interrupted"):
        state = (f"{status} — not complete (`dnmf run CONFIG --resume` continues it from its checkpoint, "
                 "or starts it again when it has none)")
    else:
        state = f"{status} — not complete (interrupted or still running; `dnmf run CONFIG --resume` continues it)"
    lines = [
        f"run:       {meta.get('name')} ({meta.get('pipeline')} pipeline)",
        f"store:     {path}",
        f"status:    {state}",
        *([f"error:     {meta['error']}"] if not complete and meta.get("error") else []),
        f"started:   {meta.get('started')}" + (f"   finished: {meta['finished']}" if meta.get("finished") else ""),
    ]
    if meta.get("runtime") is not None:
        lines.append(f"runtime:   {meta['runtime']:.1f} s (attempts: {meta.get('attempts', 1)})")
    if meta.get("n_workers") is not None:
        lines.append(f"workers:   {meta['n_workers']}   dashboard: {meta.get('dashboard') or 'disabled'}")
    seeds = meta.get("seeds") or {}
    if seeds:
        lines.append("seeds:     " + ", ".join(f"{k}={v}" for k, v in seeds.items()))
    versions = meta.get("versions") or {}
    if versions:
        keep = ("dnmf", "python", "numpy", "dask", "distributed", "zarr", "numba")
        lines.append("versions:  " + ", ".join(f"{k} {versions[k]}" for k in keep if versions.get(k)))
    lines.append("contents:")
    for key, desc in store.tree():
        if key.startswith("checkpoint/"):
            continue
        lines.append(f"  {key:28s} {desc}")
    if complete:
        for name, iteration in store.extendable_checkpoints().items():
            lines.append(f"checkpoint: {name} at iteration {iteration} (kept: --resume with a larger model.maxit "
                         "continues the fit)")
    else:
        ckpt = store.checkpoint_iteration("nmf")
        if ckpt is not None:
            lines.append(f"checkpoint: nmf at iteration {ckpt}")
    files = meta.get("files") or []
    if files:
        lines.append("files beside the store:")
        for f in files:
            exists = (path.parent / f).exists()
            lines.append(f"  {path.parent / f}" + ("" if exists else "  (missing)"))
    texts = meta.get("texts") or {}
    for name, text in texts.items():
        lines.append(f"{name}:")
        lines.extend("  " + t for t in text.splitlines())
    print("\n".join(lines))
    return 0


def _info_plain_zarr(path: Path, args) -> int:
    import zarr

    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - anything unreadable is reported, not raised
        raise DnmfError(f"STORE {str(path)!r} is not a readable Zarr store: {e}") from e
    attrs = dict(root.attrs)
    if args.json or args.config:
        print(json.dumps(attrs, indent=2, default=str))
        return 0
    print(f"{path}: a Zarr store (not a dnmf run)")
    if attrs:
        print("attributes:")
        for k, v in attrs.items():
            print(textwrap.shorten(f"  {k}: {v}", 140))
    if isinstance(root, zarr.Group):
        for name, arr in sorted(root.arrays(), key=lambda kv: kv[0]):
            print(f"  {name:28s} {arr.dtype} {'×'.join(map(str, arr.shape))}")
        for name, grp in sorted(root.groups(), key=lambda kv: kv[0]):
            print(f"  {name}/")
    else:
        print(f"  array {root.dtype} {'×'.join(map(str, root.shape))}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "convert": cmd_convert, "info": cmd_info}


INTERRUPTED = {"run": "Interrupted; `dnmf run CONFIG --resume` continues from the last checkpoint."}
DEBUG_HINT = f"{PROG}: run `{PROG} --debug COMMAND ...` for the full traceback."


def describe_error(e: BaseException) -> tuple[str, bool]:
    """One line for an error that is not dnmf's own, and whether to add the ``--debug`` hint.

    File-system errors name the file and what to check; other errors give their type and first
    line (the traceback is one ``--debug`` away).
    """
    if isinstance(e, OSError) and (e.strerror or e.filename):
        what = e.strerror or str(e)
        where = f": {e.filename!r}" if e.filename else ""
        hint = {
            errno.ENOENT: "check the path",
            errno.EACCES: "check the file's permissions",
            errno.EPERM: "check the file's permissions",
            errno.ENOSPC: "free some space or choose another output.dir",
            errno.EDQUOT: "free some space or choose another output.dir",
            errno.EROFS: "choose a writable output.dir",
            errno.EISDIR: "give a file, not a directory",
            errno.ENOTDIR: "a parent of the path is a file",
        }.get(e.errno, "")
        return f"{what}{where}" + (f" ({hint})." if hint else "."), False
    if isinstance(e, MemoryError):
        return ("out of memory: lower model.block_nnz, use more workers or raise cluster.memory_limit "
                "(model.out_of_core: true streams blocks from disk)."), False
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); is it a binary file?", True
    if type(e).__name__ == "KilledWorker":
        return ("a worker died while running a task, more than once (out of memory?): raise "
                "cluster.memory_limit or lower model.block_nnz."), True
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = textwrap.shorten(first, 300, placeholder=" ...")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__, True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dnmf`` console script; returns the exit status.

    0 success; 1 a run, input or file-system error; 2 a usage or config error; 130 Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # `dnmf run` silenced its cluster's shutdown (see _on_sigint)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: {INTERRUPTED.get(args.command, 'Interrupted.')}", file=sys.stderr)
        return 130
    except ConfigError as e:
        if debug:
            raise
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    except DnmfError as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else a user can cause: one line, not a traceback
        if debug:
            raise
        line, hint = describe_error(e)
        print(f"{PROG}: error: {line}", file=sys.stderr)
        if hint:
            print(DEBUG_HINT, file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
