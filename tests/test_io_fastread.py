"""dnmf.io.chunks: range reads of dnmf's own Zarr stores straight from the chunk files.

Every read is compared, bitwise, with what zarr itself returns for the same range of the same
store (the independent reference), for Blosc LZ4 (dnmf's default), raw and Zstandard (zarr's
path) stores; the fast path is shown to be taken by making zarr's path raise.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import dnmf
from dnmf.exceptions import InputError
from dnmf.io import chunks, zarr_store

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")  # fits stop at maxit

# "lz4": dnmf's Blosc codec on every array (compressors="auto" would store these continuous values raw)
CODECS = {"lz4": zarr_store.default_compressors(), "raw": None, "zstd": (ZstdCodec(level=0),)}
FAST = {"lz4": True, "raw": True, "zstd": False}  # zstd is not a supported form: zarr reads it


def _matrix(dtype, seed=0, m=60, n=500, density=0.05):
    return sp.random(m, n, density=density, random_state=seed, format="csc", dtype=dtype)


def _write(tmp_path, codec, dtype=np.float64, index=np.int32, block_nnz=300, monkeypatch=None, name="a"):
    """A dnmf store of a 60 × 500 matrix (1,500 entries); chunks of 256 entries (the minimum)."""
    if index == np.int64:  # int64 indices are written only past 2**31 entries: force them
        monkeypatch.setattr(zarr_store, "index_dtype", lambda nnz, m: np.dtype(np.int64))
    path = str(tmp_path / f"{name}.zarr")
    dnmf.io.write_zarr(_matrix(dtype), path, block_nnz=block_nnz, compressors=CODECS[codec], overwrite=True)
    return path


def _same(a, b):
    """Bitwise equality, dtype included (NaN fill values compare equal)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _no_zarr(monkeypatch):
    def fail(*args):
        raise AssertionError(f"read through zarr: {args}")

    monkeypatch.setattr(chunks, "_read_zarr", fail)


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("dtype,index", [(np.float64, np.int32), (np.float32, np.int64)], ids=["f64-i32", "f32-i64"])
def test_read_range_equals_zarr(tmp_path, monkeypatch, codec, dtype, index):
    path = _write(tmp_path, codec, dtype, index, monkeypatch=monkeypatch)
    g = zarr.open_group(path, mode="r")
    expected = {name: g[name][:] for name in ("data", "indices", "indptr")}
    assert expected["data"].dtype == dtype and expected["indices"].dtype == index
    assert g["data"].chunks == (256,) and len(expected["data"]) > 5 * 256
    layout = chunks.chunk_layout(os.path.join(path, "data"))
    assert (layout is not None) == FAST[codec]
    if FAST[codec]:
        assert layout.blosc == (codec == "lz4") and layout.chunk_length == 256
        _no_zarr(monkeypatch)
    rng = np.random.default_rng(0)
    for name, full in expected.items():
        n = len(full)
        # ranges starting and ending mid-chunk, inside one chunk, on chunk bounds, empty, the whole
        # array, and random ones (all inside the array: ranges outside it are zarr's to read)
        ranges = [(0, 0), (0, n), (3, 250), (100, 700), (256, 512), (256, 300), (n - 5, n), (n, n)]
        ranges = [(min(a, n), min(b, n)) for a, b in ranges]
        ranges += [tuple(sorted(rng.integers(0, n + 1, size=2))) for _ in range(20)]
        for a, b in ranges:
            got = chunks.read_range(path, name, a, b)
            assert _same(got, full[a:b]), (name, a, b)
            assert got.flags.writeable and got.flags.c_contiguous


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("block_nnz", [700, 200], ids=["blocks-over-chunks", "blocks-in-one-chunk"])
@pytest.mark.parametrize("dtype,index", [(np.float64, np.int32), (np.float32, np.int64)], ids=["f64-i32", "f32-i64"])
def test_block_loads_equal_zarr(tmp_path, monkeypatch, codec, block_nnz, dtype, index):
    path = _write(tmp_path, codec, dtype, index, block_nnz=block_nnz, monkeypatch=monkeypatch)
    blocked = dnmf.io.as_blocked(path)
    cast = dnmf.io.as_blocked(path, dtype=np.float32 if dtype == np.float64 else np.float64)
    g = zarr.open_group(path, mode="r")
    if FAST[codec]:
        _no_zarr(monkeypatch)
    assert len(blocked.sources) > 1
    spans = [s.entry_stop - s.entry_start for s in blocked.sources]
    # 200-entry blocks lie inside one 256-entry chunk; 700-entry blocks span three and end mid-chunk
    assert (max(spans) <= 256) == (block_nnz == 200)
    for src, src_cast in zip(blocked.sources, cast.sources):
        ip = np.asarray(g["indptr"][src.col_start : src.col_stop + 1], dtype=np.int64)
        data, indices = g["data"][src.entry_start : src.entry_stop], g["indices"][src.entry_start : src.entry_stop]
        for s, want in ((src, data), (src_cast, data.astype(src_cast.dtype))):
            block = s.load()
            assert _same(block.indptr, ip - ip[0]) and _same(block.indices, indices) and _same(block.data, want)


