"""The block container of blocked NMF-RE and its per-block tasks (shared by both engines).

:class:`REBlock` (one column block of Y and A), the chunk functions on one block, the
:class:`BlockedData` backend that runs them through the executor, and the result type
:class:`NMFREBlockedResult`. :mod:`dnmf.mixed.blocks` (the df-cap engine and the public
:func:`~dnmf.mixed.blocks.nmfre_blocked`) and :mod:`dnmf.mixed.ecm_blocked` (engine "ecm")
both build on it, so neither imports the other's module in a cycle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .._validation import param_error
from ..exceptions import DnmfError
from ..io.blocks import BlockedMatrix, CSCBlock
from ..covariates._common import ridge_solve
from .inference import chunk_seed, multipliers, score_matrix
from .result import NMFREResult

logger = logging.getLogger(__name__)


__all__ = ["BlockedData", "REBlock", "NMFREBlockedResult", "split_columns"]



# ---------------------------------------------------------------------------------------------
# Block container and per-block tasks (chunk functions; NumPy on one block)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class REBlock:
    """One column block: the source of ``Y_j`` (P × n_j) and ``A_j`` (K × n_j)."""

    y: Any
    a: np.ndarray

    def load(self) -> np.ndarray:
        b = self.y.load() if hasattr(self.y, "load") else self.y
        if isinstance(b, CSCBlock):
            b = b.toarray()
        return np.asarray(b, dtype=np.float64)

    def __sizeof__(self) -> int:  # dask's sizeof (see io/blocks.py::CSCBlock.__sizeof__)
        from dask.sizeof import sizeof

        return int(sizeof(self.y) + self.a.nbytes + 64)


def _add(a, b):
    """combine: elementwise sum of two tuples of partials."""
    return tuple(x + y for x, y in zip(a, b))


def constants_chunk(blk: REBlock):
    """Data checks and constant statistics of one block."""
    Y = blk.load()
    A = blk.a
    finite = np.isfinite(Y)
    n_bad = int(Y.size - finite.sum())
    has_negative = bool(np.any(Y[finite] < 0))
    return (
        Y.sum(axis=1),  # row sums of Y (P)
        A.sum(axis=1),  # row sums of A (K)
        float(np.sum(Y * Y)),
        Y @ A.T,  # P × K
        A @ A.T,  # K × K
        np.array([n_bad, float(has_negative)]),  # non-finite values, blocks with negatives
    )


def zeros_chunk(blk: REBlock, q: int) -> np.ndarray:
    return np.zeros((q, blk.a.shape[1]))


def u_chunk(blk: REBlock, X, C, L, ubar):
    """U step on one block; returns (U_j, (YB⁺ᵀ, B⁺B⁺ᵀ, ‖U_j‖²)).

    ``Xᵀ(Y_j − XΘA_j)`` is formed as ``XᵀY_j − (XᵀX)ΘA_j``: no P × n_j temporary.
    """
    Y = blk.load()
    CA = C @ blk.a
    U = ridge_solve(L, X.T @ Y - (X.T @ X) @ CA) - ubar[:, None]
    Bp = np.maximum(CA + U, 0.0)
    return U, (Y @ Bp.T, Bp @ Bp.T, float(np.sum(U * U)))


def c_chunk(blk: REBlock, U, X, d):
    """Normalise U_j by D; return (DU_j, (Xᵀmax(Y_j − XU_j,0)A_jᵀ, Y_jU_jᵀ, U_jU_jᵀ, A_jU_jᵀ))."""
    Y = blk.load()
    U = U * d[:, None]
    num = X.T @ np.maximum(Y - X @ U, 0.0) @ blk.a.T
    return U, (num, Y @ U.T, U @ U.T, blk.a @ U.T)


def scale_chunk(U, d):
    return U * d[:, None]


def permute_chunk(U, order):
    return U[order, :]


def final_chunk(blk: REBlock, U, X, C, ymean, ymean_rows):
    """Sums for the R² variants of the BLUP and fixed fits on one block."""
    Y = blk.load()
    F = X @ (C @ blk.a)
    Fb = F + X @ U
    out = []
    for f in (Fb, F):
        r = Y - f
        out += [float(np.sum(r * r)), float(f.sum()), float(np.sum(f * f)), float(np.sum(Y * f))]
    dy = Y - ymean
    dr = Y - ymean_rows[:, None]
    out += [float(np.sum(dy * dy)), float(np.sum(dr * dr))]
    return np.array(out)


def infer_chunk(blk: REBlock, U, j, X, C, root, bounds, W=None):
    """Inference partials of one block: (RSS_j, S̃_jS̃_jᵀ, S̃_jW_j)."""
    Y = blk.load()
    R = Y - X @ U - X @ (C @ blk.a)
    S = score_matrix(X, R, blk.a)
    if W is not None:
        SW = S @ W
    elif bounds:
        SW = np.concatenate([S @ multipliers(chunk_seed(root, j, c), S.shape[1], b1 - b0)
                             for c, (b0, b1) in enumerate(bounds)], axis=1)
    else:
        SW = np.zeros((S.shape[0], 0))
    return (float(np.sum(R * R)), S @ S.T, SW)


# ---------------------------------------------------------------------------------------------
# The data backend of fit_cap
# ---------------------------------------------------------------------------------------------


def split_columns(A: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Column blocks ``A[:, bounds[j]:bounds[j+1]]`` (contiguous copies)."""
    return [np.ascontiguousarray(A[:, bounds[j]:bounds[j + 1]]) for j in range(len(bounds) - 1)]


