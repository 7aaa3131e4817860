"""Projective and symmetric NMF (issue 9, RcppML §7).

References: plain-NumPy iterations written here (Cholesky-clip NNLS, L1 scaling), the RcppML
vignette's aml table (spec §13.4, reproduced from RcppML's own start with ``r_rng=True``), and
planted communities of a block-structured graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
import scipy.sparse as sp

import dnmf
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def _nnls_clip(G, B):
    return np.maximum(sl.cho_solve(sl.cho_factor(G, lower=True), B), 0)


def numpy_variant(A, w0, iters, mode):
    """RcppML §7 by hand: projective H = diag(d)·WᵀA; symmetric H = Wᵀ; then the W update."""
    w, d = w0.copy(), np.ones(w0.shape[1])
    k = w.shape[1]
    for _ in range(iters):
        h = (w * d).T @ A if mode == "projective" else w.T.copy()
        h = h / (h.sum(axis=1) + 1e-15)[:, None]
        w = _nnls_clip(h @ h.T + 1e-15 * np.eye(k), h @ A.T).T
        d = w.sum(axis=0) + 1e-15
        w = w / d
    return w, d, h


@pytest.mark.parametrize("sparse", [False, True])
def test_projective_matches_numpy(sparse):
    rng = np.random.default_rng(0)
    A = rng.gamma(1.0, 1.0, (50, 4)) @ rng.gamma(1.0, 1.0, (4, 70))
    w0 = rng.uniform(size=(50, 4))
    model = dnmf.nmf(sp.csc_matrix(A) if sparse else A, 4, init=w0, projective=True, tol=0, maxit=8,
                     sort_model=False, block_nnz=700, client=False)
    w, d, h = numpy_variant(A, w0, 8, "projective")
    # closed-form steps in another order of sums: rounding only
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(model.d, d, rtol=1e-9)
    np.testing.assert_allclose(model.h, h, rtol=1e-9, atol=1e-13)


def test_projective_reproduces_the_vignette_on_aml():
    # Spec §13.4 (vignette): standard vs projective on aml, k = 6, seed = 42, tol = 1e-5:
    # W orthogonality (mean of |cosine| with a zero diagonal, over all k² cells) 0.583 vs 0.188,
    # W sparsity 0.082 vs 0.454, evaluate() MSE 2.15e-2 vs 4.13e-1 — from RcppML's start
    # (r_rng), to the table's printed digits.
    A = dnmf.datasets.load_aml().X

    def ortho(w):
        c = np.abs(dnmf.cosine(w, w))
        np.fill_diagonal(c, 0)
        return float(c.mean())

    std = dnmf.nmf(A, 6, seed=42, r_rng=True, tol=1e-5, client=False)
    proj = dnmf.nmf(A, 6, seed=42, r_rng=True, tol=1e-5, projective=True, client=False)
    assert round(ortho(std.w), 3) == 0.583 and round(ortho(proj.w), 3) == 0.188
    assert round(float(np.mean(std.w == 0)), 3) == 0.082 and round(float(np.mean(proj.w == 0)), 3) == 0.454
    assert f"{std.evaluate(A):.2e}" == "2.15e-02" and f"{proj.evaluate(A):.2e}" == "4.13e-01"


@pytest.fixture(scope="module")
def graph():
    """A kNN-like graph of 3 planted communities: dense within, sparse noise across."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), [40, 30, 50])
    n = labels.size
    p = np.where(labels[:, None] == labels[None, :], 0.5, 0.02)
    upper = np.triu(rng.uniform(size=(n, n)) < p, 1)
    adj = (upper | upper.T).astype(float) * np.triu(rng.uniform(0.5, 1.5, (n, n)), 1)
    adj = adj + adj.T
    return sp.csc_matrix(adj), labels


def test_symmetric_matches_numpy_and_recovers_communities(graph):
    A, labels = graph
    w0 = np.random.default_rng(1).uniform(size=(A.shape[0], 3))
    model = dnmf.nmf(A, 3, init=w0, symmetric=True, tol=0, maxit=10, sort_model=False, block_nnz=800,
                     client=False)
    w, d, _ = numpy_variant(A.toarray(), w0, 10, "symmetric")
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(model.d, d, rtol=1e-9)
    np.testing.assert_array_equal(model.h, model.w.T)  # A ≈ W diag(d) Wᵀ
    # every planted community is one factor (ARI 1 up to a permutation of factor labels)
    from sklearn.metrics import adjusted_rand_score

    fit = dnmf.nmf(A, 3, seed=1, symmetric=True, client=False)
    assert adjusted_rand_score(labels, fit.w.argmax(axis=1)) == 1.0


def test_variants_refuse_bad_input(graph):
    A, _ = graph
    with pytest.raises(InputError, match="'symmetric' parameter .*projective"):
        dnmf.nmf(A, 3, projective=True, symmetric=True, client=False)
    with pytest.raises(InputError, match="'symmetric' parameter .*non-square"):
        dnmf.nmf(A[:, :50], 3, symmetric=True, client=False)
    B = A.tolil()
    B[0, 5] = 3.0
    B[5, 0] = 0.0
    with pytest.raises(InputError, match="'symmetric' parameter .*non-symmetric"):
        dnmf.nmf(B.tocsc(), 3, symmetric=True, client=False)
    # masks, NaN and test sets: tests/test_variants_masked.py


def test_variants_on_a_cluster_match_in_process(graph):
    distributed = pytest.importorskip("distributed")
    A, _ = graph
    kw = dict(seed=2, maxit=6, tol=0, block_nnz=800)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        for variant in ("projective", "symmetric"):
            here = dnmf.nmf(A, 3, client=False, **{variant: True}, **kw)
            there = dnmf.nmf(A, 3, client=client, **{variant: True}, **kw)
            np.testing.assert_array_equal(here.w, there.w)  # fixed reduction tree: bitwise
            np.testing.assert_array_equal(here.h, there.h)
