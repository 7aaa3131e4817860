"""Run a validated job: store, cluster, performance report, pipeline, completion marker.

:func:`run_job` is what ``dnmf run`` calls. The pipeline receives a :class:`Job`: the run's
store, the Dask client, checkpoint paths, progress displays, plot helpers and
:meth:`Job.run_tasks` for sweeps whose finished tasks are checkpointed one by one.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import logging
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import JobConfig, get_pipeline
from ..engine.checkpoint import CheckpointError
from ..exceptions import ConfigError, DnmfError, InputError
from . import plots as _plots
from .progress import Progress, write
from .store import RunStore

logger = logging.getLogger("dnmf.jobs")

__all__ = ["Job", "RunResult", "run_job", "package_versions", "RESUME_KEYS_IGNORED", "RESUME_KEYS_EXTEND"]

#: Config keys (dotted paths; a section covers all its keys) that may change between a run and
#: its resumption: where and how it executes and how it reports.
RESUME_KEYS_IGNORED = ("cluster", "checkpoint", "progress", "output")

#: Keys that only extend a checkpointed fit (its checkpoint's fingerprint leaves them out): they
#: may change on resume unless finished sweep tasks were computed with the old value.
RESUME_KEYS_EXTEND = ("model.maxit",)

_VERSION_PACKAGES = ("dnmf", "numpy", "scipy", "numba", "dask", "distributed", "zarr", "pandas", "anndata",
                     "h5py", "dask-jobqueue", "matplotlib", "scikit-learn", "pyyaml")


def package_versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the packages a run depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _stderr_echo(msg: str) -> None:
    """Write ``msg`` on stderr above any progress bar drawn there (the bar is redrawn below it)."""
    write(msg)


@dataclass
class Job:
    """What a pipeline receives besides its config.

    Attributes
    ----------
    config : JobConfig
    store : RunStore
        The run's Zarr store.
    client : distributed.Client
        Connected to the job's cluster.
    resume : bool
        True when continuing an interrupted run: pass it to checkpointed fits.
    echo : callable
        Prints a line for the user (stderr).
    plots : module
        :mod:`dnmf.jobs.plots` (figure builders).
    """

    config: JobConfig
    store: RunStore
    client: Any
    resume: bool = False
    echo: Callable[[str], None] = _stderr_echo
    stream: Any = None
    plots: Any = field(default=_plots, repr=False)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def checkpoint_every(self) -> int:
        return self.config.checkpoint.every

    def checkpoint_path(self, name: str) -> str:
        """A Zarr group inside the store for an engine checkpoint (``checkpoint/<name>``)."""
        return self.store.checkpoint_path(name)

    def output_path(self, suffix: str) -> Path:
        """``<output.dir>/<name>-<suffix>``: a file beside the store (recorded in the run)."""
        p = Path(self.config.output.dir) / f"{self.config.name}-{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_file(self, path) -> None:
        self.store.add_file(Path(path).name)

    # -- results ----------------------------------------------------------------------------------
    def write(self, group: str, values: Mapping[str, Any]) -> None:
        """Write results under ``group`` in the store (arrays, tables, scalars)."""
        self.store.write_group(group, values)

    def write_table(self, name: str, table) -> None:
        """Write a DataFrame as ``tables/<name>``."""
        self.store.write_table(name, table)

    def add_seeds(self, **seeds: Any) -> None:
        self.store.add_seeds(**seeds)

    def add_text(self, name: str, text: str) -> Path:
        """Keep ``text`` in the run record and write it beside the store as ``<name>-<name>.txt``."""
        self.store.add_text(name, text)
        p = self.output_path(f"{name}.txt")
        p.write_text(text if text.endswith("\n") else text + "\n")
        self.add_file(p)
        return p

    def save_figure(self, fig, name: str) -> Path | None:
        """Write a matplotlib figure as ``<output.dir>/<run>-<name>.png`` (when plots are on)."""
        if not self.config.output.plots:
            return None
        p = self.output_path(f"{name}.png")
        self.plots.save_png(fig, p)
        self.add_file(p)
        return p

    # -- progress -----------------------------------------------------------------------------------
    def progress(self, desc: str, total: int, *, unit: str = "it", initial: int = 0) -> Progress:
        """A progress display (bar on a terminal, log lines otherwise; see ``progress:``)."""
        return Progress(desc, total, unit=unit, mode=self.config.progress, stream=self.stream, initial=initial)

    def iteration_callback(self, bar: Progress) -> Callable:
        """An ``on_iteration`` callback for :func:`dnmf.nmf` that moves ``bar``."""

        def on_iteration(record):
            bar.set(record.iteration, f"loss {record.train_loss:.6g}")

        return on_iteration

    # -- sweeps -----------------------------------------------------------------------------------
    def run_tasks(self, fn: Callable, items: Sequence, keys: Sequence[str], *, desc: str,
                  to_payload: Callable[[Any], Mapping[str, Any]],
                  from_payload: Callable[[Mapping[str, Any]], Any]) -> list:
        """Run ``fn(item)`` for every item as parallel tasks; checkpoint each as it finishes.

        Finished tasks of an interrupted run (``resume``) are loaded instead of recomputed.
        Every result goes through ``to_payload`` → store → ``from_payload``, so a fresh and a
        resumed run return identical values. Results come back in the order of ``keys``.
        """
        from distributed import as_completed

        keys = [str(k) for k in keys]
        if len(set(keys)) != len(keys):
            raise ValueError("task keys must be unique")
        done = {k for k in keys if self.resume and self.store.task_done(k)}
        bar = self.progress(desc, len(keys), unit="task", initial=len(done))
        todo = [(k, it) for k, it in zip(keys, items) if k not in done]
        if done:
            self.echo(f"{desc}: {len(done)} of {len(keys)} tasks already finished; skipping them")
        tag = uuid.uuid4().hex[:8]
        futures = {self.client.submit(fn, it, pure=False, key=f"{desc.replace(' ', '_')}-{k}-{tag}"): k
                   for k, it in todo}
        try:
            for fut in as_completed(list(futures)):
                k = futures[fut]
                self.store.save_task(k, to_payload(fut.result()))
                bar.update(1, k)
        finally:
            for fut in futures:
                fut.release()
            bar.close()
        return [from_payload(self.store.load_task(k)) for k in keys]


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_job` returns.

    Attributes
    ----------
    store : Path
        The run's Zarr store.
    files : tuple of Path
        Files written beside it (plots, report, AnnData copy, texts).
    runtime : float
        Seconds of this attempt.
    resumed : bool
        True when this attempt continued an interrupted run.
    skipped : bool
        True when the run was already complete and nothing ran (``resume``).
    """

    store: Path
    files: tuple
    runtime: float
    resumed: bool = False
    skipped: bool = False