class BlockedData:
    """Engine-A data backend over an executor: blocks and U_j stay where they were computed."""

    def __init__(self, executor, Y: BlockedMatrix, A: np.ndarray):
        self.ex = executor
        self.bounds = Y.col_bounds
        self.n_features, self.n_samples = Y.shape
        a_blocks = split_columns(A, self.bounds)
        self.blocks = executor.put_blocks([REBlock(src, a) for src, a in zip(Y.sources, a_blocks)])
        parts = executor.map_blocks(constants_chunk, self.blocks)
        ysum, asum, ysq, YAt, AAt, checks = executor.tree_reduce(_add, parts)
        if checks[0] > 0:
            raise param_error("Y", "nmfre_blocked", "finite (no NaN or Inf)", f"{int(checks[0])} non-finite values")
        if checks[1] > 0:
            raise param_error("Y", "nmfre_blocked", "non-negative", f"negative values in {int(checks[1])} block(s)")
        N = self.n_samples
        self.ymean_rows = ysum / N
        self.amean = asum / N
        self.ysum = float(ysum.sum())
        self.ysq = ysq
        self.YAt = YAt
        self.AAt = AAt
        self.U = None
        self._gram = None

    def set_u(self, U: Optional[np.ndarray], q: int) -> None:
        """Place the starting U (Q × N; zeros when None) block by block."""
        old = self.U
        if U is None:
            self.U = self.ex.map_blocks(zeros_chunk, self.blocks, args=(q,))
        else:
            self.U = self.ex.put_blocks(split_columns(U, self.bounds))
        if old is not None:
            self.ex.release(old)

    def _swap_u(self, outs):
        old = self.U
        self.U = [o[0] for o in outs]
        stats = self.ex.tree_reduce(_add, [o[1] for o in outs])
        if old is not None:
            self.ex.release(old)
        return stats

    def scale_u(self, d: np.ndarray) -> None:
        """U ← DU (the normalisation before the loop)."""
        old = self.U
        self.U = self.ex.map_blocks(scale_chunk, self.U, args=(d,))
        self.ex.release(old)

    def u_step(self, X, C, L):
        ubar = ridge_solve(L, X.T @ (self.ymean_rows - X @ (C @ self.amean)))
        outs = self.ex.map_blocks(u_chunk, self.blocks, args=(X, C, L, ubar), n_out=2)
        return self._swap_u(outs)

    def c_step(self, X, d):
        outs = self.ex.map_blocks(c_chunk, self.blocks, self.U, args=(X, d), n_out=2)
        num, YUt, UUt, AUt = self._swap_u(outs)
        self._gram = (YUt, UUt, AUt)
        return num

    def rss(self, X, C):
        """``‖Y − X(CA+U)‖²`` by the Gram identity, and ``‖U‖²``, from the last c_step."""
        YUt, UUt, AUt = self._gram
        YBt = self.YAt @ C.T + YUt
        CAUt = C @ AUt
        BBt = C @ self.AAt @ C.T + CAUt + CAUt.T + UUt
        rss = self.ysq - 2.0 * float(np.sum(X * YBt)) + float(np.sum((X.T @ X) * BBt))
        return max(rss, 0.0), float(np.trace(UUt))

    def permute_u(self, order: np.ndarray) -> None:
        old = self.U
        self.U = self.ex.map_blocks(permute_chunk, self.U, args=(order,))
        self.ex.release(old)

    def final_sums(self, X, C) -> np.ndarray:
        mean = self.ysum / (self.n_features * self.n_samples)
        return self.ex.tree_reduce(_add1, self.ex.map_blocks(final_chunk, self.blocks, self.U,
                                                             args=(X, C, mean, self.ymean_rows)))

    def gather_u(self) -> np.ndarray:
        return np.concatenate(self.ex.gather(self.U), axis=1)


