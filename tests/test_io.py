"""The data layer: every input kind gives the same matrix, nnz balancing, checks, Zarr stores.

References are independent of dnmf: scipy.io.mmread of the shipped hawaiibirds matrix,
scipy.sparse/NumPy arithmetic written in the tests, and plain-Python re-implementations of the
blocking rule. Values are compared exactly: reading, converting and blocking involve no
arithmetic except summing duplicates and int → float conversion, both exact here.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from dask.sizeof import sizeof

import dnmf.io
from dnmf.exceptions import InputError
from dnmf.io import BlockedMatrix, CSCBlock, InMemorySource, ZarrBlockSource, ZarrDenseSource, as_blocked, write_zarr
from dnmf.io.readers import column_block_bounds, dense_block_width, index_dtype, rebalance_blocks
from dnmf.io.validate import DataSummary, check_data, check_rank
from dnmf.io.zarr_store import chunk_length

def _hawaii_mtx() -> Path:
    """hawaiibirds as R exported it (shared data folder), or, on a machine without that folder,
    the bundled copy written out as MatrixMarket (the values are the same, exactly)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "hawaiibirds" / "matrix.mtx"
    if shared.exists():
        return shared
    import tempfile

    from dnmf.datasets import load_hawaiibirds

    out = Path(tempfile.mkdtemp(prefix="dnmf-test-")) / "hawaiibirds.mtx"
    scipy.io.mmwrite(str(out), sp.coo_matrix(load_hawaiibirds().X), precision=17)
    return out


HAWAII = _hawaii_mtx()


@pytest.fixture(scope="module")
def birds() -> sp.csc_array:
    """hawaiibirds, 183 species × 1,183 grid cells, 30,815 stored entries (reference reader)."""
    return sp.csc_array(scipy.io.mmread(str(HAWAII)))


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    """A small random integer count matrix (60 × 45, ~20 % dense)."""
    rng = np.random.default_rng(7)
    dense = rng.poisson(0.4, size=(60, 45)).astype(np.int64)
    return sp.csr_matrix(dense)


def assert_same_matrix(blocked: BlockedMatrix, reference) -> None:
    """Exact equality of the assembled matrix with ``reference`` (dense or sparse)."""
    got = blocked.to_scipy()
    got = got.toarray() if sp.issparse(got) else got
    ref = reference.toarray() if sp.issparse(reference) else np.asarray(reference)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def assert_canonical(blocked: BlockedMatrix) -> None:
    """Every sparse block has int64 indptr from 0, sorted and unique rows per column."""
    for block in blocked.iter_blocks():
        assert isinstance(block, CSCBlock)
        assert block.indptr.dtype == np.int64 and block.indptr[0] == 0
        assert block.indices.dtype == np.int32
        for c in range(block.shape[1]):
            rows = block.indices[block.indptr[c] : block.indptr[c + 1]]
            assert np.all(np.diff(rows) > 0)


# ---------------------------------------------------------------------------------------------
# Every in-memory input kind
# ---------------------------------------------------------------------------------------------


def _in_memory_kinds(csc: sp.csc_array):
    import dask.array as da
    import sparse

    dense = csc.toarray()
    coo_meta = sparse.COO.from_numpy(np.zeros((0, 0)))
    return {
        "numpy_c": np.ascontiguousarray(dense),
        "numpy_f": np.asfortranarray(dense),
        "list": dense[:20, :30].tolist(),
        "csr_matrix": sp.csr_matrix(csc),
        "csc_matrix": sp.csc_matrix(csc),
        "coo_matrix": sp.coo_matrix(csc),
        "csr_array": sp.csr_array(csc),
        "csc_array": csc,
        "coo_array": sp.coo_array(csc),
        "pydata_coo": sparse.COO.from_scipy_sparse(csc),
        "pydata_gcxs": sparse.GCXS.from_scipy_sparse(sp.csr_matrix(csc)),
        "dask_dense": da.from_array(dense, chunks=(70, 100)),
        "dask_scipy": da.from_array(dense, chunks=(70, 100)).map_blocks(sp.csr_matrix, meta=sp.csr_matrix((0, 0))),
        "dask_pydata": da.from_array(dense, chunks=(70, 100)).map_blocks(sparse.COO.from_numpy, meta=coo_meta),
    }


@pytest.mark.parametrize(
    "kind",
    ["numpy_c", "numpy_f", "list", "csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "csc_array", "coo_array",
     "pydata_coo", "pydata_gcxs", "dask_dense", "dask_scipy", "dask_pydata"],
)
@pytest.mark.parametrize("block_nnz", [2_500, 10**9])  # many blocks (dask: per chunk) / one block (dask: whole)
def test_every_in_memory_kind_gives_the_reference(birds, kind, block_nnz):
    A = _in_memory_kinds(birds)[kind]
    ref = birds.toarray()[:20, :30] if kind == "list" else birds
    blocked = as_blocked(A, block_nnz=block_nnz)
    assert blocked.shape == ref.shape and blocked.dtype == np.float64 and blocked.in_memory
    assert_same_matrix(blocked, ref)
    assert blocked.sparse == (kind not in ("numpy_c", "numpy_f", "list", "dask_dense"))
    if blocked.sparse:
        assert_canonical(blocked)
        assert blocked.nnz == birds.nnz
    else:
        for block in blocked.iter_blocks():
            assert block.flags.c_contiguous or block.flags.f_contiguous
    if block_nnz == 10**9:
        assert blocked.n_blocks == 1


