"""IRLS block passes for the distribution losses (spec/rcppml.md §6): numba kernels.

A fit with ``loss`` in ``"gp" | "nb" | "gamma" | "inverse_gaussian" | "tweedie"`` (or any loss with
``robust``) solves, for every column of H and then every row of W, a weighted least-squares
problem whose weights come from the current prediction μ (iteratively reweighted least squares,
§6.3). Both orientations share one kernel, :func:`irls_pass`, on a compressed block whose
*outer* index is the unknown being solved (a column of H in a CSC column block, a row of W in a
CSR row block) and whose *inner* index runs over the factor ``F`` it is solved against (W's
rows, or Ĥ's columns):

* the outer vector's stored entries are gathered once (values, inner indices); entries that are
  missing — user mask, NaN, the §5.2 held-out set (hashed with
  :func:`~dnmf.kernels.masked.held_out`) — get weight 0: their rank-1 terms are removed from the
  shared Gram once per outer vector (:func:`~dnmf.kernels.masked.masked_gram`);
* **zeros** (unstored entries, and stored entries equal to 0, treated alike) are never visited.
  For Tweedie (gamma / IG data have no zeros) they keep RcppML's weight 1 [§14.7]: the shared
  Gram ``G = FᵀF`` already holds them. For GP and NB the solve is written in gradient form,
  ``G_w x = G_w x_old − ∇`` with the *exact* zero part of the gradient where it has a closed form:
  at a zero ``ω·μ = 1`` for the GP/KL weight (μ ≥ 1e-4), so ``Σ_zeros ω μ f = Σ_zeros f =
  (Σ_inner f) − Σ_missing f − Σ_stored f``; for NB ``ω·μ = r/(r + μ)`` is taken, in the column
  pass, at each row's mean prediction μ̄_i (``zg_in``: ``Σ_zeros zg_i f_i = Σ_i zg_i f_i −
  Σ_missing − Σ_stored``, exact in the Poisson limit), and in the row pass (and the first
  iteration) at the zeros' mean prediction ``μ̄ = ((Σ_inner f)·x − Σ_missing μ − Σ_stored μ) /
  n_zeros``. The curvature of the zeros is ``ω̄·G_zero`` with ω̄ the weight at μ̄ and
  ``G_zero = G_base − Σ_stored f fᵀ``. So the GP fit's fixed points are those of the exact
  IRLS over all entries, at O(nnz·k²) per inner iteration. (RcppML's weight 1 for the zeros of
  sparse input let them dominate NB fits, whose weights are ≈ r/μ², and collapsed the estimated
  r; a single mean-field weight ω̄ on the zeros' values instead of on the gradient diverged on
  pbmc3k, its error being largest for the zeros of highly expressed genes.) With
  ``zeros_missing`` zeros are missing instead. With zero-inflation (``zi_mode``, §6.5) the
  observed zeros *are* visited: each joins the outer vector's entries with its imputed value
  ``z·μ'`` (μ' from the previous factors), so the pass is the dense IRLS of §6.5's imputed
  matrix without storing it; :func:`zi_estep_pass` is the E-step;
* ``irls_max_iter`` inner iterations: ``μ_t = f_tᵀx`` at the stored observed entries, their
  weights ω_t (:func:`irls_weight`, one formula per loss code; times the Huber factor of §6.2
  with ``robust``), ``G_w = ω̄·G_base + Σ_t (ω_t − ω̄) f_t f_tᵀ + (ε + L2)·I`` (ω̄ = 1 for Tweedie),
  ``b_w = Σ_t ω_t a_t f_t − L1`` (+ the zeros' gradient-form terms for GP / NB),
  solved by the column solver (``kernels/column.py::solve_column``) warm from the previous inner
  iterate; stop when ``max |x − x_old| / (|x_old| + 1e-12) < irls_tol``. The first inner
  iteration of a cold start (no previous factor) uses ω = 1 (the masked least-squares solve), so
  that the weights start from a meaningful μ rather than from μ = 0, where every weight sits at
  its cap.

Outputs of a pass: the new outer vectors, ``Σ x xᵀ``, ``Σ|x|`` and ``Σ x`` (for the other
side's Gram, the norms and the closed forms), and — when asked — the losses of the row pass
(train sum / count, test sum / count, §6.1 in the fitted distribution) and the dispersion
statistics (§6.4): per outer vector (θ by 5 MM steps, NB r by moments, φ) or accumulated per
inner index (NB r and φ per column, finished on the client).

Positions and inner indices are cast to unsigned (``np.uintp``) before they index an array, and
the pass's lists of inner indices are ``uintp`` arrays, as in ``kernels/fused.py`` (its module
docstring): numba drops the wrap-around branch for negative indices. The values are the same,
so the results are bitwise unchanged.

Loss codes: :data:`LOSS_CODES`. Functions are plain Python compiled with
``numba.njit(cache=True, nogil=True)`` so they also run under ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import _losses
from .._losses import FLOOR as _FLOOR
from .._losses import _KL_W_FLOOR
from ._sources import guard_cache
from .column import bound_column, chol_factor, solve_column
from .masked import held_out, masked_gram
from .nnls import SOLVER_CHOLESKY

__all__ = ["LOSS_CODES", "LOSS_MSE", "LOSS_GP", "LOSS_NB", "LOSS_GAMMA", "LOSS_IG", "LOSS_TWEEDIE", "irls_weight",
           "elem_loss", "elem_robust_loss", "irls_pass", "gp_theta_mm",
           "DISP_NONE", "DISP_OUTER", "DISP_INNER", "ZI_NONE", "ZI_INNER", "ZI_OUTER", "zi_posterior",
           "csc_irls_zi_pass", "csr_irls_zi_pass", "zi_estep_pass"]

LOSS_MSE, LOSS_GP, LOSS_NB, LOSS_GAMMA, LOSS_IG, LOSS_TWEEDIE = 0, 1, 2, 3, 4, 5
#: loss name → kernel code
LOSS_CODES = {"mse": LOSS_MSE, "gp": LOSS_GP, "nb": LOSS_NB, "gamma": LOSS_GAMMA, "inverse_gaussian": LOSS_IG,
              "tweedie": LOSS_TWEEDIE}
#: what a pass computes of the dispersion: nothing, one value per outer vector, sums per inner index
DISP_NONE, DISP_OUTER, DISP_INNER = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# Per-entry formulas (§6.1–6.2), selected by the loss code. The formulas themselves — values,
# weights, variances, Huber factors and their floors — are defined once, in dnmf/_losses.py
# as plain Python; they are compiled here, and these functions only dispatch on the code.
# ---------------------------------------------------------------------------------------------


def _compile_scalar(fn):
    return numba.njit(cache=True, nogil=True, inline="always")(fn)


mse_elem, kl_elem, gp_elem, nb_elem, gamma_elem, ig_elem, tweedie_elem = map(_compile_scalar, (
    _losses._mse_elem, _losses._kl_elem, _losses._gp_elem, _losses._nb_elem, _losses._gamma_elem, _losses._ig_elem,
    _losses._tweedie_elem))
weight_unit, weight_kl, weight_nb, weight_power = map(_compile_scalar, (
    _losses._weight_unit, _losses._weight_kl, _losses._weight_nb, _losses._weight_power))
variance_unit, variance_mu, variance_nb, variance_gamma, variance_ig, variance_power = map(_compile_scalar, (
    _losses._variance_unit, _losses._variance_mu, _losses._variance_nb, _losses._variance_gamma,
    _losses._variance_ig, _losses._variance_power))
huber_weight, huber_pearson = map(_compile_scalar, (_losses._huber_weight, _losses._huber_pearson))
gp_eta, gp_theta_root = map(_compile_scalar, (_losses._gp_eta, _losses._gp_theta_root))


def _irls_weight(code, y, mu, disp, power, delta):
    """IRLS weight of one entry (§6.2): the loss's weight (``disp`` = NB size r; ``power`` = the
    variance power of gamma 2, inverse Gaussian 3, Tweedie p), times the Huber factor
    ``h(ρ)``, ``ρ = (y − μ)√max(ω, 1e-15)``, when ``delta`` > 0."""
    if code == LOSS_GP:
        w = weight_kl(y, mu, disp, power)
    elif code == LOSS_NB:
        w = weight_nb(y, mu, disp, power)
    elif code == LOSS_MSE:
        w = weight_unit(y, mu, disp, power)
    else:
        w = weight_power(y, mu, disp, power)
    if delta > 0.0:
        w = huber_weight(w, y, mu, delta)
    return w


irls_weight = numba.njit(cache=True, nogil=True)(_irls_weight)


def _elem_loss(code, y, mu, disp, power):
    """ℓ(y, μ) of spec §6.1 as ``dnmf/_losses.py`` defines it (``disp`` = GP θ or NB r; the
    gamma / IG / Tweedie losses are unit deviances, φ = 1)."""
    if code == LOSS_MSE:
        return mse_elem(y, mu, disp, power)
    if code == LOSS_GP:
        return gp_elem(y, mu, disp, power)
    if code == LOSS_NB:
        return nb_elem(y, mu, disp, power)
    if code == LOSS_GAMMA:
        return gamma_elem(y, mu, disp, power)
    if code == LOSS_IG:
        return ig_elem(y, mu, disp, power)
    # Tweedie: p = 0, 1, 2 are the squared error, 2·KL and the gamma deviance
    if power == 0.0:
        return mse_elem(y, mu, disp, power)
    if power == 1.0:
        return 2.0 * kl_elem(y, mu, disp, power)
    if power == 2.0:
        return gamma_elem(y, mu, disp, power)
    return tweedie_elem(y, mu, disp, power)


elem_loss = numba.njit(cache=True, nogil=True)(_elem_loss)


def _variance(code, mu, disp, power):
    if code == LOSS_MSE:
        return variance_unit(mu, disp, power)
    if code == LOSS_GP:
        return variance_mu(mu, disp, power)
    if code == LOSS_NB:
        return variance_nb(mu, disp, power)
    if code == LOSS_GAMMA:
        return variance_gamma(mu, disp, power)
    if code == LOSS_IG:
        return variance_ig(mu, disp, power)
    return variance_power(mu, disp, power)


variance = numba.njit(cache=True, nogil=True, inline="always")(_variance)


def _elem_robust_loss(code, y, mu, disp, power, delta):
    """Huber (δ) of the Pearson residual ``(y − μ)/√max(V(μ), 1e-10)`` (the reported loss with ``robust``)."""
    return huber_pearson(y, mu, variance(code, mu, disp, power), delta)


elem_robust_loss = numba.njit(cache=True, nogil=True)(_elem_robust_loss)


def _zero_in_support(code, power):
    if code == LOSS_GAMMA or code == LOSS_IG:
        return False
    if code == LOSS_TWEEDIE:
        return power < 2.0
    return True


zero_in_support = numba.njit(cache=True, nogil=True, inline="always")(_zero_in_support)


# ---------------------------------------------------------------------------------------------
# Dispersion (§6.4)
# ---------------------------------------------------------------------------------------------


def _gp_theta_mm(yv, muv, ne, s_y, s_mu, theta, theta_max, n_iter):
    """GP θ of one group by ``n_iter`` MM steps of §6.4 from ``theta``: entries ``yv[:ne]`` with
    predictions ``muv[:ne]`` (those with y ≥ 1 enter α, γ), ``s_y = Σ y``, ``s_mu = Σ μ`` over
    the group's (training) entries, zeros included."""
    n_pos = 0.0
    for t in range(ne):
        if yv[t] >= 1.0:
            n_pos += 1.0
    for _ in range(n_iter):
        alpha = n_pos
        gamma = 0.0
        for t in range(ne):
            y = yv[t]
            if y >= 1.0:
                eta = gp_eta(y, muv[t], theta)
                alpha += (y - 1.0) * eta
                gamma += (y - 1.0) * (1.0 - eta)
        theta = gp_theta_root(alpha, gamma, s_y, s_mu, theta, theta_max)
    return theta


