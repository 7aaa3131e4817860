"""The loss registry (dnmf.losses, spec §6) against scipy.stats, scikit-learn and plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.optimize import minimize_scalar
from scipy.special import gammaln
from sklearn.metrics import mean_gamma_deviance, mean_poisson_deviance, mean_tweedie_deviance

from dnmf.exceptions import InputError
from dnmf.losses import LOSSES, get_loss, huber, robust_weight, update_dispersion

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

# Closed-form values computed two ways in float64 agree to a few ulps of the summed terms
# (values are O(1)-O(100)); 1e-12 relative leaves a margin of ~100 ulps.
RTOL = 1e-12


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    mu = rng.uniform(0.2, 12.0, size=400)
    y = rng.poisson(mu).astype(float)
    return y, mu


@pytest.fixture(scope="module")
def positive():
    rng = np.random.default_rng(1)
    mu = rng.uniform(0.2, 12.0, size=400)
    y = rng.gamma(3.0, mu / 3.0)
    return y, mu


def test_registry_lookup_lists_valid_names():
    assert set(LOSSES) == {"mse", "kl", "gp", "nb", "gamma", "inverse_gaussian", "tweedie"}
    assert get_loss("nb") is LOSSES["nb"]
    with pytest.raises(InputError, match="'loss' parameter.*'mse'.*'tweedie'.*Got 'huber'"):
        get_loss("huber")


def test_mse_and_kl_plain_formulas(counts):
    y, mu = counts
    np.testing.assert_allclose(LOSSES["mse"].value(y, mu), (y - mu) ** 2, rtol=RTOL)
    ref = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0) - y + mu
    np.testing.assert_allclose(LOSSES["kl"].value(y, mu), ref, rtol=RTOL)
    # ℓ(0, μ) = μ exactly: the closed form of the zeros of sparse data relies on it
    assert np.array_equal(LOSSES["kl"].value(np.zeros_like(mu), mu), mu)


def test_kl_is_half_the_poisson_deviance(counts):
    y, mu = counts
    # deviance = 2 (log P(y; μ=y) − log P(y; μ)); scipy's logpmf at μ = y (μ → 0⁺ for y = 0)
    dev = 2.0 * (stats.poisson.logpmf(y, np.maximum(y, 1e-300)) - stats.poisson.logpmf(y, mu))
    # scipy sums log terms of size ~30 in another order: 1e-10 absolute covers the cancellation
    np.testing.assert_allclose(2.0 * LOSSES["kl"].value(y, mu), dev, rtol=1e-10, atol=1e-10)
    assert 2.0 * LOSSES["kl"].value(y, mu).mean() == pytest.approx(mean_poisson_deviance(y, mu), rel=RTOL)


def test_gp_is_the_generalized_poisson_negative_log_likelihood(counts):
    y, mu = counts
    # θ = 0: Poisson, ℓ = −log P(y) − log y!
    np.testing.assert_allclose(LOSSES["gp"].value(y, mu, theta=0.0),
                               -stats.poisson.logpmf(y, mu) - gammaln(y + 1), rtol=1e-10, atol=1e-10)
    # θ > 0: Consul's pmf written out; it sums to 1 over y (so the density is the right one)
    theta, m0 = 0.4, 2.5
    ys = np.arange(0.0, 400.0)
    l1, l2 = m0 / (1 + theta), theta / (1 + theta)
    logp = np.log(l1) + (ys - 1) * np.log(l1 + l2 * ys) - l1 - l2 * ys - gammaln(ys + 1)
    # the tail beyond 400 is < 1e-100; the sum of 400 terms carries ~1e-15 rounding
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-12)
    assert np.sum(ys * np.exp(logp)) == pytest.approx(m0, rel=1e-12)  # mean μ
    # log y! up to 2000 in magnitude: 1e-9 absolute is ~1e-12 relative to it
    np.testing.assert_allclose(LOSSES["gp"].value(ys, m0, theta=theta), -logp - gammaln(ys + 1), rtol=1e-12,
                               atol=1e-9)


def test_nb_matches_scipy_nbinom(counts):
    y, mu = counts
    for r in (0.5, 3.0, 50.0):
        ref = -stats.nbinom.logpmf(y, r, r / (r + mu)) - gammaln(y + 1)
        # scipy evaluates the same lgamma terms (magnitudes up to ~100) in another order
        np.testing.assert_allclose(LOSSES["nb"].value(y, mu, size=r), ref, rtol=1e-10, atol=1e-10)


def test_gamma_inverse_gaussian_tweedie_deviances(counts, positive):
    y, mu = positive
    assert LOSSES["gamma"].value(y, mu).mean() == pytest.approx(mean_gamma_deviance(y, mu), rel=RTOL)
    for p in (3.0, 2.5):
        assert LOSSES["tweedie"].value(y, mu, power=p).mean() == pytest.approx(
            mean_tweedie_deviance(y, mu, power=p), rel=RTOL)
    np.testing.assert_allclose(LOSSES["inverse_gaussian"].value(y, mu), (y - mu) ** 2 / (mu ** 2 * y), rtol=RTOL)
    # IG deviance = Tweedie p = 3 deviance
    np.testing.assert_allclose(LOSSES["inverse_gaussian"].value(y, mu), LOSSES["tweedie"].value(y, mu, power=3.0),
                               rtol=1e-10, atol=1e-15)  # two algebraic forms: the Tweedie one cancels
    # terms of size ~1/μ ≈ 1 near y = μ, leaving ~1e-16 absolute error on values that go to 0
    yc, muc = counts  # 1 < p < 2: zeros are in the support
    for p in (0.0, 1.0, 1.2, 1.5, 1.8):
        assert LOSSES["tweedie"].value(yc, muc, power=p).mean() == pytest.approx(
            mean_tweedie_deviance(yc, muc, power=p), rel=RTOL)
    assert LOSSES["tweedie"].value(y, mu, power=2.0).mean() == pytest.approx(mean_gamma_deviance(y, mu), rel=RTOL)
    # φ scales the deviance
    np.testing.assert_allclose(LOSSES["gamma"].value(y, mu, phi=2.0), LOSSES["gamma"].value(y, mu) / 2, rtol=RTOL)


def test_gamma_and_inverse_gaussian_against_scipy_densities(positive):
    y, mu = positive
    alpha = 3.0
    # gamma with shape α, mean μ: log f(y; μ) − log f(y; y) = −α d(y, μ)/2
    lf = stats.gamma.logpdf(y, alpha, scale=mu / alpha) - stats.gamma.logpdf(y, alpha, scale=y / alpha)
    np.testing.assert_allclose(LOSSES["gamma"].value(y, mu), -2.0 * lf / alpha, rtol=1e-10, atol=1e-12)
    # inverse Gaussian IG(mean μ, shape λ = 1) is scipy's invgauss(μ, scale=1):
    # −2 log f = log(2π y³) + (y − μ)²/(μ² y)
    lf = stats.invgauss.logpdf(y, mu)
    np.testing.assert_allclose(LOSSES["inverse_gaussian"].value(y, mu), -2.0 * lf - np.log(2 * np.pi * y ** 3),
                               rtol=1e-9, atol=1e-10)  # scipy's log-density of size ~10 cancels here


def test_zero_totals_match_explicit_sums():
    rng = np.random.default_rng(2)
    wd, h = rng.uniform(size=(30, 3)), rng.uniform(size=(3, 20))
    mu = wd @ h
    zeros = np.zeros_like(mu)
    for name, pars in (("mse", {}), ("kl", {}), ("gp", {"theta": 0.7}),
                       ("gp", {"theta": rng.uniform(size=(30, 1))}), ("gp", {"theta": rng.uniform(size=(1, 20))})):
        spec = LOSSES[name]
        assert spec.zero_total(wd, h, **pars) == pytest.approx(spec.value(zeros, mu, **pars).sum(), rel=RTOL)
    for name in ("nb", "tweedie"):
        assert LOSSES[name].zero_total is None
    assert not LOSSES["gamma"].zero_in_support() and not LOSSES["inverse_gaussian"].zero_in_support()
    assert LOSSES["tweedie"].zero_in_support(power=1.5) and not LOSSES["tweedie"].zero_in_support(power=2.5)


def test_irls_weights_and_robust():
    mu = np.array([1e-20, 1e-5, 0.5, 2.0, 10.0])
    y = np.array([0.0, 1.0, 0.0, 4.0, 7.0])
    np.testing.assert_array_equal(LOSSES["mse"].weight(y, mu), np.ones(5))
    np.testing.assert_allclose(LOSSES["kl"].weight(y, mu), 1 / np.maximum(mu, 1e-4), rtol=RTOL)
    np.testing.assert_array_equal(LOSSES["gp"].weight(y, mu, theta=3.0), LOSSES["kl"].weight(y, mu))
    m = np.maximum(mu, 1e-15)
    np.testing.assert_allclose(LOSSES["nb"].weight(y, mu, size=2.0), np.minimum(2 / (m * (2 + m)), 1e6), rtol=RTOL)
    for name, p in (("gamma", 2.0), ("inverse_gaussian", 3.0)):
        np.testing.assert_allclose(LOSSES[name].weight(y, mu), np.minimum(m ** -p, 1e6), rtol=RTOL)
    np.testing.assert_allclose(LOSSES["tweedie"].weight(y, mu, power=1.3), np.minimum(m ** -1.3, 1e6), rtol=RTOL)
    # Huber on Pearson residuals (V = μ for gp): ½ρ² inside δ, δ|ρ| − ½δ² outside
    rho = np.abs(y - mu) / np.sqrt(np.maximum(mu, 1e-10))
    ref = np.where(rho <= 1.345, 0.5 * rho ** 2, 1.345 * rho - 0.5 * 1.345 ** 2)
    np.testing.assert_allclose(huber(y, mu, 1.345, "gp", theta=0.2), ref, rtol=RTOL)
    w = LOSSES["kl"].weight(y, mu)
    r = np.abs(y - mu) * np.sqrt(w)
    np.testing.assert_allclose(robust_weight(w, y, mu, 1.0), w * np.where(r <= 1, 1, 1 / (r + 1e-15)), rtol=RTOL)


def test_params_validated():
    with pytest.raises(InputError, match="'size' parameter of evaluate must be a parameter of loss 'gp'"):
        LOSSES["gp"].params("evaluate", size=3.0)
    with pytest.raises(InputError, match="'power' parameter of f must be a Tweedie power p <= 0 or p >= 1"):
        LOSSES["tweedie"].params("f", power=0.5)
    with pytest.raises(InputError, match="'size' parameter of f"):
        LOSSES["nb"].params("f", size=-1.0)
    assert LOSSES["nb"].params("f") == {"size": 10.0}


def test_gp_theta_update_reaches_the_maximum_likelihood():
    rng = np.random.default_rng(1)
    mu = rng.uniform(0.5, 8.0, size=(3, 500))
    y = rng.negative_binomial(2, 2 / (2 + mu)).astype(float)  # over-dispersed counts
    theta = update_dispersion("gp", y, mu, n_iter=500)
    assert theta.shape == (3, 1)
    for i in range(3):
        best = minimize_scalar(lambda t: LOSSES["gp"].value(y[i], mu[i], theta=t).sum(), bounds=(0, 5),
                               method="bounded", options={"xatol": 1e-10}).x
        # the MM fixed point is the MLE; the bounded scalar search stops within ~1e-8 of it
        assert theta[i, 0] == pytest.approx(best, abs=1e-6)
    # per column = per row of the transpose; global = mean of per-row; five steps from 0.1 by default
    np.testing.assert_allclose(update_dispersion("gp", y.T, mu.T, dispersion="per_col", n_iter=500), theta.T,
                               rtol=RTOL)
    g = update_dispersion("gp", y, mu, dispersion="global")
    assert g == pytest.approx(update_dispersion("gp", y, mu).mean(), rel=RTOL)
    assert update_dispersion("gp", y, mu, dispersion="none") == 0.0
    capped = update_dispersion("gp", y, mu, theta_max=0.3, n_iter=50)
    assert np.all(capped <= 0.3)


def test_nb_size_and_phi_updates_plain_formulas():
    rng = np.random.default_rng(4)
    mu = rng.uniform(1.0, 10.0, size=(4, 20000))
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    r = update_dispersion("nb", y, mu)
    ref = (mu ** 2).sum(axis=1) / ((y - mu) ** 2 - mu).sum(axis=1)
    np.testing.assert_allclose(r[:, 0], ref, rtol=RTOL)
    # method of moments on 3000 draws per row: within 20 % of the planted size 3
    np.testing.assert_allclose(r[:, 0], 3.0, rtol=0.2)
    assert update_dispersion("nb", y, mu, dispersion="global") == pytest.approx(np.median(ref), rel=RTOL)
    assert update_dispersion("nb", mu, mu, size_max=7.0)[0, 0] == 7.0  # no excess variance → size_max
    yg = rng.gamma(4.0, mu / 4.0)
    yg[:, :10] = 0.0  # zeros are left out of φ
    for name, p in (("gamma", 2.0), ("inverse_gaussian", 3.0), ("tweedie", 1.7)):
        phi = update_dispersion(name, yg, mu, power=p, dispersion="per_col")
        pos = yg > 0
        ref = np.where(pos, (yg - mu) ** 2 / mu ** p, 0).sum(0) / np.maximum(pos.sum(0), 1)
        ref = np.clip(np.where(pos.sum(0) > 0, ref, 1.0), 1e-6, 1e4)
        np.testing.assert_allclose(phi[0], ref, rtol=RTOL)
    # gamma φ = 1/shape = 0.25: the moment estimate over 80000 draws is within 10 %
    assert update_dispersion("gamma", yg, mu, dispersion="global") == pytest.approx(0.25, rel=0.1)
    with pytest.raises(InputError, match="'dispersion' parameter of update_dispersion"):
        update_dispersion("nb", y, mu, dispersion="row")


# --------------------------------------------------------------------------------------------
# evaluate / mse stand-alone (RcppML §10.6)
# --------------------------------------------------------------------------------------------


def test_standalone_evaluate_and_mse():
    from dnmf.losses import evaluate, mse
    from dnmf.models import NMFModel

    rng = np.random.default_rng(5)
    w, d, h = rng.uniform(size=(20, 3)), np.array([3.0, 2.0, 1.0]), rng.uniform(size=(3, 15))
    A = sp.random(20, 15, density=0.3, random_state=5, format="csc")
    ref = np.mean((A.toarray() - w @ np.diag(d) @ h) ** 2)
    model = NMFModel(w=w, d=d, h=h)
    # Gram-identity zeros vs explicit differences: a few ulps of terms of size ~1 (see test_models)
    assert mse(model, A) == pytest.approx(ref, rel=1e-12)
    assert mse(w, A, d, h) == pytest.approx(ref, rel=1e-12)
    assert mse(w * d, A, h=h) == pytest.approx(ref, rel=1e-12)  # d defaults to ones
    assert evaluate(model, A, loss="nb", size=2.0) == model.evaluate(A, loss="nb", size=2.0)
    with pytest.raises(InputError, match="'h' parameter of mse must be a matrix of shape"):
        mse(w, A)
    with pytest.raises(InputError, match="'h' parameter of mse must be a \\(3, n\\) matrix"):
        mse(w, A, d, h.T)
    with pytest.raises(InputError, match="'model' parameter of evaluate must be an NMFModel"):
        evaluate(w, A)


# --------------------------------------------------------------------------------------------
# suggest_loss (spec §6.6)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_means():
    """Rank-3 means spanning ~2.5 decades (log-uniform factors), median 5."""
    rng = np.random.default_rng(0)
    W = np.exp(rng.uniform(-2, 1.5, size=(200, 3)))
    H = np.exp(rng.uniform(-2, 1.5, size=(3, 150)))
    mu = W @ H
    return mu / np.median(mu) * 5.0


@pytest.mark.parametrize("family, power, loss", [("poisson", 1.0, "gp"), ("gamma", 2.0, "gamma"),
                                                 ("gaussian", 0.0, "mse")])
def test_suggest_loss_recognizes_the_simulating_distribution(planted_means, family, power, loss):
    import dnmf

    rng = np.random.default_rng(11)
    mu, k = planted_means, 3
    if family == "poisson":
        Y = rng.poisson(mu).astype(float)
    elif family == "gamma":
        Y = rng.gamma(4.0, mu / 4.0)  # shape 4: Var = μ²/4
    else:  # constant variance; the offset keeps every draw positive and adds one rank
        mu, k = 3 * mu + 10, 4
        Y = mu + rng.normal(0.0, 3.0, size=mu.shape)
    s = dnmf.suggest_loss(Y, k=k, seed=1)
    assert s.loss == loss and s.loss_params == {}
    # the fitted μ carries estimation error that flattens the low end (errors in variables): over
    # three seeds the estimates were within 0.18 of the true power with standard errors ≤ 0.06
    assert s.power == pytest.approx(power, abs=0.25)
    # the chosen reference power fits the bins better than the other references
    ref_sse = {p: s.fit_sse[f"p={p:g}"] for p in (0.0, 1.0, 2.0, 3.0)}
    assert min(ref_sse, key=ref_sse.get) == power
    # evidence table: bins partition the entries (zeros included), variances are mean squared residuals
    t = s.table
    assert int(t["n"].sum()) <= Y.size and int(t["n"].sum()) >= Y.size - 10  # μ ≤ 1e-12 entries dropped
    R = Y - s.model.reconstruct()
    mu_hat = s.model.reconstruct()
    row = t[t["used"]].iloc[len(t[t["used"]]) // 2]
    sel = (mu_hat >= row["mu_low"]) & (mu_hat < row["mu_high"])
    # the same entries summed in another order: 1e-10 relative
    assert row["variance"] == pytest.approx(np.mean(R[sel] ** 2), rel=1e-10)
    assert int(row["n"]) == int(sel.sum())


def test_suggest_loss_sparse_equals_dense_and_plots(planted_means):
    import matplotlib

    matplotlib.use("Agg")
    import dnmf

    rng = np.random.default_rng(3)
    Y = rng.poisson(planted_means / 5).astype(float)  # many zeros
    dense = dnmf.suggest_loss(Y, k=3, seed=2)
    sparse = dnmf.suggest_loss(sp.csc_array(Y), k=3, seed=2)
    assert dense.loss == sparse.loss == "gp"
    # the same fit on the same data read two ways: to the fit's rounding (float32 engine)
    assert sparse.power == pytest.approx(dense.power, abs=1e-4)
    fig = dense.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert sum(lab.startswith("p = ") for lab in labels) == 4 and any(lab.startswith("fit") for lab in labels)
    with pytest.raises(InputError, match="'power_tol' parameter of suggest_loss"):
        dnmf.suggest_loss(Y, k=3, power_tol=0.9)


def test_mu_objectives_of_nmfkc():
    """The weighted objectives of the multiplicative-update loops: plain formulas, and KL = the
    objective plus its μ-free part w (y log y − y)."""
    rng = np.random.default_rng(6)
    y = rng.poisson(3.0, size=(5, 7)).astype(float)
    mu = rng.uniform(0.5, 5.0, size=(5, 7))
    w = rng.uniform(0.0, 2.0, size=(5, 7))
    # same operations in the same order as written here: bitwise equal
    assert np.array_equal(LOSSES["mse"].objective(y, mu, w), w * (y - mu) * (y - mu))
    assert np.array_equal(LOSSES["kl"].objective(y, mu, w), -(w * y) * np.log(mu + 1e-10) + w * mu)
    assert np.array_equal(LOSSES["kl"].objective(y, mu), -y * np.log(mu + 1e-10) + mu)
    ylogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0)
    # ε = 1e-10 inside the log shifts it by ~1e-10/μ ≤ 2e-10 per entry (times y ≤ ~12)
    np.testing.assert_allclose(LOSSES["kl"].objective(y, mu) + ylogy - y, LOSSES["kl"].value(y, mu), atol=1e-8)
    for name in ("gp", "nb", "gamma", "inverse_gaussian", "tweedie"):
        assert LOSSES[name].objective is None and LOSSES[name].mu_terms is None


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_mu_step_does_not_increase_the_objective(name):
    """Lee–Seung steps from the registry's (N, D) on a weighted problem: the weighted objective
    never increases (the multiplicative-update theorem), checked against the registry objective."""
    rng = np.random.default_rng(9)
    Y = rng.poisson(rng.uniform(0.5, 3, (20, 2)) @ rng.uniform(0.5, 3, (2, 25))).astype(float)
    w = rng.uniform(0.0, 2.0, Y.shape)
    X, B = rng.uniform(0.5, 1.5, (20, 2)), rng.uniform(0.5, 1.5, (2, 25))
    spec = LOSSES[name]
    prev = np.inf
    for _ in range(50):
        N, D = spec.mu_terms(Y, X @ B, w)
        X = X * (N @ B.T) / (D @ B.T)
        N, D = spec.mu_terms(Y, X @ B, w)
        B = B * (X.T @ N) / (X.T @ D)
        obj = float(spec.objective(Y, X @ B, w).sum())
        # monotone up to rounding of a sum of ~500 terms of size ~1-10: 1e-9 relative slack
        assert obj <= prev * (1 + 1e-9) + 1e-12
        prev = obj
    # the (N, D) matrices are the written-out Lee–Seung terms
    mu = X @ B
    N, D = spec.mu_terms(Y, mu, w)
    if name == "mse":
        assert np.array_equal(N, w * Y) and np.array_equal(D, w * mu)
    else:
        assert np.array_equal(N, w * (Y / (mu + 1e-10))) and D is w


def test_sparse_dispersion_updates_equal_the_dense_ones():
    """Stored entries plus closed-form row/column sums of μ and μ² give the dense update."""
    from dnmf.losses import update_dispersion_sparse

    rng = np.random.default_rng(8)
    wd, h = rng.uniform(0.1, 1.5, size=(60, 3)), rng.uniform(0.1, 1.5, size=(3, 50))
    mu = wd @ h
    Y = rng.negative_binomial(1.5, 1.5 / (1.5 + mu)).astype(float)  # ~40 % zeros
    Y[rng.uniform(size=Y.shape) < 0.3] = 0.0
    A = sp.csc_array(Y)
    r, c = np.nonzero(Y)
    zr, zc = np.nonzero(Y == 0)
    A_stored_zero = sp.coo_array((np.r_[Y[r, c], np.zeros(5)], (np.r_[r, zr[:5]], np.r_[c, zc[:5]])), shape=Y.shape)
    assert A_stored_zero.nnz == A.nnz + 5  # explicit stored zeros change nothing
    for loss in ("gp", "nb", "gamma", "inverse_gaussian", "tweedie"):
        for mode in ("per_row", "per_col", "global", "none"):
            dense = update_dispersion(loss, Y, mu, dispersion=mode, power=1.3)
            for X in (A, A_stored_zero, sp.csr_array(Y)):
                got = update_dispersion_sparse(loss, X, wd, h, dispersion=mode, power=1.3)
                # the same sums in another order; the NB denominator takes Σμ² − Σ_stored μ² in
                # closed form (terms ~1, 3000 of them): 1e-9 relative covers the cancellation
                np.testing.assert_allclose(got, dense, rtol=1e-9, err_msg=f"{loss} {mode}")
    with pytest.raises(InputError, match="'A' parameter of update_dispersion_sparse must be a scipy.sparse"):
        update_dispersion_sparse("nb", Y, wd, h)


# ---------------------------------------------------------------------------------------------
# One definition per formula: the registry's array functions and the IRLS kernel's scalar
# functions are the same numba-compiled Python functions (dnmf/_losses.py)
# ---------------------------------------------------------------------------------------------

_GRID_Y = (0.0, 1e-12, 0.3, 1.0, 2.0, 7.0, 50.0)
#: μ = 0, below / at the floors 1e-15 (weights), 1e-10 (values), 1e-4 (KL weight), and O(1)-O(10)
_GRID_MU = (0.0, 1e-20, 1e-15, 1e-12, 1e-10, 1e-5, 1e-4, 0.5, 3.0, 40.0)


def _registry_cases():
    """(loss name, registry params, kernel code, kernel disp, kernel power) over the dispersion grid."""
    from dnmf.kernels.irls import LOSS_CODES
    for disp in (0.0, 0.5, 10.0):
        yield "gp", {"theta": disp}, LOSS_CODES["gp"], disp, 0.0
    for disp in (0.01, 0.5, 10.0):
        yield "nb", {"size": disp}, LOSS_CODES["nb"], disp, 0.0
    yield "mse", {}, LOSS_CODES["mse"], 0.0, 0.0
    yield "gamma", {}, LOSS_CODES["gamma"], 0.0, 2.0
    yield "inverse_gaussian", {}, LOSS_CODES["inverse_gaussian"], 0.0, 3.0
    for p in (0.0, 1.0, 1.5, 2.0, 2.5, 3.0):
        yield "tweedie", {"power": p}, LOSS_CODES["tweedie"], 0.0, p


def test_registry_arrays_equal_kernel_scalars_bitwise():
    from dnmf.kernels.irls import elem_loss, elem_robust_loss, irls_weight
    Y, M = np.meshgrid(np.array(_GRID_Y), np.array(_GRID_MU), indexing="ij")
    for name, pars, code, disp, power in _registry_cases():
        spec = LOSSES[name]
        ref_val = np.array([[elem_loss(code, y, mu, disp, power) for mu in _GRID_MU] for y in _GRID_Y])
        ref_w = np.array([[irls_weight(code, y, mu, disp, power, 0.0) for mu in _GRID_MU] for y in _GRID_Y])
        ref_rw = np.array([[irls_weight(code, y, mu, disp, power, 1.345) for mu in _GRID_MU] for y in _GRID_Y])
        ref_hub = np.array([[elem_robust_loss(code, y, mu, disp, power, 1.345) for mu in _GRID_MU]
                            for y in _GRID_Y])
        # the same compiled formula on the same float64 inputs, no reordering: bitwise equal
        # (assert_array_equal treats NaN = NaN and compares ±inf exactly)
        np.testing.assert_array_equal(spec.value(Y, M, **pars), ref_val, err_msg=f"{name} {pars} value")
        w = spec.weight(Y, M, **pars)
        np.testing.assert_array_equal(w, ref_w, err_msg=f"{name} {pars} weight")
        np.testing.assert_array_equal(robust_weight(w, Y, M, 1.345), ref_rw, err_msg=f"{name} {pars} robust weight")
        np.testing.assert_array_equal(huber(Y, M, 1.345, name, **pars), ref_hub, err_msg=f"{name} {pars} huber")
    # per-row dispersion broadcasts as before: row i of the value uses θ_i
    theta = np.array([[0.0], [0.5], [2.0]])
    got = LOSSES["gp"].value(np.array([[0.0, 3.0]]), np.array([[1.5, 2.5]]), theta=theta)
    ref = np.array([[elem_loss(1, y, mu, t, 0.0) for y, mu in ((0.0, 1.5), (3.0, 2.5))] for t in theta[:, 0]])
    np.testing.assert_array_equal(got, ref)
    # φ divides the unit deviance: gamma with φ = 4 is exactly the φ = 1 value / 4 (a power of 2)
    np.testing.assert_array_equal(LOSSES["gamma"].value(Y + 1, M + 1, phi=4.0), LOSSES["gamma"].value(Y + 1, M + 1) / 4)


def test_kernel_defines_no_loss_formula():
    """kernels/irls.py compiles the registry's functions; it does not define its own formulas."""
    import dnmf._losses as reg
    import dnmf.kernels.irls as irls
    used = ("mse_elem", "kl_elem", "gp_elem", "nb_elem", "gamma_elem", "ig_elem", "tweedie_elem", "weight_unit",
            "weight_kl", "weight_nb", "weight_power", "variance_unit", "variance_mu", "variance_nb", "variance_gamma",
            "variance_ig", "variance_power", "huber_weight", "huber_pearson", "gp_eta", "gp_theta_root")
    for name in used:
        assert getattr(irls, name).py_func is getattr(reg, "_" + name), name
    for twin in ("_weight_unit", "_weight_kl", "_weight_nb", "_weight_power", "_xlogy", "xlogy"):
        assert not hasattr(irls, twin), twin
    # the floors exist once: the kernel's are the registry's objects
    assert irls._FLOOR is reg.FLOOR and irls._KL_W_FLOOR is reg._KL_W_FLOOR
    for name in ("_W_MU_FLOOR", "_W_CAP"):
        assert not hasattr(irls, name), name


def test_gp_theta_update_equals_kernel_mm():
    """The registry's GP θ update (vectorized over rows) and the kernel's per-group MM loop share
    the step's formulas (_gp_eta, _gp_theta_root) and agree on a per-row fit."""
    from dnmf.kernels.irls import gp_theta_mm
    rng = np.random.default_rng(7)
    mu = rng.uniform(0.3, 6.0, size=(6, 50))
    y = rng.poisson(mu * rng.uniform(0.3, 2.0, size=(6, 1))).astype(float)
    got = update_dispersion("gp", y, mu, dispersion="per_row", current=0.1, theta_max=5.0, n_iter=5)
    ref = np.array([gp_theta_mm(y[i], mu[i], y.shape[1], y[i].sum(), mu[i].sum(), 0.1, 5.0, 5)
                    for i in range(y.shape[0])])
    assert np.all(ref > 0) and np.ptp(ref) > 0  # a non-trivial θ per row (neither 0 nor the cap)
    # the same recurrence; α, γ, Σy, Σμ are summed in different orders (bincount vs a loop, NumPy's
    # pairwise row sums), a few ulps per step over 5 steps: 1e-12 relative
    np.testing.assert_allclose(got[:, 0], ref, rtol=1e-12)
