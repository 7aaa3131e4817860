"""Data checks run once, before any iteration (CONVENTIONS §9).

:func:`check_data` reads the blocks of a :class:`~dnmf.io.blocks.BlockedMatrix` once (a
chunk → combine → aggregate reduction, on the executor's workers when one is given),
rejecting NaN/Inf and (unless allowed) negative entries with a count and an example position in
whole-matrix coordinates, and returns the summary the engine needs (‖A‖², used by the Gram
identity for the loss). :func:`check_rank` validates the rank against the matrix shape.

Sparse structure
----------------
The numba kernels trust the CSC triplets of a block: a row index ≥ m or a decreasing
``indptr`` makes them read and write outside their arrays (a crash or silent garbage). So the
structure is checked before any kernel runs, with vectorized NumPy on arrays already in memory:

* :func:`check_compressed` checks raw CSC/CSR arrays (``indptr`` length n + 1, starting at 0,
  non-decreasing, ``indptr[-1]`` ≤ the number of stored indices and values, indices in range).
  :func:`dnmf.io.as_blocked` runs it (and :func:`check_coo` for COO input) on the caller's arrays
  before SciPy converts them: SciPy's C++ conversions trust the indices too.
* :func:`check_block` runs the same checks on one :class:`~dnmf.io.blocks.CSCBlock`, plus its
  shape and canonical order (rows sorted and unique within each column; ``as_blocked`` sorts
  and sums duplicates, so only hand-built blocks or a tampered store can fail it).
  :func:`check_data` calls it on every block in its single pass, so an out-of-core store is
  checked block by block as it is read (on the workers), with no extra pass over the data. On
  20 M stored entries (20000 × 50000, 2 % dense) it takes ~16 ms, a sixth of the rest of the pass (~90 ms)
  and a few per cent of one iteration; the check of the caller's arrays in ``as_blocked``
  takes ~9 ms.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..exceptions import InputError, WorkerLostError
from .blocks import BlockedMatrix, CSCBlock

__all__ = ["DataSummary", "DataCheck", "check_data", "check_data_chunk", "check_data_combine", "check_data_agg",
           "check_rank", "check_block", "check_compressed", "check_indptr", "check_coo", "parse_error",
           "SAFE_MAX_RANGE", "data_scale"]


#: max|A| outside this range is brought to [0.5, 1) by an exact power-of-two scaling before the
#: fit. Above 2**300 the squared norm and the loss terms (~max²·m·n) overflow; below 2**-10 the
#: absolute 1e-15 guards of RcppML's scaling step (d = Σ|h| + 1e-15) are no longer negligible:
#: at max|A| = 1e-6 they move the factors by ~1 % (1e-15 / max|A| relative).
SAFE_MAX_RANGE = (2.0 ** -10, 2.0 ** 300)


def data_scale(max_abs: float) -> float:
    """The power of two ``s`` the fit multiplies A by: 1 inside :data:`SAFE_MAX_RANGE`.

    Otherwise ``s = 2**-e`` with ``max_abs = f·2**e``, f in [0.5, 1), so ``s·max_abs`` is in
    [0.5, 1). Multiplying by a power of two is exact in floating point (no rounding), so the
    fit of ``s·A`` with ``s·L1`` is the fit of A, with ``d`` scaled by ``s``.
    """
    lo, hi = SAFE_MAX_RANGE
    if not max_abs > 0 or lo <= max_abs <= hi:
        return 1.0
    _, e = math.frexp(max_abs)
    return math.ldexp(1.0, min(-e, 1023))  # 2**-1024 is subnormal but exact; 2**1024 would overflow


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
        count as entries (NaN entries do not).
    n_nan : int
        Number of NaN (missing) entries, 0 unless NaN was allowed.
    """

    sq_norm: float
    nnz: int
    n_negative: int
    min: float
    max: float
    n_nan: int = 0


def _first_position(mask: np.ndarray, block, col0: int):
    """(row, col, value) of the first True entry of ``mask`` in column-major order."""
    if isinstance(block, CSCBlock):
        k = int(np.flatnonzero(mask)[0])
        col = int(np.searchsorted(block.indptr, k, side="right")) - 1
        return int(block.indices[k]), col0 + col, block.data[k]
    cols, rows = np.nonzero(mask.T)  # transposed: ordered by column, then row
    r, c = int(rows[0]), int(cols[0])
    return r, col0 + c, block[r, c]


