"""NMF with random effects, ``Y = X(ΘA + U) + E`` (spec/nmfre.md §3, §5): the public fit.

Two engines share the initialiser (nmfkc's EU fit), the inference, the summary formats and the
result type:

* ``engine="cap"`` (default): the df-cap design of the 2026-03 vignette and the paper abstract
  (nmfkc commit ``56d65eb``): the random-effect degrees of freedom are held at or below
  ``df_rate·N·Q`` by raising λ = σ²/τ², Θ and X by multiplicative updates (:mod:`.fit`).
* ``engine="ecm"``: the current upstream design (HEAD ``4e9ed50``): σ² and τ² estimated by EM
  M-steps in an outer loop, sign-free Θ and a semi-NMF X step (:mod:`dnmf.mixed.ecm`).

Layout of :mod:`dnmf.mixed` (imports go downwards only)::

    nmfre, blocks, ecv          public fits
    scan                        df scan (refits through fit.fit_nmfre)
    fit                         Engine A, finalisation, initialiser, the fit at one rate
    ecm, inference, summary     engine B, sandwich/bootstrap, R text
    result                      NMFREResult
    _core                       inputs, df algebra, DEFAULT_RATES
    dnmf.covariates._common     numerics shared with nmfkc

This module keeps the names it has always exported (``DEFAULT_RATES``, ``df_u``,
``lambda_for_cap``, ``kmeans_start``, …) by importing them from where they now live.
"""

from __future__ import annotations

from typing import Optional

# Names importable from here since before the split (pipelines and tests use several of them).
from ..covariates._common import (  # noqa: F401
    CLIP_HI,
    CLIP_LO,
    EPS,
    LAMBDA_FLOOR,
    basis_order,
    cholesky_spd,
    clip_var,
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
from .fit import (  # noqa: F401
    CapOptions,
    CapState,
    DenseData,
    cap_extra,
    check_convergence,
    finalize,
    fit_cap,
    fit_nmfre,
    initialize,
    kmeans_start,
    nmfkc_eu_stats,
    r_squared_all,
)
from .result import NMFREResult
from .scan import nmfre_dfu_scan

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
]


def _auto_scan(inp, X, C, U, **kw):
    """The automatic df scan of :func:`nmfre` (spec §4.1): the default rates from the start (X, C, U)."""
    return nmfre_dfu_scan(DEFAULT_RATES, inp.Y, inp.A, X_init=X, C_init=C, U_init=U, **kw)


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
    C_signed: bool = True,
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
        ``nmfkc(Y, A, rank, epsilon=epsilon, seed=seed)`` (see :func:`initialize`).
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
    C_signed : bool, default True
        Engine "ecm": sign-free least-squares Θ (True) or multiplicative non-negative Θ.
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
    return fit_nmfre(
        Y=Y,
        A=A,
        rank=rank,
        df_rate=df_rate,
        engine=engine,
        wild_bootstrap=wild_bootstrap,
        wild_B=wild_B,
        wild_level=wild_level,
        prefix=prefix,
        epsilon=epsilon,
        maxit=maxit,
        X_init=X_init,
        C_init=C_init,
        U_init=U_init,
        seed=seed,
        r_rng=r_rng,
        client=client,
        wild_seed=wild_seed,
        C_signed=C_signed,
        C_p_side=C_p_side,
        sigma2=sigma2,
        tau2=tau2,
        sigma2_update=sigma2_update,
        tau2_update=tau2_update,
        dfu_control=dfu_control,
        nstart=nstart,
        inner_maxit=inner_maxit,
        outer_maxit=outer_maxit,
        epsilon_outer=epsilon_outer,
        x_postvar=x_postvar,
        X_L2_ortho=X_L2_ortho,
        X_L2_smooth=X_L2_smooth,
        C_L2=C_L2,
        print_trace=print_trace,
        auto_scan=_auto_scan,
        stacklevel=3,
    )
