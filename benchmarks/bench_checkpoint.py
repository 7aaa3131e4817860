"""What a checkpoint costs: seconds per save, against the number of column blocks.

A save writes W, d and h_scale from the client and one Zarr array per H block on the worker that
holds it (``dnmf/engine/checkpoint.py``). This fits the same planted sparse matrix from the same
start with checkpoints after every iteration and without, on each executor of ``--where``, for
several block sizes, and reports the extra seconds per save (the difference of the two fits'
times divided by the number of saves; best of ``--repeats`` interleaved rounds).

    python benchmarks/bench_checkpoint.py                 # 1,500 × 2,000 at 5 %, k = 6
    python benchmarks/bench_checkpoint.py --m 20000 --n 50000 --density 0.02 --k 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np


def fit_seconds(A, k, iters, w0, client, block_nnz, checkpoint):
    import dnmf

    t = time.perf_counter()
    dnmf.nmf(A, k, init=w0, maxit=iters, tol=0.0, client=client, block_nnz=block_nnz,
             **({"checkpoint": checkpoint, "checkpoint_every": 1} if checkpoint else {}))
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=1500)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 10, 40], help="column blocks (about)")
    p.add_argument("--where", nargs="+", default=["threads", "processes"], choices=["inprocess", "threads", "processes"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import scipy.sparse as sp
    from distributed import Client, LocalCluster

    import dnmf

    A = sp.random(args.m, args.n, density=args.density, random_state=0, format="csc")
    w0 = np.random.default_rng(0).uniform(size=(args.m, args.k))
    print(f"{args.m} × {args.n} at {args.density:g} ({A.nnz:,} nonzeros), k = {args.k}, {args.iters} iterations, "
          f"a checkpoint after each (dnmf {dnmf.__file__})")
    for where in args.where:
        if where == "inprocess":
            cluster, client = None, False
        else:
            cluster = LocalCluster(n_workers=2 if where == "processes" else 1, threads_per_worker=1 if where == "processes" else 2,
                                   processes=where == "processes", dashboard_address=None)
            client = Client(cluster)
        try:
            for nb in args.blocks:
                block_nnz = max(1, A.nnz // nb)
                fit_seconds(A, args.k, 2, w0, client, block_nnz, None)  # warm: kernels, placement
                best = {False: np.inf, True: np.inf}
                for _ in range(args.repeats):
                    for ck in (False, True):
                        with tempfile.TemporaryDirectory() as d:
                            t = fit_seconds(A, args.k, args.iters, w0, client, block_nnz, f"{d}/ck.zarr" if ck else None)
                        best[ck] = min(best[ck], t)
                per_save = (best[True] - best[False]) / args.iters
                print(f"{where:10s} {nb:4d} blocks: fit {best[False]:6.2f} s, with checkpoints {best[True]:6.2f} s: "
                      f"{1e3 * per_save:6.1f} ms a save", flush=True)
        finally:
            if cluster is not None:
                client.close()
                cluster.close()


if __name__ == "__main__":
    main()
