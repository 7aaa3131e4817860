"""The size-probe warning of distributed ("Sizeof calculation ... Defaulting to -1 B") is not
printed by ``dnmf run`` with a performance report; other sizeof warnings stay visible."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from dnmf.jobs.cluster import SizeofProbeFilter, install_sizeof_filter

pytest.importorskip("distributed")


def _record(msg) -> logging.LogRecord:
    return logging.LogRecord("distributed.sizeof", logging.WARNING, __file__, 1, msg, None, None)


def test_filter_drops_only_the_offload_probe_message():
    f = SizeofProbeFilter()
    # distributed logs a 1-tuple as the message (safe_sizeof's trailing comma)
    assert not f.filter(_record(("Sizeof calculation for object of type 'dict' failed. Defaulting to -1 B",)))
    assert f.filter(_record(("Sizeof calculation for object of type 'Foo' failed. Defaulting to 0.95 MiB",)))
    install_sizeof_filter()
    install_sizeof_filter()  # idempotent
    filters = logging.getLogger("distributed.sizeof").filters
    assert sum(isinstance(x, SizeofProbeFilter) for x in filters) == 1


def test_dnmf_run_with_performance_report_prints_no_sizeof_warning(tmp_path):
    # Worker processes (TCP comms serialize every message; the report's nested profile messages
    # make dask's sizeof recurse too deep): without the filter this printed the warning 1-2 times.
    (tmp_path / "job.yaml").write_text(f"""\
pipeline: factorize
name: rep
input:
  synthetic: {{m: 300, n: 400, density: 0.05, k: 4, seed: 5, block_nnz: 1000}}
  path: {tmp_path / "input.zarr"}
model: {{k: 4, maxit: 3, tol: 0, seed: 3, block_nnz: 1000}}
cluster: {{kind: local, n_workers: 2, threads_per_worker: 1, processes: true, dashboard_address: null}}
output: {{dir: {tmp_path / "runs"}, plots: false, performance_report: true}}
progress: none
""")
    res = subprocess.run([sys.executable, "-m", "dnmf", "run", "job.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "rep-report.html").exists()
    assert "Sizeof calculation" not in res.stderr