def test_foreign_csc_group_with_blosc_int64_is_read_fast_and_canonicalized(tmp_path, monkeypatch):
    # An h5sparse/AnnData-style CSC group written by zarr (Blosc zstd, int64 indices), with unsorted
    # rows and a duplicate: the fast path reads it, the loader still sorts and sums duplicates.
    data = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    indices = np.array([2, 0, 1, 1, 3, 0], dtype=np.int64)
    indptr = np.array([0, 2, 4, 4, 6], dtype=np.int64)
    path = str(tmp_path / "foreign.zarr")
    g = zarr.open_group(path, mode="w", zarr_format=3)
    blosc = (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),)
    for name, arr in (("data", data), ("indices", indices), ("indptr", indptr)):
        g.create_array(name, data=arr, chunks=(4,), compressors=blosc)
    g.attrs.update({"encoding-type": "csc_matrix", "shape": [4, 4]})
    reference = sp.csc_array((data, indices, indptr), shape=(4, 4))
    _no_zarr(monkeypatch)
    blocked = dnmf.io.as_blocked(path, block_nnz=3)
    got = sp.hstack([sp.csc_array((b.data, b.indices, b.indptr), shape=b.shape)
                     for b in (s.load() for s in blocked.sources)]).tocsc()
    assert got.has_canonical_format and got.indices.dtype == np.int64
    np.testing.assert_array_equal(got.toarray(), reference.toarray())  # sums of two small integers: exact


def test_missing_chunk_reads_like_zarr(tmp_path, monkeypatch):
    path = _write(tmp_path, "lz4", block_nnz=700)
    blocked = dnmf.io.as_blocked(path)  # the store is complete when opened
    os.remove(os.path.join(path, "data", "c", "1"))  # a chunk of data lost afterwards: NaN fill
    full = zarr.open_group(path, mode="r")["data"][:]
    assert np.isnan(full[256:512]).all()
    assert _same(chunks.read_range(path, "data", 200, 600), full[200:600])
    src = blocked.sources[0]
    assert src.entry_start < 256 < src.entry_stop
    assert _same(src.load().data, full[src.entry_start : src.entry_stop])
    # A lost chunk of indices reads as -1, which the structure check rejects with the same error
    # on both paths.
    os.remove(os.path.join(path, "indices", "c", "0"))
    with pytest.raises(InputError) as fast:
        src.load()
    monkeypatch.setattr(chunks, "chunk_layout", lambda directory: None)
    with pytest.raises(InputError) as slow:
        src.load()
    assert str(fast.value) == str(slow.value) and "-1" in str(fast.value)


def test_rewritten_store_is_read_with_its_new_metadata(tmp_path, monkeypatch):
    path = _write(tmp_path, "lz4")
    first = chunks.read_range(path, "data", 10, 900)
    path = _write(tmp_path, "raw")  # same path, now raw chunks: the cached layout must not be reused
    assert not chunks.chunk_layout(os.path.join(path, "data")).blosc
    assert _same(chunks.read_range(path, "data", 10, 900), first)


