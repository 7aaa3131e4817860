"""The guided pipeline end to end on a real Dask cluster: the example config against the library
calls (nmf, compute_target, refine, assess), RcppML's published vignette table, and config
validation naming the key."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import dnmf
from dnmf.config import load_config
from dnmf.datasets import load_hawaiibirds
from dnmf.exceptions import ConfigError
from dnmf.jobs import RunStore, run_job

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.filterwarnings("ignore::dnmf.ConvergenceWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "guided.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl, \
            distributed.Client(cl) as c:
        yield c


@pytest.fixture(scope="module")
def birds():
    data = load_hawaiibirds()
    return data.X, data.obs["island"].to_numpy()


@pytest.fixture(scope="module")
def baseline(birds):
    """The library's baseline: the example config's model section as a plain nmf call."""
    A, _ = birds
    return dnmf.nmf(A, 8, tol=1e-4, maxit=100, seed=42, r_rng=True, client=False)


def _dense_mse(A, model) -> float:
    """Mean squared error over all entries, densified (an independent route to evaluate())."""
    return float(np.mean((A.toarray() - model.w @ np.diag(model.d) @ model.h) ** 2))


def _run(tmp_path, client, *overrides):
    cfg = load_config(CONFIG, [f"output.dir={tmp_path / 'runs'}", "progress=none", *overrides])
    res = run_job(cfg, client=client, echo=quiet)
    store = RunStore.open(res.store)
    assert store.is_complete
    return cfg, store


def test_example_config_matches_the_library_calls(tmp_path, client, birds, baseline):
    A, labels = birds
    cfg, store = _run(tmp_path, client)
    assert cfg.name == CONFIG.stem
    T = dnmf.compute_target(baseline.h, labels)
    ref = dnmf.nmf(A, 8, tol=1e-4, maxit=100, seed=42, r_rng=True, client=False, target_H=T, target_lambda=0.1)
    # the same fits on the job's cluster as in-process: bitwise (the engine does not depend on
    # where its blocks run)
    base, model, guide = store.read_group("baseline"), store.read_group("model"), store.read_group("guide")
    for key in ("w", "d", "h"):
        np.testing.assert_array_equal(base[key], getattr(baseline, key))
        np.testing.assert_array_equal(model[key], getattr(ref, key))
    np.testing.assert_array_equal(guide["target"], T)
    assert guide["mode"] == "target" and guide["lambda_"] == 0.1 and guide["labels"] == "island"

    # the assess table: one row per model, dnmf.assess's metrics of the same models exactly
    # (same embeddings, same seeds), the MSE from a dense computation (rtol 1e-12: only the
    # order of the sums differs)
    table = store.read_table("assess")
    assert list(table["model"]) == ["baseline", "guided"]
    for row, m in zip(table.to_dict("records"), (baseline, ref)):
        metrics = dnmf.assess(m, labels, classifiers=["knn", "lr"]).metrics
        for key, value in metrics.items():
            assert row[key] == value, key
        assert row["mse"] == pytest.approx(_dense_mse(A, m), rel=1e-12)
    ratio = _dense_mse(A, ref) / _dense_mse(A, baseline)
    assert table["mse_ratio"].iloc[0] == 1.0 and table["mse_ratio"].iloc[1] == pytest.approx(ratio, rel=1e-12)
    folds = store.read_table("classification")
    assert len(folds) == 2 * 5 * 2 and set(folds["model"]) == {"baseline", "guided"}  # models × folds × classifiers

    # RcppML's vignette table (float32 RcppML 1.0, R's k-means and folds): baseline NMI 0.488,
    # ARI 0.382, kNN 0.898; λ = 0.10: 0.846 / 0.663 / 0.997, MSE ×1.4. Tolerances: k-means
    # restarts and CV folds differ from R's (0.02 on NMI/ARI, 0.01 on kNN accuracy); the ratio
    # is published to one decimal (0.05).
    b, g = table.iloc[0], table.iloc[1]
    assert b["nmi"] == pytest.approx(0.488, abs=0.02) and b["ari"] == pytest.approx(0.382, abs=0.02)
    assert b["accuracy_knn"] == pytest.approx(0.898, abs=0.01)
    assert g["nmi"] == pytest.approx(0.846, abs=0.02) and g["ari"] == pytest.approx(0.663, abs=0.02)
    assert g["accuracy_knn"] == pytest.approx(0.997, abs=0.01)
    assert g["mse_ratio"] == pytest.approx(1.4, abs=0.05)
    assert g["nmi"] - b["nmi"] >= 0.25  # issue 10's bar: the guidance raises NMI

    for name in ("assess-baseline", "assess-guided"):
        p = pathlib.Path(cfg.output.dir) / f"guided-{name}.png"
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC


def test_refine_mode_matches_refine(tmp_path, client, birds, baseline):
    A, labels = birds
    _, store = _run(tmp_path, client, "guide.mode=refine", "guide.lambda_=0.5", "output.plots=false",
                    "guide.metrics=[nmi, classification]", "guide.classifiers=[knn]")
    ref = dnmf.refine(baseline, labels, 0.5)
    model = store.read_group("model")
    for key in ("w", "d", "h"):
        np.testing.assert_array_equal(model[key], getattr(ref, key))
    assert "target" not in store.read_group("guide")
    table = store.read_table("assess")
    assert set(table.columns) >= {"nmi", "accuracy_knn", "mse_ratio"} and "ari" not in table.columns
    # RcppML's vignette: refine(λ = 0.5) gives NMI 0.827, kNN 0.994, MSE ×1.7 (tolerances as above)
    g = table.iloc[1]
    assert g["nmi"] == pytest.approx(0.827, abs=0.02) and g["accuracy_knn"] == pytest.approx(0.994, abs=0.01)
    assert g["mse_ratio"] == pytest.approx(_dense_mse(A, ref) / _dense_mse(A, baseline), rel=1e-12)
    assert g["mse_ratio"] == pytest.approx(1.7, abs=0.05)


def test_metric_choices_are_assess_groups():
    from pipelines import guided

    assert guided.METRICS == ("all", *dnmf.guided.METRIC_GROUPS)


@pytest.mark.parametrize("overrides, message", [
    (["guide.labels=species"], r"The config key 'guide.labels' must be one of the input's obs columns "
                               r"\('island', 'lat', 'lng'\)\. Got 'species' instead\."),
    (["guide.batch=plate"], r"'guide.batch' must be one of the input's obs columns"),
    (["guide.batch=island"], r"'guide.batch' must be an obs column other than guide.labels"),
    # only Hawaii (593 cells) has 300: one class left to assess
    (["guide.min_class_size=300"], r"'guide.labels' must be an obs column with at least 2 classes of >= 300 "
                                   r"samples \(guide.min_class_size\)\. Got 'island' instead\. \(its classes: Hawaii: 593"),
    (["guide.lambda_=0"], r"'guide.lambda_' must be a non-zero float for mode 'target'"),
    (["guide.mode=refine", "guide.lambda_=1.5"], r"'guide.lambda_' must be a float in \[0, 1\] for mode 'refine'"),
    (["guide.mode=project"], r"'guide.mode'"),
    (["guide.metrics=[nmi, batch_mixing]"], r"'guide.metrics' must be metric groups without 'batch_mixing'"),
    (["guide.classifiers=[svm]"], r"'guide.classifiers"),
    (["guide.lambda=0.1"], r"'guide.lambda' is not recognized.*Did you mean 'lambda_'\?"),
    (["model.k=500"], r"'model.k'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)


def test_labels_need_an_obs_table(tmp_path):
    """A bare matrix file has no obs; an AnnData file's obs columns are listed."""
    data = load_hawaiibirds()
    npz = tmp_path / "birds.npz"
    import scipy.sparse as sp

    sp.save_npz(npz, sp.csc_matrix(data.X))
    with pytest.raises(ConfigError, match=r"'guide.labels' must be an obs column of the input, but this input has "
                                          r"no obs table"):
        load_config(CONFIG, ["input.dataset=null", f"input.path={npz}"])
    h5ad = tmp_path / "birds.h5ad"
    data.to_anndata().write_h5ad(h5ad)
    cfg = load_config(CONFIG, ["input.dataset=null", f"input.path={h5ad}"])
    assert cfg.guide.labels == "island"
    with pytest.raises(ConfigError, match=r"'guide.labels' must be one of the input's obs columns \('island', 'lat', "
                                          r"'lng'\)\. Got 'Island' instead\."):
        load_config(CONFIG, ["input.dataset=null", f"input.path={h5ad}", "guide.labels=Island"])
