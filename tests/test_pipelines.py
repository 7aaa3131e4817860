"""Pipelines end to end on a real Dask cluster: every example config at reduced size, outputs
checked against direct library calls and published numbers (spec/nmfre.md §11.1)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.config import JobConfig, load_config
from dnmf.jobs import RunStore, run_job

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.ConvergenceWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def client():
    """Two in-process workers (threads) shared by the in-process runs of this file."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cl, \
            distributed.Client(cl) as c:
        yield c


def example(name, tmp_path, overrides=()):
    """An example config with output in tmp_path and no progress output."""
    return load_config(ROOT / "configs" / name, [f"output.dir={tmp_path / 'runs'}", "progress=none", *overrides])


def quiet(msg):
    pass


def assert_png(path):
    p = pathlib.Path(path)
    assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000


# ---------------------------------------------------------------------------------------------
# The pipeline registry
# ---------------------------------------------------------------------------------------------


def test_registry_is_discovered_from_the_package():
    import pipelines

    names = pipelines.pipeline_names()
    assert names == sorted(p.stem for p in (ROOT / "pipelines").glob("[!_]*.py"))
    for name in names:
        mod = pipelines.get_pipeline(name)
        assert callable(mod.run) and isinstance(mod.SECTIONS, dict) and mod.__doc__
    with pytest.raises(KeyError, match="unknown pipeline 'rank_cv'; available: consensus, cv, factorize, guided, nmfre"):
        pipelines.get_pipeline("rank_cv")


def test_entry_points_register_every_pipeline_module():
    """The job layer finds pipelines through the "dnmf.pipelines" entry points: exactly this package's modules."""
    import pipelines
    from dnmf.config import get_pipeline, pipeline_names

    assert pipeline_names() == pipelines.pipeline_names()
    for name in pipeline_names():
        assert get_pipeline(name) is pipelines.get_pipeline(name)
    with pytest.raises(KeyError, match="unknown pipeline 'rank_cv'; available: consensus, cv, factorize, guided, nmfre"):
        get_pipeline("rank_cv")


def test_pipelines_import_only_the_public_api():
    """pipelines/ imports the public dnmf API (and third-party packages), nothing internal.

    Besides `dnmf`, `dnmf.io`, `dnmf.preprocess` and `dnmf.datasets`: `dnmf.core` (``default_block_nnz``),
    `dnmf.params` (the factorize ``model:`` section is built from ``NMF_PARAMS``) and the
    NMF-RE scan's ``choose_rate`` / ``DEFAULT_RATES``, imported rather than copied; `dnmf.cv`
    (public: the rank-CV grid, ``CVResult``) for the cv pipeline; `dnmf.anndata` (public:
    ``read_annotations`` for AnnData inputs).
    """
    import ast

    allowed = {"dnmf", "dnmf.io", "dnmf.preprocess", "dnmf.datasets", "dnmf.datasets.orthodont", "dnmf.core", "dnmf.params", "dnmf.mixed.scan",
               "dnmf.mixed.nmfre", "dnmf.cv", "dnmf.anndata"}
    for path in (ROOT / "pipelines").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for mod in mods:
                if mod.split(".")[0] == "dnmf":
                    assert mod in allowed, f"{path.name} imports {mod}"


# ---------------------------------------------------------------------------------------------
# nmfre: the Orthodont vignette as a job
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthodont():
    from dnmf.datasets.orthodont import load_orthodont

    data = load_orthodont()
    return data.Y_frame(), data.A_frame()