def parse_error(path: str, kind: str, cause) -> InputError:
    """The InputError for a file that could not be parsed as ``kind`` (``cause``: an exception or a reason)."""
    if isinstance(cause, BaseException):
        text = " ".join(str(cause).split()).rstrip(".") or type(cause).__name__
        if len(text) > 200:
            text = text[:197] + "..."
        cause = f"{type(cause).__name__}: {text}"
    return InputError(f"Could not read {path!r} as {kind}: {cause}. Check the file is complete, or re-export it.")


def _structure_error(what: str, fmt: str, shape, detail: str) -> InputError:
    m, n = (int(x) for x in shape)
    return InputError(f"{what} is not a valid {fmt.upper()} matrix of shape ({m}, {n}): {detail}.")


def _index_array(a, name: str, what: str, fmt: str, shape) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise _structure_error(what, fmt, shape, f"its {name} must be a 1-D integer array; got a {a.ndim}-D "
                                                 f"array of dtype {a.dtype} instead")
    return a


def _values_length(data, what: str, fmt: str, shape) -> int:
    ndim = np.ndim(data)
    if ndim != 1:
        raise _structure_error(what, fmt, shape, f"its data (values) must be a 1-D array; got a {ndim}-D array instead")
    return len(data)


def check_indptr(indptr, n_indices: int, n_values: int, shape, *, fmt: str = "csc",
                 what: str = "The sparse data A passed to as_blocked", col0: int = 0) -> int:
    """Check a CSC/CSR pointer array against the matrix shape and the stored entries.

    ``indptr`` must have n_major + 1 entries, start at 0, never decrease and end at most at
    ``n_indices`` and ``n_values`` (the lengths of the index and value arrays). Returns nnz,
    ``indptr[-1]``; see :func:`check_compressed` for the parameters.
    """
    m, n = (int(x) for x in shape)
    n_major = n if fmt == "csc" else m
    major = "column" if fmt == "csc" else "row"
    indptr = _index_array(indptr, "indptr", what, fmt, shape)
    if len(indptr) != n_major + 1:
        raise _structure_error(what, fmt, shape, f"its indptr must have {n_major} + 1 = {n_major + 1} entries "
                                                 f"(one per {major}, plus one); got {len(indptr)} instead")
    if indptr[0] != 0:
        raise _structure_error(what, fmt, shape, f"its indptr must start at 0; got indptr[0] = {indptr[0]} instead")
    decreasing = indptr[1:] < indptr[:-1]
    if decreasing.any():
        c = int(np.argmax(decreasing))
        raise _structure_error(
            what, fmt, shape,
            f"its indptr must be non-decreasing ({major} c holds the entries indptr[c]:indptr[c + 1]); got "
            f"indptr[{col0 + c + 1}] = {indptr[c + 1]} < indptr[{col0 + c}] = {indptr[c]} instead",
        )
    nnz = int(indptr[-1])
    if nnz > int(n_indices) or nnz > int(n_values):
        raise _structure_error(
            what, fmt, shape,
            f"its indptr ends at {nnz}, the number of stored entries, so it needs at least {nnz} indices and "
            f"values; got {int(n_indices)} indices and {int(n_values)} values instead",
        )
    return nnz


def check_compressed(indptr, indices, data, shape, *, fmt: str = "csc",
                     what: str = "The sparse data A passed to as_blocked", col0: int = 0) -> int:
    """Check the structure of CSC or CSR arrays before anything indexes with them.

    Parameters
    ----------
    indptr : 1-D integer array of shape (n_major + 1,)
        Pointer array: n_major is the number of columns (CSC) or rows (CSR).
    indices : 1-D integer array
        Minor index of each stored entry (row for CSC, column for CSR).
    data : 1-D array
        The stored values (only its length is used).
    shape : (m, n)
        Shape of the matrix.
    fmt : {"csc", "csr"}
    what : str
        Subject of the error message ("The sparse data A passed to nmf", "The Zarr store '…'").
    col0 : int
        Offset added to major positions in messages (a block's first column in the matrix).

    Returns
    -------
    int
        nnz, ``indptr[-1]``.

    Raises
    ------
    InputError
        If ``indptr`` does not have n_major + 1 entries, does not start at 0, decreases, or ends
        beyond the stored indices or values, or if an index is negative or ≥ n_minor. The message
        names the array, what was expected and the first offending position.

    Notes
    -----
    Vectorized NumPy: a comparison over ``indptr`` and a min/max over ``indices``; positions are
    only searched for once an error is known.
    """
    m, n = (int(x) for x in shape)
    n_minor = m if fmt == "csc" else n
    major, minor = ("column", "row") if fmt == "csc" else ("row", "column")
    indices = _index_array(indices, "indices", what, fmt, shape)
    nnz = check_indptr(indptr, len(indices), _values_length(data, what, fmt, shape), shape, fmt=fmt, what=what,
                       col0=col0)
    indptr = np.asarray(indptr)
    if nnz:
        idx = indices[:nnz]
        if int(idx.min()) < 0 or int(idx.max()) >= n_minor:
            bad = (idx < 0) | (idx >= n_minor)
            k = int(np.argmax(bad))
            c = int(np.searchsorted(indptr, k, side="right")) - 1
            raise _structure_error(
                what, fmt, shape,
                f"its indices must be {minor} indices in [0, {n_minor}); found {int(np.count_nonzero(bad))} out of "
                f"range, e.g. {minor} index {idx[k]} in {major} {col0 + c}",
            )
    return nnz


