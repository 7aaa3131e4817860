"""Each parameter of :func:`dnmf.nmf` declared once (CONVENTIONS §9).

:data:`NMF_PARAMS` is the table: name, constraint, default, one doc line, the name in the
scikit-learn dialect and whether the YAML ``model:`` section has it. Everything else is derived
from it, so the copies cannot drift:

* :func:`dnmf.nmf` validates its arguments with :func:`validate` (one message template, "The
  'tol' parameter of nmf must be a float in [0.0, inf). Got -1 instead."); a test checks that
  its signature is :func:`signature` of the table;
* :class:`dnmf.NMF`'s ``__init__`` is :func:`estimator_init` of the table (sklearn names such as
  ``max_iter`` and ``random_state``), and it forwards every parameter with
  :func:`estimator_kwargs`;
* the factorize pipeline's ``model:`` section is :func:`config_section` of the table (a frozen
  dataclass whose field metadata :mod:`dnmf.config` reads: ``dnmf validate --explain`` shows
  the same doc lines), and it calls ``nmf`` with :func:`config_kwargs`.

Adding an option to ``nmf`` is adding one :class:`Param` here, the argument to ``nmf``'s
signature (a test fails until it is there) and its use in the engine.

:data:`NMFRE_PARAMS` is the same table for :func:`dnmf.nmfre`: its signature is
:func:`signature` of the table (``first=("Y",)``), its simple range and option checks are the
table's, and the nmfre pipeline's ``model:`` section is :func:`config_section` of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from ._validation import check_bool_pair, check_float, check_int, check_option, check_pair, param_error

__all__ = [
    "Param",
    "Interval",
    "Pair",
    "BoolPair",
    "Options",
    "Flag",
    "Check",
    "NMF_PARAMS",
    "NMFRE_PARAMS",
    "INITS",
    "SOLVER_NAMES",
    "REQUIRED",
    "validate",
    "signature",
    "estimator_signature",
    "estimator_init",
    "estimator_kwargs",
    "estimator_names",
    "config_section",
    "config_kwargs",
]


class _Required:
    """The default of a parameter that has none (``k``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of a required parameter.
REQUIRED = _Required()
#: "Same as the parameter's own" for the per-dialect overrides of :class:`Param`.
_SAME = object()

#: Named initializations of W (a user matrix is accepted too).
INITS = ("random", "svd", "lanczos", "irlba", "randomized")
#: NNLS solvers (``"auto"`` picks one of them; see :func:`dnmf.core.nmf`).
SOLVER_NAMES = ("cd", "cholesky", "exact")


# ---------------------------------------------------------------------------------------------
# Constraints: a check (the library's message template) and the YAML schema of the same rule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An int or a finite float in an interval (``None`` bound: unbounded).

    ``optional`` also accepts None (YAML ``null``).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def check(self, value, name: str, func: str):
        if value is None and self.optional:
            return None
        if self.kind is int:
            return check_int(value, name, func, low=self.low, high=self.high)
        return check_float(value, name, func, low=self.low, high=self.high, low_open=self.low_open,
                           high_open=self.high_open)

    def annotation(self):
        return self.kind | None if self.optional else self.kind

    def meta(self) -> dict:
        out = {}
        if self.low is not None:
            out.update(min=self.low, min_open=self.low_open)
        if self.high is not None:
            out.update(max=self.high, max_open=self.high_open)
        return out


@dataclass(frozen=True)
class Pair:
    """A (W side, H side) pair of floats in [low, high) or [low, high]; a scalar is recycled."""

    low: float = 0.0
    high: float | None = None
    high_open: bool = False

    def check(self, value, name: str, func: str):
        return check_pair(value, name, func, low=self.low, high=self.high, high_open=self.high_open)

    def annotation(self):
        return tuple[float, float]

    def meta(self) -> dict:
        out = {"pair": True, "min": self.low}
        if self.high is not None:
            out.update(max=self.high, max_open=self.high_open)
        return out


@dataclass(frozen=True)
class BoolPair:
    """A (W side, H side) pair of bools; a scalar is recycled."""

    def check(self, value, name: str, func: str):
        return check_bool_pair(value, name, func)

    def annotation(self):
        return tuple[bool, bool]

    def meta(self) -> dict:
        return {"pair": True}


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings (the error lists them)."""

    options: tuple[str, ...]

    def check(self, value, name: str, func: str):
        return check_option(value, name, func, self.options)

    def annotation(self):
        return Literal[self.options]

    def meta(self) -> dict:
        return {}


@dataclass(frozen=True)
class Flag:
    """A bool (numpy bools too); ``integers`` also accepts an int (``verbose=1``)."""

    integers: bool = False

    def check(self, value, name: str, func: str):
        allowed = (bool, np.bool_, numbers.Integral) if self.integers else (bool, np.bool_)
        if not isinstance(value, allowed):
            raise param_error(name, func, "a bool", value)
        return value

    def annotation(self):
        return bool

    def meta(self) -> dict:
        return {}


@dataclass(frozen=True)
class Check:
    """A rule written as a function ``check(value, name, func) -> value`` (raising InputError).

    ``yaml`` is the annotation of the YAML field (with ``yaml_meta``) when the parameter is in
    the config section; ``check=None`` means the function checks it itself, where the data is
    known (the rank ``k``, a user initial W).
    """

    check_fn: Callable | None = None
    yaml: Any = None
    yaml_meta: Mapping = field(default_factory=dict)

    def check(self, value, name: str, func: str):
        return value if self.check_fn is None else self.check_fn(value, name, func)

    def annotation(self):
        return self.yaml

    def meta(self) -> dict:
        return dict(self.yaml_meta)


def _check_seed(value, name: str, func: str):
    if value is None or isinstance(value, np.random.SeedSequence):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, (list, tuple, range, np.ndarray)) and len(value) > 0 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        seeds = tuple(int(v) for v in value)
        if len(set(seeds)) != len(seeds):
            raise param_error(name, func, "distinct seeds (one start each)", list(seeds))
        return seeds[0] if len(seeds) == 1 else seeds
    raise param_error(name, func, "None, a non-negative int, a list of them (multi-start) or a numpy SeedSequence",
                      value)


def _check_mask(value, name: str, func: str):
    """None, "zeros", "NA", a matrix (checked against A's shape by nmf), or a list of those."""
    if value is None:
        return None
    if isinstance(value, str):
        return check_option(value, name, func, ("zeros", "NA"))
    if isinstance(value, (list, tuple)):
        if not value or len(value) > 2 or sum(not isinstance(v, str) for v in value) > 1:
            raise param_error(name, func, 'None, "zeros", "NA", a boolean matrix, or a list of "zeros"/"NA" '
                              "and at most one matrix", value)
        return tuple(_check_mask(v, name, func) for v in value)
    if not (hasattr(value, "shape") and len(getattr(value, "shape", ())) == 2):
        raise param_error(name, func, 'None, "zeros", "NA" or a 2-d boolean matrix (True = missing)', value)
    return value


def _check_cv_seed(value, name: str, func: str):
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 0:
            raise param_error(name, func, "None, a non-negative int or a list of them", value)
        return int(value)
    if isinstance(value, (list, tuple, range, np.ndarray)) and len(value) > 0:
        return tuple(_check_cv_seed(int(v) if isinstance(v, numbers.Integral) else v, name, func) for v in value)
    raise param_error(name, func, "None, a non-negative int or a non-empty list of them", value)


def _check_target(value, name: str, func: str):
    if value is None:
        return None
    if not hasattr(value, "shape") or len(value.shape) != 2:
        raise param_error(name, func, "None or a 2-d matrix", value)
    return value  # its shape is checked against k and A by nmf


def _check_target_lambda(value, name: str, func: str):
    """A real λ (→ (0, λ): the H side, as RcppML) or a (λ_W, λ_H) pair of reals."""
    vals = value if isinstance(value, (tuple, list, np.ndarray)) else (0.0, value)
    if len(vals) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)
                                 for v in vals):
        raise param_error(name, func, "a finite real λ or a (λ_W, λ_H) pair of them", value)
    return (float(vals[0]), float(vals[1]))