def _config_diff(old: Mapping, new: Mapping, prefix: str = "",
                 ignore: Sequence[str] = RESUME_KEYS_IGNORED) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` of every difference outside ``ignore``."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in ignore:
            continue
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.extend(_config_diff(a, b, path + ".", ignore))
        elif a != b:
            diffs.append((path, a, b))
    return diffs


def _maxit(config_dict: Mapping):
    model = config_dict.get("model")
    return model.get("maxit") if isinstance(model, Mapping) else None


def _resume_plan(store: RunStore, config: JobConfig) -> str:
    """How ``config`` continues ``store``: "resume" (interrupted run), "extend" (a complete fit
    stopped by maxit, maxit raised) or "skip" (complete; nothing to do). ConfigError when the
    config changed what the stored results depend on."""
    path = config.store_path
    old_cfg, new_cfg = store.meta.get("config", {}), config.to_dict()
    diffs = _config_diff(old_cfg, new_cfg, ignore=RESUME_KEYS_IGNORED + RESUME_KEYS_EXTEND)
    extend = _config_diff(old_cfg, new_cfg)
    complete = store.is_complete
    fits = store.completed_fits() if complete else {}
    if extend and not diffs:
        # maxit only extends an engine-checkpointed fit; sweep tasks and fits without such a
        # checkpoint were computed with the old value.
        if (store.tasks_done() if not complete else not fits):
            diffs = extend
    if diffs:
        shown = "; ".join(f"{k}: run has {a!r}, config has {b!r}" for k, a, b in diffs[:5])
        raise ConfigError(f"Cannot resume the run at {str(path)!r}: its config differs ({shown}). "
                          "Resume with the same config, or start over with --overwrite.")
    maxit = _maxit(new_cfg)
    if isinstance(maxit, int):
        for name, it in store.checkpoint_iterations().items():
            if it > maxit:
                raise ConfigError(f"Cannot resume the run at {str(path)!r} with model.maxit={maxit}: its checkpoint "
                                  f"{name!r} is at iteration {it} already. model.maxit can only grow on resume; "
                                  "raise it, or start over with --overwrite.")
    if not complete:
        return "resume"
    return "extend" if extend and store.extendable_checkpoints() else "skip"


def _prepare_store(config: JobConfig, resume: bool, overwrite: bool, echo) -> tuple[RunStore | None, bool]:
    """The store to run in (None when a complete run is resumed) and whether this is a resumption."""
    path = config.store_path
    meta = {"pipeline": config.pipeline, "name": config.name, "config": config.to_dict(),
            "config_yaml": config.to_yaml(), "versions": package_versions()}
    if not path.exists():
        if resume:
            echo(f"no interrupted run at {path}; starting a new one")
        return RunStore.create(path, meta), False
    if not RunStore.exists(path):
        damage = RunStore.damage(path)
        if damage is None:
            raise InputError(f"{str(path)!r} exists and is not a dnmf run store; refusing to replace it. "
                             "Choose another name or output.dir.")
        if overwrite:
            echo(f"replacing the damaged run store at {path}")
            return RunStore.create(path, meta), False
        raise CheckpointError(f"The run store at {str(path)!r} is damaged: {damage}. It cannot be resumed; "
                              "pass --overwrite to start over.", path=str(path), problems={"zarr.json": damage})
    store = RunStore.open(path)
    if overwrite:
        echo(f"replacing the run at {path}")
        return RunStore.create(path, meta), False
    complete = store.is_complete
    if not complete and not store.has_progress() and (store.status in ("failed", "interrupted")
                                                      or store.is_stale()):
        echo(f"the run at {path} stopped before its first checkpoint (status {store.status!r}); starting it again")
        return RunStore.create(path, meta), False
    if resume:
        plan = _resume_plan(store, config)
        if plan == "skip":
            echo(f"the run at {path} is already complete; nothing to resume")
            return None, True
        if plan == "extend":
            old, new = _maxit(store.meta.get("config", {})), _maxit(config.to_dict())
            echo(f"the run at {path} stopped at model.maxit={old} without converging; "
                 f"continuing it to model.maxit={new}")
        else:
            echo(f"resuming the interrupted run at {path}")
        store.reopen()
        store.update_meta(versions=package_versions(), config=config.to_dict(), config_yaml=config.to_yaml())
        return store, True
    if complete:
        raise DnmfError(f"A complete run already exists at {str(path)!r}. Pass --overwrite to replace it "
                        "or set another name (--set name=...).")
    status = store.status if store.status != "complete" else "complete, without its completion marker"
    raise DnmfError(f"An interrupted run exists at {str(path)!r} (status {status!r}). "
                    "Pass --resume to continue it from its last checkpoint, or --overwrite to start over.")


class _JobReport:
    """``distributed.performance_report`` written self-contained (bokeh's JavaScript inline, so
    it opens without internet), with the job's config and pipeline source as its calling code."""

    def __init__(self, filename: Path, code: str):
        from distributed import performance_report

        self._report = performance_report(filename=str(filename), mode="inline")
        self._code = code

    def __enter__(self):
        self._report.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        from distributed import get_client

        # performance_report.__exit__ would show the frame that closes it (this runner);
        # pass the job's own code instead (escaped: the report puts it inside <pre>).
        get_client().sync(self._report.__aexit__, exc_type, exc, tb, code=html.escape(self._code))
        return False


def _job_code(config: JobConfig, pipe) -> str:
    """What the report shows as calling code: the job's config and its pipeline's source."""
    try:
        source = inspect.getsource(pipe)
    except (OSError, TypeError):
        source = f"# source of {pipe.__name__} not available"
    config_lines = "\n".join("#   " + ln for ln in config.to_yaml().splitlines())
    return (f"# dnmf run: job {config.name!r}, pipeline {config.pipeline!r} ({pipe.__name__})\n"
            f"# config:\n{config_lines}\n\n{source}")


def _report_path(config: JobConfig, store: RunStore) -> Path:
    """``<name>-report.html`` for the first attempt, ``<name>-report-<attempt>.html`` after."""
    attempt = int(store.meta.get("attempts", 1))
    suffix = "report.html" if attempt == 1 else f"report-{attempt}.html"
    return Path(config.output.dir) / f"{config.name}-{suffix}"


def _mark_stopped(store: RunStore, status: str, error: str) -> None:
    try:
        store.mark_stopped(status, error)
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        logger.warning("could not record status %r in %s: %s", status, store.path, e)


def _damaged_checkpoint_error(store: RunStore, e: CheckpointError) -> CheckpointError:
    try:
        where = Path(e.path).relative_to(store.path)
    except ValueError:
        return e
    if where == Path("."):  # the store's own results: the message names it already
        return e
    detail = "; ".join(f"{k}: {v}" for k, v in e.problems.items()) or str(e)
    return CheckpointError(f"Cannot resume the run at {str(store.path)!r}: its checkpoint '{where}' is damaged and "
                           f"no slot holds a valid state to resume from ({detail}). Pass --overwrite to start over.",
                           path=str(store.path), problems=e.problems)


def run_job(config: JobConfig, *, resume: bool = False, overwrite: bool = False, client: Any = None,
            echo: Callable[[str], None] | None = None, stream: Any = None) -> RunResult:
    """Run a validated job config.

    Parameters
    ----------
    config : JobConfig
        From :func:`dnmf.config.load_config`.
    resume : bool
        Continue an interrupted run from its checkpoints (finished sweep tasks are skipped).
        A complete run is left as it is, unless its fit stopped at ``model.maxit`` without
        converging and the config raises ``model.maxit``: then the fit continues from its
        final state. The config may differ from the run's only in
        :data:`RESUME_KEYS_IGNORED`, and in :data:`RESUME_KEYS_EXTEND` when the fit those
        keys extend is engine-checkpointed (no finished sweep task depends on them).
    overwrite : bool
        Replace an existing run of the same name.
    client : distributed.Client or False, optional
        Use this client instead of starting the config's cluster; ``False`` runs the fits
        in-process on threads (no cluster and no performance report; pipelines with
        parallel sweeps need a client).
    echo : callable, optional
        Receives the lines meant for the user (default: print to stderr).
    stream : file, optional
        Where progress bars are drawn (default stderr).

    Returns
    -------
    RunResult

    Raises
    ------
    CheckpointError
        The run's store or checkpoint is damaged and no valid state remains (the message
        names the store; ``overwrite=True`` starts over). A damaged checkpoint slot whose
        other slot is valid is not an error: the fit resumes from that slot with a warning.

    Notes
    -----
    Every attempt ends with the store marked "complete" (with its completion marker),
    "failed" (an exception) or "interrupted" (Ctrl-C); a failed or interrupted run with no
    checkpoint yet, or one left "running" by a process that is gone, is simply started
    again by the next run.
    """
    echo = echo or _stderr_echo
    pipe = get_pipeline(config.pipeline)
    t0 = time.perf_counter()
    store, resumed = _prepare_store(config, resume, overwrite, echo)
    if store is None:
        files = tuple(config.store_path.parent / f for f in RunStore.open(config.store_path).meta.get("files", []))
        return RunResult(store=config.store_path, files=files, runtime=0.0, resumed=True, skipped=True)
    echo(f"run {config.name!r} ({config.pipeline}): store {store.path}")
    try:
        _run_attempt(pipe, config, store, client, resumed, echo, stream)
        runtime = time.perf_counter() - t0
        store.update_meta(runtime=runtime)
        store.mark_complete()
    except CheckpointError as e:
        _mark_stopped(store, "failed", str(e))
        raise _damaged_checkpoint_error(store, e) from e
    except Exception as e:
        _mark_stopped(store, "failed", f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:  # KeyboardInterrupt, SystemExit: resumable, never complete
        _mark_stopped(store, "interrupted", type(e).__name__)
        raise
    files = tuple(store.path.parent / f for f in store.meta.get("files", []))
    echo(f"done in {runtime:.1f} s: {store.path}" + (f" (+ {len(files)} files beside it)" if files else ""))
    return RunResult(store=store.path, files=files, runtime=runtime, resumed=resumed)


def _run_attempt(pipe, config: JobConfig, store: RunStore, client: Any, resumed: bool, echo, stream) -> None:
    """Connect (or use ``client``; ``False``: in-process threads, no cluster), then run the pipeline."""
    reports: list[Path] = []
    try:
        _run_pipeline(pipe, config, store, client, resumed, echo, stream, reports)
    finally:
        for report in reports:  # a failed attempt's report is kept and listed too
            if report.exists():
                store.add_report(report)


def _run_pipeline(pipe, config, store, client, resumed, echo, stream, reports: list) -> None:
    from ..engine.executor import scheduler_workers
    from .cluster import connect, dashboard_link, quiet_sizeof_probe

    with contextlib.ExitStack() as stack:
        started = client is None  # the cluster of config.cluster, started (or reached) here
        if started:
            client = stack.enter_context(connect(config.cluster, echo))
        elif client is not False:
            echo(f"cluster: given client; dashboard: {dashboard_link(client) or 'disabled'}")
        if client is False:
            echo("cluster: none (in-process threads)")
            store.update_meta(dashboard=None, n_workers=0)
        else:
            stack.enter_context(client.as_current())
            quiet_sizeof_probe(client)
            n_workers = len(scheduler_workers(client))
            store.update_meta(dashboard=dashboard_link(client, config.cluster if started else None),
                              n_workers=n_workers)
            if config.output.performance_report:
                report = _report_path(config, store)
                report.parent.mkdir(parents=True, exist_ok=True)
                reports.append(report)
                stack.enter_context(_JobReport(report, _job_code(config, pipe)))
        job = Job(config=config, store=store, client=client, resume=resumed, echo=echo, stream=stream)
        pipe.run(config, job)
