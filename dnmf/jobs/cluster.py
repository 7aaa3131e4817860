"""The ``cluster:`` section → a running Dask cluster and client.

* ``local``: a :class:`distributed.LocalCluster` (``n_workers``, ``threads_per_worker``,
  ``memory_limit``, ``processes``);
* ``address``: connect to an existing scheduler;
* ``slurm`` / ``pbs``: a dask-jobqueue cluster whose workers are batch jobs
  (:func:`jobqueue_cluster` builds it; ``cluster.job_script()`` shows the script it submits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Iterator

from ..config import AddressClusterConfig, JobqueueClusterConfig, LocalClusterConfig

logger = logging.getLogger(__name__)

__all__ = ["jobqueue_cluster", "local_cluster", "connect", "dashboard_link", "quiet_sizeof_probe", "SHUTDOWN_LOGGERS",
           "quiet_shutdown_logs", "quiet_workers_shutdown", "CLUSTER_SETTINGS", "cluster_settings"]

#: Dask settings of the clusters dnmf starts (``local``, ``slurm``, ``pbs``), as ``key: (Dask's
#: default, dnmf's value)``. Each wakes every server's event loop (scheduler, nannies, workers)
#: on a timer, and on a machine with no spare core each wake takes CPU from the block kernels:
#: the workers' statistical profiler samples at 10 Hz instead of 100 Hz (the dashboard's
#: profile stays, coarser), and the event-loop health check ("tick", which warns of a blocked
#: loop) runs every 200 ms instead of 20 ms (Dask's own test clusters use 500 ms). Measured on
#: 2 cores (docs/architecture.md, "Cluster overhead"): a 2-process iteration ~9 % shorter, a
#: threads-only one ~5 %. A key the user's Dask config has changed is left as it is.
CLUSTER_SETTINGS = {
    "distributed.worker.profile.interval": ("10ms", "100ms"),
    "distributed.admin.tick.interval": ("20ms", "200ms"),
}


def cluster_settings() -> dict:
    """:data:`CLUSTER_SETTINGS` to apply: dnmf's value of each key whose current Dask config
    value is still Dask's default (so ``dask.config.set``, a YAML file or a ``DASK_…``
    environment variable of the user's wins). Use it for a cluster of your own too:
    ``with dask.config.set(cluster_settings()): LocalCluster(...)``."""
    import dask
    from dask.utils import parse_timedelta

    return {key: ours for key, (default, ours) in CLUSTER_SETTINGS.items()
            if parse_timedelta(dask.config.get(key, default), "ms") == parse_timedelta(default, "ms")}


def _worker_env_lines(settings: dict) -> list[str]:
    """Shell lines exporting ``settings`` as Dask's environment variables for a job's workers,
    each only where the job's environment (a line of the user's prologue, the site) has none."""
    lines = []
    for key, value in settings.items():
        var = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        lines.append(f'export {var}="${{{var}:-{value}}}"')
    return lines

#: Loggers of the cluster machinery, silenced while a cluster dnmf started shuts down (or an
#: interrupted run stops it): its chatter then is not the user's business.
SHUTDOWN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh", "dask_jobqueue")


def quiet_shutdown_logs() -> None:
    """Silence :data:`SHUTDOWN_LOGGERS` in this process."""
    for name in SHUTDOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def quiet_workers_shutdown(client, timeout: float = 2.0) -> None:
    """:func:`quiet_shutdown_logs` on every worker of ``client``, best effort (``timeout`` seconds;
    workers that are gone or do not answer are skipped). A worker whose heartbeat meets a closed
    scheduler would otherwise log a traceback on the run's stderr: seen on a loaded machine when
    a run that failed (a damaged checkpoint) closed its LocalCluster."""
    client.sync(client._run, quiet_shutdown_logs, on_error="ignore", callback_timeout=timeout)


def local_cluster(cfg: LocalClusterConfig):
    """A LocalCluster configured by ``cfg``."""
    from distributed import LocalCluster

    kwargs = dict(processes=cfg.processes, dashboard_address=cfg.dashboard_address, memory_limit=cfg.memory_limit)
    if cfg.dashboard_address is None:
        # no dashboard; the scheduler still serves its HTTP routes (health, metrics), which would
        # try port 8787 (and warn "Port 8787 is already in use"): give them any free port instead
        kwargs["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": ":0"}
    if cfg.n_workers is not None:
        kwargs["n_workers"] = cfg.n_workers
    if cfg.threads_per_worker is not None:
        kwargs["threads_per_worker"] = cfg.threads_per_worker
    if cfg.local_directory is not None:
        kwargs["local_directory"] = cfg.local_directory
    import dask

    # The scheduler and the nannies read the settings when they are made; each nanny hands its
    # config to the worker process it starts (and restarts).
    with dask.config.set(cluster_settings()):
        return LocalCluster(**kwargs)


def jobqueue_cluster(cfg: JobqueueClusterConfig):
    """A dask-jobqueue ``SLURMCluster`` or ``PBSCluster`` configured by ``cfg`` (no job submitted yet).

    Starting it starts the scheduler here; jobs are submitted by ``cluster.scale(jobs=...)``.
    ``cluster.job_script()`` returns the batch script each job runs.
    """
    try:
        import dask_jobqueue
    except ImportError as e:  # pragma: no cover - dask-jobqueue is in the test extra
        raise ImportError("cluster kinds 'slurm' and 'pbs' need dask-jobqueue: pip install 'dnmf[jobqueue]'") from e
    import dask

    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[cfg.kind]
    settings = cluster_settings()
    kwargs = dict(
        cores=cfg.cores,
        memory=cfg.memory if isinstance(cfg.memory, str) else f"{cfg.memory}B",
        processes=cfg.processes,
        walltime=cfg.walltime,
        job_name=cfg.job_name,
        job_extra_directives=list(cfg.job_extra_directives),
        # the workers run on other nodes, from the job script: the settings go as environment
        # variables, after the user's prologue (which may set them itself)
        job_script_prologue=[*cfg.job_script_prologue, *_worker_env_lines(settings)],
        scheduler_options={"dashboard_address": cfg.dashboard_address} if cfg.dashboard_address else {},
    )
    for key in ("queue", "account", "local_directory", "log_directory", "interface", "python"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    with dask.config.set(settings):  # the scheduler, started here
        return cls(**kwargs)


class SizeofProbeFilter(logging.Filter):
    """Drops the ``distributed.sizeof`` warning of a failed *size probe* ("... Defaulting to -1 B").

    Before sending a message, ``distributed.comm.utils.to_frames`` estimates its size with
    ``safe_sizeof(msg, default_size=-1)`` only to decide whether to serialize it off the event
    loop. The deeply nested profile messages of a performance report make dask's ``sizeof`` hit
    a RecursionError; distributed then falls back correctly but logs this warning (twice per job).
    Other sizeof failures (default sizes of 1 MB, which affect memory accounting) stay visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Defaulting to -1 B" not in record.getMessage()