def check_coo(row, col, data, shape, *, what: str = "The sparse data A passed to as_blocked") -> None:
    """Check COO coordinates: equal lengths and every (row, col) inside ``shape``.

    Raises
    ------
    InputError
        If the coordinate arrays are not 1-D integer arrays of the length of the values, or a
        coordinate is negative or ≥ the dimension it indexes.
    """
    m, n = (int(x) for x in shape)
    row = _index_array(row, "row coordinates", what, "coo", shape)
    col = _index_array(col, "column coordinates", what, "coo", shape)
    n_values = _values_length(data, what, "coo", shape)
    if not len(row) == len(col) == int(n_values):
        raise _structure_error(what, "coo", shape, f"its row and column coordinates and values must have the same "
                                                   f"length; got {len(row)}, {len(col)} and {int(n_values)} instead")
    for name, coords, size in (("row", row, m), ("column", col, n)):
        if len(coords) and (int(coords.min()) < 0 or int(coords.max()) >= size):
            bad = (coords < 0) | (coords >= size)
            k = int(np.argmax(bad))
            raise _structure_error(
                what, "coo", shape,
                f"its {name} coordinates must be in [0, {size}); found {int(np.count_nonzero(bad))} out of range, "
                f"e.g. entry {k} at ({row[k]}, {col[k]})",
            )


def check_block(block, n_rows: int, n_cols: int, *, col0: int = 0, func: str = "nmf") -> None:
    """Check one block of A before a kernel sees it: its shape and, for a CSC block, its structure.

    Parameters
    ----------
    block : CSCBlock or ndarray
        As returned by a :class:`~dnmf.io.blocks.BlockSource`.
    n_rows, n_cols : int
        The shape the block must have (m and the source's ``n_cols``).
    col0 : int
        The block's first column in the whole matrix (for messages).
    func : str
        Name of the calling function.

    Raises
    ------
    InputError
        Wrong shape or type; a CSC structure :func:`check_compressed` rejects; rows unsorted or
        repeated within a column (a CSCBlock must be in canonical form: the loss uses Σ data²).
    """
    what = f"The data A passed to {func}"
    if isinstance(block, CSCBlock):
        shape = (int(block.n_rows), len(block.indptr) - 1)
    elif isinstance(block, np.ndarray):
        shape = block.shape
    else:
        raise InputError(f"{what} must be read as CSCBlock or ndarray blocks; got a block of type "
                         f"{type(block).__module__}.{type(block).__qualname__} for columns {col0}:{col0 + n_cols} instead.")
    if tuple(shape) != (n_rows, n_cols):
        raise InputError(f"{what} has a block (columns {col0}:{col0 + n_cols}) of shape {tuple(shape)}; "
                         f"expected ({n_rows}, {n_cols}).")
    if not isinstance(block, CSCBlock):
        return
    block_what = f"{what} (block of columns {col0}:{col0 + n_cols})"
    nnz = check_compressed(block.indptr, block.indices, block.data, shape, fmt="csc", what=block_what,
                           col0=col0)
    if nnz > 1:
        idx = block.indices[:nnz]
        increasing = idx[1:] > idx[:-1]
        starts = block.indptr[1:-1]
        increasing[starts[(starts > 0) & (starts < nnz)] - 1] = True  # a new column may restart low
        if not increasing.all():
            k = int(np.argmin(increasing)) + 1
            c = int(np.searchsorted(block.indptr, k, side="right")) - 1
            raise _structure_error(
                block_what, "csc", shape,
                f"its rows must be sorted and unique within each column (canonical form, as "
                f"scipy.sparse's sum_duplicates() leaves them); column {col0 + c} lists row {idx[k]} after row "
                f"{idx[k - 1]}",
            )