@pytest.fixture(scope="module")
def orthodont_run(tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("nmfre")
    cfg = example("orthodont_nmfre.yaml", tmp)
    res = run_job(cfg, client=client, echo=quiet)
    return cfg, res


def test_orthodont_example_reproduces_the_vignette(orthodont_run):
    cfg, res = orthodont_run
    store = RunStore.open(res.store)
    assert store.is_complete
    fit = store.read_group("nmfre")
    # spec/nmfre.md §11.1 (R, 2026-03 vignette); the published digits bound the tolerance
    np.testing.assert_allclose(fit["C"].ravel(), [90.3934445441859, 9.60587908383286], rtol=1e-9)
    np.testing.assert_allclose(fit["X"].ravel(), [0.230772198161489, 0.240894810660416, 0.256605321793731,
                                                  0.271727669384363], rtol=1e-9)
    np.testing.assert_allclose(fit["objfunc_iter"], [459.580206744933, 459.577493024158], rtol=1e-10)
    assert fit["n_iter"] == 2 and fit["stop_reason"] == "epsilon" and fit["df_rate_used"] == 0.2
    np.testing.assert_allclose([fit["tau2"], fit["ICC"], fit["r_squared"], fit["r_squared_fixed"]],
                               [0.9961397805, 0.0588234280, 0.5653683, 0.4166567], rtol=1e-7)
    coef = store.read_table("coefficients")
    assert list(coef["Covariate"]) == ["intercept", "male"] and list(coef["Basis"]) == ["Trend1", "Trend1"]
    # sandwich SE (7 significant digits published) and, with R's streams, the bootstrap SE and CI
    np.testing.assert_allclose(coef["SE"], [2.471312, 3.056105], rtol=5e-7)
    np.testing.assert_allclose(coef["BSE"], [2.452398, 2.976947], rtol=5e-7)
    np.testing.assert_allclose(coef["CI_low"], [85.496587, 3.743182], rtol=5e-7)
    np.testing.assert_allclose(coef["p_value"], [3.306544e-293, 8.356231e-04], rtol=5e-7)
    summary = store.meta["texts"]["summary"]
    assert "intercept:Trend1    90.393      2.471  2.452   36.58   <2e-16 ***" in summary
    assert "     male:Trend1     9.606      3.056  2.977    3.14 0.0008356 ***" in summary


def test_orthodont_scan_table_matches_the_library_and_the_spec(orthodont_run, orthodont):
    from pipelines.nmfre import choose_rate

    cfg, res = orthodont_run
    table = RunStore.open(res.store).read_table("scan")
    Y, A = orthodont
    ref = dnmf.nmfre_dfu_scan(list(cfg.scan.rates), Y, A, rank=1, client=False)  # one library call, threads
    np.testing.assert_array_equal(table["dfU"], ref.table["dfU"])
    np.testing.assert_array_equal(table["tau2"], ref.table["tau2"])
    assert list(table["safeguard"]) == list(ref.table["safeguard"])
    assert list(table["hit"]) == list(ref.table["hit"])
    # the published scan (§11.1)
    np.testing.assert_array_equal(table["dfU"], [2.70, 5.40] + [5.42] * 8)
    assert list(table["safeguard"]) == [False, False] + [True] * 8
    assert choose_rate(table) == ref.cap_rate == 0.3


def test_nmfre_pipeline_uses_the_library_scan_choice_and_rates():
    import importlib

    import pipelines.nmfre

    scan = importlib.import_module("dnmf.mixed.scan")
    library = importlib.import_module("dnmf.mixed.nmfre")  # the module (dnmf.mixed.nmfre is also a function)
    assert pipelines.nmfre.choose_rate is scan.choose_rate  # imported, not copied
    assert pipelines.nmfre.DEFAULT_RATES == tuple(float(r) for r in library.DEFAULT_RATES)
    assert all(type(r) is float for r in pipelines.nmfre.DEFAULT_RATES)  # plain YAML floats in a resolved config


def test_choose_rate_rules():
    import pandas as pd

    from pipelines.nmfre import choose_rate

    def table(rows):
        return pd.DataFrame(rows, columns=["rate", "safeguard", "hit", "converged"])

    # rule 1: the largest rate with safeguard & hit & converged
    assert choose_rate(table([(0.1, True, True, True), (0.2, True, True, True), (0.3, True, False, True)])) == 0.2
    # rule 2: else the smallest with safeguard & ~hit & converged
    assert choose_rate(table([(0.1, False, True, True), (0.4, True, False, True), (0.3, True, False, True)])) == 0.3
    # NA safeguard never qualifies; nothing qualifies -> NaN
    assert np.isnan(choose_rate(table([(0.1, None, True, True), (0.2, True, False, False)])))


def test_orthodont_outputs_and_record(orthodont_run):
    cfg, res = orthodont_run
    store = RunStore.open(res.store)
    meta = store.meta
    assert meta["config"] == cfg.to_dict() and JobConfig.from_dict(meta["config"]) == cfg
    assert meta["versions"]["dnmf"] == dnmf.__version__ and meta["versions"]["numpy"] == np.__version__
    assert meta["seeds"] == {"nmfkc_init": 1, "wild_bootstrap": 123}
    names = sorted(pathlib.Path(f).name for f in res.files)
    assert names == sorted(["orthodont_nmfre-summary.txt", "orthodont_nmfre-convergence.png",
                            "orthodont_nmfre-growth_curves.png", "orthodont_nmfre-random_effects.png",
                            "orthodont_nmfre-report.html"])
    for f in res.files:
        if f.suffix == ".png":
            assert_png(f)
    report = next(f for f in res.files if f.suffix == ".html").read_text()
    assert "<html" in report.lower() and "Dask Performance Report" in report
    assert not (res.store / "checkpoint").exists()  # checkpoints are removed once the run is complete


def test_orthodont_automatic_rate(tmp_path, client, orthodont):
    cfg = example("orthodont_nmfre.yaml", tmp_path, ["model.df_rate=scan", "scan.rates=[0.2, 0.3, 0.5]",
                                                     "inference.enabled=false", "output.plots=false",
                                                     "output.performance_report=false", "model.r_rng=false"])
    res = run_job(cfg, client=client, echo=quiet)
    fit = RunStore.open(res.store).read_group("nmfre")
    assert fit["df_rate_used"] == 0.3 and fit["df_rate_source"] == "scan"
    Y, A = orthodont
    ref = dnmf.nmfre(Y, A, rank=1, df_rate=0.3, prefix="Trend", wild_bootstrap=False)
    np.testing.assert_array_equal(fit["C"], ref.C)
    np.testing.assert_array_equal(fit["U"], ref.U)
    np.testing.assert_allclose(fit["tau2"], 1.0, rtol=1e-3)  # spec §11.1: rate 0.3 gives tau2 = 1 (3 d.p.)
    assert [f.name for f in res.files] == ["orthodont_nmfre-summary.txt"]  # no plots, no report


def test_nmfre_csv_inputs(tmp_path, client, orthodont):
    Y, A = orthodont
    Y.to_csv(tmp_path / "y.csv")
    A.to_csv(tmp_path / "a.csv")
    data = {"pipeline": "nmfre", "name": "csv", "input": {"Y": str(tmp_path / "y.csv"), "A": str(tmp_path / "a.csv")},
            "model": {"rank": 1, "df_rate": 0.2}, "scan": {"enabled": False},
            "inference": {"wild_B": 20}, "output": {"dir": str(tmp_path), "plots": False,
                                                     "performance_report": False}, "progress": "none"}
    res = run_job(JobConfig.from_dict(data), client=client, echo=quiet)
    fit = RunStore.open(res.store).read_group("nmfre")
    np.testing.assert_allclose(fit["C"].ravel(), [90.3934445441859, 9.60587908383286], rtol=1e-9)
    assert fit["covariate_names"] == ("intercept", "male") and fit["sample_names"][:2] == ("S1", "S2")


# ---------------------------------------------------------------------------------------------
# Job infrastructure: the run store, progress displays, the synthetic generator
# ---------------------------------------------------------------------------------------------


def test_run_store_round_trips_payloads(tmp_path):
    import pandas as pd

    store = RunStore.create(tmp_path / "r.zarr", {"pipeline": "x", "name": "r"})
    assert store.status == "running" and not store.is_complete
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"name": ["a", "b"], "value": [1.5, np.nan], "flag": [True, None], "n": [1, 2]})
    payload = {"w": rng.random((4, 3)), "ints": np.arange(5), "names": np.array(["g1", "g2"]), "x": 2.5,
               "nan": float("nan"), "t": ("a", "b"), "none": None, "nested": {"k": [1, 2]}, "tab": table,
               "f32": rng.random(3).astype(np.float32)}
    store.save_task("task-1", payload)
    assert store.task_done("task-1") and not store.task_done("task-2")
    back = store.load_task("task-1")
    np.testing.assert_array_equal(back["w"], payload["w"])
    assert back["f32"].dtype == np.float32 and back["ints"].dtype == payload["ints"].dtype
    assert list(back["names"]) == ["g1", "g2"] and back["t"] == ("a", "b") and back["none"] is None
    assert back["x"] == 2.5 and np.isnan(back["nan"]) and back["nested"] == {"k": [1, 2]}
    assert list(back["tab"]["name"]) == ["a", "b"] and list(back["tab"]["flag"]) == [True, None]
    np.testing.assert_array_equal(back["tab"]["value"], [1.5, np.nan])
    assert list(back["tab"].columns) == ["name", "value", "flag", "n"]
    store.mark_complete()
    assert store.is_complete and not (tmp_path / "r.zarr" / "checkpoint").exists()
    assert RunStore.exists(tmp_path / "r.zarr") and not RunStore.exists(tmp_path)


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    import io
    import logging

    from dnmf.jobs import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress("fit", 4, stream=term) as bar:
        for i in range(1, 5):
            bar.set(i, f"loss {10 - i}")
    out = term.getvalue()
    assert bar.mode == "bar" and out.count("\r") == 5 and out.endswith("\n")
    assert "fit |" in out and "| 4/4 it" in out and "loss 6" in out
    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="dnmf.jobs"):
        with Progress("dfU scan", 3, unit="task", stream=plain, log_interval=3600) as bar:
            for _ in range(3):
                bar.update(1)
    assert bar.mode == "log" and plain.getvalue() == ""  # no control characters in a log file
    msgs = [r.getMessage() for r in caplog.records if r.name == "dnmf.jobs"]
    # first and last step always, nothing in between within the interval, then the summary
    assert msgs[:2] == ["dfU scan: 1/3 task", "dfU scan: 3/3 task"] and msgs[2].startswith("dfU scan: done, 3 task")


