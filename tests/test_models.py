"""NMFModel utilities, cosine, bipartite_match and simulate_nmf against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls as scipy_nnls

import dnmf
from dnmf.exceptions import InputError
from dnmf.models import BipartiteMatch, NMFModel, bipartite_match, cosine
from dnmf.simulate import SimulatedNMF, simulate_nmf

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    w = rng.uniform(size=(40, 4))
    w[rng.uniform(size=w.shape) < 0.3] = 0.0
    w /= w.sum(axis=0)
    h = rng.uniform(size=(4, 30))
    h[rng.uniform(size=h.shape) < 0.2] = 0.0
    h /= h.sum(axis=1, keepdims=True)
    return NMFModel(w=w, d=np.array([4.0, 3.0, 2.0, 1.0]), h=h,
                    misc={"iter": 7, "loss": 1.5, "L1": (0.0, 0.0), "L2": (0.0, 0.0), "nonneg": (True, True)})


@pytest.fixture(scope="module")
def data():
    """A sparse 40 × 30 non-negative matrix (about 25 % stored)."""
    return sp.random(40, 30, density=0.25, random_state=3, format="csc", dtype=np.float64)


# --------------------------------------------------------------------------------------------
# cosine
# --------------------------------------------------------------------------------------------


def _cosine_loops(x, y):
    out = np.zeros((x.shape[1], y.shape[1]))
    for a in range(x.shape[1]):
        for b in range(y.shape[1]):
            nx, ny = np.linalg.norm(x[:, a]), np.linalg.norm(y[:, b])
            out[a, b] = 0.0 if nx == 0 or ny == 0 else x[:, a] @ y[:, b] / (nx * ny)
    return out


def test_cosine_matches_loops_and_sklearn():
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(25, 4)), rng.normal(size=(25, 6))
    # a few dot products of 25 terms: agreement to rounding (1e-12 is ~1e4 ulps of slack)
    np.testing.assert_allclose(cosine(x, y), _cosine_loops(x, y), atol=1e-12)
    np.testing.assert_allclose(cosine(x, y), cosine_similarity(x.T, y.T), atol=1e-12)
    np.testing.assert_allclose(cosine(x), cosine_similarity(x.T), atol=1e-12)
    np.testing.assert_allclose(np.diag(cosine(x)), 1.0, atol=1e-12)


def test_cosine_zero_columns_vectors_and_sparse():
    x = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    c = cosine(x)
    assert np.all(np.isfinite(c)) and np.all(c[1] == 0) and np.all(c[:, 1] == 0)
    v = np.array([1.0, 1.0, 0.0])
    # vectors count as one column: vector × matrix gives a vector, vector × vector a float
    np.testing.assert_allclose(cosine(v, x), _cosine_loops(v[:, None], x)[0], atol=1e-12)
    np.testing.assert_allclose(cosine(x, v), _cosine_loops(x, v[:, None])[:, 0], atol=1e-12)
    assert isinstance(cosine(v, v), float) and cosine(v, v) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(cosine(sp.csc_array(x), x), c, atol=1e-12)
    with pytest.raises(InputError, match="'y' parameter of cosine"):
        cosine(x, np.ones((4, 2)))
    with pytest.raises(InputError, match="'x' parameter of cosine"):
        cosine(np.full((2, 2), np.nan))


# --------------------------------------------------------------------------------------------
# bipartite_match
# --------------------------------------------------------------------------------------------


def _brute_force(cost, maximize=False):
    n_rows, n_cols = cost.shape
    best = None
    if n_rows <= n_cols:
        for cols in itertools.permutations(range(n_cols), n_rows):
            total = cost[np.arange(n_rows), list(cols)].sum()
            if best is None or (total > best if maximize else total < best):
                best = total
    else:
        for rows in itertools.permutations(range(n_rows), n_cols):
            total = cost[list(rows), np.arange(n_cols)].sum()
            if best is None or (total > best if maximize else total < best):
                best = total
    return best


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4)])
@pytest.mark.parametrize("maximize", [False, True])
def test_bipartite_match_is_optimal(shape, maximize):
    cost = np.random.default_rng(sum(shape)).uniform(-1, 1, size=shape)
    res = bipartite_match(cost, maximize=maximize)
    assert isinstance(res, BipartiteMatch)
    # exhaustive search over all assignments; sums of ≤ 6 terms agree to rounding
    assert res.cost == pytest.approx(_brute_force(cost, maximize), abs=1e-12)
    assert len(res.pairs) == min(shape)
    assert len(set(res.cols.tolist())) == min(shape)
    assert res.assignment.shape == (shape[0],)
    assert np.sum(res.assignment >= 0) == min(shape)
    np.testing.assert_array_equal(res.assignment[res.rows], res.cols)


def test_bipartite_match_recovers_permutation_and_validates():
    perm = np.array([3, 0, 4, 1, 2])
    res = bipartite_match(1.0 - np.eye(5)[perm])
    np.testing.assert_array_equal(res.assignment, perm)
    assert res.cost == 0.0
    with pytest.raises(InputError, match="'cost' parameter of bipartite_match"):
        bipartite_match(np.ones(3))
    with pytest.raises(InputError, match="'cost' parameter of bipartite_match"):
        bipartite_match(np.array([[1.0, np.inf]]))
    with pytest.raises(InputError, match="'maximize'"):
        bipartite_match(np.eye(2), maximize="yes")


# --------------------------------------------------------------------------------------------
# algebra, subsetting, sparsity, repr, dict round trip
# --------------------------------------------------------------------------------------------


def test_reconstruct_transpose_and_shape(model):
    ref = model.w @ np.diag(model.d) @ model.h
    np.testing.assert_allclose(model.reconstruct(), ref, rtol=1e-13)  # same product, another association
    assert model.shape == (40, 30, 4) and model.k == 4
    t = model.transpose()
    assert t.shape == (30, 40, 4)
    np.testing.assert_allclose(t.reconstruct(), ref.T, rtol=1e-13)


def test_subset_getitem_head_sort(model):
    sub = model[[2, 0]]
    np.testing.assert_array_equal(sub.w, model.w[:, [2, 0]])
    np.testing.assert_array_equal(sub.d, model.d[[2, 0]])
    np.testing.assert_array_equal(sub.h, model.h[[2, 0]])
    one = model[1]
    assert one.w.shape == (40, 1) and one.h.shape == (1, 30) and one.d.tolist() == [3.0]
    assert model[-1].d.tolist() == [1.0]
    np.testing.assert_array_equal(model[1:3].d, [3.0, 2.0])
    np.testing.assert_array_equal(model[np.array([True, False, False, True])].d, [4.0, 1.0])
    np.testing.assert_array_equal(model.subset(range(2)).d, [4.0, 3.0])
    assert model.head(2).k == 2 and model.head(10).k == 4
    shuffled = model[[3, 1, 0, 2]]
    np.testing.assert_array_equal(shuffled.sort().d, model.d)
    np.testing.assert_array_equal(shuffled.sort().w, model.w)
    for bad in (4, -5, [0, 7], np.array([True, False]), 1.5, np.array([[0]])):
        with pytest.raises(InputError, match="'idx' parameter of NMFModel.subset"):
            model.subset(bad)
    with pytest.raises(InputError, match="'n' parameter of NMFModel.head"):
        model.head(0)


def test_sparsity(model):
    table = model.sparsity()
    assert list(table.columns) == ["factor", "model", "sparsity"] and len(table) == 8
    w_rows = table[table.model == "w"].sort_values("factor")
    h_rows = table[table.model == "h"].sort_values("factor")
    for f in range(4):
        assert w_rows.sparsity.iloc[f] == np.count_nonzero(model.w[:, f] == 0) / 40
        assert h_rows.sparsity.iloc[f] == np.count_nonzero(model.h[f] == 0) / 30


def test_repr_and_dict_roundtrip(model):
    text = repr(model)
    assert "m=40" in text and "n=30" in text and "k=4" in text and "iter=7" in text
    back = NMFModel.from_dict(model.to_dict())
    for a in ("w", "d", "h"):
        np.testing.assert_array_equal(getattr(back, a), getattr(model, a))
    assert back.misc == model.misc
    with pytest.raises(InputError, match="'record' parameter"):
        NMFModel.from_dict({"w": model.w, "d": model.d})
    with pytest.raises(InputError, match="'record' parameter"):
        NMFModel.from_dict({"w": model.w, "d": model.d[:3], "h": model.h})


def test_align_recovers_a_permutation(model):
    perm = np.array([2, 3, 1, 0])
    rng = np.random.default_rng(2)
    noisy = NMFModel(w=model.w[:, perm] + 0.01 * rng.uniform(size=model.w.shape), d=model.d[perm],
                     h=model.h[perm], misc={})
    aligned = noisy.align(model)
    # aligned factor j is noisy factor argsort(perm)[j], i.e. model factor j
    np.testing.assert_array_equal(aligned.misc["alignment"], np.argsort(perm))
    np.testing.assert_array_equal(aligned.d, model.d)
    np.testing.assert_array_equal(aligned.h, model.h)
    np.testing.assert_array_equal(noisy.align(model.w).d, model.d)
    # more factors than the reference: matched ones first, the rest after in original order
    bigger = noisy.align(model[[1, 3]])
    assert bigger.k == 4
    np.testing.assert_array_equal(bigger.d[:2], model.d[[1, 3]])
    # fewer factors: ordered by the reference factor they match
    smaller = noisy[[0, 2]].align(model)
    np.testing.assert_array_equal(smaller.d, np.sort(model.d[[perm[0], perm[2]]])[::-1])
    with pytest.raises(InputError, match="'other' parameter of NMFModel.align"):
        model.align(np.ones((3, 4)))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def _kl(y, mu):
    """y log(y/μ) − y + μ, μ floored at 1e-10 where y > 0, and the limit μ where y = 0."""
    out = mu.copy()
    for i, j in zip(*np.nonzero(y > 0)):
        m = max(mu[i, j], 1e-10)
        out[i, j] = y[i, j] * np.log(y[i, j] / m) - y[i, j] + m
    return out


def test_evaluate_mse_matches_dense_reference(model, data):
    R = model.w @ np.diag(model.d) @ model.h
    A = data.toarray()
    ref = np.mean((A - R) ** 2)
    # dense explicit vs closed-form sparse path: the zero part is a Gram identity, which loses
    # a few ulps of ‖WdH‖² ≈ the loss itself here; 1e-12 relative is far above that.
    assert model.evaluate(A) == pytest.approx(ref, rel=1e-12)
    assert model.evaluate(data) == pytest.approx(ref, rel=1e-12)
    many = dnmf.io.as_blocked(data, block_nnz=40)
    assert many.n_blocks > 3
    assert model.evaluate(many) == pytest.approx(ref, rel=1e-12)
    assert model.evaluate(A.astype(np.float32)) == pytest.approx(
        np.mean((A.astype(np.float32).astype(float) - R) ** 2), rel=1e-12)


def test_evaluate_kl(model, data):
    R = model.w @ np.diag(model.d) @ model.h
    A = data.toarray()
    ref = np.mean(_kl(A, R))
    assert model.evaluate(A, loss="kl") == pytest.approx(ref, rel=1e-12)  # same terms, other order
    assert model.evaluate(data, loss="kl") == pytest.approx(ref, rel=1e-12)


def test_evaluate_masks(model, data):
    R = model.w @ np.diag(model.d) @ model.h
    A = data.toarray()
    sq = (A - R) ** 2
    nz = A != 0
    rng = np.random.default_rng(4)
    M = rng.uniform(size=A.shape) < 0.1
    # reference means over explicit index sets; 1e-12 relative as above
    for X in (A, data, dnmf.io.as_blocked(data, block_nnz=40)):
        assert model.evaluate(X, mask="zeros") == pytest.approx(sq[nz].mean(), rel=1e-12)
        assert model.evaluate(X, mask="zeros", missing_only=True) == pytest.approx(sq[~nz].mean(), rel=1e-12)
        assert model.evaluate(X, mask=M) == pytest.approx(sq[~M].mean(), rel=1e-12)
        assert model.evaluate(X, mask=sp.csr_array(M.astype(float)), missing_only=True) == pytest.approx(
            sq[M].mean(), rel=1e-12)
        assert model.evaluate(X, loss="kl", mask=M, missing_only=True) == pytest.approx(
            _kl(A, R)[M].mean(), rel=1e-12)


def test_evaluate_validates(model, data):
    with pytest.raises(InputError, match="'A' parameter of NMFModel.evaluate"):
        model.evaluate(np.ones((40, 29)))
    with pytest.raises(InputError, match="'loss' parameter"):
        model.evaluate(data, loss="huber")
    with pytest.raises(InputError, match="'mask' parameter"):
        model.evaluate(data, mask="NA")
    with pytest.raises(InputError, match="'mask' parameter"):
        model.evaluate(data, mask=np.ones((40, 31)))
    with pytest.raises(InputError, match="'mask' parameter"):
        model.evaluate(data, mask=np.ones((40, 30)))  # everything masked: nothing left
    with pytest.raises(InputError, match="'missing_only' parameter"):
        model.evaluate(data, missing_only=True)


def _reference_losses(A, R, rng):
    """Per-entry references written out here or from scipy.stats, with the parameters used."""
    from scipy import stats
    from scipy.special import gammaln, xlogy

    theta_row = rng.uniform(0.05, 1.0, size=(A.shape[0], 1))
    size_col = rng.uniform(0.5, 20.0, size=(1, A.shape[1]))
    lam1 = R / (1 + theta_row)
    lam2 = theta_row / (1 + theta_row)
    gp_logpmf = np.log(lam1) + (A - 1) * np.log(lam1 + lam2 * A) - lam1 - lam2 * A - gammaln(A + 1)
    nb = -stats.nbinom.logpmf(A, size_col, size_col / (size_col + R)) - gammaln(A + 1)
    size_full = rng.uniform(0.5, 20.0, size=A.shape)
    nb_full = -stats.nbinom.logpmf(A, size_full, size_full / (size_full + R)) - gammaln(A + 1)
    safe = np.where(A > 0, A, 1.0)  # y = 0 is outside the support of gamma / IG / Tweedie p ≥ 2
    tw = 2 * (A ** 0.5 / (-0.5 * 0.5) - A * R ** -0.5 / -0.5 + R ** 0.5 / 0.5)  # p = 1.5
    return [
        ("gp", {"theta": theta_row}, -gp_logpmf - gammaln(A + 1), None),
        ("gp", {"theta": 0.0}, R - xlogy(A, R), None),  # Poisson −log P − log y!
        ("nb", {"size": size_col}, nb, None),
        ("nb", {"size": size_full}, nb_full, None),  # per-entry parameters
        ("tweedie", {"power": 1.5, "phi": 2.0}, tw / 2.0, None),
        ("gamma", {}, 2 * (-np.log(safe / R) + (A - R) / R), A > 0),
        ("inverse_gaussian", {"phi": 0.5}, (A - R) ** 2 / (R ** 2 * safe) / 0.5, A > 0),
        ("tweedie", {"power": 2.5}, 2 * (safe ** -0.5 / (-1.5 * -0.5) - A * R ** -1.5 / -1.5 + R ** -0.5 / -0.5),
         A > 0),
    ]


def test_evaluate_every_registered_loss(data):
    """Dense, sparse and many-block evaluations of every loss against per-entry references; losses
    without zeros in their support (gamma, IG, Tweedie p ≥ 2) average over the non-zeros."""
    rng = np.random.default_rng(7)
    # strictly positive factors: every μ > 0, so the references need no floors
    model = NMFModel(w=rng.uniform(0.1, 1.0, size=(40, 3)), d=np.array([3.0, 2.0, 1.0]),
                     h=rng.uniform(0.1, 1.0, size=(3, 30)))
    counts = data.copy()
    counts.data = np.ceil(counts.data * 6)  # integer counts for gp / nb
    A = counts.toarray()
    R = model.w @ np.diag(model.d) @ model.h
    M = rng.uniform(size=A.shape) < 0.15
    for name, params, ref, keep in _reference_losses(A, R, rng):
        keep = np.ones(A.shape, bool) if keep is None else keep
        # references sum the same terms in another order (and scipy's lgamma for nb, values of
        # size ~10): 1e-10 relative covers that with a wide margin, far below any formula error
        for X in (A, counts, dnmf.io.as_blocked(counts, block_nnz=40)):
            assert model.evaluate(X, loss=name, **params) == pytest.approx(ref[keep].mean(), rel=1e-10), name
            assert model.evaluate(X, loss=name, mask=M, **params) == pytest.approx(
                ref[keep & ~M].mean(), rel=1e-10), name
            assert model.evaluate(X, loss=name, mask=M, missing_only=True, **params) == pytest.approx(
                ref[keep & M].mean(), rel=1e-10), name
            assert model.evaluate(X, loss=name, mask="zeros", **params) == pytest.approx(
                ref[A != 0].mean(), rel=1e-10), name
    with pytest.raises(InputError, match="'size' parameter of NMFModel.evaluate must be a float or an array of "
                                         r"shape \(40, 1\), \(1, 30\) or \(40, 30\)"):
        model.evaluate(counts, loss="nb", size=np.ones((1, 29)))
    with pytest.raises(InputError, match="'theta' parameter of NMFModel.evaluate must be a parameter of loss 'nb'"):
        model.evaluate(counts, loss="nb", theta=1.0)


def test_evaluate_robust_is_huber_of_pearson_residuals(data):
    rng = np.random.default_rng(8)
    model = NMFModel(w=rng.uniform(0.1, 1.0, size=(40, 3)), d=np.array([3.0, 2.0, 1.0]),
                     h=rng.uniform(0.1, 1.0, size=(3, 30)))
    counts = data.copy()
    counts.data = np.ceil(counts.data * 6)
    A = counts.toarray()
    R = model.w @ np.diag(model.d) @ model.h

    def hub(rho, delta):
        rho = np.abs(rho)
        return np.where(rho <= delta, 0.5 * rho ** 2, delta * rho - 0.5 * delta ** 2)

    cases = [("mse", {}, True, hub(A - R, 1.345), None),
             ("gp", {"theta": 0.3}, 0.5, hub((A - R) / np.sqrt(R), 0.5), None),
             ("nb", {"size": 2.0}, "mae", hub((A - R) / np.sqrt(R + R ** 2 / 2), 1e-4), None),
             ("gamma", {}, 1.0, hub((A - R) / R, 1.0), A > 0)]
    for name, params, robust, ref, keep in cases:
        keep = np.ones(A.shape, bool) if keep is None else keep
        for X in (A, counts, dnmf.io.as_blocked(counts, block_nnz=40)):
            # same terms summed in another order (zeros in chunks for sparse input): 1e-10 relative
            assert model.evaluate(X, loss=name, robust=robust, **params) == pytest.approx(
                ref[keep].mean(), rel=1e-10), name
    assert dnmf.losses.evaluate(model, counts, robust=True) == model.evaluate(counts, robust=True)
    with pytest.raises(InputError, match="'robust' parameter of NMFModel.evaluate"):
        model.evaluate(A, robust=-1.0)
    with pytest.raises(InputError, match="'robust' parameter of NMFModel.evaluate"):
        model.evaluate(A, robust="huber")


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def test_predict_matches_scipy_nnls(model, data):
    A = data.toarray()
    H = model.predict(data)
    assert H.shape == (4, 30)
    for j in range(30):
        ref, _ = scipy_nnls(model.w, A[:, j])
        # two exact NNLS solvers on a well-conditioned 40 × 4 problem agree to ~1e-12
        np.testing.assert_allclose(H[:, j], ref, atol=1e-10)
    np.testing.assert_allclose(model.predict(A), H, atol=1e-12)  # dense path, same solver
    np.testing.assert_allclose(model.predict(dnmf.io.as_blocked(data, block_nnz=40)), H, atol=1e-12)


def test_predict_recovers_scaled_h_on_exact_data(model):
    A = model.reconstruct()
    # W has full column rank and A = W (diag(d) H) exactly: NNLS returns diag(d) H to rounding
    np.testing.assert_allclose(model.predict(A), model.d[:, None] * model.h, atol=1e-12)


def test_predict_penalties_and_semi_nmf(model, data):
    A = data.toarray()
    l2 = 0.3
    H = model.predict(A, L2=l2)
    aug = np.vstack([model.w, np.sqrt(l2) * np.eye(4)])
    for j in range(30):
        ref, _ = scipy_nnls(aug, np.concatenate([A[:, j], np.zeros(4)]))
        np.testing.assert_allclose(H[:, j], ref, atol=1e-10)  # ridge = NNLS on the augmented system
    l1 = 0.05
    H1 = model.predict(A, L1=l1)
    # KKT of min ½‖Wh − a‖² + l1·Σh, h ≥ 0: gradient 0 on the support, ≥ 0 off it (to rounding)
    grad = model.w.T @ (model.w @ H1 - A) + l1
    assert np.all(np.abs(grad[H1 > 0]) < 1e-10) and np.all(grad[H1 == 0] > -1e-10)
    assert H1.sum() < model.predict(A).sum()
    Hfree = model.predict(A, nonneg=False)
    np.testing.assert_allclose(Hfree, np.linalg.lstsq(model.w, A, rcond=None)[0], atol=1e-10)
    assert model.predict(A.astype(np.float32)).dtype == np.float32
    with pytest.raises(InputError, match="'A' parameter of NMFModel.predict"):
        model.predict(np.ones((39, 3)))
    with pytest.raises(InputError, match="'L2' parameter of NMFModel.predict"):
        model.predict(A, L2=-1.0)


# --------------------------------------------------------------------------------------------
# simulate_nmf
# --------------------------------------------------------------------------------------------


def test_simulate_structure():
    sim = simulate_nmf(50, 23, 4, noise=0.0, seed=3)
    assert isinstance(sim, SimulatedNMF)
    A, w, h = sim
    assert A.shape == (50, 23) and w.shape == (50, 4) and h.shape == (4, 23)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-14)  # normalized to unit sums
    np.testing.assert_allclose(h.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(A, w @ h)  # noise = 0: the exact product
    # factor i is large on its block of rows (12 rows; the last block takes 14) and small elsewhere
    blocks = [slice(0, 12), slice(12, 24), slice(24, 36), slice(36, 50)]
    for i, rows in enumerate(blocks):
        inside = w[rows, i].mean()
        outside = np.delete(w[:, i], np.arange(50)[rows]).mean()
        assert inside > 5 * outside  # |N(1, .3)| + |N(0, .05)| vs |N(0, .05)|: ratio ≈ 25 in expectation


def test_simulate_noise_dropout_and_seed():
    a = simulate_nmf(100, 60, 3, noise=1.0, dropout=0.3, seed=7)
    b = simulate_nmf(100, 60, 3, noise=1.0, dropout=0.3, seed=7)
    np.testing.assert_array_equal(a.A, b.A)
    assert not np.array_equal(a.A, simulate_nmf(100, 60, 3, noise=1.0, dropout=0.3, seed=8).A)
    assert np.all(a.A >= 0)
    clean = simulate_nmf(100, 60, 3, noise=1.0, seed=7)
    zero_frac = np.mean(clean.A == 0)
    # dropout zeros a Bernoulli(0.3) share of the remaining entries: 6000 entries give a
    # binomial sd ≈ 0.006; 0.03 is five sd
    expected = zero_frac + (1 - zero_frac) * 0.3
    assert abs(np.mean(a.A == 0) - expected) < 0.03
    # noise sd is noise·mean(w h): residual sd before clipping ≈ mean(A); clipping shrinks it
    resid = clean.A - clean.w @ clean.h
    assert 0.5 * (clean.w @ clean.h).mean() < resid.std() < 1.0 * (clean.w @ clean.h).mean()
    for kw, name in ((dict(noise=-1.0), "noise"), (dict(dropout=1.0), "dropout"), (dict(seed=-1), "seed")):
        with pytest.raises(InputError, match=f"'{name}' parameter of simulate_nmf"):
            simulate_nmf(10, 10, 2, **kw)
    with pytest.raises(InputError, match="'m' parameter of simulate_nmf"):
        simulate_nmf(2, 10, 3)


def test_planted_factors_recovered():
    """spec/rcppml.md §13.1: simulateNMF(200, 80, k=5, noise=3, seed=42); nmf(k=5, seed=1, tol=1e-5).

    RcppML reports matched cosines 0.904–0.933 (all > 0.9). Our simulator draws from NumPy,
    not R, so the numbers differ in detail but not in distribution; every factor must still be
    recovered with cosine ≥ 0.9.
    """
    sim = dnmf.simulate_nmf(200, 80, k=5, noise=3.0, seed=42)
    fit = dnmf.nmf(sim.A, 5, seed=1, tol=1e-5, maxit=100, client=False)
    cs = cosine(fit.w, sim.w)
    match = bipartite_match(1.0 - cs + 1e-10)
    matched = cs[match.rows, match.cols]
    assert np.all(matched >= 0.9), matched
    aligned = fit.align(sim.w)
    np.testing.assert_allclose(np.diag(cosine(aligned.w, sim.w)), matched[np.argsort(match.cols)], rtol=1e-12)