def _add1(a, b):
    return a + b


# ---------------------------------------------------------------------------------------------
# Result and public function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NMFREBlockedResult(NMFREResult):
    """An NMF-RE fit on a column-blocked Y: an :class:`NMFREResult` without its N-sized fields
    (U stays on the workers unless ``gather_U=True``).

    Every field of :class:`dnmf.mixed.NMFREResult` (engine "cap" or "ecm") is set as there —
    for "ecm" also ``outer_iter``, ``outer_maxit``, ``nll_trace``, ``X_prob`` and ``X_cluster`` —
    except:

    Attributes
    ----------
    U : ndarray of shape (Q, N) or None
        Gathered random effects (``gather_U=True``), else None.
    B, B_prob, B_blup, B_blup_pos, B_blup_prob, XB, XB_blup : None
        Not computed (N-sized); ``X_prob`` and ``X_cluster`` only for "ecm" (spec §5.4).
    call : str
        Empty.

    and adds:

    U_blocks : list
        Executor handles of the U blocks (Q × n_j each, column order of Y's blocks); valid
        while the client that made them is open.
    col_bounds : ndarray of shape (n_blocks + 1,)
    iter_times : ndarray of shape (n_iter,)
        Wall time of each iteration (s).
    timings : dict
        Wall time (s) of the phases ``place_and_constants``, ``initialiser``, ``fit`` (with the
        scan when ``df_rate=None``), ``finalise`` and ``inference``.
    """

    U_blocks: list = field(repr=False)
    col_bounds: np.ndarray = field(repr=False)
    iter_times: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    timings: dict = field(default_factory=dict)
    B: Optional[np.ndarray] = None
    B_prob: Optional[np.ndarray] = None
    B_blup: Optional[np.ndarray] = None
    B_blup_pos: Optional[np.ndarray] = None
    B_blup_prob: Optional[np.ndarray] = None
    XB: Optional[np.ndarray] = None
    XB_blup: Optional[np.ndarray] = None
    X_prob: Optional[np.ndarray] = None
    X_cluster: Optional[np.ndarray] = None
    dfU_cap_scan: Any = field(default=None, repr=False)

    __str__ = object.__str__  # the dataclass repr: the R print needs the in-memory fit

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(P, N, Q, K)."""
        return (self.X.shape[0], int(self.col_bounds[-1]), self.X.shape[1], self.C.shape[1])

    def fitted(self, type: str = "blup") -> np.ndarray:  # noqa: A002 - R's argument name
        raise DnmfError("nmfre_blocked keeps no P × N fit; use predict(new_A) or gather U (gather_U=True).")

    def residuals(self, Y, type: str = "blup") -> np.ndarray:  # noqa: A002
        raise DnmfError("nmfre_blocked keeps no P × N fit; use predict(new_A) or gather U (gather_U=True).")


def _r2(sse, sf, sff, syf, sy, syy, n, sst_grand, sst_row):
    cov = syf - sy * sf / n
    vy = syy - sy * sy / n
    vf = sff - sf * sf / n
    cor2 = cov * cov / (vy * vf) if vy > 0 and vf > 0 else float("nan")
    return {"grand": 1 - sse / sst_grand, "cor2": cor2, "uncentered": 1 - sse / syy, "centered": 1 - sse / sst_row}
