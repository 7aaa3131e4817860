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

from flaky import FlakyExecutor

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def kl_divergence(A, mu):
    A = np.asarray(A.toarray() if sp.issparse(A) else A)
    pos = A > 0
    return float((A[pos] * np.log(A[pos] / mu[pos])).sum() - A.sum() + mu.sum())


def lsq_start(A0, obs, w):
    """The first H: each column's NNLS (scipy) on its observed rows given W₀, every entry then
    raised to 1 % of its column's mean (``engine/kl.py::lsq_start``)."""
    from scipy.optimize import nnls

    h = np.zeros((w.shape[1], A0.shape[1]))
    for c in range(A0.shape[1]):
        o = obs[:, c]
        if o.any():
            h[:, c] = nnls(w[o], A0[o, c])[0]
    return np.maximum(h, 0.01 * h.mean(axis=0, keepdims=True))


def numpy_mu(A, w0, iters):
    """Lee–Seung KL updates, W's columns kept at unit L1 norm (the scale in H); H starts at
    :func:`lsq_start`. Returns the factors and the divergence after each iteration."""
    A = np.asarray(A, dtype=float)
    w = w0 / w0.sum(axis=0)
    h = lsq_start(A, np.ones(A.shape, dtype=bool), w)
    losses = []
    for _ in range(iters):
        h = h * (w.T @ (A / np.maximum(w @ h, 1e-12)))  # Wᵀ1 = 1
        mu = np.maximum(w @ h, 1e-12)
        w = w * ((A / mu) @ h.T) / h.sum(axis=1)[None, :]
        s = w.sum(axis=0)
        w, h = w / s, h * s[:, None]
        losses.append(kl_divergence(A, w @ h))
    d = h.sum(axis=1)
    return w, d, h / d[:, None], np.array(losses)


def masked_kl(A, mu, obs):
    """Σ a log(a/μ) − a + μ over the entries where ``obs`` is True."""
    a, u = A[obs], mu[obs]
    pos = a > 0
    return float((a[pos] * np.log(a[pos] / u[pos])).sum() - a.sum() + u.sum())


def numpy_masked_mu(A, obs, w0, iters, L1=(0.0, 0.0), L2=(0.0, 0.0), test=None):
    """Masked (penalized) Lee–Seung updates in plain NumPy: only entries with ``obs`` True enter.

    ``h ← h ∘ Wᵀ(M∘A/μ) / (WᵀM + L1_H + L2_H·h)``,
    ``W ← W ∘ (M∘A/μ)Hᵀ / (MHᵀ + L1_W + L2_W·W)``,
    W's columns rescaled to unit L1 norm (the scale in H); H starts at :func:`lsq_start` on the
    observed entries. Returns the factors, the observed divergence after each iteration and, with a
    ``test`` mask, the mean divergence over it after each iteration.
    """
    M = obs.astype(float)
    A0 = np.where(obs, np.nan_to_num(A), 0.0)
    w = w0 / w0.sum(axis=0)
    h = lsq_start(A0, obs, w)
    losses, tests = [], []
    for _ in range(iters):
        den = w.T @ M + L1[1] + L2[1] * h
        h = h * (w.T @ (A0 / np.maximum(w @ h, 1e-12))) / den
        den = M @ h.T + L1[0] + L2[0] * w
        w = w * ((A0 / np.maximum(w @ h, 1e-12)) @ h.T) / den
        s = w.sum(axis=0)
        w, h = w / s, h * s[:, None]
        losses.append(masked_kl(A, w @ h, obs))
        if test is not None:
            tests.append(masked_kl(A, w @ h, test) / test.sum())
    return w, h, np.array(losses), np.array(tests)


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
    # the reported objective of an iteration is the divergence of its factors
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-9)
    assert model.misc["loss_type"] == "kl"


def test_kl_objective_decreases_recovers_factors_and_beats_sklearn(planted):
    A, W, _ = planted
    model = dnmf.nmf(A, 4, loss="kl", seed=1, tol=1e-7, maxit=300, client=False)
    hist = model.misc["loss_history"]
    # Lee–Seung steps never increase the divergence (up to rounding of a ~1e4 sum: 1e-9 relative)
    assert np.all(np.diff(hist) <= 1e-9 * hist[0])
    final = kl_divergence(A, model.w @ np.diag(model.d) @ model.h)
    assert final == pytest.approx(hist[-1], rel=1e-10)  # the last recorded objective is the model's
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
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        there = dnmf.nmf(A, 4, init=w0, loss="kl", tol=0, maxit=8, block_nnz=2000, client=client)
    np.testing.assert_array_equal(here.w, there.w)  # block-order sums: bitwise
    np.testing.assert_array_equal(here.misc["loss_history"], there.misc["loss_history"])


