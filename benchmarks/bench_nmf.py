"""Benchmarks of the NMF engine against scikit-learn and the RcppML 1.0 reference numbers.

Run: ``python benchmarks/bench_nmf.py [--large] [--small] [--w-side] [--m 20000 --n 50000 --density 0.02]``

* ``--small``: in-process fits on the bundled hawaiibirds (k=8, tol=1e-5) and aml (k=8,
  100 iterations) data after JIT warm-up, against RcppML 1.0 with one thread on this kind of
  machine (25 ms / 33 iterations and 23 ms / 100 iterations).
* ``--large``: a 20,000 × 50,000 sparse matrix at 2 % density, k = 10: scikit-learn's
  ``NMF(solver="cd")`` for a fixed number of iterations, then the time dnmf needs to reach
  the same loss (in-process threads and a 2-worker LocalCluster), dnmf's seconds per
  iteration, and a bare pass that only reads the blocks and computes WᵀA (the floor).
  RcppML 1.0 with 2 threads takes 0.22 s per iteration on this shape.
* ``--w-side``: the W side of a masked (or weighted) fit, where every row of W has its own Gram
  ``Q − Σ_{j masked in row i} h_j h_jᵀ`` (docs/architecture.md, "Per-row problems on the W
  side"). Times prototype kernels for the two realistic layouts at m × n (2 % density), a speckled
  mask of ``--test-fraction`` over all entries, k = 10 and 50, on a slice of the matrix, and
  extrapolates to the whole: (a) per-row Gram corrections accumulated as block partials
  (m × k × k per column block) in the column pass; (b) a mirrored pass over row blocks of A (a
  CSR copy) that forms each row's Gram and solves its NNLS on the spot.
* ``--compare`` (issue 12): the same fixed number of iterations (``--iters``, default 30) from one
  random start on the ``--large`` matrix, side by side in one run: scikit-learn ``NMF(solver="cd")``,
  dnmf in-process (threads, and with ``dtype="float32"``), dnmf on ``LocalCluster(processes=False,
  1 worker × all cores)`` and on ``LocalCluster(2 workers × 1 thread)`` (also with ``dtype="float32"``),
  each cluster with Dask's defaults and again with the settings ``dnmf run`` starts its clusters
  with (``dnmf.jobs.cluster.CLUSTER_SETTINGS``), with times, SSEs and the ratios of the issue (cluster /
  in-process, dnmf / scikit-learn); then dnmf's seconds per iteration against k (10, 30, 50)
  and, with ``--scale``, against nnz (5 M, 20 M, 80 M at 2 %; long), in-process and on the
  2-worker cluster. Run it pinned, e.g. ``taskset -c 0,1 python benchmarks/bench_nmf.py --compare``.
  ``--reps N`` takes the best of N rounds, each running every side once (this machine is shared
  and its speed drifts). RcppML 1.0 (``Rscript`` with the library of /work/shared/tools/rcppml,
  ``--r-libs`` or ``$R_LIBS``) joins each round when it is installed: the same matrix and start W,
  ``maxit`` = ``--iters``, all cores; its s/iter is marginal (a 1-iteration call subtracted).
* ``--kernel`` (issue 12): the sparse block pass on one thread, per stored nonzero, on one block of the
  ``--large`` matrix's shape (m × n/8): dnmf's pass (``kernels/fused.py::csc_block_pass``, two sweeps:
  WᵀA_j with the solves, then A_j H_jᵀ), the same arithmetic in one sweep per column (the pass before
  issue 12, kept here as a reference), and scipy's two sparse products that scikit-learn's
  ``NMF(solver="cd")`` computes per iteration (``A_jᵀ W`` and ``A_j H_jᵀ``), in interleaved rounds.
* ``--first-fit`` (issue 12): the first fit on a fresh install, in fresh processes with an empty
  numba cache (``NUMBA_CACHE_DIR`` a new folder per run): ``import dnmf``, the first in-process fit
  (300 × 400 sparse at 10 %, k = 5, default solver; compilation included) and a second fit of the
  same data in the same process (no compilation); then the first fit on a fresh 2-worker
  ``LocalCluster`` whose workers and client all start with an empty cache (the client compiles
  and ships the kernels, ``engine/kernel_cache.py``). Medians and ranges of ``--reps`` runs.
Timings print as one table; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings

import numpy as np
import scipy.sparse as sp

import dnmf
from dnmf.io.blocks import CSCBlock
from dnmf.kernels.nnls import chol_solve


def structured_sparse(m, n, density, k, seed):
    """Sparse A whose nonzeros sample a rank-k non-negative matrix (plus noise)."""
    rng = np.random.default_rng(seed)
    nnz = int(m * n * density)
    rows = rng.integers(0, m, nnz)
    cols = rng.integers(0, n, nnz)
    w = rng.gamma(0.5, 1.0, (m, k))
    h = rng.gamma(0.5, 1.0, (k, n))
    vals = np.empty(nnz)
    step = 2_000_000
    for s in range(0, nnz, step):
        vals[s:s + step] = np.einsum("ik,ki->i", w[rows[s:s + step]], h[:, cols[s:s + step]])
    vals *= rng.uniform(0.5, 1.5, nnz)
    a = sp.csc_array((vals, (rows, cols)), shape=(m, n))
    a.sum_duplicates()
    return a


def _wta_task(block, w):
    if isinstance(block, CSCBlock):
        return _csc_wta(block.data, block.indices, block.indptr, w)
    return w.T @ block


def _csc_wta_py(data, indices, indptr, w):
    k = w.shape[1]
    n = indptr.shape[0] - 1
    out = np.zeros((n, k))
    for c in range(n):
        for p in range(indptr[c], indptr[c + 1]):
            i = indices[p]
            a = data[p]
            for r in range(k):
                out[c, r] += a * w[i, r]
    return out


def _make_csc_wta():
    import numba

    return numba.njit(cache=True, nogil=True)(_csc_wta_py)


_csc_wta = _make_csc_wta()


def bare_pass(blocked, w, executor, handles):
    """Time of one pass that reads every block and computes WᵀA (the iteration floor)."""
    t = time.perf_counter()
    executor.gather(executor.map_blocks(_wta_task, handles, args=(w,)))
    return time.perf_counter() - t


def time_to_loss(A, k, **kw):
    """Run dnmf; return ((seconds since the call, SSE) per iteration, total s, model, per-iteration s)."""
    stamps = []
    t0 = time.perf_counter()

    def cb(rec):
        stamps.append((time.perf_counter() - t0, rec.train_loss))

    model = dnmf.nmf(A, k, on_iteration=cb, **kw)
    total = time.perf_counter() - t0
    per_it = np.diff([0.0] + [t for t, _ in stamps])
    return stamps, total, model, per_it


def run_small():
    from dnmf.datasets import load_aml, load_hawaiibirds

    rows = []
    hb = load_hawaiibirds().X
    aml = load_aml().X
    for name, A, kw, ref_ms, ref_it in (
        ("hawaiibirds k=8 tol=1e-5", hb, dict(tol=1e-5, maxit=100), 25.0, 33),
        ("aml k=8 100 it", aml, dict(tol=0.0, maxit=100), 23.0, 100),
    ):
        for _ in range(2):  # JIT warm-up
            dnmf.nmf(A, 8, seed=1, client=False, **kw)
        times = []
        for rep in range(5):
            t = time.perf_counter()
            model = dnmf.nmf(A, 8, seed=1, client=False, **kw)
            times.append(time.perf_counter() - t)
        ms = 1000 * min(times)
        it = model.misc["iter"]
        spread = sorted(dnmf.nmf(A, 8, seed=s, client=False, **kw).misc["iter"] for s in range(1, 13))
        rows.append((name, it, ms, ref_ms, ref_it, ms / ref_ms, (ms / it) / (ref_ms / ref_it), model.misc["loss"],
                     spread[len(spread) // 2]))
    print("\nIn-process small data (best of 5, after warm-up) vs RcppML 1.0 (1 thread)")
    print(f"{'data':28s} {'iters':>5s} {'dnmf ms':>8s} {'RcppML ms':>9s} {'R iters':>7s} {'ratio':>6s} "
          f"{'per-it ratio':>12s} {'SSE':>12s} {'median iters, seeds 1-12':>25s}")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:5d} {r[2]:8.1f} {r[3]:9.1f} {r[4]:7d} {r[5]:6.2f} {r[6]:12.2f} {r[7]:12.6g} {r[8]:25d}")


def run_large(m, n, density, k, sk_iter):
    from distributed import Client, LocalCluster
    from sklearn.decomposition import NMF as SkNMF

    from dnmf.engine.executor import DaskExecutor, LocalExecutor

    print(f"\nLarge sparse: {m} x {n}, density {density}, k={k}; generating ...", flush=True)
    A = structured_sparse(m, n, density, k, seed=0).astype(np.float32)
    print(f"nnz = {A.nnz:,}", flush=True)
    Xt = sp.csr_matrix(A.T)  # samples × features for scikit-learn, the same data

    # One shared random start, scaled as scikit-learn's init="random" does: scikit-learn's H
    # (k × features) is dnmf's Wᵀ. Both then run from the same point, so "the same loss" is a
    # point on comparable trajectories rather than two different local minima.
    rng = np.random.default_rng(0)
    avg = np.sqrt(A.sum() / (m * n) / k)
    w0 = (avg * np.abs(rng.standard_normal((m, k)))).astype(np.float32)  # scikit-learn wants X's dtype
    h0 = (avg * np.abs(rng.standard_normal((n, k)))).astype(np.float32)
    sk_points = []
    for it in sorted(set((max(sk_iter // 3, 1), sk_iter))):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = SkNMF(n_components=k, solver="cd", init="custom", max_iter=it, tol=0)
            sk.fit(Xt, W=h0.copy(), H=np.ascontiguousarray(w0.T))
        t_sk = time.perf_counter() - t
        sk_points.append((it, t_sk, float(sk.reconstruction_err_) ** 2))
        print(f"scikit-learn cd: {sk.n_iter_} iterations in {t_sk:.2f} s, SSE {sk_points[-1][2]:.6g}", flush=True)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for solver in ("cholesky", "cd"):
            dnmf.nmf(A[:, :2000], k, seed=0, maxit=2, client=False, solver=solver)  # JIT warm-up
        # "auto" is RcppML's Cholesky-clip (an approximate NNLS: it can stall just above the
        # loss an exact NNLS reaches); "cd" solves each NNLS as scikit-learn's CD does.
        for solver in ("cholesky", "cd"):
            stamps, total, model, per_it = time_to_loss(A, k, init=w0.astype(np.float64), maxit=200, tol=1e-6, client=False,
                                                       solver=solver)
            results.append((f"dnmf threads (2), {solver}", stamps, total, model, per_it))
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(lambda: [dnmf.nmf(A[:, :500], k, maxit=2, client=False, solver=s) for s in ("cholesky", "cd")])
            for solver in ("cholesky", "cd"):
                stamps_d, total_d, model_d, per_it_d = time_to_loss(A, k, init=w0.astype(np.float64), maxit=200, tol=1e-6,
                                                                   client=client, solver=solver)
                results.append((f"dnmf LocalCluster 2 workers, {solver}", stamps_d, total_d, model_d, per_it_d))
            blocked = dnmf.io.as_blocked(A)
            ex = DaskExecutor(client)
            handles = ex.put_blocks([s.load() for s in blocked.sources])
            bare_pass(blocked, w0, ex, handles)
            bare_d = min(bare_pass(blocked, w0, ex, handles) for _ in range(3))
    blocked = dnmf.io.as_blocked(A)
    ex = LocalExecutor()
    handles = ex.put_blocks([s.load() for s in blocked.sources])
    bare_pass(blocked, w0, ex, handles)
    bare_t = min(bare_pass(blocked, w0, ex, handles) for _ in range(3))

    (it_a, t_a, sse_a), (it_b, t_b, sse_b) = sk_points[0], sk_points[-1]
    print(f"\nTargets: scikit-learn's SSE after {it_a} iterations ({sse_a:.7g}, {t_a:.2f} s) and after {it_b} "
          f"({sse_b:.7g}, {t_b:.2f} s); ratio = dnmf's time to that SSE / scikit-learn's.")
    print(f"{'engine':38s} {'s to A':>7s} {'ratio A':>7s} {'s to B':>7s} {'ratio B':>7s} {'s/iter (med)':>12s} "
          f"{'bare pass s':>11s} {'iter/bare':>9s} {'final SSE':>12s} {'iters':>5s}")
    for (name, stamps, total, model, per_it), bare in zip(results, (bare_t, bare_t, bare_d, bare_d)):
        reach_a = next((t for t, loss in stamps if loss <= sse_a), float("nan"))
        reach_b = next((t for t, loss in stamps if loss <= sse_b), float("nan"))
        med = float(np.median(per_it[1:])) if len(per_it) > 1 else float(per_it[0])
        print(f"{name:38s} {reach_a:7.2f} {reach_a / t_a:7.3f} {reach_b:7.2f} {reach_b / t_b:7.3f} {med:12.3f} "
              f"{bare:11.3f} {med / bare:9.2f} {model.misc['loss']:12.7g} {model.misc['iter']:5d}")
    print(f"{'scikit-learn NMF(cd)':38s} {t_a:7.2f} {1.0:7.3f} {t_b:7.2f} {1.0:7.3f} {t_b / it_b:12.3f}")
    print("RcppML 1.0 (2 threads) reference: 0.22 s per iteration on this shape and density")


# ---- issue 12: scikit-learn, in-process and LocalCluster side by side ----------------------

def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _dnmf_fixed(A, k, iters, w0, client, reps=2, dtype=None):
    """Best of ``reps`` fits of exactly ``iters`` iterations from ``w0``: (s, s/iter median, SSE)."""
    best = None
    for _ in range(reps):
        stamps = []
        t = time.perf_counter()
        model = dnmf.nmf(A, k, init=w0, maxit=iters, tol=0.0, client=client, dtype=dtype,
                         on_iteration=lambda rec: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t
        per = float(np.median(np.diff(stamps))) if len(stamps) > 2 else total / iters
        if best is None or total < best[0]:
            best = (total, per, float(model.misc["loss"]))
    return best


def _clusters(n_cores):
    """The LocalCluster settings compared: threads only, then two worker processes."""
    return (("LocalCluster(processes=False, 1 worker x %d threads)" % n_cores,
             dict(processes=False, n_workers=1, threads_per_worker=n_cores)),
            ("LocalCluster(2 workers x 1 thread)", dict(processes=True, n_workers=2, threads_per_worker=1)))


def _start_cluster(kw, dnmf_settings=False):
    """A LocalCluster of ``kw``, plain (Dask's defaults) or with the settings of the clusters
    ``dnmf run`` starts (``dnmf.jobs.cluster.CLUSTER_SETTINGS``)."""
    import dask
    from distributed import LocalCluster

    from dnmf.jobs.cluster import cluster_settings

    with dask.config.set(cluster_settings() if dnmf_settings else {}):
        return LocalCluster(dashboard_address=None, **kw)


def run_compare(m, n, density, k, iters, scale, sweep=True, reps=2, r_libs=None):
    from distributed import Client
    from sklearn.decomposition import NMF as SkNMF

    n_cores = _cores()
    print(f"\nSide by side (issue 12): {m} x {n}, density {density}, k={k}, {iters} iterations from one random "
          f"start, {n_cores} cores, best of {reps} runs each; generating ...", flush=True)
    A = structured_sparse(m, n, density, k, seed=0)
    print(f"nnz = {A.nnz:,}", flush=True)
    rng = np.random.default_rng(0)
    avg = np.sqrt(A.sum() / (m * n) / k)
    w0 = avg * np.abs(rng.standard_normal((m, k)))
    h0 = avg * np.abs(rng.standard_normal((n, k)))
    Xt = sp.csr_matrix(A.T)

    def sklearn_fit():
        t = time.perf_counter()
        sk = SkNMF(n_components=k, solver="cd", init="custom", max_iter=iters, tol=0)
        sk.fit(Xt, W=h0.copy(), H=np.ascontiguousarray(w0.T))
        total = time.perf_counter() - t
        return total, total / iters, float(sk.reconstruction_err_) ** 2

    # The runs are interleaved — one of each side per round, best of `reps` rounds — because this
    # machine's speed drifts over minutes (other tenants): separate blocks of runs gave ratios that
    # moved by ±25 % between blocks. Each cluster is started for its own run and closed after it,
    # so no idle cluster takes CPU from the other sides.
    clusters = [(lb, kw, None, False) for lb, kw in _clusters(n_cores)]
    clusters.append((clusters[-1][0] + ', dtype="float32"', clusters[-1][1], "float32", False))
    # the same two clusters as `dnmf run` starts them (fewer event-loop wakes: jobs/cluster.py)
    clusters += [(lb + ", dnmf run's settings", kw, None, True) for lb, kw in _clusters(n_cores)]
    labels = (["scikit-learn NMF(solver='cd')", "dnmf in-process, threads", 'dnmf in-process, dtype="float32"']
              + ["dnmf " + lb for lb, *_ in clusters])
    from bench_cv import find_rcppml

    r_env = find_rcppml(r_libs)
    if r_env is not None:
        labels.append(f"RcppML 1.0 ({n_cores} threads; s/iter marginal)")
    runs: dict = {label: [] for label in labels}
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        r_dir = write_csc_for_r(A, w0, stack.enter_context(tempfile.TemporaryDirectory())) if r_env else None
        for dt in (None, "float32"):  # JIT warm-up (or cache load)
            dnmf.nmf(A[:, :2000], k, maxit=2, client=False, dtype=dt)
        for _ in range(reps):
            runs[labels[0]].append(sklearn_fit())
            runs[labels[1]].append(_dnmf_fixed(A, k, iters, w0, False, 1))
            runs[labels[2]].append(_dnmf_fixed(A, k, iters, w0, False, 1, dtype="float32"))
            for label, (_, kw, dtype, settings) in zip(labels[3:], clusters):
                with _start_cluster(kw, settings) as cluster, Client(cluster) as client:
                    # workers load the kernels
                    dnmf.nmf(A, k, init=w0, maxit=2, tol=0.0, client=client, dtype=dtype)
                    runs[label].append(_dnmf_fixed(A, k, iters, w0, client, 1, dtype=dtype))
            if r_env is not None:
                runs[labels[-1]].append(time_rcppml_fixed(r_env, r_dir, A.shape, k, A.nnz, iters, n_cores))
    best = {label: (min(r[0] for r in rs), min(r[1] for r in rs), rs[0][2]) for label, rs in runs.items()}
    t_sk, per_sk = best[labels[0]][:2]
    t_in, per_in = best[labels[1]][:2]
    print("seconds: the whole call (a cluster's includes sending the in-memory matrix to the workers); "
          "s/iter: median time between iterations; ratios of s/iter, then of seconds")
    print(f"{'run':52s} {'seconds':>8s} {'s/iter':>7s} {'SSE':>14s} {'/ in-process':>13s} {'/ scikit-learn':>15s}")
    for name, (total, per, sse) in best.items():
        print(f"{name:52s} {total:8.2f} {per:7.3f} {sse:14.8g} {per / per_in:6.2f} {total / t_in:6.2f} "
              f"{per / per_sk:7.2f} {total / t_sk:7.2f}")
    # The same ratios within each round (the sides of a round ran minutes apart at most): their
    # median and range say how much of the best-of ratios above is the machine's drift.
    print(f"per round (s/iter ratios within each of the {reps} rounds): median [min, max]")
    for name, rs in runs.items():
        if name == labels[0]:
            continue
        to_in = [r[1] / i[1] for r, i in zip(rs, runs[labels[1]])]
        to_sk = [r[1] / q[1] for r, q in zip(rs, runs[labels[0]])]
        print(f"  {name:58s} / in-process {np.median(to_in):5.2f} [{min(to_in):.2f}, {max(to_in):.2f}]   "
              f"/ scikit-learn {np.median(to_sk):5.2f} [{min(to_sk):.2f}, {max(to_sk):.2f}]")
    print("Goals: in-process <= 0.5x scikit-learn; threads-only cluster <= 1.15x in-process; "
          "2 worker processes <= 1.3x in-process and <= 0.5x scikit-learn.")

    if not sweep:
        return
    print(f"\ndnmf seconds per iteration against k ({m} x {n}, nnz {A.nnz:,}; median of 5 iterations)")
    _per_iteration_table([(f"k={kk}", A, kk) for kk in (10, 30, 50)], n_cores)
    if scale:
        cases = []
        for nnz in (5_000_000, 20_000_000, 80_000_000):
            mm = int(round(np.sqrt(nnz / density / 2.5)))  # n = 2.5 m, as the --large shape
            cases.append((f"nnz {nnz / 1e6:.0f} M ({mm} x {int(2.5 * mm)})", mm, int(2.5 * mm)))
        print(f"\ndnmf seconds per iteration against nnz (density {density}, k={k}; median of 5 iterations)")
        _per_iteration_table([(label, (mm, nn), k) for label, mm, nn in cases], n_cores, density=density)


# ---- RcppML 1.0 through Rscript, for --compare (the tool in /work/shared/tools/rcppml) -------------

_R_FIXED = r"""
suppressPackageStartupMessages({library(Matrix); library(RcppML)})
a <- commandArgs(trailingOnly = TRUE)
d <- a[1]; m <- as.integer(a[2]); n <- as.integer(a[3]); k <- as.integer(a[4]); nnz <- as.numeric(a[5])
iters <- as.integer(a[6]); threads <- as.integer(a[7])
A <- new("dgCMatrix", i = readBin(file.path(d, "indices.bin"), "integer", n = nnz),
         p = readBin(file.path(d, "indptr.bin"), "integer", n = n + 1),
         x = readBin(file.path(d, "data.bin"), "double", n = nnz), Dim = c(m, n))
w0 <- matrix(readBin(file.path(d, "w0.bin"), "double", n = m * k), m, k)
one <- system.time(nmf(A, k, seed = w0, tol = 1e-30, maxit = 1, threads = threads, verbose = FALSE))[["elapsed"]]
full <- system.time(r <- nmf(A, k, seed = w0, tol = 1e-30, maxit = iters, threads = threads,
                             verbose = FALSE))[["elapsed"]]
cat(one, full, "\n")
"""


def write_csc_for_r(A, w0, folder):
    """A (CSC, int32 indices) and the start W as raw files that ``_R_FIXED`` reads with readBin."""
    a = sp.csc_matrix(A)
    a.data.astype("<f8").tofile(os.path.join(folder, "data.bin"))
    a.indices.astype("<i4").tofile(os.path.join(folder, "indices.bin"))
    a.indptr.astype("<i4").tofile(os.path.join(folder, "indptr.bin"))
    np.asarray(w0, dtype="<f8").ravel(order="F").tofile(os.path.join(folder, "w0.bin"))  # R: column-major
    return folder


def time_rcppml_fixed(env, folder, shape, k, nnz, iters, threads=2):
    """(seconds of one ``maxit = iters`` RcppML call, its marginal seconds per iteration)."""
    import subprocess

    script = os.path.join(folder, "fixed.R")
    with open(script, "w") as f:
        f.write(_R_FIXED)
    proc = subprocess.run(["Rscript", script, folder, str(shape[0]), str(shape[1]), str(k), str(nnz), str(iters),
                           str(threads)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Rscript failed:\n{proc.stderr[-2000:]}")
    one, full = (float(x) for x in proc.stdout.split())
    return full, (full - one) / max(iters - 1, 1), float("nan")


def _per_iteration_table(cases, n_cores, density=None):
    """Seconds per iteration in-process and on the 2-worker cluster for each (label, A or shape, k)."""
    from distributed import Client, LocalCluster

    results = {}
    matrices = {}
    for label, A, k in cases:
        if isinstance(A, tuple):
            A = matrices.setdefault(label, structured_sparse(*A, density, k, seed=0))
        results[label] = [A.nnz, _dnmf_fixed(A, k, 6, None, False, reps=1)[1]]
    label2, kw2 = _clusters(n_cores)[1]
    with LocalCluster(dashboard_address=None, **kw2) as cluster, Client(cluster) as client, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, A, k in cases:
            A = matrices.get(label, A)
            results[label].append(_dnmf_fixed(A, k, 6, None, client, reps=1)[1])
    print(f"{'case':36s} {'nnz':>12s} {'in-process s/it':>15s} {'ns/nnz':>7s} {'2 workers s/it':>14s} {'ns/nnz':>7s} "
          f"{'ratio':>6s}")
    for label, (nnz, t_in, t_cl) in results.items():
        print(f"{label:36s} {nnz:12,d} {t_in:15.3f} {1e9 * t_in / nnz:7.2f} {t_cl:14.3f} {1e9 * t_cl / nnz:7.2f} "
              f"{t_cl / t_in:6.2f}")


# ---- W side of a masked fit: prototype kernels (docs/architecture.md) -----------------------

def _mix(x):
    """splitmix64 finalizer: the speckled mask's hash of an entry's linear index."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _masked(i, j, n, seed, thresh):
    return _mix(np.uint64(i) * np.uint64(n) + np.uint64(j) + np.uint64(seed)) < thresh


def _mask_cols_csc(m, n, c0, c1, seed, thresh):
    """CSC positions (indptr, rows) of the masked entries of columns c0:c1 (hash of every entry)."""
    cnt = 0
    for j in range(c0, c1):
        for i in range(m):
            if _masked(i, j, n, seed, thresh):
                cnt += 1
    indptr = np.zeros(c1 - c0 + 1, np.int64)
    rows = np.empty(cnt, np.int64)
    p = 0
    for j in range(c0, c1):
        for i in range(m):
            if _masked(i, j, n, seed, thresh):
                rows[p] = i
                p += 1
        indptr[j - c0 + 1] = p
    return indptr, rows


def _mask_rows_csr(r0, r1, n, seed, thresh):
    """CSR positions (indptr, cols) of the masked entries of rows r0:r1."""
    return _mask_cols_csc(n, n, r0, r1, seed, thresh)  # same loop with the roles swapped (i ↔ j below)


def _partial_row_grams(mask_indptr, mask_rows, ht, R):
    """Layout (a): the column pass adds h_c h_cᵀ to R[i] (m × k × k) for each masked (i, c)."""
    k = ht.shape[1]
    for c in range(mask_indptr.shape[0] - 1):
        h = ht[c]
        for p in range(mask_indptr[c], mask_indptr[c + 1]):
            Ri = R[mask_rows[p]]
            for r in range(k):
                hr = h[r]
                for s in range(r, k):
                    Ri[r, s] += hr * h[s]


def _row_pass_masked(data, indices, indptr, mask_indptr, mask_cols, ht, Q, out_w):
    """Layout (b): per row i of a row block, b_i = Σ_j a_ij h_j (unmasked), G_i = Q − Σ_masked h_j h_jᵀ,
    then w_i = Cholesky-clip(G_i, b_i) — the per-row Gram lives in k × k scratch only."""
    k = ht.shape[1]
    G = np.empty((k, k))
    L = np.zeros((k, k))
    b = np.empty(k)
    x = np.empty(k)
    for i in range(indptr.shape[0] - 1):
        for r in range(k):
            b[r] = 0.0
            for s in range(k):
                G[r, s] = Q[r, s]
        for p in range(indptr[i], indptr[i + 1]):
            a = data[p]
            h = ht[indices[p]]
            for r in range(k):
                b[r] += a * h[r]
        for p in range(mask_indptr[i], mask_indptr[i + 1]):
            h = ht[mask_cols[p]]
            for r in range(k):
                hr = h[r]
                for s in range(r, k):
                    G[r, s] -= hr * h[s]
        for r in range(k):
            for s in range(r):
                G[r, s] = G[s, r]
        # (the masked a_ij also leave b: the prototype's b sums all stored entries; the cost of
        # the exclusion is a hash test per stored entry, included in the mask enumeration time)
        _chol_factor(G, L)
        _chol_solve(L, b, x, True)
        for r in range(k):
            out_w[i, r] = x[r]


def _row_pass_masked_blas(data, indices, indptr, mask_indptr, mask_cols, ht, Q, out_w):
    """Layout (b) with the masked Gram as one BLAS product per row: gather the masked rows of H
    (about f·n × k) into a buffer, then ``H_Sᵀ H_S`` (numba calls BLAS gemm)."""
    k = ht.shape[1]
    n_max = 0
    for i in range(indptr.shape[0] - 1):
        n_max = max(n_max, mask_indptr[i + 1] - mask_indptr[i])
    buf = np.empty((n_max, k))
    L = np.zeros((k, k))
    b = np.empty(k)
    x = np.empty(k)
    for i in range(indptr.shape[0] - 1):
        cnt = mask_indptr[i + 1] - mask_indptr[i]
        for t in range(cnt):
            h = ht[mask_cols[mask_indptr[i] + t]]
            for r in range(k):
                buf[t, r] = h[r]
        hs = buf[:cnt]
        G = Q - hs.T @ hs
        for r in range(k):
            b[r] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            a = data[p]
            h = ht[indices[p]]
            for r in range(k):
                b[r] += a * h[r]
        _chol_factor(G, L)
        _chol_solve(L, b, x, True)
        for r in range(k):
            out_w[i, r] = x[r]


def _csr_rows_p(data, indices, indptr, ht, P):
    """The plain mirrored W pass: P_i = Σ_j a_ij h_j over a row block (no mask)."""
    k = ht.shape[1]
    for i in range(indptr.shape[0] - 1):
        Pi = P[i]
        for p in range(indptr[i], indptr[i + 1]):
            a = data[p]
            h = ht[indices[p]]
            for r in range(k):
                Pi[r] += a * h[r]


def _best(f, reps=3):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def _best_interleaved(fns, reps):
    """Best time of each of ``fns`` over ``reps`` rounds, one run of each per round, so a drift of
    the machine's speed (±25 % over minutes here) hits every side alike."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def run_w_side(m, n, density, ks, test_fraction, n_cols=1000, n_rows=400):
    """Time the two W-side layouts on slices (n_cols columns, n_rows rows) and extrapolate."""
    global _chol_factor, _chol_solve
    import numba

    from dnmf.kernels.column import chol_factor as _chol_factor
    from dnmf.kernels.fused import csc_block_pass
    from dnmf.kernels.column import column_terms
    from dnmf.kernels.nnls import chol_solve as _chol_solve

    jit = numba.njit(cache=False, nogil=True)
    g = globals()
    for name in ("_mix", "_masked", "_mask_cols_csc", "_partial_row_grams", "_csr_rows_p"):
        g[name] = jit(g[name])
    g["_row_pass_masked"] = jit(_row_pass_masked)
    g["_row_pass_masked_blas"] = jit(_row_pass_masked_blas)
    thresh = np.uint64(int(test_fraction * 2.0 ** 64))
    rng = np.random.default_rng(0)
    nnz_full = int(m * n * density)
    masked_full = test_fraction * m * n
    print(f"\nW side of a masked fit: {m} x {n}, density {density} (nnz {nnz_full:,}), speckled mask "
          f"{test_fraction} of all entries ({masked_full:,.0f} masked); slices: {n_cols} columns x all rows, "
          f"{n_rows} rows x all columns; times extrapolated to the whole matrix, one thread")
    # column slice (all m rows): the fused H-side pass and layout (a)
    Acol = sp.random(m, n_cols, density=density, random_state=rng, format="csc", dtype=np.float64)
    Arow = sp.random(n_rows, n, density=density, random_state=rng, format="csr", dtype=np.float64)
    t_hash_col = _best(lambda: _mask_cols_csc(m, n, 0, n_cols, 7, thresh), 2)
    mptr_c, mrows_c = _mask_cols_csc(m, n, 0, n_cols, 7, thresh)
    mptr_r, mcols_r = _mask_cols_csc(n, n, 0, n_rows, 7, thresh)  # row-major hash: same cost per entry
    scale_col = n / n_cols
    scale_row = m / n_rows
    print(f"hashing every entry to find the mask: {t_hash_col * scale_col:.2f} s per pass over A "
          f"(m·n = {m * n:,} hashes; either layout pays it once per side)")
    hdr = (f"{'k':>3s} {'fused H pass s':>14s} {'(a) partial s':>13s} {'(a) MB/partial':>14s} "
           f"{'(a) GB moved/it, 8 blocks':>25s} {'(b) W pass s':>12s} {'(b) BLAS W pass s':>17s} "
           f"{'(b) plain W pass s':>18s} "
           f"{'(b) copy of A MB':>16s} {'(b) H bcast MB':>14s}")
    print(hdr)
    for k in ks:
        w = np.ascontiguousarray(np.abs(rng.standard_normal((m, k))))
        G = w.T @ w
        L = np.linalg.cholesky(G)
        ht_c = np.abs(rng.standard_normal((n_cols, k)))
        ht_full = np.abs(rng.standard_normal((n, k)))
        Q = ht_full.T @ ht_full
        idx = Acol.indices.astype(np.int32)
        ptr = Acol.indptr.astype(np.int64)  # the library's index layout (kernels/fused.py::csc_block_pass)
        terms = column_terms(k)

        def fused():
            csc_block_pass(Acol.data, idx, ptr, w, G, L, 0.0, np.zeros((n_cols, k)), np.ones(k), terms, 1, True,
                           100, 1e-8, False, np.zeros((m, k)), np.zeros((k, k)), np.zeros(k))

        t_fused = _best(fused) * scale_col
        R = np.zeros((m, k, k))
        _partial_row_grams(mptr_c[:2], mrows_c, ht_c, R)
        t_part = _best(lambda: _partial_row_grams(mptr_c, mrows_c, ht_c, R)) * scale_col
        rptr, ridx = Arow.indptr.astype(np.int64), Arow.indices.astype(np.int64)
        out_w = np.empty((n_rows, k))
        _row_pass_masked(Arow.data, ridx, rptr, mptr_r[:2], mcols_r, ht_full, Q, out_w)
        t_row = _best(lambda: _row_pass_masked(Arow.data, ridx, rptr, mptr_r, mcols_r, ht_full, Q, out_w)) * scale_row
        _row_pass_masked_blas(Arow.data, ridx, rptr, mptr_r[:2], mcols_r, ht_full, Q, out_w)
        t_blas = _best(lambda: _row_pass_masked_blas(Arow.data, ridx, rptr, mptr_r, mcols_r, ht_full, Q,
                                                     out_w)) * scale_row
        P = np.zeros((n_rows, k))
        _csr_rows_p(Arow.data, ridx, rptr, ht_full, P)
        t_plain = _best(lambda: _csr_rows_p(Arow.data, ridx, rptr, ht_full, P)) * scale_row
        mb_part = m * k * k * 8 / 1e6
        print(f"{k:3d} {t_fused:14.2f} {t_part:13.2f} {mb_part:14.0f} {8 * mb_part / 1e3:25.2f} {t_row:12.2f} {t_blas:17.2f} "
              f"{t_plain:18.2f} {nnz_full * 12 / 1e6:16.0f} {n * k * 8 / 1e6:14.0f}")


def _one_sweep_pass_py(data, indices, indptr, w, G, L, ht, P):
    """The block pass as it was before issue 12: per column, WᵀA_j, the Cholesky-clip solve and
    P += a_c h_cᵀ in one sweep (W and P in cache together). Reference for ``--kernel`` only."""
    k = w.shape[1]
    n = indptr.shape[0] - 1
    b = np.empty(k)
    x = np.empty(k)
    for c in range(n):
        for r in range(k):
            b[r] = 0.0
        for p in range(indptr[c], indptr[c + 1]):
            a = data[p]
            wrow = w[indices[p]]
            for r in range(k):
                b[r] += a * wrow[r]
        chol_solve(L, b, x, True)  # the Cholesky-clip solve of the library's pass
        for r in range(k):
            ht[c, r] = x[r]
        for p in range(indptr[c], indptr[c + 1]):
            a = data[p]
            prow = P[indices[p]]
            for r in range(k):
                prow[r] += a * x[r]


def run_kernel(m, n, density, k, reps):
    """``--kernel``: ns per stored nonzero of one block pass on one thread (module docstring)."""
    import numba
    from threadpoolctl import threadpool_limits

    from dnmf.kernels.column import column_terms
    from dnmf.kernels.fused import csc_block_pass
    from dnmf.kernels.nnls import SOLVER_CHOLESKY
    from dnmf.solvers.updates import cholesky_or_empty

    nj = max(n // 8, 1)
    blk = structured_sparse(m, nj, density, k, seed=0)
    # the library's index layout (int32 rows, int64 indptr), which the pass is compiled for
    data, indices, indptr = blk.data, blk.indices.astype(np.int32), blk.indptr.astype(np.int64)
    rng = np.random.default_rng(0)
    w = np.abs(rng.standard_normal((m, k)))
    w /= np.linalg.norm(w, axis=0)
    w = np.ascontiguousarray(w)
    G = w.T @ w + 1e-15 * np.eye(k)
    L = cholesky_or_empty(G, SOLVER_CHOLESKY)
    ht0 = np.abs(rng.standard_normal((nj, k)))
    one_sweep = numba.njit(nogil=True)(_one_sweep_pass_py)

    def ours():
        ht = ht0.copy()
        csc_block_pass(data, indices, indptr, w, G, L, 0.0, ht, np.ones(k), column_terms(k), SOLVER_CHOLESKY, True,
                       100, 1e-8, True, np.zeros((m, k)), np.zeros((k, k)), np.zeros(k))
        return ht

    data32, w32 = data.astype(np.float32), w.astype(np.float32)

    def ours32():  # dtype="float32": float32 values and W, float64 products and sums
        ht = ht0.copy()
        csc_block_pass(data32, indices, indptr, w32, G, L, 0.0, ht, np.ones(k), column_terms(k), SOLVER_CHOLESKY,
                       True, 100, 1e-8, True, np.zeros((m, k)), np.zeros((k, k)), np.zeros(k))

    def before():
        ht = ht0.copy()
        one_sweep(data, indices, indptr, w, G, L, ht, np.zeros((m, k)))

    a_t = sp.csr_matrix(blk.T)
    a_c = sp.csc_matrix(blk)
    with threadpool_limits(1):
        ht = ours()
        ours32()
        before()
        names = ["dnmf pass (two sweeps), float64", "one sweep per column (before issue 12)",
                 "scipy A_j^T W (csr, one thread)", "scipy A_j H_j^T (csc, one thread)",
                 'dnmf pass, dtype="float32"']
        rows = list(zip(names, _best_interleaved([ours, before, lambda: a_t @ w, lambda: a_c @ ht, ours32], reps)))
    nnz = blk.nnz
    print(f"\nOne block pass on one thread: {m} x {nj} at {density}, nnz {nnz:,}, k={k} (best of {reps} "
          "interleaved rounds)")
    print(f"{'kernel':44s} {'ms':>8s} {'ns/nnz':>7s}")
    for name, t in rows:
        print(f"{name:44s} {1e3 * t:8.2f} {1e9 * t / nnz:7.2f}")
    sk = rows[2][1] + rows[3][1]
    print(f"{'scipy products together':44s} {1e3 * sk:8.2f} {1e9 * sk / nnz:7.2f}")
    print(f"dnmf pass / scipy products: {rows[0][1] / sk:.2f} (float32: {rows[4][1] / sk:.2f}); "
          f"one sweep / two sweeps: {rows[1][1] / rows[0][1]:.2f}")


_FIRST_FIT = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np, scipy.sparse as sp
import dnmf
t1 = time.perf_counter()
A = sp.random(300, 400, density=0.1, format="csc", random_state=0)
client = None
if sys.argv[1] == "cluster":
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
t2 = time.perf_counter()
dnmf.nmf(A, 5, seed=1, maxit=20, client=client)
t3 = time.perf_counter()
dnmf.nmf(A, 5, seed=2, maxit=20, client=client)
t4 = time.perf_counter()
print(json.dumps(dict(imp=t1 - t0, first=t3 - t2, second=t4 - t3)))
if client is not None:
    client.close(); cluster.close()
"""


def run_first_fit(reps):
    """``--first-fit``: fresh processes, each with an empty numba cache (module docstring)."""
    import json
    import subprocess
    import sys

    print(f"\nFirst fit on an empty numba cache (300 x 400 at 10 %, k = 5, 20 iterations; {reps} fresh "
          "processes each)")
    print(f"{'run':34s} {'import s':>9s} {'first fit s':>18s} {'second fit s':>13s} {'first - second':>15s}")
    for mode in ("in-process", "cluster"):
        rows = []
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, NUMBA_CACHE_DIR=cache)
                out = subprocess.run([sys.executable, "-c", _FIRST_FIT, mode], env=env, capture_output=True,
                                     text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
        med = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
        lo, hi = min(r["first"] for r in rows), max(r["first"] for r in rows)
        name = "in-process" if mode == "in-process" else "LocalCluster(2 workers x 1 thread)"
        print(f"{name:34s} {med['imp']:9.2f} {med['first']:6.2f} ({lo:.2f}-{hi:.2f}) {med['second']:13.2f} "
              f"{med['first'] - med['second']:15.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--m", type=int, default=20_000)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sk-iter", type=int, default=30)
    ap.add_argument("--w-side", action="store_true")
    ap.add_argument("--compare", action="store_true", help="issue 12: scikit-learn / in-process / LocalCluster")
    ap.add_argument("--iters", type=int, default=30, help="iterations of --compare")
    ap.add_argument("--scale", action="store_true", help="with --compare: s/iter at nnz 5 M, 20 M, 80 M (long)")
    ap.add_argument("--no-sweep", action="store_true", help="with --compare: no s/iter tables against k or nnz")
    ap.add_argument("--test-fraction", type=float, default=0.05)
    ap.add_argument("--kernel", action="store_true", help="issue 12: one block pass per nonzero against scipy")
    ap.add_argument("--first-fit", action="store_true", help="issue 12: first fit on an empty numba cache")
    ap.add_argument("--r-libs", default=None, help="R library with RcppML for --compare (default: $R_LIBS or "
                    "the path /work/shared/tools/rcppml/setup prints)")
    ap.add_argument("--reps", type=int, default=2, help="best of how many runs per side (--compare, --kernel)")
    args = ap.parse_args()
    if not (args.small or args.large or args.w_side or args.compare or args.kernel
            or args.first_fit):
        args.small = args.large = True
    print(f"cores: {os.cpu_count()} (usable here: {_cores()})")
    if args.small:
        run_small()
    if args.large:
        run_large(args.m, args.n, args.density, args.k, args.sk_iter)
    if args.kernel:
        run_kernel(args.m, args.n, args.density, args.k, max(args.reps, 3))
    if args.compare:
        run_compare(args.m, args.n, args.density, args.k, args.iters, args.scale, sweep=not args.no_sweep,
                    reps=args.reps, r_libs=args.r_libs)
    if args.first_fit:
        run_first_fit(max(args.reps, 3))
    if args.w_side:
        run_w_side(args.m, args.n, args.density, (10, 50), args.test_fraction)


if __name__ == "__main__":
    main()
