"""NMF under the KL (Poisson) loss on the blocked engine (issue 9): ``nmf(loss="kl")``.

References: the Lee–Seung multiplicative updates in plain NumPy (written here), scikit-learn's
``NMF(beta_loss="kullback-leibler", solver="mu")``, and planted Poisson factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def kl_divergence(A, mu):
    A = np.asarray(A.toarray() if sp.issparse(A) else A)
    pos = A > 0
    return float((A[pos] * np.log(A[pos] / mu[pos])).sum() - A.sum() + mu.sum())


def numpy_mu(A, w0, iters):
    """Lee–Seung KL updates, W's columns kept at unit L1 norm (the scale in H); H starts at colsum/k."""
    A = np.asarray(A, dtype=float)
    k = w0.shape[1]
    w = w0 / w0.sum(axis=0)
    h = np.repeat(A.sum(axis=0)[None, :] / k, k, axis=0)
    losses = []
    for _ in range(iters):
        h = h * (w.T @ (A / np.maximum(w @ h, 1e-12)))  # Wᵀ1 = 1
        mu = np.maximum(w @ h, 1e-12)
        losses.append(kl_divergence(A, w @ h))
        w = w * ((A / mu) @ h.T) / h.sum(axis=1)[None, :]
        s = w.sum(axis=0)
        w, h = w / s, h * s[:, None]
    d = h.sum(axis=1)
    return w, d, h / d[:, None], np.array(losses)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    m, n, k = 120, 200, 4
    W = rng.gamma(0.5, 1.0, (m, k))
    H = rng.gamma(0.5, 1.0, (k, n))
    A = rng.poisson(W @ H).astype(float)
    return sp.csc_matrix(A), W, rng.uniform(size=(m, k))


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_matches_numpy_multiplicative_updates(planted, sparse):
    A, _, w0 = planted
    model = dnmf.nmf(A if sparse else A.toarray(), 4, init=w0, loss="kl", tol=0, maxit=12, sort_model=False,
                     block_nnz=2000, client=False)
    w, d, h, losses = numpy_mu(A.toarray(), w0, 12)
    # the same multiplicative steps with sums in another order: rounding only
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(model.d, d, rtol=1e-9)
    np.testing.assert_allclose(model.h, h, rtol=1e-9, atol=1e-14)
    # the reported objective of an iteration is the divergence of (its new H, the W it started from)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-9)
    assert model.misc["loss_type"] == "kl"


def test_kl_objective_decreases_recovers_factors_and_beats_sklearn(planted):
    A, W, _ = planted
    model = dnmf.nmf(A, 4, loss="kl", seed=1, tol=1e-7, maxit=300, client=False)
    hist = model.misc["loss_history"]
    # Lee–Seung steps never increase the divergence (up to rounding of a ~1e4 sum: 1e-9 relative)
    assert np.all(np.diff(hist) <= 1e-9 * hist[0])
    final = kl_divergence(A, model.w @ np.diag(model.d) @ model.h)
    assert final <= hist[-1] * (1 + 1e-12)  # the W half-step of the last iteration lowers it further
    # planted Poisson factors: every factor found (matched cosine ≥ 0.9)
    match = dnmf.bipartite_match(1 - dnmf.cosine(model.w, W))
    assert np.all(dnmf.cosine(model.w, W)[np.arange(4), match.assignment] >= 0.9)
    from sklearn.decomposition import NMF

    sk = NMF(4, beta_loss="kullback-leibler", solver="mu", init="random", random_state=1, max_iter=300,
             tol=1e-7).fit(A.T)
    mu_sk = (sk.transform(A.T) @ sk.components_).T
    # both converge to a local optimum from different starts; dnmf's must be at least as good
    # up to 0.1 % (measured lower on this matrix), else the updates are wrong
    assert final <= kl_divergence(A, mu_sk) * 1.001


def test_kl_is_the_same_on_two_workers(planted):
    distributed = pytest.importorskip("distributed")
    A, _, w0 = planted
    here = dnmf.nmf(A, 4, init=w0, loss="kl", tol=0, maxit=8, block_nnz=2000, client=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        there = dnmf.nmf(A, 4, init=w0, loss="kl", tol=0, maxit=8, block_nnz=2000, client=client)
    np.testing.assert_array_equal(here.w, there.w)  # block-order sums: bitwise
    np.testing.assert_array_equal(here.misc["loss_history"], there.misc["loss_history"])


def test_kl_refuses_what_it_does_not_fit(planted):
    A, _, _ = planted
    for kw, name in ((dict(test_fraction=0.1), "test_fraction"), (dict(L1=0.1), "L1"),
                     (dict(mask="zeros"), "mask_zeros"), (dict(projective=True), "projective")):
        with pytest.raises(InputError, match=f"'{name}' parameter of nmf .*loss=\"kl\""):
            dnmf.nmf(A, 3, loss="kl", client=False, **kw)
    with pytest.raises(InputError, match="'loss' parameter"):
        dnmf.nmf(A, 3, loss="poisson", client=False)
