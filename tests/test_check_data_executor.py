"""check_data as a chunk → combine → aggregate reduction on the executor (in-process and Dask).

The reference is the serial pass (no executor): the summary and every error message must be
the same on every path, and a lazy (out-of-core) source must be read on the workers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from dnmf.engine.executor import LocalExecutor
from dnmf.exceptions import InputError
from dnmf.io import as_blocked
from dnmf.io.blocks import BlockedMatrix, CSCBlock
from dnmf.io.validate import DataCheck, check_data, check_data_agg, check_data_chunk, check_data_combine
from dnmf.io.writers import write_zarr

distributed = pytest.importorskip("distributed")

#: Where each LazySource.load() ran: the worker's address, or "client" outside any worker.
LOADED_ON: list = []
_LOCK = threading.Lock()


@dataclass(frozen=True)
class LazySource:
    """Columns ``start:stop`` of ``matrix`` built on ``load()`` (a stand-in for a disk read);
    records where it was loaded."""

    matrix: object
    start: int
    stop: int
    sparse: bool

    @property
    def n_cols(self):
        return self.stop - self.start

    @property
    def nnz(self):
        return int(np.count_nonzero(self.matrix[:, self.start:self.stop]))

    def load(self):
        try:
            where = distributed.get_worker().address
        except ValueError:
            where = "client"
        with _LOCK:
            LOADED_ON.append(where)
        part = np.array(self.matrix[:, self.start:self.stop])
        if not self.sparse:
            return part
        csc = sp.csc_array(part)
        csc.eliminate_zeros()  # keeps NaN; drops explicit zeros so the block is canonical
        return CSCBlock(csc.data, csc.indices.astype(np.int32), csc.indptr.astype(np.int64), part.shape[0])


def _lazy(A, width: int, sparse: bool) -> BlockedMatrix:
    n = A.shape[1]
    sources = tuple(LazySource(A, j, min(j + width, n), sparse) for j in range(0, n, width))
    return BlockedMatrix(A.shape, np.dtype(A.dtype), sources, sparse=sparse, in_memory=False)


@pytest.fixture(scope="module")
def client2():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def executors(client2):
    from dnmf.engine.executor import DaskExecutor

    local = LocalExecutor(2)
    yield {"threads": local, "dask": DaskExecutor(client2)}
    local.close()


def _matrix(seed=0):
    rng = np.random.default_rng(seed)
    A = rng.uniform(size=(30, 47)) * (rng.uniform(size=(30, 47)) < 0.3)
    A[5, 3] = 7.0
    return A


def _error(blocked, executor, **kw) -> str:
    with pytest.raises(InputError) as info:
        check_data(blocked, executor=executor, **kw)
    return str(info.value)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_summary_identical_to_serial_pass(executors, kind, sparse):
    A = _matrix()
    A[2, 40] = -0.5
    for blocked in (_lazy(A, 5, sparse), as_blocked(sp.csc_array(A) if sparse else A, block_nnz=40)):
        serial = check_data(blocked, allow_negative=True)
        parallel = check_data(blocked, allow_negative=True, executor=executors[kind])
        assert parallel == serial  # bitwise: the per-block ‖A_j‖² are summed in block order
        assert serial.n_negative == 1 and serial.min == -0.5 and serial.max == 7.0
        assert _error(blocked, executors[kind]) == _error(blocked, None) == (
            "The data A passed to nmf must be non-negative; found 1 negative entries, e.g. A[2, 40] = -0.5.")


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_errors_identical_to_serial_pass(executors, kind, sparse):
    A = _matrix(1)
    A[3, 17] = np.nan
    A[0, 44] = np.inf
    A[1, 2] = -1.0  # reported after the non-finite entries
    blocked = _lazy(A, 4, sparse)
    message = _error(blocked, None, func="cv")
    assert message == ("The data A passed to cv must be finite: A contains 2 NaN/Inf value(s), e.g. at (3, 17) "
                       "where A[3, 17] = nan.")
    assert _error(blocked, executors[kind], func="cv") == message


@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_first_structure_error_in_block_order_wins(executors, kind):
    ok = CSCBlock(np.ones(2), np.array([0, 1], np.int32), np.array([0, 1, 2]), 4)
    nan = CSCBlock(np.array([np.nan, 1.0]), np.array([0, 1], np.int32), np.array([0, 1, 2]), 4)
    unsorted = CSCBlock(np.array([1.0, 2.0]), np.array([3, 1], np.int32), np.array([0, 2, 2]), 4)
    out_of_range = CSCBlock(np.array([1.0]), np.array([9], np.int32), np.array([0, 0, 1]), 4)
    from dnmf.io.blocks import InMemorySource

    sources = tuple(InMemorySource(b) for b in (ok, nan, ok, unsorted, out_of_range, ok))
    blocked = BlockedMatrix((4, 12), np.dtype(np.float64), sources, sparse=True, in_memory=False)
    message = _error(blocked, None)
    # a broken block is reported before a NaN in an earlier block, as the serial pass does
    assert "column 6 lists row 1 after row 3" in message
    assert _error(blocked, executors[kind]) == message


def test_lazy_blocks_are_read_on_the_workers(executors):
    A = _matrix(2)
    blocked = _lazy(A, 3, True)
    serial = check_data(blocked)
    LOADED_ON.clear()
    assert check_data(blocked, executor=executors["dask"]) == serial
    assert len(LOADED_ON) == blocked.n_blocks and "client" not in LOADED_ON


def test_zarr_store_checked_on_the_cluster(executors, tmp_path):
    A = sp.random(60, 80, density=0.1, random_state=4, format="csc")
    blocked = as_blocked(write_zarr(A, tmp_path / "a.zarr", block_nnz=50))
    assert not blocked.in_memory and blocked.n_blocks > 4
    serial = check_data(blocked)
    assert serial.sq_norm == pytest.approx(float(np.sum(A.toarray() ** 2)), rel=1e-13)  # float64 sums, ~10 ulps
    for executor in executors.values():
        assert check_data(blocked, executor=executor) == serial


def test_combine_is_associative_and_keeps_the_first_entries():
    A = _matrix(3)
    A[0, 1] = A[2, 20] = -1.0
    blocked = _lazy(A, 5, False)
    parts = [check_data_chunk(s, int(c), 30) for s, c in zip(blocked.sources, blocked.col_bounds[:-1])]
    left = DataCheck()
    for p in parts:
        left = check_data_combine(left, p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = check_data_combine(p, right)
    assert left == right
    assert left.negative_at[:2] == (0, 1) and left.n_negative == 2
    assert check_data_agg(left, allow_negative=True) == check_data(blocked, allow_negative=True)