def _check_graph(value, name: str, func: str):
    if value is not None and (not hasattr(value, "shape") or len(value.shape) != 2):
        raise param_error(name, func, "None or a square 2-d matrix (a graph Laplacian), sparse or dense", value)
    return value  # its shape and values are checked against A by nmf (solvers/penalties.py)


def _check_robust(value, name: str, func: str):
    from ._losses import robust_delta

    robust_delta(value, func)  # False, True, "mae" or a positive number (raises naming 'robust')
    return value


def _check_tweedie_power(value, name: str, func: str):
    p = check_float(value, name, func)
    if 0.0 < p < 1.0:
        raise param_error(name, func, "a Tweedie power p <= 0 or p >= 1", value)
    return p


def _check_init(value, name: str, func: str):
    if isinstance(value, str):
        return check_option(value, name, func, INITS)
    if isinstance(value, list):
        if not value or any(isinstance(v, str) or not hasattr(v, "shape") for v in value):
            raise param_error(name, func, "a non-empty list of matrices (multi-start)", value)
        return value[0] if len(value) == 1 else tuple(value)
    return value  # None, or a matrix checked against A's shape by nmf


def _check_callback(value, name: str, func: str):
    if value is not None and not callable(value):
        raise param_error(name, func, "a callable or None", value)
    return value


