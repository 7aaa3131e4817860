"""Masks, NaN, zeros-as-missing and speckled cross-validation (issue 8).

References: a plain-NumPy/SciPy masked ALS written here (every column's and row's masked least
squares solved by ``scipy.optimize.nnls``), the hash of spec/rcppml.md §5.2 evaluated with
Python integers, SplitMix64 of §12.3 likewise, and RcppML 1.0's own cross-validation table on
hawaiibirds (``nmf(A, k = 2:12, cv_seed = 1:3, threads = 2)``, run once with the prebuilt
package of shared/tools/rcppml; the numbers are stored below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls

import dnmf
from dnmf.cv import CVResult, engine_init, splitmix64_uniform
from dnmf.exceptions import InputError
from dnmf.kernels.masked import held_out, holdout_mask, holdout_seed, holdout_threshold
from references import reference_masked_als

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

U64 = (1 << 64) - 1


def _mix_py(z: int) -> int:
    z &= U64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & U64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def held_out_py(i: int, j: int, cv_seed: int, fraction: float) -> bool:
    """§5.2 by hand, in Python integers."""
    seed = cv_seed & 0xFFFFFFFF or 12345
    inv = int(1.0 / float(np.float32(fraction)))
    return _mix_py(seed + i * 0x9E3779B97F4A7C15 + j * 0x6C62272E07BB0142) < U64 // inv


# ---------------------------------------------------------------------------------------------
# The hold-out hash and the engine's random init
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cv_seed", [0, 1, 3, 12345, 2**32 + 7])
def test_holdout_hash_matches_the_spec_by_hand(cv_seed):
    rng = np.random.default_rng(cv_seed % 1000)
    rows = rng.integers(0, 50_000, 400)
    cols = rng.integers(0, 2_000_000, 400)
    expect = np.array([held_out_py(int(i), int(j), cv_seed, 0.3) for i, j in zip(rows, cols)])
    np.testing.assert_array_equal(holdout_mask(rows, cols, cv_seed, 0.3), expect)
    seed, thr = holdout_seed(cv_seed), holdout_threshold(0.3)
    assert [bool(held_out(seed, np.uint64(i), np.uint64(j), thr)) for i, j in zip(rows, cols)] == list(expect)
    assert expect.any() and not expect.all()


@pytest.mark.parametrize("fraction, inv", [(0.05, 19), (0.1, 9), (0.2, 4), (0.25, 4), (0.3, 3), (0.5, 2), (0.01, 100)])
def test_realised_fraction_is_one_over_floor_inverse(fraction, inv):
    # §5.2: inv = floor(1 / float32(f)); the realised fraction is 1/inv (0.05 → 1/19).
    assert int(holdout_threshold(fraction)) == U64 // inv
    ii, jj = np.meshgrid(np.arange(2000), np.arange(1000), indexing="ij")
    share = holdout_mask(ii.ravel(), jj.ravel(), 1, fraction).mean()
    # 2·10⁶ entries: a binomial share has sd √(p(1−p)/N) ≤ 3.6e-4; 5 sd
    assert abs(share - 1 / inv) < 5 * np.sqrt((1 / inv) * (1 - 1 / inv) / ii.size)


def test_splitmix64_matches_the_spec_by_hand():
    def first(seed, count):
        s = seed or 12345
        out = []
        for _ in range(count):
            s = (s + 0x9E3779B97F4A7C15) & U64
            out.append(float(np.float32(_mix_py(s)) / np.float32(U64)))
        return out

    for seed in (0, 1, 7, 2**40 + 3):
        np.testing.assert_array_equal(splitmix64_uniform(seed, 50), first(seed, 50))
    # Wt (k × m) filled column-major: feature i's k values are draws i·k … i·k + k − 1
    w = engine_init(5, 3, 9)
    np.testing.assert_array_equal(w[2], splitmix64_uniform(9, 15)[6:9])


# ---------------------------------------------------------------------------------------------
# Masked fits against a NumPy reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    m, n, k = 30, 25, 3
    A = rng.gamma(1.0, 1.0, (m, k)) @ rng.gamma(1.0, 1.0, (k, n)) + rng.uniform(0, 0.3, (m, n))
    A[rng.uniform(size=(m, n)) < 0.3] = 0
    M = rng.uniform(size=(m, n)) < 0.15
    return A, M, rng.uniform(size=(m, k))


def _fit(A, w0, **kw):
    # The exact active-set solver, so the reference's scipy nnls is the same problem; no sorting
    # so factors line up; block_nnz small for several column (and row) blocks.
    kw = dict(dict(solver="exact", tol=0, maxit=4, sort_model=False, block_nnz=100, client=False), **kw)
    return dnmf.nmf(A, w0.shape[1], init=w0, **kw)


def _same(model, W, d, H):
    # Both solve the same NNLS problems exactly; they differ by rounding (normal equations here,
    # QR in scipy's nnls) amplified over 4 alternating iterations: 1e-9 relative is far below
    # any modelling difference (a mask wrong by one entry moves factors by ~1e-3).
    np.testing.assert_allclose(model.w, W, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.d, d, rtol=1e-9)
    np.testing.assert_allclose(model.h, H, rtol=1e-9, atol=1e-12)


def test_user_mask_matches_reference(small):
    A, M, w0 = small
    model = _fit(sp.csc_matrix(A), w0, mask=sp.csc_matrix(M))
    W, d, H, R = reference_masked_als(A, M, w0, 4)
    _same(model, W, d, H)
    # loss: the SSE over the observed entries; evaluate(mask=) gives its mean
    np.testing.assert_allclose(model.misc["loss"], (R[~M] ** 2).sum(), rtol=1e-9)
    np.testing.assert_allclose(model.evaluate(A, mask=M), (R[~M] ** 2).mean(), rtol=1e-9)
    assert model.misc["mask"] == "matrix"


def test_nan_entries_are_missing(small):
    A, M, w0 = small
    An = A.copy()
    An[M] = np.nan
    dense_nan = _fit(An, w0)
    masked = _fit(A, w0, mask=M)
    # the same problems in the same order: bitwise
    np.testing.assert_array_equal(dense_nan.w, masked.w)
    np.testing.assert_array_equal(dense_nan.h, masked.h)
    assert dense_nan.misc["mask"] == "NaN"


def test_zeros_missing_matches_reference(small):
    A, M, w0 = small
    for kw in (dict(mask="zeros"), dict(mask_zeros=True), dict(mask=["zeros", M])):
        model = _fit(sp.csc_matrix(A), w0, **kw)
        missing = (A == 0) | (M if "mask" in kw and isinstance(kw["mask"], list) else False)
        _same(model, *reference_masked_als(A, missing, w0, 4)[:3])


@pytest.mark.parametrize("zeros", [False, True])
def test_holdout_fit_matches_reference_and_losses(small, zeros):
    A, M, w0 = small
    m, n = A.shape
    ii, jj = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    test = holdout_mask(ii.ravel(), jj.ravel(), 7, 0.2).reshape(m, n)
    kw = dict(mask="zeros") if zeros else {}
    model = _fit(sp.csc_matrix(A), w0, test_fraction=0.2, cv_seed=7, **kw)
    missing = test | ((A == 0) if zeros else False)
    W, d, H, R = reference_masked_als(A, missing, w0, 4)
    _same(model, W, d, H)
    scored = test & ((A != 0) if zeros else True)
    # CV losses are means (§4.3): test over held-out entries, train over the observed ones
    np.testing.assert_allclose(model.misc["test_loss_history"][-1], (R[scored] ** 2).mean(), rtol=1e-9)
    np.testing.assert_allclose(model.misc["loss_history"][-1], (R[~missing] ** 2).mean(), rtol=1e-9)
    assert model.misc["n_test"] == scored.sum()
    assert model.misc["test_loss"] == model.misc["test_loss_history"].min()


def test_masking_a_column_equals_removing_it(small):
    A, _, w0 = small
    M = np.zeros(A.shape, dtype=bool)
    M[:, 4] = True
    masked = _fit(A, w0, mask=M, solver="cholesky")
    removed = dnmf.nmf(np.delete(A, 4, axis=1), 3, init=w0, tol=0, maxit=4, sort_model=False, client=False)
    # The masked column gets h = 0 and leaves every row's problem; the rest is the same
    # arithmetic in another grouping of the sums (block layouts differ): rounding only.
    np.testing.assert_allclose(masked.w, removed.w, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.delete(masked.h, 4, axis=1), removed.h, rtol=1e-10, atol=1e-13)
    assert not masked.h[:, 4].any()


def test_predict_with_mask_solves_the_masked_columns(small):
    A, M, w0 = small
    model = _fit(A, w0, mask=M)
    h = model.predict(A, mask=M)
    for j in range(A.shape[1]):
        o = ~M[:, j]
        # exact NNLS both ways: rounding only
        np.testing.assert_allclose(h[:, j], nnls(model.w[o], A[o, j])[0], rtol=1e-8, atol=1e-10)
    hz = model.predict(sp.csc_matrix(A), mask="zeros")
    o = A[:, 0] != 0
    np.testing.assert_allclose(hz[:, 0], nnls(model.w[o], A[o, 0])[0], rtol=1e-8, atol=1e-10)


def test_mask_errors_name_the_parameter(small):
    A, M, w0 = small
    with pytest.raises(InputError, match="'mask' parameter of nmf .*30 × 25"):
        dnmf.nmf(A, 2, mask=M[:10], client=False)
    with pytest.raises(InputError, match="'mask' parameter"):
        dnmf.nmf(A, 2, mask="ones", client=False)
    with pytest.raises(InputError, match="'cv_seed' parameter .*k as a list"):
        dnmf.nmf(A, 2, test_fraction=0.1, cv_seed=[1, 2], client=False)
    with pytest.raises(InputError, match="'checkpoint' parameter"):
        dnmf.nmf(A, 2, mask=M, checkpoint="x.zarr", client=False)
    An = A.copy()
    An[0, 0] = np.nan
    with pytest.raises(InputError, match="'init' parameter"):
        dnmf.nmf(An, 2, init="svd", client=False)
    An[0, 1] = np.inf
    with pytest.raises(InputError, match="1 Inf value"):
        dnmf.nmf(An, 2, client=False)
    with pytest.raises(InputError, match="'test_fraction' parameter"):
        dnmf.nmf(A, 2, test_fraction=1.0, client=False)
    with pytest.raises(InputError, match="'k' parameter"):
        dnmf.nmf(A, [2, 40], client=False)


# ---------------------------------------------------------------------------------------------
# Cross-validation
# ---------------------------------------------------------------------------------------------


RCPPML_HAWAII = Path(__file__).parent / "golden" / "rcppml_cv_hawaiibirds.json"


def test_cv_table_reproduces_rcppml_on_hawaiibirds():
    ref = json.loads(RCPPML_HAWAII.read_text())
    A = dnmf.datasets.load_hawaiibirds().X
    res = dnmf.nmf(A, list(range(2, 13)), cv_seed=[1, 2, 3], client=False)
    assert isinstance(res, CVResult)
    t = res.table
    assert list(t["rep"]) == ref["rep"] and list(t["k"]) == ref["k"]
    # spec §12.1: a float64 implementation reproduces RcppML's (float32) tables to 1e-4
    # relative; measured here ≤ 1.3e-5 (test) and ≤ 7e-5 (train, biased by R's float32 ‖A‖²).
    np.testing.assert_allclose(t["test_mse"], ref["test_mse"], rtol=1e-4)
    np.testing.assert_allclose(t["train_mse"], ref["train_mse"], rtol=1e-4)
    np.testing.assert_array_equal(t["total_iter"], ref["total_iter"])
    # RcppML reports best_iter as the 0-based iteration + 2 [quirk]; dnmf's is 1-based
    np.testing.assert_array_equal(t["best_iter"] + 1, ref["best_iter"])
    assert res.best_k == int(np.argmin(np.array(ref["test_mse"]).reshape(3, 11).mean(axis=0))) + 2


def test_rank_cv_on_simulated_data_picks_the_planted_rank():
    # spec §13.2–13.3 on simulate_nmf(200, 80, k=5, noise=3, seed=42)
    A = dnmf.simulate_nmf(200, 80, k=5, noise=3.0, seed=42).A
    res = dnmf.nmf(A, list(range(2, 16)), test_fraction=0.05, cv_seed=[1, 2, 3], tol=1e-5, maxit=200, client=False)
    assert res.best_k == 5
    mean_train = res.table.groupby("k")["train_mse"].mean().to_numpy()
    assert np.all(np.diff(mean_train) < 0)  # train MSE keeps falling
    fig = res.plot()
    assert len(fig.axes) == 2
    # k = 15 overfits: the per-iteration test loss has an early minimum, then rises
    m15 = dnmf.nmf(A, 15, seed=1, tol=1e-10, maxit=100, test_fraction=0.05, client=False)
    hist = m15.misc["test_loss_history"]
    best = int(np.argmin(hist))
    assert best < len(hist) - 1 and hist[-1] > hist[best] and m15.misc["best_iter"] == best + 1
    # held-out realised fraction 1/19 of 16 000 entries (binomial sd ≈ 28; 5 sd)
    assert abs(m15.misc["n_test"] - 16_000 / 19) < 5 * 28
    best_model = res.fit_best(seed=1, tol=1e-5)
    assert best_model.k == 5 and best_model.misc["test_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------
# On a cluster: the same numbers, and recovery from a lost worker
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="2GiB") as cluster, distributed.Client(cluster) as client:
        yield client


def test_cv_table_is_the_same_on_one_and_two_workers(cluster_client):
    distributed = pytest.importorskip("distributed")
    A = dnmf.datasets.load_aml().X
    kw = dict(test_fraction=0.1, cv_seed=[1, 2], maxit=30)
    local = dnmf.nmf(A, [2, 3, 4], client=False, **kw).table
    two = dnmf.nmf(A, [2, 3, 4], client=cluster_client, **kw).table
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c1, \
            distributed.Client(c1) as one_client:
        one = dnmf.nmf(A, [2, 3, 4], client=one_client, **kw).table
    # whole fits as tasks: each fit's arithmetic does not depend on where it ran — bitwise
    assert local.equals(two) and local.equals(one)


def test_masked_fit_on_the_cluster_engine_matches_in_process(small, cluster_client):
    A, M, w0 = small
    kw = dict(init=w0, mask=M, test_fraction=0.2, cv_seed=3, tol=0, maxit=5, block_nnz=100)
    here = dnmf.nmf(sp.csc_matrix(A), 3, client=False, **kw)
    there = dnmf.nmf(sp.csc_matrix(A), 3, client=cluster_client, **kw)
    # the same block and row partitions and sums in block order: bitwise
    np.testing.assert_array_equal(here.w, there.w)
    np.testing.assert_array_equal(here.h, there.h)
    np.testing.assert_array_equal(here.misc["test_loss_history"], there.misc["test_loss_history"])
    assert there.misc["executor"] == "distributed"


def test_masked_w_side_spreads_over_the_workers(cluster_client):
    distributed = pytest.importorskip("distributed")
    # The W side of a masked fit runs on row blocks; each must be joined and solved on the worker
    # its anchor column block lives on, not all on the worker of column block 0 (where they used
    # to gather: one worker held every row block and ran every W-side task).
    A = sp.random(600, 800, density=0.05, random_state=5, format="csc")
    kw = dict(seed=2, test_fraction=0.1, cv_seed=1, tol=0, maxit=3, block_nnz=2_000)
    with distributed.get_task_stream(client=cluster_client) as ts:
        there = dnmf.nmf(A, 3, client=cluster_client, **kw)
    w_side = {t["worker"] for t in ts.data if t["key"].startswith(("masked_w_many", "_join_rows_at"))}
    assert len(w_side) == 2
    here = dnmf.nmf(A, 3, client=False, **kw)
    np.testing.assert_array_equal(here.w, there.w)  # placement only: bitwise the same fit


def test_auto_rank_follows_rcppml_on_aml():
    # RcppML 1.0 (run once): nmf(aml, k = "auto", threads = 2) → k_optimal 50, overfitting not
    # detected (its k_low/k_high are -1): the train loss never flattens below 1 % per doubling.
    A = dnmf.datasets.load_aml().X
    model = dnmf.nmf(A, "auto", maxit=30, client=False)
    rs = model.misc["rank_search"]
    assert rs["k_optimal"] == 50 and not rs["overfitting_detected"] and model.k == 50
    table = rs["table"]
    assert list(table["rank"]) == [2, 4, 8, 16, 32, 50] and set(table["phase"]) == {"exponential"}
    # each search fit is the CV fit of its rank: its final test loss, as a direct call gives it
    direct = dnmf.nmf(A, 4, init=engine_init(A.shape[0], 4, 4), seed=4, cv_seed=0, test_fraction=0.1, maxit=30,
                      client=False)
    assert table["test"][1] == direct.misc["test_loss_history"][-1]
    assert model.misc["test_fraction"] == 0.0  # the final model is fit on all data


@pytest.mark.parametrize("zeros", [False, True])
def test_shared_passes_equal_separate_fits(tmp_path, cluster_client, zeros):
    # The ranks of a replicate share each pass over A (held-out entries hashed once per block
    # for all of them); every fit must be bitwise the fit it would be alone. A Zarr store on a
    # cluster takes the shared path there (the matrix is not in memory).
    A = dnmf.datasets.load_hawaiibirds().X
    store = tmp_path / "a.zarr"
    dnmf.io.write_zarr(A, store, block_nnz=20_000)
    kw = dict(test_fraction=0.2, maxit=15, mask="zeros" if zeros else None)
    res = dnmf.nmf(str(store), [2, 3, 5], cv_seed=[2, 7], client=cluster_client, **kw)
    for rep, k, s in zip(res.table["rep"], res.table["k"], res.table["cv_seed"]):
        alone = dnmf.nmf(A, int(k), init=engine_init(A.shape[0], int(k), int(s + k)), seed=int(s + k),
                         cv_seed=int(s), block_nnz=20_000, client=False, **kw)
        train, test = res.histories[(rep, k)]
        np.testing.assert_array_equal(test, alone.misc["test_loss_history"])
        np.testing.assert_array_equal(train, alone.misc["loss_history"])


def test_cv_table_names_its_loss_columns_after_the_fitted_loss():
    """A grid of a non-MSE loss reports ``train_<loss>``/``test_<loss>`` and chooses k by the latter."""
    rows = [{"rep": 1, "k": k, "cv_seed": 1, "train_nb": 1.0 / k, "test_nb": t, "best_iter": 3, "total_iter": 5,
             "train_history": np.ones(5), "test_history": np.ones(5)}
            for k, t in ((2, 0.9), (3, 0.7), (4, 0.8))]
    res = CVResult.from_rows(rows, 0.05)
    assert res.loss == "nb"
    assert list(res.table.columns) == ["rep", "k", "cv_seed", "train_nb", "test_nb", "best_iter", "total_iter"]
    assert res.best_k == 3  # the lowest test_nb, not a missing test_mse column
    assert res.mean_test.loc[4] == 0.8


def test_cv_grid_with_a_target_keeps_the_target():
    """A grid fit with target_H runs as the single fit would (the shared passes have no targets)."""
    sim = dnmf.simulate_nmf(60, 50, 3, noise=0.5, seed=3)
    target = np.random.default_rng(0).uniform(size=(3, 50))
    kw = dict(test_fraction=0.1, maxit=6, tol=0, client=False, target_H=target, target_lambda=0.5)
    res = dnmf.nmf(sim.A, [3], cv_seed=[2], **kw)
    alone = dnmf.nmf(sim.A, 3, init=engine_init(60, 3, 2 + 3), seed=2 + 3, cv_seed=2, **kw)
    plain = dnmf.nmf(sim.A, 3, init=engine_init(60, 3, 2 + 3), seed=2 + 3, cv_seed=2,
                     **{**kw, "target_H": None, "target_lambda": 0.0})
    assert res.table["test_mse"].iloc[0] == alone.misc["test_loss"]
    assert alone.misc["test_loss"] != plain.misc["test_loss"]  # the target did change the fit