def test_unsupported_metadata_is_left_to_zarr(tmp_path):
    path = _write(tmp_path, "lz4")
    with open(os.path.join(path, "data", "zarr.json")) as f:
        meta = json.load(f)
    assert chunks._parse_layout("d", meta) is not None

    def variant(**changes):
        m = json.loads(json.dumps(meta))
        for key, value in changes.items():
            m[key] = value
        return chunks._parse_layout("d", m)

    blosc = meta["codecs"][1]
    assert variant(chunk_key_encoding={"name": "default", "configuration": {"separator": "."}}).separator == "."
    assert variant(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}) is None
    assert variant(codecs=[{"name": "bytes", "configuration": {"endian": "big"}}, blosc]) is None
    assert variant(codecs=[meta["codecs"][0], blosc, {"name": "crc32c"}]) is None
    assert variant(codecs=[{"name": "transpose", "configuration": {"order": [0]}}, *meta["codecs"]]) is None
    assert variant(storage_transformers=[{"name": "x"}]) is None
    assert variant(shape=[10, 10]) is None
    assert variant(data_type="complex128") is None
    assert variant(chunk_grid={"name": "rectilinear", "configuration": {"chunk_shape": [256]}}) is None
    assert variant(zarr_format=2) is None
    assert variant(some_extension={"must_understand": True}) is None
    assert chunks.chunk_layout("s3://bucket/store/data") is None
    assert chunks.chunk_layout(str(tmp_path / "nowhere")) is None


