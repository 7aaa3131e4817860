"""Truncated SVD of a column-blocked matrix (randomized range finder with power iterations).

Used for the SVD-based warm start of NMF (RcppML's "svd"/"lanczos"/"irlba" inits). Only
m × l and l × l matrices travel; the n_j × l pieces of Aᵀ Q stay in the block tasks.
"""

from __future__ import annotations

import numpy as np

from ..io.blocks import BlockedMatrix, CSCBlock
from .executor import Executor

__all__ = ["truncated_svd"]


def _as_operator(block):
    block = block.load() if hasattr(block, "load") else block
    return block.to_scipy() if isinstance(block, CSCBlock) else block


def _range_task(block, seed_j, l):
    """A_j Ω_j with Ω_j (n_j × l) drawn from this block's own seed (worker-count independent)."""
    a = _as_operator(block)
    omega = np.random.default_rng(seed_j).standard_normal((a.shape[1], l))
    return np.asarray(a @ omega, dtype=np.float64)


def _power_task(block, q):
    """A_j (A_jᵀ Q) — one power-iteration term."""
    a = _as_operator(block)
    z = np.asarray(a.T @ q, dtype=np.float64)
    return np.asarray(a @ z, dtype=np.float64)


def _gram_task(block, q):
    """(Qᵀ A_j)(Qᵀ A_j)ᵀ, l × l."""
    a = _as_operator(block)
    b = np.asarray((a.T @ q).T, dtype=np.float64)
    return b @ b.T


def _add(a, b):
    return a + b


def truncated_svd(blocked: BlockedMatrix, k: int, executor: Executor, handles=None, *, seed=0,
                  n_oversamples: int = 10, n_iter: int = 7):
    """Leading ``k`` left singular vectors and values of A: returns ``(U (m × k), sigma (k,))``.

    Randomized range finder (Halko, Martinsson & Tropp 2011) with ``n_iter`` power iterations
    and QR re-orthonormalization; the small problem is the eigendecomposition of
    ``(QᵀA)(QᵀA)ᵀ``. Deterministic for a given seed and block layout.
    """
    m, n = blocked.shape
    l = min(k + n_oversamples, m, n)
    if handles is None:
        handles = executor.put_blocks(list(blocked.sources))
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    seeds = [int(s.generate_state(1)[0]) for s in seq.spawn(len(handles))]
    y = executor.tree_reduce(_add, executor.map_blocks(_range_task, handles, seeds, args=(l,)))
    q, _ = np.linalg.qr(y)
    for _ in range(n_iter):
        y = executor.tree_reduce(_add, executor.map_blocks(_power_task, handles, args=(q,)))
        q, _ = np.linalg.qr(y)
    bbt = executor.tree_reduce(_add, executor.map_blocks(_gram_task, handles, args=(q,)))
    evals, evecs = np.linalg.eigh(bbt)
    order = np.argsort(evals)[::-1][:k]
    sigma = np.sqrt(np.maximum(evals[order], 0.0))
    u = q @ evecs[:, order]
    # Fix signs (largest-magnitude entry positive) so the result is deterministic.
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, sigma
