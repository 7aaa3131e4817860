"""Benchmark of the column-blocked NMF-RE fit, engines "cap" and "ecm", on a Dask LocalCluster.

Run: ``python benchmarks/bench_nmfre.py [--P 50 --N 1000000 250000 --Q 3 --K 4] [--blocks 8]
[--maxit 30] [--workers 2] [--engines cap ecm] [--wild-B 200] [--no-bootstrap]``

Synthetic data with planted factors: X (P × Q) Dirichlet columns, Θ (Q × K) uniform, A (K × N)
an intercept row plus K − 1 binary covariates, U (Q × N) normal random effects and Gaussian
noise, Y = max(X(ΘA + U) + E, 0). Each column block is **generated on the worker that holds
it** (:class:`PlantedSource`, from its own spawned seed, on its first read, then kept there), so
Y never exists on the client; the client holds only A (K × N, an input of the fit) and the
statistics.

The workers are processes (``LocalCluster(processes=True)``), so the client process's resident
memory (RSS, sampled every 5 ms in a thread) is the client's alone (plus the in-process
scheduler); a small warm-up fit per engine runs first, so imports are not counted. Printed per engine and N: the time per iteration (median over the fit loop; "cap"
reads Y twice per iteration, "ecm" once, twice with ``C_signed=False``), the phases, and the
client's peak RSS above its level at the call (``client peak +MiB``), over the whole call and
from the fit's first U pass on (fit loop, finish, inference: ``from first pass``). The peak should not grow
with N apart from the copies of A the call makes (K × N × 8 bytes each: A is cut into blocks
and serialised once). The rank ≥ 2 initialiser gathers ``init_sample`` (20000) columns of Y on
the client: P × 20000 × 8 bytes (8 MiB at P = 50), the same for every N ≥ 20000. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
import warnings

import numpy as np

from dnmf.io.blocks import BlockedMatrix
from dnmf.mixed import nmfre_blocked


class PlantedSource:
    """A block source that generates its Y block on first ``load()`` (on the worker) and keeps it."""

    def __init__(self, seed: np.random.SeedSequence, n: int, X: np.ndarray, Theta: np.ndarray):
        self.seed, self.n, self.X, self.Theta = seed, n, X, Theta
        self._block = None

    @property
    def n_cols(self) -> int:
        return self.n

    @property
    def nnz(self) -> int:
        return self.X.shape[0] * self.n

    def load(self) -> np.ndarray:
        if self._block is None:
            r = np.random.default_rng(self.seed)
            (P, Q), K = self.X.shape, self.Theta.shape[1]
            A = block_covariates(r, self.n, K)  # the client's draws of A_j (same seed, drawn first)
            U = r.normal(0.0, 2.0, (Q, self.n))
            E = r.normal(0.0, 0.05, (P, self.n))
            self._block = np.maximum(self.X @ (self.Theta @ A + U) + E, 0.0)
        return self._block

    def __getstate__(self):  # ship the recipe, never the generated block
        return {**self.__dict__, "_block": None}


def block_covariates(r: np.random.Generator, n: int, K: int) -> np.ndarray:
    """A_j: an intercept row and K − 1 binary covariates."""
    return np.vstack([np.ones(n), (r.random((K - 1, n)) < 0.5).astype(float)])


def planted(P: int, N: int, Q: int, K: int, n_blocks: int, seed: int = 0):
    """Blocked synthetic NMF-RE data (generated lazily on the workers), A and the truth (X, Θ)."""
    root = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root.spawn(1)[0])
    X = rng.dirichlet(np.full(P, 0.5), size=Q).T  # P × Q, columns sum to 1
    Theta = rng.uniform(5.0, 20.0, (Q, K))
    bounds = np.linspace(0, N, n_blocks + 1).round().astype(np.int64)
    sources, A_parts = [], []
    for j, ss in enumerate(root.spawn(n_blocks)):
        n = int(bounds[j + 1] - bounds[j])
        sources.append(PlantedSource(ss, n, X, Theta))
        A_parts.append(block_covariates(np.random.default_rng(ss), n, K))
    Yb = BlockedMatrix(shape=(P, N), dtype=np.dtype(np.float64), sources=tuple(sources), sparse=False,
                       in_memory=False)
    return Yb, np.hstack(A_parts), X, Theta


class PeakRSS:
    """Peak memory of this process while the context is open, sampled in a thread: resident
    memory (RSS: includes memory freed but kept by the allocator), or with ``traced=True`` the
    live allocations that tracemalloc sees (NumPy arrays included; slows the client a little)."""

    def __init__(self, interval: float = 0.005, traced: bool = False):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.traced = traced
        self.base = self.peak = 0
        self.samples: list[tuple[float, int]] = []

    def _now(self) -> int:
        if self.traced:
            import tracemalloc

            return tracemalloc.get_traced_memory()[0]
        return self._proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            rss = self._now()
            self.samples.append((time.perf_counter(), rss))
            self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def window_mib(self, t0: float, t1: float) -> float:
        """Peak RSS above the base between two ``perf_counter`` times."""
        inside = [rss for t, rss in self.samples if t0 <= t <= t1]
        return (max(inside, default=self.base) - self.base) / 2**20

    def __enter__(self):
        if self.traced:
            import tracemalloc

            tracemalloc.start()
        self.base = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())
        if self.traced:
            import tracemalloc

            self.peak = max(self.peak, tracemalloc.get_traced_memory()[1])  # the exact peak
            tracemalloc.stop()

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@contextlib.contextmanager
def first_pass_time():
    """Yields a list that receives the time of the fit's first U pass (either engine)."""
    from dnmf.mixed.blocks import BlockedData
    from dnmf.mixed.ecm_blocked import ECMBlockedData

    marks: list[float] = []
    saved = {(cls, name): getattr(cls, name) for cls, name in ((BlockedData, "u_step"), (ECMBlockedData, "u_pass"))}

    def marked(orig):
        def wrapper(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())
            return orig(self, *a, **k)
        return wrapper

    for (cls, name), orig in saved.items():
        setattr(cls, name, marked(orig))
    try:
        yield marks
    finally:
        for (cls, name), orig in saved.items():
            setattr(cls, name, orig)


