"""Inference on Θ shared by nmfkc and NMF-RE: one set of formulas, one bootstrap driver.

nmfkc is NMF-RE with no random effect (``M⁻¹ = 0``), so both inference functions
(:func:`dnmf.nmfkc_inference`, :func:`dnmf.nmfre_inference`, and NMF-RE's blocked fit) are thin
wrappers over this module:

* the unscaled scores ``S̃[:, n] = a_n ⊗ Xᵀr_n`` (:func:`theta_scores`) and the information
  ``AAᵀ ⊗ (XᵀX − XᵀX M⁻¹ XᵀX)/σ² + ridge·I`` (:func:`theta_information`);
* its inverse, one way (:func:`invert_information`), and the CR1 sandwich
  ``V = H⁻¹ (N/(N−1)·S Sᵀ) H⁻¹`` of the scaled scores ``S = −S̃/σ²`` (:func:`sandwich_covariance`);
* the wild bootstrap driver (:func:`bootstrap_chunks`): replicates in chunks of
  :data:`BOOT_CHUNK`, chunk c of column block j seeded by the key ``(j, c)`` under
  ``SeedSequence(seed)`` (:func:`chunk_seed`; an unblocked fit is block 0), each chunk an
  independent task on the executor, so the draws depend on neither the worker count nor on
  which of the two models asked; or, for R parity, multipliers given per chunk from the
  emulated R stream.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ._common import chunk_bounds, chunk_seed, executor_for, seed_root, theta_information, theta_scores

__all__ = [
    "BOOT_CHUNK",
    "COV_RIDGE",
    "theta_scores",
    "theta_information",
    "invert_information",
    "sandwich_covariance",
    "seed_root",
    "chunk_seed",
    "chunk_bounds",
    "wild_multipliers",
    "multipliers",
    "bootstrap_chunks",
]

#: Replicates per bootstrap task, for nmfkc and NMF-RE alike: fixed, so results never depend
#: on the worker count. (nmfkc used 128 before the two modules were merged; its default-stream
#: draws moved then, as a new Monte-Carlo draw of the same bootstrap.)
BOOT_CHUNK = 100
#: Ridge added to the information matrix.
COV_RIDGE = 1e-8


def invert_information(info: np.ndarray) -> np.ndarray:
    """``info⁻¹`` (LAPACK ``gesv`` on the identity), the pseudo-inverse if it is singular."""
    try:
        return np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(info)


def sandwich_covariance(Hinv: np.ndarray, SSt: np.ndarray, n: int) -> np.ndarray:
    """``V = H⁻¹ J H⁻¹`` with the CR1 meat ``J = n/(n−1)·S Sᵀ`` (``SSt`` of the scaled scores)."""
    J = SSt * (n / (n - 1)) if n > 1 else SSt
    return Hinv @ J @ Hinv


def wild_multipliers(rng: np.random.Generator, shape: tuple, dist: str = "exp") -> np.ndarray:
    """Mean-0, variance-1 multipliers from a NumPy generator (``exp``: Exp(1) − 1)."""
    if dist == "exp":
        return rng.standard_exponential(shape) - 1.0
    if dist == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), size=shape)
    a = -(np.sqrt(5.0) - 1.0) / 2.0
    b = (np.sqrt(5.0) + 1.0) / 2.0
    pa = (np.sqrt(5.0) + 1.0) / (2.0 * np.sqrt(5.0))
    return np.where(rng.random(shape) < pa, a, b)


def multipliers(ss: np.random.SeedSequence, n: int, n_rep: int) -> np.ndarray:
    """Exp(1) − 1 multipliers of one chunk (mean 0, variance 1), shape (n, n_rep)."""
    return wild_multipliers(np.random.default_rng(ss), (n, n_rep), "exp")


def bootstrap_chunks(task: Callable, n_rep: int, *, seed=None, given: Sequence | None = None, block: int = 0,
                     args: tuple = (), client=None, func: str = "nmfre_inference") -> list:
    """Run ``n_rep`` replicates in chunks of :data:`BOOT_CHUNK` as parallel tasks; their results in order.

    Parameters
    ----------
    task : callable
        ``task((source, n), *args)`` for one chunk of ``n`` replicates: ``source`` is the
        chunk's ``SeedSequence`` (``chunk_seed(seed_root(seed), block, c)``) or, with
        ``given``, the chunk's multipliers.
    n_rep : int
        Replicates in all.
    seed : int, SeedSequence, Generator or None
        Root of the chunk seeds (ignored with ``given``).
    given : callable or None
        ``given(b0, b1)`` → the multipliers of replicates ``[b0, b1)`` (drawn here, serially,
        in replicate order: the emulated R stream).
    block : int
        The column block whose chunks these are (0 for an unblocked fit).
    client : distributed.Client, False or None
        Where the chunks run (:func:`dnmf.engine.executor.get_executor`).
    """
    bounds = chunk_bounds(n_rep, BOOT_CHUNK)
    if given is not None:
        items = [(given(b0, b1), b1 - b0) for b0, b1 in bounds]
    else:
        root = seed_root(seed, func)
        items = [(chunk_seed(root, block, c), b1 - b0) for c, (b0, b1) in enumerate(bounds)]
    with executor_for(client) as ex:
        return list(ex.map(task, items, args=tuple(args)))
