"""Zero-inflation (zi = "row" | "col") of the GP and NB IRLS fits (issue 9, spec/rcppml.md §6.5):
π recovered on data with planted extra zeros, the held-out zero-inflated loss beating the plain
fit's, a whole fit against a plain-NumPy §6.5 loop with a dense imputed copy, the reported loss
against the zero-inflated likelihood by hand, masks / CV, errors, workers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import minimize, nnls

import dnmf
from dnmf._losses import get_loss
from dnmf.kernels.masked import holdout_mask


def _zi_data(m=120, n=100, k=3, seed=0, r=5.0):
    """NB(μ = W H, size r) counts, then extra zeros with probability π_true per row."""
    rng = np.random.default_rng(seed)
    mu = rng.gamma(1.0, 1.0, (m, k)) @ (3.0 * rng.gamma(1.0, 1.0, (k, n)))
    A = rng.negative_binomial(r, r / (r + mu)).astype(float)
    pi_true = rng.uniform(0.05, 0.4, m)
    A[rng.random((m, n)) < pi_true[:, None]] = 0.0
    return A, pi_true


def _mu(model):
    return model.w @ np.diag(model.d) @ model.h


def _fit(A, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # maxit warnings of short fits
        return dnmf.nmf(A, client=False, **kw)


def _elem(loss, y, mu, disp):
    """ℓ(y, μ) of the registry (dnmf._losses, the §6.1 constants)."""
    if loss == "gp":
        return get_loss("gp").value(y, mu, theta=disp)
    return get_loss("nb").value(y, mu, size=disp)


def _zi_nll(loss, y, mu, disp, pi):
    """The zero-inflated −log-likelihood per entry: a zero −log(π + (1−π)e^{−ℓ(0, μ)}), a
    non-zero −log(1−π) + ℓ(y, μ)."""
    y, mu, disp, pi = np.broadcast_arrays(y, mu, disp, pi)
    p0 = np.exp(-_elem(loss, np.zeros_like(mu), mu, disp))
    return np.where(y == 0, -np.log(pi + (1 - pi) * p0), -np.log(1 - pi) + _elem(loss, y, mu, disp))


@pytest.mark.parametrize("loss", ["nb", "gp"])
def test_pi_recovered_and_loss_is_the_zero_inflated_likelihood(loss):
    A, pi_true = _zi_data()
    model = _fit(sp.csr_matrix(A), k=3, loss=loss, zi="row", seed=1, maxit=25, tol=1e-10)
    pi = model.misc["zi_pi"]
    assert pi.shape == (A.shape[0],) and model.misc["zi_pi_history"].shape == (25,)
    # measured: mean |π − π_true| 0.039 (nb) / 0.038 (gp), correlation 0.90, mean π 0.221 /
    # 0.217 vs 0.225. A row's π rests on its 100 entries: binomial noise sqrt(π(1−π)/100) ≈
    # 0.04, so 0.06 / 0.8 leave room for the noise only; the mean over 120 rows is within
    # 0.02 (the zeros of small μ are ambiguous between the two sources, a small downward bias)
    assert np.abs(pi - pi_true).mean() < 0.06
    assert np.corrcoef(pi, pi_true)[0, 1] > 0.8
    assert abs(pi.mean() - pi_true.mean()) < 0.02
    # the reported loss: the zero-inflated −log-likelihood over every entry at the final
    # factors, dispersion and π (a sum of 12,000 terms: rounding only)
    by_hand = _zi_nll(loss, A, _mu(model), np.asarray(model.misc["dispersion"])[:, None], pi[:, None]).sum()
    np.testing.assert_allclose(model.misc["loss"], by_hand, rtol=1e-9)
    assert model.misc["loss_covers"] == "all"


@pytest.mark.parametrize("loss", ["nb", "gp"])
def test_held_out_zero_inflated_loss_beats_the_plain_fit(loss):
    A, _ = _zi_data(seed=3)
    kw = dict(k=3, loss=loss, seed=1, maxit=20, tol=1e-10, test_fraction=0.1, cv_seed=5)
    plain = _fit(sp.csr_matrix(A), **kw)
    zi = _fit(sp.csr_matrix(A), zi="row", **kw)
    held = holdout_mask(*np.indices(A.shape).reshape(2, -1), 5, 0.1).reshape(A.shape)
    disp = np.asarray(zi.misc["dispersion"])[:, None]
    by_hand = _zi_nll(loss, A[held], np.broadcast_to(_mu(zi), A.shape)[held],
                      np.broadcast_to(disp, A.shape)[held], np.broadcast_to(zi.misc["zi_pi"][:, None], A.shape)[held])
    np.testing.assert_allclose(zi.misc["test_loss_history"][-1], by_hand.mean(), rtol=1e-9)
    # the plain fit's held-out loss is its own likelihood (π = 0); measured mean per held-out
    # entry (the §6.1 losses drop log y!, hence negative): nb −11.27 vs −11.10, gp −11.24 vs
    # −10.98; 0.1 is well above the seed-to-seed noise of these means over ~1,200 entries
    assert zi.misc["test_loss_history"][-1] < plain.misc["test_loss_history"][-1] - 0.1


def _poisson_solve(F, y, eps=1e-4):
    """argmin over x ≥ 0 of Σ ℓ̃(μ), μ = F x, ℓ̃ the Poisson objective μ − y log μ for μ ≥ ε and
    its quadratic continuation (μ − y)²/(2ε) + c below (ε = 1e-4: the fixed points of IRLS with
    the GP weight 1/max(μ, 1e-4) are its stationary points; convex, C¹): scipy's nnls for a
    start, then L-BFGS-B with the exact gradient. (Plain IRLS with nnls stalled on one such
    problem; the kernel's active-set IRLS did not.)"""
    x0 = np.maximum(nnls(F, y)[0], 1e-3)

    def f(x):
        mu = F @ x
        lo = mu < eps
        mu_c = np.maximum(mu, eps)
        val = np.where(lo, (mu - y) ** 2 / (2 * eps) + (eps - y * np.log(eps)) - (eps - y) ** 2 / (2 * eps),
                       mu_c - y * np.log(mu_c))
        return val.sum(), F.T @ ((mu - y) / mu_c)

    res = minimize(f, x0, jac=True, bounds=[(0.0, None)] * F.shape[1], method="L-BFGS-B",
                   options=dict(ftol=1e-16, gtol=1e-11, maxiter=5000))
    return res.x


def _reference(A, w0, zi, maxit, em):
    """Plain-NumPy §6.5 for GP with θ = 0: per iteration H then W, each column / row the exact
    minimizer of the Poisson objective on the dense imputed copy (zeros → z·μ of the previous
    iteration; plain A in the first), then ``em`` EM steps for π (init min(0.5·zero rate, 0.3))
    and the imputed copy."""
    m, n = A.shape
    W, H, pi, Y = w0.copy(), None, None, A.copy()
    zero = A == 0
    axis = 1 if zi == "row" else 0
    for _ in range(maxit):
        H = np.column_stack([_poisson_solve(W, Y[:, j]) for j in range(n)])
        W = np.vstack([_poisson_solve(H.T, Y[i]) for i in range(m)])
        mu = W @ H
        p0 = np.exp(-mu)
        if pi is None:
            pi = np.minimum(0.5 * zero.mean(axis=axis), 0.3)
        for _ in range(em):
            p = pi[:, None] if zi == "row" else pi[None, :]
            z = np.where(zero, p / (p + (1 - p) * p0 + 1e-300), 0.0)
            pi = np.clip(z.sum(axis=axis) / A.shape[axis], 0.001, 0.999)
        p = pi[:, None] if zi == "row" else pi[None, :]
        Y = np.where(zero, p / (p + (1 - p) * p0 + 1e-300) * mu, A)
    return W @ H, pi


@pytest.mark.parametrize("zi, em, maxit", [("row", 1, 4), ("row", 2, 4), ("col", 2, 2)])
def test_fit_matches_numpy_reference_with_dense_imputed_copy(zi, em, maxit):
    A, _ = _zi_data(m=30, n=24, k=2, seed=7)
    w0 = np.random.default_rng(2).uniform(0.5, 1.5, (30, 2))
    model = _fit(A, k=2, init=w0, loss="gp", zi=zi, zi_em_iters=em, dispersion="none", maxit=maxit, tol=1e-12,
                 solver="exact", irls_max_iter=300, irls_tol=1e-13)
    mu_ref, pi_ref = _reference(A, w0, zi, maxit, em)
    # every solve is a strictly convex problem solved to its minimizer on both sides (IRLS to a
    # relative change < 1e-13 here, L-BFGS-B to gtol 1e-11 there): measured max |Δμ| 4.6e-7 /
    # 1.9e-7 / 1.2e-8 (mean μ 6.3), max |Δπ| 8e-10 / 5e-10 / 1e-11; 1e-5 leaves room for the
    # optimizers' stopping points only. (zi="col" is compared after 2 iterations — each with
    # the imputed zeros in both passes and two E-steps — because in its 3rd iteration one
    # column's IRLS creeps towards the minimizer (a factor near its bound; a plain NumPy IRLS
    # stalls there too) and stops 0.03 short of it in μ, an IRLS property, not zi's.)
    np.testing.assert_allclose(_mu(model), mu_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.misc["zi_pi"], pi_ref, rtol=1e-5, atol=1e-7)


def test_masks_cv_and_errors():
    A, _ = _zi_data(m=40, n=30, seed=4)
    masked = np.zeros(A.shape, dtype=bool)
    masked[:, :5] = True  # the first 5 columns unknown: excluded from the E-step and the fit
    kw = dict(k=2, loss="nb", zi="row", seed=1, maxit=3)
    a = _fit(A, mask=sp.csr_matrix(masked), **kw)
    B = A.copy()
    B[:, :5] = 99.0  # the masked values do not matter
    b = _fit(B, mask=sp.csr_matrix(masked), **kw)
    np.testing.assert_array_equal(a.misc["zi_pi"], b.misc["zi_pi"])
    np.testing.assert_array_equal(a.h, b.h)
    # the loss covers the 40 × 25 observed entries
    by_hand = _zi_nll("nb", A[:, 5:], _mu(a)[:, 5:], np.asarray(a.misc["dispersion"])[:, None],
                      a.misc["zi_pi"][:, None]).sum()
    np.testing.assert_allclose(a.misc["loss"], by_hand, rtol=1e-9)
    for bad, name in [(dict(loss="gamma", zi="row"), "zi"), (dict(loss="mse", zi="col"), "zi"),
                      (dict(loss="kl", zi="row"), "zi"), (dict(loss="nb", zi="both"), "zi"),
                      (dict(loss="nb", zi="row", zi_em_iters=0), "zi_em_iters"),
                      (dict(loss="gp", zi="row", robust=True), "robust"),
                      (dict(loss="nb", zi="row", mask="zeros"), "zi")]:
        with pytest.raises((ValueError, TypeError)) as err:
            dnmf.nmf(A + 1.0 if bad["loss"] == "gamma" else A, 2, client=False, maxit=2, **bad)
        assert name in str(err.value)


def test_one_and_two_workers_identical():
    distributed = pytest.importorskip("distributed")
    A, _ = _zi_data(m=60, n=50, seed=5)
    kw = dict(k=3, loss="gp", zi="col", dispersion="per_row", maxit=4, block_nnz=600, seed=2, tol=1e-12)
    local = _fit(sp.csc_matrix(A), **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            two = dnmf.nmf(sp.csc_matrix(A), client=client, **kw)
    assert local.misc["n_blocks"] > 1
    np.testing.assert_array_equal(two.w, local.w)
    np.testing.assert_array_equal(two.h, local.h)
    np.testing.assert_array_equal(two.misc["zi_pi"], local.misc["zi_pi"])
    np.testing.assert_array_equal(two.misc["loss_history"], local.misc["loss_history"])


def test_held_out_entries_excluded_and_checkpoint_resume(tmp_path):
    A, _ = _zi_data(m=50, n=40, seed=2)
    kw = dict(k=2, loss="nb", zi="row", seed=1, maxit=4, tol=1e-12, test_fraction=0.15, cv_seed=3)
    held = holdout_mask(*np.indices(A.shape).reshape(2, -1), 3, 0.15).reshape(A.shape)
    B = A.copy()
    B[held] = np.where(A[held] == 0, 7.0, 0.0)  # held-out zeros become counts and vice versa
    a, b = _fit(A, **kw), _fit(B, **kw)
    # the held-out entries reach neither the E-step (π) nor the solves: identical fits
    np.testing.assert_array_equal(a.misc["zi_pi"], b.misc["zi_pi"])
    np.testing.assert_array_equal(a.w, b.w)
    assert a.misc["test_loss_history"][-1] != b.misc["test_loss_history"][-1]
    # checkpoints: π and its history are restored from the side file, the resumed fit is bitwise
    # the uninterrupted one
    kw = dict(k=2, loss="gp", zi="col", seed=1, tol=1e-12)
    full = _fit(A, maxit=4, **kw)
    ck = str(tmp_path / "ck")
    _fit(A, maxit=2, checkpoint=ck, **kw)
    resumed = _fit(A, maxit=4, checkpoint=ck, resume=True, **kw)
    np.testing.assert_array_equal(resumed.w, full.w)
    np.testing.assert_array_equal(resumed.misc["zi_pi"], full.misc["zi_pi"])
    np.testing.assert_array_equal(resumed.misc["zi_pi_history"], full.misc["zi_pi_history"])
    np.testing.assert_array_equal(resumed.misc["loss_history"], full.misc["loss_history"])


def test_factorize_pipeline_stores_pi(tmp_path):
    """A zi fit from a YAML job equals the library call, and the run store keeps π (per feature) and
    its history beside the dispersion."""
    import zarr

    from dnmf.config import JobConfig
    from dnmf.jobs import RunStore, run_job

    A, _ = _zi_data(m=40, n=30, seed=5)
    np.save(tmp_path / "a.npy", A)
    model_cfg = {"k": 3, "maxit": 4, "tol": 0, "seed": 2, "loss": "nb", "zi": "row", "dispersion": "global"}
    data = {"pipeline": "factorize", "name": "zi", "input": {"path": str(tmp_path / "a.npy")}, "model": model_cfg,
            "output": {"dir": str(tmp_path / "runs"), "plots": False, "performance_report": False},
            "progress": "none"}
    res = run_job(JobConfig.from_dict(data), client=False, echo=lambda msg: None)
    stored = RunStore.open(res.store).read_group("model")
    ref = _fit(A, **model_cfg)
    np.testing.assert_array_equal(stored["w"], ref.w)
    np.testing.assert_array_equal(stored["zi_pi"], ref.misc["zi_pi"])
    np.testing.assert_array_equal(stored["zi_pi_history"], ref.misc["zi_pi_history"])
    assert stored["zi_pi"].shape == (40,)
    assert zarr.open_group(res.store, mode="r")["model/zi_pi"].metadata.dimension_names == ("feature",)