def test_streamed_fit_equals_in_memory_fit(tmp_path):
    distributed = pytest.importorskip("distributed")
    A = _matrix(np.float64, seed=3, m=80, n=400, density=0.08)
    path = str(tmp_path / "fit.zarr")
    dnmf.io.write_zarr(A, path, block_nnz=500)
    kw = dict(seed=2, maxit=6, tol=0, block_nnz=500)
    memory = dnmf.nmf(A, 4, client=False, **kw)
    local = dnmf.nmf(path, 4, out_of_core=True, client=False, **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        streamed = dnmf.nmf(path, 4, out_of_core=True, client=client, **kw)
    assert local.misc["out_of_core"] and streamed.misc["out_of_core"]
    assert memory.misc["n_blocks"] == local.misc["n_blocks"] == streamed.misc["n_blocks"] > 2
    for model in (local, streamed):  # same blocks, same seed: the same fit to the bit
        assert np.array_equal(model.w, memory.w) and np.array_equal(model.h, memory.h)
        assert np.array_equal(model.d, memory.d)


def test_dot_separated_chunk_keys_and_foreign_blosc_settings(tmp_path, monkeypatch):
    # Chunk files "c.<i>", Blosc blosclz with bit shuffle, a non-default block size and typesize 2.
    values = np.arange(1000, dtype=np.uint16) * 7
    path = str(tmp_path / "dots.zarr")
    arr = zarr.create_array(path, shape=values.shape, chunks=(96,), dtype=values.dtype,
                            chunk_key_encoding={"name": "default", "separator": "."},
                            compressors=(BloscCodec(cname="blosclz", clevel=9, shuffle="bitshuffle", blocksize=64),))
    arr[:] = values
    assert os.path.exists(os.path.join(path, "c.3")) and chunks.chunk_layout(path).separator == "."
    _no_zarr(monkeypatch)
    for a, b in ((0, 1000), (95, 97), (500, 501), (960, 1000)):
        assert _same(chunks.read_range(path, "", a, b), values[a:b])


def test_corrupt_chunk_is_left_to_zarr(tmp_path):
    path = _write(tmp_path, "lz4")
    chunk = os.path.join(path, "data", "c", "2")
    with open(chunk, "r+b") as f:  # keep the Blosc header (sizes), garble the compressed stream
        f.seek(16)
        f.write(b"\xff" * 64)
    with pytest.raises(Exception) as fast:
        chunks.read_range(path, "data", 0, 1000)
    with pytest.raises(Exception) as slow:
        zarr.open_group(path, mode="r")["data"][0:1000]
    assert type(fast.value) is type(slow.value) and str(fast.value) == str(slow.value)


@pytest.mark.parametrize("codec", ["lz4", "raw"])
def test_transient_reads_reuse_buffers_per_thread_and_never_alias_within_one(tmp_path, codec):
    # io/chunks.py, "Reused buffers": inside transient_reads the arrays are views of the thread's
    # buffers, kept from one activation to the next; each read of an activation has its own.
    path = _write(tmp_path, codec)
    g = zarr.open_group(path, mode="r")
    ranges = {"data": (3, 700), "indices": (100, 1_000), "indptr": (10, 300)}  # mid-chunk ends
    want = {name: g[name][a:b] for name, (a, b) in ranges.items()}

    def read_all():
        return {name: chunks.read_range(path, name, a, b) for name, (a, b) in ranges.items()}

    chunks.release_read_buffers()
    with chunks.transient_reads():
        first = read_all()
        with chunks.transient_reads():  # nested: part of the outer activation
            inner = chunks.read_range(path, "data", *ranges["data"])
    arrays = [*first.values(), inner]
    assert all(_same(first[name], want[name]) for name in ranges) and _same(inner, want["data"])
    assert not any(np.shares_memory(x, y) for i, x in enumerate(arrays) for y in arrays[i + 1:])
    with chunks.transient_reads():
        second = read_all()
    for name in ranges:  # the same buffers again, refilled
        assert np.shares_memory(first[name], second[name]) and _same(second[name], want[name])
    plain = read_all()  # outside an activation: arrays of their own
    assert not any(np.shares_memory(plain[name], second[name]) for name in ranges)
    assert chunks.release_read_buffers() >= sum(w.nbytes for w in want.values()) + want["data"].nbytes
    with chunks.transient_reads():
        third = read_all()
    assert not any(np.shares_memory(third[name], second[name]) for name in ranges)
    assert all(_same(third[name], want[name]) for name in ranges)


def test_streamed_block_task_results_do_not_view_the_read_buffers(tmp_path):
    # A block task reads its block into the reused buffers (engine/als.py::loaded): what it
    # returns must survive the next task on the same thread.
    from dnmf.engine.als import h_update_task
    from dnmf.kernels.nnls import SOLVER_CHOLESKY
    from dnmf.solvers.hstep import HStep

    path = _write(tmp_path, "lz4", block_nnz=400)
    sources = dnmf.io.as_blocked(path).sources
    k = 3
    w = np.random.default_rng(0).uniform(size=(60, k))
    G = w.T @ w
    hs = HStep(w, G, np.linalg.cholesky(G), 0.0, np.ones(k), SOLVER_CHOLESKY, True, 100, 1e-8)
    chunks.release_read_buffers()
    first = h_update_task(sources[0], None, hs)
    kept = (first[0].copy(), first[1].P.copy(), first[1].Q.copy())
    h_update_task(sources[1], None, hs)  # the same thread's buffers, other values
    assert np.array_equal(first[0], kept[0]) and np.array_equal(first[1].P, kept[1])
    assert np.array_equal(first[1].Q, kept[2])
    # and the results are those of the block read into arrays of its own
    again = h_update_task(sources[0].load(), None, hs)
    assert np.array_equal(again[0], kept[0]) and np.array_equal(again[1].P, kept[1])


def test_dnmf_stores_use_64k_blosc_blocks(tmp_path):
    # default_compressors: 64 KiB Blosc blocks (a whole-chunk block made each decode allocate a
    # chunk-sized scratch buffer; zarr_store.py). The header's bytes 8:12 hold the block size.
    A = sp.random(2_000, 3_000, density=0.05, random_state=0, format="csc")
    A.data = np.floor(A.data * 8) + 1  # counts: compressors="auto" compresses them (zarr_store.py)
    path = tmp_path / "big.zarr"
    dnmf.io.write_zarr(A, str(path), block_nnz=300_000)  # chunks of 65,536 entries
    for name, itemsize in (("data", 4), ("indices", 4)):  # counts are stored in float32 (exact; zarr_store.py)
        frame = (path / name / "c" / "0").read_bytes()
        assert int.from_bytes(frame[4:8], "little") == 65_536 * itemsize  # the whole chunk
        assert int.from_bytes(frame[8:12], "little") == 65_536
