"""NMF with random effects, ``Y = X(ΘA + U) + E`` (spec/nmfre.md §3, §5): the public fit.

Two engines share the initialiser (nmfkc's EU fit), the inference, the summary formats and the
result type:

* ``engine="cap"`` (default): the df-cap design of the 2026-03 vignette and the paper abstract
  (nmfkc commit ``56d65eb``): the random-effect degrees of freedom are held at or below
  ``df_rate·N·Q`` by raising λ = σ²/τ², Θ and X by multiplicative updates (:mod:`.fit`).
* ``engine="ecm"``: the current upstream design (HEAD ``4e9ed50``): σ² and τ² estimated by EM
  M-steps in an outer loop, sign-free Θ and a semi-NMF X step (:mod:`dnmf.mixed.ecm`).

Layout of :mod:`dnmf.mixed` (imports go downwards only)::

    blocks, ecv                 the blocked fit, cross-validation
    scan                        nmfre_dfu_scan (refits through nmfre.fit_at_rate)
    nmfre                       the fit: validation, initialiser, engines, auto scan, inference
    scan_table                  scan rows, the automatic rule, the loop over rates
    fit                         Engine A, finalisation, initialiser
    ecm, inference, summary     engine B, sandwich/bootstrap, R text
    result                      NMFREResult
    _core                       inputs, df algebra, DEFAULT_RATES
    dnmf.covariates._common     numerics shared with nmfkc

This module keeps the names it has always exported (``DEFAULT_RATES``, ``df_u``,
``lambda_for_cap``, ``kmeans_start``, …) by importing them from where they now live.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Optional

import numpy as np

from .._validation import check_int, check_option, param_error
# Names importable from here since before the split (pipelines and tests use several of them).
from ..covariates._common import (  # noqa: F401
    CLIP_HI,
    CLIP_LO,
    EPS,
    LAMBDA_FLOOR,
    basis_order,
    cholesky_spd,
    clip_var,
    check_rank_vs_shape,
    colnorm,
    executor_for,
    normalize_columns,
    ridge_solve,
    safe_div,
)
from ._core import (  # noqa: F401
    DEFAULT_RATES,
    ENGINES,
    Inputs,
    check_matrix_init,
    check_seed_int,
    df_u,
    gram_eigenvalues,
    lambda_for_cap,
    validate_inputs,
)
from ..exceptions import ConvergenceWarning, InputError
from ..params import NMFRE_PARAMS
from ..formula import formula_inputs
from .ecm import ECMOptions, ecm_initialize, fit_ecm, resolve_c_signed
from .fit import (  # noqa: F401
    CapOptions,
    CapState,
    DenseData,
    cap_extra,
    check_convergence,
    finalize,
    fit_cap,
    initialize,
    kmeans_start,
    nmfkc_eu_stats,
    r_squared_variants as r_squared_all,
)
from .result import NMFREResult
from .scan_table import run_dfu_scan

__all__ = [
    "nmfre",
    "NMFREResult",
    "DenseData",
    "CapOptions",
    "fit_cap",
    "df_u",
    "lambda_for_cap",
    "ENGINES",
    "DEFAULT_RATES",
    "fit_at_rate",
]


_PARAMS = {p.name: p for p in NMFRE_PARAMS}


def _check(name: str, value):
    """``value`` checked by :data:`dnmf.params.NMFRE_PARAMS`'s constraint (the library's template)."""
    return _PARAMS[name].check(value, "nmfre")


def _call_string(name: str, given: dict) -> str:
    parts = ["Y"] + (["A"] if given.pop("_A", False) else [])
    parts += [f"{k}={v!r}" for k, v in given.items()]
    return f"{name}({', '.join(parts)})"


def nmfre(
    Y,
    A=None,
    rank: int = 2,
    df_rate: Optional[float] = None,
    engine: str = "cap",
    wild_bootstrap: bool = True,
    wild_B: int = 500,
    wild_level: float = 0.95,
    prefix: str = "Basis",
    epsilon: float = 1e-5,
    maxit: Optional[int] = None,
    X_init=None,
    C_init=None,
    U_init=None,
    seed: int = 1,
    r_rng: bool = False,
    client=None,
    *,
    wild_seed=123,
    C_signed: bool | str = True,
    C_p_side: Optional[str] = None,
    sigma2: float = 1.0,
    tau2: float = 1.0,
    sigma2_update: bool = True,
    tau2_update: bool = True,
    dfu_control: str = "cap",
    nstart: int = 1,
    inner_maxit: int = 10000,
    outer_maxit: int = 500,
    epsilon_outer: float = 1e-6,
    x_postvar: bool = True,
    X_L2_ortho: float = 0.0,
    X_L2_smooth: float = 0.0,
    C_L2: float = 0.0,
    print_trace: bool = False,
    data=None,
    Q: Optional[int] = None,
) -> NMFREResult:
    """Fit NMF with random effects, ``Y = X(ΘA + U) + E`` (spec/nmfre.md §3, §5).

    Parameters
    ----------
    Y : array-like of shape (P, N)
        Non-negative data; columns are units (subjects), rows features (time points). A
        pandas DataFrame keeps its labels.
    A : array-like of shape (K, N), optional
        Covariates, one column per unit; default a single intercept row of ones. A DataFrame's
        index names the covariates.
    rank : int, default 2
        Q, the number of basis vectors.
    df_rate : float, optional
        Engine "cap": the random effects may use at most ``max(df_rate·N·Q, 1)`` degrees of
        freedom. ``None`` runs :func:`nmfre_dfu_scan` over 0.1, …, 1.0 and takes its
        automatic choice (spec §4.1). Ignored by "ecm".
    engine : {"cap", "ecm"}, default "cap"
        df-cap engine (spec §3) or the ECM engine of current upstream (spec §5).
    wild_bootstrap : bool, default True
        Run the inference of :func:`nmfre_inference` inline (engine "cap" only, as upstream;
        call :func:`nmfre_inference` for "ecm" fits).
    wild_B, wild_level : int, float
        Bootstrap replicates and the percentile-interval level.
    prefix : str, default "Basis"
        Basis labels ``prefix1..prefixQ``.
    epsilon : float, default 1e-5
        Relative objective change that stops the (inner) iterations.
    maxit : int, optional
        Iteration cap; default 50000 for "cap" (the reference commit) and 5000 for "ecm".
    X_init, C_init : array-like of shapes (P, Q) and (Q, K), optional
        Starting values; when either is missing both come from
        ``nmfkc(Y, A, rank, epsilon=epsilon, seed=seed)`` (see :func:`initialize`). Engine "ecm"
        also takes ``X_init`` as a method name (``"kmeans"``, ``"kmeansar"``, ``"kmeans++"``,
        ``"kmeanspp"``, ``"runif"``, ``"nndsvd"``), and a matrix ``X_init`` without ``C_init``
        keeps X and takes Θ from nmfkc's iterations at fixed X (spec §5.1,
        :func:`dnmf.mixed.ecm.ecm_initialize`).
    U_init : array-like of shape (Q, N), optional
        Default zeros.
    seed : int, default 1
        Seed of the nmfkc initialiser (k-means; deterministic for rank 1).
    r_rng : bool, default False
        Reproduce R's random streams (bootstrap multipliers, k-means) bit for bit.
    client : distributed.Client, optional
        Runs the df scan's rates and the bootstrap chunks as parallel tasks.
    wild_seed : int or SeedSequence, default 123
        Seed of the wild bootstrap (see :func:`nmfre_inference`).
    C_signed : bool or {"signed", "nonneg"}, default True
        Engine "ecm": sign-free least-squares Θ (True, ``"signed"``) or multiplicative
        non-negative Θ (False, ``"nonneg"``).
    C_p_side : {"one.sided", "two.sided"}, optional
        p-value side; default one-sided for "cap" (and ``C_signed=False``), two-sided otherwise.
    sigma2, tau2 : float, default 1
        Starting variances.
    sigma2_update, tau2_update : bool, default True
    dfu_control : {"cap", "off"}, default "cap"
        Engine "cap": enforce the cap, or run the damped τ² moment update without it.
    nstart : int, default 1
        k-means restarts of the initialiser.
    inner_maxit, outer_maxit, epsilon_outer : int, int, float
        Engine "ecm" loop controls (10000, 500, 1e-6).
    x_postvar : bool, default True
        Engine "ecm": add the posterior-variance term ``N·σ²·M⁻¹`` to the X-step Gram.
    X_L2_ortho, X_L2_smooth, C_L2 : float, default 0
        Engine "ecm" penalties (spec §5.3).
    print_trace : bool, default False
        Log progress every 100 iterations (logger ``dnmf.mixed.nmfre``, level INFO).
    data : pandas.DataFrame, optional
        Formula mode: ``Y`` is a string ``"y1 + y2 ~ x1 + x2"`` and ``data`` has one row per
        unit; Y's rows are the left-hand columns and A's rows the right-hand ones (no intercept
        is added; name a column of ones). The same parser as :func:`dnmf.nmfkc`
        (:mod:`dnmf.formula`); upstream's ``nmfre`` has no formula mode.
    Q : int, optional
        Alias of ``rank`` (R's backward-compatible ``Q``, which wins over ``rank`` as upstream).

    The parameters are declared once in :data:`dnmf.params.NMFRE_PARAMS` (signature,
    defaults, simple range checks and the nmfre pipeline's ``model:`` section).

    Returns
    -------
    NMFREResult

    Raises
    ------
    InputError
        Negative or non-finite Y, A with the wrong number of columns or with NaN, rank < 1,
        df_rate not a positive finite number, bad option values; or no rate of the automatic
        scan qualifies.

    Notes
    -----
    Engine "cap", per iteration (spec §3.3): λ = σ²/τ², raised to the λ* with
    ``N·tr[XᵀX(XᵀX+λ*I)⁻¹] = cap`` when the cap binds (then τ² = σ²/λ*);
    ``U = (XᵀX+λI)⁻¹Xᵀ(Y − XΘA)`` row-centred; ``X ← X∘[YB⁺ᵀ]/[XB⁺B⁺ᵀ]`` with
    ``B⁺ = max(ΘA+U, 0)``; column normalisation; ``Θ ← Θ∘[Xᵀmax(Y−XU,0)Aᵀ]/[XᵀXΘAAᵀ]``;
    σ² damped from iteration 50 every 10 iterations; objective ``‖Y−X(ΘA+U)‖² + λ‖U‖²``.
    With the defaults τ² is never estimated — it moves only through the cap — and σ² stays 1
    when the fit converges before iteration 50 (spec §3.6). This is the reference behaviour,
    kept for parity; ``engine="ecm"`` estimates both variances.

    Examples
    --------
    >>> import dnmf
    >>> from dnmf.datasets.orthodont import load_orthodont
    >>> Y, A = load_orthodont()                                     # doctest: +SKIP
    >>> fit = dnmf.nmfre(Y, A, rank=1, df_rate=0.2, prefix="Trend")  # doctest: +SKIP
    >>> print(fit.summary())                                         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    func = "nmfre"
    Y, A, formula_meta = formula_inputs(Y, A, data, func)
    if Q is not None:
        rank = Q  # upstream: `if (!is.null(extra_args$Q)) rank <- extra_args$Q`
    engine = _check("engine", engine)
    # an Inputs object is the private path of nmfre_ecv (imputed cells may be negative)
    inp = Y if isinstance(Y, Inputs) else validate_inputs(Y, A, func)
    rank = _check("rank", rank)
    epsilon = _check("epsilon", epsilon)
    maxit = check_int(50000 if maxit is None and engine == "cap" else (5000 if maxit is None else maxit),
                      "maxit", func, low=1)
    prefix = str(prefix)
    seed = check_seed_int(1 if seed is None else seed, "seed", func)
    df_rate = _check("df_rate", df_rate)
    dfu_control = _check("dfu_control", dfu_control)
    sigma2 = _check("sigma2", sigma2)
    tau2 = _check("tau2", tau2)
    C_signed = resolve_c_signed(C_signed, func)
    if C_p_side is not None:
        C_p_side = check_option(C_p_side, "C_p_side", func, ("one.sided", "two.sided"))
    wild_B = _check("wild_B", wild_B)
    wild_level = _check("wild_level", wild_level)
    P, N = inp.Y.shape
    check_rank_vs_shape(rank, P, N, func)
    if np.any(inp.A < 0):
        # the nmfkc initialiser and the multiplicative Θ updates need A ≥ 0; only the signed ECM
        # engine started from given X_init and C_init can use a signed A
        if engine == "cap" or not C_signed:
            raise param_error("A", func, f"non-negative for engine={engine!r}" + ("" if engine == "cap" else
                              " with C_signed=False"), f"an array with minimum {float(inp.A.min())!r}",
                              described=True)
        if X_init is None or C_init is None:
            raise param_error("A", func, "non-negative unless X_init and C_init are both given (the nmfkc "
                              "initialiser needs A ≥ 0)", f"an array with minimum {float(inp.A.min())!r}",
                              described=True)
    given = {"_A": inp.A_given, "rank": rank}
    if df_rate is not None:
        given["df_rate"] = df_rate
    if engine != "cap":
        given["engine"] = engine
    if prefix != "Basis":
        given["prefix"] = prefix
    if not wild_bootstrap:
        given["wild_bootstrap"] = False
    call = _call_string(func, given)
    if formula_meta is not None:
        call = call.replace("nmfre(Y, A", "nmfre(Y", 1).replace(
            "nmfre(Y", f"nmfre({formula_meta['formula']!r}, data=data", 1)

    if engine == "ecm" and (isinstance(X_init, str) or (X_init is not None and C_init is None)):
        # Engine B's own start rules (spec §5.1): X_init as a method name, or a matrix X_init with
        # Θ from nmfkc's iterations at fixed X
        X, C = ecm_initialize(inp.Y, inp.A, rank, X_init=X_init, C_init=C_init, epsilon=epsilon, seed=seed,
                              nstart=nstart, r_rng=r_rng, func=func)
    else:
        X, C = initialize(inp, rank, epsilon=epsilon, seed=seed, X_init=X_init, C_init=C_init, nstart=nstart,
                          r_rng=r_rng)
    U0 = check_matrix_init(U_init, "U_init", (rank, N), func)
    U = np.zeros((rank, N)) if U0 is None else U0

    if engine == "ecm":
        opt = ECMOptions(
            rank=rank, C_signed=bool(C_signed), epsilon=epsilon, maxit=maxit, inner_maxit=inner_maxit,
            outer_maxit=outer_maxit, epsilon_outer=epsilon_outer, x_postvar=x_postvar,
            X_L2_ortho=X_L2_ortho, X_L2_smooth=X_L2_smooth, C_L2=C_L2, sigma2_update=sigma2_update,
            tau2_update=tau2_update, print_trace=print_trace,
        )
        st = fit_ecm(inp.Y, inp.A, X, C, U, sigma2, tau2, opt)
        extra = dict(
            converged=st.converged, stop_reason=st.stop_reason, n_iter=st.total_iter, maxit=maxit,
            epsilon=epsilon, objfunc=float(st.objfunc_iter[-1]) if st.objfunc_iter else float("nan"),
            rel_change_final=float(st.rel), objfunc_iter=np.asarray(st.objfunc_iter),
            rss_trace=np.asarray(st.rss_trace), dfU_cap_scan=None, dfU_hit_cap=False, dfU_hit_iter=(),
            call=call, runtime=time.perf_counter() - t0, outer_iter=st.outer, outer_maxit=outer_maxit,
            nll_trace=np.asarray(st.nll_trace),
        )
        if st.stop_reason in ("maxit", "outer_maxit"):
            warnings.warn(f"nmfre (engine='ecm') stopped at {st.stop_reason} ({st.total_iter} iterations) "
                          f"before converging; increase maxit (currently {maxit}) or outer_maxit "
                          f"(currently {outer_maxit}).", ConvergenceWarning, stacklevel=2)
        res = finalize(inp, st.X, st.C, st.U, st.sigma2, st.tau2, engine="ecm", prefix=prefix,
                       C_signed=C_signed, rate=None, cap=float("nan"), extra=extra)
        res = replace(res, runtime=time.perf_counter() - t0, formula_meta=formula_meta)
        return res

    # ----- engine "cap" -----
    scan = None
    rate = df_rate
    if rate is None and dfu_control == "cap":
        scan = run_dfu_scan(fit_at_rate, DEFAULT_RATES, inp.Y, inp.A, rank=rank, X_init=X, C_init=C, U_init=U,
                            maxit=maxit, epsilon=epsilon, seed=seed, client=client,
                            sigma2=sigma2, tau2=tau2, sigma2_update=sigma2_update)
        if not np.isfinite(scan.cap_rate):
            raise InputError("nmfre: no df_rate of the automatic scan qualifies (safeguard, hit and converged); "
                             "pass df_rate explicitly. Scan table:\n" + str(scan))
        rate = float(scan.cap_rate)
    if rate is None:
        rate = 0.10
    X = np.maximum(X, EPS)
    C = np.maximum(C, EPS)
    X, dsc = normalize_columns(X)
    C = C * dsc[:, None]
    U = U * dsc[:, None]
    opt = CapOptions(rank=rank, rate=rate, epsilon=epsilon, maxit=maxit, dfu_control=dfu_control,
                     sigma2_update=sigma2_update, tau2_update=tau2_update, print_trace=print_trace)
    data = DenseData(inp.Y, inp.A, U)
    st = fit_cap(data, CapState(X=X, C=C, sigma2=sigma2, tau2=tau2), opt)
    if st.stop_reason == "maxit":
        warnings.warn(f"nmfre reached maxit ({maxit}) before the relative objective change fell below "
                      f"epsilon ({epsilon}); increase maxit (currently {maxit}).", ConvergenceWarning,
                      stacklevel=2)
    extra = cap_extra(st, opt, scan, call, maxit, epsilon, t0)
    res = finalize(inp, st.X, st.C, data.U, st.sigma2, st.tau2, engine="cap", prefix=prefix, C_signed=False,
                   rate=rate, cap=max(rate * N * rank, 1.0), extra=extra)
    if wild_bootstrap:
        from .inference import nmfre_inference  # here: scipy.stats and numba only when asked

        res = nmfre_inference(res, inp.Y, inp.A, wild_B=wild_B, wild_level=wild_level, side=C_p_side,
                              seed=wild_seed, r_rng=r_rng, client=client)
    return replace(res, runtime=time.perf_counter() - t0, formula_meta=formula_meta)


def fit_at_rate(rate, Y, A, kw) -> NMFREResult:
    """One fit of the df scan: :func:`nmfre` at ``df_rate=rate`` (module level, so it pickles)."""
    return nmfre(Y, A, df_rate=rate, **kw)
