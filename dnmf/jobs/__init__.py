"""Job runner behind the ``dnmf`` command: config → cluster → pipeline → run store (DESIGN §7).

* :func:`run_job` runs a validated :class:`dnmf.config.JobConfig`;
* :class:`Job` is what a pipeline receives (store, client, checkpoints, progress, plots);
* :class:`RunStore` reads and writes a run's Zarr store;
* :func:`jobqueue_cluster` builds the SLURM/PBS cluster of a config (``job_script()``).

This package belongs to the job layer: it runs the pipelines registered under the
``dnmf.pipelines`` entry-point group (:func:`dnmf.config.get_pipeline`) and never imports the
``pipelines`` package by name.
"""

from .cluster import connect, jobqueue_cluster, local_cluster
from .progress import Progress
from .runner import Job, RunResult, package_versions, run_job
from .store import RunStore

__all__ = ["run_job", "Job", "RunResult", "RunStore", "Progress", "connect", "jobqueue_cluster", "local_cluster",
           "package_versions"]
