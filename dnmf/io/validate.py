"""Data checks run once, before any iteration (CONVENTIONS §9).

:func:`check_data` streams over the blocks of a :class:`~dnmf.io.blocks.BlockedMatrix` once,
rejecting NaN/Inf and (unless allowed) negative entries with a count and an example position in
whole-matrix coordinates, and returns the summary the engine needs (‖A‖², used by the Gram
identity for the loss). :func:`check_rank` validates the rank against the matrix shape.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..exceptions import InputError
from .blocks import BlockedMatrix, CSCBlock

__all__ = ["DataSummary", "check_data", "check_rank"]


@dataclass(frozen=True)
class DataSummary:
    """What one pass over A learns.

    Attributes
    ----------
    sq_norm : float
        ‖A‖²_F, the sum of squares of all entries, accumulated in float64.
    nnz : int
        Number of non-zero entries.
    n_negative : int
        Number of negative entries (0 unless negatives were allowed).
    min, max : float
        Smallest and largest entry of the m × n matrix; implicit zeros of a sparse matrix
        count as entries.
    """

    sq_norm: float
    nnz: int
    n_negative: int
    min: float
    max: float


@dataclass
class _Found:
    """Count of offending entries and the first one (column-major order) with its value."""

    count: int = 0
    row: int = -1
    col: int = -1
    value: object = None

    def add(self, mask: np.ndarray, block, col0: int) -> None:
        n = int(np.count_nonzero(mask))
        if n and self.count == 0:
            self.row, self.col, self.value = _first_position(mask, block, col0)
        self.count += n


def _first_position(mask: np.ndarray, block, col0: int):
    """(row, col, value) of the first True entry of ``mask`` in column-major order."""
    if isinstance(block, CSCBlock):
        k = int(np.flatnonzero(mask)[0])
        col = int(np.searchsorted(block.indptr, k, side="right")) - 1
        return int(block.indices[k]), col0 + col, block.data[k]
    cols, rows = np.nonzero(mask.T)  # transposed: ordered by column, then row
    r, c = int(rows[0]), int(cols[0])
    return r, col0 + c, block[r, c]


def check_data(blocked: BlockedMatrix, *, func: str = "nmf", allow_negative: bool = False) -> DataSummary:
    """Check A for NaN/Inf and negative entries in one pass and summarize it.

    Parameters
    ----------
    blocked : BlockedMatrix of shape (m, n)
        The data, as returned by :func:`dnmf.io.as_blocked`.
    func : str, default "nmf"
        Name of the calling function, used in error messages.
    allow_negative : bool, default False
        Accept negative entries (counted in ``n_negative``).

    Returns
    -------
    DataSummary

    Raises
    ------
    InputError
        If A has NaN or Inf entries, or negative entries when they are not allowed. The message
        gives the number of offending entries and the first one (in column-major order) as
        ``A[row, col]`` in whole-matrix coordinates.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.io import as_blocked
    >>> from dnmf.io.validate import check_data
    >>> check_data(as_blocked(np.array([[0.0, 3.0], [4.0, 0.0]]))).sq_norm
    25.0
    """
    m, _ = blocked.shape
    sq_norm = 0.0
    nnz = 0
    lo, hi = np.inf, -np.inf
    bad = _Found()
    neg = _Found()
    col0 = 0
    for block in blocked.iter_blocks():
        if isinstance(block, CSCBlock):
            values = block.data
            implicit_zeros = block.nnz < m * block.shape[1]
        else:
            values = np.asarray(block)
            implicit_zeros = False
        finite = np.isfinite(values)
        bad.add(~finite, block, col0)
        neg.add(values < 0, block, col0)
        if bad.count == 0 and values.size:
            flat = values.reshape(-1) if values.flags.c_contiguous else values.ravel(order="K")
            sq_norm += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
            nnz += int(np.count_nonzero(flat))
            lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
        if implicit_zeros:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        col0 += block.shape[1]
    if bad.count:
        raise InputError(
            f"The data A passed to {func} must be finite: A contains {bad.count} NaN/Inf value(s), "
            f"e.g. at ({bad.row}, {bad.col}) where A[{bad.row}, {bad.col}] = {bad.value}."
        )
    if neg.count and not allow_negative:
        raise InputError(
            f"The data A passed to {func} must be non-negative; found {neg.count} negative entries, "
            f"e.g. A[{neg.row}, {neg.col}] = {neg.value}."
        )
    return DataSummary(sq_norm=sq_norm, nnz=nnz, n_negative=neg.count, min=lo, max=hi)


def check_rank(k, shape: tuple[int, int], func: str = "nmf") -> int:
    """Return the rank ``k`` as an int if it is an integer in [1, min(m, n)].

    Parameters
    ----------
    k : int
        Requested rank (Python or NumPy integer; bool is rejected).
    shape : (m, n)
        Shape of A.
    func : str, default "nmf"
        Name of the calling function, used in error messages.

    Raises
    ------
    InputError
        "The 'k' parameter of nmf must be an int in the range [1, min(m, n)] = [1, 20] for a
        20 × 30 matrix. Got 25 instead."
    """
    m, n = (int(s) for s in shape)
    high = min(m, n)
    ok = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)) and 1 <= k <= high
    if not ok:
        got = int(k) if isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)) else repr(k)
        raise InputError(
            f"The 'k' parameter of {func} must be an int in the range [1, min(m, n)] = [1, {high}] "
            f"for a {m} × {n} matrix. Got {got} instead."
        )
    return int(k)
