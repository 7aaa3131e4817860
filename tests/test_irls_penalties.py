"""The §8 penalties (L21, angular, upper_bound, graph_W / graph_H; spec/rcppml.md §8) in the IRLS
loss fits (issue 9): each penalty on each side against a plain-NumPy IRLS reference with the §8
terms written here, a combined fit on a 2-worker LocalCluster, the bound, angular's effect under
NB, a masked / CV GP fit, and the refusal for loss="kl"."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf._losses import get_loss
from dnmf.exceptions import InputError

from references import irls_system, nnls_quadratic

M_, N_, K_ = 30, 24, 3
R_ = 10.0  # NB size r, held fixed (dispersion="none", nb_size_max=R_)


def _pen_gram(F, l21, lam, Lap):
    """§8.3–8.4 for a factor F (k × cols): λ·sym(F L Fᵀ) + diag(L21 / ‖F_r‖₂) (‖F_r‖ > 1e-10)."""
    k = F.shape[0]
    out = np.zeros((k, k))
    if lam > 0 and Lap is not None:
        T = F @ Lap @ F.T
        out += lam * (T + T.T) / 2
    for r in range(k):
        nr = np.linalg.norm(F[r])
        if l21 > 0 and nr > 1e-10:
            out[r, r] += l21 / nr
    return out


def _angular(X, lam):
    """§8.7 on a factor X (k × cols): X ← max(0, X − λ·diag(n)·C·X̂), C the cosines, zero diagonal."""
    n = np.linalg.norm(X, axis=1)
    Xh = np.array([X[r] / n[r] if n[r] > 1e-15 else X[r] for r in range(X.shape[0])])
    C = Xh @ Xh.T
    np.fill_diagonal(C, 0.0)
    return np.maximum(X - lam * np.diag(n) @ C @ Xh, 0.0)


def _irls_vec(F, a, x0, r, n_iter, cold, P, ub, zg=None):
    """NB IRLS of one column / row: ``n_iter`` solves of the weighted system plus the §8 Gram term
    ``P``, each solve clamped at ``ub`` (0: none); the first solve unit-weight when ``cold``."""
    x = np.array(x0, dtype=np.float64)
    for it in range(n_iter):
        G, b = irls_system(F, a, x, "nb", r, cold and it == 0, zg)
        x = nnls_quadratic(G + P, b)
        if ub > 0:
            x = np.minimum(x, ub)
    return x


def reference_fit(A, w0, maxit, n_irls, *, L21=(0, 0), angular=(0, 0), ub=(0, 0), graph_lambda=(0, 0),
                  graph_W=None, graph_H=None):
    """Plain-NumPy NB IRLS NMF (columns of H, then rows of W; L1-normalized factors; warm starts
    as the engine) with §8: the Gram terms from the current factor (W: the current unit-norm W,
    the raw W₀ first; H: the previous Ĥ, none in the first iteration), the bound inside every
    inner solve, angular on the whole new factor, the losses of the final W."""
    m, n = A.shape
    k = w0.shape[1]
    LW = None if graph_W is None else graph_W.toarray()
    LH = None if graph_H is None else graph_H.toarray()
    w, d = w0.copy(), np.ones(k)
    hraw, inv_s, wraw = None, None, None
    losses = []
    spec = get_loss("nb")
    for _ in range(maxit):
        PH = np.zeros((k, k)) if hraw is None else _pen_gram((hraw * inv_s).T, L21[1], graph_lambda[1], LH)
        zg = None
        if hraw is not None:  # NB's per-row zero-gradient factors from the warm start
            zg = R_ / (R_ + w @ (hraw * inv_s * d).sum(axis=0) / n)
        X = np.zeros((n, k))
        for c in range(n):
            x0 = np.zeros(k) if hraw is None else hraw[c] * inv_s * d
            X[c] = _irls_vec(w, A[:, c], x0, R_, n_irls, hraw is None, PH, ub[1], zg)
        if angular[1] > 0:
            X = _angular(X.T, angular[1]).T
        hraw = X
        inv_s = 1.0 / (hraw.sum(axis=0) + 1e-15)
        hn = hraw * inv_s
        PW = _pen_gram(w.T, L21[0], graph_lambda[0], LW)
        Y = np.zeros((m, k))
        for i in range(m):
            x0 = np.zeros(k) if wraw is None else wraw[i]
            Y[i] = _irls_vec(hn, A[i], x0, R_, n_irls, wraw is None, PW, ub[0])
        if angular[0] > 0:
            Y = _angular(Y.T, angular[0]).T
        d = Y.sum(axis=0) + 1e-15
        w = Y / d
        wraw = Y
        mu = Y @ hn.T
        sel = A != 0
        losses.append(float(np.sum(spec.value(A[sel], mu[sel], size=R_))))
    return w, d, hn.T, np.array(losses)


def _data(seed=2):
    return dnmf.simulate_nmf(M_, N_, K_, seed=seed, distribution="nb", dispersion=4.0, mean=3.0).A


def _graph(size, seed):
    """A Laplacian of a random symmetric adjacency with a chain (connected)."""
    adj = sp.random(size, size, density=0.15, random_state=seed)
    adj = adj + adj.T + sp.diags(np.ones(size - 1), 1) + sp.diags(np.ones(size - 1), -1)
    return dnmf.laplacian(adj)


def _fit(A, k=K_, **kw):
    kw = {"seed": 1, "client": False, "tol": 1e-12, "solver": "exact", "irls_tol": 0.0, "sort_model": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dnmf.nmf(A, k, **kw)


#: one penalty on one side each, values large enough to move the fit visibly
CASES = {
    "L21_W": dict(L21=(0.5, 0.0)),
    "L21_H": dict(L21=(0.0, 0.5)),
    "angular_W": dict(angular=(0.4, 0.0)),
    "angular_H": dict(angular=(0.0, 0.4)),
    "upper_bound_W": dict(upper_bound=(3.0, 0.0)),
    "upper_bound_H": dict(upper_bound=(0.0, 4.0)),
    "graph_W": dict(graph_lambda=(2.0, 0.0)),
    "graph_H": dict(graph_lambda=(0.0, 2.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_penalty_matches_numpy_reference(case):
    A = _data()
    w0 = np.random.default_rng(5).uniform(size=(M_, K_))
    kw = dict(CASES[case])
    graphs = {"graph_W": _graph(M_, 1), "graph_H": _graph(N_, 2)}
    if case.startswith("graph"):
        kw[case] = graphs[case]
    model = _fit(A, loss="nb", dispersion="none", nb_size_max=R_, init=w0, maxit=4, irls_max_iter=3, **kw)
    ref = {("ub" if key == "upper_bound" else key): val for key, val in kw.items()}
    w, d, h, losses = reference_fit(A, w0, 4, 3, **ref)
    plain = reference_fit(A, w0, 4, 3)
    # active-set NNLS vs scipy nnls on well-conditioned 3 × 3 systems, 4 outer × 3 inner iterations
    # (as tests/test_irls.py): the two agree to ~1e-9 relative; 1e-6 leaves room for the rounding
    # carried through 12 weight updates, while every penalty moves W by far more (asserted below)
    np.testing.assert_allclose(model.w, w, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(model.d, d, rtol=1e-6)
    np.testing.assert_allclose(model.h, h, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-7)
    assert np.abs(plain[0] - w).max() > 1e-3  # the penalty changes the fit: the test can fail


def test_combined_penalties_two_workers_bitwise_and_bound():
    distributed = pytest.importorskip("distributed")
    A = sp.csc_matrix(_data(seed=4))
    w0 = np.random.default_rng(6).uniform(size=(M_, K_))
    kw = dict(loss="nb", init=w0, maxit=5, irls_max_iter=2, block_nnz=150, L21=(0.1, 0.2), angular=(0.2, 0.3),
              upper_bound=(5.0, 4.0), graph_lambda=(0.3, 0.4), graph_W=_graph(M_, 1), graph_H=_graph(N_, 2))
    local = _fit(A, **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        dist = _fit(A, **{**kw, "client": client})
    assert np.array_equal(dist.w, local.w) and np.array_equal(dist.h, local.h) and np.array_equal(dist.d, local.d)
    assert np.array_equal(dist.misc["loss_history"], local.misc["loss_history"])
    assert np.array_equal(np.asarray(dist.misc["dispersion"]), np.asarray(local.misc["dispersion"]))


def test_upper_bound_respected_and_binds():
    A = _data()
    free = _fit(A, loss="gp", maxit=10)
    bound = 0.5 * float((free.w * free.d).max())
    model = _fit(A, loss="gp", maxit=10, upper_bound=(bound, 0.0))
    assert (model.w * model.d).max() <= bound * (1 + 1e-12)  # the raw (solved) W
    assert (free.w * free.d).max() > 1.5 * bound  # the bound binds


def _offdiag_cos(W):
    Wn = W / np.linalg.norm(W, axis=0)
    C = Wn.T @ Wn
    return (C.sum() - np.trace(C)) / (C.shape[0] * (C.shape[0] - 1))


def test_larger_angular_lowers_w_cosine_under_nb():
    rng = np.random.default_rng(0)
    W = rng.random((60, 4)) + 0.5 * rng.random((60, 1))  # correlated factors
    A = rng.poisson(3.0 * W @ rng.random((4, 50))).astype(float)
    cos = [_offdiag_cos(_fit(A, k=4, loss="nb", maxit=25, solver="cd", angular=(lam, 0.0)).w)
           for lam in (0.0, 0.2, 1.0)]
    assert cos[0] > cos[1] > cos[2]


def test_masked_cv_gp_with_penalties():
    A = _data(seed=3)
    rng = np.random.default_rng(1)
    mask = rng.random(A.shape) < 0.1
    kw = dict(loss="gp", dispersion="none", mask=mask, test_fraction=0.2, maxit=6, L21=(0.2, 0.1),
              upper_bound=(6.0, 0.0), angular=(0.2, 0.2), graph_lambda=(0.5, 0.0), graph_W=_graph(M_, 3))
    model = _fit(A, **kw)
    B = A.copy()
    B[mask] = 1000.0  # a masked value must reach neither the solves (penalty terms included) nor the losses
    other = _fit(B, **kw)
    np.testing.assert_allclose(other.w, model.w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(other.misc["test_loss_history"], model.misc["test_loss_history"], rtol=1e-12)
    assert np.all(np.isfinite(model.misc["test_loss_history"])) and (model.w * model.d).max() <= 6.0 * (1 + 1e-12)
    plain = _fit(A, **{**kw, "L21": 0.0, "upper_bound": 0.0, "angular": 0.0, "graph_lambda": 0.0})
    assert np.abs(plain.w - model.w).max() > 1e-3  # the penalties act in the masked / CV fit


def test_kl_with_penalty_refused():
    A = _data()
    for name, val in (("L21", 0.1), ("angular", (0.0, 0.2)), ("upper_bound", 3.0)):
        with pytest.raises(InputError, match=f"'{name}' parameter of nmf must be 0 with loss='kl'.*no NNLS Gram"):
            dnmf.nmf(A, 2, loss="kl", **{name: val}, client=False)
    with pytest.raises(InputError, match="'angular' parameter of nmf must be 0 on the W side with zero-inflation"):
        dnmf.nmf(A, 2, loss="gp", zi="row", angular=(0.1, 0.0), client=False)


def test_checkpoint_resume_with_penalties_is_bitwise(tmp_path):
    """The H side's Gram term comes from the previous Ĥ and W's from the current W, both restored
    from the checkpoint: a resumed penalized fit is bitwise the uninterrupted one."""
    A = _data(seed=5)
    kw = dict(loss="nb", checkpoint_every=2, L21=0.2, angular=0.2, upper_bound=4.0, graph_lambda=(0.0, 0.5),
              graph_H=_graph(N_, 4))
    full = _fit(A, maxit=6, **kw)
    ck = tmp_path / "ck"
    _fit(A, maxit=3, checkpoint=ck, **kw)
    resumed = _fit(A, maxit=6, checkpoint=ck, resume=True, **kw)
    np.testing.assert_array_equal(resumed.w, full.w)
    np.testing.assert_array_equal(resumed.h, full.h)
    np.testing.assert_array_equal(resumed.misc["loss_history"], full.misc["loss_history"])
