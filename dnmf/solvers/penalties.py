"""The penalties of RcppML §8 defined once: L21, graph, upper bound and angular decorrelation.

Both loops — the plain fused ALS loop (``engine/als.py``) and the masked / CV loop
(``engine/masked.py``) — take their penalty terms from here; the kernels only see the results
(a k × k Gram term, a bound, a k × k angular map). For one side's update with Gram ``G``,
right-hand side ``B`` and ``F`` the side's *current* (pre-update) factor as k rows:

* **graph** ``G += λ_g · sym(F L Fᵀ)`` with ``L`` the user's m × m (W) or n × n (H) matrix used as
  given (pass a Laplacian ``D − Adj``, e.g. from :func:`laplacian`). ``sym(X) = (X + Xᵀ)/2``: the
  penalty ``λ_g tr(F L Fᵀ)`` depends on L's symmetric part only, and every solver then sees a
  symmetric Gram (for a symmetric L — any Laplacian — this is exactly ``F L Fᵀ``, as RcppML);
* **L21** ``G_rr += L21 / ‖F_r‖₂`` for each factor r with ``‖F_r‖₂ > 1e-10``;
* these come after L2 and before a target (§2.4, guided spec §2.2), in that order;
* **upper bound** ``X ← min(X, ub)`` on the solved (raw) factor, right after each NNLS solve,
  before anything is accumulated from it (0: none);
* **angular** after the bound: ``n_r = ‖X_r‖₂``, ``X̂_r = X_r / n_r`` (when n_r > 1e-15),
  ``C = X̂X̂ᵀ`` with a zero diagonal, ``X ← max(0, X − λ·diag(n)·C·X̂)`` — C from the *new*
  factor, a linear map ``X ← max(0, X − M X)`` with ``M = λ diag(n) C diag(1/n)`` computed from
  the new factor's Gram ``XXᵀ`` alone (:func:`angular_matrix`), then applied column by column
  (:func:`apply_angular`).

``F`` for W is the current W (unit-norm columns; the raw initial W in the first iteration, as
RcppML). For H it is the normalized Ĥ of the previous iteration; in the first iteration there is
no H yet and the H side's graph and L21 terms are left out (RcppML uses its random initial H
there, which it otherwise never uses).

The upper bound is in the units of A: the engine passes ``ub·s`` when it fits ``s·A``
(``core.data_scale``); L21, graph and angular are scale-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .._validation import param_error

__all__ = ["Penalties", "penalty_gram", "angular_matrix", "apply_angular", "apply_bound", "laplacian",
           "check_graph", "fit_penalties", "check_penalty_use", "refuse_penalties", "PENALTY_NAMES"]

#: The nmf parameters of this module (refused together by the non-MSE losses).
PENALTY_NAMES = ("L21", "angular", "upper_bound", "graph_lambda")


def _digest(g) -> str | None:
    if g is None:
        return None
    h = hashlib.sha256(f"{g.shape}".encode())
    for a in (g.data, g.indices, g.indptr):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Penalties:
    """A fit's §8 penalties, per side as (W, H) pairs (what :class:`~dnmf.engine.als.ALSOptions` carries).

    ``upper_bound`` is in the fit's units (already multiplied by the data scale); ``graph_W`` /
    ``graph_H`` are CSR float64 matrices (m × m, n × n) or None, used only where the matching
    ``graph_lambda`` is > 0.
    """

    L21: tuple = (0.0, 0.0)
    angular: tuple = (0.0, 0.0)
    upper_bound: tuple = (0.0, 0.0)
    graph_lambda: tuple = (0.0, 0.0)
    graph_W: object = None
    graph_H: object = None

    def __repr__(self) -> str:  # also the checkpoint fingerprint's view of the penalties
        return (f"Penalties(L21={self.L21}, angular={self.angular}, upper_bound={self.upper_bound}, "
                f"graph_lambda={self.graph_lambda}, graph_W={_digest(self.graph_W)}, graph_H={_digest(self.graph_H)})")

    def graph(self, side: int):
        """The side's graph matrix when its term is on (side 0: W, 1: H), else None."""
        g = self.graph_W if side == 0 else self.graph_H
        return g if g is not None and self.graph_lambda[side] > 0 else None

    def gram_on(self, side: int) -> bool:
        """Whether the side has a Gram term (L21 or graph)."""
        return self.L21[side] > 0 or self.graph(side) is not None

    def side_on(self, side: int) -> bool:
        return self.gram_on(side) or self.angular[side] > 0 or self.upper_bound[side] > 0

    @property
    def active(self) -> bool:
        return self.side_on(0) or self.side_on(1)

    def gram(self, side: int, ft: np.ndarray | None, sqnorms: np.ndarray | None = None) -> np.ndarray | None:
        """The side's Gram term (k × k) from its current factor ``ft`` (cols × k, i.e. Fᵀ), or
        None when the side has none or there is no current factor. ``sqnorms`` (k) are F's squared
        row norms when known without ``ft`` (L21 alone)."""
        if not self.gram_on(side):
            return None
        if ft is None and (sqnorms is None or self.graph(side) is not None):
            return None
        if sqnorms is None:
            sqnorms = np.einsum("ir,ir->r", ft, ft)
        return penalty_gram(sqnorms, self.L21[side], self.graph_lambda[side], self.graph(side), ft)


