"""Rank cross-validation timed beside RcppML 1.0: ``nmf(A, k=2:12, cv_seed=1:3)``.

Run: ``python benchmarks/bench_cv.py [--repeats 3] [--large [--shape 5000 10000 --density 0.02
--ks 2,5,10 --reps 1]] [--profile] [--r-libs PATH]``

* Default: the grid k = 2…12 × cv_seed 1…3 (test_fraction 0.1, tol 1e-4, maxit 100 — the
  defaults of both packages) on the bundled hawaiibirds (183 × 1183, sparse) and aml
  (824 × 135, dense) data. Engines (each keeps its best of ``--repeats`` rounds; within a
  round they take turns, so that a busy spell on a shared machine slows them alike):
  - dnmf in-process (``client=False``), after a first call whose time (numba compilation
    included) is reported on its own line;
  - dnmf on a ``LocalCluster(n_workers=2, threads_per_worker=1)``, the same way (cluster
    start-up excluded);
  - RcppML 1.0 through ``Rscript`` with ``threads = 2`` on the same matrix (handed over as a
    Matrix Market file when sparse, raw float64 when dense), timed inside R by
    ``system.time()`` around the ``nmf`` call after an untimed warm-up call; and the same with
    ``threads = 1`` (dnmf's in-process grid runs its fits one after another, each on one
    thread). Skipped with a message when R or RcppML is not available: this script never
    needs R.
  The table gives each engine's best seconds, the ratio to RcppML (threads = 2) in this run and
  to the issue's numbers, the grid's total iterations and the milliseconds per iteration.
  Then one line per data set compares the two CV tables: the largest relative difference of
  test_mse and train_mse over the rows, the rows whose total_iter (and best_iter) agree, and
  each package's best k. (RcppML reports best_iter as the 0-based iteration + 2; dnmf's is
  1-based, so RcppML's = dnmf's + 1, which the comparison accounts for.)
  The issue quotes RcppML at 2.50 s (hawaiibirds) and 1.35 s (aml) on 2 threads.
* ``--large``: a synthetic sparse matrix (``--shape`` m n, ``--density``) over ``--ks`` ×
  cv_seed 1…``--reps``, dnmf in-process (and RcppML when available), time per fit.
* ``--profile``: cProfile of one in-process CV fit per data set,
  ``dnmf.nmf(A, 5, test_fraction=0.1, cv_seed=1, seed=6, client=False)`` (after warm-up): the
  masked kernels' share of the time and per iteration, the rest, and the top functions by own
  time. ``--no-small`` skips the default grid (for ``--large`` or ``--profile`` alone).
Timings print as tables; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import scipy.io
import scipy.sparse as sp

import dnmf

KS = list(range(2, 13))
CV_SEEDS = [1, 2, 3]
RCPPML_ISSUE_S = {"hawaiibirds": 2.50, "aml": 1.35}  # quoted in the issue, 2 threads
DEFAULT_R_LIBS = "/root/.cache/rcppml-1.0.0-lib"  # what /work/shared/tools/rcppml/setup prints


# ---- dnmf ------------------------------------------------------------------------------------

def cv_grid(A, ks, cv_seeds, client):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at maxit: part of the grid, as in RcppML
        return dnmf.nmf(A, k=list(ks), cv_seed=list(cv_seeds), client=client)


def time_calls(f, repeats):
    """(seconds of each call, result of the last) for ``repeats`` calls of ``f``."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return times, out


# ---- RcppML through Rscript ------------------------------------------------------------------

_R_SCRIPT = r"""
suppressPackageStartupMessages({library(Matrix); library(RcppML)})
args <- commandArgs(trailingOnly = TRUE)
kind <- args[1]; path <- args[2]; m <- as.integer(args[3]); n <- as.integer(args[4])
repeats <- as.integer(args[5]); out <- args[6]
ks <- as.integer(strsplit(args[7], ",")[[1]]); seeds <- as.integer(strsplit(args[8], ",")[[1]])
threads <- as.integer(args[9])
A <- if (kind == "sparse") as(readMM(path), "CsparseMatrix") else
  matrix(readBin(path, "double", n = m * n), m, n)
invisible(nmf(A, k = ks[1], cv_seed = seeds[1], maxit = 2, threads = threads, verbose = FALSE))  # warm-up, untimed
secs <- numeric(repeats)
for (i in seq_len(repeats)) {
  secs[i] <- system.time(r <- nmf(A, k = ks, cv_seed = seeds, threads = threads, verbose = FALSE))[["elapsed"]]
}
writeLines(format(secs, digits = 6), paste0(out, ".times"))
r <- as.data.frame(r)
r$rep <- as.integer(as.character(r$rep))
write.csv(r[, c("rep", "k", "train_mse", "test_mse", "best_iter", "total_iter")], paste0(out, ".csv"),
          row.names = FALSE)
"""