gp_theta_mm = numba.njit(cache=True, nogil=True)(_gp_theta_mm)


#: zero-inflation of a pass: none, π per inner index, π per outer vector
ZI_NONE, ZI_INNER, ZI_OUTER = 0, 1, 2


def _zi_posterior(code, pi, mu, disp):
    """§6.5 posterior probability that a zero is structural: ``π/(π + (1−π)p0 + 1e-300)``, ``p0 =
    exp(−ℓ(0, μ))`` = ``exp(−μ/(1+θ))`` (GP) or ``(r/(r+μ))^r`` (NB)."""
    p0 = math.exp(-elem_loss(code, 0.0, mu, disp, 0.0))
    return pi / (pi + (1.0 - pi) * p0 + 1e-300)


zi_posterior = numba.njit(cache=True, nogil=True)(_zi_posterior)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _dot(f, x):
    acc = 0.0
    for r in range(x.shape[0]):
        acc += f[r] * x[r]
    return acc


dot = numba.njit(cache=True, nogil=True, inline="always")(_dot)


def _mark_missing(o, og, by_row, has_mask, mk_indices, mk_indptr, hash_all, cv_seed, cv_thr, n_inner, mark, kind,
                  mlist):
    """Mark outer vector o's (global index og) user-masked inner indices (kind 2) and, with
    ``hash_all``, its §5.2 held-out ones among all ``n_inner`` (kind 1): ``mark[i] = o``, listed in
    ``mlist``; returns how many. NaN entries are marked by the caller's pass over the stored
    entries. Shared by the IRLS pass and the zero-inflation E-step (inlined)."""
    nmask = 0
    if has_mask:
        for p in range(np.uintp(mk_indptr[o]), np.uintp(mk_indptr[o + 1])):  # unsigned (module docstring)
            i = np.uintp(mk_indices[p])
            if mark[i] != o:
                mark[i] = o
                kind[i] = 2
                mlist[nmask] = i
                nmask += 1
    if hash_all:
        for i in range(n_inner):
            if mark[i] != o:
                ho = held_out(cv_seed, np.uint64(og), np.uint64(i), cv_thr) if by_row else \
                    held_out(cv_seed, np.uint64(i), np.uint64(og), cv_thr)
                if ho:
                    mark[i] = o
                    kind[i] = 1
                    mlist[nmask] = i
                    nmask += 1
    return nmask


