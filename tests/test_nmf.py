"""The core NMF engine against a plain-NumPy RcppML reference, invariants and path equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.exceptions import ConvergenceWarning, InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def reference_rcppml(A, w0, maxit, norm="L1", l1=(0.0, 0.0), l2=(0.0, 0.0)):
    """RcppML 1.0 §2.1 with the Cholesky-clip solver, written densely in NumPy (float64)."""
    A = np.asarray(A, dtype=np.float64)
    wt = w0.T.copy()
    k = wt.shape[0]
    losses = []

    def scale(f):
        if norm == "L1":
            d = np.abs(f).sum(1) + 1e-15
        elif norm == "L2":
            d = np.sqrt((f * f).sum(1)) + 1e-15
        else:
            d = np.ones(f.shape[0])
        return f / d[:, None], d

    for _ in range(maxit):
        g = wt @ wt.T + l2[1] * np.eye(k)
        h = np.maximum(np.linalg.solve(g, wt @ A - l1[1]), 0)
        h, d = scale(h)
        g = h @ h.T + l2[0] * np.eye(k)
        wt = np.maximum(np.linalg.solve(g, h @ A.T - l1[0]), 0)
        wt, d = scale(wt)
        losses.append(np.sum((A - wt.T @ np.diag(d) @ h) ** 2))
    return wt.T, d, h, np.array(losses)


@pytest.fixture(scope="module")
def sparse_a():
    return sp.random(300, 200, density=0.1, random_state=1, format="csc", dtype=np.float64)


@pytest.fixture(scope="module")
def w0():
    return np.random.default_rng(5).uniform(size=(300, 4))


@pytest.mark.parametrize("norm", ["L1", "L2", "none"])
def test_matches_numpy_reference(sparse_a, w0, norm):
    model = dnmf.nmf(sparse_a, 4, init=w0, maxit=15, tol=0, sort_model=False, norm=norm, solver="cholesky",
                     block_nnz=1000, client=False)
    w, d, h, losses = reference_rcppml(sparse_a.toarray(), w0, 15, norm=norm)
    # Same float64 algebra in a different summation order: agreement to ~1e-12 relative is
    # expected; 1e-9 leaves room for 15 iterations of error growth.
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.d, d, rtol=1e-9)
    np.testing.assert_allclose(model.h, h, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-9)
    assert model.misc["n_blocks"] > 1


def test_penalties_match_reference(sparse_a, w0):
    model = dnmf.nmf(sparse_a, 4, init=w0, maxit=10, tol=0, sort_model=False, solver="cholesky",
                     L1=(0.01, 0.02), L2=(0.1, 0.2), client=False)
    w, d, h, losses = reference_rcppml(sparse_a.toarray(), w0, 10, l1=(0.01, 0.02), l2=(0.1, 0.2))
    # as above: same algebra, different summation order
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-9)


def test_loss_is_true_sse_and_nonincreasing_with_exact_solver(sparse_a):
    model = dnmf.nmf(sparse_a, 5, seed=3, solver="exact", maxit=40, tol=0, client=False)
    hist = model.misc["loss_history"]
    # Exact alternating NNLS cannot increase the objective; allow float64 round-off
    # relative to the loss magnitude (1e-10).
    assert np.all(np.diff(hist) <= 1e-10 * hist[0])
    dense = sparse_a.toarray()
    sse = np.sum((dense - model.w @ np.diag(model.d) @ model.h) ** 2)
    # The Gram-identity loss equals the explicit SSE up to cancellation error (~1e-12 rel).
    assert abs(sse - model.misc["loss"]) <= 1e-9 * sse


def test_invariants(sparse_a):
    model = dnmf.nmf(sparse_a, 6, seed=1, client=False)
    assert (model.w >= 0).all() and (model.h >= 0).all()
    assert np.all(np.diff(model.d) <= 0), "d must be sorted decreasing"
    # unit L1 norm of W columns and H rows (float64 rounding only)
    np.testing.assert_allclose(model.w.sum(0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(model.h.sum(1), 1.0, rtol=1e-12)
    assert model.misc["iter"] >= 6 or not model.misc["converged"]


def test_same_seed_same_result_and_different_seed_differs(sparse_a):
    a = dnmf.nmf(sparse_a, 4, seed=7, maxit=10, client=False)
    b = dnmf.nmf(sparse_a, 4, seed=7, maxit=10, client=False)
    c = dnmf.nmf(sparse_a, 4, seed=8, maxit=10, client=False)
    assert np.array_equal(a.w, b.w) and np.array_equal(a.h, b.h)
    assert not np.allclose(a.w, c.w)


def test_convergence_rule_patience(sparse_a):
    model = dnmf.nmf(sparse_a, 3, seed=2, tol=1e-3, maxit=200, patience=5, client=False)
    tolh = model.misc["tol_history"]
    assert model.misc["converged"]
    # stops exactly when the last 5 relative changes are below tol, and not earlier
    assert np.all(tolh[-5:] < 1e-3)
    assert len(tolh) == model.misc["iter"]
    run = 0
    for t in tolh[1:-1]:
        run = run + 1 if t < 1e-3 else 0
        assert run < 5


def test_callback_record_and_stop(sparse_a):
    seen = []

    def cb(rec):
        seen.append(rec)
        if rec.iteration == 3:
            raise StopIteration

    model = dnmf.nmf(sparse_a, 3, seed=2, tol=0, maxit=50, on_iteration=cb, client=False)
    assert [r.iteration for r in seen] == [1, 2, 3]
    it, train, test = seen[-1]
    assert train == model.misc["loss_history"][-1] and np.isnan(test)
    assert model.misc["stopped_by_callback"] and model.misc["iter"] == 3


def test_float32_in_float32_out(sparse_a):
    model = dnmf.nmf(sparse_a.astype(np.float32), 3, seed=1, maxit=5, client=False)
    assert model.w.dtype == np.float32 and model.h.dtype == np.float32 and model.d.dtype == np.float32
    ref = dnmf.nmf(sparse_a, 3, seed=1, maxit=5, client=False)
    # float32 data, float64 arithmetic: the factors agree to float32 input rounding (~1e-6)
    np.testing.assert_allclose(model.w, ref.w, rtol=1e-4, atol=1e-6)


def test_dense_sparse_dask_zarr_same_model(tmp_path, sparse_a):
    import dask.array as da

    dense = sparse_a.toarray()
    kw = dict(seed=4, maxit=12, tol=0, client=False)
    ref = dnmf.nmf(sparse_a, 4, **kw)
    path = tmp_path / "a.zarr"
    dnmf.io.write_zarr(sparse_a, str(path), block_nnz=1500)
    for data in (dense, sp.csr_matrix(sparse_a), da.from_array(dense, chunks=(300, 50)), str(path)):
        model = dnmf.nmf(data, 4, **kw)
        # Different block layouts only change float64 summation order: ≤ 1e-6 relative
        # is the bar and leaves several orders of magnitude of margin.
        np.testing.assert_allclose(model.w, ref.w, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(model.h, ref.h, rtol=1e-6, atol=1e-12)


def test_svd_init_is_deterministic_and_good(sparse_a):
    a = dnmf.nmf(sparse_a, 4, init="svd", seed=1, maxit=1, tol=0, client=False)
    b = dnmf.nmf(sparse_a, 4, init="lanczos", seed=1, maxit=1, tol=0, client=False)
    r = dnmf.nmf(sparse_a, 4, seed=1, maxit=1, tol=0, client=False)
    assert np.array_equal(a.w, b.w)
    # After one iteration the SVD start is at least as good as a random start.
    assert a.misc["loss"] <= r.misc["loss"]


def test_user_init_transposed_and_bad_inputs(sparse_a, w0):
    a = dnmf.nmf(sparse_a, 4, init=w0, maxit=2, client=False)
    b = dnmf.nmf(sparse_a, 4, init=w0.T, maxit=2, client=False)
    assert np.array_equal(a.w, b.w)
    with pytest.raises(InputError, match="'init' parameter of nmf must be a matrix of shape"):
        dnmf.nmf(sparse_a, 3, init=w0, client=False)
    with pytest.raises(InputError, match=r"'tol' parameter of nmf must be a float in \[0.0, inf\). Got -1"):
        dnmf.nmf(sparse_a, 3, tol=-1)
    with pytest.raises(InputError, match="'solver' parameter of nmf must be one of 'auto', 'cd'"):
        dnmf.nmf(sparse_a, 3, solver="magic")
    with pytest.raises(InputError, match="'L1'"):
        dnmf.nmf(sparse_a, 3, L1=(-1, 0))
    with pytest.raises(InputError, match="'norm'"):
        dnmf.nmf(sparse_a, 3, norm="L3")
    with pytest.raises(InputError, match="'maxit'"):
        dnmf.nmf(sparse_a, 3, maxit=0)


def test_semi_nmf_allows_negative_h(w0):
    rng = np.random.default_rng(0)
    w = rng.uniform(size=(60, 3))
    h = rng.normal(size=(3, 40))
    A = w @ h
    A = A - A.min()  # data must be non-negative; H may still need signs
    model = dnmf.nmf(A, 3, seed=1, nonneg=(True, False), maxit=50, client=False)
    assert (model.w >= 0).all()
    assert (model.h < 0).any()


def test_all_zero_rows_and_columns_give_no_nan():
    a = sp.random(50, 40, density=0.2, random_state=0, format="csc").toarray()
    a[3] = 0
    a[:, 5] = 0
    model = dnmf.nmf(a, 3, seed=0, maxit=10, client=False)
    assert np.isfinite(model.w).all() and np.isfinite(model.h).all() and np.isfinite(model.d).all()
    assert np.all(model.h[:, 5] == 0)


def test_cd_solver_close_to_exact(sparse_a):
    cd = dnmf.nmf(sparse_a, 4, seed=1, solver="cd", maxit=30, tol=0, client=False)
    ex = dnmf.nmf(sparse_a, 4, seed=1, solver="exact", maxit=30, tol=0, client=False)
    # Coordinate descent with cd_tol=1e-8 solves each NNLS to ~1e-8; after 30 iterations
    # the losses agree to better than 1e-5 relative.
    assert abs(cd.misc["loss"] - ex.misc["loss"]) <= 1e-5 * ex.misc["loss"]


def test_convergence_warning_names_maxit(sparse_a):
    with pytest.warns(ConvergenceWarning, match="Increase maxit"):
        dnmf.nmf(sparse_a, 3, seed=1, maxit=2, tol=1e-12, client=False)


def test_default_block_layout_depends_on_the_data_only():
    from types import SimpleNamespace

    from dnmf.core import default_block_nnz

    assert default_block_nnz(np.ones((10, 10))) == 1_000_000  # small: the 1 M floor
    assert default_block_nnz(np.ones((3000, 4000))) == 1_500_000  # 12 M entries / 8
    assert default_block_nnz(SimpleNamespace(nnz=10**9, shape=(30000, 10**6))) == 8_000_000  # the 8 M cap
    assert default_block_nnz("store.zarr") == 1_000_000  # on-disk stores keep their own blocking
    a = sp.random(300, 200, density=0.1, random_state=0, format="csc")
    m = dnmf.nmf(a, 3, seed=1, maxit=3, tol=0, client=False)
    assert m.misc["n_blocks"] == 1
