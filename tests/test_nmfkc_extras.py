"""nmfkc print / summary / plot / coef, the "Call:" line, R's defaults (seed, detail), formula
mode, and the DOT print hint (spec nmfre.md §2, §7.2–7.3, §8)."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

import dnmf
from dnmf import nmfkc, nmfkc_inference
from dnmf.covariates._text import r_format
from dnmf.exceptions import ConvergenceWarning, InputError
from dnmf.formula import parse_formula

from orthodont_data import load_orthodont_frames

FORMULA = "age8 + age10 + age12 + age14 ~ intercept + male"


@pytest.fixture(scope="module")
def frames():
    return load_orthodont_frames()


@pytest.fixture(scope="module")
def wide(frames):
    """Orthodont with one row per subject: the four ages, an intercept column and male."""
    Y, A = frames
    return pd.concat([Y.T.set_axis(["age8", "age10", "age12", "age14"], axis=1), A.T], axis=1)


@pytest.fixture(scope="module")
def fit1(frames):
    Y, A = frames
    return nmfkc(Y, A, rank=1)


# ------------------------------------------------------------------------- print / summary


def test_print_is_r_print_nmf(fit1):
    # R: print.nmf (.print.nmf.fit + hint); R² = format(0.41653, digits=4)
    assert str(fit1) == "\n".join([
        "",
        "Call:",
        "nmfkc(Y = Y, A = A, rank = 1)",
        "",
        "Model:       Y(4,27)~X(4,1)C(1,2)A(2,27)=XB(1,27)",
        "Convergence: 76 / 5000 (converged)  epsilon = 0.0001",
        "R-squared:   0.4165",
        "",
        "Use coef() for the coefficient matrix, summary() for diagnostics.",
        "",
    ])
    assert repr(fit1) == str(fit1)


def test_summary_text(fit1):
    lines = fit1.summary().split("\n")
    assert lines[:4] == ["", "Call:", "nmfkc(Y = Y, A = A, rank = 1)", ""]
    assert lines[4] == "Dimensions: Y(4,27)~X(4,1)C(1,2)A(2,27)=XB(1,27) "
    assert lines[5] == "Rank (Q):    1 "
    assert lines[7] == "Method:      EU "
    assert lines[8] == "Iterations: 76 / 5000 (converged)  epsilon = 0.0001"
    assert lines[9] == "Missing:     0 (0.0%) "
    # spec §2: objective 535.8, cor² 0.4165, sigma 2.238, MAE 1.766 (R's 4 significant digits)
    assert "  Objective function:   535.8 " in lines
    assert "  R-squared (cor^2):    0.4165 " in lines
    assert "  Residual Std Error:   2.238 " in lines
    assert "  Mean Absolute Error:  1.766 " in lines
    assert "Structure Diagnostics:" in lines
    assert "  Clustering Crispness:  1 (range: 0-1, closer to 1 is better)" in lines
    assert lines[-1] == ""


def test_summary_effective_rank_line():
    rng = np.random.default_rng(0)
    Y = rng.random((6, 30))
    f = nmfkc(Y, rank=3, seed=1)
    line = [s for s in f.summary().split("\n") if s.startswith("  Effective Rank:")]
    assert line == [f"  Effective Rank:      {f.criterion['effective_rank']:.2f} / 3"]


def test_not_converged_convergence_line():
    rng = np.random.default_rng(1)
    with pytest.warns(ConvergenceWarning):
        f = nmfkc(rng.random((5, 12)), rank=2, maxit=3)
    assert "Convergence: 3 / 3 (NOT converged)  epsilon = 0.0001" in str(f)
    assert "nmfkc(Y = Y, rank = 2, maxit = 3)" in str(f)


def test_call_lists_given_arguments():
    rng = np.random.default_rng(2)
    Y = rng.random((4, 10))
    f = nmfkc(Y, rank=2, epsilon=1e-6, X_init="runif", prefix="F", detail="full", r_rng=True)
    assert f.call == 'nmfkc(Y = Y, rank = 2, epsilon = 1e-06, X_init = "runif", prefix = "F", detail = "full", r_rng = TRUE)'
    assert nmfkc(Y).call == "nmfkc(Y = Y)"  # defaults are not part of the call, as in R


def test_r_format_digits():
    # R 4.x: format(x, digits=4)
    assert r_format(0.41653, 4) == "0.4165"
    assert r_format(0.5, 4) == "0.5"
    assert r_format(535.7777, 4) == "535.8"
    assert r_format(123456.7, 4) == "123457"
    assert r_format(1.234e-7, 4) == "1.234e-07"
    assert r_format(1.0, 4) == "1"


def test_coef_and_plot(fit1):
    np.testing.assert_array_equal(fit1.coef(), fit1.C)
    fig = fit1.plot()
    ax = fig.axes[0]
    assert ax.get_title() == f"r.squared={round(fit1.r_squared, 3)}" == "r.squared=0.416"  # cor² = 0.41648…
    assert ax.get_xlabel() == "iter" and ax.get_ylabel() == "objfunc"
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), fit1.objfunc_iter)
    assert len(fit1.objfunc_iter) == 76 - 9  # R trims to iterations 10..end


def test_inference_prints_and_summary_has_call(fit1, frames):
    Y, A = frames
    inf = nmfkc_inference(fit1, Y, A, wild_bootstrap=False)
    text = str(inf)
    assert text.startswith("\nCall:\nnmfkc(Y = Y, A = A, rank = 1)\n")
    assert "Model:" in text and "Convergence:" in text and len(text.split("\n")) <= 15  # upstream pin
    assert inf.summary().split("\n")[:4] == ["", "Call:", "nmfkc(Y = Y, A = A, rank = 1)", ""]
    assert inf.coef() is inf.coefficients


# ------------------------------------------------------------------------------- defaults


def test_seed_none_is_r_default(frames):
    Y, _ = frames
    a = nmfkc(Y, rank=2, seed=None, X_init="runif")
    b = nmfkc(Y, rank=2, X_init="runif")
    np.testing.assert_array_equal(a.X, b.X)
    assert a.seed == 123


def test_detail_default_is_fast(fit1):
    # upstream HEAD: detail = "fast" (no silhouette / CPCC / dist.cor)
    import inspect

    assert inspect.signature(nmfkc).parameters["detail"].default == "fast"
    assert "silhouette" not in fit1.criterion or not np.isfinite(fit1.criterion.get("silhouette", np.nan))


def test_Q_alias(frames):
    Y, A = frames
    f = nmfkc(Y, A, Q=1)
    np.testing.assert_array_equal(f.C, nmfkc(Y, A, rank=1).C)
    assert f.rank == 1
    g = dnmf.nmfre(Y, A, Q=1, df_rate=0.2, wild_bootstrap=False)
    assert g.shape[2] == 1


# ------------------------------------------------------------------------------ formula mode


def test_formula_equals_matrix_call(frames, wide, fit1):
    f = nmfkc(FORMULA, data=wide, rank=1)
    np.testing.assert_array_equal(f.X, fit1.X)
    np.testing.assert_array_equal(f.C, fit1.C)
    assert f.n_iter == 76
    assert f.formula_meta == {"formula": FORMULA, "Y_cols": ("age8", "age10", "age12", "age14"),
                              "A_cols": ("intercept", "male")}
    assert f.covariate_names == ("intercept", "male")
    assert f.feature_names == ("age8", "age10", "age12", "age14")
    assert f.call == f"nmfkc(Y = {FORMULA}, rank = 1, data = data)"  # match.call: formals order
    assert f"Formula:     {FORMULA}" in str(f).split("\n")
    np.testing.assert_allclose(f.predict(newdata=wide.iloc[:3]), fit1.predict(frames[1].to_numpy()[:, :3]))


def test_formula_nmfre_equals_matrix_call(frames, wide):
    Y, A = frames
    a = dnmf.nmfre(Y, A, rank=1, df_rate=0.2, wild_bootstrap=False)
    b = dnmf.nmfre("age8+age10+age12+age14 ~ intercept+male", data=wide, rank=1, df_rate=0.2, wild_bootstrap=False)
    np.testing.assert_array_equal(a.C, b.C)
    np.testing.assert_array_equal(a.U, b.U)
    assert b.formula_meta["A_cols"] == ("intercept", "male")
    assert b.call.startswith(f"nmfre('{FORMULA}', data=data, rank=1")
    assert f"Formula:     {FORMULA}" in str(b).split("\n")
    assert "Formula:" not in str(a)


def test_formula_dot_and_omitted_A(wide, fit1):
    f = nmfkc(". ~ intercept + male", data=wide, rank=1)
    np.testing.assert_array_equal(f.C, fit1.C)
    g = nmfkc("age8 + age10 + age12 + age14 ~ 0", data=wide, rank=1)
    assert g.formula_meta["A_cols"] is None and not g.has_A
    np.testing.assert_array_equal(g.X, nmfkc(wide[["age8", "age10", "age12", "age14"]].T, rank=1).X)
    cols = ["y1", "y2", "x1", "x2"]
    assert parse_formula("y1 + y2 ~ .", cols, "t") == (["y1", "y2"], ["x1", "x2"])
    assert parse_formula("y1 ~ x1 + 0", cols, "t") == (["y1"], ["x1"])
    assert parse_formula("y1 + y2 ~ -1", cols, "t") == (["y1", "y2"], None)


def test_formula_errors(wide):
    with pytest.raises(InputError, match="not found in data: nope"):
        nmfkc("age8 ~ nope", data=wide)
    with pytest.raises(InputError, match="both"):
        nmfkc(". ~ .", data=wide)
    with pytest.raises(InputError, match="data"):
        nmfkc("age8 ~ male")
    with pytest.raises(InputError, match="formula"):
        nmfkc(wide.to_numpy().T, data=wide)


# ------------------------------------------------------------------------------------ DOT


def test_dot_repr_has_print_hint(fit1):
    g = dnmf.nmfkc_dot(fit1)
    assert repr(g) == str(g) + "# Use .render(path) to render (requires Graphviz), or .save(path) to write this text to a .dot file.\n"
    assert str(g).endswith("}\n")


# ------------------------------------------------------------------- kernels (spec §9)


def _kernel_loop(U, V, f):
    """Plain-loop reference: f(d²) for every column pair."""
    out = np.empty((U.shape[1], V.shape[1]))
    for i in range(U.shape[1]):
        for j in range(V.shape[1]):
            out[i, j] = f(float(np.sum((U[:, i] - V[:, j]) ** 2)), U[:, i], V[:, j])
    return out


def test_kernels_match_loops():
    from dnmf.covariates import nmfkc_kernel

    rng = np.random.default_rng(3)
    U, V = rng.random((3, 7)), rng.random((3, 5))
    tol = 1e-12  # closed forms; only the ‖u‖²+‖v‖²−2uᵀv cancellation differs from the loop
    np.testing.assert_allclose(nmfkc_kernel(U, V, beta=2.0), _kernel_loop(U, V, lambda d2, u, v: np.exp(-2.0 * d2)),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(nmfkc_kernel(U, V, "Exponential", beta=0.7),
                               _kernel_loop(U, V, lambda d2, u, v: np.exp(-0.7 * np.sqrt(d2))), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(nmfkc_kernel(U, V, "Periodic", beta=(1.5, 2.0)),
                               _kernel_loop(U, V, lambda d2, u, v: np.exp(-1.5 * np.sin(2.0 * np.sqrt(d2)) ** 2)),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(nmfkc_kernel(U, V, "Linear"), U.T @ V, rtol=tol)
    np.testing.assert_allclose(nmfkc_kernel(U, V, "NormalizedLinear"),
                               _kernel_loop(U, V, lambda d2, u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)), rtol=tol)
    np.testing.assert_allclose(nmfkc_kernel(U, V, "Polynomial", beta=1.0, degree=3), (U.T @ V + 1.0) ** 3, rtol=tol)
    K = nmfkc_kernel(U)  # V defaults to U; beta 0.5
    np.testing.assert_allclose(K, K.T, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.diag(K), 1.0)
    assert K.kernel == "Gaussian" and K.params == 0.5 and K.function_name == "nmfkc.kernel"
    # negative entries are zeroed (Linear with signed coordinates)
    assert nmfkc_kernel(U - 0.5, V - 0.5, "Linear").min() >= 0.0


def test_gaussian_kernel_from_distance_and_pds():
    from dnmf.covariates import nmfkc_kernel
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(4)
    U, V = rng.random((2, 6)), rng.random((2, 4))
    D = cdist(U.T, V.T)
    np.testing.assert_allclose(nmfkc_kernel(dist=D, beta=3.0), nmfkc_kernel(U, V, beta=3.0), rtol=1e-12, atol=1e-12)
    # pds: a missing coordinate drops that row and rescales by K / K_obs
    Un = rng.random((3, 4))
    Un[1, 2] = np.nan
    ref = np.empty((4, 4))
    for i in range(4):
        for j in range(4):
            ok = ~np.isnan(Un[:, i]) & ~np.isnan(Un[:, j])
            ref[i, j] = np.exp(-0.5 * np.sum((Un[ok, i] - Un[ok, j]) ** 2) * 3 / ok.sum())
    np.testing.assert_allclose(nmfkc_kernel(Un), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="NaN"):
        nmfkc_kernel(Un, kernel="Linear")


def test_beta_nearest_median_against_brute_force():
    from dnmf.covariates import nmfkc_kernel_beta_nearest_med
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(5)
    U = rng.random((2, 40))
    D = cdist(U.T, U.T)
    np.fill_diagonal(D, np.inf)
    sigma0 = np.median(D.min(axis=1))
    res = nmfkc_kernel_beta_nearest_med(U, block_size=7)  # blocks must not change the answer
    assert res.dist_median == pytest.approx(sigma0, rel=1e-12)
    assert res.beta == pytest.approx(1 / (2 * sigma0 ** 2), rel=1e-12)
    t = np.array([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(res.beta_candidates, res.beta * 10.0 ** (-2 * t), rtol=1e-14)
    # landmarks: nearest-landmark distances; Uk identical to U excludes self-distances
    Uk = rng.random((2, 6))
    lm = nmfkc_kernel_beta_nearest_med(U, Uk)
    assert lm.dist_median == pytest.approx(np.median(cdist(U.T, Uk.T).min(axis=1)), rel=1e-12)
    assert lm.uk_is_u is False
    same = nmfkc_kernel_beta_nearest_med(U, U.copy())
    assert same.uk_is_u and same.beta == pytest.approx(res.beta, rel=1e-12)
    assert len(nmfkc_kernel_beta_nearest_med(U, candidates="4points").beta_candidates) == 4


def test_kernel_covariates_fit():
    """cars-style use: a Gaussian kernel of a 1-D covariate as A."""
    from dnmf.covariates import nmfkc_kernel

    x = np.linspace(0, 1, 25)
    Y = (2 + np.sin(3 * x))[None, :]
    A = nmfkc_kernel(x[None, :], beta=20.0)
    f = nmfkc(Y, A, rank=1)
    assert f.dims == "Y(1,25)~X(1,1)C(1,25)A(25,25)=XB(1,25)"
    assert f.r_squared > 0.95  # a smooth fit of a smooth curve (0.976 at the default epsilon)


# ------------------------------------------------------------------ rank / consensus (§9)


def test_rank_table_orthodont_matches_ecv_and_r(frames):
    from dnmf.covariates import nmfkc_rank
    from dnmf.covariates._common import effective_rank_expected

    Y, A = frames
    r = nmfkc_rank(Y, A, rank=[1, 2, 3], r_rng=True)
    c = r.criteria
    assert list(c.columns) == ["rank", "r_squared", "effective_rank", "effective_rank_ratio",
                               "effective_rank_expected", "effective_rank_index", "sigma_ecv"]
    # spec §9: nmfkc.ecv Orthodont Q=1 sigma 2.345796 (R RNG); §2: cor² 0.4165 at Q=1
    assert c["sigma_ecv"].iloc[0] == pytest.approx(2.345796, rel=1e-6)
    assert c["r_squared"].iloc[0] == pytest.approx(0.4165, abs=5e-5)
    assert np.isnan(c["effective_rank"].iloc[0]) and np.isnan(c["effective_rank_index"].iloc[0])
    np.testing.assert_allclose(c["effective_rank_expected"], [effective_rank_expected(q) for q in (1, 2, 3)])
    assert np.all((c["effective_rank_index"].iloc[1:] >= 0) & (c["effective_rank_index"].iloc[1:] <= 1))
    assert r.best_ecv == int(c["rank"].iloc[int(np.argmin(c["sigma_ecv"]))]) == r.rank_best
    assert str(r).splitlines()[-1].startswith(f"Best rank: {r.rank_best}")
    fig = r.plot()
    assert fig.axes[0].get_xlabel() == "Rank (Q)" and len(fig.axes) == 2  # sigma.ecv on a right axis


def test_rank_r2_knee_reference():
    from dnmf.covariates.rank import r2_knee

    # plain reference: max perpendicular distance from the chord of the normalised curve
    ranks = [1, 2, 3, 4, 5]
    r2 = np.array([0.2, 0.8, 0.9, 0.93, 0.95])
    x = (np.arange(5)) / 4.0
    y = (r2 - r2.min()) / (r2.max() - r2.min())
    d = np.abs(x - y) / np.sqrt(2.0)  # the chord runs from (0, 0) to (1, 1)
    assert r2_knee(ranks, r2) == ranks[int(np.argmax(d))] == 2
    assert r2_knee([1, 2], [0.1, 0.2]) is None


def test_rank_fast_uses_r2_elbow():
    from dnmf.covariates import nmfkc_rank

    rng = np.random.default_rng(6)
    W, H = rng.random((12, 2)), rng.random((2, 30))
    r = nmfkc_rank(W @ H + 0.01 * rng.random((12, 30)), rank=[1, 2, 3, 4], detail="fast")
    assert r.best_ecv is None and np.isnan(r.criteria["sigma_ecv"]).all()
    assert r.rank_best == r.best_r2 == 2


def test_consensus_three_blocks():
    """Upstream test-nmfkc.consensus.R: on a 3-block design, dispersion at rank 3 > 0.95 and PAC
    is smallest at rank 3; statistics checked against plain-NumPy formulas on C̄."""
    from dnmf.covariates import nmfkc_consensus
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(7)
    Y = rng.random((30, 30))
    for b in range(3):
        Y[b * 10:(b + 1) * 10, b * 10:(b + 1) * 10] += 5.0
    res = nmfkc_consensus(Y, rank=[2, 3, 4], nrun=8, keep_consensus=True)
    assert res.dispersion[1] > 0.95
    assert int(np.argmin(res.PAC)) == 1
    for q, disp, pac, coph in zip(res.rank, res.dispersion, res.PAC, res.cophenetic):
        Cb = res.consensus[q]
        N = Cb.shape[0]
        assert disp == pytest.approx(np.sum(4 * (Cb - 0.5) ** 2) / N ** 2, rel=1e-12)
        low = Cb[np.tril_indices(N, -1)]
        assert pac == pytest.approx(np.mean((low > 0.1) & (low < 0.9)), rel=1e-12)
        d = squareform(1 - Cb, checks=False)
        if np.ptp(d) > 0:
            assert coph == pytest.approx(cophenet(linkage(d, "average"), d)[0], rel=1e-12)
    # runs are seeded seed + 1000·i + r: the same call gives the same answer
    again = nmfkc_consensus(Y, rank=[2, 3, 4], nrun=8)
    np.testing.assert_array_equal(again.dispersion, res.dispersion)
    assert "Consensus clustering (8 runs per rank)" in str(res)


# ---------------------------------------------- egk: expected Gaussian kernel under a GMM (spec §9)
def _egk_gmm_reference(X, max_components, seed):
    """The documented choice, written out: full-covariance GaussianMixture, BIC over 1..G."""
    from sklearn.mixture import GaussianMixture

    fits = [GaussianMixture(g, covariance_type="full", random_state=seed).fit(X) for g in range(1, max_components + 1)]
    return min(fits, key=lambda gm: gm.bic(X))


def _egk_draws(P, gm, n, rng):
    """n draws of every column of P (K × N) from its conditional mixture given the observed part
    (plain per-point NumPy: Bayes for the component weights, Gaussian conditioning per component)."""
    from scipy.stats import multivariate_normal

    K, N = P.shape
    out = np.repeat(P.T[:, None, :], n, axis=1)  # (N, n, K)
    for i in range(N):
        m = np.isnan(P[:, i])
        if not m.any():
            continue
        o = ~m
        xo = P[o, i]
        tau, cmeans, ccovs = [], [], []
        for g in range(gm.n_components):
            mu, S = gm.means_[g], gm.covariances_[g]
            if o.any():
                Soo, Smo = S[np.ix_(o, o)], S[np.ix_(m, o)]
                tau.append(gm.weights_[g] * multivariate_normal(mu[o], Soo).pdf(xo))
                cmeans.append(mu[m] + Smo @ np.linalg.solve(Soo, xo - mu[o]))
                ccovs.append(S[np.ix_(m, m)] - Smo @ np.linalg.solve(Soo, Smo.T))
            else:
                tau.append(gm.weights_[g])
                cmeans.append(mu[m])
                ccovs.append(S[np.ix_(m, m)])
        tau = np.array(tau) / np.sum(tau)
        comp = rng.choice(gm.n_components, size=n, p=tau)
        for g in range(gm.n_components):
            sel = comp == g
            draws = rng.multivariate_normal(cmeans[g], ccovs[g], size=sel.sum())
            block = out[i, sel]
            block[:, m] = draws
            out[i, sel] = block
    return out


def test_egk_matches_monte_carlo_over_the_fitted_conditional_mixture():
    from dnmf.covariates import nmfkc_kernel

    rng = np.random.default_rng(11)
    # two well-separated 2-D clusters, so BIC has a clear mixture to find
    U = np.concatenate([rng.multivariate_normal([0, 0], [[1.0, 0.6], [0.6, 1.0]], 40),
                        rng.multivariate_normal([4, 3], [[0.3, -0.1], [-0.1, 0.4]], 40)]).T
    V = rng.normal(2.0, 2.0, (2, 6))
    U[0, 3] = U[1, 45] = U[1, 7] = np.nan   # one coordinate missing
    U[:, 60] = np.nan                       # both missing: the marginal mixture
    V[1, 0] = V[0, 4] = np.nan              # uncertain × uncertain pairs
    beta, G, seed = 0.5, 3, 0
    K_sym = nmfkc_kernel(U, na_method="egk", beta=beta, gmm_max_components=G, seed=seed)
    K_uv = nmfkc_kernel(U, V, na_method="egk", beta=beta, gmm_max_components=G, seed=seed)

    gm_sym = _egk_gmm_reference(U[:, ~np.isnan(U).any(axis=0)].T, G, seed)
    P = np.concatenate([U, V], axis=1)
    gm_uv = _egk_gmm_reference(P[:, ~np.isnan(P).any(axis=0)].T, G, seed)
    assert K_sym.params == {"beta": beta, "na_method": "egk", "gmm_components": gm_sym.n_components}
    assert K_uv.params["gmm_components"] == gm_uv.n_components
    assert gm_sym.n_components >= 2  # the test exercises a real mixture

    n = 40_000
    mc_rng = np.random.default_rng(12)
    for K_egk, gm, A, B, sym in ((K_sym, gm_sym, U, U, True), (K_uv, gm_uv, U, V, False)):
        rows = np.flatnonzero(np.isnan(A).any(axis=0))
        cols = np.arange(B.shape[1])
        da = _egk_draws(A[:, rows], gm, n, mc_rng)
        db = _egk_draws(B, gm, n, mc_rng)  # independent draws for the other point of each pair
        for r, i in enumerate(rows):
            k = np.exp(-beta * ((da[r][None, :, :] - db) ** 2).sum(axis=2))  # (M, n)
            mc, se = k.mean(axis=1), k.std(axis=1) / np.sqrt(n)
            got = np.asarray(K_egk)[i, cols]
            if sym:
                mc[i], se[i] = 1.0, 0.0  # the diagonal is 1 by definition
            # 5 Monte-Carlo standard errors (a false alarm per entry ~6e-7), plus 1e-9 of rounding
            # for entries whose draws are all but constant (far-apart points, kernel ~ 0)
            np.testing.assert_array_less(np.abs(got - mc), 5.0 * se + 1e-9)
    # complete columns keep the plain kernel among themselves
    ok = ~np.isnan(U).any(axis=0)
    np.testing.assert_allclose(np.asarray(K_sym)[np.ix_(ok, ok)], np.asarray(nmfkc_kernel(U[:, ok], beta=beta)),
                               rtol=1e-12, atol=1e-15)  # closed form with Σ = 0: same formula, rounding only


def test_egk_without_missing_values_is_the_plain_kernel():
    from dnmf.covariates import nmfkc_kernel

    rng = np.random.default_rng(13)
    U, V = rng.random((3, 9)), rng.random((3, 5))
    np.testing.assert_array_equal(nmfkc_kernel(U, na_method="egk"), nmfkc_kernel(U))
    np.testing.assert_array_equal(nmfkc_kernel(U, V, na_method="egk", beta=2.0), nmfkc_kernel(U, V, beta=2.0))
    with pytest.raises(InputError, match="gmm_max_components"):
        nmfkc_kernel(U, na_method="egk", gmm_max_components=0)
    with pytest.raises(InputError, match="na_method"):
        nmfkc_kernel(U, na_method="mclust")
    U[:, :8] = np.nan  # a single complete column: no GMM can be fitted
    with pytest.raises(InputError, match="complete columns"):
        nmfkc_kernel(U, na_method="egk")
