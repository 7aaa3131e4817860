"""The ``dnmf`` command: run, validate, convert and inspect jobs.

::

    dnmf run CONFIG.yaml [--set model.k=5 ...] [--resume | --overwrite]
    dnmf validate CONFIG.yaml [--set ...] [--show] | dnmf validate --list | --explain PIPELINE
    dnmf convert INPUT OUTPUT.zarr [--block-nnz N] [--layer NAME]
    dnmf info STORE [--config | --json]

``python -m dnmf`` is the same command. Exit status: 0 success, 1 a run or input error,
2 a usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
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
Convert a matrix to dnmf's Zarr layout: column blocks balanced by stored entries, each
block written as whole shards, ready for out-of-core fits on a cluster.

INPUT is a .mtx/.mtx.gz (features × samples), .npz (scipy.sparse), .npy, .h5ad (cells ×
genes AnnData, stored as genes × cells) or another Zarr store.

example:
  dnmf convert pbmc.h5ad pbmc.zarr --block-nnz 2000000
"""

INFO_HELP = """\
Show what a run wrote: status (running / complete), pipeline, times, seeds, package
versions, every array and table in the store, and the files beside it.
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run a job from a YAML config", description=RUN_HELP, formatter_class=fmt)
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
                         formatter_class=fmt)
    val.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="job config")
    _add_overrides(val)
    val.add_argument("--show", action="store_true", help="print the resolved config (defaults filled in)")
    val.add_argument("--list", action="store_true", help="list the pipelines")
    val.add_argument("--explain", metavar="PIPELINE", help="list every config key of PIPELINE with its default")

    conv = sub.add_parser("convert", help="convert a matrix to a blocked Zarr store", description=CONVERT_HELP,
                          formatter_class=fmt)
    conv.add_argument("input", metavar="INPUT", help=".mtx, .npz, .npy, .h5ad or .zarr")
    conv.add_argument("output", metavar="OUTPUT.zarr", help="Zarr store to write")
    conv.add_argument("--block-nnz", type=int, default=1_000_000, metavar="N",
                      help="target stored entries per column block (default 1,000,000)")
    conv.add_argument("--layer", help="AnnData layer to convert (default X)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    info = sub.add_parser("info", help="show what a run wrote", description=INFO_HELP, formatter_class=fmt)
    info.add_argument("store", metavar="STORE", help="a run's .zarr store (or any Zarr store)")
    show = info.add_mutually_exclusive_group()
    show.add_argument("--config", action="store_true", help="print the run's resolved config as YAML")
    show.add_argument("--json", action="store_true", help="print the run record as JSON")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("dnmf",):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False


def cmd_run(args) -> int:
    from .config import load_config
    from .jobs import run_job

    overrides = list(args.overrides)
    if args.progress:
        overrides.append(f"progress={args.progress}")
    config = load_config(args.config, overrides)
    _setup_logging(args.quiet)
    echo = (lambda msg: None) if args.quiet else None
    run_job(config, resume=args.resume, overwrite=args.overwrite, echo=echo)
    return 0


def cmd_validate(args) -> int:
    from pipelines import get_pipeline, pipeline_names

    from .config import CheckpointConfig, OutputConfig, describe_section, load_config

    if args.list:
        for name in pipeline_names():
            doc = (get_pipeline(name).__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
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
    state = "complete" if status == "complete" else f"{status} — not complete (interrupted or still running; " \
                                                   "`dnmf run CONFIG --resume` continues it)"
    lines = [
        f"run:       {meta.get('name')} ({meta.get('pipeline')} pipeline)",
        f"store:     {path}",
        f"status:    {state}",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dnmf`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    except DnmfError as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
