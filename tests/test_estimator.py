"""The scikit-learn estimator dnmf.NMF against scikit-learn's own NMF and scipy's NNLS."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls as scipy_nnls
from sklearn.base import clone
from sklearn.decomposition import NMF as SkNMF
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

import dnmf
from dnmf.estimator import NMF
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def X():
    """120 samples × 50 features: rank 4 plus clipped noise (sklearn orientation)."""
    rng = np.random.default_rng(0)
    clean = rng.uniform(size=(120, 4)) @ rng.uniform(size=(4, 50))
    return np.maximum(clean + 0.1 * rng.normal(size=clean.shape), 0.0)


@pytest.fixture(scope="module")
def fitted(X):
    est = NMF(n_components=4, random_state=1, tol=1e-6, max_iter=300, client=False)
    Z = est.fit_transform(X)
    return est, Z


def test_params_clone_set_params():
    est = NMF(n_components=3, tol=1e-5, L1=(0.1, 0.0), client=False)
    params = est.get_params()
    assert params["n_components"] == 3 and params["tol"] == 1e-5 and params["L1"] == (0.1, 0.0)
    assert {"n_components", "tol", "max_iter", "random_state", "L1", "L2", "nonneg", "norm", "init", "solver",
            "patience", "target_lambda", "client", "block_nnz", "verbose"} <= set(params)
    from dnmf.params import NMF_PARAMS

    assert set(params) == {p.estimator_name for p in NMF_PARAMS if p.estimator}  # the table's, no more
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert twin.set_params(n_components=5, max_iter=7) is twin
    assert twin.n_components == 5 and twin.max_iter == 7 and est.n_components == 3
    handle = object()  # stands for a distributed.Client: cloning shares it instead of deep-copying
    assert clone(NMF(client=handle)).client is handle
    assert "n_components=3" in repr(est)


def test_fit_attributes_and_reconstruction(X, fitted):
    est, Z = fitted
    model = est.model_
    assert isinstance(model, dnmf.NMFModel)
    assert Z.shape == (120, 4) and est.components_.shape == (4, 50)
    assert est.n_components_ == 4 and est.n_features_in_ == 50 and est.n_iter_ == model.misc["iter"]
    np.testing.assert_array_equal(est.components_, model.w.T)
    # Z @ components_ is the model's own reconstruction (W diag(d) H)ᵀ; one product vs another
    # association of the same factors: 1e-12 relative
    np.testing.assert_allclose(Z @ est.components_, model.reconstruct().T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(est.inverse_transform(Z), Z @ est.components_, rtol=1e-14)
    # reconstruction_err_ comes from the fit's Gram-identity SSE; direct Frobenius norm agrees to
    # ~1e-12 relative (cancellation in ‖A‖² − 2tr + tr of a ~1 % residual costs ~4 digits of 1e-16)
    direct = np.linalg.norm(X - Z @ est.components_)
    assert est.reconstruction_err_ == pytest.approx(direct, rel=1e-9)
    assert np.all(Z >= 0) and np.all(est.components_ >= 0)
    np.testing.assert_allclose(est.components_.sum(axis=1), 1.0, rtol=1e-12)  # norm="L1" rows


def test_transform_is_exact_nnls(X, fitted):
    est, Z = fitted
    rng = np.random.default_rng(5)
    X_new = rng.uniform(size=(7, 50))
    Z_new = est.transform(X_new)
    assert Z_new.shape == (7, 4)
    for i in range(7):
        ref, _ = scipy_nnls(est.components_.T, X_new[i])
        np.testing.assert_allclose(Z_new[i], ref, atol=1e-10)  # exact NNLS vs exact NNLS, k = 4
    # on the training data the projection is optimal per sample for fixed W, so it can only
    # improve on the fit's H (up to rounding)
    err_t = np.linalg.norm(X - est.transform(X) @ est.components_)
    assert err_t <= est.reconstruction_err_ * (1 + 1e-9)
    assert err_t == pytest.approx(est.reconstruction_err_, rel=1e-2)  # the fit's H is nearly optimal


def test_sparse_and_float32_inputs(X):
    dense = NMF(n_components=4, random_state=3, max_iter=50, client=False)
    sparse = NMF(n_components=4, random_state=3, max_iter=50, client=False)
    Zd = dense.fit_transform(X)
    Zs = sparse.fit_transform(sp.csr_array(X))
    # same algorithm and seed, CSC kernel vs dense kernel: only summation order differs;
    # 50 iterations amplify that to well below 1e-8
    np.testing.assert_allclose(Zs, Zd, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sparse.components_, dense.components_, rtol=1e-8, atol=1e-12)
    est32 = NMF(n_components=4, random_state=3, max_iter=20, client=False)
    Z32 = est32.fit_transform(X.astype(np.float32))
    assert Z32.dtype == np.float32 and est32.components_.dtype == np.float32
    assert est32.transform(X[:3].astype(np.float32)).dtype == np.float32


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # sklearn creeps on to max_iter
def test_reconstruction_error_comparable_to_sklearn(X):
    sk = SkNMF(n_components=4, init="nndsvda", tol=1e-6, max_iter=2000, random_state=0).fit(X)
    ours = NMF(n_components=4, random_state=0, tol=1e-6, max_iter=500, client=False).fit(X)
    direct = np.linalg.norm(X - ours.transform(X) @ ours.components_)
    # Both minimize the same Frobenius objective from different starts (local optima): dnmf
    # must be within 5 % of scikit-learn's converged coordinate-descent solution.
    assert ours.reconstruction_err_ <= 1.05 * sk.reconstruction_err_
    assert direct <= 1.05 * sk.reconstruction_err_


def test_pipeline_and_grid_search():
    sim = dnmf.simulate_nmf(60, 90, k=3, noise=0.5, seed=2)
    X = sim.A.T  # 90 samples × 60 features
    y = np.argmax(sim.h, axis=0)  # each sample's planted factor
    pipe = make_pipeline(NMF(n_components=3, random_state=0, client=False), LogisticRegression(max_iter=500))
    pipe.fit(X, y)
    # 3 well separated planted groups: the NMF embedding makes them linearly separable
    assert pipe.score(X, y) > 0.9
    grid = GridSearchCV(pipe, {"nmf__n_components": [2, 3]}, cv=3).fit(X, y)
    assert grid.best_params_["nmf__n_components"] == 3
    est = NMF(n_components=3, random_state=0, client=False).set_output(transform="pandas")
    frame = est.fit(X).transform(X)
    assert list(frame.columns) == ["nmf0", "nmf1", "nmf2"]
    assert list(est.get_feature_names_out()) == ["nmf0", "nmf1", "nmf2"]


def test_validation(X, fitted):
    est, _ = fitted
    with pytest.raises(InputError, match="'n_components' parameter of NMF.fit"):
        NMF(n_components=60, client=False).fit(X)
    with pytest.raises(InputError, match="'random_state' parameter of NMF.fit"):
        NMF(n_components=2, random_state=-1, client=False).fit(X)
    with pytest.raises(InputError, match="non-negative"):
        NMF(n_components=2, client=False).fit(X - 1.0)
    with pytest.raises(ValueError, match="NaN"):
        NMF(n_components=2, client=False).fit(np.full((5, 4), np.nan))
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :10])
    with pytest.raises(InputError, match="'X' parameter of NMF.inverse_transform"):
        est.inverse_transform(np.ones((2, 3)))
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NMF(n_components=2).transform(X)
    # a RandomState is accepted and turned into a seed
    NMF(n_components=2, random_state=np.random.RandomState(0), max_iter=5, client=False).fit(X)
    # n_components=None: full rank min(n_samples, n_features)
    assert NMF(max_iter=3, client=False).fit(X[:, :6]).n_components_ == 6


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning", "ignore::UserWarning")
def test_sklearn_check_estimator():
    """scikit-learn's own API conformance suite.

    n_components=2 because the suite's transformer checks compare fit_transform with transform
    at atol=1e-2; at full rank (the None default on its 3-feature data) the factorization is not
    unique and the fit's H, computed before the last W update, may differ from the projection.
    """
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(NMF(n_components=2, client=False), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed


# -- guided NMF: fit(X, y) with a non-zero target_lambda ------------------------------------------


@pytest.fixture(scope="module")
def birds():
    data = dnmf.datasets.load_hawaiibirds()
    return data.X, data.obs["island"].to_numpy()


def test_guided_fit_is_the_library_call(birds):
    """fit(X, y) = baseline nmf → compute_target(baseline.h, y) → nmf(target_H=T), bitwise."""
    A, y = birds
    X = A.T.tocsr()  # samples × features: the estimator hands X.T (CSC, no copy) to nmf
    est = NMF(n_components=8, target_lambda=0.1, random_state=42, client=False)
    Z = est.fit_transform(X, y)
    base = dnmf.nmf(A, 8, seed=42, client=False)
    T = dnmf.compute_target(base.h, y)
    ref = dnmf.nmf(A, 8, seed=42, client=False, target_H=T, target_lambda=0.1)
    # the same calls in the same order: equal to the last bit
    np.testing.assert_array_equal(est.baseline_model_.h, base.h)
    np.testing.assert_array_equal(est.target_, T)
    np.testing.assert_array_equal(est.components_, ref.w.T)
    np.testing.assert_array_equal(Z, (ref.h * ref.d[:, None]).T)
    assert est.n_iter_ == ref.misc["iter"]
    # and the guidance works: NMI of the islands rises (vignette: 0.49 → 0.85 at this λ; the
    # bar of 0.25 is issue 10's)
    kw = {"metrics": ["nmi"]}
    assert (dnmf.assess(est.model_, y, **kw).metrics["nmi"]
            - dnmf.assess(est.baseline_model_, y, **kw).metrics["nmi"]) >= 0.25


def test_guided_fit_without_random_state_reuses_the_baseline_start(birds):
    """random_state=None: both fits start from the one drawn entropy (misc['seed_entropy'])."""
    A, y = birds
    est = NMF(n_components=4, target_lambda=-0.1, max_iter=20, client=False).fit(A.T.tocsr(), y)
    seq = est.baseline_model_.misc["seed_entropy"]
    base = dnmf.nmf(A, 4, seed=np.random.SeedSequence(seq), maxit=20, client=False)
    np.testing.assert_array_equal(est.baseline_model_.w, base.w)  # the entropy reproduces the baseline
    T = dnmf.compute_target(base.h, y)
    ref = dnmf.nmf(A, 4, seed=np.random.SeedSequence(seq), maxit=20, client=False, target_H=T,
                   target_lambda=-0.1)
    np.testing.assert_array_equal(est.components_, ref.w.T)


def test_unguided_fit_ignores_y(X, fitted):
    est, Z = fitted
    other = NMF(n_components=4, random_state=1, tol=1e-6, max_iter=300, client=False)
    np.testing.assert_array_equal(other.fit_transform(X, np.arange(X.shape[0])), Z)
    assert other.baseline_model_ is None and other.target_ is None


def test_guided_errors_name_the_parameter(X):
    y = np.repeat([0, 1, 2], 40)
    with pytest.raises(InputError, match=r"^The 'y' parameter of NMF\.fit must be the class of each of the 120 "
                                         r"samples when target_lambda is non-zero .*Got None instead\."):
        NMF(n_components=3, target_lambda=0.1, client=False).fit(X)
    with pytest.raises(InputError, match=r"^The 'y' parameter of NMF\.fit must be a 1-d array of 120 class labels.*"
                                         r"Got an array of shape \(7,\) instead\."):
        NMF(n_components=3, target_lambda=0.1, client=False).fit(X, y[:7])
    with pytest.raises(InputError, match=r"^The 'target_lambda' parameter of NMF\.fit must be a finite float"):
        NMF(n_components=3, target_lambda=(0.1, 0.1), client=False).fit(X, y)
    with pytest.raises(InputError, match=r"^The 'target_lambda' parameter of NMF\.fit"):
        NMF(n_components=3, target_lambda="strong", client=False).fit(X, y)
    # set_params / clone keep the guided setting
    est = clone(NMF(n_components=3, target_lambda=0.1, client=False).set_params(target_lambda=-0.2))
    assert est.get_params()["target_lambda"] == -0.2
