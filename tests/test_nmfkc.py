"""nmfkc, nmfkc_inference, nmfkc_ecv / nmfkc_cv against R's published numbers (spec nmfre.md
§2, §6.2, §9, §11.3) and against plain-NumPy references written here."""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import numpy as np
import pytest

from dnmf import nmfkc, nmfkc_ecv, nmfkc_inference
from dnmf.covariates import nmfkc_cv
from dnmf.covariates._common import basis_order, vec_cm
from dnmf.covariates._kmeans import kmeans_hw, r_kmeans
from dnmf.covariates.inference import basic_bootstrap_p
from dnmf.datasets.orthodont import load_orthodont
from dnmf.exceptions import ConvergenceWarning, InputError
from dnmf.rrng import RRandom

# Deterministic R values are matched to 1e-6 relative (the spec's acceptance tolerance);
# the implementation agrees to ~1e-12, so this leaves room only for BLAS summation order.
R_REL = 1e-6
#: Golden master of nmfkc's default (NumPy) bootstrap stream; it changes only through
#: ``python tests/test_nmfkc.py --regenerate-golden``.
GOLDEN = pathlib.Path(__file__).parent / "golden" / "nmfkc_orthodont.json"


@pytest.fixture(scope="module")
def ortho():
    return load_orthodont()


@pytest.fixture(scope="module")
def fit1(ortho):
    return nmfkc(ortho.Y_frame(), ortho.A_frame(), rank=1)


# ----------------------------------------------------------------------------- data


def test_orthodont_matrices(ortho):
    assert ortho.Y.shape == (4, 27) and ortho.A.shape == (2, 27)
    assert ortho.A[1].sum() == 16  # 16 boys, 11 girls
    assert ortho.Y[:, 0].tolist() == [26.0, 25.0, 29.0, 31.0]  # M01 at ages 8..14
    assert ortho.Y[:, 1].tolist() == [21.5, 22.5, 23.0, 26.5]  # M02
    _, _, long = ortho
    assert long["distance"].shape == (108,)


# --------------------------------------------------------------- R parity (spec §2)


def test_orthodont_rank1_matches_r(fit1, ortho):
    f = fit1
    assert f.n_iter == 76 and f.converged
    np.testing.assert_allclose(
        f.X[:, 0], [0.230755140755678, 0.240915975321876, 0.256568648997442, 0.271760234925003], rtol=R_REL
    )
    np.testing.assert_allclose(f.C[0], [90.1421957894414, 10.0103775071928], rtol=R_REL)
    # values printed by R to 4 significant digits: half a unit of the last digit
    assert f.r_squared == pytest.approx(0.4165, abs=5e-5)
    manual_r2 = 1 - np.sum((ortho.Y - f.XB) ** 2) / np.sum((ortho.Y - ortho.Y.mean()) ** 2)
    assert manual_r2 == pytest.approx(0.4161, abs=5e-5)
    assert f.objfunc == pytest.approx(535.8, abs=0.05)
    assert f.sigma == pytest.approx(2.238, abs=5e-4)
    assert f.mae == pytest.approx(1.766, abs=5e-4)
    assert f.objfunc_iter.shape == (76 - 9,)
    assert f.basis_names == ("Basis1",) and f.covariate_names == ("intercept", "male")
    assert f.feature_names == ("Age 8", "Age 10", "Age 12", "Age 14")
    assert np.isnan(f.criterion["effective_rank"]) and np.isnan(f.criterion["effective_rank_index"])


def _reference_mu(Y, A, X, C, W, maxit, eps, method="EU"):
    """Independent plain transcription of R nmfkc's loop (spec §2), colSums restriction."""
    objs = []
    for i in range(1, maxit + 1):
        B = C @ A
        XB = X @ B
        if method == "EU":
            X = X * (((W * Y) @ B.T) / (((W * XB) @ B.T) + 1e-10))
            X = X / X.sum(axis=0)
            C = C * ((X.T @ (W * Y) @ A.T) / ((X.T @ (W * XB) @ A.T) + 1e-10))
            objs.append(np.sum(W * (Y - XB) ** 2))
        else:
            ratio = W * Y / (XB + 1e-10)
            X = X * ((ratio @ B.T) / ((W @ B.T) + 1e-10))
            X = X / X.sum(axis=0)
            C = C * ((X.T @ ratio @ A.T) / ((X.T @ W @ A.T) + 1e-10))
            objs.append(np.sum(-(W * Y) * np.log(XB + 1e-10) + W * XB))
        if i >= 10 and abs(objs[-1] - objs[-2]) / max(abs(objs[-1]), 1) <= eps:
            break
    return X, C, np.array(objs)


@pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method", ["EU", "KL"])
def test_updates_match_plain_reference(method):
    rng = np.random.default_rng(0)
    P, N, K, Q = 6, 30, 3, 2
    A = rng.random((K, N)) + 0.1
    Y = rng.random((P, Q)) @ rng.random((Q, K)) @ A + 0.05 * rng.random((P, N))
    W = (rng.random((P, N)) > 0.1).astype(float)
    X0 = rng.random((P, Q)) + 0.1
    f = nmfkc(Y, A, rank=Q, X_init=X0, Y_weights=W, method=method, epsilon=1e-6, maxit=400, detail="fast")
    Xr, Cr, objs = _reference_mu(Y * (W > 0), A, X0 / X0.sum(axis=0), np.ones((Q, K)), W, 400, 1e-6, method)
    o = basis_order(Xr)
    # same arithmetic in a different association order: agreement to 1e-10 relative
    np.testing.assert_allclose(f.X, Xr[:, o], rtol=1e-10)
    np.testing.assert_allclose(f.C, Cr[o], rtol=1e-10)
    assert f.n_iter == objs.size
    np.testing.assert_allclose(f.objfunc_iter, objs[9:], rtol=1e-10)


# ---------------------------------------------------------- pinned tests (spec §11.3)


def test_exact_rank2_factorisation_is_recovered():
    X = np.array([[1, 0], [0, 1], [1, 0]], dtype=float)
    B = np.array([[1, 0, 1], [0, 1, 1]], dtype=float)
    Y = X @ B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        f = nmfkc(Y, rank=2, epsilon=1e-12, maxit=50000, detail="fast")
    # R's pinned tolerance for this test
    np.testing.assert_allclose(f.XB, Y, atol=1e-3)


def test_kmeanspp_iris_fit_reproducible_and_alias():
    from sklearn.datasets import load_iris

    Y = load_iris().data.T  # 4 x 150
    a = nmfkc(Y, rank=3, X_init="kmeans++", seed=1, detail="fast")
    b = nmfkc(Y, rank=3, X_init="kmeans++", seed=1, detail="fast")
    c = nmfkc(Y, rank=3, X_init="kmeanspp", seed=1, detail="fast")
    assert a.r_squared > 0.9  # R's pinned bound
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.X, c.X)


def test_smoothing_penalty_zero_equals_default_and_lowers_roughness():
    rng = np.random.default_rng(4)
    P, N = 12, 40
    t = np.linspace(0, 1, P)
    X = np.column_stack([np.exp(-((t - 0.3) ** 2) / 0.02), np.exp(-((t - 0.7) ** 2) / 0.02)])
    Y = X @ rng.random((2, N)) + 0.3 * rng.random((P, N))
    base = nmfkc(Y, rank=2, detail="fast")
    zero = nmfkc(Y, rank=2, X_L2_smooth=0.0, detail="fast")
    smooth = nmfkc(Y, rank=2, X_L2_smooth=5.0, detail="fast")
    np.testing.assert_array_equal(base.X, zero.X)

    def rough(M):
        return float(np.sum(np.diff(M, axis=0) ** 2))

    assert rough(smooth.X) < rough(base.X)
    # R's pinned monotonicity check of the recorded objective (diffs <= 1e-6)
    assert np.all(np.diff(smooth.objfunc_iter) <= 1e-6)


def test_weighted_path_with_unit_weights_is_bit_identical(ortho):
    a = nmfkc(ortho.Y, ortho.A, rank=1)
    b = nmfkc(ortho.Y, ortho.A, rank=1, Y_weights=np.ones(ortho.Y.shape))
    c = nmfkc(ortho.Y, ortho.A, rank=1, Y_weights=np.ones(27))
    for other in (b, c):
        np.testing.assert_array_equal(a.X, other.X)
        np.testing.assert_array_equal(a.C, other.C)


