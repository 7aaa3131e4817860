"""Degenerate inputs and results: each either works (exact rescaling) or fails with a message
that names the parameter to change (issue 11)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.core import SAFE_MAX_RANGE, _check_factors, data_scale
from dnmf.estimator import NMF
from dnmf.exceptions import ConvergenceWarning, DnmfError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def planted():
    """40 × 30, three planted factors plus 5 % noise; max(A) ≈ 0.018, inside the safe range."""
    return dnmf.simulate_nmf(40, 30, 3, noise=0.05, seed=1)


@pytest.fixture(scope="module")
def base(planted):
    return dnmf.nmf(planted.A, 3, seed=1, maxit=40, tol=0, client=False)


# -- all-zero data and initializations -------------------------------------------------------


@pytest.mark.parametrize("make", [np.zeros, lambda shape: sp.csc_array(shape)], ids=["dense", "sparse"])
def test_all_zero_A_raises(make):
    with pytest.raises(InputError, match=r"The 'A' parameter of nmf must be a matrix with at least one positive "
                                         r"entry\. Got an all-zero 30 × 20 matrix instead\."):
        dnmf.nmf(make((30, 20)), 3, seed=1, client=False)


def test_bad_user_init_names_init(planted):
    m = planted.A.shape[0]
    with pytest.raises(InputError, match=r"'init' parameter of nmf must be a matrix with a non-zero entry in every "
                                         r"column\. Got an all-zero matrix instead"):
        dnmf.nmf(planted.A, 3, init=np.zeros((m, 3)), client=False)
    with pytest.raises(InputError, match=r"'init' parameter of nmf must be non-negative .* 120 negative entries"):
        dnmf.nmf(planted.A, 3, init=-np.ones((m, 3)), client=False)
    dead = np.ones((m, 3))
    dead[:, 1] = 0.0
    # a zero column of W gives a zero row of H and back: a dead factor, so it is rejected too
    with pytest.raises(InputError, match=r"column\(s\) \[1\] are all zero"):
        dnmf.nmf(planted.A, 3, init=dead, client=False)
    # semi-NMF on the W side accepts a signed initialization
    signed = np.random.default_rng(0).normal(size=(m, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a signed start may leave a factor at zero
        model = dnmf.nmf(planted.A, 3, init=signed, nonneg=(False, True), maxit=5, client=False)
    assert np.isfinite(model.w).all()


# -- L1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("l1", [1.0, 1.5, (0.0, 1.0), -0.1])
def test_L1_outside_rcppml_range(planted, l1):
    # RcppML documents L1 in [0, 1) (spec rcppml.md §1.1)
    with pytest.raises(InputError, match=r"The 'L1' parameter of nmf must be a float in \[0\.0, 1\.0\)"):
        dnmf.nmf(planted.A, 3, L1=l1, client=False)


def test_L1_zeroing_every_factor_raises(planted):
    a = planted.A / planted.A.max() * 0.9  # data in [0, 1)
    with pytest.raises(InputError, match=r"All factors were zeroed by L1 = \(0\.99, 0\.99\); lower L1"):
        dnmf.nmf(a, 3, seed=1, L1=0.99, maxit=10, client=False)


def test_L1_zeroing_some_factors_warns():
    """Two disjoint blocks, one 100× weaker: an L1 between their scales removes the weak factor only."""
    a = np.zeros((20, 16))
    a[:10, :8] = 0.9
    a[10:, 8:] = 0.009
    init = np.zeros((20, 2))
    init[:10, 0] = init[10:, 1] = 1.0
    with pytest.warns(UserWarning, match=r"1 of 2 factors are all zero .* lower L1 \(currently \(0\.0, 0\.05\)\)"):
        model = dnmf.nmf(a, 2, init=init, L1=(0.0, 0.05), maxit=10, client=False)
    assert np.count_nonzero(np.all(model.h == 0, axis=1)) == 1


def test_final_check_non_finite_and_all_zero_model():
    w, d, h = np.ones((4, 2)), np.ones(2), np.ones((2, 3))
    bad = w.copy()
    bad[0, 0] = np.nan
    kw = dict(iteration=7, L1=(0.0, 0.0), nonneg=(True, False), norm="none", solver="cholesky", k=2, func="nmf")
    with pytest.raises(DnmfError, match=r"nmf produced NaN or Inf factors \(W, d or H\) after 7 iteration\(s\)\. "
                                        r"Likely cause: nonneg = \(True, False\).*norm = 'none'.*solver='cd'"):
        _check_factors(bad, d, h, **kw)
    with pytest.raises(DnmfError, match=r"all-zero model .* lower k \(currently 2\)"):
        _check_factors(w, d, np.zeros((2, 3)), **kw)
    _check_factors(w, d, h, **kw)  # a healthy model passes silently


# -- extreme magnitudes: exact power-of-two rescaling --------------------------------------------


def test_data_scale_is_a_power_of_two():
    lo, hi = SAFE_MAX_RANGE
    assert data_scale(1.0) == data_scale(lo) == data_scale(hi) == data_scale(0.0) == 1.0
    for x in (1e160, 3e-7, 1e-200, 2.0 ** 400, 1.7e308):
        s = data_scale(x)
        assert math.frexp(s)[0] == 0.5  # a power of two: multiplying by it is exact
        assert 0.5 <= x * s < 1.0
    # subnormal maxima: the largest double power of two, which brings them into normal range
    assert data_scale(1e-310) == 2.0 ** 1023 and 1e-310 * 2.0 ** 1023 > 1e-5


@pytest.mark.parametrize("factor", [1e160, 1e-200, 1e-6])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_extreme_magnitudes_give_the_scaled_model(planted, base, factor, sparse):
    a = planted.A * factor
    model = dnmf.nmf(sp.csc_array(a) if sparse else a, 3, seed=1, maxit=40, tol=0, client=False)
    assert np.isfinite(model.w).all() and np.isfinite(model.d).all() and np.isfinite(model.h).all()
    assert model.misc["scale"] != 1.0
    # The fit of A·factor is the fit of A with d multiplied by factor. A·factor·s differs from A
    # by one rounding per entry (factor is not a power of two); 40 well-conditioned iterations
    # keep that at ~3e-15 (measured), so 1e-12 relative is a safe bound.
    np.testing.assert_allclose(model.d, base.d * factor, rtol=1e-12)
    np.testing.assert_allclose(model.w, base.w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.h, base.h, rtol=1e-12, atol=1e-14)


def test_loss_history_is_in_the_data_units(planted, base):
    model = dnmf.nmf(planted.A * 1e-100, 3, seed=1, maxit=40, tol=0, client=False)
    # the loss scales as factor²; rounding as above
    np.testing.assert_allclose(model.misc["loss_history"], base.misc["loss_history"] * 1e-200, rtol=1e-11)
    # relative changes of a loss computed by the Gram identity (‖A‖² − 2·cross + quad, with the
    # loss ~1e-3·‖A‖² here) carry ~1e-16·‖A‖²/Δloss of cancellation: 1e-6 relative is ample
    np.testing.assert_allclose(model.misc["tol_history"], base.misc["tol_history"], rtol=1e-6)
    # 1e-200² underflows: the loss is reported as the nearest double (0), never NaN
    tiny = dnmf.nmf(planted.A * 1e-200, 3, seed=1, maxit=5, tol=0, client=False)
    assert np.all(tiny.misc["loss_history"] >= 0) and not np.isnan(tiny.misc["loss_history"]).any()


def test_rescaling_keeps_L1_in_data_units(planted):
    # L1 is in the units of the data: fitting A·c with L1·c is fitting A with L1
    l1 = (0.001, 0.002)
    ref = dnmf.nmf(planted.A, 3, seed=1, L1=l1, maxit=30, tol=0, client=False)
    c = 1e-200
    model = dnmf.nmf(planted.A * c, 3, seed=1, L1=(l1[0] * c, l1[1] * c), maxit=30, tol=0, client=False)
    assert model.misc["L1"] == (l1[0] * c, l1[1] * c)
    # coordinate descent (L1 > 0) stops at cd_tol, a relative criterion: same 1e-12 bound as above
    np.testing.assert_allclose(model.d, ref.d * c, rtol=1e-10)
    np.testing.assert_allclose(model.w, ref.w, rtol=1e-10, atol=1e-13)


def test_extreme_magnitudes_on_a_cluster(planted):
    """Blocks wrapped for rescaling travel to workers (two threads-only workers)."""
    distributed = pytest.importorskip("distributed")
    a = planted.A * 1e160
    local = dnmf.nmf(a, 3, seed=1, maxit=20, tol=0, block_nnz=300, client=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        remote = dnmf.nmf(a, 3, seed=1, maxit=20, tol=0, block_nnz=300, client=client)
    assert remote.misc["n_blocks"] > 1 and remote.misc["executor"] == "distributed"
    # the tree reduction is fixed by block order: identical to the in-process fit
    np.testing.assert_array_equal(remote.d, local.d)
    np.testing.assert_array_equal(remote.w, local.w)


# -- predict / transform run the fit's data check ---------------------------------------------


def test_predict_rejects_what_fit_rejects(planted, base):
    a = planted.A.copy()
    a[2, 5] = -1.0
    with pytest.raises(InputError, match=r"'A' parameter of NMFModel\.predict must be non-negative data "
                                         r"\(as in nmf\)\. Got data with 1 negative value\(s\)"):
        base.predict(a)
    with pytest.raises(InputError, match=r"'A' parameter of NMFModel\.predict must be non-negative"):
        base.predict(sp.csc_array(a))
    a[2, 5] = np.nan
    with pytest.raises(InputError, match=r"'A' parameter of NMFModel\.predict must be finite data"):
        base.predict(a)
    with pytest.raises(InputError, match=r"'A' parameter of NMFModel\.predict must be data of shape \(40, n\)"):
        base.predict(planted.A[:10])
    with pytest.raises(InputError, match=r"'L1' parameter of NMFModel\.predict must be a float in \[0\.0, 1\.0\)"):
        base.predict(planted.A, L1=2.0)


def test_estimator_transform_rejects_negative_X(planted):
    X = planted.A.T
    est = NMF(n_components=3, random_state=1, max_iter=5, client=False).fit(X)
    with pytest.raises(InputError, match="Negative values in data passed to NMF.transform"):
        est.transform(X - 1.0)
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full_like(X, np.nan))


# -- errors in the estimator's own names -------------------------------------------------------


@pytest.mark.parametrize(("params", "message"), [
    (dict(max_iter=0), r"The 'max_iter' parameter of NMF\.fit must be an int in \[1, inf\]\. Got 0 instead\."),
    (dict(tol=-1.0), r"The 'tol' parameter of NMF\.fit must be a float in \[0\.0, inf\)"),
    (dict(L1=1.5), r"The 'L1' parameter of NMF\.fit must be a float in \[0\.0, 1\.0\)"),
    (dict(init=np.ones((3, 3))), r"The 'init' parameter of NMF\.fit must be a matrix of shape \(40, 3\)"),
    (dict(init=np.zeros((40, 3))), r"The 'init' parameter of NMF\.fit must be a matrix with a non-zero entry"),
    (dict(solver="lbfgs"), r"The 'solver' parameter of NMF\.fit must be one of"),
])
def test_estimator_errors_use_estimator_names(planted, params, message):
    with pytest.raises(InputError, match=message):
        NMF(n_components=3, client=False, **params).fit(planted.A.T)


def test_estimator_all_zero_X():
    with pytest.raises(InputError, match=r"The 'X' parameter of NMF\.fit must be a matrix with at least one "
                                         r"positive entry\. Got an all-zero 20 × 30 matrix instead\."):
        NMF(n_components=2, client=False).fit(np.zeros((20, 30)))


# -- verbose -------------------------------------------------------------------------------------


def test_verbose_prints_progress_to_stdout_and_restores_logging():
    """In a fresh interpreter without logging configured (like a notebook): lines on stdout."""
    code = textwrap.dedent("""
        import logging, warnings
        import dnmf
        warnings.simplefilter("ignore")
        sim = dnmf.simulate_nmf(40, 30, 3, noise=0.05, seed=1)
        dnmf.nmf(sim.A, 3, seed=1, maxit=3, tol=0, client=False, verbose=True)
        log = logging.getLogger("dnmf")
        print("LEVEL", log.level, "HANDLERS", len(log.handlers))
        dnmf.NMF(n_components=3, random_state=1, max_iter=2, client=False, verbose=True).fit(sim.A.T)
        dnmf.nmf(sim.A, 3, seed=1, maxit=2, tol=0, client=False)
        print("DONE")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("nmf iter    1  loss ")
    assert lines[1].startswith("nmf iter    2  loss ") and "  rel " in lines[1]
    assert lines[3].startswith("nmf: reached maxit after 3 iteration(s)")
    assert lines[4] == "LEVEL 0 HANDLERS 0"  # nothing left behind
    # the estimator's verbose shows the same lines; the silent fit after it prints nothing
    assert lines[5].startswith("nmf iter    1") and lines[7].startswith("nmf: reached maxit after 2")
    assert lines[8] == "DONE"
    assert "iter" not in out.stderr


