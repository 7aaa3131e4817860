"""The ``cluster:`` section → a running Dask cluster and client.

* ``local``: a :class:`distributed.LocalCluster` (``n_workers``, ``threads_per_worker``,
  ``memory_limit``, ``processes``);
* ``address``: connect to an existing scheduler;
* ``slurm`` / ``pbs``: a dask-jobqueue cluster whose workers are batch jobs
  (:func:`jobqueue_cluster` builds it; ``cluster.job_script()`` shows the script it submits).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Callable, Iterator

from ..config import AddressClusterConfig, JobqueueClusterConfig, LocalClusterConfig

logger = logging.getLogger(__name__)

__all__ = ["jobqueue_cluster", "local_cluster", "connect", "dashboard_link", "scheduler_info"]


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
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[cfg.kind]
    kwargs = dict(
        cores=cfg.cores,
        memory=cfg.memory if isinstance(cfg.memory, str) else f"{cfg.memory}B",
        processes=cfg.processes,
        walltime=cfg.walltime,
        job_name=cfg.job_name,
        job_extra_directives=list(cfg.job_extra_directives),
        job_script_prologue=list(cfg.job_script_prologue),
        scheduler_options={"dashboard_address": cfg.dashboard_address} if cfg.dashboard_address else {},
    )
    for key in ("queue", "account", "local_directory", "log_directory", "interface", "python"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    return cls(**kwargs)


def scheduler_info(client, *, workers: bool = True) -> dict:
    """``client.scheduler_info()`` with every worker listed (``workers``) or none.

    Recent ``distributed`` lists only the first few workers unless asked for ``n_workers=-1``;
    older versions take no ``n_workers`` and always list all of them.
    """
    if _takes_n_workers(type(client)):
        return client.scheduler_info(n_workers=-1 if workers else 0)
    return client.scheduler_info()


def dashboard_link(client, cfg=None) -> str | None:
    """The dashboard URL of ``client``'s scheduler, or None when it has no dashboard.

    ``cfg`` is the cluster config the scheduler was started from, if any: with
    ``dashboard_address: null`` there is no dashboard (the scheduler's HTTP server, which
    serves only its health and metrics routes then, still reports itself as "dashboard").
    """
    if cfg is not None and hasattr(cfg, "dashboard_address") and cfg.dashboard_address is None:
        return None
    try:
        info = scheduler_info(client, workers=False)
        if not info.get("services", {}).get("dashboard"):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a missing dashboard must never stop a job
        return None


@functools.lru_cache(maxsize=None)
def _takes_n_workers(client_type) -> bool:
    return "n_workers" in inspect.signature(client_type.scheduler_info).parameters


@contextlib.contextmanager
def connect(cfg, echo: Callable[[str], None] = logger.info) -> Iterator:
    """Start (or reach) the cluster of ``cfg`` and yield a connected ``distributed.Client``.

    Everything started here is closed on exit.
    """
    from distributed import Client

    with contextlib.ExitStack() as stack:
        if isinstance(cfg, LocalClusterConfig):
            cluster = stack.enter_context(local_cluster(cfg))
            client = stack.enter_context(Client(cluster))
            what = f"LocalCluster with {len(cluster.workers)} workers"
        elif isinstance(cfg, AddressClusterConfig):
            client = stack.enter_context(Client(cfg.address))
            what = f"scheduler at {cfg.address}"
        else:
            cluster = stack.enter_context(jobqueue_cluster(cfg))
            cluster.scale(jobs=cfg.jobs)
            client = stack.enter_context(Client(cluster))
            what = f"{cfg.kind.upper()} cluster, {cfg.jobs} job(s) of {cfg.cores} cores / {cfg.memory}"
            echo(f"waiting for {cfg.kind} workers (jobs submitted: {cfg.jobs})")
            client.wait_for_workers(1)
        link = dashboard_link(client, cfg)
        echo(f"cluster: {what}; dashboard: {link or 'disabled'}")
        yield client