def test_minimal_detail_drops_XB_and_fitted_recomputes(ortho, fit1):
    m = nmfkc(ortho.Y, ortho.A, rank=1, detail="minimal")
    assert m.XB is None
    np.testing.assert_allclose(m.fitted(), fit1.XB, rtol=1e-14)
    np.testing.assert_allclose(m.predict(ortho.A), fit1.XB, rtol=1e-14)


def test_effective_rank_index_in_unit_interval():
    rng = np.random.default_rng(2)
    Y = rng.random((5, 3)) @ rng.random((3, 60))
    f = nmfkc(Y, rank=3, detail="fast", seed=3)
    r = f.criterion["effective_rank_index"]
    assert 0.0 <= r <= 1.0
    assert 1.0 <= f.criterion["effective_rank"] <= 3.0


def test_maxit_reached_warns_and_flags(ortho):
    with pytest.warns(ConvergenceWarning, match="maxit"):
        f = nmfkc(ortho.Y, ortho.A, rank=1, maxit=3)
    assert f.n_iter == 3 and not f.converged
    assert f.objfunc_iter.shape == (3,)


def test_nan_cells_equal_zero_weights(ortho):
    Y = ortho.Y.copy()
    Y[1, 3] = np.nan
    Y[2, 10] = np.nan
    W = np.ones(Y.shape)
    W[1, 3] = W[2, 10] = 0
    a = nmfkc(Y, ortho.A, rank=1)
    b = nmfkc(np.nan_to_num(Y, nan=99.0), ortho.A, rank=1, Y_weights=W)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.C, b.C)
    assert a.n_missing == 2


def test_basis_order_and_constraints():
    rng = np.random.default_rng(11)
    Y = rng.random((8, 3)) @ rng.random((3, 50))
    f = nmfkc(Y, rank=3, seed=5, detail="full")
    assert np.all(f.X >= 0) and np.all(f.C >= 0)
    np.testing.assert_allclose(f.X.sum(axis=0), 1.0, rtol=1e-12)
    score = (np.arange(1, 9) / 8) @ f.X
    assert np.all(np.diff(score) >= 0)
    np.testing.assert_allclose(f.X @ f.B, f.XB, rtol=1e-12)
    assert np.isfinite(f.criterion["CPCC"]) and np.isfinite(f.criterion["silhouette"])


def test_no_global_rng_side_effect(ortho):
    before = np.random.get_state()[1].copy()
    nmfkc(ortho.Y, rank=2, seed=9, detail="fast")
    nmfkc(ortho.Y, rank=2, seed=9, detail="fast", X_init="runif")
    assert np.array_equal(before, np.random.get_state()[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"Y": -np.ones((3, 4))}, "non-negative"),
        ({"A": np.ones((2, 5))}, "4 columns"),
        ({"rank": 0}, "'rank'"),
        ({"A": np.array([[1.0, np.nan, 1.0, 1.0]])}, "NaN"),
        ({"A": -np.ones((1, 4))}, "non-negative"),
        ({"method": "L2"}, "'method'"),
        ({"X_init": "svd"}, "'X_init'"),
        ({"X_init": np.ones((2, 2))}, "'X_init'"),
        ({"Y_weights": np.ones(5)}, "'Y_weights'"),
    ],
)
def test_input_errors(kwargs, match):
    args = {"Y": np.ones((3, 4)) + np.arange(4), "A": None, "rank": 2}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        nmfkc(args.pop("Y"), args.pop("A"), **args)


# ---------------------------------------------------------------- k-means (Q >= 2)


def test_hartigan_wong_is_a_local_optimum_and_matches_sklearn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(5, 1, (35, 3)), rng.normal(-5, 1, (25, 3))])
    c, cl, wss, ifault = kmeans_hw(x, x[[0, 1, 2]], 50)
    assert ifault == 0
    # Hartigan-Wong optimum: no single point moves lowers the within-cluster SS
    n = np.bincount(cl, minlength=3)
    for i in range(x.shape[0]):
        l1 = cl[i]
        if n[l1] == 1:
            continue
        d = ((x[i] - c) ** 2).sum(axis=1)
        gain_out = n[l1] / (n[l1] - 1) * d[l1]
        for l2 in range(3):
            if l2 != l1:
                assert n[l2] / (n[l2] + 1) * d[l2] >= gain_out - 1e-9
    km = KMeans(3, n_init=10, random_state=0).fit(x)
    # separated clusters: both reach the global optimum (same SS to rounding)
    assert wss.sum() == pytest.approx(km.inertia_, rel=1e-10)
    np.testing.assert_allclose(np.sort(c, axis=0), np.sort(km.cluster_centers_, axis=0), rtol=1e-10)


