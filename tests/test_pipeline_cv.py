"""The cv pipeline end to end on real Dask clusters: the example config against the library call,
config validation, and a run killed part-way then resumed through the real CLI."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import yaml

import dnmf
from dnmf.config import load_config
from dnmf.datasets import load_hawaiibirds
from dnmf.exceptions import ConfigError
from dnmf.jobs import RunStore, run_job
from jobkill import kill_after_tasks, run_cli

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.ConvergenceWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            distributed.Client(cl) as c:
        yield c


def test_example_config_matches_the_library_call(tmp_path, client):
    cfg = load_config(ROOT / "configs" / "cv.yaml", [f"output.dir={tmp_path / 'runs'}", "progress=none",
                                                      "cv.k=[2, 4, 6, 8]", "cv.cv_seed=[1, 2]"])
    res = run_job(cfg, client=client, echo=quiet)
    store = RunStore.open(res.store)
    assert store.is_complete
    ref = dnmf.nmf(load_hawaiibirds().X, [2, 4, 6, 8], cv_seed=[1, 2], test_fraction=0.1, tol=cfg.model.tol,
                   maxit=cfg.model.maxit, client=False)
    table = store.read_table("cv")
    # the same fits (same held-out entries, same SplitMix64 starts) as tasks: bitwise the library's
    for col in ref.table.columns:
        np.testing.assert_array_equal(table[col].to_numpy(), ref.table[col].to_numpy())
    assert set(table["attempt"]) == {1}
    assert store.read_group("selection")["best_k"] == ref.best_k
    hist = store.read_group("histories")
    np.testing.assert_array_equal(hist["test_r2_k6"], ref.histories[(2, 6)][1])
    model = store.read_group("model")
    assert model["w"].shape == (183, ref.best_k) and model["k"] == ref.best_k
    for name in ("cv", "iterations"):
        p = pathlib.Path(cfg.output.dir) / f"cv-{name}.png"
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("overrides, message", [
    (["cv.k=[2, 2]"], "'cv.k'"),
    (["cv.cv_seed=[1, 1]"], "'cv.cv_seed'"),
    (["cv.test_fraction=0"], "'cv.test_fraction'"),
    (["cv.k=[2, 500]"], "'cv.k'"),
    (["model.seed=3"], "'model.seed'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "cv.yaml", overrides)


KS = [2, 3, 4, 5, 6]


def resume_config(tmp_path):
    data = {"pipeline": "cv", "name": "cv_resume", "input": {"dataset": "hawaiibirds"},
            "cv": {"k": KS, "cv_seed": [1, 2], "refit": False},
            "model": {"tol": 1e-4, "maxit": 100},
            # one worker thread: the fits run one after another, so the kill lands between them
            "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "processes": False,
                        "dashboard_address": None},
            "output": {"dir": "runs", "plots": False, "performance_report": False}, "progress": "log"}
    path = tmp_path / "cv_resume.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_run_resumes_without_recomputing_finished_fits(tmp_path, monkeypatch):
    cfg_path = resume_config(tmp_path)
    store = tmp_path / "runs" / "cv_resume.zarr"
    finished = kill_after_tasks(cfg_path, tmp_path, store, 2)
    assert 2 <= len(finished) < 2 * len(KS)
    resumed = run_cli(["run", str(cfg_path), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(finished)} of {2 * len(KS)} tasks already finished; skipping them" in resumed.stderr
    run = RunStore.open(store)
    table = run.read_table("cv")
    keys = [f"r{r}-k{k}" for r, k in zip(table["rep"], table["k"])]
    assert list(table["attempt"]) == [1 if key in finished else 2 for key in keys]
    ref = dnmf.nmf(load_hawaiibirds().X, KS, cv_seed=[1, 2], test_fraction=0.1, client=False).table
    for col in ref.columns:  # as an uninterrupted run: bitwise
        np.testing.assert_array_equal(table[col].to_numpy(), ref[col].to_numpy())