def test_synthetic_matrix_is_planted_and_independent_of_blocks():
    from pipelines.factorize import SyntheticInput, synthetic_matrix

    spec = SyntheticInput(m=300, n=400, density=0.05, k=4, seed=7, block_nnz=1000)
    a = synthetic_matrix(spec)
    assert a.shape == (300, 400) and a.nnz == 15 * 400 and a.n_blocks == 7
    b = synthetic_matrix(SyntheticInput(m=300, n=400, density=0.05, k=4, seed=7, block_nnz=5000))
    assert (a.to_scipy() != b.to_scipy()).nnz == 0  # same matrix whatever the block size
    full = synthetic_matrix(SyntheticInput(m=30, n=50, density=1.0, k=4, noise=0.0, seed=1)).to_scipy().toarray()
    # fully observed and noise-free: exactly rank k (float32 storage; relative tolerance of the SVD rank)
    assert np.linalg.matrix_rank(full, tol=1e-5 * np.linalg.norm(full, 2)) == 4 and full.min() > 0


# ---------------------------------------------------------------------------------------------
# factorize
# ---------------------------------------------------------------------------------------------


def factorize_config(tmp_path, name="syn", **model):
    data = {"pipeline": "factorize", "name": name,
            "input": {"synthetic": {"m": 300, "n": 400, "density": 0.05, "k": 4, "seed": 5, "block_nnz": 1000},
                      "path": str(tmp_path / "syn_input.zarr")},
            "model": {"k": 4, "maxit": 8, "tol": 0, "seed": 3, "block_nnz": 1000, **model},
            "checkpoint": {"every": 3}, "output": {"dir": str(tmp_path / "runs")}, "progress": "none"}
    return JobConfig.from_dict(data)