def test_dense_blocks_are_views_when_contiguous_and_copies_otherwise(birds):
    dense = birds.toarray()
    f = np.asfortranarray(dense)
    blocks = list(as_blocked(f, block_nnz=5_000).iter_blocks())
    assert all(np.shares_memory(b, f) for b in blocks)  # F-order column slices are contiguous
    c = np.ascontiguousarray(dense)
    blocks = list(as_blocked(c, block_nnz=5_000).iter_blocks())
    assert not any(np.shares_memory(b, c) for b in blocks)
    assert all(b.flags.c_contiguous for b in blocks)


def test_duplicates_summed_indices_sorted_and_input_untouched():
    # column 0 holds row 2 twice and rows out of order; explicit zero at (1, 1) may stay
    data = np.array([1.0, 2.0, 5.0, 0.0, 3.0])
    indices = np.array([2, 2, 0, 1, 0])
    indptr = np.array([0, 3, 5])
    x = sp.csc_matrix((data, indices, indptr), shape=(3, 2))
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    blocked = as_blocked(x)
    assert_canonical(blocked)
    np.testing.assert_array_equal(blocked.to_scipy().toarray(), [[5.0, 3.0], [0.0, 0.0], [3.0, 0.0]])
    for a, b in zip(before, (x.data, x.indices, x.indptr)):
        np.testing.assert_array_equal(a, b)  # the caller's matrix is not sorted in place
    coo = sp.coo_matrix(([1.0, 2.0, 4.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    np.testing.assert_array_equal(as_blocked(coo).to_scipy().toarray(), [[0.0, 3.0], [4.0, 0.0]])


def test_blocked_matrix_is_returned_unchanged(birds):
    blocked = as_blocked(birds, block_nnz=4_000)
    assert as_blocked(blocked, block_nnz=10) is blocked


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.int8, np.float64), (np.int64, np.float64), (np.uint16, np.float64), (np.bool_, np.float64),
     (np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)],
)
def test_value_dtypes(counts, dtype, expected):
    dense = (counts.toarray() % 2 if dtype == np.bool_ else counts.toarray()).astype(dtype)
    for A in (dense, sp.csr_matrix(dense)) if dtype != np.float16 else (dense,):  # scipy has no float16
        blocked = as_blocked(A, block_nnz=100)
        assert blocked.dtype == expected
        assert all(b.dtype == expected for b in blocked.iter_blocks())
        assert_same_matrix(blocked, dense.astype(expected))


def test_dtype_override(counts):
    blocked = as_blocked(counts, dtype=np.float32)
    assert blocked.dtype == np.float32 and blocked.load_block(0).data.dtype == np.float32
    assert as_blocked(counts.toarray().astype(np.float32), dtype="float64").dtype == np.float64
    with pytest.raises(InputError, match=r"The 'dtype' parameter of as_blocked must be None, float32 or float64. "
                                         r"Got 'int32' instead."):
        as_blocked(counts, dtype="int32")


def test_index_dtype_selection():
    # The choice depends only on counts, so it is tested without allocating 2**31 entries.
    assert index_dtype(0) == np.int32
    assert index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == np.int64
    assert index_dtype(5 * 2**31) == np.int64
    assert index_dtype(10, n_rows=2**31) == np.int64


# ---------------------------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------------------------


