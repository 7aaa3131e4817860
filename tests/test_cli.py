"""The ``dnmf`` command: help texts, validate, convert, info, exit codes and the SLURM/PBS job scripts."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

import dnmf
from dnmf.cli import main
from dnmf.config import JobConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's --help / usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# Entry points and help
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [["dnmf"], [sys.executable, "-m", "dnmf"]], ids=["console-script", "python-m"])
def test_entry_points(cmd):
    if cmd[0] == "dnmf" and shutil.which("dnmf") is None:
        pytest.skip("the console script is not on PATH (package not installed)")
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for command in ("run", "validate", "convert", "info"):
        assert command in res.stdout
    res = subprocess.run(cmd + ["validate", "--list"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split()[0] == "consensus"


@pytest.mark.parametrize("command, must_have", [
    ("run", ["--resume", "--overwrite", "--set KEY=VALUE", "pipeline: factorize", "checkpoint", "<output.dir>/<name>.zarr",
             "dnmf run configs/quickstart.yaml"]),
    ("validate", ["--show", "--list", "--explain", "unknown keys"]),
    ("convert", ["--block-nnz", ".mtx", ".h5ad", "chunk boundary", "every chunk written", "OUTPUT.zarr"]),
    ("info", ["--config", "--json", "status"]),
])
def test_each_command_help_stands_alone(command, must_have, capsys):
    rc, out, _ = run_main([command, "--help"], capsys)
    assert rc == 0
    for text in must_have:
        assert text in out, text


def test_usage_errors_exit_2(capsys):
    rc, _, err = run_main(["run"], capsys)
    assert rc == 2 and "CONFIG.yaml" in err
    rc, _, err = run_main(["frobnicate"], capsys)
    assert rc == 2 and "invalid choice" in err


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_validate_ok_prints_resolved_config(workdir, capsys):
    np.save(workdir / "a.npy", np.ones((4, 3)))
    cfg = write_config(workdir / "job.yaml", {"pipeline": "factorize", "input": {"path": "a.npy"}, "model": {"k": 2}})
    rc, out, err = run_main(["validate", cfg, "--show", "--set", "model.maxit=7"], capsys)
    assert rc == 0, err
    first, rest = out.split("\n", 1)
    assert first == f"{cfg}: valid factorize job 'job' -> runs/job.zarr"
    resolved = yaml.safe_load(rest)
    assert resolved["model"]["maxit"] == 7 and resolved["model"]["tol"] == 1e-4
    assert JobConfig.from_dict(resolved) == load_config(cfg, ["model.maxit=7"])


def test_validate_reports_config_errors_with_exit_2(workdir, capsys):
    cfg = write_config(workdir / "job.yaml", {"pipeline": "factorize", "input": {"path": "missing.mtx"},
                                              "model": {"k": 2}})
    rc, out, err = run_main(["validate", cfg], capsys)
    assert rc == 2 and out == ""
    assert err == ("dnmf: config error: The config key 'input.path' must be an existing file or directory. "
                   "Got 'missing.mtx' instead.\n")
    rc, _, err = run_main(["validate", str(workdir / "nope.yaml")], capsys)
    assert rc == 2 and err.startswith("dnmf: config error: The config file ")


def test_validate_list_and_explain(capsys):
    rc, out, _ = run_main(["validate", "--list"], capsys)
    lines = out.strip().splitlines()
    assert rc == 0 and [ln.split()[0] for ln in lines] == ["consensus", "cv", "factorize", "guided", "nmfre"]
    rc, out, _ = run_main(["validate", "--explain", "nmfre"], capsys)
    assert rc == 0
    assert "model.df_rate: 'scan' or a float in (0.0, inf) (default 'scan')" in out
    assert "inference.wild_B: an int in [2, inf) (default 500) — bootstrap replicates" in out
    assert "cluster.memory_limit:" in out and "cluster.walltime:" in out
    rc, _, err = run_main(["validate", "--explain", "cnmf"], capsys)
    assert rc == 2 and "Unknown pipeline 'cnmf'; available: consensus, cv, factorize, guided, nmfre." in err


# ---------------------------------------------------------------------------------------------
# SLURM / PBS job scripts (no scheduler needed)
# ---------------------------------------------------------------------------------------------


def test_slurm_example_produces_a_valid_sbatch_script(workdir):
    from dnmf.jobs import jobqueue_cluster

    cfg = load_config(ROOT / "configs" / "slurm.yaml", ["cluster.dashboard_address=:0"])
    with jobqueue_cluster(cfg.cluster) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    for d in ("#SBATCH -J dnmf-pbmc3k", "#SBATCH -e runs/slurm-logs/dnmf-pbmc3k-%J.err", "#SBATCH -p compute", "#SBATCH -A my-project", "#SBATCH -n 1",
              "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH -t 02:00:00", "#SBATCH --exclusive"):
        assert d in directives, d
    # sbatch reads directives only before the first command
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert lines[first_cmd:first_cmd + 2] == ["module load python/3.11", 'source "$HOME/venvs/dnmf/bin/activate"']
    worker = next(ln for ln in lines if "distributed.cli.dask_worker" in ln)
    # 8 cores and 32 GiB per job shared by 2 worker processes: 4 threads and 16 GiB each
    for arg in ("--nworkers 2", "--nthreads 4", "--memory-limit 16.00GiB", "--local-directory /tmp"):
        assert arg in worker, arg
    res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # shell syntax of the script
    # dnmf's cluster settings reach the workers as Dask environment variables, after the user's
    # prologue and only where the job's environment has none
    exports = [ln for ln in lines if ln.startswith("export DASK_")]
    assert exports == ['export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL="${DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL:-100ms}"',
                       'export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL="${DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL:-200ms}"']
    assert lines.index(exports[0]) == first_cmd + 2 and lines.index(exports[1]) < lines.index(worker)
    shown = subprocess.run(["bash", "-c", "\n".join(exports) + "\necho $DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL "
                            "$DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "50ms"})
    assert shown.stdout.split() == ["100ms", "50ms"]
    # ... and Dask's config reads them as the keys they stand for
    import dask

    for ln, key in zip(exports, ("distributed.worker.profile.interval", "distributed.admin.tick.interval")):
        var = ln.split()[1].split("=")[0]
        assert dask.config.get(key, config=dask.config.collect(paths=[], env={var: "7ms"})) == "7ms"


def test_pbs_job_script(workdir):
    from dnmf.jobs import jobqueue_cluster

    cfg = load_config(ROOT / "configs" / "slurm.yaml", ["cluster.kind=pbs", "cluster.dashboard_address=null",
                                                        "cluster.job_extra_directives=[]"])
    with jobqueue_cluster(cfg.cluster) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for d in ("#PBS -N dnmf-pbmc3k", "#PBS -q compute", "#PBS -A my-project", "#PBS -l select=1:ncpus=8:mem=32GB",
              "#PBS -l walltime=02:00:00"):
        assert d in lines, d
    assert "--nworkers 2" in script and "--nthreads 4" in script
    res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# convert and info
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix():
    return sp.random(60, 45, density=0.2, random_state=np.random.default_rng(4), format="csc", dtype=np.float64)


def _write_input(kind, path, A):
    if kind == "mtx":
        scipy.io.mmwrite(str(path), A)
    elif kind == "npz":
        sp.save_npz(str(path), A.tocsc())
    elif kind == "npy":
        np.save(str(path), A.toarray())
    elif kind == "h5ad":
        import anndata

        anndata.AnnData(X=sp.csr_matrix(A.T)).write_h5ad(str(path))  # cells × genes
    elif kind == "zarr":
        dnmf.io.write_zarr(A, str(path), block_nnz=100)


@pytest.mark.parametrize("kind", ["mtx", "npz", "npy", "h5ad", "zarr"])
def test_convert_round_trips_every_format(kind, matrix, workdir, capsys):
    src = workdir / f"in.{kind}"
    _write_input(kind, src, matrix)
    rc, out, err = run_main(["convert", str(src), "out.zarr", "--block-nnz", "150"], capsys)
    assert rc == 0, err
    back = dnmf.io.as_blocked("out.zarr")
    assert back.shape == (60, 45)
    # nnz-balanced blocks: each block holds about 150 stored entries (a block ends at a column
    # boundary, so it may exceed the target by at most one column's entries)
    col_nnz = np.diff(matrix.tocsc().indptr) if back.sparse else np.full(45, 60)
    assert max(s.nnz for s in back.sources) <= 150 + col_nnz.max()
    np.testing.assert_array_equal(sp.csc_array(back.to_scipy()).toarray() if back.sparse else back.to_scipy(),
                                  matrix.toarray())
    assert out.startswith("wrote out.zarr: 60 × 45 ")
    rc, out, _ = run_main(["info", "out.zarr"], capsys)
    assert rc == 0 and out.startswith("out.zarr: a Zarr store (not a dnmf run)")


def test_convert_errors(workdir, capsys):
    rc, _, err = run_main(["convert", "nope.mtx", "out.zarr"], capsys)
    assert rc == 1 and err == "dnmf: error: INPUT 'nope.mtx' does not exist.\n"
    np.save(workdir / "a.npy", np.ones((3, 3)))
    (workdir / "out.zarr").mkdir()
    rc, _, err = run_main(["convert", "a.npy", "out.zarr"], capsys)
    assert rc == 1 and err == "dnmf: error: OUTPUT 'out.zarr' exists; pass --overwrite to replace it.\n"


def test_info_errors(workdir, capsys):
    rc, _, err = run_main(["info", "nowhere.zarr"], capsys)
    assert rc == 1 and err == "dnmf: error: STORE 'nowhere.zarr' does not exist.\n"


def test_module_does_not_import_pipelines_from_the_library():
    """The numerical library never imports the job layer (DESIGN §2)."""
    code = ("import sys, dnmf, dnmf.io, dnmf.datasets, dnmf.core; "
            "bad = [m for m in sys.modules if m == 'pipelines' or m.startswith(('pipelines.', 'dnmf.jobs', "
            "'dnmf.config', 'dnmf.cli'))]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_info_shows_status_error_and_kept_checkpoint(workdir, capsys, monkeypatch):
    from dnmf.jobs.store import RunStore

    store = RunStore.create("r.zarr", {"name": "r", "pipeline": "factorize"})
    store.mark_stopped("failed", "ValueError: boom")
    rc, out, _ = run_main(["info", "r.zarr"], capsys)
    assert rc == 0 and "status:    failed — not complete" in out and "error:     ValueError: boom" in out
    store.update_meta(status="complete")  # no completion marker: not complete, whatever the status says
    rc, out, _ = run_main(["info", "r.zarr"], capsys)
    assert "status:    complete — not complete" in out
    store.mark_complete()
    monkeypatch.setattr(RunStore, "extendable_checkpoints", lambda self: {"nmf": 7})
    rc, out, _ = run_main(["info", "r.zarr"], capsys)
    assert "status:    complete\n" in out and "error:" not in out
    assert ("checkpoint: nmf at iteration 7 (kept: --resume with a larger model.maxit continues the fit)"
            in out)


def test_null_dashboard_address_starts_no_dashboard_and_takes_no_fixed_port():
    import socket
    import warnings

    import distributed

    from dnmf.config import LocalClusterConfig
    from dnmf.jobs.cluster import dashboard_link, local_cluster

    cfg = LocalClusterConfig(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    with socket.socket() as busy:
        try:  # hold 8787 (when free) so a cluster that wanted it would warn
            busy.bind(("0.0.0.0", 8787))
            busy.listen()
        except OSError:
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with local_cluster(cfg) as cluster, distributed.Client(cluster) as client:
                assert dashboard_link(client, cfg) is None
    assert not [w for w in caught if "8787" in str(w.message)]


def test_cluster_settings_reach_the_scheduler_nannies_and_worker_processes_unless_the_user_set_them():
    """The clusters dnmf starts wake their event loops less often (jobs/cluster.py::CLUSTER_SETTINGS:
    docs/architecture.md, "Cluster overhead"); a key of the user's Dask config is left as it is."""
    import dask
    import distributed

    from dnmf.config import LocalClusterConfig
    from dnmf.jobs.cluster import cluster_settings, local_cluster

    assert cluster_settings() == {"distributed.worker.profile.interval": "100ms",
                                  "distributed.admin.tick.interval": "200ms"}
    cfg = LocalClusterConfig(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with dask.config.set({"distributed.worker.profile.interval": "30 ms"}):  # the user's own setting
        assert cluster_settings() == {"distributed.admin.tick.interval": "200ms"}
        with local_cluster(cfg) as cluster, distributed.Client(cluster) as client:
            # PeriodicCallback.callback_time is in milliseconds
            periods = client.run(lambda dask_worker: (dask_worker.periodic_callbacks["profile"].callback_time,
                                                      dask_worker.periodic_callbacks["tick"].callback_time))
            assert sorted(periods.values()) == [(30, 200), (30, 200)]
            assert [n.periodic_callbacks["tick"].callback_time for n in cluster.workers.values()] == [200, 200]
            assert cluster.scheduler.periodic_callbacks["tick"].callback_time == 200
    # the settings were set for the cluster's making only
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"


def test_validate_imports_only_the_pipeline_it_needs():
    """`dnmf validate` finds pipelines through their entry points: --list reads docstrings from
    source, and a factorize config never imports the NMF-RE pipeline (scipy.stats, numba)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys; from dnmf.cli import main; main(['validate', '--list']); "
            f"main(['validate', {str(root / 'configs' / 'quickstart.yaml')!r}]); "
            "print(sorted(m for m in sys.modules if m.startswith('pipelines.') or m == 'scipy.stats'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "['pipelines.factorize']"