def test_factorize_synthetic_matches_direct_nmf(tmp_path, client):
    cfg = factorize_config(tmp_path)
    lines = []
    res = run_job(cfg, client=client, echo=lines.append)
    assert any(ln.startswith("synthetic input: generating a 300 × 400 matrix") for ln in lines)
    store = RunStore.open(res.store)
    model = store.read_group("model")
    path = cfg.input.path
    ref = dnmf.nmf(path, 4, seed=3, maxit=8, tol=0, block_nnz=1000, client=False)
    # same data, block layout and seed: the cluster run is bitwise the in-process fit
    for key in ("w", "d", "h"):
        np.testing.assert_array_equal(model[key], getattr(ref, key))
    np.testing.assert_array_equal(model["loss_history"], ref.misc["loss_history"])
    assert model["iter"] == 8 and model["converged"] is False and model["shape"] == [300, 400]
    # the recorded loss is the SSE of the stored factors against the stored matrix (scipy reference)
    A = dnmf.io.as_blocked(path).to_scipy().toarray().astype(np.float64)
    W, d, H = (model[k].astype(np.float64) for k in ("w", "d", "h"))
    sse = np.sum((A - W @ np.diag(d) @ H) ** 2)
    # float32 factors (float32 input) rounded after the float64 fit: relative error ~1e-6
    np.testing.assert_allclose(model["loss"], sse, rtol=1e-5)
    assert sorted(f.name for f in res.files) == ["syn-convergence.png", "syn-factors.png", "syn-report.html",
                                                 "syn-top-features.csv", "syn-top-features.png"]
    for f in res.files:
        if f.suffix == ".png":
            assert_png(f)
    assert store.meta["seeds"]["nmf"] == 3
    # a second run reuses the generated input; other parameters for the same path are refused
    lines.clear()
    run_job(factorize_config(tmp_path, name="syn2", maxit=2), client=client, echo=lines.append)
    assert f"synthetic input: reusing {path}" in lines
    other = JobConfig.from_dict({**cfg.to_dict(), "name": "syn3",
                                 "input": {**cfg.to_dict()["input"], "synthetic": {"m": 300, "n": 400, "density": 0.1}}})
    with pytest.raises(dnmf.InputError, match="exists but was not generated from input.synthetic"):
        run_job(other, client=client, echo=quiet)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_factorize_anndata_input_writes_anndata(fmt, tmp_path, client):
    import anndata
    import pandas as pd

    rng = np.random.default_rng(2)
    X = sp.random(120, 80, density=0.1, random_state=rng, format="csr", dtype=np.float32)  # cells × genes
    adata = anndata.AnnData(X=X, obs=pd.DataFrame({"group": list("ab") * 60}, index=[f"c{i}" for i in range(120)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(80)]))
    adata.write_h5ad(tmp_path / "in.h5ad")
    data = {"pipeline": "factorize", "name": "ad", "input": {"path": str(tmp_path / "in.h5ad")},
            "model": {"k": 3, "maxit": 6, "seed": 2}, "output": {"dir": str(tmp_path), "anndata": fmt,
                                                                "performance_report": False},
            "progress": "none"}
    res = run_job(JobConfig.from_dict(data), client=client, echo=quiet)
    out = next(f for f in res.files if f.name.startswith("ad-anndata"))
    got = anndata.read_h5ad(out) if fmt == "h5ad" else anndata.read_zarr(out)
    ref = adata.copy()
    dnmf.anndata.fit(ref, 3, maxit=6, seed=2, client=False)  # the library's AnnData layout, in-process
    assert got.X is None and got.shape == (120, 80)
    assert list(got.obs_names) == list(adata.obs_names) and list(got.obs["group"]) == list(adata.obs["group"])
    np.testing.assert_array_equal(got.obsm["X_nmf"], ref.obsm["X_nmf"])
    np.testing.assert_array_equal(got.varm["NMF_W"], ref.varm["NMF_W"])
    for key in ("d", "loss_history"):
        np.testing.assert_array_equal(got.uns["nmf"][key], ref.uns["nmf"][key])
    assert got.uns["nmf"]["iter"] == ref.uns["nmf"]["iter"] and got.uns["nmf"]["k"] == 3
    # row names of W are the genes (features), column names of H the cells
    model = RunStore.open(res.store).read_group("model")
    assert list(model["row_names"][:2]) == ["g0", "g1"] and list(model["col_names"][:2]) == ["c0", "c1"]


