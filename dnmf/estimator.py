"""The scikit-learn dialect: :class:`NMF`, a thin estimator over :func:`dnmf.nmf`.

scikit-learn's convention is samples × features (X, n_samples × n_features); dnmf's core
factorizes features × samples, so ``fit`` hands ``X.T`` (a free view; a CSR X becomes a CSC
Xᵀ without a copy) to :func:`dnmf.nmf`. With the fitted ``A ≈ W·diag(d)·H``:

* ``components_ = Wᵀ`` (k × n_features, rows with unit norm in ``norm``),
* ``fit_transform(X) = (diag(d)·H)ᵀ`` (n_samples × k), so ``fit_transform(X) @ components_``
  is the model's reconstruction of X,
* ``transform(X_new)`` projects new samples onto W by exact NNLS (:meth:`NMFModel.predict`).

Guided NMF the scikit-learn way: with a non-zero ``target_lambda``, ``fit(X, y)`` takes the
samples' classes ``y``, fits a baseline, builds the class target ``compute_target(baseline.h, y)``
(:func:`dnmf.compute_target`, whitened) and refits from the same start with ``target_H`` and
``target_lambda`` (RcppML's guided NMF vignette).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from ._validation import param_error
from .exceptions import InputError
from .models import NMFModel
from .params import NMF_PARAMS, estimator_init, estimator_kwargs, estimator_names

_TARGET_LAMBDA = next(p for p in NMF_PARAMS if p.name == "target_lambda")

__all__ = ["NMF"]

_ACCEPT_SPARSE = ("csr", "csc")
_DTYPES = [np.float64, np.float32]


def _validate(estimator, X, *, reset: bool):
    """scikit-learn's input validation (sets / checks ``n_features_in_``, ``feature_names_in_``)."""
    try:
        from sklearn.utils.validation import validate_data
    except ImportError:  # scikit-learn < 1.6
        return estimator._validate_data(X, reset=reset, accept_sparse=_ACCEPT_SPARSE, dtype=_DTYPES)
    return validate_data(estimator, X, reset=reset, accept_sparse=_ACCEPT_SPARSE, dtype=_DTYPES)


def _check_non_negative(X, func: str, *, need_positive: bool = False) -> None:
    """Reject negative entries, in scikit-learn's wording ("Negative values in data ...").

    With ``need_positive`` also reject an X without a positive entry (nothing to factorize).
    """
    values = X.data if sp.issparse(X) else X
    if values.size and values.min() < 0:
        raise InputError(f"Negative values in data passed to {func}: X must be non-negative. "
                         f"Got a minimum of {values.min()!r} instead.")
    if need_positive and not (values.size and values.max() > 0):
        raise param_error("X", func, "a matrix with at least one positive entry",
                          f"an all-zero {X.shape[0]} × {X.shape[1]} matrix", described=True)


#: Names of :func:`dnmf.nmf`'s parameters in the estimator's dialect (the others are shared).
_NMF_NAMES = {"A": "X", **estimator_names(NMF_PARAMS)}


