"""How a target enters one side's NNLS: the Gram and right-hand-side terms (guided spec §2.3–§2.4).

These functions take the sufficient statistics of one factor update — the k × k Gram ``G`` and
the k × n right-hand side ``B`` — and return the modified pair; the NNLS kernel is unchanged.
They are NumPy on small statistics (the solver layer), so the engine's per-block H step can use
the same algebra with the target blocked like H.
"""

from __future__ import annotations

import numpy as np

__all__ = ["target_gram", "apply_target"]


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
