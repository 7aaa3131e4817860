"""KL (Poisson) NMF: dnmf's multiplicative updates on the blocks against scikit-learn's.

Same sparse Poisson matrix, same rank, same number of iterations; dnmf in-process (after one
warm-up call, so numba compilation is excluded) and scikit-learn
``NMF(beta_loss="kullback-leibler", solver="mu")``; best of ``--repeats``; the KL divergence of
each final model computed the same way, over all entries (zeros in closed form).

    python benchmarks/bench_kl.py                      # 5,000 × 20,000, k = 10, 100 iterations
    python benchmarks/bench_kl.py --missing            # + the same fit with missing entries

``--missing`` also times dnmf's KL fit with a 5 % user mask, with ``mask="zeros"`` and with a
10 % test set (``test_fraction``; the §5.2 hash runs over every entry per iteration), each
against the plain fit: the masked passes stay one read of the stored entries per iteration.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp

import dnmf


def kl_divergence(A, W, H) -> float:
    """Σ a log(a/μ) − a + μ with μ = WH, over all entries; μ only at the stored entries plus Σμ."""
    A = sp.csc_matrix(A)
    rows = A.indices
    cols = np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))
    mu = np.einsum("ik,ki->i", W[rows], H[:, cols])
    total_mu = float(W.sum(axis=0) @ H.sum(axis=1))
    return float((A.data * np.log(A.data / mu)).sum() - A.data.sum() + total_mu)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(5000, 20000))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--scale", type=float, default=0.05, help="mean count scale of the planted matrix")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--missing", action="store_true", help="also time fits with a mask, zeros missing, a test set")
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from sklearn.decomposition import NMF

    m, n = args.shape
    rng = np.random.default_rng(0)
    W = rng.gamma(0.3, 1.0, (m, args.k))
    H = rng.gamma(0.3, 1.0, (args.k, n))
    A = sp.csc_matrix(rng.poisson(W @ H * args.scale).astype(float))
    print(f"A: {m} × {n}, nnz {A.nnz:,} ({A.nnz / m / n:.1%}), k = {args.k}, {args.iters} iterations, "
          f"best of {args.repeats}")
    dnmf.nmf(A[:, :500], args.k, loss="kl", maxit=2, client=False)  # compile
    rows = []
    best = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model = dnmf.nmf(A, args.k, loss="kl", seed=1, tol=0, maxit=args.iters, client=False)
        best = min(best, time.perf_counter() - t0)
    rows.append(("dnmf (in-process)", best, kl_divergence(A, model.w * model.d, model.h)))
    if args.missing:
        mask = sp.random(m, n, density=0.05, format="csc", random_state=2) != 0
        for name, kw in (("dnmf, 5 % mask", dict(mask=mask)), ("dnmf, mask='zeros'", dict(mask="zeros")),
                         ("dnmf, test_fraction 0.1", dict(test_fraction=0.1, cv_seed=1, patience=args.iters))):
            t_best = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fit = dnmf.nmf(A, args.k, loss="kl", seed=1, tol=0, maxit=args.iters, client=False, **kw)
                t_best = min(t_best, time.perf_counter() - t0)
            rows.append((name, t_best, float(fit.misc["loss"])))
    if args.no_sklearn:
        print(f"{'':26s}{'seconds':>9s}{'KL (observed; mean with a test set)':>38s}")
        for name, t, d in rows:
            print(f"{name:26s}{t:9.2f}{d:38.6g}")
        return
    best = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sk = NMF(args.k, beta_loss="kullback-leibler", solver="mu", init="random", random_state=1,
                 max_iter=args.iters, tol=0)
        w_sk = sk.fit_transform(A)  # A as samples × features: A ≈ w_sk @ components_
        best = min(best, time.perf_counter() - t0)
    rows.append(("scikit-learn mu", best, kl_divergence(A, w_sk, sk.components_)))
    print(f"{'':22s}{'seconds':>9s}{'KL divergence':>16s}")
    for name, t, d in rows:
        print(f"{name:22s}{t:9.2f}{d:16.6g}")
    print(f"time ratio dnmf / scikit-learn: {rows[0][1] / rows[1][1]:.2f}; KL ratio: {rows[0][2] / rows[1][2]:.6f}")


if __name__ == "__main__":
    main()