def test_r_kmeans_start_uses_r_sample_int():
    rng = np.random.default_rng(1)
    x = rng.random((20, 2))
    # nstart = 1: the starting centres are rows sample.int(20, 3) of R's stream
    idx = RRandom(42).sample_int(20, 3)
    c_direct, _, _, _ = kmeans_hw(x, x[idx], 10)
    c = r_kmeans(x, 3, RRandom(42), iter_max=10)
    np.testing.assert_array_equal(c, c_direct)


@pytest.mark.parametrize("init", ["kmeans", "kmeansar", "kmeans++", "runif", "nndsvd"])
@pytest.mark.parametrize("r_rng", [False, True])
def test_init_paths_run_and_are_reproducible(ortho, init, r_rng):
    a = nmfkc(ortho.Y, ortho.A, rank=2, X_init=init, r_rng=r_rng, nstart=2, seed=7, detail="fast")
    b = nmfkc(ortho.Y, ortho.A, rank=2, X_init=init, r_rng=r_rng, nstart=2, seed=7, detail="fast")
    np.testing.assert_array_equal(a.X, b.X)
    assert a.X.shape == (4, 2) and np.all(np.isfinite(a.C)) and np.all(a.C >= 0)
    # any start reaches the Orthodont rank-2 optimum region: objective within 2% of rank 1's
    assert a.objfunc <= 535.8404 * 1.02


def test_nmfkc_r_rng_rank2_runs_and_is_reproducible(ortho):
    a = nmfkc(ortho.Y, ortho.A, rank=2, r_rng=True, detail="fast")
    b = nmfkc(ortho.Y, ortho.A, rank=2, r_rng=True, detail="fast")
    np.testing.assert_array_equal(a.X, b.X)
    assert a.X.shape == (4, 2) and a.C.shape == (2, 2)


# ------------------------------------------------------------ inference (spec §6.2)


def test_inference_matches_r_with_r_stream(fit1, ortho):
    inf = nmfkc_inference(fit1, ortho.Y, ortho.A, r_rng=True, client=False)
    assert inf.sigma2_used == pytest.approx(5.055098, rel=R_REL)
    np.testing.assert_allclose(inf.C_se.ravel(), [2.474170, 3.059137], rtol=R_REL)
    # (RNG) bootstrap SD and percentile CI reproduce R's set.seed(123) stream
    np.testing.assert_allclose(inf.C_se_boot.ravel(), [2.460953, 2.984582], rtol=R_REL)
    # CI printed by R with 4 decimals: half a unit of the last digit
    np.testing.assert_allclose(inf.C_ci_lower.ravel(), [85.2565, 4.1434], rtol=0, atol=5e-5)
    np.testing.assert_allclose(inf.C_ci_upper.ravel(), [95.6995, 15.7773], rtol=0, atol=5e-5)
    tab = inf.coefficients
    np.testing.assert_allclose(tab["p_value"], [6.321e-291, 5.334e-04], rtol=1e-3)  # printed 4 digits
    # pinned: SE column = sandwich SE, BSE column = bootstrap SD (to 1e-12)
    np.testing.assert_allclose(tab["SE"], vec_cm(inf.C_se), rtol=1e-12)
    np.testing.assert_allclose(tab["BSE"], vec_cm(inf.C_se_boot), rtol=1e-12)
    assert tab["Covariate"].tolist() == ["intercept", "male"]
    assert "Convergence: 76 / 5000 (converged)" in inf.summary()