def penalty_gram(sqnorms: np.ndarray, l21: float = 0.0, graph_lambda: float = 0.0, graph=None,
                 ft: np.ndarray | None = None) -> np.ndarray:
    """``λ_g·sym(F L Fᵀ) + diag(L21 / ‖F_r‖₂)`` (k × k) for a factor F given as ``ft`` = Fᵀ.

    ``sqnorms`` are ‖F_r‖₂² (k); rows with ‖F_r‖₂ ≤ 1e-10 get no L21 term (§8.4).
    """
    k = sqnorms.shape[0]
    out = np.zeros((k, k))
    if graph is not None and graph_lambda > 0 and ft is not None:
        t = ft.T @ np.asarray(graph @ ft)
        out += graph_lambda * 0.5 * (t + t.T)
    if l21 > 0:
        nr = np.sqrt(np.maximum(sqnorms, 0.0))
        ok = nr > 1e-10
        out[np.diag_indices(k)] += np.where(ok, l21 / np.where(ok, nr, 1.0), 0.0)
    return out


def angular_matrix(Q: np.ndarray, lam: float) -> np.ndarray:
    """``M = λ·diag(n)·C·diag(1/n)`` (k × k) from the new factor's Gram ``Q = XXᵀ``, so that the
    angular step is ``X ← max(0, X − M X)`` (§8.7: n the row norms, C the cosines, zero diagonal;
    a row with n_r ≤ 1e-15 is not normalized)."""
    n = np.sqrt(np.maximum(np.diag(Q), 0.0))
    inv = np.where(n > 1e-15, 1.0 / np.where(n > 1e-15, n, 1.0), 1.0)
    C = Q * np.outer(inv, inv)
    np.fill_diagonal(C, 0.0)
    return lam * n[:, None] * C * inv[None, :]


