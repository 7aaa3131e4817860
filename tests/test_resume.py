"""Interrupted runs: SIGKILL of `dnmf run` part-way, a killed worker, `--resume`, completion marker.

A run killed part-way must leave a store that does not look complete; `dnmf run CONFIG
--resume` continues from its checkpoints (finished sweep tasks are skipped) and ends with the
same results as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest
import yaml

import dnmf
from dnmf.config import JobConfig
from dnmf.jobs import RunStore, run_job
from jobkill import done_tasks, kill_when, run_cli, start_run

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.ConvergenceWarning")


def quiet(msg):
    pass


def store_status(path: pathlib.Path):
    f = path / "zarr.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())["attributes"]["dnmf_run"]["status"]


# ---------------------------------------------------------------------------------------------
# nmfre: a sweep killed part-way; finished tasks are skipped on resume
# ---------------------------------------------------------------------------------------------

RATES = [round(0.1 * i, 1) for i in range(1, 31)]


def nmfre_config(tmp_path, name="ortho"):
    data = {"pipeline": "nmfre", "name": name, "input": {"dataset": "orthodont"},
            "model": {"rank": 1, "df_rate": 0.2, "prefix": "Trend"}, "scan": {"rates": RATES},
            "inference": {"wild_B": 40},
            "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "processes": False,
                        "dashboard_address": None},
            "output": {"dir": "runs", "plots": False, "performance_report": False}, "progress": "log"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_nmfre_sweep_killed_then_resumed(tmp_path, monkeypatch):
    cfg_path = nmfre_config(tmp_path)
    store = tmp_path / "runs" / "ortho.zarr"
    proc = start_run(["run", str(cfg_path)], tmp_path)
    assert kill_when(proc, lambda: len(done_tasks(store)) >= 2), "the run finished before it could be killed"
    finished = done_tasks(store)
    assert 2 <= len(finished) < len(RATES) or "fit" in finished
    # an interrupted run never looks complete
    assert store_status(store) == "running"
    info = run_cli(["info", str(store)], tmp_path)
    assert info.returncode == 0 and "status:    running — not complete" in info.stdout
    # without --resume the interrupted run is protected
    again = run_cli(["run", str(cfg_path)], tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().endswith(
        f"dnmf: error: An interrupted run exists at '{pathlib.Path('runs/ortho.zarr')}' (status 'running'). "
        "Pass --resume to continue it from its last checkpoint, or --overwrite to start over.")
    n_scan_done = sum(t.startswith("scan-") for t in finished)
    resumed = run_cli(["run", str(cfg_path), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if n_scan_done < len(RATES):
        assert f"dfU scan: {n_scan_done} of {len(RATES)} tasks already finished; skipping them" in resumed.stderr
    assert store_status(store) == "complete"
    assert RunStore.open(store).meta["attempts"] == 2
    # the same results as an uninterrupted run of the same config
    ref_cfg = JobConfig.from_dict({**yaml.safe_load(cfg_path.read_text()), "name": "ref"})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        monkeypatch.chdir(tmp_path)
        ref = run_job(ref_cfg, client=client, echo=quiet)
    a, b = RunStore.open(store), RunStore.open(tmp_path / ref.store)
    for col in ("dfU", "tau2", "sigma2", "ICC"):
        np.testing.assert_array_equal(a.read_table("scan")[col], b.read_table("scan")[col])
    fa, fb = a.read_group("nmfre"), b.read_group("nmfre")
    for key in ("X", "C", "U", "C_se", "C_se_boot", "C_ci_lower"):
        np.testing.assert_array_equal(fa[key], fb[key])  # deterministic tasks: bitwise equal


def test_resume_of_a_complete_run_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig.from_dict({**yaml.safe_load(nmfre_config(tmp_path).read_text()),
                               "scan": {"enabled": False}, "inference": {"enabled": False}})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        first = run_job(cfg, client=client, echo=quiet)
        lines = []
        again = run_job(cfg, client=client, resume=True, echo=lines.append)
        assert again.skipped and lines == [f"the run at {cfg.store_path} is already complete; nothing to resume"]
        with pytest.raises(dnmf.DnmfError, match="A complete run already exists at"):
            run_job(cfg, client=client, echo=quiet)
        # a changed model cannot resume another run's store
        changed = JobConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "rank": 2}})
        RunStore.open(first.store).update_meta(status="running")
        with pytest.raises(dnmf.ConfigError) as info:
            run_job(changed, client=client, resume=True, echo=quiet)
        assert "its config differs (model.rank: run has 1, config has 2)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# factorize: SIGKILL of `dnmf run`, and a worker killed through the client
# ---------------------------------------------------------------------------------------------


def factorize_data(tmp_path, name, **cluster):
    return {"pipeline": "factorize", "name": name,
            "input": {"synthetic": {"m": 1500, "n": 2000, "density": 0.05, "k": 6, "seed": 11, "block_nnz": 15000},
                      "path": str(tmp_path / "input.zarr")},
            "model": {"k": 6, "maxit": 60, "tol": 0, "seed": 4, "block_nnz": 15000},
            "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "processes": False,
                        "dashboard_address": None, **cluster},
            "checkpoint": {"every": 2},
            "output": {"dir": str(tmp_path / "runs"), "plots": False, "performance_report": False},
            "progress": "log"}


@pytest.fixture(scope="module")
def reference_fit(tmp_path_factory):
    """The uninterrupted run (in-process, 2 worker threads)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = JobConfig.from_dict(factorize_data(tmp, "ref"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        res = run_job(cfg, client=client, echo=quiet)
    return tmp, RunStore.open(res.store).read_group("model")


def checkpoint_iteration(store: pathlib.Path):
    f = store / "checkpoint" / "nmf" / "zarr.json"
    if not f.is_file():
        return None
    attrs = json.loads(f.read_text())["attributes"]
    return attrs.get("iteration") if attrs.get("slot") else None


def test_sigkill_of_dnmf_run_then_resume(tmp_path, reference_fit):
    ref_dir, ref = reference_fit
    shutil_copy_input(ref_dir, tmp_path)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(factorize_data(tmp_path, "job")))
    store = tmp_path / "runs" / "job.zarr"
    proc = start_run(["run", str(cfg_path)], tmp_path)
    assert kill_when(proc, lambda: (checkpoint_iteration(store) or 0) >= 6), "the fit ended before the kill"
    at_kill = checkpoint_iteration(store)
    assert 6 <= at_kill < 60 and store_status(store) == "running"
    assert RunStore.open(store).is_stale() and not RunStore.open(store).is_complete  # its process is gone
    assert not (store / "model").exists()  # no results yet: nothing looks finished
    resumed = run_cli(["run", str(cfg_path), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run at" in resumed.stderr
    assert f"fit: resuming at {at_kill}/60 it" in resumed.stderr
    assert store_status(store) == "complete"
    model = RunStore.open(store).read_group("model")
    # the loop is deterministic given the checkpointed state: bitwise the uninterrupted factors
    for key in ("w", "d", "h", "loss_history"):
        np.testing.assert_array_equal(model[key], ref[key])
    assert model["iter"] == 60


def shutil_copy_input(src_dir, dst_dir):
    """Reuse the generated input store (generation is not what these tests time)."""
    import shutil

    shutil.copytree(src_dir / "input.zarr", dst_dir / "input.zarr")


def test_killed_worker_process_is_recovered(tmp_path, reference_fit, monkeypatch):
    ref_dir, ref = reference_fit
    shutil_copy_input(ref_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig.from_dict(factorize_data(tmp_path, "wk"))
    store = tmp_path / "runs" / "wk.zarr"
    killed = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        pids = client.run(os.getpid)

        def kill_one_worker():
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120:
                if (checkpoint_iteration(store) or 0) >= 4:
                    addr, pid = sorted(pids.items())[0]
                    killed.update(addr=addr, pid=pid, at=checkpoint_iteration(store), status=store_status(store))
                    os.kill(pid, signal.SIGKILL)  # the worker process found through the client
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        res = run_job(cfg, client=client, echo=quiet)
        killer.join()
        client.wait_for_workers(2, timeout=60)
        new_pids = set(client.run(os.getpid).values())
    assert killed and killed["status"] == "running" and killed["at"] < 60  # killed part-way
    assert killed["pid"] not in new_pids  # the nanny replaced the dead worker
    model = RunStore.open(res.store).read_group("model")
    # lost H blocks are rebuilt by a cold solve; the default (Cholesky) solver ignores warm starts,
    # so the factors are bitwise those of the uninterrupted run
    for key in ("w", "d", "h", "loss_history"):
        np.testing.assert_array_equal(model[key], ref[key])