mark_missing = numba.njit(cache=True, nogil=True, inline="always")(_mark_missing)


def _stored_missing(o, i, a, mark, kind, mlist, nmask, aval):
    """A stored entry ``a`` at inner index i of outer index o that is not observed: a NaN is
    missing (kind 2, added to ``mlist``); an entry :func:`mark_missing` already marked keeps its
    value in ``aval`` when held out (kind 1). Returns ``(handled, nmask)``; ``handled`` False: an
    observed entry. Shared by the IRLS pass and the zero-inflation E-step (inlined)."""
    if a != a:
        if mark[i] != o:
            mark[i] = o
            mlist[nmask] = i
            nmask += 1
        kind[i] = 2
        return True, nmask
    if mark[i] == o:
        if kind[i] == 1:
            aval[i] = a
        return True, nmask
    return False, nmask


stored_missing = numba.njit(cache=True, nogil=True, inline="always")(_stored_missing)


def _irls_pass(by_row, data, indices, indptr, n_inner, outer0, F, G, diag, l1, xio, warm, code, power, delta,
               disp_in, disp_out, disp_on_inner, irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol,
               zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, disp_mode, disp_lo, disp_hi, fsum, zc,
               zg_in, zgsum, Qout, asum, xsum, sums, disp_new, colstat, zi_mode, zi_pi, zi_F, gpen, ub):
    """IRLS update of every outer vector of one compressed block (see the module docstring).

    Parameters
    ----------
    by_row : bool — a CSR row block (W's rows against Ĥ; computes losses) or a CSC column block
    data, indices, indptr : the block's compressed triplets (outer × inner); NaN = missing
    n_inner : int — rows of A (CSC) or columns (CSR); outer0 : global index of the first outer vector
    F : (n_inner, k) — W (CSC) or Ĥᵀ (CSR); G : (k, k) — FᵀF (unpenalised); diag : float added to it
    l1 : float; xio : (n_outer, k) — in: warm start (if ``warm``), out: the solutions
    code, power, delta : loss code, variance power, Huber δ (0: not robust)
    disp_in (n_inner,), disp_out (n_outer,), disp_on_inner : the dispersion in effect (GP θ, NB r),
        read from disp_in[inner] when ``disp_on_inner`` else disp_out[outer]
    irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol : inner iterations and the NNLS solve
    zeros_missing, cv_on, cv_seed, cv_thr, mk_indices, mk_indptr : as ``kernels/masked.py`` (the
        user mask of the block in the same orientation; empty indptr: none)
    disp_mode : DISP_NONE, DISP_OUTER (a new value per outer vector into ``disp_new``, clamped to
        [disp_lo, disp_hi]; GP θ from disp_out), DISP_INNER (per-inner sums into ``colstat``)
    fsum : (k,) Σ_inner f; zc : (k,) Σ_inner f/(1 + θ_inner) (GP closed form with disp_on_inner)
    zg_in : (n_inner,) or (0,) — NB: ω·μ = r/(r + μ̄_i) at a zero of inner index i, from the inner
        index's mean prediction (used for the zeros' gradient instead of the outer vector's μ̄);
        zgsum : (k,) Σ_inner zg_i f_i
    Qout, asum, xsum : (k, k), (k,), (k,) — accumulated: Σ x xᵀ, Σ|x|, Σ x
    sums : (4,) — accumulated (row pass): train loss, train count, test loss, test count
    disp_new : (n_outer,); colstat : (3, n_inner) accumulated (DISP_INNER)
    zi_mode, zi_pi, zi_F : zero-inflation (§6.5; needs ``warm``): ZI_NONE, ZI_INNER (π per inner
        index, ``zi_pi`` (n_inner,)) or ZI_OUTER (π per outer vector, (n_outer,)); every observed
        zero of an outer vector then joins its entries with the imputed value ``z·μ'``, ``μ' =
        zi_F[i]·x_warm`` (the previous iteration's prediction), ``z = π/(π + (1−π)p0(μ') +
        1e-300)``: the weighted solves, losses and dispersion statistics of the pass see the
        imputed matrix of §6.5 without it being stored (O(n_inner·k²) per inner iteration)
    gpen : (k, k) — the §8 penalty Gram term (L21, graph; ``solvers/penalties.py``) added to every
        weighted Gram ``G_w`` (zeros: none); ub : float — upper bound clamped after every inner
        solve (0: none), so each next weight and the reported losses see the bounded solution
    """
    k = F.shape[1]
    n_outer = indptr.shape[0] - 1
    b = np.empty(k)
    x = np.empty(k)
    xold = np.empty(k)
    Gb = np.empty((k, k))
    Gw = np.empty((k, k))
    Lw = np.zeros((k, k))
    mark = np.full(n_inner, -1, dtype=np.int64)
    seen = np.full(n_inner, -1, dtype=np.int64)
    kind = np.zeros(n_inner, dtype=np.int8)  # 1: held out, 2: missing
    aval = np.zeros(n_inner)
    mlist = np.empty(n_inner, dtype=np.uintp)  # inner indices: unsigned (module docstring)
    gbuf = np.empty((n_inner, k))
    max_nnz = 0
    for o in range(n_outer):
        max_nnz = max(max_nnz, indptr[o + 1] - indptr[o])
    zi_on = zi_mode != ZI_NONE and warm and not zeros_missing
    if zi_on:  # the observed zeros join the entries (with their imputed values)
        max_nnz = n_inner
    idx = np.empty(max_nnz, dtype=np.uintp)
    yv = np.empty(max_nnz)
    dv = np.empty(max_nnz)
    muv = np.empty(max_nnz)
    has_mask = mk_indptr.shape[0] > 0
    mfs = np.empty(k)
    zf = np.empty(k)
    zgm = np.empty(k)
    use_zg = code == LOSS_NB and zg_in.shape[0] > 0
    disp_mean = 0.0
    for i in range(n_inner):
        disp_mean += disp_in[i]
    disp_mean /= max(n_inner, 1)
    in_support0 = zero_in_support(code, power)
    closed = code == LOSS_GP and delta <= 0.0 and not zeros_missing
    for o in range(n_outer):
        og = outer0 + o
        # 1. the missing / held-out inner indices, and the stored observed non-zeros
        nmask = mark_missing(o, og, by_row, has_mask, mk_indices, mk_indptr, cv_on and not zeros_missing, cv_seed,
                             cv_thr, n_inner, mark, kind, mlist)
        ne = 0
        for p in range(np.uintp(indptr[o]), np.uintp(indptr[o + 1])):
            a = data[p]
            i = np.uintp(indices[p])
            done, nmask = stored_missing(o, i, a, mark, kind, mlist, nmask, aval)
            if done:
                continue
            if a == 0.0:  # a stored zero is a zero (weight 1, or missing with zeros_missing)
                continue
            if zeros_missing and cv_on:
                ho = held_out(cv_seed, np.uint64(og), np.uint64(i), cv_thr) if by_row else \
                    held_out(cv_seed, np.uint64(i), np.uint64(og), cv_thr)
                if ho:
                    mark[i] = o
                    kind[i] = 1
                    aval[i] = a
                    mlist[nmask] = i
                    nmask += 1
                    continue
            idx[ne] = i
            yv[ne] = a
            dv[ne] = disp_in[i] if disp_on_inner else disp_out[o]
            seen[i] = o
            ne += 1
        if zi_on:  # zero-inflation: every observed zero is an entry with value z·μ' (μ' from the warm start)
            for i in range(n_inner):
                if mark[i] != o and seen[i] != o:
                    th = disp_in[i] if disp_on_inner else disp_out[o]
                    mu_p = max(dot(zi_F[i], xio[o]), 0.0)
                    idx[ne] = i
                    yv[ne] = zi_posterior(code, zi_pi[i] if zi_mode == ZI_INNER else zi_pi[o], mu_p, th) * mu_p
                    dv[ne] = th
                    ne += 1
        # 2. the base Gram: G without the missing entries (zeros_missing: 0), and Σ f over the
        # missing entries (for the mean prediction at the zeros)
        n_zero = 0 if zeros_missing else n_inner - nmask - ne
        for r in range(k):
            mfs[r] = 0.0
            zgm[r] = 0.0
        if zeros_missing:
            for r in range(k):
                for s in range(k):
                    Gb[r, s] = 0.0
        else:
            masked_gram(Gb, G, 0.0, F, mlist, nmask, gbuf)
            for t in range(nmask):
                i = mlist[t]
                f = F[i]
                for r in range(k):
                    mfs[r] += f[r]
                if use_zg:
                    for r in range(k):
                        zgm[r] += zg_in[i] * f[r]
        dz = disp_out[o] if not disp_on_inner else disp_mean
        # 3. IRLS
        if warm:
            for r in range(k):
                x[r] = xio[o, r]
        else:
            for r in range(k):
                x[r] = 0.0
        for it in range(irls_maxit):
            unit = (not warm) and it == 0
            s_mu = 0.0
            for t in range(ne):
                muv[t] = dot(F[idx[t]], x)
                s_mu += muv[t]
            # zeros (see the module docstring): curvature ω̄ (GP / NB: the weight at their mean
            # prediction μ̄; else 1, RcppML) and, for GP / NB, the exact-gradient form of the RHS
            wz = 0.0
            gz = 0.0
            cz = 0.0
            grad_form = False
            if n_zero > 0:
                if unit or (code != LOSS_GP and code != LOSS_NB):
                    wz = 1.0
                else:
                    grad_form = True
                    mu_bar = max((dot(fsum, x) - dot(mfs, x) - s_mu) / n_zero, 0.0)
                    wz = irls_weight(code, 0.0, mu_bar, dz, 0.0, 0.0)
                    if code == LOSS_GP:
                        gz = min(1.0, mu_bar / _KL_W_FLOOR)  # ω·μ at a zero: 1 unless μ < 1e-4
                    elif use_zg:
                        gz = 1.0  # zf holds Σ_zeros zg_i f_i
                    else:
                        # ω·μ = r/(r + μ), taken at μ̄ (exact in the Poisson limit μ ≪ r; the
                        # first-order correction −G_zero x/(r + μ̄) is unbounded and diverged)
                        gz = dz / (dz + mu_bar)
            for r in range(k):
                b[r] = -l1
                zf[r] = (zgsum[r] - zgm[r]) if use_zg else (fsum[r] - mfs[r])
                for s in range(k):
                    Gw[r, s] = wz * Gb[r, s] + gpen[r, s]
                Gw[r, r] += diag
            if grad_form:
                # b += (ω̄ + cz)·G_zero·x_old − gz·Σ_zeros f, G_zero = G_base − Σ_stored f fᵀ
                for r in range(k):
                    acc = 0.0
                    for s in range(k):
                        acc += Gb[r, s] * x[s]
                    b[r] += (wz + cz) * acc
            for t in range(ne):
                f = F[idx[t]]
                y = yv[t]
                if unit:
                    w = 1.0
                else:
                    w = irls_weight(code, y, muv[t], dv[t], power, delta)
                c = w - (0.0 if zeros_missing else wz)
                for r in range(k):
                    fr = f[r]
                    b[r] += w * y * fr
                    zf[r] -= zg_in[idx[t]] * fr if use_zg else fr
                    if grad_form:
                        b[r] -= (wz + cz) * muv[t] * fr
                    cr = c * fr
                    for s in range(r + 1):
                        Gw[r, s] += cr * f[s]
            if grad_form:
                for r in range(k):
                    b[r] -= gz * zf[r]
            for r in range(k):
                for s in range(r):
                    Gw[s, r] = Gw[r, s]
            for r in range(k):
                xold[r] = x[r]
            if solver == SOLVER_CHOLESKY:
                chol_factor(Gw, Lw)
            solve_column(Gw, Lw, b, x, solver, nonneg, cd_maxit, cd_tol, True)
            bound_column(x, ub)
            change = 0.0
            for r in range(k):
                ch = abs(x[r] - xold[r]) / (abs(xold[r]) + 1e-12)
                if ch > change:
                    change = ch
            if change < irls_tol:
                break
        # 4. outputs
        for r in range(k):
            xio[o, r] = x[r]
            asum[r] += abs(x[r])
            xsum[r] += x[r]
            for s in range(k):
                Qout[r, s] += x[r] * x[s]
        need_mu = by_row or disp_mode != DISP_NONE
        if need_mu:
            for t in range(ne):
                muv[t] = dot(F[idx[t]], x)
        # 5. losses (row pass): train over the stored observed non-zeros, plus the zeros in closed
        # form where the loss has one (GP); test over every held-out entry in the loss's support
        if by_row:
            tr = 0.0
            zero_part = 0.0
            for t in range(ne):
                y = yv[t]
                mu = muv[t]
                if delta > 0.0:
                    tr += elem_robust_loss(code, y, mu, dv[t], power, delta)
                else:
                    tr += elem_loss(code, y, mu, dv[t], power)
                if closed:
                    zero_part += mu / (1.0 + dv[t])
            if closed:
                if disp_on_inner:
                    z_all = dot(zc, x)
                else:
                    z_all = dot(fsum, x) / (1.0 + disp_out[o])
                z_masked = 0.0
                for t in range(nmask):
                    i = mlist[t]
                    th = disp_in[i] if disp_on_inner else disp_out[o]
                    z_masked += dot(F[i], x) / (1.0 + th)
                tr += z_all - z_masked - zero_part
                sums[1] += n_inner - nmask
            else:
                sums[1] += ne
            sums[0] += tr
            for t in range(nmask):
                i = mlist[t]
                if kind[i] == 1:
                    y = aval[i]
                    if y != 0.0 or in_support0:
                        mu = dot(F[i], x)
                        th = disp_in[i] if disp_on_inner else disp_out[o]
                        if delta > 0.0:
                            sums[2] += elem_robust_loss(code, y, mu, th, power, delta)
                        else:
                            sums[2] += elem_loss(code, y, mu, th, power)
                        sums[3] += 1.0
                aval[i] = 0.0
        else:
            for t in range(nmask):
                aval[mlist[t]] = 0.0
        # 6. dispersion statistics
        if disp_mode == DISP_OUTER:
            if zeros_missing:
                t_mu = 0.0
                t_mu2 = 0.0
                for t in range(ne):
                    t_mu += muv[t]
                    t_mu2 += muv[t] * muv[t]
            else:
                t_mu = dot(fsum, x)
                t_mu2 = 0.0
                for r in range(k):
                    for s in range(k):
                        t_mu2 += x[r] * G[r, s] * x[s]
                for t in range(nmask):
                    mu = dot(F[mlist[t]], x)
                    t_mu -= mu
                    t_mu2 -= mu * mu
            if code == LOSS_GP:
                s_y = 0.0
                for t in range(ne):
                    s_y += yv[t]
                th = gp_theta_mm(yv, muv, ne, s_y, t_mu, disp_out[o], disp_hi, 5)
                disp_new[o] = max(th, disp_lo)
            elif code == LOSS_NB:
                dsum = 0.0
                for t in range(ne):
                    e = yv[t] - muv[t]
                    dsum += e * e - muv[t] * muv[t]
                num = t_mu2
                den = dsum + t_mu2 - t_mu
                if num > 1e-10 and den > 1e-10:
                    disp_new[o] = min(max(num / den, disp_lo), disp_hi)
                else:
                    disp_new[o] = disp_hi
            else:
                ssum = 0.0
                cnt = 0
                for t in range(ne):
                    if yv[t] > 0.0:
                        e = yv[t] - muv[t]
                        ssum += e * e / max(muv[t], _FLOOR) ** power
                        cnt += 1
                phi = ssum / cnt if cnt > 0 else 1.0
                disp_new[o] = min(max(phi, disp_lo), disp_hi)
        elif disp_mode == DISP_INNER:
            for t in range(ne):
                i = idx[t]
                e = yv[t] - muv[t]
                if code == LOSS_NB:
                    colstat[0, i] += e * e - muv[t] * muv[t]
                    if zeros_missing:
                        colstat[1, i] += muv[t] * muv[t]
                        colstat[2, i] += muv[t]
                elif yv[t] > 0.0:
                    colstat[0, i] += e * e / max(muv[t], _FLOOR) ** power
                    colstat[1, i] += 1.0
            if code == LOSS_NB and not zeros_missing:
                for t in range(nmask):
                    i = mlist[t]
                    mu = dot(F[i], x)
                    colstat[1, i] -= mu * mu
                    colstat[2, i] -= mu