def find_rcppml(r_libs):
    """The environment for Rscript with RcppML loadable, or None (with the reason printed)."""
    if shutil.which("Rscript") is None:
        print("RcppML: skipped (no Rscript on PATH; see /work/shared/tools/rcppml/README.md)")
        return None
    env = dict(os.environ)
    r_libs = r_libs or os.environ.get("R_LIBS") or (DEFAULT_R_LIBS if os.path.isdir(DEFAULT_R_LIBS) else None)
    if r_libs:
        env["R_LIBS"] = r_libs
    probe = subprocess.run(["Rscript", "-e", "suppressPackageStartupMessages(library(RcppML)); "
                            "cat(as.character(packageVersion('RcppML')))"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"RcppML: skipped (library(RcppML) failed with R_LIBS={r_libs}): {probe.stderr.strip()[-300:]}")
        return None
    print(f"RcppML {probe.stdout.strip()} found (R_LIBS={r_libs})")
    return env


def write_for_r(A, folder):
    """Write A where R can read it: ``(kind, path)``; Matrix Market when sparse, raw float64 when dense."""
    if sp.issparse(A):
        path = os.path.join(folder, "A.mtx")
        scipy.io.mmwrite(path, sp.coo_matrix(A), precision=17)  # 17 digits: the float64 values exactly
        return "sparse", path
    path = os.path.join(folder, "A.bin")
    np.asarray(A, dtype="<f8").ravel(order="F").tofile(path)  # R matrices are column-major
    return "dense", path


def time_rcppml(env, data_file, shape, ks, cv_seeds, repeats, threads=2):
    """(seconds of each of ``repeats`` calls, RcppML's CV table as a DataFrame) for the grid on the
    matrix in ``data_file`` (``write_for_r``'s answer)."""
    import pandas as pd

    kind, path = data_file
    with tempfile.TemporaryDirectory(prefix="bench_cv_r_") as tmp:
        script = os.path.join(tmp, "cv.R")
        with open(script, "w") as f:
            f.write(_R_SCRIPT)
        out = os.path.join(tmp, "out")
        proc = subprocess.run(["Rscript", script, kind, path, str(shape[0]), str(shape[1]), str(repeats), out,
                               ",".join(map(str, ks)), ",".join(map(str, cv_seeds)), str(threads)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"Rscript failed:\n{proc.stderr[-2000:]}")
        with open(out + ".times") as f:
            secs = [float(x) for x in f.read().split()]
        table = pd.read_csv(out + ".csv")
    return secs, table


def best_k_of(table):
    """argmin over k of the mean test MSE over replicates (the smaller k on a tie), as CVResult.best_k."""
    mean = table.groupby("k", sort=True)["test_mse"].mean()
    return int(mean.index[int(np.argmin(mean.to_numpy()))])


def compare_tables(ours, theirs):
    """dnmf's CV table against RcppML's, row by row on (rep, k)."""
    both = ours.merge(theirs, on=["rep", "k"], suffixes=("", "_r"))
    rel = lambda a, b: np.abs(both[a] - both[b]) / np.abs(both[b])  # noqa: E731
    return {
        "rows": len(both),
        "test_rel": float(rel("test_mse", "test_mse_r").max()),
        "train_rel": float(rel("train_mse", "train_mse_r").max()),
        "same_total_iter": int((both["total_iter"] == both["total_iter_r"]).sum()),
        "same_best_iter": int((both["best_iter"] + 1 == both["best_iter_r"]).sum()),  # RcppML: 0-based + 2
        "best_k": best_k_of(ours),
        "best_k_r": best_k_of(theirs),
        "diff_iter": both.loc[both["total_iter"] != both["total_iter_r"], ["rep", "k", "total_iter", "total_iter_r"]],
    }


# ---- the default run -------------------------------------------------------------------------

def _runs(times):
    return " ".join(f"{t:.2f}" for t in times)


def run_small(repeats, r_env):
    """The k = 2..12 × cv_seed 1..3 grid on hawaiibirds and aml; the engines take turns in every
    round (a noisy shared machine then slows them alike), and each keeps its best round."""
    from distributed import Client, LocalCluster

    from dnmf.datasets import load_aml, load_hawaiibirds

    data = {"hawaiibirds": load_hawaiibirds().X, "aml": load_aml().X}
    times = {}  # (data, engine) -> seconds of each call
    tables = {}  # (data, engine) -> CV table (the last call's)

    def record(name, engine, secs, table):
        times.setdefault((name, engine), []).extend(secs)
        tables[name, engine] = table

    with tempfile.TemporaryDirectory(prefix="bench_cv_") as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                         scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"}) as cluster, \
            Client(cluster) as client:
        client.run(warnings.simplefilter, "ignore")  # the workers' ConvergenceWarnings, as in cv_grid
        files = {}
        for name, A in data.items():
            os.makedirs(os.path.join(tmp, name))
            files[name] = write_for_r(A, os.path.join(tmp, name))
            print(f"{name}: first calls (numba compilation) ...", flush=True)
            for engine, client_ in (("in-process", False), ("LocalCluster", client)):
                secs, res = time_calls(partial(cv_grid, A, KS, CV_SEEDS, client_), 1)
                record(name, f"dnmf {engine}, first call", secs, res.table)
        for rnd in range(1, repeats + 1):
            print(f"round {rnd} of {repeats} ...", flush=True)
            for name, A in data.items():
                for engine, client_ in (("in-process", False), ("LocalCluster", client)):
                    secs, res = time_calls(partial(cv_grid, A, KS, CV_SEEDS, client_), 1)
                    record(name, f"dnmf {engine}", secs, res.table)
                if r_env is not None:
                    for threads in (2, 1):
                        secs, table = time_rcppml(r_env, files[name], A.shape, KS, CV_SEEDS, 1, threads)
                        record(name, f"RcppML threads={threads}", secs, table)

    labels = {"dnmf in-process, first call": "dnmf in-process, first call (JIT)", "dnmf in-process": "dnmf in-process",
              "dnmf LocalCluster, first call": "dnmf LocalCluster 2x1, first call",
              "dnmf LocalCluster": "dnmf LocalCluster 2x1", "RcppML threads=2": "RcppML 1.0, threads=2",
              "RcppML threads=1": "RcppML 1.0, threads=1"}
    print(f"\nRank CV, k = 2..12 x cv_seed 1..3 ({len(KS) * len(CV_SEEDS)} fits), test_fraction 0.1, tol 1e-4, "
          f"maxit 100; best of {repeats} rounds; cores: {os.cpu_count()}")
    print(f"{'data':12s} {'engine':34s} {'seconds':>8s} {'/ RcppML':>8s} {'/ issue':>8s} {'iters':>6s} {'ms/iter':>7s}"
          f"  runs (s)")
    for name in data:
        ref = min(times[name, "RcppML threads=2"]) if (name, "RcppML threads=2") in times else None
        for engine, label in labels.items():
            if (name, engine) not in times:
                continue
            sec = min(times[name, engine])
            iters = int(tables[name, engine]["total_iter"].sum())
            r = f"{sec / ref:8.2f}" if ref else f"{'-':>8s}"
            print(f"{name:12s} {label:34s} {sec:8.2f} {r} {sec / RCPPML_ISSUE_S[name]:8.2f} {iters:6d} "
                  f"{1000 * sec / iters:7.2f}  {_runs(times[name, engine])}")
    print("('/ RcppML': against RcppML threads=2 in this run; '/ issue': against the issue's RcppML times, "
          "hawaiibirds 2.50 s, aml 1.35 s, 2 threads; iters: the grid's total iterations)")
    for name in data:
        if not tables[name, "dnmf LocalCluster"].equals(tables[name, "dnmf in-process"]):
            print(f"note: {name}: the LocalCluster's CV table differs from the in-process one")
    if r_env is None:
        return
    print("\nCV tables, dnmf (in-process) vs RcppML (threads=2), rows matched on (rep, k)")
    print(f"{'data':12s} {'rows':>4s} {'max rel test_mse':>16s} {'max rel train_mse':>17s} "
          f"{'same total_iter':>15s} {'same best_iter':>14s} {'best k dnmf':>11s} {'best k RcppML':>13s}")
    comparisons = {name: compare_tables(tables[name, "dnmf in-process"], tables[name, "RcppML threads=2"])
                   for name in data}
    for name, c in comparisons.items():
        print(f"{name:12s} {c['rows']:4d} {c['test_rel']:16.2e} {c['train_rel']:17.2e} {c['same_total_iter']:15d} "
              f"{c['same_best_iter']:14d} {c['best_k']:11d} {c['best_k_r']:13d}")
    for name, c in comparisons.items():
        if len(c["diff_iter"]):
            print(f"{name}: rows with different total_iter (dnmf/RcppML):",
                  ", ".join(f"rep {r.rep} k {r.k}: {r.total_iter}/{r.total_iter_r}" for r in c["diff_iter"].itertuples()))


# ---- --large ---------------------------------------------------------------------------------

def run_large(m, n, density, ks, reps, repeats, r_env):
    from bench_nmf import structured_sparse  # this directory (run as a script)

    print(f"\nLarge sparse: {m} x {n}, density {density}; generating ...", flush=True)
    A = structured_sparse(m, n, density, 10, seed=0)
    seeds = list(range(1, reps + 1))
    n_fits = len(ks) * reps
    print(f"nnz = {A.nnz:,}; grid k = {ks} x cv_seed {seeds} ({n_fits} fits)", flush=True)
    cv_grid(A[:, :500], ks[:1], seeds[:1], False)  # JIT warm-up
    times, res = time_calls(partial(cv_grid, A, ks, seeds, False), repeats)
    iters = int(res.table["total_iter"].sum())
    rows = [("dnmf in-process", min(times), iters)]
    if r_env is not None:
        print("RcppML ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_cv_") as tmp:
            secs, table = time_rcppml(r_env, write_for_r(A, tmp), A.shape, ks, seeds, repeats)
        rows.append(("RcppML 1.0, threads=2", min(secs), int(table["total_iter"].sum())))
    print(f"{'engine':24s} {'seconds':>8s} {'s / fit':>8s} {'iters':>6s} {'s / iter':>8s}")
    for engine, s, it in rows:
        print(f"{engine:24s} {s:8.2f} {s / n_fits:8.2f} {it:6d} {s / it:8.4f}")
    print(res.table.to_string(index=False))


# ---- --profile -------------------------------------------------------------------------------

def run_profile(top=15):
    """cProfile of one CV fit per data set: the kernels' share, the rest, per-iteration times."""
    import cProfile
    import pstats

    from dnmf.datasets import load_aml, load_hawaiibirds

    for name, A in (("hawaiibirds", load_hawaiibirds().X), ("aml", load_aml().X)):
        # seed=6 (= cv_seed + k, the grid's start): without a seed every call starts elsewhere
        # and the iteration count varies from call to call.
        fit = partial(dnmf.nmf, A, 5, test_fraction=0.1, cv_seed=1, seed=6, client=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit()  # JIT warm-up
            times, model = time_calls(fit, 5)
            prof = cProfile.Profile()
            prof.runcall(fit)
        it = model.misc["iter"]
        wall = min(times)
        stats = pstats.Stats(prof)
        total = stats.total_tt
        own = {}
        for (_file, _line, func), (_, _, tt, _, _) in stats.stats.items():
            own[func] = own.get(func, 0.0) + tt
        kernels = {f: t for f, t in own.items() if f.endswith("_masked_pass")}
        print(f"\nProfile: {name}, nmf(A, 5, test_fraction=0.1, cv_seed=1, seed=6, client=False): {it} iterations, "
              f"{1000 * wall:.1f} ms unprofiled (best of 5), {1000 * wall / it:.2f} ms per iteration; "
              f"profiled {1000 * total:.1f} ms")
        for f, t in sorted(kernels.items(), key=lambda x: -x[1]):
            print(f"  {f:28s} {1000 * t:8.1f} ms  {100 * t / total:5.1f} %  {1000 * t / it:6.3f} ms per iteration")
        rest = total - sum(kernels.values())
        print(f"  {'everything else':28s} {1000 * rest:8.1f} ms  {100 * rest / total:5.1f} %  "
              f"{1000 * rest / it:6.3f} ms per iteration")
        stats.strip_dirs().sort_stats("tottime").print_stats(top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine; the best counts")
    ap.add_argument("--large", action="store_true", help="also the synthetic sparse grid (long)")
    ap.add_argument("--shape", type=int, nargs=2, default=(5000, 10000), metavar=("M", "N"))
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--ks", default="2,5,10", help="ranks of the --large grid, comma-separated")
    ap.add_argument("--reps", type=int, default=1, help="cv seeds 1..reps of the --large grid")
    ap.add_argument("--profile", action="store_true", help="cProfile one CV fit per data set")
    ap.add_argument("--no-small", action="store_true", help="skip the default hawaiibirds/aml grid")
    ap.add_argument("--r-libs", default=None, help=f"R library with RcppML (default: $R_LIBS or {DEFAULT_R_LIBS})")
    args = ap.parse_args()
    r_env = find_rcppml(args.r_libs)
    if not args.no_small:
        run_small(args.repeats, r_env)
    if args.large:
        ks = [int(k) for k in args.ks.split(",")]
        run_large(args.shape[0], args.shape[1], args.density, ks, args.reps, args.repeats, r_env)
    if args.profile:
        run_profile()


if __name__ == "__main__":
    main()