def _frobenius_error(A, model) -> float:
    """``‖A − W diag(d) H‖_F`` by the Gram identity (A dense or sparse, never densified)."""
    wd = model.w.astype(np.float64) * model.d.astype(np.float64)[None, :]
    h = model.h.astype(np.float64)
    aht = np.asarray(A @ h.T)
    sq_a = float(A.multiply(A).sum()) if hasattr(A, "multiply") else float(np.sum(np.square(A)))
    val = sq_a - 2.0 * float(np.sum(wd * aht)) + float(np.sum((wd.T @ wd) * (h @ h.T)))
    return float(np.sqrt(max(val, 0.0)))


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative matrix factorization ``X ≈ Z · components_`` (scikit-learn interface).

    Fits ``Xᵀ ≈ W·diag(d)·H`` with :func:`dnmf.nmf` (RcppML 1.0 semantics: alternating NNLS with
    diagonal scaling) and exposes it the way :class:`sklearn.decomposition.NMF` does.

    The parameters are :func:`dnmf.nmf`'s (declared once in :data:`dnmf.params.NMF_PARAMS`),
    with scikit-learn's names where it has one: ``n_components`` (k), ``max_iter`` (maxit),
    ``random_state`` (seed).

    Parameters
    ----------
    n_components : int or None, default None
        Rank k; None uses ``min(n_samples, n_features)``.
    tol : float, default 1e-4
        Relative change of the training loss that, held for ``patience`` iterations, stops the fit.
    max_iter : int, default 100
        Maximum alternating iterations (``maxit`` of :func:`dnmf.nmf`).
    random_state : int, RandomState, Generator or None, default None
        Seed of the initialization; an int is passed to :func:`dnmf.nmf` as ``seed``.
    L1, L2 : float or (float, float), default (0.0, 0.0)
        Lasso / ridge penalties as (W side, H side); W is ``components_ᵀ``, H the sample side.
        L1 is in [0, 1).
    L21, angular, upper_bound, graph_lambda : float or (float, float), default (0.0, 0.0)
        RcppML's §8 penalties as (W side, H side): group sparsity, angular decorrelation, a box
        bound (0: none) and the graph strength (the graphs themselves are :func:`dnmf.nmf`'s
        ``graph_W`` / ``graph_H``); see :func:`dnmf.nmf`.
    nonneg : bool or (bool, bool), default (True, True)
        Non-negativity of (W, H).
    norm : {"L1", "L2", "none"}, default "L1"
        Norm of W's columns (rows of ``components_``) and H's rows; the scale goes to ``d``.
    init : None, "random", "svd", "lanczos", "irlba", "randomized" or array, default None
        Initial W (n_features × k); see :func:`dnmf.nmf`.
    solver : {"auto", "cholesky", "cd", "exact"}, default "auto"
        NNLS solver of the fit.
    patience : int, default 5
        Consecutive iterations below ``tol`` needed to stop.
    loss : {"mse", "kl", "gp", "nb", "gamma", "inverse_gaussian", "tweedie"}, default "mse"
        The loss fitted (see :func:`dnmf.nmf`); the distribution losses are fitted by IRLS.
    robust, dispersion, theta_init, theta_max, theta_min, nb_size_init, nb_size_max, nb_size_min
        IRLS controls, as :func:`dnmf.nmf` (Huber weights; per-feature / per-sample / global
        dispersion of the distribution; GP θ and NB size start, cap, floor).
    gamma_phi_init, gamma_phi_max, gamma_phi_min, tweedie_power, irls_max_iter, irls_tol, zi, zi_em_iters
        As :func:`dnmf.nmf` (φ start, cap, floor; Tweedie power; inner iterations and tolerance;
        zero-inflation, ``"none"`` only).
    client : distributed.Client, False or None, default None
        Where to run: None uses the active Dask client if any, else threads; False forces threads.
        Cloning the estimator shares the client (it is not copied).
    block_nnz : int or None, default None
        Stored entries per column block (blocks are groups of samples).
    dtype : {None, "float32", "float64"}, default None
        Precision of X's stored values and of the products with the factors (as
        :func:`dnmf.nmf`; None follows X: float32 for float32 input, as scikit-learn).
    target_lambda : float, default 0.0
        Guided NMF: strength of the class target of the samples, built from ``y`` in ``fit``
        (H side; :func:`dnmf.nmf`'s ``target_lambda``). 0 fits without labels (``y`` is
        ignored); > 0 pulls the samples' factors toward their class centroids, < 0 removes
        the classes' structure (RcppML's PROJ_ADV). Values of 0.05–0.15 already act strongly.
    verbose : bool, default False
        Show one line per iteration of the fit on ``sys.stdout`` (see :func:`dnmf.nmf`).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        ``Wᵀ``, the factors in feature space (rows unit-norm in ``norm``).
    n_components_ : int
        The rank used.
    reconstruction_err_ : float
        Frobenius norm ``‖X − fit_transform(X) @ components_‖_F`` of the fitted model (from the
        fit's final sum of squared errors; computed from the factors when the fit's loss is
        another one), as in scikit-learn.
    n_iter_ : int
        Iterations run.
    model_ : NMFModel
        The fitted RcppML-style model (``w`` = ``components_ᵀ``, ``d``, ``h``, ``misc``); with a
        non-zero ``target_lambda``, the guided model.
    baseline_model_ : NMFModel or None
        With a non-zero ``target_lambda``: the unguided fit the target was built from (same
        start as ``model_``); None otherwise.
    target_ : ndarray of shape (n_components, n_samples) or None
        With a non-zero ``target_lambda``: ``dnmf.compute_target(baseline_model_.h, y)``, the
        target of the guided fit; None otherwise.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when X has string column names.

    Examples
    --------
    >>> import numpy as np
    >>> import dnmf
    >>> X = dnmf.simulate_nmf(100, 60, 3, noise=0.1, seed=1).A.T   # 60 samples × 100 features
    >>> est = dnmf.NMF(n_components=3, random_state=1, client=False)
    >>> Z = est.fit_transform(X)
    >>> Z.shape, est.components_.shape
    ((60, 3), (3, 100))

    Guided by class labels (one per sample):

    >>> y = np.repeat(["a", "b", "c"], 20)
    >>> guided = dnmf.NMF(n_components=3, target_lambda=0.1, random_state=1, client=False).fit(X, y)
    >>> guided.target_.shape
    (3, 60)
    """

    #: ``__init__(self, n_components=None, *, tol=1e-4, max_iter=100, ...)``, built from
    #: :data:`dnmf.params.NMF_PARAMS`: it stores every parameter unchanged (``fit`` validates).
    __init__ = estimator_init(NMF_PARAMS)

    # -- scikit-learn protocol ---------------------------------------------------------------

    def __sklearn_clone__(self):
        """Clone every parameter except ``client``, which is a handle to shared resources."""
        params = self.get_params(deep=False)
        client = params.pop("client")
        return type(self)(**{k: clone(v, safe=False) for k, v in params.items()}, client=client)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"requires_positive_X": True, "preserves_dtype": [np.float64, np.float32]}

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    # -- helpers -----------------------------------------------------------------------------

    def _seed(self):
        rs = self.random_state
        if rs is None:
            return None
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool):
            if rs < 0:
                raise param_error("random_state", "NMF.fit", "None, a non-negative int, a RandomState or a Generator",
                                  rs)
            return int(rs)
        if isinstance(rs, np.random.RandomState):
            return int(rs.randint(np.iinfo(np.int32).max))
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(np.iinfo(np.int32).max))
        raise param_error("random_state", "NMF.fit", "None, a non-negative int, a RandomState or a Generator", rs)

    def _rank(self, n_samples: int, n_features: int) -> int:
        limit = min(n_samples, n_features)
        k = self.n_components
        if k is None:
            return limit
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= limit:
            raise param_error("n_components", "NMF.fit", f"None or an int in [1, {limit}] (min(n_samples, n_features))",
                              k)
        return int(k)

    def _target_lambda(self, func: str) -> float:
        """The H side's λ of ``target_lambda`` (a W-side λ has no target here: y labels samples)."""
        lam_w, lam_h = _TARGET_LAMBDA.check(self.target_lambda, func)
        if lam_w != 0.0:
            raise param_error("target_lambda", func, "a finite float (the samples' λ; y gives targets for samples "
                              "only, so a (λ_W, λ_H) pair needs λ_W = 0)", self.target_lambda)
        return lam_h

    @staticmethod
    def _labels(y, n_samples: int, func: str):
        """``y`` as the samples' classes (length n_samples), else the error naming 'y'."""
        if y is None:
            raise param_error("y", func, f"the class of each of the {n_samples} samples when target_lambda is "
                              "non-zero (guided NMF)", None)
        shape = np.shape(y)
        if len(shape) != 1 or shape[0] != n_samples:
            raise param_error("y", func, f"a 1-d array of {n_samples} class labels (one per sample)",
                              f"an array of shape {shape}", described=True)
        return y

    @staticmethod
    def _nmf(A, k: int, kwargs: dict, func: str) -> NMFModel:
        """:func:`dnmf.nmf`, with its parameter errors re-issued in the estimator's names."""
        from .core import nmf

        try:
            return nmf(A, k, **kwargs)
        except InputError as e:
            # re-issue a parameter error of nmf with the estimator's names ('max_iter', not 'maxit')
            name = getattr(e, "parameter", None)
            if name is None:
                raise
            raise param_error(_NMF_NAMES.get(name, name), func, e.expected, e.got,
                              described=getattr(e, "described", False)) from e

    # -- fitting -----------------------------------------------------------------------------

    def fit(self, X, y=None) -> "NMF":
        """Learn the factorization of X (guided by the classes ``y`` when ``target_lambda`` ≠ 0).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Non-negative data.
        y : array-like of shape (n_samples,) or None, default None
            Class of each sample (missing values: unlabelled), required when ``target_lambda``
            is non-zero; ignored otherwise.

        Returns
        -------
        self
        """
        self.fit_transform(X, y)
        return self

    def fit_transform(self, X, y=None) -> np.ndarray:
        """Learn the factorization of X and return the sample factors.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Non-negative data.
        y : array-like of shape (n_samples,) or None, default None
            Class of each sample, required when ``target_lambda`` is non-zero; ignored otherwise.

        Returns
        -------
        ndarray of shape (n_samples, n_components)
            ``(diag(d)·H)ᵀ``: ``fit_transform(X) @ components_`` reconstructs X.

        Notes
        -----
        With ``target_lambda = λ ≠ 0`` this is ``baseline = nmf(Xᵀ, k, seed=s, ...)``, ``T =
        compute_target(baseline.h, y)`` and ``nmf(Xᵀ, k, seed=s, ..., target_H=T,
        target_lambda=λ)``, both fits from the same start s (the drawn entropy when
        ``random_state`` is None).
        """
        from .guided import compute_target

        func = "NMF.fit"
        X = _validate(self, X, reset=True)
        _check_non_negative(X, func, need_positive=True)
        k = self._rank(*X.shape)
        lam = self._target_lambda(func)
        if lam != 0.0:
            y = self._labels(y, X.shape[0], func)
        kwargs = {**estimator_kwargs(NMF_PARAMS, self), "seed": self._seed(), "target_lambda": 0.0}
        model = self._nmf(X.T, k, kwargs, func)
        baseline = target = None
        if lam != 0.0:
            baseline = model
            target = compute_target(baseline.h, y)
            seed = kwargs["seed"] if kwargs["seed"] is not None else np.random.SeedSequence(
                baseline.misc["seed_entropy"])
            model = self._nmf(X.T, k, {**kwargs, "seed": seed, "target_H": target, "target_lambda": lam}, func)
        self.model_: NMFModel = model
        self.baseline_model_: NMFModel | None = baseline
        self.target_: np.ndarray | None = target
        self.components_ = np.ascontiguousarray(model.w.T)
        self.n_components_ = model.k
        self.n_iter_ = int(model.misc["iter"])
        if model.misc["loss_type"] == "mse" and kwargs.get("robust", False) is False:
            self.reconstruction_err_ = float(np.sqrt(max(float(model.misc["loss"]), 0.0)))
        else:  # the fit's loss is another one: the Frobenius norm from the factors
            self.reconstruction_err_ = _frobenius_error(X.T, model)
        return np.ascontiguousarray((model.h * model.d[:, None]).T)

    def transform(self, X) -> np.ndarray:
        """Project samples onto the learned components (exact NNLS with W fixed).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_components)
            Z minimizing ``‖X − Z·components_‖_F`` per sample (with the fit's H-side L1/L2 and
            non-negativity); on the training data it agrees with ``fit_transform`` up to the
            fit's own NNLS accuracy.
        """
        check_is_fitted(self)
        X = _validate(self, X, reset=False)
        _check_non_negative(X, "NMF.transform")
        return np.ascontiguousarray(self.model_.predict(X.T).T)

    def inverse_transform(self, X) -> np.ndarray:
        """Map sample factors back to feature space: ``X @ components_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        from sklearn.utils import check_array

        check_is_fitted(self)
        X = check_array(X, accept_sparse=_ACCEPT_SPARSE, dtype=_DTYPES)
        if X.shape[1] != self.n_components_:
            raise param_error("X", "NMF.inverse_transform", f"an array with {self.n_components_} columns",
                              f"{X.shape[1]} columns")
        return np.asarray(X @ self.components_)