irls_pass = numba.njit(cache=True, nogil=True)(_irls_pass)


def _csc_irls_zi_pass(data, indices, indptr, m, col0, w, G, diag, l1, ht, warm, code, power, delta, disp_in,
                      disp_out, disp_on_inner, irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol, zeros_missing,
                      cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, disp_mode, disp_lo, disp_hi, wsum, zg_in, zgsum, Q,
                      hsum, hraw_sum, disp_new, zi_mode, zi_pi, zi_F, gpen, ub):
    """IRLS H update of one CSC column block against W (m × k): :func:`irls_pass` with columns
    outer. ``disp_mode`` DISP_OUTER computes a GP θ per column (``dispersion="per_col"``);
    ``zg_in`` / ``zgsum``: NB's per-row zero-gradient factors (empty: none); zero-inflation
    (``zi_mode``, ``zi_pi``, ``zi_F``) and the §8 penalty Gram term / upper bound (``gpen`` (k, k),
    ``ub``) as :func:`irls_pass`'s. The engine's ``irls_h_task`` calls it."""
    sums = np.zeros(4)
    colstat = np.zeros((3, 0))
    irls_pass(False, data, indices, indptr, m, col0, w, G, diag, l1, ht, warm, code, power, delta, disp_in, disp_out,
              disp_on_inner, irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol, zeros_missing, cv_on, cv_seed,
              cv_thr, mk_indices, mk_indptr, disp_mode, disp_lo, disp_hi, wsum, wsum, zg_in, zgsum, Q, hsum, hraw_sum,
              sums, disp_new, colstat, zi_mode, zi_pi, zi_F, gpen, ub)