def test_sandwich_matches_explicit_loop(fit1, ortho):
    """SE from a loop over columns with explicit Kronecker algebra."""
    Y, A, X, C = ortho.Y, ortho.A, fit1.X, fit1.C
    P, N = Y.shape
    Q, K = C.shape
    R = Y - X @ C @ A
    s2 = np.sum(R**2) / (P * N - Q * K)
    H = np.zeros((Q * K, Q * K))
    J = np.zeros((Q * K, Q * K))
    for n in range(N):
        a, r = A[:, n], R[:, n]
        H += np.kron(np.outer(a, a), X.T @ X) / s2
        s = -np.kron(a, X.T @ r) / s2  # vec(X' r a') column-major = a ⊗ X'r
        J += np.outer(s, s)
    H += 1e-8 * np.eye(Q * K)
    Hi = np.linalg.inv(H)
    se = np.sqrt(np.diag(Hi @ (J * N / (N - 1)) @ Hi))
    inf = nmfkc_inference(fit1, Y, A, wild_bootstrap=False)
    np.testing.assert_allclose(vec_cm(inf.C_se), se, rtol=1e-10)


def test_inference_default_stream_within_monte_carlo_error(fit1, ortho):
    inf = nmfkc_inference(fit1, ortho.Y, ortho.A, client=False)
    # BSE of B=500 replicates has relative MC error ~ (2B)^-1/2 = 3.2%; allow 4 of them
    np.testing.assert_allclose(inf.C_se_boot.ravel(), [2.460953, 2.984582], rtol=0.13)
    np.testing.assert_allclose(inf.C_se.ravel(), [2.474170, 3.059137], rtol=R_REL)


def test_bootstrap_seeding_is_the_shared_scheme(fit1, ortho):
    """Default-stream one-step draws rebuilt in plain NumPy from the one scheme nmfkc and NMF-RE share:
    chunks of BOOT_CHUNK replicates, chunk c seeded by the key (0, c) under SeedSequence(seed)."""
    from dnmf.covariates import _theta_inference as T

    B, seed = 250, 7  # 3 chunks (100, 100, 50)
    inf = nmfkc_inference(fit1, ortho.Y, ortho.A, wild_B=B, seed=seed, client=False)
    Y, A, X, C = ortho.Y, ortho.A, fit1.X, fit1.C
    P, N = Y.shape
    Q, K = C.shape
    R = Y - X @ C @ A
    s2 = np.sum(R**2) / (P * N - Q * K)
    S = -np.stack([np.kron(A[:, n], X.T @ R[:, n]) for n in range(N)], axis=1) / s2
    H = np.kron(A @ A.T, X.T @ X) / s2 + 1e-8 * np.eye(Q * K)
    W = np.concatenate([
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, c))).standard_exponential((N, n)) - 1.0
        for c, n in enumerate((100, 100, 50))], axis=1)
    want = np.maximum(vec_cm(C)[:, None] - np.linalg.solve(H, S @ W), 0.0)
    assert T.BOOT_CHUNK == 100
    # 1e-9: the same draws through differently ordered products of a 2 × 2 system
    np.testing.assert_allclose(inf.C_boot_draws, want, rtol=1e-9)


def _golden_values(fit1, ortho) -> dict:
    inf = nmfkc_inference(fit1, ortho.Y, ortho.A, seed=123, client=False)
    return {f"onestep_{col}": [float(v) for v in inf.coefficients[col]] for col in ("BSE", "CI_low", "CI_high")}


def test_golden_default_stream(fit1, ortho):
    """nmfkc's default (NumPy) bootstrap stream is pinned: it changes only by regeneration."""
    got = _golden_values(fit1, ortho)
    want = json.loads(GOLDEN.read_text())
    assert set(got) == set(want)
    for key, val in want.items():
        # 1e-10: the same draws through the same products; only BLAS order may differ
        assert np.allclose(got[key], val, rtol=1e-10, atol=0), key