def run_one(engine: str, args, N: int, client) -> dict:
    Yb, A, X_true, _ = planted(args.P, N, args.Q, args.K, args.blocks)
    kw = dict(rank=args.Q, maxit=args.maxit, epsilon=args.epsilon, wild_bootstrap=not args.no_bootstrap,
              wild_B=args.wild_B, client=client, engine=engine)
    if engine == "cap":
        kw["df_rate"] = args.df_rate
    with warnings.catch_warnings(), PeakRSS(traced=args.tracemalloc) as mem, first_pass_time() as t_loop:
        warnings.simplefilter("ignore")  # maxit is a benchmark budget, not a convergence claim
        t1 = time.perf_counter()
        fit = nmfre_blocked(Yb, A, **kw)
        total = time.perf_counter() - t1
    it = fit.iter_times
    # from the first U pass of the fit to the end: the loop, the finish and the inference
    loop_peak = mem.window_mib(t_loop[0], t1 + total)
    cos = (fit.X / np.linalg.norm(fit.X, axis=0)).T @ (X_true / np.linalg.norm(X_true, axis=0))
    return {"engine": engine, "N": N, "iters": fit.n_iter, "stop": fit.stop_reason, "sec_per_iter": float(np.median(it)),
            "loop": float(it.sum()), "total": total, "timings": fit.timings, "client_peak_mib": mem.extra_mib, "loop_peak_mib": loop_peak,
            "client_base_mib": mem.base / 2**20, "cos": float(cos.max(axis=1).min()), "A_mib": A.nbytes / 2**20,
            "sigma2": fit.sigma2, "dfU": fit.dfU}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=50)
    ap.add_argument("--N", type=int, nargs="+", default=[1_000_000, 250_000])
    ap.add_argument("--Q", type=int, default=3)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--maxit", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--df-rate", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["cap", "ecm"], choices=["cap", "ecm"])
    ap.add_argument("--wild-B", type=int, default=200)
    ap.add_argument("--no-bootstrap", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="measure live allocations (tracemalloc) instead of RSS; times are then a little slower")
    args = ap.parse_args()

    import distributed

    rows = []
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        for engine in args.engines:  # warm-up (imports, numba, worker start): not reported
            run_one(engine, args, 4 * args.blocks * 100, client)
        for N in args.N:
            for engine in args.engines:
                r = run_one(engine, args, N, client)
                rows.append(r)
                print(f"{engine:>3}  N={N:>9,}  iters {r['iters']:>3} ({r['stop']}), {r['sec_per_iter']:.3f} s/iter, "
                      f"loop {r['loop']:.1f} s, total {r['total']:.1f} s, client peak +{r['client_peak_mib']:.0f} MiB "
                      f"(from first pass +{r['loop_peak_mib']:.0f} MiB; A = {r['A_mib']:.0f} MiB), "
                      f"basis cosine >= {r['cos']:.3f}", flush=True)
                print("     phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items()), flush=True)
                client.run(lambda: __import__("gc").collect())
    print(f"\nclient memory: {'tracemalloc (live allocations)' if args.tracemalloc else 'RSS'}")
    print(f"P={args.P} Q={args.Q} K={args.K}, {args.blocks} blocks, {args.workers} worker processes x 1 thread, "
          f"maxit={args.maxit}, wild_B={0 if args.no_bootstrap else args.wild_B}")
    print(f"{'engine':>6} {'N':>10} {'s/iter':>8} {'client peak +MiB':>17} {'from first pass':>16} {'A MiB':>6}")
    for r in rows:
        print(f"{r['engine']:>6} {r['N']:>10,} {r['sec_per_iter']:>8.3f} {r['client_peak_mib']:>17.0f} "
              f"{r['loop_peak_mib']:>16.0f} {r['A_mib']:>6.0f}")


if __name__ == "__main__":
    main()