def test_verbose_uses_configured_handlers(planted, caplog):
    """With logging configured to show INFO, verbose goes there (no second stdout copy)."""
    with caplog.at_level(logging.INFO, logger="dnmf"):
        dnmf.nmf(planted.A, 3, seed=1, maxit=2, tol=0, client=False, verbose=True)
    assert [r.getMessage()[:14] for r in caplog.records if "nmf iter" in r.getMessage()] == ["nmf iter    1 ",
                                                                                              "nmf iter    2 "]
    assert not logging.getLogger("dnmf").handlers


def test_on_iteration_sees_losses_in_data_units(planted, base):
    seen = []
    dnmf.nmf(planted.A * 1e-100, 3, seed=1, maxit=4, tol=0, client=False, on_iteration=seen.append)
    np.testing.assert_allclose([r.train_loss for r in seen], base.misc["loss_history"][:4] * 1e-200, rtol=1e-11)


# -- nmfkc / nmfre ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthodont():
    from dnmf.datasets.orthodont import load_orthodont

    Y, A, _ = load_orthodont()
    return np.asarray(Y, dtype=float), np.asarray(A, dtype=float)


def test_nmfkc_nmfre_all_zero_Y(orthodont):
    _, A = orthodont
    with pytest.raises(InputError, match=r"The 'Y' parameter of nmfkc must be an array with at least one positive "
                                         r"observed cell\. Got an all-zero 4 × 27 array instead\."):
        dnmf.nmfkc(np.zeros((4, 27)), A, rank=1)
    y = np.zeros((4, 27))
    y[0, 0] = np.nan  # the only non-zero cell is missing
    with pytest.raises(InputError, match=r"'Y' parameter of nmfkc must be an array with at least one positive"):
        dnmf.nmfkc(y, A, rank=1)
    with pytest.raises(InputError, match=r"The 'Y' parameter of nmfre must be an array with at least one positive "
                                         r"entry\. Got an all-zero 4 × 27 array instead\."):
        dnmf.nmfre(np.zeros((4, 27)), A, rank=1, df_rate=0.2, wild_bootstrap=False)


