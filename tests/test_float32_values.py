"""Float64 values that float32 holds exactly (counts) are stored in float32 (io/zarr_store.py,
"Values"): the store reads back as the float64 matrix, and every fit on it — in memory or
streamed, in-process or on a 2-worker cluster, every loop — is bitwise the fit of the float64
matrix in memory (the reference: the same call on the scipy matrix)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import dnmf
from dnmf.io import as_blocked

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")  # fits stop at maxit

BLOCK_NNZ = 1500  # 8,000 stored entries: 5+ column blocks, so both workers run block tasks


def _counts(values=None, seed=0):
    pattern = sp.random(200, 400, density=0.1, random_state=seed, format="csc")
    rng = np.random.default_rng(seed)
    data = rng.poisson(3.0, pattern.nnz) + 1.0 if values is None else values(rng, pattern.nnz)
    return sp.csc_matrix((data, pattern.indices, pattern.indptr), shape=pattern.shape)


def _stored(tmp_path, A, name="a"):
    path = dnmf.io.write_zarr(A, os.path.join(tmp_path, f"{name}.zarr"), block_nnz=BLOCK_NNZ)
    return path, zarr.open_group(path, mode="r")


def _same_fit(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("w", "d", "h"))


@pytest.fixture(scope="module")
def counts_store(tmp_path_factory):
    A = _counts()
    path, _ = _stored(str(tmp_path_factory.mktemp("f32")), A)
    return A, path


def test_counts_are_stored_in_float32_and_read_back_as_float64(tmp_path):
    A = _counts()
    path, g = _stored(str(tmp_path), A)
    assert g["data"].dtype == np.float32 and g.attrs["value_dtype"] == "float64" and g.attrs["version"] == 2
    B = as_blocked(path)
    # a float64 matrix whose blocks load as float64 (every reader), or as stored (the ALS passes)
    assert B.dtype == np.float64 and B.load_block(0).data.dtype == np.float64
    assert B.sources[0].load_stored().data.dtype == np.float32
    assert np.array_equal(B.sources[0].load_stored().data, B.load_block(0).data)
    back = B.to_scipy()
    assert back.dtype == np.float64 and (back != A).nnz == 0
    # dtype="float32": the float32 values as they are
    f32 = as_blocked(path, dtype="float32")
    assert f32.dtype == np.float32 and f32.load_block(0).data.dtype == np.float32
    # missing values (NaN) are float32 too
    nan = A.copy()
    nan.data[::7] = np.nan
    path, g = _stored(str(tmp_path), nan, "nan")
    assert g["data"].dtype == np.float32
    assert np.array_equal(as_blocked(path).to_scipy().data, nan.data, equal_nan=True)


@pytest.mark.parametrize("case", ["continuous", "past_2_24", "tiny", "lazy"])
def test_values_float32_would_change_stay_float64(tmp_path, case):
    if case == "continuous":  # uniform [0, 1) doubles: float32 rounds them
        A = _counts(lambda rng, n: rng.random(n))
    elif case == "past_2_24":  # 2**24 + 1 is the first integer float32 rounds
        A = _counts(lambda rng, n: np.where(np.arange(n) == 5, 2.0 ** 24 + 1, 1.0))
    elif case == "tiny":  # exact in float32, but a fit rescales max|A| < 2**-10 (io/validate.py::SAFE_MAX_RANGE)
        A = _counts(lambda rng, n: np.full(n, 2.0 ** -12))
    else:  # a lazy source (the counts' own store, written again) is not read twice to check
        A = as_blocked(_stored(str(tmp_path), _counts(), "counts")[0])
        assert not A.in_memory and A.dtype == np.float64
    path, g = _stored(str(tmp_path), A, "b")
    assert g["data"].dtype == np.float64 and "value_dtype" not in g.attrs and g.attrs["version"] == 1
    assert as_blocked(path).dtype == np.float64


# the loops that read a store's blocks: the fused ALS pass (in memory, streamed, SVD start), the
# masked pass (mask="zeros" with a test set), IRLS (NB) and KL; and dtype="float32"
FITS = {"als": {}, "streamed": {"out_of_core": True}, "svd": {"init": "svd"},
        "masked": {"mask": "zeros", "test_fraction": 0.1}, "nb": {"loss": "nb"}, "kl": {"loss": "kl"},
        "float32": {"dtype": "float32"}}


@pytest.mark.parametrize("fit", list(FITS))
def test_fit_on_the_store_is_the_float64_fit_in_process(counts_store, fit):
    A, path = counts_store
    kw = dict(seed=1, maxit=6, tol=0, block_nnz=BLOCK_NNZ, client=False, **FITS[fit])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _same_fit(dnmf.nmf(path, 4, **kw), dnmf.nmf(A, 4, **kw))


def test_fit_on_the_store_is_the_float64_fit_on_a_cluster(counts_store):
    distributed = pytest.importorskip("distributed")
    A, path = counts_store
    kw = dict(seed=1, maxit=6, tol=0, block_nnz=BLOCK_NNZ)
    memory = dnmf.nmf(A, 4, client=False, **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        fits = {"placed": dnmf.nmf(path, 4, client=client, **kw),
                "streamed": dnmf.nmf(path, 4, out_of_core=True, client=client, **kw),
                "nb": dnmf.nmf(path, 4, client=client, loss="nb", **kw)}
    assert fits["streamed"].misc["out_of_core"] and fits["placed"].misc["n_blocks"] > 2
    assert _same_fit(fits["placed"], memory) and _same_fit(fits["streamed"], memory)
    assert _same_fit(fits["nb"], dnmf.nmf(A, 4, client=False, loss="nb", **kw))


def test_the_als_pass_reads_the_stored_float32_values(counts_store):
    # the point of the layout: the fused pass gets the float32 values (half the bytes) with a
    # float64 W (the float64 fit's products), not values cast back to float64 on every load
    from dnmf.kernels import fused

    A, path = counts_store
    for stream in (False, True):
        dnmf.nmf(path, 4, seed=1, maxit=2, tol=0, block_nnz=BLOCK_NNZ, client=False, out_of_core=stream)
    sigs = [tuple(str(t) for t in sig) for d in fused._CSC_BLOCK_PASS.values() for sig in d.signatures]
    assert any(s[0].startswith("array(float32") and s[3].startswith("array(float64") for s in sigs), sigs
