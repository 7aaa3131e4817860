"""Bad input to the data layer raises InputError naming what is wrong, never a crash.

The numba kernels and SciPy's C++ conversions trust sparse indices, so a malformed matrix would
crash the interpreter (a SIGSEGV kills pytest, so every test here also proves the check runs
before any kernel). Covered: sparse structure in memory and in Zarr groups (and a property test
over random malformations), missing Zarr chunks, and truncated or corrupt files. Malformed SciPy
matrices are built valid and then mutated in place: SciPy checks only on construction.
"""

from __future__ import annotations

import ast
import gzip
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnmf
from dnmf.exceptions import ConvergenceWarning, InputError
from dnmf.io import BlockedMatrix, CSCBlock, InMemorySource, as_blocked, write_zarr
from dnmf.io.validate import check_block, check_compressed, check_data


def _base(m=6, n=5, seed=0) -> sp.csc_array:
    """A small valid CSC matrix with every column holding 2 entries (nnz = 2n)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.sort(rng.choice(m, 2, replace=False)) for _ in range(n)])
    data = rng.uniform(0.5, 2.0, size=2 * n)
    return sp.csc_array((data, rows, np.arange(0, 2 * n + 1, 2)), shape=(m, n))


def _fit(A):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # two iterations: the fit itself is not under test
        return dnmf.nmf(A, 2, client=False, maxit=2, seed=0)


# ---------------------------------------------------------------------------------------------
# Sparse structure in memory
# ---------------------------------------------------------------------------------------------

_CSC = r"The sparse data A passed to as_blocked is not a valid CSC matrix of shape \(6, 5\): "
_CSR = r"The sparse data A passed to as_blocked is not a valid CSR matrix of shape \(6, 5\): "
_COO = r"The sparse data A passed to as_blocked is not a valid COO matrix of shape \(6, 5\): "


def _set(arr, k, value):
    arr[k] = value
    return arr


@pytest.mark.parametrize("container", [sp.csc_matrix, sp.csc_array])
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x: _set(x.indices, 3, 6), _CSC + r"its indices must be row indices in \[0, 6\); found 1 out of range, "
                                                 r"e.g. row index 6 in column 1.$"),
        (lambda x: _set(x.indices, 0, -2), _CSC + r"its indices must be row indices in \[0, 6\); found 1 out of "
                                                  r"range, e.g. row index -2 in column 0.$"),
        (lambda x: _set(x.indptr, 2, 9),
         _CSC + r"its indptr must be non-decreasing \(column c holds the entries indptr\[c\]:indptr\[c \+ 1\]\); "
                r"got indptr\[3\] = 6 < indptr\[2\] = 9"),
        (lambda x: setattr(x, "indptr", x.indptr[:-1]),
         _CSC + r"its indptr must have 5 \+ 1 = 6 entries \(one per column, plus one\); got 5 instead.$"),
        (lambda x: _set(x.indptr, 5, 12), _CSC + r"its indptr ends at 12, the number of stored entries, so it needs "
                                                 r"at least 12 indices and values; got 10 indices and 10 values"),
        (lambda x: _set(x.indptr, 0, 1), _CSC + r"its indptr must start at 0; got indptr\[0\] = 1 instead.$"),
        (lambda x: setattr(x, "indices", x.indices.astype(np.float64)),
         _CSC + r"its indices must be a 1-D integer array; got a 1-D array of dtype float64"),
    ],
    ids=["row-too-large", "row-negative", "indptr-decreasing", "indptr-short", "indptr-past-nnz", "indptr-start",
         "float-indices"],
)
def test_malformed_csc_raises_before_any_conversion(container, mutate, message):
    x = container(_base())
    mutate(x)
    with pytest.raises(InputError, match=message):
        as_blocked(x)
    with pytest.raises(InputError, match=message):
        _fit(x)


@pytest.mark.parametrize("container", [sp.csr_matrix, sp.csr_array])
def test_malformed_csr_names_columns(container):
    x = container(_base())  # 6 × 5 CSR: indices are column indices in [0, 5)
    x.indices[4] = 5
    row = int(np.searchsorted(x.indptr, 4, side="right")) - 1
    with pytest.raises(InputError, match=_CSR + rf"its indices must be column indices in \[0, 5\); found 1 out of "
                                                rf"range, e.g. column index 5 in row {row}.$"):
        as_blocked(x)
    x = container(_base())
    x.indptr[1:] = x.indptr[1:][::-1]
    with pytest.raises(InputError, match=_CSR + r"its indptr must be non-decreasing"):
        _fit(x)


@pytest.mark.parametrize("container", [sp.coo_matrix, sp.coo_array])
def test_malformed_coo(container):
    x = container(_base().copy())
    x.coords[0][2] = 6
    with pytest.raises(InputError, match=_COO + r"its row coordinates must be in \[0, 6\); found 1 out of range, "
                                               r"e.g. entry 2 at \(6, 1\).$"):
        as_blocked(x)
    x = container(_base().copy())
    x.coords[1][7] = -1
    with pytest.raises(InputError, match=_COO + r"its column coordinates must be in \[0, 5\); found 1 out of range"):
        _fit(x)
    x = container(_base().copy())
    x._shape = (4, 5)  # a shape that no longer holds the coordinates
    with pytest.raises(InputError, match=r"not a valid COO matrix of shape \(4, 5\): its row coordinates must be in"):
        as_blocked(x)


def test_malformed_pydata_sparse():
    import sparse

    coo = sparse.COO.from_scipy_sparse(_base())
    coo.coords[1, 3] = 9
    with pytest.raises(InputError, match=_COO + r"its column coordinates must be in \[0, 5\); found 1 out of range, "
                                               r"e.g. entry 3 at \(\d, 9\).$"):
        as_blocked(coo)
    gcxs = sparse.GCXS.from_scipy_sparse(sp.csr_matrix(_base()))
    gcxs.indices[0] = 77
    with pytest.raises(InputError, match=_CSR + r"its indices must be column indices in \[0, 5\)"):
        _fit(gcxs)


def test_malformed_bsr_and_anndata():
    x = sp.bsr_matrix(_base().toarray(), blocksize=(2, 1))
    x.indices[0] = 50
    with pytest.raises(InputError, match=r"\(its grid of 2 × 1 blocks\) is not a valid CSR matrix of shape \(3, 5\): "
                                         r"its indices must be column indices in \[0, 5\)"):
        as_blocked(x)
    anndata = pytest.importorskip("anndata")
    adata = anndata.AnnData(X=sp.csr_matrix(_base().T))  # 5 cells × 6 genes
    adata.X.indices[1] = 40
    with pytest.raises(InputError, match=r"The AnnData .X passed to as_blocked is not a valid CSR matrix of shape "
                                         r"\(5, 6\): its indices must be column indices in \[0, 6\)"):
        as_blocked(adata)


@pytest.mark.parametrize("block_nnz", [10**6, 4])  # computed whole / one column chunk at a time
def test_malformed_dask_chunk_is_rejected_before_dask_stacks_chunks(block_nnz):
    import dask.array as da

    def chunk(values, block_info=None):
        x = sp.csr_matrix(values)
        if block_info[None]["chunk-location"] == (1, 0):
            x.indptr[1] = 7  # past this 3 × 3 chunk's entries
        return x

    A = da.from_array(np.arange(1.0, 37.0).reshape(6, 6), chunks=(3, 3)).map_blocks(chunk, meta=sp.csr_matrix((0, 0)))
    with pytest.raises(InputError, match=r"^A chunk of the dask array A passed to as_blocked is not a valid CSR "
                                         r"matrix of shape \(3, 3\): its indptr must be non-decreasing"):
        as_blocked(A, block_nnz=block_nnz)


def test_unsorted_and_duplicate_indices_are_summed_not_rejected():
    # Valid (non-canonical) input: sorted and summed on a copy, as scipy's sum_duplicates does.
    x = sp.csc_matrix(([1.0, 2.0, 4.0, 8.0], [3, 1, 3, 0], [0, 3, 4]), shape=(4, 2))
    ref = x.toarray()  # scipy adds duplicates when densifying
    blocked = as_blocked(x)
    np.testing.assert_array_equal(blocked.to_scipy().toarray(), ref)
    assert check_data(blocked).sq_norm == float(np.sum(ref**2))  # (1 + 4)² + 2² + 8², exactly
    model = _fit(sp.csc_matrix(([1.0, 2.0, 4.0, 8.0, 1.0, 3.0], [3, 1, 3, 0, 2, 1], [0, 3, 4, 6]), shape=(4, 3)))
    assert np.all(np.isfinite(model.w))


def test_hand_built_blocks_are_checked_by_check_data():
    def blocked(block, n_cols=2):
        return BlockedMatrix((4, n_cols), np.dtype(np.float64), (InMemorySource(block),), sparse=True)

    unsorted = CSCBlock(np.array([1.0, 2.0, 3.0]), np.array([0, 3, 1], np.int32), np.array([0, 1, 3]), 4)
    with pytest.raises(InputError, match=r"^The data A passed to nmf \(block of columns 0:2\) is not a valid CSC "
                                         r"matrix of shape \(4, 2\): its rows must be sorted and unique within each "
                                         r"column \(canonical form, .*\); column 1 lists row 1 after row 3.$"):
        check_data(blocked(unsorted))
    duplicate = CSCBlock(np.array([1.0, 2.0]), np.array([2, 2], np.int32), np.array([0, 0, 2]), 4)
    with pytest.raises(InputError, match=r"column 1 lists row 2 after row 2"):
        _fit(blocked(duplicate))
    out_of_range = CSCBlock(np.array([1.0, 2.0]), np.array([0, 4], np.int32), np.array([0, 1, 2]), 4)
    with pytest.raises(InputError, match=r"its indices must be row indices in \[0, 4\); found 1 out of range, "
                                         r"e.g. row index 4 in column 1"):
        _fit(blocked(out_of_range))
    with pytest.raises(InputError, match=r"has a block \(columns 0:3\) of shape \(4, 2\); expected \(4, 3\)"):
        check_data(BlockedMatrix((4, 3), np.dtype(np.float64), (_Wide(unsorted),), sparse=True))
    with pytest.raises(InputError, match=r"must be read as CSCBlock or ndarray blocks; got a block of type "
                                         r"builtins.list for columns 0:3 instead.$"):
        check_data(BlockedMatrix((4, 3), np.dtype(np.float64), (_Wide([[1.0]]),), sparse=False))
    # a new column may restart at a low row, also after empty columns
    ok = CSCBlock(np.ones(4), np.array([1, 3, 0, 2], np.int32), np.array([0, 0, 2, 2, 4]), 4)
    check_block(ok, 4, 4)


class _Wide:
    """A source that declares 3 columns but returns a 2-column block."""

    n_cols = 3
    nnz = 3

    def __init__(self, block):
        self.block = block

    def load(self):
        return self.block


# ---------------------------------------------------------------------------------------------
# Property test: random malformations never crash
# ---------------------------------------------------------------------------------------------

_STRUCTURAL = ["index-high", "index-negative", "indptr-decrease", "indptr-short", "indptr-long", "indptr-past-nnz",
               "shape-minor"]
_VALUES = ["nan", "inf", "negative"]
_FORMATS = ["csc_matrix", "csc_array", "csr_matrix", "csr_array", "coo_matrix", "coo_array", "pydata_coo",
            "pydata_gcxs"]


def _malformed(fmt: str, kind: str, m: int, n: int, density: float, seed: int, where: int):
    import sparse

    x = sp.random(m, n, density=density, format="csc", random_state=seed)
    x.data += 0.5
    if x.nnz < 2:  # every malformation below needs two stored entries
        x = x.tolil()
        x[0, 0] = 1.0
        x[m - 1, n - 1] = 2.0
    x = sp.csc_matrix(x)
    k = where % x.nnz
    if kind in _VALUES:
        x.data[k] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[kind]
    if fmt.startswith("pydata"):
        y = sparse.COO.from_scipy_sparse(x) if fmt == "pydata_coo" else sparse.GCXS.from_scipy_sparse(sp.csr_matrix(x))
    else:
        y = getattr(sp, fmt)(x)
        y = y.copy() if fmt.startswith("coo") else y  # a COO built from CSC shares its row array
    if kind in _VALUES:
        return y
    if fmt in ("coo_matrix", "coo_array", "pydata_coo"):
        coords = y.coords
        axis = where % 2
        size = y.shape[axis]
        if kind == "index-negative":
            coords[axis][k] = -1 - where
        elif kind == "shape-minor":  # a shape too small for the largest coordinate
            shape = list(y.shape)
            shape[axis] = int(coords[axis].max())
            if fmt == "pydata_coo":
                y.shape = tuple(shape)
            else:
                y._shape = tuple(shape)
        else:  # the other kinds have no COO analogue: an index just past the edge
            coords[axis][k] = size + where
        return y
    indptr, indices = y.indptr, y.indices
    if fmt == "pydata_gcxs":
        n_major, n_minor = y.shape
    else:
        n_major, n_minor = (y.shape[1], y.shape[0]) if y.format == "csc" else y.shape
    if kind == "index-high":
        indices[k] = n_minor + where
    elif kind == "index-negative":
        indices[k] = -1 - where
    elif kind == "indptr-decrease":
        c = 1 + where % (n_major - 1) if n_major > 1 else 1
        indptr[c] = indptr[-1] + 1 + where  # above the next pointer (or past nnz when c is last)
    elif kind == "indptr-short":
        y.indptr = indptr[:-1]
    elif kind == "indptr-long":
        y.indptr = np.append(indptr, indptr[-1])
    elif kind == "indptr-past-nnz":
        indptr[-1] = len(indices) + 1 + where
    elif kind == "shape-minor":
        new_minor = int(indices.max())  # the largest index falls outside
        shape = (new_minor, y.shape[1]) if getattr(y, "format", "") == "csc" else (y.shape[0], new_minor)
        if fmt == "pydata_gcxs":
            y.shape = shape
        else:
            y._shape = shape
    return y


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(_FORMATS),
    kind=st.sampled_from(_STRUCTURAL + _VALUES),
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    density=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**16),
    where=st.integers(0, 1_000),
)
def test_random_malformed_sparse_input_raises_input_error(fmt, kind, m, n, density, seed, where):
    A = _malformed(fmt, kind, m, n, density, seed, where)
    if kind in _STRUCTURAL:
        with pytest.raises(InputError):
            as_blocked(A, block_nnz=max(1, where % 7))
    with pytest.raises(InputError):
        check_data(as_blocked(A, block_nnz=max(1, where % 7)))
    if kind == "nan":  # nmf reads NaN as a missing entry (tests/test_masked.py), not as an error
        return
    with pytest.raises(InputError):
        _fit(A)


# ---------------------------------------------------------------------------------------------
# Zarr groups written by others
# ---------------------------------------------------------------------------------------------


def _write_group(path, arrays: dict, attrs: dict, **kw):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, values in arrays.items():
        g.create_array(name, data=np.asarray(values), **kw)
    g.attrs.update(attrs)
    return g


def test_foreign_csc_group_with_bad_indices(tmp_path):
    x = _base()
    bad = x.indices.copy()
    bad[7] = 60
    path = tmp_path / "csc.zarr"
    _write_group(path, {"data": x.data, "indices": bad, "indptr": x.indptr}, {"encoding-type": "csc_matrix",
                                                                               "shape": [6, 5]})
    blocked = as_blocked(path, block_nnz=4)  # lazy: blocks are read (and checked) on load
    # the block holding column 3: columns 2:4 with block_nnz=4, the whole matrix in _fit's one block
    message = (rf"^The Zarr store '{path}' \(block of columns \d:\d\) is not a valid CSC matrix of shape \(6, \d\): "
               rf"its indices must be row indices in \[0, 6\); found 1 out of range, e.g. row index 60 in column 3.$")
    with pytest.raises(InputError, match=message):
        check_data(blocked)
    with pytest.raises(InputError, match=message):
        _fit(path)
    with pytest.raises(InputError, match=message):
        blocked.load_block(1)  # any reader of the block is protected, not only check_data


def test_foreign_groups_with_bad_indptr_or_csr_indices(tmp_path):
    x = _base()
    indptr = x.indptr.copy()
    indptr[2] = 1
    _write_group(tmp_path / "p.zarr", {"data": x.data, "indices": x.indices, "indptr": indptr},
                 {"format": "csc", "shape": [6, 5]})
    with pytest.raises(InputError, match=r"The Zarr store '.*p\.zarr' is not a valid CSC matrix of shape \(6, 5\): "
                                         r"its indptr must be non-decreasing .* got indptr\[2\] = 1 < indptr\[1\] = 2"):
        as_blocked(tmp_path / "p.zarr")
    _write_group(tmp_path / "short.zarr", {"data": x.data[:-1], "indices": x.indices[:-1], "indptr": x.indptr},
                 {"format": "csc", "shape": [6, 5]})
    with pytest.raises(InputError, match=r"its indptr ends at 10, .* got 9 indices and 9 values instead"):
        as_blocked(tmp_path / "short.zarr")
    csr = sp.csr_array(x)
    indices = csr.indices.copy()
    indices[0] = -4
    _write_group(tmp_path / "r.zarr", {"data": csr.data, "indices": indices, "indptr": csr.indptr},
                 {"h5sparse_format": "csr", "h5sparse_shape": [6, 5]})
    with pytest.raises(InputError, match=r"The Zarr store '.*r\.zarr' is not a valid CSR matrix of shape \(6, 5\): "
                                         r"its indices must be column indices in \[0, 5\); found 1 out of range"):
        _fit(tmp_path / "r.zarr")


def test_foreign_group_with_a_missing_chunk(tmp_path):
    x = sp.csc_array(sp.random(40, 30, density=0.3, random_state=1)) * 1.0
    path = tmp_path / "f.zarr"
    g = _write_group(path, {"data": x.data, "indices": x.indices, "indptr": x.indptr},
                     {"encoding-type": "csc_matrix", "shape": [40, 30]}, chunks=(64,))
    assert g["data"].nchunks > 2
    os.remove(path / "indices" / "c" / "1")
    with pytest.raises(InputError, match=rf"^The Zarr store '{path}' is incomplete: its 'indices' array is missing 1 "
                                         rf"of its \d+ stored chunks \(e.g. indices/c/1\), which Zarr would read as "
                                         rf"the fill value 0. Re-write the store from its source, .*write_empty_chunks"
                                         rf"=True.*`dnmf convert`.$"):
        as_blocked(path)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")  # anndata's own default, not ours
def test_anndata_store_with_a_missing_chunk(tmp_path):
    anndata = pytest.importorskip("anndata")
    x = sp.csr_matrix(sp.random(300, 200, density=0.3, random_state=2))
    adata = anndata.AnnData(X=x)
    adata.write_zarr(tmp_path / "a.zarr")
    import zarr

    data = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["X/data"]
    key = data.metadata.encode_chunk_key((data.nchunks - 1,))
    os.remove(tmp_path / "a.zarr" / "X" / "data" / key)
    with pytest.raises(InputError, match=rf"is incomplete: its 'X/data' array is missing 1 of its {data.nchunks} "
                                         rf"stored chunks \(e.g. X/data/{key}\)"):
        as_blocked(tmp_path / "a.zarr")


def test_foreign_dense_arrays_are_checked_only_with_a_nan_fill_value(tmp_path):
    import zarr

    dense = np.arange(1.0, 41.0).reshape(4, 10)
    zarr.create_array(str(tmp_path / "nan.zarr"), data=dense, chunks=(4, 2), fill_value=np.nan)
    os.remove(tmp_path / "nan.zarr" / "c" / "0" / "3")
    with pytest.raises(InputError, match=r"is incomplete: its array is missing 1 of its 5 stored chunks "
                                         r"\(e.g. c/0/3\), which Zarr would read as the fill value nan"):
        as_blocked(tmp_path / "nan.zarr")
    # fill value 0: an omitted chunk is an all-zero chunk (Zarr 3 skips those by default)
    dense[:, 4:6] = 0.0
    zarr.create_array(str(tmp_path / "zero.zarr"), data=dense, chunks=(4, 2), fill_value=0.0)
    assert not (tmp_path / "zero.zarr" / "c" / "0" / "2").exists()
    np.testing.assert_array_equal(as_blocked(tmp_path / "zero.zarr").to_scipy(), dense)


# ---------------------------------------------------------------------------------------------
# Stores written by dnmf
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def counts():
    rng = np.random.default_rng(5)
    return sp.csc_array(rng.poisson(0.3, size=(50, 80)).astype(np.float64))


@pytest.mark.parametrize("array", ["data", "indices", "indptr", "block_offsets"])
def test_own_store_with_a_deleted_chunk(counts, tmp_path, array):
    path = write_zarr(counts, tmp_path / "s.zarr", block_nnz=300)
    chunks = sorted(os.listdir(os.path.join(path, array, "c")), key=int)
    os.remove(os.path.join(path, array, "c", chunks[-1]))
    message = (rf"^The Zarr store '{path}' is incomplete: its '{array}' array is missing 1 of its {len(chunks)} "
               rf"stored chunks \(e.g. {array}/c/{chunks[-1]}\), which Zarr would read as the fill value "
               rf"{'nan' if array == 'data' else '-1'}. Files of the store were lost after it was written; re-run "
               rf"`dnmf convert` \(or dnmf.io.write_zarr\) from the original data to rewrite it.$")
    with pytest.raises(InputError, match=message):
        as_blocked(path)
    with pytest.raises(InputError, match=message):
        _fit(path)


def test_own_dense_store_with_a_deleted_chunk(counts, tmp_path):
    dense = counts.toarray()
    dense[:, :20] = 0.0  # all-zero chunks are written too: only a lost file is missing
    path = write_zarr(dense, tmp_path / "d.zarr", block_nnz=500)
    np.testing.assert_array_equal(as_blocked(path).to_scipy(), dense)
    os.remove(os.path.join(path, "c", "0", "0"))
    with pytest.raises(InputError, match=rf"^The Zarr store '{path}' is incomplete: its array is missing 1 of its 8 "
                                         rf"stored chunks \(e.g. c/0/0\), .* re-run `dnmf convert`"):
        as_blocked(path)


def test_own_store_fill_values_catch_a_chunk_lost_after_opening(counts, tmp_path):
    import zarr

    path = write_zarr(counts, tmp_path / "s.zarr", block_nnz=300)
    g = zarr.open_group(path, mode="r")
    assert np.isnan(g["data"].fill_value)
    assert all(g[name].fill_value == -1 for name in ("indices", "indptr", "block_bounds", "block_offsets"))
    blocked = as_blocked(path)
    os.remove(os.path.join(path, "data", "c", "0"))  # after the open-time check
    with pytest.raises(InputError, match=r"The data A passed to nmf must be finite: A contains \d+ NaN/Inf"):
        check_data(blocked)
    blocked = as_blocked(write_zarr(counts, tmp_path / "t.zarr", block_nnz=300))
    os.remove(tmp_path / "t.zarr" / "indices" / "c" / "0")
    with pytest.raises(InputError, match=r"The Zarr store '.*t\.zarr' \(block of columns 0:\d+\) is not a valid "
                                         r"CSC matrix .*row index -1"):
        blocked.load_block(0)


def test_own_store_with_corrupt_block_tables(counts, tmp_path):
    import zarr

    path = write_zarr(counts, tmp_path / "s.zarr", block_nnz=300)
    zarr.open_group(path, mode="r+")["block_offsets"][1] = 10**9
    with pytest.raises(InputError, match=rf"^The Zarr store '{path}' is corrupt: its block_bounds, block_offsets and "
                                         rf"indptr arrays do not describe blocks of a \(50, 80\) matrix .*"
                                         rf"Re-run `dnmf convert`"):
        as_blocked(path)


def test_unreadable_zarr_metadata(counts, tmp_path):
    path = write_zarr(counts, tmp_path / "s.zarr", block_nnz=300)
    Path(path, "zarr.json").write_text("{broken")
    with pytest.raises(InputError, match=rf"^The path A passed to as_blocked is not a readable Zarr store: '{path}' "
                                         rf"\(JSONDecodeError: .*\). Check the store is complete, or re-write it.$"):
        as_blocked(path)
    path = write_zarr(counts, tmp_path / "t.zarr", block_nnz=300)
    Path(path, "indices", "zarr.json").write_text("")
    with pytest.raises(InputError, match=r"is not a readable Zarr store: '.*t\.zarr'"):
        as_blocked(path)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _halve(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.fixture
def matrix():
    return sp.random(60, 40, density=0.2, random_state=3, format="csr")


def test_truncated_mtx(matrix, tmp_path):
    path = tmp_path / "m.mtx"
    scipy.io.mmwrite(str(path), matrix)
    _halve(path)
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as a MatrixMarket file: ValueError: Truncated "
                                         rf"file.*. Check the file is complete, or re-export it.$") as info:
        as_blocked(path)
    assert isinstance(info.value.__cause__, ValueError)


def test_truncated_mtx_gz(matrix, tmp_path):
    buffer = tmp_path / "m.mtx"
    scipy.io.mmwrite(str(buffer), matrix)
    path = tmp_path / "m.mtx.gz"
    path.write_bytes(gzip.compress(buffer.read_bytes()))
    _halve(path)  # the gzip stream ends early
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as a MatrixMarket file \(gzip-compressed\): "
                                         rf"EOFError: .*Check the file is complete, or re-export it.$"):
        as_blocked(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"as a MatrixMarket file \(gzip-compressed\): BadGzipFile"):
        _fit(path)


def test_truncated_and_mistyped_npz(matrix, tmp_path):
    path = tmp_path / "m.npz"
    sp.save_npz(path, matrix)
    _halve(path)
    kind = r"a .npz sparse matrix \(scipy.sparse.save_npz format\) or single array \(numpy.savez\)"
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as {kind}: BadZipFile: File is not a zip file. "
                                         rf"Check the file is complete, or re-export it.$"):
        as_blocked(path)
    path.write_text("1 2 3\n4 5 6\n")  # a text file named .npz: no "pickled data" message
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as {kind}: it is not a zip archive, which every "
                                         rf".npz file is. Check the file is complete"):
        as_blocked(path)
    # readable, but the matrix inside is malformed: the message names the file
    bad = sp.csr_matrix(matrix)
    bad.indices[0] = 99
    sp.save_npz(tmp_path / "bad.npz", bad)
    with pytest.raises(InputError, match=r"is not a valid CSR matrix of shape \(60, 40\): its indices must be column "
                                         r"indices in \[0, 40\).* A was read from '.*bad\.npz'.$"):
        as_blocked(tmp_path / "bad.npz")


def test_truncated_and_mistyped_npy(matrix, tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, matrix.toarray())
    _halve(path)
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as a .npy array \(numpy.save format\): "
                                         rf"ValueError: Failed to read all data .*re-export it.$"):
        as_blocked(path)
    path.write_text("hello")
    with pytest.raises(InputError, match=r"as a .npy array \(numpy.save format\): it does not start with the .npy "
                                         r"header"):
        as_blocked(path)


def test_garbage_h5ad_and_missing_anndata(tmp_path, monkeypatch):
    pytest.importorskip("anndata")
    path = tmp_path / "a.h5ad"
    path.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(InputError, match=rf"^Could not read '{path}' as an AnnData .h5ad file: OSError: .*"
                                         rf"Check the file is complete, or re-export it.$"):
        as_blocked(path)
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata now raises ImportError
    with pytest.raises(InputError, match=r"^Reading .h5ad files needs the 'anndata' package: pip install anndata$"):
        as_blocked(path)


# ---------------------------------------------------------------------------------------------
# Module layering
# ---------------------------------------------------------------------------------------------


def test_io_modules_import_one_way():
    """blocks ← validate ← memory ← chunks ← zarr_store ← hdf5 ← tenx ← readers ← writers: no module imports a later one."""
    order = ["blocks", "validate", "memory", "chunks", "zarr_store", "hdf5", "tenx", "readers", "writers"]
    folder = Path(dnmf.io.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported.update(alias.name for alias in node.names)
        assert imported <= set(order[:i]), (name, imported - set(order[:i]))


def test_check_compressed_returns_nnz_and_leaves_arrays_untouched():
    x = _base()
    before = [a.copy() for a in (x.data, x.indices, x.indptr)]
    assert check_compressed(x.indptr, x.indices, x.data, x.shape) == x.nnz
    for a, b in zip(before, (x.data, x.indices, x.indptr)):
        np.testing.assert_array_equal(a, b)
