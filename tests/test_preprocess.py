"""dnmf.preprocess against plain NumPy references (scanpy's formulas written out; scanpy is not a dependency)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
import dnmf.preprocess as pp
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def _plain_cp10k_log1p(A):
    """scanpy's normalize_total(target_sum=1e4) + log1p, written out on a dense genes × cells array."""
    totals = A.sum(axis=0)
    scaled = np.where(totals > 0, A * (1e4 / np.where(totals > 0, totals, 1.0)), 0.0)
    return np.log1p(scaled)


def _counts(dtype=np.float64, seed=3):
    rng = np.random.default_rng(seed)
    keep = np.ones(30, dtype=dtype)
    keep[4] = 0  # an empty sample stays empty
    A = sp.csc_matrix(sp.random(40, 30, density=0.2, random_state=rng, format="csc", dtype=dtype) @ sp.diags(keep))
    A.data = np.ceil(A.data * 20).astype(dtype)  # count-like
    A.eliminate_zeros()
    return A


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_blocks_match_a_plain_numpy_reference(sparse, dtype):
    A = _counts(dtype)
    data = A if sparse else A.toarray()
    dense = A.toarray().astype(np.float64)
    for method, ref in (("log1p", np.log1p(dense)), ("cp10k_log1p", _plain_cp10k_log1p(dense))):
        blocked = pp.recipe(data, method, block_nnz=40)  # several blocks
        assert blocked.n_blocks > 1 and blocked.sparse == sparse and blocked.dtype == dtype
        got = blocked.to_scipy()
        if sparse:
            assert sp.issparse(got) and got.nnz == A.nnz  # the stored pattern is kept: nothing densified
            got = got.toarray()
        assert got.dtype == dtype
        # float32 storage rounds the transformed values: relative 1e-6; float64 is exact to rounding
        np.testing.assert_allclose(got, ref, rtol=1e-6 if dtype == np.float32 else 1e-12)
        assert np.all(got[:, 4] == 0)
    totals = pp.normalize_total(data, 1e4, block_nnz=40).to_scipy()
    totals = np.asarray(totals.sum(axis=0)).ravel()
    np.testing.assert_allclose(totals[totals > 0], 1e4, rtol=1e-5)  # float32 values: 1e-5 relative
    assert pp.recipe(data, "none", block_nnz=40).to_scipy().sum() == pytest.approx(A.sum())


def test_lazy_store_blocks_are_transformed_on_load(tmp_path):
    A = _counts(seed=5)
    names = tuple(f"g{i}" for i in range(A.shape[0]))
    path = dnmf.io.write_zarr(A, str(tmp_path / "a.zarr"), block_nnz=60)
    blocked = pp.recipe(path, "cp10k_log1p", n_top_features=10)
    assert not blocked.in_memory and blocked.n_blocks > 1
    assert all(isinstance(s, pp.TransformedSource) and len(s.transforms) == 3 for s in blocked.sources)
    pickle.loads(pickle.dumps(blocked.sources[0]))  # shipped to workers
    ref = _plain_cp10k_log1p(A.toarray())
    var = ref.var(axis=1, ddof=1)
    keep = np.sort(np.argsort(-var, kind="stable")[:10])
    np.testing.assert_allclose(blocked.to_scipy().toarray(), ref[keep], rtol=1e-12)
    assert blocked.shape == (10, A.shape[1]) and blocked.sparse
    # names follow the selection (a DataFrame's index is a source of names)
    import pandas as pd

    frame = pd.DataFrame(A.toarray(), index=list(names))
    sel = pp.recipe(frame, "cp10k_log1p", n_top_features=10)
    assert sel.row_names == tuple(names[i] for i in keep)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_feature_variances_and_selection_match_numpy(sparse):
    A = _counts(seed=7)
    X = _plain_cp10k_log1p(A.toarray())
    blocked = pp.recipe(A if sparse else A.toarray(), "cp10k_log1p", block_nnz=50)
    mean, var = pp.feature_variances(blocked)
    # one pass of float64 block sums vs NumPy's two-pass formula: equal to 1e-9 relative
    np.testing.assert_allclose(mean, X.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var, X.var(axis=1, ddof=1), rtol=1e-9, atol=1e-12)
    for n_top in (1, 7, 40, 100):
        sel = pp.select_features(blocked, n_top)
        keep = np.sort(np.argsort(-X.var(axis=1, ddof=1), kind="stable")[:n_top])
        assert sel.sparse == sparse and sel.n_blocks == blocked.n_blocks
        got = sel.to_scipy()
        np.testing.assert_allclose(got.toarray() if sparse else got, X[keep], rtol=1e-12)


def test_preprocess_errors():
    A = _counts()
    with pytest.raises(InputError, match="normalize"):
        pp.recipe(A, "zscore")
    with pytest.raises(InputError, match=r"'n_top_features' parameter of select_features must be an int in \[1, inf\)"):
        pp.select_features(A, 0)
    with pytest.raises(InputError, match=r"'target_sum' parameter of normalize_total"):
        pp.normalize_total(A, -1.0)


def test_fit_on_preprocessed_data_keeps_names():
    import anndata
    import pandas as pd

    A = _counts(seed=9)
    adata = anndata.AnnData(X=sp.csr_matrix(A.T), obs=pd.DataFrame(index=[f"c{j}" for j in range(A.shape[1])]),
                            var=pd.DataFrame(index=[f"g{i}" for i in range(A.shape[0])]))
    model = dnmf.nmf(pp.recipe(adata, n_top_features=20), 3, seed=0, maxit=3, tol=0, client=False)
    assert len(model.feature_names) == 20 and model.sample_names == tuple(adata.obs_names)