def _check_path(value, name: str, func: str):
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise param_error(name, func, "None or a path (str or os.PathLike)", value)
    return value


def _check_out_of_core(value, name: str, func: str):
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise param_error(name, func, "None or a bool", value)
    return value


def _check_dtype(value, name: str, func: str):
    """None, "float32" or "float64" (numpy's float32 / float64 types and dtypes as well)."""
    if value is None:
        return None
    dt = None
    if isinstance(value, (str, np.dtype)) or (isinstance(value, type) and issubclass(value, np.generic)):
        try:
            dt = np.dtype(value)
        except TypeError:  # an unknown name
            pass
    if dt is None or dt.name not in ("float32", "float64"):  # (a dtype equals None: float64)
        raise param_error(name, func, 'None, "float32" or "float64"', value)
    return dt.name


# ---------------------------------------------------------------------------------------------
# The declaration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a public function, as every dialect sees it.

    Attributes
    ----------
    name : str
        The name in :func:`dnmf.nmf` (RcppML dialect) and in the YAML ``model:`` section.
    constraint : Interval, Pair, BoolPair, Options, Flag or Check
        What values are valid (and the YAML type of the same rule).
    default : object
        Default value; :data:`REQUIRED` for none.
    doc : str
        One line, shown by ``dnmf validate --explain``.
    alias : str or None
        The name in the scikit-learn dialect (:class:`dnmf.NMF`) when it differs.
    estimator : bool
        Whether :class:`dnmf.NMF` has the parameter.
    estimator_default : object
        The estimator's default when it differs (``n_components=None``).
    config : bool
        Whether the YAML ``model:`` section has the parameter.
    config_default : object
        The YAML default when it differs (``init: random`` for nmf's None).
    from_config : callable or None
        Maps the YAML value to nmf's argument (``out_of_core: auto`` → None).
    positional : bool
        Positional-or-keyword in the function's signature although it has a default (nmfre's
        R-ordered arguments); otherwise keyword-only.
    """

    name: str
    constraint: Any
    default: Any = REQUIRED
    doc: str = ""
    alias: str | None = None
    estimator: bool = True
    estimator_default: Any = _SAME
    config: bool = True
    config_default: Any = _SAME
    from_config: Callable | None = None
    positional: bool = False

    @property
    def estimator_name(self) -> str:
        return self.alias or self.name

    def check(self, value, func: str):
        """``value`` normalized (pairs become tuples), or the InputError of the template."""
        return self.constraint.check(value, self.name, func)


#: The parameters of :func:`dnmf.nmf` after ``A``, in signature order.
NMF_PARAMS: tuple[Param, ...] = (
    Param("k", Check(None, int, {"min": 1}), doc="rank", alias="n_components", estimator_default=None),
    Param("tol", Interval(float, low=0.0), 1e-4, "relative loss change that stops the fit"),
    Param("maxit", Interval(int, low=1), 100, "maximum iterations", alias="max_iter"),
    Param("seed", Check(_check_seed, int | None, {"min": 0}), None,
          "seed of the initialization (null: fresh entropy, recorded in the run); a list: multi-start",
          alias="random_state"),
    Param("r_rng", Flag(), False, "draw the random W as R's set.seed(seed); runif(m * k), as RcppML",
          estimator=False),
    # RcppML documents L1 in [0, 1): it is subtracted from the RHS of the normalized problem
    Param("L1", Pair(0.0, 1.0, high_open=True), (0.0, 0.0), "lasso penalty (W side, H side)"),
    Param("L2", Pair(0.0), (0.0, 0.0), "ridge penalty (W side, H side)"),
    Param("L21", Pair(0.0), (0.0, 0.0), "group-sparsity (factor-norm) penalty, L21/‖F_r‖ on the Gram (W, H)"),
    Param("angular", Pair(0.0), (0.0, 0.0), "angular decorrelation of the factors after each solve (W, H)"),
    Param("upper_bound", Pair(0.0), (0.0, 0.0), "box constraint: solved values clamped to ≤ bound; 0 = none (W, H)"),
    Param("graph_W", Check(_check_graph), None, "feature graph Laplacian (m × m) for graph_lambda's W side",
          estimator=False, config=False),
    Param("graph_H", Check(_check_graph), None, "sample graph Laplacian (n × n) for graph_lambda's H side",
          estimator=False, config=False),
    Param("graph_lambda", Pair(0.0), (0.0, 0.0), "graph regularization strength, λ·F L Fᵀ on the Gram (W, H)"),
    Param("nonneg", BoolPair(), (True, True), "non-negativity of (W, H)"),
    Param("norm", Options(("L1", "L2", "none")), "L1", "norm of W's columns and H's rows"),
    Param("sort_model", Flag(), True, "sort factors by decreasing d", estimator=False),
    Param("init", Check(_check_init, Literal[INITS]), None, "initial W", config_default="random"),
    Param("solver", Options(("auto", *SOLVER_NAMES)), "auto", "NNLS solver"),
    Param("cd_maxit", Interval(int, low=1), 100, "coordinate-descent sweeps per NNLS solve", estimator=False,
          config=False),
    Param("cd_tol", Interval(float, low=0.0), 1e-8, "coordinate-descent tolerance", estimator=False,
          config=False),
    Param("patience", Interval(int, low=1), 5, "iterations below tol needed to stop (with a test set: "
          "iterations without a new best test loss)"),
    Param("loss", Options(("mse", "kl", "gp", "nb", "gamma", "inverse_gaussian", "tweedie")), "mse",
          "loss fitted: mse (squared error), kl (generalized KL / Poisson, multiplicative updates), or by IRLS "
          "gp (generalized Poisson), nb (negative binomial), gamma, inverse_gaussian, tweedie"),
    Param("robust", Check(_check_robust, bool | Literal["mae"] | float, {"min": 0.0, "min_open": True}), False,
          "Huber weights on Pearson residuals: false, true (δ = 1.345), \"mae\" (δ = 1e-4) or δ > 0 (IRLS)"),
    Param("dispersion", Options(("per_row", "per_col", "global", "none")), "per_row",
          "dispersion estimated for gp / nb / gamma / inverse_gaussian / tweedie (θ, r or φ)"),
    Param("theta_init", Interval(float, low=0.0), 0.1, "GP θ to start from"),
    Param("theta_max", Interval(float, low=0.0), 5.0, "GP θ cap"),
    Param("theta_min", Interval(float, low=0.0), 0.0, "GP θ floor"),
    Param("nb_size_init", Interval(float, low=0.0, low_open=True), 10.0, "NB size r to start from"),
    Param("nb_size_max", Interval(float, low=0.0, low_open=True), 1e6, "NB size r cap (dispersion none: r = cap)"),
    Param("nb_size_min", Interval(float, low=0.0, low_open=True), 0.01, "NB size r floor"),
    Param("gamma_phi_init", Interval(float, low=0.0, low_open=True), 1.0,
          "φ of gamma / inverse_gaussian / tweedie to start from (reported; the fit does not depend on it)"),
    Param("gamma_phi_max", Interval(float, low=0.0, low_open=True), 1e4, "φ cap"),
    Param("gamma_phi_min", Interval(float, low=0.0, low_open=True), 1e-6, "φ floor"),
    Param("tweedie_power", Check(_check_tweedie_power, float), 1.5, "Tweedie variance power p (p <= 0 or p >= 1)"),
    Param("irls_max_iter", Interval(int, low=1), 5, "IRLS inner iterations per column / row"),
    Param("irls_tol", Interval(float, low=0.0), 1e-4, "IRLS inner tolerance (max relative change)"),
    Param("zi", Options(("none", "row", "col")), "none", "zero-inflation: π per row or column (gp / nb only)"),
    Param("zi_em_iters", Interval(int, low=1), 1, "EM iterations of the zero-inflation per outer iteration"),
    Param("projective", Flag(), False, "projective NMF: H = diag(d)·WᵀA, only W is solved", estimator=False,
          config=False),
    Param("symmetric", Flag(), False, "symmetric NMF of a square symmetric A: A ≈ W diag(d) Wᵀ", estimator=False,
          config=False),
    Param("target_H", Check(_check_target), None, "target of H (k × n): pulled toward (λ > 0) or removed (λ < 0)",
          estimator=False, config=False),
    Param("target_W", Check(_check_target), None, "target of W (m × k), as target_H for W's rows", estimator=False,
          config=False),
    # the estimator's target_lambda (H side) guides the fit by the labels y (NMF.fit(X, y))
    Param("target_lambda", Check(_check_target_lambda), (0.0, 0.0),
          "strength of the targets, (λ_W, λ_H); a scalar is the H side's", estimator_default=0.0, config=False),
    Param("mask", Check(_check_mask, Literal["zeros"] | None), None,
          'missing entries: "zeros" (zeros are missing) or a boolean matrix (True = missing); NaN is always '
          "missing", estimator=False, config=False),
    Param("test_fraction", Interval(float, low=0.0, high=1.0, high_open=True), 0.0,
          "fraction of entries held out as a speckled test set (RcppML's hash; realised 1/floor(1/f))",
          estimator=False, config=False),
    Param("cv_seed", Check(_check_cv_seed, int | None, {"min": 0}), None,
          "seed(s) of the held-out set (null: the fit's seed); a list gives one replicate each in rank CV",
          estimator=False, config=False),
    Param("mask_zeros", Flag(), False, 'hold out (and treat as missing) stored entries only: mask="zeros"',
          estimator=False, config=False),
    Param("on_iteration", Check(_check_callback), None, "called with each iteration's record", estimator=False,
          config=False),
    Param("client", Check(), None, "Dask client (None: the active one, else threads; False: threads)",
          config=False),
    Param("block_nnz", Interval(int, low=1, optional=True), None,
          "target stored entries per column block (null: the library's default, about nnz / 8 "
          "within [1 M, 8 M])"),
    Param("out_of_core", Check(_check_out_of_core, Literal["auto"] | bool), None,
          "stream blocks from disk every iteration (auto: when the matrix does not fit the workers)",
          estimator=False, config_default="auto", from_config=lambda v: None if v == "auto" else v),
    Param("dtype", Check(_check_dtype, Literal["float32", "float64"] | None), None,
          "precision of A's stored values and of the products with W (null: float32 for float32 input, "
          "else float64); sums, Grams and solves are float64 either way"),
    Param("checkpoint", Check(_check_path), None, "Zarr group of the checkpoints", estimator=False, config=False),
    Param("checkpoint_every", Interval(int, low=1), 10, "iterations between checkpoints", estimator=False,
          config=False),
    Param("resume", Flag(integers=True), False, "continue from the checkpoint", estimator=False, config=False),
    Param("verbose", Flag(integers=True), False, "one line per iteration on stdout", config=False),
)


def _check_df_rate(value, name: str, func: str):
    return None if value is None else check_float(value, name, func, low=0.0, low_open=True)


def _nmfre(name, constraint=None, default=None, doc="", *, config=False, positional=True, **kw) -> Param:
    """A parameter of :func:`dnmf.nmfre` (no estimator; ``Check()``: nmfre checks it itself)."""
    return Param(name, Check() if constraint is None else constraint, default, doc, estimator=False,
                 config=config, positional=positional, **kw)


#: Engines of :func:`dnmf.nmfre` (:data:`dnmf.mixed.nmfre.ENGINES`; a test checks they agree).
NMFRE_ENGINES = ("cap", "ecm")

#: The parameters of :func:`dnmf.nmfre` after ``Y``, in signature order (R's order up to
#: ``client``, positional-or-keyword; the rest keyword-only). ``config=True``: the nmfre
#: pipeline's ``model:`` section, whose defaults are the vignette's (rank 1, the dfU scan's
#: rate, the df-cap engine's 50000 iterations).
NMFRE_PARAMS: tuple[Param, ...] = (
    _nmfre("A", doc="covariates (K × N); default an intercept row"),
    _nmfre("rank", Interval(int, low=1), 2, "number of basis vectors Q", config=True, config_default=1),
    _nmfre("df_rate", Check(_check_df_rate, Literal["scan"] | float, {"min": 0.0, "min_open": True}), None,
           "df cap rate of the random effects ('scan': the dfU scan's choice)", config=True,
           config_default="scan"),
    _nmfre("engine", Options(NMFRE_ENGINES), "cap", "df-cap engine or the ECM engine of current upstream"),
    _nmfre("wild_bootstrap", default=True, doc="run the inference inline (engine cap)"),
    _nmfre("wild_B", Interval(int, low=2), 500, "bootstrap replicates"),
    _nmfre("wild_level", Interval(float, low=0.0, high=1.0, low_open=True), 0.95, "percentile interval level"),
    _nmfre("prefix", Check(None, str), "Basis", "basis label prefix", config=True),
    _nmfre("epsilon", Interval(float, low=0.0), 1e-5, "relative objective change that stops the fit",
           config=True),
    # None: 50000 for engine cap, 5000 for ecm (checked by nmfre after the engine's default)
    _nmfre("maxit", Check(None, int, {"min": 1}), None, "maximum iterations", config=True, config_default=50000),
    _nmfre("X_init", doc="starting basis (or an ECM initialization method)"),
    _nmfre("C_init", doc="starting Θ"),
    _nmfre("U_init", doc="starting random effects"),
    _nmfre("seed", Check(None, int, {"min": 0}), 1, "seed of the nmfkc initialization", config=True),
    _nmfre("r_rng", Check(None, bool), False,
           "draw k-means starts and bootstrap multipliers from R's streams (reproduces R to rounding)",
           config=True),
    _nmfre("client", doc="Dask client of the scan and the bootstrap"),
    _nmfre("wild_seed", default=123, doc="seed of the wild bootstrap", positional=False),
    _nmfre("C_signed", default=True, doc="engine ecm: sign-free Θ", positional=False),
    _nmfre("C_p_side", doc="p-value side (None: by the sign of Θ)", positional=False),
    _nmfre("sigma2", Interval(float, low=0.0, low_open=True), 1.0, "starting σ²", positional=False),
    _nmfre("tau2", Interval(float, low=0.0, low_open=True), 1.0, "starting τ²", positional=False),
    _nmfre("sigma2_update", default=True, doc="update σ²", positional=False),
    _nmfre("tau2_update", default=True, doc="update τ²", positional=False),
    _nmfre("dfu_control", Options(("cap", "off")), "cap", "engine cap: enforce the df cap or not",
           positional=False),
    _nmfre("nstart", default=1, doc="k-means restarts of the initializer", positional=False),
    _nmfre("inner_maxit", default=10000, doc="engine ecm: inner iterations", positional=False),
    _nmfre("outer_maxit", default=500, doc="engine ecm: outer iterations", positional=False),
    _nmfre("epsilon_outer", default=1e-6, doc="engine ecm: outer tolerance", positional=False),
    _nmfre("x_postvar", default=True, doc="engine ecm: posterior-variance term in the X step", positional=False),
    _nmfre("X_L2_ortho", default=0.0, doc="engine ecm: orthogonality penalty of X", positional=False),
    _nmfre("X_L2_smooth", default=0.0, doc="engine ecm: smoothness penalty of X", positional=False),
    _nmfre("C_L2", default=0.0, doc="engine ecm: ridge penalty of Θ", positional=False),
    _nmfre("print_trace", default=False, doc="log progress every 100 iterations", positional=False),
    _nmfre("data", doc="formula mode: one row per unit", positional=False),
    _nmfre("Q", doc="alias of rank (R's Q)", positional=False),
)


# ---------------------------------------------------------------------------------------------
# What is derived from a table
# ---------------------------------------------------------------------------------------------


def validate(spec: Sequence[Param], values: Mapping[str, Any], func: str) -> dict:
    """Check ``values`` (name → value, every parameter of ``spec``) and return them normalized.

    Parameters are checked in table order with the library's message template; a parameter
    whose constraint is ``Check(None, ...)`` is passed through (its function checks it against
    the data).
    """
    return {p.name: p.check(values[p.name], func) for p in spec}


def signature(spec: Sequence[Param], *, first: Sequence[str] = ("A",)) -> inspect.Signature:
    """The signature of the function over ``spec``: ``first``, required and ``positional``
    parameters positional-or-keyword, the others keyword-only, with their defaults (annotations
    are not compared)."""
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, pos) for name in first]
    for p in spec:
        if p.default is REQUIRED:
            params.append(inspect.Parameter(p.name, pos))
        elif p.positional:
            params.append(inspect.Parameter(p.name, pos, default=p.default))
        else:
            params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default))
    return inspect.Signature(params)


def _estimator_default(p: Param):
    return p.default if p.estimator_default is _SAME else p.estimator_default


def estimator_signature(spec: Sequence[Param]) -> inspect.Signature:
    """``__init__(self, n_components=None, *, tol=..., ...)`` in the scikit-learn dialect."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(q for q in spec if q.estimator):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if i == 0 else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(p.estimator_name, kind, default=_estimator_default(p)))
    return inspect.Signature(params)


