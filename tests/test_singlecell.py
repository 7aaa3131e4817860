"""Single-cell inputs and outputs: 10x Genomics files, lazy .h5ad, names in NMFModel, top_features.

Every fixture file is written here, in ``tmp_path``, with h5py, scipy.io.mmwrite and gzip.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.exceptions import InputError
from dnmf.models import NMFModel

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


# ---------------------------------------------------------------------------------------------
# Names in NMFModel
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """A planted 60 × 40 model (k = 4) and its data, with gene and cell names."""
    sim = dnmf.simulate_nmf(60, 40, 4, noise=0.1, seed=3)
    genes = tuple(f"g{i}" for i in range(60))
    cells = tuple(f"c{j}" for j in range(40))
    return sim, genes, cells


def _named_model(sim, genes, cells):
    d = np.array([4.0, 3.0, 2.0, 1.0])
    return NMFModel(w=sim.w.copy(), d=d, h=sim.h.copy(), misc={"row_names": genes, "col_names": cells})


def test_fit_keeps_names_from_anndata_and_data_frame(planted):
    import anndata

    sim, genes, cells = planted
    adata = anndata.AnnData(X=sp.csr_matrix(sim.A.T), obs=pd.DataFrame(index=list(cells)),
                            var=pd.DataFrame(index=list(genes)))
    model = dnmf.nmf(adata, 4, seed=1, maxit=5, tol=0)
    assert model.feature_names == genes and model.sample_names == cells
    frame = pd.DataFrame(sim.A, index=list(genes), columns=list(cells))
    model = dnmf.nmf(frame, 4, seed=1, maxit=5, tol=0)
    assert model.feature_names == genes and model.sample_names == cells
    # a default RangeIndex is not a name; a plain array has none
    assert dnmf.io.as_blocked(pd.DataFrame(sim.A)).row_names is None
    unnamed = dnmf.nmf(sim.A, 4, seed=1, maxit=5, tol=0)
    assert unnamed.feature_names is None and unnamed.sample_names is None
    # names follow a transpose and survive factor selection
    t = model.transpose()
    assert t.feature_names == cells and t.sample_names == genes
    assert model[[1, 0]].feature_names == genes


def test_predict_aligns_features_by_name(planted):
    sim, genes, cells = planted
    model = _named_model(sim, genes, cells)
    a = sim.A[:, :10]
    ref = model.predict(a)  # positional: same features, same order
    # shuffled rows plus two features the model does not know: the same projection
    rng = np.random.default_rng(0)
    order = rng.permutation(60)
    extra = rng.uniform(size=(2, 10))
    shuffled = pd.DataFrame(np.vstack([a[order], extra]), index=[genes[i] for i in order] + ["x1", "x2"])
    # the same arithmetic on permuted rows: equal to rounding (sums in another order)
    np.testing.assert_allclose(model.predict(shuffled), ref, rtol=1e-10, atol=1e-12)
    # missing features are zeros, with a warning giving their number
    keep = np.arange(60) >= 5
    partial = pd.DataFrame(a[keep], index=[g for g, k in zip(genes, keep) if k])
    with pytest.warns(UserWarning, match=r"^5 of the model's 60 features are missing from the data A passed to "
                                         r"NMFModel.predict \(e.g. 'g0', 'g1', 'g2'\) and are treated as zero.$"):
        got = model.predict(partial)
    zeroed = a.copy()
    zeroed[~keep] = 0.0
    np.testing.assert_allclose(got, model.predict(zeroed), rtol=1e-10, atol=1e-12)
    # an AnnData (cells × genes) works the same way
    import anndata

    adata = anndata.AnnData(X=np.ascontiguousarray(a[order].T), var=pd.DataFrame(index=[genes[i] for i in order]))
    np.testing.assert_allclose(model.predict(adata), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match=r"None of the 3 feature names of the data A passed to NMFModel.predict is "
                                         r"a feature of the model \(e.g. 'x0' in A, 'g0' in the model\)"):
        model.predict(pd.DataFrame(np.ones((3, 2)), index=["x0", "x1", "x2"]))
    with pytest.raises(InputError, match=r"must be unique .* 'g1' appears more than once"):
        model.predict(pd.DataFrame(np.ones((3, 2)), index=["g0", "g1", "g1"]))
    # data without names is matched by position, as before
    with pytest.raises(InputError, match=r"data of shape \(60, n\)"):
        model.predict(np.ones((59, 2)))


def test_align_matches_features_by_name(planted):
    sim, genes, cells = planted
    model = _named_model(sim, genes, cells)
    perm = np.array([2, 0, 3, 1])
    rows = np.random.default_rng(1).permutation(60)[:50]  # another gene order, 10 genes fewer
    other = NMFModel(w=sim.w[rows][:, perm], d=np.ones(4), h=sim.h[perm],
                     misc={"row_names": tuple(genes[i] for i in rows)})
    aligned = model.align(other)
    np.testing.assert_array_equal(aligned.misc["alignment"], perm)
    assert aligned.feature_names == genes
    stranger = NMFModel(w=sim.w, d=np.ones(4), h=sim.h, misc={"row_names": tuple(f"x{i}" for i in range(60))})
    with pytest.raises(InputError, match="share no feature names"):
        model.align(stranger)
    # a bare matrix is matched by position
    np.testing.assert_array_equal(model.align(sim.w[:, perm]).misc["alignment"], perm)


# ---------------------------------------------------------------------------------------------
# top_features
# ---------------------------------------------------------------------------------------------


def _top_features_reference(w, d, names, n, by):
    """Loops over factors and features: weights W·d with columns summing to 1, and per-feature
    z-scores (population sd) across the k factors."""
    m, k = w.shape
    rows = []
    weight = np.empty((m, k))
    for f in range(k):
        col = w[:, f] * d[f]
        weight[:, f] = col / col.sum()
    spec = np.zeros((m, k))
    for i in range(m):
        x = weight[i]
        sd = np.sqrt(np.mean((x - x.mean()) ** 2))
        if sd > 0:
            spec[i] = (x - x.mean()) / sd
    for f in range(k):
        score = weight[:, f] if by == "weight" else spec[:, f]
        order = sorted(range(m), key=lambda i: (-score[i], i))[:n]
        for r, i in enumerate(order, start=1):
            rows.append((f, r, names[i] if names else i, weight[i, f], spec[i, f]))
    return pd.DataFrame(rows, columns=["factor", "rank", "feature", "weight", "specificity"])


@pytest.mark.parametrize("by", ["weight", "specificity"])
@pytest.mark.parametrize("named", [True, False])
def test_top_features_matches_reference(planted, by, named):
    sim, genes, cells = planted
    rng = np.random.default_rng(5)
    w = sim.w * rng.uniform(0.5, 1.5, size=sim.w.shape)  # break the planted blocks' ties
    model = NMFModel(w=w, d=np.array([4.0, 3.0, 2.0, 1.0]), h=sim.h,
                     misc={"row_names": genes} if named else {})
    got = model.top_features(n=7, by=by)
    ref = _top_features_reference(w, model.d, genes if named else None, 7, by)
    assert list(got.columns) == ["factor", "rank", "feature", "weight", "specificity"]
    pd.testing.assert_frame_equal(got[["factor", "rank", "feature"]], ref[["factor", "rank", "feature"]],
                                  check_dtype=False)
    # a few sums and a square root of 4 terms: agreement to rounding
    np.testing.assert_allclose(got["weight"], ref["weight"], rtol=1e-12)
    np.testing.assert_allclose(got["specificity"], ref["specificity"], rtol=1e-10, atol=1e-12)


def test_top_features_on_a_fitted_planted_model():
    sim = dnmf.simulate_nmf(80, 60, 3, noise=0.05, seed=2)
    model = dnmf.nmf(sim.A, 3, seed=1, tol=1e-8, maxit=300).align(sim.w)
    top = model.top_features(n=5)
    assert len(top) == 15 and (top["rank"].between(1, 5)).all()
    # each factor's top features lie in its planted block of rows (argmax of the planted W)
    planted_factor = np.argmax(sim.w, axis=1)
    for f, group in top.groupby("factor"):
        assert (planted_factor[group["feature"].to_numpy()] == f).all()
    # weights are shares of the factor: columns of the normalized W·d sum to 1
    full = model.top_features(n=10**6)
    np.testing.assert_allclose(full.groupby("factor")["weight"].sum(), 1.0, rtol=1e-6)  # float32-free; rounding
    # k = 1: every feature has the same weight in all factors, specificity 0
    assert (model[0].top_features(3)["specificity"] == 0).all()
    with pytest.raises(InputError, match=r"The 'n' parameter of NMFModel.top_features must be an int in \[1, inf\)"):
        model.top_features(0)
    with pytest.raises(InputError, match="'by' parameter of NMFModel.top_features"):
        model.top_features(by="loading")