def test_nmfre_negative_A_names_nmfre(orthodont):
    Y, A = orthodont
    with pytest.raises(InputError, match=r"The 'A' parameter of nmfre must be non-negative for engine='cap'\. "
                                         r"Got an array with minimum -5\.0 instead\."):
        dnmf.nmfre(Y, A - 5.0, rank=1, df_rate=0.2, wild_bootstrap=False)
    with pytest.raises(InputError, match=r"'A' parameter of nmfre must be non-negative unless X_init and C_init"):
        dnmf.nmfre(Y, A - 5.0, rank=1, engine="ecm", wild_bootstrap=False)
    with pytest.raises(InputError, match=r"'A' parameter of nmfre must be non-negative for engine='ecm' with "
                                         r"C_signed=False"):
        dnmf.nmfre(Y, A - 5.0, rank=1, engine="ecm", C_signed=False, wild_bootstrap=False)


def test_rank_above_min_P_N_warns(orthodont):
    """R accepts rank > min(P, N) (k-means falls back to runif); we fit and warn, naming rank."""
    Y, A = orthodont
    with pytest.warns(UserWarning, match=r"nmfkc: rank = 5 is above min\(P, N\) = 4 .* Lower rank \(currently 5\)"):
        fit = dnmf.nmfkc(Y, A, rank=5, maxit=200)
    assert np.isfinite(fit.X).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dnmf.nmfre(Y, A, rank=5, df_rate=0.2, wild_bootstrap=False, maxit=50)
    rank_msgs = [str(w.message) for w in caught if "rank = 5" in str(w.message)]
    assert len(rank_msgs) == 1 and rank_msgs[0].startswith("nmfre: rank = 5 is above min(P, N) = 4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        dnmf.nmfkc(Y, A, rank=4, maxit=50)  # rank = min(P, N): no warning


def test_float32_tiny_values_stay_float32(planted):
    """Subnormal float32 data: the scale (2**130) is applied in float64, the blocks stay float32."""
    a = (planted.A * 1e-38).astype(np.float32)  # max ≈ 1.8e-40, below float32's smallest normal
    model = dnmf.nmf(a, 3, seed=1, maxit=10, tol=0, client=False)
    assert model.w.dtype == np.float32 and np.isfinite(model.w).all() and np.isfinite(model.d).all()
    ref = dnmf.nmf(planted.A.astype(np.float32), 3, seed=1, maxit=10, tol=0, client=False)
    # subnormal float32 keeps ~16 of 24 bits at the max (1.8e-40 / 1.4e-45) and far fewer for the
    # smaller entries, so the data themselves differ by up to ~1e-2: a rough match only
    np.testing.assert_allclose(model.d, ref.d.astype(np.float64) * 1e-38, rtol=0.1)


@pytest.mark.parametrize("out_of_core", [False, True], ids=["loaded", "streamed"])
def test_extreme_magnitudes_from_a_zarr_store(planted, tmp_path, out_of_core):
    """Lazy blocks are rescaled as they are read (once, or in every iteration when streamed)."""
    a = sp.csc_array(planted.A * 1e160)
    path = dnmf.io.write_zarr(a, str(tmp_path / "big.zarr"), block_nnz=300)
    ref = dnmf.nmf(a, 3, seed=1, maxit=10, tol=0, block_nnz=300, client=False)
    model = dnmf.nmf(path, 3, seed=1, maxit=10, tol=0, out_of_core=out_of_core, client=False)
    assert model.misc["out_of_core"] is out_of_core and model.misc["n_blocks"] > 1
    # same blocks, same arithmetic: equal to rounding of the read path (none here)
    np.testing.assert_allclose(model.d, ref.d, rtol=1e-13)
    np.testing.assert_allclose(model.w, ref.w, rtol=1e-13, atol=1e-16)
