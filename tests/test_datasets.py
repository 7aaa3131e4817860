"""Bundled data sets: exact agreement with the shared exports (meta.json, rows.csv, cols.csv)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dnmf.datasets import Dataset, load_aml, load_hawaiibirds, load_orthodont, load_pbmc3k

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # the project's shared folder, beside the repo
LOADERS = {"pbmc3k": load_pbmc3k, "hawaiibirds": load_hawaiibirds, "aml": load_aml}


@pytest.fixture(scope="module", params=sorted(LOADERS))
def loaded(request):
    return request.param, LOADERS[request.param]()


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


#: ``stats`` of shared/data/<name>/meta.json (the R export), copied so the test runs anywhere.
META = {
    "pbmc3k": dict(nrow=13714, ncol=2638, nnz_stored=2238732, nnz_nonzero=2238732, sum=6254880,
                   sum_sq=109789006, min_value=1, max_value=419),
    "hawaiibirds": dict(nrow=183, ncol=1183, nnz_stored=30815, nnz_nonzero=30815, sum=7476.9770839504245,
                        sum_sq=3903.8765433223293, min_value=0.00027739251040221914, max_value=1),
    "aml": dict(nrow=824, ncol=135, nnz_stored=None, nnz_nonzero=111008, sum=60545.69146339088,
                sum_sq=47924.6183695445, min_value=0, max_value=0.9987308113977359),
}


def test_meta_copy_is_current():
    if not SHARED.is_dir():
        pytest.skip("shared data folder not available")
    for name, stats in META.items():
        assert json.loads(SHARED.joinpath(name, "meta.json").read_text())["stats"] == stats


def test_stats_equal_meta_json(loaded):
    """Shape, nnz, min/max, sum and sum of squares equal the R export's meta.json.

    ``math.fsum`` is the correctly rounded sum, which is what R's long-double ``sum`` printed to
    17 digits gives for these data: equality is exact, no tolerance.
    """
    name, data = loaded
    stats = META[name]
    X = data.X
    v = _values(X)
    assert X.shape == (stats["nrow"], stats["ncol"])
    assert int(np.count_nonzero(v)) == stats["nnz_nonzero"]
    if sp.issparse(X):
        assert X.nnz == stats["nnz_stored"]
        assert isinstance(X, sp.csc_array) and X.has_sorted_indices
    assert X.dtype == np.float64
    assert math.fsum(v) == stats["sum"]
    assert math.fsum(v * v) == stats["sum_sq"]
    assert v.min() == stats["min_value"] and v.max() == stats["max_value"]


def test_dataset_structure(loaded):
    name, data = loaded
    assert isinstance(data, Dataset) and data.name == name and data.description
    m, n = data.X.shape
    assert data.shape == (m, n)
    assert isinstance(data.obs, pd.DataFrame) and isinstance(data.var, pd.DataFrame)
    assert data.obs.shape[0] == n and data.var.shape[0] == m
    assert data.obs.index.is_unique and data.var.index.is_unique
    assert all(isinstance(i, str) for i in data.obs.index[:5]) and all(isinstance(i, str) for i in data.var.index[:5])
    assert name in repr(data)


def test_metadata_equal_shared_csv(loaded):
    name, data = loaded
    if not SHARED.joinpath(name).is_dir():
        pytest.skip("shared data folder not available")
    rows = pd.read_csv(SHARED / name / "rows.csv")
    cols = pd.read_csv(SHARED / name / "cols.csv")
    for frame, ref in ((data.var, rows), (data.obs, cols)):
        for col in frame.columns:
            got = frame[col].astype(object).to_numpy() if frame[col].dtype == "category" else frame[col].to_numpy()
            np.testing.assert_array_equal(got, ref[col].to_numpy())  # exact: strings and parsed floats
    if name == "hawaiibirds":
        assert list(data.var.index) == rows["name"].tolist() and list(data.obs.index) == cols["grid"].tolist()
    if name == "aml":
        assert list(data.var.index) == rows["name"].tolist() and list(data.obs.index) == cols["samples"].tolist()


def test_matrix_equals_shared_export():
    """Every value equals the shared .mtx/.csv exactly (hawaiibirds and aml are small enough)."""
    import scipy.io

    if not SHARED.is_dir():
        pytest.skip("shared data folder not available")
    hb = sp.csc_array(scipy.io.mmread(SHARED / "hawaiibirds" / "matrix.mtx"))
    assert (load_hawaiibirds().X != hb).nnz == 0
    aml = np.loadtxt(SHARED / "aml" / "matrix.csv", delimiter=",")
    np.testing.assert_array_equal(load_aml().X, aml)


def test_labels():
    pbmc = load_pbmc3k()
    assert pbmc.obs["cell_type"].nunique() == 9
    assert list(pbmc.obs.columns) == ["cell_type"]
    hb = load_hawaiibirds()
    assert set(hb.obs.columns) == {"island", "lat", "lng"} and set(hb.var.columns) == {"status", "type"}
    assert set(hb.var["status"]) == {"native", "introduced"}
    aml = load_aml()
    assert aml.obs["category"].nunique() == 6


def test_pbmc3k_file_is_compact():
    path = resources.files("dnmf.datasets").joinpath("data/pbmc3k.npz")
    with resources.as_file(path) as p:
        assert Path(p).stat().st_size <= 8 * 1024 * 1024


def test_to_anndata_orientation():
    pytest.importorskip("anndata")
    data = load_hawaiibirds()
    adata = data.to_anndata()
    assert adata.shape == (1183, 183)  # cells (samples) × species (features)
    assert list(adata.obs_names[:3]) == list(data.obs.index[:3])
    assert list(adata.var_names[:3]) == list(data.var.index[:3])
    assert (sp.csc_array(adata.X.T) != data.X).nnz == 0


def test_orthodont_still_exported():
    Y, A, long = load_orthodont()
    assert Y.shape == (4, 27) and A.shape == (2, 27)