@dataclass(frozen=True)
class DataCheck:
    """What :func:`check_data_chunk` learns from some blocks; merged by :func:`check_data_combine`.

    A small record (a few numbers and one float per block), so the reduction ships almost
    nothing between workers.

    Attributes
    ----------
    error : InputError or None
        The first error (block order) raised while reading or structurally checking a block.
    n_bad, bad_at : int, (row, col, value) or None
        NaN/Inf count and the first one (column-major order, whole-matrix coordinates).
    n_nan, inf_at : int, (row, col, value) or None
        NaN count (of n_bad) and the first ±Inf entry.
    n_negative, negative_at : int, (row, col, value) or None
        The same for negative entries.
    sq_norms : tuple of float
        ‖A_j‖² of each block, in block order: the aggregate sums them left to right, so ‖A‖²
        is bitwise that of a serial pass whatever the reduction tree.
    nnz : int
        Non-zero entries.
    min, max : float
        Smallest and largest entry (implicit zeros included); ±inf when no block was summarized.
    """

    error: InputError | None = None
    n_bad: int = 0
    bad_at: tuple | None = None
    n_negative: int = 0
    negative_at: tuple | None = None
    sq_norms: tuple = ()
    nnz: int = 0
    min: float = np.inf
    max: float = -np.inf
    n_nan: int = 0
    inf_at: tuple | None = None

    def __sizeof__(self) -> int:  # dask's sizeof (see io/blocks.py::CSCBlock.__sizeof__)
        return 200 + 8 * len(self.sq_norms)


def _first(mask: np.ndarray, block, col0: int) -> tuple[int, tuple | None]:
    n = int(np.count_nonzero(mask))
    return n, (_first_position(mask, block, col0) if n else None)


def check_data_chunk(source, col0: int, n_rows: int, func: str = "nmf") -> DataCheck:
    """Chunk step of :func:`check_data`: read block ``source`` (columns from ``col0``) and check it.

    A read or structure error (an InputError from ``source.load()`` or :func:`check_block`) is
    returned in the record, not raised, so the aggregate can raise the first one in block order.
    NaN entries are counted apart from ±Inf (the aggregate decides whether they are allowed);
    the norm, nnz and range are those of the other entries.
    """
    try:
        block = source.load()
        check_block(block, n_rows, int(source.n_cols), col0=col0, func=func)
    except InputError as exc:
        return DataCheck(error=exc)
    if isinstance(block, CSCBlock):
        values = block.data[: block.nnz]
        implicit_zeros = block.nnz < n_rows * block.shape[1]
    else:
        values = np.asarray(block)
        implicit_zeros = False
    nan = np.isnan(values)
    n_nan = int(np.count_nonzero(nan))
    n_bad, bad_at = _first(~np.isfinite(values), block, col0)
    n_inf, inf_at = (n_bad - n_nan, _first(np.isinf(values), block, col0)[1]) if n_nan else (n_bad, bad_at)
    if n_nan:
        values = np.where(nan, 0.0, values).astype(values.dtype, copy=False)
    n_negative, negative_at = _first(values < 0, block, col0)
    sq_norm, nnz, lo, hi = 0.0, 0, np.inf, -np.inf
    if n_inf == 0 and values.size:
        flat = values.reshape(-1) if values.flags.c_contiguous else values.ravel(order="K")
        sq_norm = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
        nnz = int(np.count_nonzero(flat))
        lo, hi = float(flat.min()), float(flat.max())
        if n_nan and n_nan == flat.size:  # only NaN: no observed value
            lo, hi = np.inf, -np.inf
    if implicit_zeros:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return DataCheck(n_bad=n_bad, bad_at=bad_at, n_negative=n_negative, negative_at=negative_at,
                     sq_norms=(sq_norm,), nnz=nnz, min=lo, max=hi, n_nan=n_nan, inf_at=inf_at)


def check_data_combine(a: DataCheck, b: DataCheck) -> DataCheck:
    """Combine step of :func:`check_data`: merge the records of neighbouring runs of blocks
    (``a`` before ``b``), keeping the first error and the first offending entries of ``a``."""
    return DataCheck(
        error=a.error if a.error is not None else b.error,
        n_bad=a.n_bad + b.n_bad,
        bad_at=a.bad_at if a.n_bad else b.bad_at,
        n_negative=a.n_negative + b.n_negative,
        negative_at=a.negative_at if a.n_negative else b.negative_at,
        sq_norms=a.sq_norms + b.sq_norms,
        nnz=a.nnz + b.nnz,
        min=min(a.min, b.min),
        max=max(a.max, b.max),
        n_nan=a.n_nan + b.n_nan,
        inf_at=a.inf_at if a.n_bad - a.n_nan else b.inf_at,
    )