csc_irls_zi_pass = numba.njit(cache=True, nogil=True)(_csc_irls_zi_pass)


def _csr_irls_zi_pass(data, indices, indptr, n, row0, hn, Q, diag, l1, wt, warm, code, power, delta, disp_in,
                      disp_out, disp_on_inner, irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol, zeros_missing,
                      cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, disp_mode, disp_lo, disp_hi, hsum_n, zc, XtX, xabs,
                      xsum, sums, disp_new, colstat, zi_mode, zi_pi, zi_F, gpen, ub):
    """IRLS W update of one CSR row block against Ĥ (n × k), with the row block's losses and
    dispersion statistics: :func:`irls_pass` with rows outer; zero-inflation and the penalty
    terms as :func:`irls_pass`'s. The engine's ``irls_w_task`` calls it."""
    k = hn.shape[1]
    irls_pass(True, data, indices, indptr, n, row0, hn, Q, diag, l1, wt, warm, code, power, delta, disp_in, disp_out,
              disp_on_inner, irls_maxit, irls_tol, solver, nonneg, cd_maxit, cd_tol, zeros_missing, cv_on, cv_seed,
              cv_thr, mk_indices, mk_indptr, disp_mode, disp_lo, disp_hi, hsum_n, zc, np.zeros(0), np.zeros(k), XtX,
              xabs, xsum, sums, disp_new, colstat, zi_mode, zi_pi, zi_F, gpen, ub)