def apply_angular(xt: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The angular step for a factor stored as columns ``xt`` (cols × k, i.e. Xᵀ): ``max(0, Xᵀ − XᵀMᵀ)``."""
    return np.maximum(xt - xt @ M.T, 0.0)


def apply_bound(x: np.ndarray, ub: float) -> np.ndarray:
    """``min(x, ub)`` when ``ub > 0`` (in place), else x unchanged."""
    if ub > 0:
        np.minimum(x, ub, out=x)
    return x


def laplacian(adjacency, normalized: bool = False) -> sp.csr_matrix:
    """The graph Laplacian of a weighted adjacency matrix, for ``nmf(graph_W=..., graph_H=...)``.

    Parameters
    ----------
    adjacency : array-like or scipy.sparse matrix of shape (p, p)
        Non-negative, finite edge weights (e.g. a kNN graph of the samples for ``graph_H``).
        Used as given: a non-symmetric adjacency gives a non-symmetric Laplacian (the fit uses
        the symmetric part of ``F L Fᵀ``); symmetrize it first (``(A + A.T) / 2``) if needed.
        The diagonal (self-loops) cancels in ``D − Adj`` and is ignored.
    normalized : bool, default False
        False: ``L = D − Adj`` with ``D = diag(row sums)``. True: the symmetric normalized
        Laplacian ``I − D^{-1/2} Adj D^{-1/2}`` (isolated vertices get 0 rows).

    Returns
    -------
    scipy.sparse.csr_matrix of shape (p, p), float64

    Raises
    ------
    InputError
        ``adjacency`` is not a square 2-d matrix, has NaN/Inf, or negative weights.
    """
    func = "laplacian"
    if not hasattr(adjacency, "shape"):
        try:
            adjacency = np.asarray(adjacency, dtype=np.float64)
        except (TypeError, ValueError):
            raise param_error("adjacency", func, "a square matrix of non-negative edge weights",
                              type(adjacency).__name__) from None
    if len(adjacency.shape) != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise param_error("adjacency", func, "a square matrix of non-negative edge weights",
                          f"a matrix of shape {' × '.join(map(str, adjacency.shape))}", described=True)
    if not isinstance(normalized, (bool, np.bool_)):
        raise param_error("normalized", func, "a bool", normalized)
    adj = sp.csr_matrix(adjacency, dtype=np.float64)
    if adj.nnz and not np.all(np.isfinite(adj.data)):
        raise param_error("adjacency", func, "a finite matrix", "a matrix with NaN or Inf entries", described=True)
    if adj.nnz and adj.data.min() < 0:
        raise param_error("adjacency", func, "non-negative edge weights",
                          f"a matrix with minimum {float(adj.data.min())!r}", described=True)
    adj = adj - sp.diags(adj.diagonal())
    adj.eliminate_zeros()
    deg = np.asarray(adj.sum(axis=1)).ravel()
    if not normalized:
        return sp.csr_matrix(sp.diags(deg) - adj)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    dn = sp.diags(inv_sqrt)
    return sp.csr_matrix(sp.diags((deg > 0).astype(np.float64)) - dn @ adj @ dn)


def check_graph(value, name: str, func: str, size: int, what: str):
    """A graph parameter as a CSR float64 ``size × size`` matrix (None stays None), or an InputError."""
    if value is None:
        return None
    if not hasattr(value, "shape") or len(value.shape) != 2:
        raise param_error(name, func, f"None or a {what} matrix ({size} × {size}), sparse or dense",
                          type(value).__name__)
    if tuple(value.shape) != (size, size):
        raise param_error(name, func, f"a {what} matrix of shape {size} × {size}",
                          f"a matrix of shape {' × '.join(map(str, value.shape))}", described=True)
    if hasattr(value, "to_scipy_sparse"):  # pydata sparse
        value = value.to_scipy_sparse()
    try:
        g = sp.csr_matrix(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise param_error(name, func, f"a numeric {what} matrix", type(value).__name__) from None
    if g.nnz and not np.all(np.isfinite(g.data)):
        raise param_error(name, func, "a finite matrix", "a matrix with NaN or Inf entries", described=True)
    g.sort_indices()
    return g


def fit_penalties(opts: dict, shape: tuple, scale: float = 1.0, func: str = "nmf") -> Penalties:
    """The validated :class:`Penalties` of an ``nmf`` call (``opts`` after :func:`dnmf.params.validate`).

    Checks ``graph_W`` (m × m) and ``graph_H`` (n × n), and that a graph is given where its
    ``graph_lambda`` is > 0. ``upper_bound`` is multiplied by ``scale`` (the fit's data scale).
    """
    m, n = shape
    gw = check_graph(opts.get("graph_W"), "graph_W", func, m, "feature graph (m × m Laplacian)")
    gh = check_graph(opts.get("graph_H"), "graph_H", func, n, "sample graph (n × n Laplacian)")
    lam = tuple(opts.get("graph_lambda", (0.0, 0.0)))
    for side, (g, gname) in enumerate(((gw, "graph_W"), (gh, "graph_H"))):
        if lam[side] > 0 and g is None:
            raise param_error("graph_lambda", func, f"0 on the {'WH'[side]} side unless {gname} is given", lam)
    ub = tuple(opts.get("upper_bound", (0.0, 0.0)))
    return Penalties(L21=tuple(opts.get("L21", (0.0, 0.0))), angular=tuple(opts.get("angular", (0.0, 0.0))),
                     upper_bound=(ub[0] * scale, ub[1] * scale), graph_lambda=lam, graph_W=gw, graph_H=gh)


def check_penalty_use(opts: dict, func: str = "nmf") -> None:
    """Refuse the penalties where the fit lacks them: loss="kl" (multiplicative updates, no NNLS
    Gram to add the L21 / graph terms to; the squared-error and IRLS fits have them all), and the H
    side of projective and symmetric NMF (H is not solved there)."""
    loss = opts.get("loss", "mse")
    if loss == "kl":
        refuse_penalties(opts, f'with loss={loss!r} (its multiplicative updates have no NNLS Gram for the L21, '
                         'angular, upper_bound and graph penalties; use loss="mse", or loss="gp" with '
                         'dispersion="none" for a penalized Poisson fit by IRLS)', func)
    for variant in ("projective", "symmetric"):
        if opts.get(variant):
            refuse_penalties(opts, f"with {variant}=True (H is not solved; W-side penalties apply)", func, sides=(1,))


def refuse_penalties(opts: dict, why: str, func: str = "nmf", sides: tuple = (0, 1)) -> None:
    """Raise the InputError naming the first penalty in use on ``sides`` (for fits that lack them;
    a graph is in use only through its ``graph_lambda``)."""
    for name in ("L21", "angular", "upper_bound", "graph_lambda"):
        val = opts.get(name, (0.0, 0.0))
        if any(val[s] > 0 for s in sides):
            expected = "0" if sides == (0, 1) else f"0 on the {'WH'[sides[0]]} side"
            raise param_error(name, func, f"{expected} {why}", val)