def estimator_init(spec: Sequence[Param]) -> Callable:
    """An ``__init__`` storing every estimator parameter of ``spec`` unchanged (scikit-learn's rule).

    Its ``__signature__`` is :func:`estimator_signature`, which ``get_params`` reads.
    """
    sig = estimator_signature(spec)

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    __init__.__signature__ = sig
    __init__.__doc__ = "Store the parameters unchanged (they are validated by ``fit``)."
    return __init__


def estimator_kwargs(spec: Sequence[Param], estimator) -> dict:
    """``nmf``'s keyword arguments (RcppML names) from an estimator's parameters."""
    return {p.name: getattr(estimator, p.estimator_name) for p in spec if p.estimator and p.default is not REQUIRED}


def estimator_names(spec: Sequence[Param]) -> dict:
    """``{nmf name: estimator name}`` for the parameters whose names differ."""
    return {p.name: p.alias for p in spec if p.alias}


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def config_section(spec: Sequence[Param], cls_name: str, *, doc: str = "", namespace: Mapping | None = None,
                   module: str | None = None) -> type:
    """A frozen dataclass with one field per YAML parameter of ``spec`` (the config's schema).

    Field annotations and ``metadata`` (``doc``, ``min``, ``max``, ``min_open``, ``max_open``,
    ``pair``) are those :mod:`dnmf.config` reads; ``namespace`` adds methods.
    """
    fields = []
    for p in spec:
        if not p.config:
            continue
        meta = {"doc": p.doc, **p.constraint.meta()}
        default = p.default if p.config_default is _SAME else p.config_default
        if default is REQUIRED:
            fields.append((p.name, p.constraint.annotation(), field(metadata=meta)))
        else:
            fields.append((p.name, p.constraint.annotation(), field(default=_freeze(default), metadata=meta)))
    cls = dataclasses.make_dataclass(cls_name, fields, frozen=True, namespace=dict(namespace or {}))
    cls.__doc__ = doc or cls.__doc__
    if module is not None:
        cls.__module__ = module
    return cls


def config_kwargs(spec: Sequence[Param], section) -> dict:
    """``nmf``'s arguments from a config section built by :func:`config_section` (YAML → RcppML)."""
    out = {}
    for p in spec:
        if p.config:
            value = getattr(section, p.name)
            out[p.name] = p.from_config(value) if p.from_config else value
    return out