def check_data_agg(record: DataCheck, *, func: str = "nmf", allow_negative: bool = False,
                   allow_nan: bool = False) -> DataSummary:
    """Aggregate step of :func:`check_data`: raise the first error, or return the summary."""
    if record.error is not None:
        raise record.error
    n_bad = record.n_bad - (record.n_nan if allow_nan else 0)
    if n_bad:
        row, col, value = record.inf_at if allow_nan else record.bad_at
        what = "Inf" if allow_nan else "NaN/Inf"
        raise InputError(
            f"The data A passed to {func} must be finite{' (NaN marks a missing entry)' if allow_nan else ''}: "
            f"A contains {n_bad} {what} value(s), e.g. at ({row}, {col}) where A[{row}, {col}] = {value}."
        )
    if record.n_negative and not allow_negative:
        row, col, value = record.negative_at
        raise InputError(
            f"The data A passed to {func} must be non-negative; found {record.n_negative} negative entries, "
            f"e.g. A[{row}, {col}] = {value}."
        )
    sq_norm = 0.0
    for part in record.sq_norms:  # left to right, as a serial pass adds them
        sq_norm += part
    return DataSummary(sq_norm=sq_norm, nnz=record.nnz, n_negative=record.n_negative, min=record.min,
                       max=record.max, n_nan=record.n_nan)


def check_data(blocked: BlockedMatrix, *, func: str = "nmf", allow_negative: bool = False,
               allow_nan: bool = False, executor=None) -> DataSummary:
    """Check A for NaN/Inf and negative entries in one pass and summarize it.

    A chunk → combine → aggregate reduction (:func:`check_data_chunk`,
    :func:`check_data_combine`, :func:`check_data_agg`): each block is read and checked once,
    by the executor's workers when one is given, so an out-of-core store is checked where it is
    read and only a small :class:`DataCheck` record per block travels.

    Parameters
    ----------
    blocked : BlockedMatrix of shape (m, n)
        The data, as returned by :func:`dnmf.io.as_blocked`.
    func : str, default "nmf"
        Name of the calling function, used in error messages.
    allow_negative : bool, default False
        Accept negative entries (counted in ``n_negative``).
    allow_nan : bool, default False
        Accept NaN entries (missing values; counted in ``n_nan``, left out of the norm and range).
    executor : Executor or None, default None
        Where the blocks are checked (:mod:`dnmf.engine.executor`: ``map_blocks`` then
        ``tree_reduce`` in block order). None: serially here, stopping at the first block with
        a read or structure error. Blocks a distributed executor would only receive from this
        process (``blocked.in_memory``) are checked here too: shipping them to the workers just
        to check them would send A over the network once more. The summary and any error are
        the same on every path.

    Returns
    -------
    DataSummary

    Raises
    ------
    InputError
        If A has NaN or Inf entries, or negative entries when they are not allowed. The message
        gives the number of offending entries and the first one (in column-major order) as
        ``A[row, col]`` in whole-matrix coordinates. Also, for the first such block, if a block
        cannot be read, has the wrong shape or a CSC block a broken structure (see
        :func:`check_block`); this error comes first.
    WorkerLostError
        If workers are lost more than ``executor.max_recoveries`` times during the check.

    Examples
    --------
    >>> import numpy as np
    >>> from dnmf.io import as_blocked
    >>> from dnmf.io.validate import check_data
    >>> check_data(as_blocked(np.array([[0.0, 3.0], [4.0, 0.0]]))).sq_norm
    25.0
    """
    m = int(blocked.shape[0])
    sources = list(blocked.sources)
    col0s = [int(c) for c in blocked.col_bounds[:-1]]
    if executor is None or (getattr(executor, "distributed", False) and blocked.in_memory):
        record = DataCheck()
        for source, col0 in zip(sources, col0s):
            part = check_data_chunk(source, col0, m, func)
            if part.error is not None:
                raise part.error  # stop at the first unreadable or malformed block
            record = check_data_combine(record, part)
    else:
        for attempt in range(int(getattr(executor, "max_recoveries", 0)) + 1):
            try:
                record = executor.tree_reduce(check_data_combine,
                                              executor.map_blocks(check_data_chunk, sources, col0s, args=(m, func)))
                break
            except WorkerLostError:  # the check is idempotent: run it again on the live workers
                if attempt == int(getattr(executor, "max_recoveries", 0)):
                    raise
    return check_data_agg(record, func=func, allow_negative=allow_negative, allow_nan=allow_nan)


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