def install_sizeof_filter() -> None:
    """Add :class:`SizeofProbeFilter` to this process's ``distributed.sizeof`` logger (once)."""
    log = logging.getLogger("distributed.sizeof")
    if not any(isinstance(f, SizeofProbeFilter) for f in log.filters):
        log.addFilter(SizeofProbeFilter())


def _sizeof_filter_plugin():
    from distributed import WorkerPlugin

    class SizeofFilterPlugin(WorkerPlugin):
        """Installs the filter on every worker, also on workers started or restarted later."""

        name = "dnmf-sizeof-probe-filter"

        def setup(self, worker):
            install_sizeof_filter()

    return SizeofFilterPlugin()


def quiet_sizeof_probe(client) -> None:
    """Install :class:`SizeofProbeFilter` here, on the scheduler and on the workers of ``client``.

    Best effort: a cluster that cannot run it (e.g. a remote scheduler without dnmf) keeps the
    warning, and the job goes on.
    """
    install_sizeof_filter()
    for what, call in (("scheduler", lambda: client.run_on_scheduler(install_sizeof_filter)),
                       ("workers", lambda: client.register_plugin(_sizeof_filter_plugin()))):
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a log filter must never stop a job
            logger.debug("could not install the sizeof probe filter on the %s: %s", what, exc)


def dashboard_link(client, cfg=None) -> str | None:
    """The dashboard URL of ``client``'s scheduler, or None when it has no dashboard.

    ``cfg`` is the cluster config the scheduler was started from, if any: with
    ``dashboard_address: null`` there is no dashboard (the scheduler's HTTP server, which
    serves only its health and metrics routes then, still reports itself as "dashboard").
    """
    if cfg is not None and hasattr(cfg, "dashboard_address") and cfg.dashboard_address is None:
        return None
    try:
        if not client.scheduler_info().get("services", {}).get("dashboard"):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a missing dashboard must never stop a job
        return None


@contextlib.contextmanager
def connect(cfg, echo: Callable[[str], None] = logger.info) -> Iterator:
    """Start (or reach) the cluster of ``cfg`` and yield a connected ``distributed.Client``.

    Everything started here is closed on exit, with the cluster machinery's loggers silenced on
    its workers and in this process while it closes (restored here afterwards): whatever the run
    had to report is reported by then. A cluster only reached (``address``) is left as it is.
    """
    from distributed import Client

    with contextlib.ExitStack() as stack:
        if not isinstance(cfg, AddressClusterConfig):  # closed here: this process's levels restored last
            stack.callback(_set_levels, {name: logging.getLogger(name).level for name in SHUTDOWN_LOGGERS})
        if isinstance(cfg, LocalClusterConfig):
            cluster = stack.enter_context(local_cluster(cfg))
            client = stack.enter_context(Client(cluster))
            stack.callback(_closing, client)
            what = f"LocalCluster with {len(cluster.workers)} workers"
        elif isinstance(cfg, AddressClusterConfig):
            client = stack.enter_context(Client(cfg.address))
            what = f"scheduler at {cfg.address}"
        else:
            cluster = stack.enter_context(jobqueue_cluster(cfg))
            cluster.scale(jobs=cfg.jobs)
            client = stack.enter_context(Client(cluster))
            stack.callback(_closing, client)
            what = f"{cfg.kind.upper()} cluster, {cfg.jobs} job(s) of {cfg.cores} cores / {cfg.memory}"
            echo(f"waiting for {cfg.kind} workers (jobs submitted: {cfg.jobs})")
            client.wait_for_workers(1)
        link = dashboard_link(client, cfg)
        echo(f"cluster: {what}; dashboard: {link or 'disabled'}")
        yield client


def _set_levels(levels: dict) -> None:
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _closing(client) -> None:
    """Before :func:`connect` closes the cluster it started: its loggers silenced, there and here."""
    try:
        quiet_workers_shutdown(client)
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - best effort, and never in
        # place of the error the run is closing on: the cluster is closed either way
        logger.debug("could not silence the workers' shutdown logs: %s", exc)
    quiet_shutdown_logs()
