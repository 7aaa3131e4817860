"""How a target enters one side's NNLS: the Gram and right-hand-side terms (guided spec §2.3–§2.4).

These functions take the sufficient statistics of one factor update — the k × k Gram ``G`` and
the k × n right-hand side ``B`` — and return the modified pair; the NNLS kernel is unchanged.
They are NumPy on small statistics (the solver layer), so the engine's per-block H step can use
the same algebra with the target blocked like H.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["target_gram", "apply_target", "FitTargets"]


class FitTargets(NamedTuple):
    """The targets of one fit, as the engine uses them (guided spec §2).

    h : (k, n) or None — target of H (its columns are blocked like H's); lam_h its λ.
    w : (m, k) or None — target of W's rows; lam_w its λ.
    gamma_h, gamma_w : ``Γ = TTᵀ/n_T`` (k × k) of each target, computed once over the whole target
        (used when its λ < 0), or None.
    """

    h: np.ndarray | None = None
    lam_h: float = 0.0
    w: np.ndarray | None = None
    lam_w: float = 0.0
    gamma_h: np.ndarray | None = None
    gamma_w: np.ndarray | None = None

    @classmethod
    def build(cls, h=None, lam_h: float = 0.0, w=None, lam_w: float = 0.0) -> "FitTargets":
        h = None if h is None or lam_h == 0.0 else np.ascontiguousarray(h, dtype=np.float64)
        w = None if w is None or lam_w == 0.0 else np.ascontiguousarray(w, dtype=np.float64)
        return cls(h, float(lam_h) if h is not None else 0.0, w, float(lam_w) if w is not None else 0.0,
                   None if h is None else target_gram(h), None if w is None else target_gram(w.T))

    @property
    def active(self) -> bool:
        return self.h is not None or self.w is not None

    def h_gram(self, G: np.ndarray) -> np.ndarray:
        """The H side's shared Gram with the target term (G unchanged without an H target)."""
        return G if self.h is None else apply_target(G, None, self.h, self.lam_h, self.gamma_h)[0]

    def h_rhs(self, col0: int, col1: int) -> np.ndarray | None:
        """Per-column RHS terms ``λ t_c`` (n_j × k) of columns col0:col1 (None unless λ_H > 0)."""
        if self.h is None or self.lam_h <= 0.0:
            return None
        return np.ascontiguousarray(self.lam_h * self.h[:, col0:col1].T)

    def w_problem(self, G: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The W side's (Gram, RHS rows P (m × k)) with the target term."""
        if self.w is None:
            return G, P
        G2, B2 = apply_target(G, P.T, self.w.T, self.lam_w, self.gamma_w)
        return G2, np.ascontiguousarray(B2.T)


def target_gram(target: np.ndarray) -> np.ndarray:
    """``Γ = T Tᵀ / n_T`` (k × k), computed once per fit for the removal mode (§2.4)."""
    return target @ target.T / target.shape[1]


def apply_target(G: np.ndarray, B: np.ndarray | None, target: np.ndarray | None, lam: float,
                 gamma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Add a target term to a side's Gram ``G`` (k × k) and right-hand side ``B`` (k × n).

    Parameters
    ----------
    G : ndarray of shape (k, k)
        Gram of the update, after the L2 / graph / L21 terms.
    B : ndarray of shape (k, n) or None
        Right-hand side (columns b_j); ``None`` when only the Gram is wanted.
    target : ndarray of shape (k, n) or None
        Target ``T`` (columns t_j aligned with ``B``'s). ``None`` or ``lam == 0`` disables.
    lam : float
        λ > 0: enrichment, ``G + λI`` and ``B + λT``. λ < 0: projected adversarial removal.
    gamma : ndarray of shape (k, k), optional
        ``Γ = TTᵀ/n_T`` precomputed with :func:`target_gram` (over the whole target, when
        ``target`` is one block of it); computed from ``target`` when omitted.

    Returns
    -------
    (G, B) : new arrays (the inputs are not modified)

    Notes
    -----
    λ > 0 gives the normal equations of ``min_{h ≥ 0} ‖a − W h‖² + λ‖h − t‖²``:
    ``(G + λI) h = b + λt``. λ < 0 (PROJ_ADV): ``s = tr(G)/tr(Γ)`` (0 when tr(Γ) ≤ 1e-10),
    ``G ← G − |λ|·s·Γ``; if any eigenvalue of the result is below 1e-8, all such eigenvalues are
    raised to 1e-8 and G is rebuilt from its eigendecomposition, otherwise G is kept as is. B is
    not modified in the removal mode.
    """
    if target is None or lam == 0.0:
        return G, B
    k = G.shape[0]
    if lam > 0.0:
        G2 = G + lam * np.eye(k)
        B2 = None if B is None else B + lam * target
        return G2, B2
    gamma = target_gram(target) if gamma is None else gamma
    tr_gamma = float(np.trace(gamma))
    s = float(np.trace(G)) / tr_gamma if tr_gamma > 1e-10 else 0.0
    G2 = G - abs(lam) * s * gamma
    e, V = np.linalg.eigh(G2)
    low = e < 1e-8
    if np.any(low):
        e = np.where(low, 1e-8, e)
        G2 = (V * e) @ V.T
    return G2, None if B is None else B.copy()