csr_irls_zi_pass = numba.njit(cache=True, nogil=True)(_csr_irls_zi_pass)


# ---------------------------------------------------------------------------------------------
# Zero-inflation (§6.5): the E-step pass
# ---------------------------------------------------------------------------------------------


def _zi_estep_pass(by_row, data, indices, indptr, n_inner, outer0, F, X, code, disp_in, disp_out, disp_on_inner,
                   cv_on, cv_seed, cv_thr, mk_indices, mk_indptr, init, em_iters, pi, sums):
    """The §6.5 E-step of one compressed block whose outer index carries π (CSR row blocks for
    ``zi="row"``, CSC column blocks for ``zi="col"``), at μ = ``F[i]·X[o]``.

    For every outer vector: its observed zeros (not stored, or stored 0; not masked, NaN or held
    out) are visited, ``π`` (``pi[o]``, in / out) starts from ``min(0.5·zero rate, 0.3)`` over its
    observed entries when ``init``, then ``em_iters`` EM steps ``z = π/(π + (1−π)p0 + 1e-300)``,
    ``π ← clamp(Σ z / n_observed, 0.001, 0.999)``. ``sums`` (4,) accumulates the zero-inflated
    loss at the final π: train over every observed entry (a zero ``−log(π + (1−π)p0)``, a
    non-zero ``−log(1−π) + ℓ(y, μ)``), count, test over the held-out entries, count.
    O(n_inner·k) per outer vector."""
    n_outer = indptr.shape[0] - 1
    mark = np.full(n_inner, -1, dtype=np.int64)
    kind = np.zeros(n_inner, dtype=np.int8)
    aval = np.zeros(n_inner)
    mlist = np.empty(n_inner, dtype=np.uintp)  # inner indices: unsigned (module docstring)
    seen = np.full(n_inner, -1, dtype=np.int64)
    p0 = np.empty(n_inner)
    has_mask = mk_indptr.shape[0] > 0
    for o in range(n_outer):
        og = outer0 + o
        x = X[o]
        nmask = mark_missing(o, og, by_row, has_mask, mk_indices, mk_indptr, cv_on, cv_seed, cv_thr, n_inner, mark,
                             kind, mlist)
        pos_loss = 0.0
        n_pos = 0
        for p in range(np.uintp(indptr[o]), np.uintp(indptr[o + 1])):
            a = data[p]
            i = np.uintp(indices[p])
            done, nmask = stored_missing(o, i, a, mark, kind, mlist, nmask, aval)
            if done:
                continue
            if a == 0.0:
                continue
            seen[i] = o
            th = disp_in[i] if disp_on_inner else disp_out[o]
            pos_loss += elem_loss(code, a, dot(F[i], x), th, 0.0)
            n_pos += 1
        n_obs = n_inner - nmask
        nz = 0
        for i in range(n_inner):
            if mark[i] != o and seen[i] != o:
                th = disp_in[i] if disp_on_inner else disp_out[o]
                p0[nz] = math.exp(-elem_loss(code, 0.0, max(dot(F[i], x), 0.0), th, 0.0))
                nz += 1
        if n_obs == 0:
            for t in range(nmask):
                aval[mlist[t]] = 0.0
            continue
        p = pi[o]
        if init:
            p = min(0.5 * nz / n_obs, 0.3)
        for _ in range(em_iters):
            zs = 0.0
            for t in range(nz):
                zs += p / (p + (1.0 - p) * p0[t] + 1e-300)
            p = min(max(zs / n_obs, 0.001), 0.999)
        pi[o] = p
        tr = pos_loss - n_pos * math.log(1.0 - p)
        for t in range(nz):
            tr -= math.log(p + (1.0 - p) * p0[t])
        sums[0] += tr
        sums[1] += n_obs
        for t in range(nmask):
            i = mlist[t]
            if kind[i] == 1:
                y = aval[i]
                mu = max(dot(F[i], x), 0.0)
                th = disp_in[i] if disp_on_inner else disp_out[o]
                if y == 0.0:
                    sums[2] -= math.log(p + (1.0 - p) * math.exp(-elem_loss(code, 0.0, mu, th, 0.0)))
                else:
                    sums[2] += elem_loss(code, y, mu, th, 0.0) - math.log(1.0 - p)
                sums[3] += 1.0
            aval[i] = 0.0


zi_estep_pass = numba.njit(cache=True, nogil=True)(_zi_estep_pass)


guard_cache(__name__, globals())  # drop cache entries compiled from other kernel sources (kernels/_sources.py)
