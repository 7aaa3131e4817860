"""Rank cross-validation with shared passes against the same fits run one after another.

``nmf(A, k=[...], cv_seed=[...])`` on the blocked engine runs the ranks of one replicate
together: every iteration reads each block once and hashes its held-out entries once for all
ranks (``engine/masked.py::fit_masked_many``). This script times that against the same fits as
separate ``nmf`` calls (identical results, checked), in-process, best of ``--repeats``.

    python benchmarks/bench_cv_shared.py                       # 4,000 × 10,000 at 2 %, k = 2..15, 3 seeds
    python benchmarks/bench_cv_shared.py --shape 20000 50000   # the issue's size (long)
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp

import dnmf
from dnmf.cv import engine_init


def planted(m: int, n: int, density: float, k: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = sp.random(m, n, density=density, random_state=rng, format="csc")
    W = rng.gamma(0.5, 1.0, (m, k))
    H = rng.gamma(0.5, 1.0, (k, n))
    A.data = np.einsum("ij,ij->i", W[A.indices], H[:, np.repeat(np.arange(n), np.diff(A.indptr))].T)
    A.data += rng.gamma(1.0, 0.1, A.nnz)
    return A


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(4000, 10000))
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(2, 16)))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--maxit", type=int, default=30)
    ap.add_argument("--test-fraction", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    m, n = args.shape
    A = planted(m, n, args.density)
    seeds = list(range(1, args.reps + 1))
    kw = dict(test_fraction=args.test_fraction, maxit=args.maxit, client=False)
    dnmf.nmf(A[:, :200], [2, 3], cv_seed=[1], **kw)  # compile the kernels outside the timings
    print(f"A: {m} × {n}, nnz {A.nnz:,}; ranks {args.ks[0]}..{args.ks[-1]} × {args.reps} cv seeds; "
          f"test_fraction {args.test_fraction}; maxit {args.maxit}; in-process")
    shared_t, separate_t, shared_cpu, separate_cpu = [], [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = dnmf.nmf(A, args.ks, cv_seed=seeds, **kw)
        shared_t.append(time.perf_counter() - t0)
        shared_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        alone = []
        for s in seeds:
            for k in args.ks:
                mdl = dnmf.nmf(A, k, init=engine_init(m, k, s + k), seed=s + k, cv_seed=s, **kw)
                alone.append(mdl.misc["test_loss"])
        separate_t.append(time.perf_counter() - t0)
        separate_cpu.append(time.process_time() - c0)
    assert np.array_equal(res.table["test_mse"].to_numpy(), np.array(alone)), "shared passes changed a result"
    fits = len(args.ks) * args.reps
    iters = int(res.table["total_iter"].sum())
    print(f"{'':30s}{'wall s':>10s}{'per fit':>10s}{'CPU s':>10s}")
    print(f"{'shared passes (per replicate)':30s}{min(shared_t):10.2f}{min(shared_t) / fits:10.3f}"
          f"{min(shared_cpu):10.2f}")
    print(f"{'one fit after another':30s}{min(separate_t):10.2f}{min(separate_t) / fits:10.3f}"
          f"{min(separate_cpu):10.2f}")
    # CPU seconds (all threads of the process) are the fairer measure on a shared machine: other
    # processes' load stretches the wall time of whichever side happens to run beside them.
    print(f"ratio shared / separate: wall {min(shared_t) / min(separate_t):.2f}, CPU "
          f"{min(shared_cpu) / min(separate_cpu):.2f} ({fits} fits, {iters} iterations; identical tables; "
          f"best k {res.best_k})")


if __name__ == "__main__":
    main()
