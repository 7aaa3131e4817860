"""Benchmark of the column-blocked NMF-RE fit (engine "cap") on a Dask LocalCluster.

Run: ``python benchmarks/bench_nmfre.py [--P 50 --N 1000000 --Q 3 --K 4] [--blocks 8]
[--maxit 30] [--workers 2] [--no-bootstrap]``

Synthetic data with planted factors: X (P × Q) Dirichlet columns, Θ (Q × K) uniform, A (K × N)
an intercept row plus K − 1 binary covariates, U (Q × N) normal random effects and Gaussian
noise, Y = max(X(ΘA + U) + E, 0). Each column block is generated from its own spawned seed and
placed on the workers; the client only ever sees Q × Q, P × Q and Q × K statistics.

Printed: the set-up time (data generation and placement), the initialiser (one pass for the
constants + nmfkc on a column subsample + nmfkc's EU iterations on the constants), the time per
iteration of the fit (two passes over Y), the inference pass (sandwich + ``wild_B`` bootstrap
replicates), and the total. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dnmf.io.blocks import BlockedMatrix, InMemorySource
from dnmf.mixed import nmfre_blocked


def planted(P: int, N: int, Q: int, K: int, n_blocks: int, seed: int = 0):
    """Blocked synthetic NMF-RE data and the truth (X, Θ)."""
    root = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root.spawn(1)[0])
    X = rng.dirichlet(np.full(P, 0.5), size=Q).T  # P × Q, columns sum to 1
    Theta = rng.uniform(5.0, 20.0, (Q, K))
    bounds = np.linspace(0, N, n_blocks + 1).round().astype(np.int64)
    sources, A_parts = [], []
    for j, ss in enumerate(root.spawn(n_blocks)):
        r = np.random.default_rng(ss)
        n = int(bounds[j + 1] - bounds[j])
        A = np.vstack([np.ones(n), (r.random((K - 1, n)) < 0.5).astype(float)])
        U = r.normal(0.0, 2.0, (Q, n))
        Y = X @ (Theta @ A + U) + r.normal(0.0, 0.05, (P, n))
        sources.append(InMemorySource(np.maximum(Y, 0.0)))
        A_parts.append(A)
    Yb = BlockedMatrix(shape=(P, N), dtype=np.dtype(np.float64), sources=tuple(sources), sparse=False)
    return Yb, np.hstack(A_parts), X, Theta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=50)
    ap.add_argument("--N", type=int, default=1_000_000)
    ap.add_argument("--Q", type=int, default=3)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--maxit", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--df-rate", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--wild-B", type=int, default=200)
    ap.add_argument("--no-bootstrap", action="store_true")
    args = ap.parse_args()

    import distributed

    t0 = time.perf_counter()
    Yb, A, X_true, Theta = planted(args.P, args.N, args.Q, args.K, args.blocks)
    t_gen = time.perf_counter() - t0
    print(f"data: P={args.P} N={args.N:,} Q={args.Q} K={args.K}, {args.blocks} blocks, "
          f"{args.P * args.N * 8 / 2**20:.0f} MiB dense; generated in {t_gen:.1f} s")
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        t1 = time.perf_counter()
        fit = nmfre_blocked(Yb, A, rank=args.Q, df_rate=args.df_rate, maxit=args.maxit, epsilon=args.epsilon,
                            wild_bootstrap=not args.no_bootstrap, wild_B=args.wild_B, client=client)
        total = time.perf_counter() - t1
    it = fit.iter_times
    loop = float(it.sum())
    print(f"workers: {args.workers} (threads, LocalCluster processes=False)")
    print(f"iterations: {fit.n_iter} / {args.maxit} ({fit.stop_reason}); dfU = {fit.dfU:,.1f} "
          f"(cap {fit.dfU_cap:,.0f}); R2 = {fit.r_squared:.4f}")
    print(f"time per iteration: median {np.median(it):.2f} s, mean {it.mean():.2f} s (2 passes over Y)")
    print(f"fit loop: {loop:.1f} s; placement + constants + initialiser + finalisation + inference: "
          f"{total - loop:.1f} s")
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in fit.timings.items()))
    print(f"total nmfre_blocked: {total:.1f} s")
    # recovery of the planted basis (columns matched by cosine)
    cos = (fit.X / np.linalg.norm(fit.X, axis=0)).T @ (X_true / np.linalg.norm(X_true, axis=0))
    print("basis cosine to truth (best match per fitted column):", np.round(cos.max(axis=1), 3))
    if fit.coefficients is not None:
        print(fit.coefficients[["Basis", "Covariate", "Estimate", "SE", "BSE"]].to_string(index=False))


if __name__ == "__main__":
    main()
