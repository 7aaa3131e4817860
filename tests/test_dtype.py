"""dtype="float32": float32 storage of A and products with a float32 copy of W (issue 12).

Every sum, Gram, solve and the loss stay float64, so the float32 fit is the float64 arithmetic on
rounded inputs: the kernel is checked bitwise against the float64 kernel fed the rounded W, the
fit against float64's loss (the issue's bar: 1e-6 relative), across worker counts bitwise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.exceptions import InputError
from dnmf.kernels.column import column_terms
from dnmf.kernels.fused import csc_block_pass
from dnmf.kernels.nnls import SOLVER_CD, SOLVER_CHOLESKY
from dnmf.solvers.updates import cholesky_or_empty


@pytest.fixture(scope="module")
def A():
    rng = np.random.default_rng(11)
    w = rng.gamma(1.0, 1.0, (200, 4))
    h = rng.gamma(1.0, 1.0, (4, 300))
    mask = rng.random((200, 300)) < 0.15
    return sp.csc_matrix(np.where(mask, w @ h * rng.uniform(0.5, 1.5, (200, 300)), 0.0))


def _quiet_fit(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dnmf.nmf(*args, **kw)


@pytest.mark.parametrize("solver", [SOLVER_CHOLESKY, SOLVER_CD])
def test_pass_with_float32_w_is_float64_pass_on_rounded_w(A, solver):
    """Each product is formed in float64 from the float32 values (exact: 24 + 24 bits < 53): the
    pass is bitwise the float64 pass given the rounded W and A."""
    k = 4
    rng = np.random.default_rng(2)
    w32 = rng.uniform(size=(A.shape[0], k)).astype(np.float32)
    w64 = w32.astype(np.float64)
    G = w64.T @ w64 + 1e-15 * np.eye(k)
    L = cholesky_or_empty(G, solver)
    a = A.astype(np.float32)  # the stored values of dtype="float32"
    out = []
    for w in (w32, w64):
        ht = np.full((A.shape[1], k), 0.5)  # warm start (CD uses it; Cholesky-clip ignores it)
        P, Q, hsum = np.zeros((A.shape[0], k)), np.zeros((k, k)), np.zeros(k)
        csc_block_pass(a.data, a.indices, a.indptr, w, G, L, 0.0, ht, np.ones(k), column_terms(k), solver, True, 100,
                       1e-8, True, P, Q, hsum)
        out.append((ht, P, Q, hsum))
    for x32, x64 in zip(*out):
        np.testing.assert_array_equal(x32, x64)
    # and the right-hand sides are WᵀA in float64 arithmetic: H solves G h = Wᵀa (Cholesky-clip,
    # all positive here) to the solver's precision
    if solver == SOLVER_CHOLESKY:
        b = (a.astype(np.float64).T @ w64)
        h_ref = np.linalg.solve(G, b.T).T
        pos = np.all(h_ref > 0, axis=1)
        # a k = 4 Cholesky solve in float64 against LAPACK's: relative error ~ cond(G)·eps ≲ 1e-12
        np.testing.assert_allclose(out[0][0][pos], h_ref[pos], rtol=1e-10)


def test_float32_fit_matches_float64_to_rounding(A):
    kw = dict(seed=3, maxit=30, tol=0.0, client=False)
    m64 = _quiet_fit(A, 4, **kw)
    m32 = _quiet_fit(A, 4, dtype="float32", **kw)
    assert m32.w.dtype == m32.h.dtype == m32.d.dtype == np.float64  # the input's dtype
    # the issue's bar for float32 compute: the loss within 1e-6 relative of float64's (observed ~1e-11:
    # only W's and A's roundings, 6e-8 relative, enter the right-hand sides)
    assert abs(m32.misc["loss"] - m64.misc["loss"]) <= 1e-6 * m64.misc["loss"]
    # the factors themselves move by rounding amplified by the solves' conditioning (observed ~1e-7)
    np.testing.assert_allclose(m32.w, m64.w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m32.d, m64.d, rtol=1e-4)


def test_default_follows_input_dtype(A):
    kw = dict(seed=3, maxit=8, tol=0.0, client=False)
    a32 = A.astype(np.float32)
    auto = _quiet_fit(a32, 4, **kw)
    forced = _quiet_fit(a32, 4, dtype="float32", **kw)
    also = _quiet_fit(A, 4, dtype="float32", **kw)  # float64 input rounded to the same float32 values
    for x in ("w", "d", "h"):
        np.testing.assert_array_equal(getattr(auto, x), getattr(forced, x))
        np.testing.assert_array_equal(getattr(auto, x), getattr(also, x).astype(np.float32))  # returned as input
    # dtype="float64" on float32 input: float32 values are exact in float64, so the fit is the
    # float64 fit of the widened matrix, returned in the input's float32
    wide = _quiet_fit(a32, 4, dtype="float64", **kw)
    ref = _quiet_fit(a32.astype(np.float64), 4, **kw)
    assert wide.w.dtype == np.float32
    np.testing.assert_array_equal(wide.w, ref.w.astype(np.float32))
    assert wide.misc["loss"] == ref.misc["loss"]
    assert not np.array_equal(auto.w, wide.w)  # the float32 products are in use by default


def test_float32_same_on_two_workers_as_in_process(A):
    distributed = pytest.importorskip("distributed")
    kw = dict(seed=5, maxit=10, tol=0.0, dtype="float32", block_nnz=2000)
    local = _quiet_fit(A, 4, client=False, **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        remote = _quiet_fit(A, 4, client=client, **kw)
    assert remote.misc["n_blocks"] > 2 and remote.misc["executor"] == "distributed"
    for x in ("w", "d", "h"):  # the fixed reduction order: bitwise equal
        np.testing.assert_array_equal(getattr(remote, x), getattr(local, x))


def test_float32_huge_magnitudes_are_scaled_not_overflowed(A):
    kw = dict(seed=3, maxit=10, tol=0.0, client=False)
    big = _quiet_fit(A * 1e200, 4, dtype="float32", **kw)  # 1e200 overflows float32 unless scaled first
    ref = _quiet_fit(A, 4, dtype="float32", **kw)
    assert np.all(np.isfinite(big.w)) and np.all(np.isfinite(big.h))
    # a power-of-two scale is exact, but 1e200 is not one: A·1e200 rounds differently in float32, so
    # the fits agree to float32 rounding (the same bar as against float64)
    np.testing.assert_allclose(big.d / 1e200, ref.d, rtol=1e-4)


@pytest.mark.parametrize("bad", ["float16", "int32", 3, "double32"])
def test_dtype_rejects_other_values(A, bad):
    with pytest.raises(InputError, match=r"'dtype' parameter of nmf must be None, \"float32\" or \"float64\""):
        dnmf.nmf(A, 3, dtype=bad, client=False)


def test_float32_in_config_model_section():
    from dnmf.params import NMF_PARAMS

    (p,) = [p for p in NMF_PARAMS if p.name == "dtype"]
    assert p.config and p.estimator and p.default is None
    assert dnmf.NMF(dtype="float32").get_params()["dtype"] == "float32"


def test_float32_fit_resumes_bitwise_and_refuses_another_dtype(A, tmp_path):
    path = str(tmp_path / "ck.zarr")
    kw = dict(seed=1, tol=0.0, client=False, dtype="float32")
    full = _quiet_fit(A, 4, maxit=12, **kw)
    _quiet_fit(A, 4, maxit=6, checkpoint=path, checkpoint_every=3, **kw)
    resumed = _quiet_fit(A, 4, maxit=12, checkpoint=path, resume=True, **kw)
    assert resumed.misc["iter"] == 12
    for x in ("w", "d", "h"):
        np.testing.assert_array_equal(getattr(resumed, x), getattr(full, x))
    with pytest.raises(InputError, match="another matrix, block layout or set of options"):
        _quiet_fit(A, 4, maxit=12, checkpoint=path, resume=True, **{**kw, "dtype": "float64"})