def test_quickstart_example_via_the_cli(tmp_path):
    """The README's command at reduced size (3 iterations), through `python -m dnmf` and its own cluster."""
    cmd = [sys.executable, "-m", "dnmf", "run", str(ROOT / "configs" / "quickstart.yaml"), "--set", "model.maxit=3",
           "--set", f"output.dir={tmp_path}", "--set", "cluster.dashboard_address=:0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "cluster: LocalCluster with 2 workers; dashboard: http://" in err  # the dashboard link, printed at start
    assert "INFO dnmf.jobs: fit: 1/3 it" in err and "INFO dnmf.jobs: fit: 3/3 it" in err  # log lines, not a TTY
    store = RunStore.open(tmp_path / "quickstart.zarr")
    assert store.is_complete
    model = store.read_group("model")
    assert model["w"].shape == (13714, 10) and model["h"].shape == (10, 2638) and model["iter"] == 3
    assert np.all(np.diff(model["loss_history"]) <= 0)  # ALS never increases the loss
    names = sorted(pathlib.Path(f).name for f in store.meta["files"])
    assert {"quickstart-convergence.png", "quickstart-factors.png", "quickstart-report.html"} <= set(names)
    info = subprocess.run([sys.executable, "-m", "dnmf", "info", str(tmp_path / "quickstart.zarr")],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "status:    complete" in info.stdout and "model/w" in info.stdout


def test_big_synthetic_example_reduced_out_of_core(tmp_path, client):
    cfg = example("big_synthetic.yaml", tmp_path, [
        f"input.path={tmp_path / 'big.zarr'}", "input.synthetic.m=2000", "input.synthetic.n=3000",
        "input.synthetic.density=0.01", "input.synthetic.block_nnz=6000", "model.block_nnz=6000", "model.maxit=3",
        "model.out_of_core=true"])
    res = run_job(cfg, client=client, echo=quiet)
    model = RunStore.open(res.store).read_group("model")
    assert model["out_of_core"] is True and model["n_blocks"] == 10  # 60,000 entries in blocks of 6,000
    ref = dnmf.nmf(str(tmp_path / "big.zarr"), 10, seed=1, maxit=3, block_nnz=6000, client=False)
    np.testing.assert_array_equal(model["w"], ref.w)  # streamed or in memory: the same arithmetic


def test_slurm_example_runs_on_a_local_cluster_reduced(tmp_path, client):
    cfg = example("slurm.yaml", tmp_path, ["cluster={kind: local, processes: false, n_workers: 2}",
                                           "model.maxit=2", "model.k=3", "output.anndata=none"])
    res = run_job(cfg, client=client, echo=quiet)
    assert RunStore.open(res.store).is_complete
    assert RunStore.open(res.store).read_group("model")["w"].shape[1] == 3


# ---------------------------------------------------------------------------------------------
# factorize: the library's defaults, input.normalize
# ---------------------------------------------------------------------------------------------


def test_factorize_model_defaults_are_the_library_defaults():
    import dataclasses
    import inspect

    from pipelines.factorize import FactorizeModel

    sig = {p.name: p.default for p in inspect.signature(dnmf.nmf).parameters.values()}
    fields = {f.name: f.default for f in dataclasses.fields(FactorizeModel) if f.name != "k"}
    for name, default in fields.items():
        if name == "init":
            assert (default, sig[name]) == ("random", None)  # nmf's None is "random"
        elif name == "out_of_core":
            assert (default, sig[name]) == ("auto", None)  # nmf's None decides from memory, as "auto"
        else:
            assert default == sig[name], name
    assert fields["seed"] is None and fields["block_nnz"] is None


def test_factorize_seed_null_draws_entropy_once_and_records_it(tmp_path, client):
    cfg = factorize_config(tmp_path, name="noseed", seed=None, maxit=3)
    res = run_job(cfg, client=client, echo=quiet)
    seeds = RunStore.open(res.store).meta["seeds"]
    assert seeds["nmf"] is None
    model = RunStore.open(res.store).read_group("model")
    # the recorded entropy reproduces the fit
    ref = dnmf.nmf(cfg.input.path, 4, seed=np.random.SeedSequence(int(seeds["nmf_entropy"])), maxit=3, tol=0,
                   block_nnz=1000, client=False)
    np.testing.assert_array_equal(model["w"], ref.w)


def test_factorize_normalize_option_fits_the_normalized_matrix(tmp_path, client):
    from dnmf.core import default_block_nnz
    from dnmf.preprocess import recipe

    data = {"pipeline": "factorize", "name": "lognorm", "input": {"dataset": "hawaiibirds", "normalize": "cp10k_log1p"},
            "model": {"k": 3, "maxit": 5, "tol": 0, "seed": 2},
            "output": {"dir": str(tmp_path), "anndata": "none", "performance_report": False, "plots": False},
            "progress": "none"}
    lines = []
    res = run_job(JobConfig.from_dict(data), client=client, echo=lines.append)
    assert "input: cp10k_log1p normalization, block by block" in lines
    model = RunStore.open(res.store).read_group("model")
    assert model["normalize"] == "cp10k_log1p"
    X = dnmf.datasets.load_hawaiibirds().X
    ref = dnmf.nmf(recipe(X, "cp10k_log1p", block_nnz=default_block_nnz(X)), 3, seed=2, maxit=5, tol=0, client=False)
    np.testing.assert_array_equal(model["w"], ref.w)
    with pytest.raises(dnmf.ConfigError, match=r"^The config key 'input.normalize' must be one of 'none', 'log1p', "
                                               r"'cp10k_log1p'. Got 'zscore' instead.$"):
        JobConfig.from_dict({**data, "input": {"dataset": "hawaiibirds", "normalize": "zscore"}})


def test_factorize_top_features_outputs_and_feature_selection(tmp_path, client):
    import dataclasses

    import pandas as pd

    from dnmf.models import NMFModel
    from dnmf.preprocess import recipe

    data = {"pipeline": "factorize", "name": "top",
            "input": {"dataset": "hawaiibirds", "normalize": "log1p", "n_top_features": 40},
            "model": {"k": 3, "maxit": 4, "tol": 0, "seed": 2},
            "output": {"dir": str(tmp_path), "anndata": "none", "performance_report": False, "top_features": 7},
            "progress": "none"}
    res = run_job(JobConfig.from_dict(data), client=client, echo=quiet)
    store = RunStore.open(res.store)
    model = store.read_group("model")
    assert model["w"].shape == (40, 3) and model["n_top_features"] == 40
    birds = dnmf.datasets.load_hawaiibirds()
    named = dataclasses.replace(dnmf.io.as_blocked(birds.X, block_nnz=dnmf.core.default_block_nnz(birds.X)),
                                row_names=tuple(birds.var.index), col_names=tuple(birds.obs.index))
    ref = dnmf.nmf(recipe(named, "log1p", 40), 3, seed=2, maxit=4, tol=0, client=False)
    np.testing.assert_array_equal(model["w"], ref.w)
    assert list(model["row_names"]) == list(ref.feature_names)
    assert set(ref.feature_names) <= set(map(str, birds.var.index))
    names = {pathlib.Path(f).name for f in store.meta["files"]}
    assert {"top-top-features.csv", "top-top-features.png", "top-factors.png"} <= names
    table = pd.read_csv(tmp_path / "top-top-features.csv")
    expected = NMFModel.from_dict(ref.to_dict()).top_features(7)
    assert len(table) == 3 * 7 and list(table.columns) == ["factor", "rank", "feature", "weight", "specificity"]
    assert list(table["feature"]) == [str(f) for f in expected["feature"]]
    np.testing.assert_allclose(table["weight"], expected["weight"], rtol=1e-12)  # CSV keeps 17 digits
    with pytest.raises(dnmf.ConfigError, match=r"'input.n_top_features' must be"):
        JobConfig.from_dict({**data, "input": {"dataset": "hawaiibirds", "n_top_features": 0}})
