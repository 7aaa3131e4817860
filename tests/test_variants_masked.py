"""Projective and symmetric NMF with missing entries: masks, NaN, mask="zeros", test sets, rank CV
(issue 9; docs/architecture.md, "Variants").

Reference: a plain-NumPy masked iteration written here (projection over the observed entries,
per-row masked NNLS by Cholesky-clip, L1 scaling, train/test means), from the same W₀. The §5.2
held-out set is the spec's hash (``holdout_mask``, a pure function of (i, j, seed)); planted
communities of a block-structured graph for the symmetric rank CV.
"""

from __future__ import annotations

import distributed
import numpy as np
import pytest
import scipy.linalg as sl
import scipy.sparse as sp

import dnmf
from dnmf.cv import cv_tasks, engine_init
from dnmf.exceptions import InputError
from dnmf.kernels.masked import holdout_mask

from flaky import FlakyExecutor

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

# Closed-form steps and Cholesky solves of k × k Grams (condition ≲ 1e4 here) computed in another
# order of sums (the library removes the missing rows' terms from the full Gram, the reference
# sums the observed ones): rounding differences only, far below 1e-8.
RTOL = 1e-8


def numpy_masked_variant(A, obs, test, w0, iters, mode):
    """The masked loop by hand. ``obs``: entries fitted (observed, not held out); ``test``: the
    entries scored as test. Projective: ``H = (W·diag(d))ᵀ (A ∘ obs)``; symmetric: ``H = Wᵀ``;
    then Ĥ = H / rowsums, each row of W the NNLS over its observed columns, W's columns scaled
    to unit L1 into d. Returns ``(w, d, model h, train means/SSE, test means)``."""
    a0 = np.where(obs, np.nan_to_num(A), 0.0)
    full = np.nan_to_num(A)
    w, d = w0.copy(), np.ones(w0.shape[1])
    k = w.shape[1]
    train, tests = [], []
    for _ in range(iters):
        h = (w * d).T @ a0 if mode == "projective" else w.T.copy()
        hn = h / (np.abs(h).sum(axis=1) + 1e-15)[:, None]
        raw = np.zeros_like(w)
        for i in range(A.shape[0]):
            o = obs[i]
            G = hn[:, o] @ hn[:, o].T + 1e-15 * np.eye(k)
            raw[i] = np.maximum(sl.cho_solve(sl.cho_factor(G, lower=True), hn[:, o] @ full[i, o]), 0.0)
        err = (full - raw @ hn) ** 2
        train.append(err[obs].sum())
        tests.append(err[test].sum() / max(test.sum(), 1))
        d = raw.sum(axis=0) + 1e-15
        w = raw / d
    model_h = w.T if mode == "symmetric" else hn
    return w, d, model_h, np.array(train), np.array(tests)


def _pairs(ordered):
    """Symmetric NMF's held-out set: the unordered pair {i, j} by the hash of (min, max)."""
    up = np.triu(ordered)
    return up | up.T