def reference_bounds(col_nnz, block_nnz):
    """Plain-Python centre-of-mass rule: column c goes to block floor((N_c + nnz_c/2) / block_nnz)."""
    labels, before = [], 0
    for z in col_nnz:
        labels.append(int((before + z / 2) // block_nnz))
        before += z
    return [0] + [c for c in range(1, len(labels)) if labels[c] != labels[c - 1]] + [len(labels)]


def test_block_bounds_match_the_reference_rule(birds):
    rng = np.random.default_rng(3)
    cases = [np.diff(birds.indptr), rng.integers(0, 50, 300), np.zeros(10, int), np.array([1000, 1, 1, 1000])]
    for col_nnz in cases:
        for target in (1, 7, 100, 3_000, 10**6):
            got = column_block_bounds(col_nnz, target)
            assert got.tolist() == reference_bounds(col_nnz, target)
            assert got.dtype == np.int64 and np.all(np.diff(got) >= 1)  # every block holds a column


@pytest.mark.parametrize("target", [500, 2_000, 8_000])
def test_blocks_are_nnz_balanced(birds, target):
    blocked = as_blocked(birds, block_nnz=target)
    col_nnz = np.diff(birds.indptr)
    max_col = col_nnz.max()
    nnz = np.array([s.nnz for s in blocked.sources])
    assert nnz.sum() == birds.nnz
    assert blocked.n_blocks == pytest.approx(birds.nnz / target, abs=1.5)
    # A block ends at a column boundary, so it misses its target by at most one column's
    # entries; only the last block (the remainder) may be smaller.
    assert np.all(np.abs(nnz[:-1] - target) <= max_col)
    assert nnz[-1] <= target + max_col


def test_dense_blocks_have_fixed_width(birds):
    dense = birds.toarray()
    blocked = as_blocked(dense, block_nnz=2_000)
    width = dense_block_width(183, 2_000)
    assert width == round(2_000 / 183) == 11
    assert all(s.n_cols == width for s in blocked.sources[:-1])
    assert as_blocked(dense, block_nnz=1).col_bounds.tolist() == list(range(1184))  # at least one column


def test_streaming_rebalance_equals_whole_matrix_blocking(birds):
    whole = as_blocked(birds, block_nnz=1_700)
    pieces = [blk for blk in as_blocked(birds, block_nnz=5_300).iter_blocks()]
    stream = list(rebalance_blocks(pieces, 183, 1_700, sparse=True))
    assert [b.shape[1] for b in stream] == [s.n_cols for s in whole.sources]
    for a, b in zip(stream, whole.iter_blocks()):
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    dense = [blk for blk in as_blocked(birds.toarray(), block_nnz=4_000).iter_blocks()]
    stream = list(rebalance_blocks(dense, 183, 1_000, sparse=False))
    assert [b.shape[1] for b in stream] == [s.n_cols for s in as_blocked(birds.toarray(), block_nnz=1_000).sources]
    np.testing.assert_array_equal(np.hstack(stream), birds.toarray())


# ---------------------------------------------------------------------------------------------
# sizeof
# ---------------------------------------------------------------------------------------------


def test_dask_sizeof_of_blocks_and_sources(birds, tmp_path):
    block = as_blocked(birds).load_block(0)
    nbytes = block.data.nbytes + block.indices.nbytes + block.indptr.nbytes
    assert nbytes > 300_000
    assert nbytes <= sizeof(block) <= nbytes + 1_000
    assert sizeof(block) <= sizeof(InMemorySource(block)) <= sizeof(block) + 1_000
    dense = birds.toarray()
    assert dense.nbytes <= sizeof(InMemorySource(dense)) <= dense.nbytes + 1_000
    path = write_zarr(birds, tmp_path / "b.zarr", block_nnz=10**6)
    (src,) = as_blocked(path).sources
    assert isinstance(src, ZarrBlockSource)
    assert sizeof(src) < 1_000  # a path and a few ints; the 370 kB block is read where it is used
    dense_src = as_blocked(write_zarr(dense, tmp_path / "d.zarr")).sources[0]
    assert isinstance(dense_src, ZarrDenseSource) and sizeof(dense_src) < 1_000


def test_dask_sizeof_of_the_engines_other_task_values():
    """Each type a task returns or takes reports what it holds: dask's default ``sizeof``
    (``sys.getsizeof``) calls their ``__sizeof__``, so dnmf needs no dask import to register them."""
    from dnmf.core import ScaledSource
    from dnmf.engine.kl import KLStats
    from dnmf.engine.masked import CSRBlock
    from dnmf.io.validate import DataCheck
    from dnmf.mixed.blocked_data import REBlock

    big = np.ones((3000, 10))  # 240 kB
    csr = CSRBlock(np.ones(30_000), np.zeros(30_000, np.int64), np.zeros(3001, np.int64), 10)
    for value, nbytes in ((csr, 30_000 * 16 + 3001 * 8),
                          (KLStats(big, np.ones(10), big, np.ones(3)), 2 * big.nbytes + 104),
                          (ScaledSource(InMemorySource(big), 0.5), big.nbytes),
                          (REBlock(big, np.ones((4, 10))), big.nbytes + 320)):
        assert nbytes <= sizeof(value) <= nbytes + 1_000, type(value).__name__
    assert sizeof(DataCheck(sq_norms=(1.0,) * 10)) < 1_000  # a few numbers per block


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("A", "message"),
    [
        (np.arange(5.0), r"must be a 2-D matrix \(features × samples\); got a 1-D array of shape \(5,\)"),
        (np.float64(3.0), r"must be a 2-D matrix .*got a 0-D array of shape \(\)"),
        (np.ones((2, 2, 2)), r"got a 3-D array"),
        (np.zeros((0, 4)), r"must have at least one row and one column; got shape \(0, 4\)"),
        (sp.csr_matrix((5, 0)), r"must have at least one row and one column; got shape \(5, 0\)"),
        (np.array([["a", "b"], ["c", "d"]]), r"must hold real numbers \(int, uint, bool or float\); got dtype <U1"),
        (np.array([[1 + 1j, 2]]), r"must hold real numbers .*got dtype complex128"),
        (np.array([[1, "x"], [None, 2]], dtype=object), r"must hold real numbers; got an array of dtype object"),
        ({"a": 1}, r"must be a numpy array, .* got builtins.dict instead"),
    ],
)
def test_bad_inputs(A, message):
    with pytest.raises(InputError, match=message):
        as_blocked(A)


def test_bad_paths_and_parameters(tmp_path, counts):
    with pytest.raises(InputError, match=r"The path A passed to as_blocked does not exist: '.*nope\.mtx'"):
        as_blocked(str(tmp_path / "nope.mtx"))
    (tmp_path / "a.txt").write_text("1 2\n")
    with pytest.raises(InputError, match=r"must name a file of a known type \(.*\.h5ad.*\) or a Zarr store"):
        as_blocked(tmp_path / "a.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="is not a readable Zarr store"):
        as_blocked(tmp_path / "empty_dir")
    np.savez(tmp_path / "two.npz", a=np.ones((2, 2)), b=np.ones((2, 2)))
    with pytest.raises(InputError, match=r"holds the arrays 'a', 'b'"):
        as_blocked(tmp_path / "two.npz")
    with pytest.raises(InputError, match=r"The 'block_nnz' parameter of as_blocked must be an int in \[1, inf\]. "
                                         r"Got 0 instead."):
        as_blocked(counts, block_nnz=0)
    with pytest.raises(InputError, match=r"The 'layer' parameter of as_blocked must be None for a non-AnnData input"):
        as_blocked(counts, layer="counts")
    with pytest.raises(InputError, match="fill value 0"):
        import sparse

        as_blocked(sparse.COO.from_numpy(np.ones((2, 2)), fill_value=1.0))


def test_check_data_summary_against_numpy(birds):
    dense = birds.toarray()
    for blocked in (as_blocked(birds, block_nnz=3_000), as_blocked(dense, block_nnz=3_000)):
        s = check_data(blocked)
        assert isinstance(s, DataSummary)
        # Summation order differs from NumPy's pairwise sum: a few float64 ulps of 3.9e3.
        assert s.sq_norm == pytest.approx(float(np.sum(dense**2)), rel=1e-12)
        assert s.sq_norm == pytest.approx(3903.8765433223293, rel=1e-12)  # meta.json: sum_sq
        assert s.nnz == 30_815 and s.n_negative == 0
        assert (s.min, s.max) == (0.0, 1.0)  # implicit zeros count: the smallest stored value is 2.8e-4
    f32 = check_data(as_blocked(birds.astype(np.float32)))
    # float32 values squared and summed in float64: only the float32 rounding of the inputs
    # (relative 6e-8 per value) separates it from the float64 sum.
    assert f32.sq_norm == pytest.approx(3903.8765433223293, rel=1e-6)


@pytest.mark.parametrize("as_sparse", [True, False])
def test_negative_entries_are_counted_and_located(as_sparse):
    A = np.zeros((6, 40))
    A[0, 3] = 1.0
    A[4, 9] = -0.5  # the first negative in column-major order
    A[1, 12] = -2.0
    A[5, 30] = -1.0
    A[2, 37] = -3.0
    A[3, 38] = -0.25
    # one stored entry per sparse block, two columns per dense block
    blocked = as_blocked(sp.csc_array(A), block_nnz=1) if as_sparse else as_blocked(A, block_nnz=12)
    assert blocked.n_blocks >= 6
    with pytest.raises(InputError, match=r"^The data A passed to nmf must be non-negative; found 5 negative "
                                         r"entries, e.g. A\[4, 9\] = -0.5.$"):
        check_data(blocked)
    with pytest.raises(InputError, match=r"passed to cv must be non-negative"):
        check_data(blocked, func="cv")
    s = check_data(blocked, allow_negative=True)
    assert s.n_negative == 5 and s.min == -3.0 and s.max == 1.0 and s.nnz == 6
    assert s.sq_norm == pytest.approx(float(np.sum(A**2)), rel=1e-15)  # six exact binary fractions


@pytest.mark.parametrize("as_sparse", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_counted_and_located(as_sparse, bad):
    A = np.ones((5, 30))
    A[3, 17] = bad
    A[0, 25] = np.nan
    A[4, 29] = -np.inf
    A[2, 2] = -1.0  # negative entries are reported after non-finite ones
    blocked = as_blocked(sp.csc_array(A) if as_sparse else A, block_nnz=10)
    with pytest.raises(InputError, match=r"A contains 3 NaN/Inf value\(s\), e.g. at \(3, 17\)"):
        check_data(blocked)
    with pytest.raises(InputError, match="NaN/Inf"):
        check_data(blocked, allow_negative=True)


def test_check_reads_each_block_once(birds):
    source = CountingSource(birds, 0, 1183)
    blocked = BlockedMatrix((183, 1183), np.dtype(np.float64), (source,), sparse=True, in_memory=False)
    check_data(blocked)
    assert source.loads == [1]


@pytest.mark.parametrize(
    ("k", "got"),
    [(25, "25"), (0, "0"), (-1, "-1"), (2.5, "2.5"), (True, "True"), ("3", "'3'"), (None, "None"),
     (np.int32(21), "21")],
)
def test_check_rank_errors(k, got):
    message = (r"^The 'k' parameter of nmf must be an int in the range \[1, min\(m, n\)\] = \[1, 20\] for a "
               rf"20 × 30 matrix. Got {got} instead.$")
    with pytest.raises(InputError, match=message):
        check_rank(k, (20, 30), "nmf")


def test_check_rank_accepts_integers():
    assert check_rank(20, (20, 30), "nmf") == 20
    assert check_rank(np.int64(1), (40, 3), "nmf") == 1
    assert type(check_rank(np.uint8(3), (40, 3), "nmf")) is int


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _write_csc_group(path, x: sp.csc_array, **attrs):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("data", data=x.data)
    g.create_array("indices", data=x.indices)
    g.create_array("indptr", data=x.indptr)
    g.attrs.update(attrs)


def test_every_path_kind_gives_the_reference(birds, tmp_path):
    import zarr

    dense = birds.toarray()
    paths = {}
    shutil.copy(HAWAII, tmp_path / "m.mtx")
    paths["mtx"] = tmp_path / "m.mtx"
    with open(HAWAII, "rb") as src, gzip.open(tmp_path / "m.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    paths["mtx.gz"] = tmp_path / "m.mtx.gz"
    sp.save_npz(tmp_path / "sparse.npz", sp.csr_matrix(birds))
    paths["npz_sparse"] = tmp_path / "sparse.npz"
    np.savez_compressed(tmp_path / "dense.npz", x=dense)
    paths["npz_array"] = tmp_path / "dense.npz"
    np.save(tmp_path / "dense.npy", dense)
    paths["npy"] = tmp_path / "dense.npy"
    zarr.create_array(str(tmp_path / "dense.zarr"), data=dense, chunks=(50, 100))
    paths["zarr_dense"] = tmp_path / "dense.zarr"
    _write_csc_group(tmp_path / "csc.zarr", birds, **{"encoding-type": "csc_matrix", "shape": [183, 1183]})
    paths["zarr_csc"] = tmp_path / "csc.zarr"
    csr = sp.csr_array(birds)
    g = zarr.open_group(str(tmp_path / "csr.zarr"), mode="w")
    for name in ("data", "indices", "indptr"):
        g.create_array(name, data=getattr(csr, name))
    g.attrs.update({"h5sparse_format": "csr", "h5sparse_shape": [183, 1183]})
    paths["zarr_csr"] = tmp_path / "csr.zarr"
    for kind, path in paths.items():
        for p in (path, str(path)):
            blocked = as_blocked(p, block_nnz=4_000)
            assert blocked.shape == (183, 1183) and blocked.dtype == np.float64, kind
            assert_same_matrix(blocked, birds)
            if blocked.sparse:
                assert_canonical(blocked)
            assert blocked.in_memory == (kind not in ("zarr_dense", "zarr_csc")), kind
            assert blocked.n_blocks > 1


def test_lazy_zarr_inputs_read_blocks_on_load(birds, tmp_path):
    import zarr

    # dense array: blocks cover whole stored chunks (width a multiple of 100 here)
    permille = np.round(birds.toarray() * 1000).astype(np.int32)
    zarr.create_array(str(tmp_path / "d.zarr"), data=permille, chunks=(183, 100))
    blocked = as_blocked(tmp_path / "d.zarr", block_nnz=30_000)
    assert [s.n_cols for s in blocked.sources[:-1]] == [200] * 5
    assert blocked.dtype == np.float64 and blocked.load_block(0).dtype == np.float64  # int32 → float64
    assert_same_matrix(blocked, permille)
    # a CSC group written by someone else: unsorted rows and duplicates are fixed on load
    x = sp.csc_array(([1.0, 2.0, 3.0, 4.0], [2, 0, 2, 1], [0, 3, 4]), shape=(3, 2))
    _write_csc_group(tmp_path / "raw.zarr", x, format="csc", shape=[3, 2])
    blocked = as_blocked(tmp_path / "raw.zarr", block_nnz=1)
    assert blocked.n_blocks == 2 and not blocked.in_memory
    assert_canonical(blocked)
    np.testing.assert_array_equal(blocked.to_scipy().toarray(), [[2.0, 0.0], [0.0, 4.0], [4.0, 0.0]])


def test_unrecognized_zarr_group(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("w", data=np.ones(3))
    with pytest.raises(InputError, match=r"is not a matrix: .*found a group with members \['w'\]"):
        as_blocked(tmp_path / "g.zarr")


# ---------------------------------------------------------------------------------------------
# AnnData
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adata(counts):
    import anndata
    import pandas as pd

    cells, genes = counts.T.shape  # 45 cells × 60 genes
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(cells)])
    var = pd.DataFrame(index=[f"gene{i}" for i in range(genes)])
    ad = anndata.AnnData(X=sp.csr_matrix(counts.T.astype(np.float32)), obs=obs, var=var)
    ad.layers["counts"] = sp.csr_matrix(counts.T)  # int64
    ad.layers["dense"] = np.asarray(counts.T.toarray(), dtype=np.float64) * 2.0
    return ad


def _check_anndata_result(blocked, counts, layer):
    genes_by_cells = counts.toarray() * (2.0 if layer == "dense" else 1.0)
    assert blocked.shape == (60, 45)  # transposed: genes × cells
    assert blocked.row_names == tuple(f"gene{i}" for i in range(60))
    assert blocked.col_names == tuple(f"cell{i}" for i in range(45))
    assert blocked.dtype == (np.float32 if layer is None else np.float64)
    assert blocked.sparse == (layer != "dense")
    assert_same_matrix(blocked, genes_by_cells)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")  # anndata's own default, not ours
@pytest.mark.parametrize("layer", [None, "counts", "dense"])
def test_anndata_is_transposed_and_named(adata, counts, layer, tmp_path):
    _check_anndata_result(as_blocked(adata, layer=layer, block_nnz=50), counts, layer)
    adata.write_h5ad(tmp_path / "a.h5ad")
    _check_anndata_result(as_blocked(tmp_path / "a.h5ad", layer=layer, block_nnz=50), counts, layer)
    adata.write_zarr(tmp_path / "a.zarr")
    _check_anndata_result(as_blocked(str(tmp_path / "a.zarr"), layer=layer, block_nnz=50), counts, layer)


def test_anndata_csr_x_is_not_copied(adata):
    blocked = as_blocked(adata, dtype=np.float32)
    assert np.shares_memory(blocked.load_block(0).data, adata.X.data)  # CSR cells × genes = CSC genes × cells


def test_anndata_unknown_layer(adata, tmp_path):
    message = (r"The 'layer' parameter of as_blocked must be None or a layer of the AnnData: 'counts', 'dense'. "
               r"Got 'spliced' instead.")
    with pytest.raises(InputError, match=message):
        as_blocked(adata, layer="spliced")
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=message):
        as_blocked(tmp_path / "a.h5ad", layer="spliced")


# ---------------------------------------------------------------------------------------------
# write_zarr
# ---------------------------------------------------------------------------------------------


def test_write_zarr_sparse_round_trip(birds, tmp_path):
    import zarr

    path = write_zarr(birds, tmp_path / "b.zarr", block_nnz=3_000)
    assert path == str(tmp_path / "b.zarr")
    back = as_blocked(path, block_nnz=123)  # the stored blocking wins
    expected = as_blocked(birds, block_nnz=3_000)
    assert back.sparse and not back.in_memory and back.dtype == np.float64
    assert back.col_bounds.tolist() == expected.col_bounds.tolist()
    assert all(isinstance(s, ZarrBlockSource) for s in back.sources)
    assert [s.j for s in back.sources] == list(range(back.n_blocks))
    assert_same_matrix(back, birds)
    assert_canonical(back)
    g = zarr.open_group(path, mode="r")
    assert dict(g.attrs)["dnmf_format"] == "csc-blocked" and dict(g.attrs)["shape"] == [183, 1183]
    assert dict(g.attrs)["version"] == 1
    np.testing.assert_array_equal(g["block_bounds"][:], expected.col_bounds)
    np.testing.assert_array_equal(g["indptr"][:], birds.indptr)  # CSC pointer of the whole matrix
    # Every block starts on a chunk boundary and no two blocks share a chunk.
    clen = g["data"].chunks[0]
    assert clen == chunk_length(3_000) == 512
    chunks = [set(range(s.entry_start // clen, -(-s.entry_stop // clen))) for s in back.sources]
    assert all(s.entry_start % clen == 0 for s in back.sources)
    assert all(not (a & b) for i, a in enumerate(chunks) for b in chunks[i + 1 :])


def _codec_names(arr) -> list[str]:
    return [f"{c.cname.value}+{c.shuffle.value}" for c in arr.compressors]


LZ4 = ["lz4+shuffle"]  # dnmf's codec, zarr_store.default_compressors()


@pytest.mark.parametrize("compressors", ["auto", "lz4", None])
def test_write_zarr_codecs(tmp_path, compressors):
    """compressors="auto" chooses per array: Blosc LZ4 + shuffle where it saves ≥ 20 % of a
    sample's bytes (integer counts, row indices), raw where it does not (continuous float64
    values, which it shrinks ~1.05×: decoding them every iteration out of core costs ~7× a raw
    copy). An explicit codec goes on every array; None stores all raw. All read back exactly."""
    import zarr

    from dnmf.io.zarr_store import default_compressors

    rng = np.random.default_rng(0)
    smooth = sp.random(2_000, 1_500, density=0.05, random_state=1, format="csc")  # uniform (0, 1) values
    counts = smooth.copy()
    counts.data = rng.poisson(3.0, counts.nnz) + 1.0
    given = default_compressors() if compressors == "lz4" else compressors
    for A, data_auto in ((smooth, []), (counts, LZ4)):
        path = write_zarr(A, tmp_path / "s.zarr", block_nnz=40_000, compressors=given, overwrite=True)
        g = zarr.open_group(path, mode="r")
        got = {name: _codec_names(g[name]) for name in ("data", "indices")}
        if compressors is None:
            assert got == {"data": [], "indices": []}
        elif compressors == "lz4":
            assert got == {"data": LZ4, "indices": LZ4}
            # what "auto" decides matches Zarr's own frames: the first data chunk's compressed size
            # against its raw size, on either side of 1 − AUTO_MIN_SAVING = 0.8
            frame = (Path(path) / "data" / "c" / "0").stat().st_size
            raw = g["data"].chunks[0] * g["data"].dtype.itemsize  # counts are stored in float32
            assert (frame <= 0.8 * raw) == bool(data_auto), (frame, raw)
        else:
            assert got == {"data": data_auto, "indices": LZ4}
        assert_same_matrix(as_blocked(path), A)
        dense = write_zarr(A.toarray(), tmp_path / "d.zarr", block_nnz=40_000, compressors=given, overwrite=True)
        # a dense store of these matrices is 95 % zeros: every codec shrinks it
        assert _codec_names(zarr.open_array(dense, mode="r")) == ([] if compressors is None else LZ4)
        assert_same_matrix(as_blocked(dense), A)
    # a dense store of continuous values is stored raw by "auto"
    full = rng.uniform(size=(300, 200))
    dense = write_zarr(full, tmp_path / "f.zarr", block_nnz=10_000, compressors=given, overwrite=True)
    assert _codec_names(zarr.open_array(dense, mode="r")) == (LZ4 if compressors == "lz4" else [])
    assert_same_matrix(as_blocked(dense), full)


def test_auto_compressors_rule():
    """resolve_compressors' rule on samples whose Blosc LZ4 + shuffle frame size is known in
    kind: constant values shrink ~100×, random bytes not at all; the threshold sits between."""
    from dnmf.io.zarr_store import AUTO_MIN_SAVING, default_compressors, resolve_compressors

    assert 0 < AUTO_MIN_SAVING < 1
    assert resolve_compressors("auto", np.ones(50_000), np.float64) == default_compressors()
    noise = np.random.default_rng(3).integers(0, 2**63, 50_000).view(np.float64)
    assert resolve_compressors("auto", noise, np.float64) == ()
    assert resolve_compressors("auto", np.empty(0), np.float64) == default_compressors()
    assert resolve_compressors(None, noise, np.float64) is None  # anything but "auto" passes through


def test_write_zarr_dense_round_trip_float32(birds, tmp_path):
    import zarr

    dense = birds.toarray().astype(np.float32)
    path = write_zarr(dense, tmp_path / "d.zarr", block_nnz=2_000)
    arr = zarr.open_array(path, mode="r")
    assert arr.chunks == (183, 11) and dict(arr.attrs)["dnmf_format"] == "dense-blocked"
    back = as_blocked(path)
    assert not back.sparse and not back.in_memory and back.dtype == np.float32
    assert back.col_bounds.tolist() == as_blocked(dense, block_nnz=2_000).col_bounds.tolist()
    assert back.load_block(3).dtype == np.float32
    assert_same_matrix(back, dense)


def test_write_zarr_sparse_float32_and_dtype_override(birds, tmp_path):
    path = write_zarr(birds.astype(np.float32), tmp_path / "f.zarr", block_nnz=5_000)
    back = as_blocked(path)
    assert back.dtype == np.float32 and back.load_block(0).data.dtype == np.float32
    assert_same_matrix(back, birds.astype(np.float32))
    up = as_blocked(path, dtype=np.float64)
    assert up.dtype == np.float64 and up.load_block(0).data.dtype == np.float64


def test_write_zarr_all_zero_sparse(tmp_path):
    path = write_zarr(sp.csc_array((4, 7)), tmp_path / "z.zarr", block_nnz=10)
    back = as_blocked(path)
    assert back.shape == (4, 7) and back.nnz == 0
    assert_same_matrix(back, np.zeros((4, 7)))


def test_write_zarr_from_a_path_and_anndata_layer(birds, adata, counts, tmp_path):
    path = write_zarr(str(HAWAII), tmp_path / "h.zarr", block_nnz=2_000)
    assert_same_matrix(as_blocked(path), birds)
    # a store re-written with another blocking is re-cut while streaming
    again = write_zarr(path, tmp_path / "h2.zarr", block_nnz=7_000)
    assert as_blocked(again).col_bounds.tolist() == as_blocked(birds, block_nnz=7_000).col_bounds.tolist()
    assert_same_matrix(as_blocked(again), birds)
    path = write_zarr(adata, tmp_path / "ad.zarr", layer="counts", block_nnz=100)
    assert_same_matrix(as_blocked(path), counts)


def test_zarr_block_source_is_picklable_and_reads_fresh(birds, tmp_path):
    import zarr

    path = write_zarr(birds, tmp_path / "b.zarr", block_nnz=5_000)
    src = as_blocked(path).sources[1]
    clone = pickle.loads(pickle.dumps(src))
    assert clone == src
    first = clone.load()
    assert first.shape == (183, src.n_cols) and first.nnz == src.nnz and first.indptr[0] == 0
    np.testing.assert_array_equal(first.toarray(), birds[:, src.col_start : src.col_stop].toarray())
    # Rewrite the values on disk: the next load sees them (nothing is cached in the source).
    data = zarr.open_group(path, mode="r+")["data"]
    data[src.entry_start : src.entry_stop] = np.full(src.nnz, 7.0)
    np.testing.assert_array_equal(clone.load().data, np.full(src.nnz, 7.0))


@dataclass(frozen=True)
class CountingSource:
    """Columns ``start:stop`` of a matrix, handed out on ``load()``; counts its loads.

    Stands for a lazy source that generates its block (e.g. a simulator) and must be read
    exactly once per pass.
    """

    matrix: sp.csc_array
    start: int
    stop: int
    loads: list = field(default_factory=lambda: [0], compare=False)
    fail: bool = False

    @property
    def n_cols(self):
        return self.stop - self.start

    @property
    def nnz(self):
        return int(self.matrix.indptr[self.stop] - self.matrix.indptr[self.start])

    def load(self):
        self.loads[0] += 1
        if self.fail:
            raise RuntimeError("simulated failure while generating a block")
        part = sp.csc_array(self.matrix[:, self.start : self.stop])
        return CSCBlock(part.data, part.indices.astype(np.int32), part.indptr.astype(np.int64), part.shape[0])


def _lazy(matrix, edges, fail_at=None):
    sources = tuple(CountingSource(matrix, a, b, fail=(j == fail_at)) for j, (a, b) in enumerate(zip(edges, edges[1:])))
    return BlockedMatrix(matrix.shape, np.dtype(matrix.dtype), sources, sparse=True, in_memory=False)


def test_write_zarr_from_a_lazy_blocked_matrix(birds, tmp_path):
    lazy = _lazy(birds, [0, 100, 450, 451, 900, 1183])
    path = write_zarr(lazy, tmp_path / "lazy.zarr", block_nnz=2_500)
    assert all(s.loads == [1] for s in lazy.sources)  # streamed: each block generated once
    back = as_blocked(path)
    assert back.col_bounds.tolist() == as_blocked(birds, block_nnz=2_500).col_bounds.tolist()  # re-cut
    assert_same_matrix(back, birds)


def test_interrupted_write_leaves_nothing(birds, tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError, match="simulated failure"):
        write_zarr(_lazy(birds, [0, 300, 600, 900, 1183], fail_at=2), target, block_nnz=2_000)
    assert os.listdir(tmp_path) == []  # neither the store nor its temporary copy
    # With overwrite=True an interrupted write keeps the previous store intact.
    write_zarr(birds[:, :50], target, block_nnz=2_000)
    with pytest.raises(RuntimeError, match="simulated failure"):
        write_zarr(_lazy(birds, [0, 300, 600, 1183], fail_at=1), target, overwrite=True)
    assert os.listdir(tmp_path) == ["out.zarr"]
    assert_same_matrix(as_blocked(target), birds[:, :50])


def test_write_zarr_overwrite(birds, tmp_path):
    target = tmp_path / "out.zarr"
    write_zarr(birds[:, :50], target)
    with pytest.raises(InputError, match=r"The path '.*out\.zarr' passed to write_zarr exists; pass overwrite=True"):
        write_zarr(birds, target)
    write_zarr(birds, target, overwrite=True)
    assert_same_matrix(as_blocked(target), birds)
    assert os.listdir(tmp_path) == ["out.zarr"]
    with pytest.raises(InputError, match=r"The 'overwrite' parameter of write_zarr must be a bool. Got 'yes'"):
        write_zarr(birds, target, overwrite="yes")


def test_public_names():
    assert set(dnmf.io.__all__) >= {"as_blocked", "write_zarr", "BlockedMatrix", "BlockSource", "CSCBlock",
                                    "InMemorySource", "ZarrBlockSource"}