def test_bootstrap_same_on_local_cluster_as_threads(fit1, ortho):
    from distributed import Client, LocalCluster

    local = nmfkc_inference(fit1, ortho.Y, ortho.A, wild_B=300, client=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            dist = nmfkc_inference(fit1, ortho.Y, ortho.A, wild_B=300, client=client)
            ecv = nmfkc_ecv(ortho.Y, ortho.A, rank=[1, 2], client=client)
    np.testing.assert_array_equal(local.C_boot_draws, dist.C_boot_draws)
    ecv_local = nmfkc_ecv(ortho.Y, ortho.A, rank=[1, 2], client=False)
    np.testing.assert_array_equal(ecv.objfunc_fold, ecv_local.objfunc_fold)


def test_refit_bootstrap():
    # a design with one real and one null covariate effect
    rng = np.random.default_rng(8)
    P, N = 5, 60
    A = np.vstack([np.ones(N), rng.random(N)])
    x = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
    Y = np.outer(x, 50.0 * A[0]) + rng.normal(0, 1.0, (P, N))
    Y = np.maximum(Y, 0)
    fit = nmfkc(Y, A, rank=1, epsilon=1e-8, maxit=100000)
    inf = nmfkc_inference(fit, Y, A, method="refit", wild_B=60, client=False)
    tab = inf.coefficients
    assert inf.wild_dist == "rademacher" and inf.boot_method == "refit"
    # the real effect is significant, the null one is not (pinned: not all p are 0)
    assert tab["p_value"][0] < 0.05 and tab["p_value"][1] > 0.05
    np.testing.assert_allclose(tab["z_value"], tab["Estimate"] / tab["BSE"], rtol=1e-12)
    np.testing.assert_allclose(tab["SE"], tab["BSE"], rtol=1e-12)
    assert np.all(tab["CI_low"] <= tab["Estimate"] + 1e-8) and np.all(tab["Estimate"] <= tab["CI_high"] + 1e-8)
    assert tab["on_boundary"].tolist() == (tab["Estimate"] <= 1e-3).tolist()
    # refit SD of the real effect is of the order of its sandwich SE (same model, same data)
    se = nmfkc_inference(fit, Y, A, wild_bootstrap=False).C_se[0, 0]
    assert 0.5 < inf.C_se_boot[0, 0] / se < 2.0


def test_basic_bootstrap_p_direction():
    rng = np.random.default_rng(0)
    p1, _ = basic_bootstrap_p(rng.normal(1.0, 0.1, (1, 2000)), np.array([1.0]))
    p0, _ = basic_bootstrap_p(np.abs(rng.normal(0.0, 0.1, (1, 2000))), np.array([0.0]))
    assert p1[0] < 0.05 and p0[0] > 0.5  # R's pinned expectations


def test_inference_input_errors(fit1, ortho):
    with pytest.raises(InputError, match="'A'"):
        nmfkc_inference(fit1, ortho.Y, ortho.A[:1])
    with pytest.raises(InputError, match="'wild_B'"):
        nmfkc_inference(fit1, ortho.Y, ortho.A, wild_B=1)
    with pytest.raises(InputError, match="'result'"):
        nmfkc_inference("fit", ortho.Y, ortho.A)


# ---------------------------------------------------------------- CV (spec §9)


def test_ecv_and_cv_match_r(ortho):
    e = nmfkc_ecv(ortho.Y, ortho.A, rank=1, r_rng=True, client=False)
    assert e.objfunc[0] == pytest.approx(5.502758, rel=R_REL)
    assert e.sigma[0] == pytest.approx(2.345796, rel=R_REL)
    # folds partition the 108 cells into 22,22,22,21,21
    sizes = [f.size for f in e.folds]
    assert sizes == [22, 22, 22, 21, 21]
    assert np.array_equal(np.sort(np.concatenate(e.folds)), np.arange(108))
    c = nmfkc_cv(ortho.Y, ortho.A, rank=1, r_rng=True, client=False)
    assert c.sigma == pytest.approx(2.472406, rel=R_REL)
    assert sorted(np.bincount(c.block)[1:].tolist()) == [5, 5, 5, 6, 6]


def test_ecv_heldout_score_equals_direct_refit(ortho):
    e = nmfkc_ecv(ortho.Y, ortho.A, rank=1, nfolds=3, seed=5, client=False)
    test = e.folds[1]
    W = np.ones(108)
    W[test] = 0
    f = nmfkc(ortho.Y, ortho.A, rank=1, Y_weights=W.reshape(4, 27, order="F"), seed=5)
    y = ortho.Y.reshape(-1, order="F")[test]
    pred = f.XB.reshape(-1, order="F")[test]
    assert e.objfunc_fold[0, 1] == pytest.approx(np.mean((y - pred) ** 2), rel=1e-12)


if __name__ == "__main__" and "--regenerate-golden" in sys.argv:
    data = load_orthodont()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(_golden_values(nmfkc(data.Y_frame(), data.A_frame(), rank=1), data), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