def _lowrank(m, n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.gamma(1.0, 1.0, (m, k)) @ rng.gamma(1.0, 1.0, (k, n)), rng


def _held(m, n, seed, frac):
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    return holdout_mask(i.ravel(), j.ravel(), seed, frac).reshape(m, n)


def _fit(A, k, w0, **kw):
    return dnmf.nmf(A, k, init=w0, tol=0, patience=1000, sort_model=False, client=False, **kw)


def _check(model, ref, cv):
    w, d, h, train, test = ref
    np.testing.assert_allclose(model.w, w, rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(model.d, d, rtol=RTOL)
    np.testing.assert_allclose(model.h, h, rtol=RTOL, atol=1e-13)
    hist = np.asarray(model.misc["loss_history"])
    if cv:  # CV losses are means (§4.3): train SSE / number of train entries
        np.testing.assert_allclose(hist, train / cv, rtol=RTOL)
        np.testing.assert_allclose(model.misc["test_loss_history"], test, rtol=RTOL)
    else:
        np.testing.assert_allclose(hist, train, rtol=RTOL)


@pytest.mark.parametrize("sparse", [False, True])
def test_projective_user_mask_matches_numpy(sparse):
    A, rng = _lowrank(30, 36, 3, 0)
    mask = rng.uniform(size=A.shape) < 0.15
    w0 = rng.uniform(size=(30, 3))
    model = _fit(sp.csc_matrix(A) if sparse else A, 3, w0, projective=True, mask=mask, maxit=6, block_nnz=300)
    _check(model, numpy_masked_variant(A, ~mask, np.zeros_like(mask), w0, 6, "projective"), cv=None)


def test_projective_test_set_matches_numpy():
    A, rng = _lowrank(30, 36, 3, 1)
    w0 = rng.uniform(size=(30, 3))
    model = _fit(A, 3, w0, projective=True, test_fraction=0.2, cv_seed=7, maxit=6, block_nnz=300)
    held = _held(30, 36, 7, 0.2)
    assert 0.1 < held.mean() < 0.3
    _check(model, numpy_masked_variant(A, ~held, held, w0, 6, "projective"), cv=(~held).sum())


def test_projective_nan_and_zeros_match_numpy():
    A, rng = _lowrank(30, 36, 3, 2)
    w0 = rng.uniform(size=(30, 3))
    nan = rng.uniform(size=A.shape) < 0.1
    An = A.copy()
    An[nan] = np.nan
    model = _fit(An, 3, w0, projective=True, maxit=5, block_nnz=300)
    _check(model, numpy_masked_variant(An, ~nan, np.zeros_like(nan), w0, 5, "projective"), cv=None)
    Az = A * (rng.uniform(size=A.shape) < 0.6)
    model = _fit(sp.csc_matrix(Az), 3, w0, projective=True, mask="zeros", maxit=5, block_nnz=300)
    _check(model, numpy_masked_variant(Az, Az != 0, np.zeros(Az.shape, bool), w0, 5, "projective"), cv=None)


def test_projective_cv_ignores_held_out_values():
    # H is the projection over the observed entries only (unlike RcppML §7, which projects the
    # full A): changing every held-out value leaves the fit bitwise unchanged.
    A, rng = _lowrank(30, 36, 3, 3)
    w0 = rng.uniform(size=(30, 3))
    held = _held(30, 36, 5, 0.2)
    B = A.copy()
    B[held] = rng.uniform(50, 100, size=held.sum())
    kw = dict(projective=True, test_fraction=0.2, cv_seed=5, maxit=5, block_nnz=300)
    ma, mb = _fit(A, 3, w0, **kw), _fit(B, 3, w0, **kw)
    np.testing.assert_array_equal(ma.w, mb.w)
    np.testing.assert_array_equal(ma.d, mb.d)
    np.testing.assert_array_equal(ma.h, mb.h)
    # the train loss is the same sum taken as ‖row‖² minus its masked part: rounding only
    np.testing.assert_allclose(ma.misc["loss_history"], mb.misc["loss_history"], rtol=1e-9)
    assert np.all(np.asarray(mb.misc["test_loss_history"]) > 10 * np.asarray(ma.misc["test_loss_history"]))


def _sym(n, k, seed):
    rng = np.random.default_rng(seed)
    f = rng.gamma(1.0, 1.0, (n, k))
    return f @ f.T, rng


def test_symmetric_symmetric_mask_matches_numpy():
    S, rng = _sym(32, 3, 4)
    upper = np.triu(rng.uniform(size=S.shape) < 0.15)
    mask = upper | upper.T
    w0 = rng.uniform(size=(32, 3))
    model = _fit(S, 3, w0, symmetric=True, mask=mask, maxit=6, block_nnz=300)
    _check(model, numpy_masked_variant(S, ~mask, np.zeros_like(mask), w0, 6, "symmetric"), cv=None)
    np.testing.assert_array_equal(model.h, model.w.T)


def test_symmetric_test_set_matches_numpy():
    S, rng = _sym(32, 3, 5)
    w0 = rng.uniform(size=(32, 3))
    model = _fit(S, 3, w0, symmetric=True, test_fraction=0.2, cv_seed=3, maxit=6, block_nnz=300)
    ordered = _held(32, 32, 3, 0.2)
    assert not np.array_equal(ordered, ordered.T)  # the §5.2 hash is not symmetric in (i, j)
    held = _pairs(ordered)
    _check(model, numpy_masked_variant(S, ~held, held, w0, 6, "symmetric"), cv=(~held).sum())


def test_symmetric_cv_ignores_held_out_pairs():
    # the pair set holds out a_ij with its twin a_ji: changing both leaves the fit unchanged
    S, rng = _sym(30, 3, 11)
    w0 = rng.uniform(size=(30, 3))
    held = _pairs(_held(30, 30, 6, 0.2))
    B = S.copy()
    B[held] = 0.0
    B += np.where(held, 1.0, 0.0) * 80.0
    kw = dict(symmetric=True, test_fraction=0.2, cv_seed=6, maxit=5, block_nnz=300)
    ma, mb = _fit(S, 3, w0, **kw), _fit(B, 3, w0, **kw)
    np.testing.assert_array_equal(ma.w, mb.w)
    np.testing.assert_array_equal(ma.h, mb.h)
    assert np.all(np.asarray(mb.misc["test_loss_history"]) > 10 * np.asarray(ma.misc["test_loss_history"]))


def test_symmetric_nan_on_one_side_is_accepted():
    # symmetry is checked on the pairs observed on both sides: a NaN at (i, j) frees a_ji
    S, rng = _sym(20, 2, 6)
    S[3, 7] = np.nan
    S[7, 3] += 5.0
    w0 = rng.uniform(size=(20, 2))
    nan = np.isnan(S)
    model = _fit(S, 2, w0, symmetric=True, maxit=4)
    _check(model, numpy_masked_variant(S, ~nan, np.zeros_like(nan), w0, 4, "symmetric"), cv=None)


def _block_graph(seed, n_per=25, k=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per)
    p = np.where(labels[:, None] == labels[None, :], 0.5, 0.05)
    up = np.triu(rng.uniform(size=p.shape) < p, 1)
    return (up | up.T).astype(float)


def test_symmetric_cv_finds_the_planted_rank():
    # 4 planted communities (p_in 0.5, p_out 0.05) of 25 nodes; rank CV of symmetric NMF on a
    # 10 % held-out set, 2 replicates: the mean held-out MSE is lowest at k = 4
    A = _block_graph(0)
    cv = dnmf.nmf(A, [2, 3, 4, 5, 6], symmetric=True, test_fraction=0.1, cv_seed=[1, 2], seed=1, maxit=100,
                  tol=1e-5, client=False)
    assert cv.best_k == 4, cv.table


@pytest.fixture(scope="module")
def client2():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


def test_projective_rank_cv_on_a_cluster_equals_in_process(client2):
    A, _ = _lowrank(40, 60, 3, 8)
    kw = dict(projective=True, test_fraction=0.1, cv_seed=[1, 2], seed=1, maxit=10, tol=1e-6, block_nnz=600)
    local = dnmf.nmf(A, [2, 3, 4], client=False, **kw)
    dist = dnmf.nmf(A, [2, 3, 4], client=client2, **kw)
    cols = ["train_mse", "test_mse", "best_iter", "total_iter"]
    # same blocks, same per-block arithmetic, sums in block order: bitwise on any executor
    np.testing.assert_array_equal(local.table[cols].to_numpy(), dist.table[cols].to_numpy())
    # in-process the ranks of a replicate share each pass (fit_masked_many); on the cluster each
    # task is its own nmf() fit: the equality above is also "shared passes = single fits". The
    # single fit of one task by hand, to the same digits:
    task = next(t for t in cv_tasks([2, 3, 4], (1, 2)) if t.k == 3 and t.cv_seed == 2)
    one = dnmf.nmf(A, 3, init=engine_init(40, 3, task.init_seed), seed=task.init_seed, projective=True,
                   test_fraction=0.1, cv_seed=2, maxit=10, tol=1e-6, block_nnz=600, client=False)
    row = local.table[(local.table.k == 3) & (local.table.cv_seed == 2)]
    assert float(row.test_mse.iloc[0]) == float(one.misc["test_loss"])
    assert int(row.total_iter.iloc[0]) == one.misc["iter"]


def test_symmetric_fit_on_a_cluster_equals_in_process(client2):
    S, rng = _sym(30, 3, 9)
    w0 = rng.uniform(size=(30, 3))
    kw = dict(symmetric=True, test_fraction=0.2, cv_seed=4, maxit=5, block_nnz=200)
    local = _fit(S, 3, w0, **kw)
    dist = dnmf.nmf(S, 3, init=w0, tol=0, patience=1000, sort_model=False, client=client2, **kw)
    np.testing.assert_array_equal(local.w, dist.w)
    np.testing.assert_array_equal(local.misc["test_loss_history"], dist.misc["test_loss_history"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(projective=True, symmetric=True, test_fraction=0.1), "'symmetric' parameter .*projective=True"),
    (dict(symmetric=True, test_fraction=0.1, A="rect"), "'symmetric' parameter .*non-square.*12 × 10"),
    (dict(symmetric=True, mask="M", A="asym"), "'symmetric' parameter .*non-symmetric.*both are observed"),
    (dict(projective=True, test_fraction=0.1, target_H="T"), "'projective' parameter .*target_H"),
    (dict(projective=True, test_fraction=0.1, loss="kl"), "'projective' parameter .*loss=\"kl\""),
    (dict(symmetric=True, mask="zeros", loss="gp"), "'symmetric' parameter .*loss='gp'"),
    (dict(projective=True, test_fraction=0.1, L21=0.1), "'L21' parameter .*projective=True"),
])
def test_what_stays_refused(kwargs, match):
    S, rng = _sym(12, 2, 10)
    A = {"rect": S[:, :10], "asym": S + np.triu(np.ones_like(S), 1)}.get(kwargs.pop("A", None), S)
    if kwargs.get("mask") == "M":
        kwargs["mask"] = np.eye(12, dtype=bool)  # the diagonal only: the off-diagonal asymmetry is observed
    if kwargs.get("target_H") == "T":
        kwargs["target_H"] = rng.uniform(size=(2, 12))
    with pytest.raises(InputError, match=match):
        dnmf.nmf(A, 2, seed=1, maxit=2, client=False, **kwargs)


@pytest.mark.parametrize("variant", ["projective", "symmetric"])
@pytest.mark.parametrize("verb, at", [("map_blocks", 6), ("gather", 4)])
def test_lost_worker_recovers_bitwise(variant, verb, at):
    # W and H stay on the client between iterations: a lost worker costs the re-placement of the
    # blocks and a redo of the iteration from the same W and H — bitwise the undisturbed fit
    from dnmf.engine.als import ALSOptions
    from dnmf.engine.executor import LocalExecutor
    from dnmf.engine.masked import MaskOptions, fit_masked
    from dnmf.io import as_blocked

    S, rng = _sym(30, 3, 12)
    w0 = rng.uniform(size=(30, 3))
    blocked = as_blocked(sp.csc_matrix(S), block_nnz=200)
    opts = ALSOptions(k=3, tol=0.0, maxit=5, **{variant: True})
    mo = MaskOptions(test_fraction=0.2, cv_seed=3)
    ref, ref_ht = fit_masked(blocked, w0, opts, mo, LocalExecutor(1))
    flaky = FlakyExecutor(verb, at)
    state, ht = fit_masked(blocked, w0, opts, mo, flaky)
    assert flaky.calls >= at  # the failure happened
    np.testing.assert_array_equal(state.w, ref.w)
    np.testing.assert_array_equal(np.concatenate(ht), np.concatenate(ref_ht))
    assert state.test_history == ref.test_history


def test_symmetric_zeros_and_test_set_match_numpy():
    # mask="zeros" on a sparse graph-like S: only stored entries are observed, the pairs are
    # held out among them; the reference fits stored & not held, scores stored & held
    S, rng = _sym(32, 3, 13)
    up = np.triu(rng.uniform(size=S.shape) < 0.5)
    S = S * (up | up.T)
    w0 = rng.uniform(size=(32, 3))
    model = _fit(sp.csc_matrix(S), 3, w0, symmetric=True, mask="zeros", test_fraction=0.2, cv_seed=8, maxit=5,
                 block_nnz=200)
    held = _pairs(_held(32, 32, 8, 0.2))
    stored = S != 0
    obs = stored & ~held
    _check(model, numpy_masked_variant(S, obs, stored & held, w0, 5, "symmetric"), cv=obs.sum())
    assert model.misc["n_test"] == (stored & held).sum()


def test_symmetric_w_side_angular_scores_the_pair_set():
    # the W side's angular map is followed by a scoring row pass: it must score the same pair set
    S, rng = _sym(30, 3, 14)
    model = dnmf.nmf(S, 3, symmetric=True, angular=(0.1, 0.0), test_fraction=0.2, cv_seed=2, seed=1, maxit=4,
                     client=False)
    assert model.misc["n_test"] == _pairs(_held(30, 30, 2, 0.2)).sum()


@pytest.mark.parametrize("zeros", [False, True])
def test_symmetric_shared_passes_equal_single_fits(zeros):
    # the ranks of a replicate share each pass (the pair set listed once per block by
    # holdout_pattern); each must be bitwise the single fit (which hashes the pairs in the kernel)
    S, rng = _sym(36, 3, 15)
    if zeros:
        up = np.triu(rng.uniform(size=S.shape) < 0.5)
        S = S * (up | up.T)
    kw = dict(symmetric=True, test_fraction=0.2, maxit=6, tol=1e-6, block_nnz=300, mask="zeros" if zeros else None)
    cv = dnmf.nmf(sp.csc_matrix(S), [2, 3], cv_seed=[4], seed=1, client=False, **kw)
    for task in cv_tasks([2, 3], (4,)):
        one = dnmf.nmf(sp.csc_matrix(S), task.k, init=engine_init(36, task.k, task.init_seed), seed=task.init_seed,
                       cv_seed=4, client=False, **kw)
        row = cv.table[cv.table.k == task.k]
        assert float(row.test_mse.iloc[0]) == float(one.misc["test_loss"])
        assert float(row.train_mse.iloc[0]) == float(one.misc["train_loss"])


def test_rank_cv_grid_refuses_what_a_single_fit_refuses():
    # the shared passes of a CV grid run the single fit's checks (core._fit_shared)
    S, _ = _sym(12, 2, 16)
    with pytest.raises(InputError, match="'L21' parameter .*projective=True"):
        dnmf.nmf(S, [2, 3], projective=True, L21=0.1, test_fraction=0.1, cv_seed=[1], maxit=2, client=False)
    with pytest.raises(InputError, match="'symmetric' parameter .*non-symmetric"):
        dnmf.nmf(S + np.triu(np.ones_like(S), 1), [2, 3], symmetric=True, test_fraction=0.1, cv_seed=[1], maxit=2,
                 client=False)