@pytest.fixture(scope="module")
def small():
    """A small planted Poisson matrix, a user mask of 5 % of its entries and a start W₀."""
    rng = np.random.default_rng(3)
    m, n, k = 40, 60, 3
    A = rng.poisson(rng.gamma(0.7, 1.0, (m, k)) @ rng.gamma(0.7, 1.0, (k, n)) * 2).astype(float)
    mask = rng.uniform(size=(m, n)) < 0.05
    return A, mask, rng.uniform(size=(m, k))


def _fit(A, k, w0, **kw):
    kw = dict(dict(init=w0, loss="kl", tol=0, sort_model=False, block_nnz=300, client=False), **kw)
    return dnmf.nmf(A, k, **kw)


def _holdout(shape, cv_seed, fraction):
    from dnmf.kernels.masked import holdout_mask

    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return holdout_mask(rows.ravel(), cols.ravel(), cv_seed, fraction).reshape(shape)


@pytest.mark.parametrize("sparse", [True, False])
def test_masked_kl_matches_numpy_and_nan(small, sparse):
    A, mask, w0 = small
    data = sp.csc_matrix(A) if sparse else A
    model = _fit(data, 3, w0, mask=sp.csc_matrix(mask), maxit=15)
    w, h, losses, _ = numpy_masked_mu(A, ~mask, w0, 15)
    # the same multiplicative steps with sums in another order (the denominators as colsum − the
    # missing rows' sum), from a first H solved two ways (normal equations of the masked Gram with
    # a 1e-12 ridge against scipy's nnls on the observed rows, ~1e-12 apart): rounding only,
    # amplified by 15 iterations — measured ≤ 1.5e-10
    np.testing.assert_allclose(model.w, w, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(model.h * model.d[:, None], h, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-10)
    assert model.misc["loss"] == pytest.approx(masked_kl(A, model.w * model.d @ model.h, ~mask), rel=1e-10)
    # the masked divergence never increases (rounding of a ~1e3 sum: 1e-10 relative)
    assert np.all(np.diff(losses) <= 1e-10 * losses[0])
    # a masked entry and a NaN entry are the same missing entry; the stored NaN change the
    # nnz, hence the column blocks and the order of the block sums: rounding only
    nan = np.where(mask, np.nan, A)
    other = _fit(sp.csc_matrix(nan) if sparse else nan, 3, w0, maxit=15)
    np.testing.assert_allclose(other.w, model.w, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(other.misc["loss_history"], model.misc["loss_history"], rtol=1e-13)


@pytest.mark.parametrize("with_matrix", [False, True])
def test_kl_mask_zeros_matches_numpy(small, with_matrix):
    A, mask, w0 = small
    if with_matrix:  # zeros missing, plus a user mask and NaN entries
        nan = np.zeros_like(mask)
        nan[::7, ::5] = True
        data, obs = np.where(nan, np.nan, A), (A > 0) & ~mask & ~nan
        model = _fit(sp.csc_matrix(data), 3, w0, mask=("zeros", sp.csc_matrix(mask)), maxit=12)
    else:
        obs = A > 0  # only stored entries are observed
        model = _fit(sp.csc_matrix(A), 3, w0, mask="zeros", maxit=12)
    w, h, losses, _ = numpy_masked_mu(A, obs, w0, 12)
    np.testing.assert_allclose(model.w, w, rtol=1e-10, atol=1e-14)  # rounding only (as above)
    np.testing.assert_allclose(model.misc["loss_history"], losses, rtol=1e-10)


def test_kl_l2_matches_numpy_and_shrinks(small):
    A, mask, w0 = small
    L2 = (0.2, 0.1)
    model = _fit(sp.csc_matrix(A), 3, w0, mask=sp.csc_matrix(mask), maxit=15, L2=L2)
    w, h, _, _ = numpy_masked_mu(A, ~mask, w0, 15, L2=L2)
    np.testing.assert_allclose(model.w, w, rtol=1e-10, atol=1e-14)  # rounding only (as above)
    np.testing.assert_allclose(model.h * model.d[:, None], h, rtol=1e-10, atol=1e-14)
    plain = _fit(A, 3, w0, maxit=200)
    ridge = _fit(A, 3, w0, maxit=200, L2=(0.0, 0.5))
    hp, hr = plain.h * plain.d[:, None], ridge.h * ridge.d[:, None]
    # L2 on H shrinks its large entries (sum of squares measured 5.6e5 → 2.9e5) at the cost of the fit
    assert np.square(hr).sum() < 0.7 * np.square(hp).sum()
    assert ridge.misc["loss"] > plain.misc["loss"]


@pytest.mark.parametrize("zeros", [False, True])
def test_kl_cross_validation_losses(small, zeros):
    A, mask, w0 = small
    frac, cv_seed = 0.1, 7
    nan = np.where(mask, np.nan, A)
    extra = dict(mask="zeros") if zeros else {}
    model = _fit(sp.csc_matrix(nan), 3, w0, maxit=25, test_fraction=frac, cv_seed=cv_seed, patience=100, **extra)
    held = _holdout(A.shape, cv_seed, frac)
    observed = ~mask & (A > 0) if zeros else ~mask  # with mask="zeros" only stored entries (held out or not)
    test, train = held & observed, ~held & observed
    w, h, losses, tests = numpy_masked_mu(A, train, w0, 25, test=test)
    misc = model.misc
    assert misc["n_test"] == test.sum()
    # train: the mean divergence over the training entries; test: over the held-out ones (means, as
    # the squared-error masked loop); per iteration against the NumPy reference, rounding only
    np.testing.assert_allclose(misc["loss_history"], losses / train.sum(), rtol=1e-10)
    np.testing.assert_allclose(misc["test_loss_history"], tests, rtol=1e-10)
    mu = model.w * model.d @ model.h
    assert misc["test_loss_history"][-1] == pytest.approx(masked_kl(A, mu, test) / test.sum(), rel=1e-10)
    assert misc["train_loss"] == pytest.approx(masked_kl(A, mu, train) / train.sum(), rel=1e-10)
    # the record's test loss is the best one, at 1-based best_iter
    assert misc["test_loss"] == misc["test_loss_history"].min()
    assert misc["best_iter"] == int(np.argmin(misc["test_loss_history"])) + 1
    seen = []
    _fit(sp.csc_matrix(nan), 3, w0, maxit=5, test_fraction=frac, cv_seed=cv_seed, **extra,
         on_iteration=lambda r: seen.append((r.train_loss, r.test_loss)))
    np.testing.assert_allclose(seen, np.c_[losses[:5] / train.sum(), tests[:5]], rtol=1e-10)


def test_kl_early_stopping_on_the_test_loss(small):
    A, _, w0 = small
    model = _fit(A, 3, w0, maxit=500, test_fraction=0.2, cv_seed=3, patience=3)
    hist = model.misc["test_loss_history"]
    # §3.2: stopped 3 iterations after the best test loss, or when its relative change fell below tol=0
    assert model.misc["converged"] and model.misc["iter"] < 500
    assert model.misc["iter"] == model.misc["best_iter"] + 3 and hist.min() == model.misc["test_loss"]


def test_kl_rank_cross_validation_picks_the_planted_rank():
    rng = np.random.default_rng(0)
    m, n, k = 100, 150, 4
    A = sp.csc_matrix(rng.poisson(rng.gamma(0.5, 1.0, (m, k)) @ rng.gamma(0.5, 1.0, (k, n)) * 2).astype(float))
    # the default patience (5): from the least-squares first H the test loss falls from the start
    # (from a flat start it rose for a few iterations and patience 5 stopped every fit at ~6)
    cv = dnmf.nmf(A, [2, 3, 4, 5, 6], loss="kl", test_fraction=0.1, cv_seed=[1, 2], maxit=300, tol=1e-5,
                  client=False)
    assert cv.best_k == k  # planted k = 4 (also on seeds 1 and 2 of this matrix, measured)
    mean = cv.mean_test.to_numpy()
    assert np.all(np.diff(mean[:3]) < 0) and np.all(np.diff(mean[2:]) > 0)  # down to k = 4, up after
    row = cv.table.iloc[2]  # rep 1, k = 4: the row is the fit's own record (KL means)
    model = dnmf.nmf(A, 4, loss="kl", test_fraction=0.1, cv_seed=1, maxit=300, tol=1e-5,
                     init=dnmf.cv.engine_init(m, 4, 1 + 4), seed=1 + 4, client=False)
    assert row[cv.test_column] == model.misc["test_loss"] and row[cv.train_column] == model.misc["train_loss"]


def test_kl_masked_cv_is_the_same_on_two_workers(small):
    distributed = pytest.importorskip("distributed")
    A, mask, w0 = small
    nan = sp.csc_matrix(np.where(mask, np.nan, A))
    kw = dict(maxit=8, test_fraction=0.1, cv_seed=5, L2=(0.1, 0.1))
    here = _fit(nan, 3, w0, **kw)
    grid = dict(loss="kl", test_fraction=0.1, cv_seed=[1, 2], maxit=10, tol=0)
    cv_here = dnmf.nmf(A, [2, 3], client=False, **grid)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        there = _fit(nan, 3, w0, **dict(kw, client=client))
        cv_there = dnmf.nmf(A, [2, 3], client=client, **grid)
    np.testing.assert_array_equal(here.w, there.w)  # block-order sums: bitwise
    np.testing.assert_array_equal(here.misc["test_loss_history"], there.misc["test_loss_history"])
    cols = [cv_here.train_column, cv_here.test_column]
    np.testing.assert_array_equal(cv_here.table[cols].to_numpy(), cv_there.table[cols].to_numpy())


def test_kl_refuses_what_it_does_not_fit(planted):
    A, _, _ = planted
    for kw, name in ((dict(projective=True), "projective"), (dict(norm="L2"), "norm"),
                     (dict(nonneg=(True, False)), "nonneg"), (dict(L1=0.1), "L1")):
        with pytest.raises(InputError, match=f"'{name}' parameter of nmf .*loss=\"kl\""):
            dnmf.nmf(A, 3, loss="kl", client=False, **kw)
    with pytest.raises(InputError, match="'loss' parameter"):
        dnmf.nmf(A, 3, loss="poisson", client=False)


def _engine_fit(A, mask, w0, executor, **opts):
    """fit_kl with ``mask`` and a 10 % hold-out set (``mask`` None: complete data)."""
    from dnmf.engine.als import ALSOptions
    from dnmf.engine.kl import fit_kl
    from dnmf.engine.masked import MaskOptions

    blocked = dnmf.io.as_blocked(sp.csc_matrix(A), block_nnz=300)
    mo = None if mask is None else MaskOptions(test_fraction=0.1, cv_seed=4, mask=sp.csc_matrix(mask))
    return fit_kl(blocked, w0, ALSOptions(**dict(dict(k=3, tol=0, maxit=6, patience=100), **opts)), executor, mo=mo)


def test_kl_lost_worker_redoes_the_pass(small):
    from dnmf.engine.executor import LocalExecutor

    A, mask, w0 = small
    ref, ref_h = _engine_fit(A, mask, w0, LocalExecutor(1))
    flaky = FlakyExecutor("map_blocks", 5)  # map_blocks calls: 1 the CSC conversion, 2 the first pass, … 5 the fourth pass
    state, h = _engine_fit(A, mask, w0, flaky)
    assert flaky.calls > 5  # the blocks were placed again and the pass redone: the same fit
    np.testing.assert_array_equal(state.w, ref.w)
    np.testing.assert_array_equal(np.concatenate(h), np.concatenate(ref_h))
    np.testing.assert_array_equal(state.test_history, ref.test_history)


def test_kl_l1_would_only_rescale(small):
    # Why nmf refuses L1 with loss="kl": with Σ_i w_ir = 1, KL(A‖WH) + λ·ΣH is KL against
    # (1 + λ)·WH up to a constant, so the H step only shrinks H uniformly and the W step's
    # normalization moves that scale back — the penalized updates give the unpenalized fit.
    from dnmf.engine.executor import LocalExecutor

    A, mask, w0 = small
    plain, hp = _engine_fit(A, None, w0, LocalExecutor(1))
    pen, hl = _engine_fit(A, None, w0, LocalExecutor(1), L1=(0.0, 0.9))
    np.testing.assert_allclose(pen.w, plain.w, rtol=1e-12, atol=1e-16)  # rounding only
    np.testing.assert_allclose(np.concatenate(hl), np.concatenate(hp), rtol=1e-12, atol=1e-14)


def test_kl_scaled_data_with_l2_is_the_same_fit(small):
    # A beyond the safe range is fitted as s·A (s a power of two, exact): the KL divergence and its
    # means scale with s; L2 on H (which carries A's scale) scales as 1/f, on W (unit columns) as f,
    # so fit(f·A, L2 = (f·λ_W, λ_H/f)) is fit(A, L2 = (λ_W, λ_H)) with d and the losses times f
    A, mask, w0 = small
    f = 2.0**400
    kw = dict(mask=sp.csc_matrix(mask), maxit=10, test_fraction=0.1, cv_seed=2, patience=100)
    model = _fit(A, 3, w0, L2=(0.2, 0.1), **kw)
    seen = []
    big = _fit(A * f, 3, w0, L2=(0.2 * f, 0.1 / f), on_iteration=lambda r: seen.append(r[1:]), **kw)
    # on_iteration gets the losses in A's units too (train and test)
    np.testing.assert_array_equal(seen, np.c_[big.misc["loss_history"], big.misc["test_loss_history"]])
    assert big.misc["scale"] != 1.0
    np.testing.assert_allclose(big.w, model.w, rtol=1e-12, atol=1e-16)  # rounding only
    np.testing.assert_allclose(big.d, model.d * f, rtol=1e-12)
    np.testing.assert_allclose(big.misc["loss_history"], model.misc["loss_history"] * f, rtol=1e-12)
    np.testing.assert_allclose(big.misc["test_loss_history"], model.misc["test_loss_history"] * f, rtol=1e-12)
