"""The masked, IRLS and KL loops compile their kernels in the client and ship them (issue 12).

For each loop a fresh Python process (so that it holds no kernel but those its fit loads) starts
a 2-worker LocalCluster of processes whose ``NUMBA_CACHE_DIR`` is empty, runs one fit through it —
masked (mask="zeros" with a test set; a user mask with penalties), rank cross-validation of a
matrix on disk (the masked loop's shared pass of several ranks), negative binomial (IRLS; with
zero-inflation and a user mask) or KL; or a grid whose fits run whole, one task each, on the
workers (rank CV, multi-start and consensus NMF of a matrix in memory, which the client compiles
first on the matrix's first columns: ``engine/kernel_cache.py::compile_for_workers``) — and reads
numba's per-dispatcher counters on the workers: a cache miss is a compilation. Before the fit the
client holds only what its loop's ``warm_up_kernels`` compiled or loaded, so a worker that
compiled nothing got every signature it called from the client. The same process then repeats
the fit in-process for the comparison.
Being separate processes, the checks do not depend on what other tests compiled in this one.
"""

import json
import subprocess
import sys

import pytest

pytest.importorskip("distributed")

_SCRIPT = r"""
import json, sys, warnings
import numpy as np, scipy.sparse as sp
import distributed
import dnmf
from dnmf.engine import kernel_cache

warnings.simplefilter("ignore")


def worker_stats():
    out = {}
    for _, d in kernel_cache._dispatchers():
        if d.signatures:
            out[d.py_func.__qualname__] = (sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
    return out


rng = np.random.default_rng(0)
A = sp.random(120, 160, density=0.15, random_state=0, format="csc")
counts = sp.csc_matrix((rng.poisson(3.0, A.nnz) + 1.0, A.indices, A.indptr), shape=A.shape)
mask = sp.random(120, 160, density=0.05, random_state=3, format="csc") != 0
X, kw = {
    "masked": (A, dict(k=3, mask="zeros", test_fraction=0.1)),
    # from disk: the ranks share each pass on the cluster (in memory, each CV fit is one task)
    "rank_cv": (dnmf.io.write_zarr(A, sys.argv[3], block_nnz=800), dict(k=[2, 3], test_fraction=0.1)),
    # in memory: each CV fit is one task, run whole on a worker (cv.py::compile_for_workers)
    "rank_cv_memory": (A, dict(k=[2, 3], cv_seed=[1, 2], test_fraction=0.1)),
    # a user mask, and the penalties' per-row terms and client-side steps
    "masked_penalties": (A, dict(k=3, mask=mask, test_fraction=0.1, L21=[0.01, 0.01], angular=[0.1, 0.1],
                                 upper_bound=[5.0, 5.0])),
    "nb": (counts, dict(k=3, loss="nb")),
    "nb_zi": (counts, dict(k=3, loss="nb", zi="col", mask=mask)),  # + the zero-inflation E-step's kernel
    "kl": (counts, dict(k=3, loss="kl")),
    # whole fits as tasks on the workers (engine/kernel_cache.py::compile_for_workers)
    "multistart_memory": (A, dict(k=3, seed=[1, 2, 3])),
    "consensus_memory": (A, dict(k=3, reps=3)),
}[sys.argv[2]]
kw = {"seed": 1, "maxit": 3, "block_nnz": 800, **kw}  # >= 4 column blocks: both workers run tasks
fit = dnmf.consensus_nmf if sys.argv[2] == "consensus_memory" else dnmf.nmf


def result(model):
    if hasattr(model, "consensus"):  # consensus NMF: its matrix
        return {"consensus": np.asarray(model.consensus).tolist()}
    if hasattr(model, "table") and hasattr(model, "histories"):  # rank CV: the table and the per-iteration losses
        return {"table": model.table.to_dict("list"),
                "histories": [list(map(list, v)) for v in model.histories.values()]}
    return {"w": model.w.tolist(), "h": model.h.tolist(), "d": model.d.tolist()}


with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                              env={"NUMBA_CACHE_DIR": sys.argv[1]}) as cluster, distributed.Client(cluster) as client:
    report = {"cluster": result(fit(X, client=client, **kw)), "workers": list(client.run(worker_stats).values())}
report["local"] = result(fit(X, client=False, **kw))
print(json.dumps(report))
"""


LOOPS = ["masked", "rank_cv", "rank_cv_memory", "masked_penalties", "nb", "nb_zi", "kl", "multistart_memory",
         "consensus_memory"]
WHOLE_FITS = {"rank_cv_memory", "multistart_memory", "consensus_memory"}  # each fit one task on a worker


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The script's report per loop, run on first use."""
    done = {}

    def get(loop):
        if loop not in done:
            cache = tmp_path_factory.mktemp(f"worker_numba_cache_{loop}")  # empty
            zarr = str(tmp_path_factory.mktemp("zarr") / "a.zarr")
            res = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache), loop, zarr], capture_output=True,
                                 text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-4000:]
            done[loop] = json.loads(res.stdout.strip().splitlines()[-1])
        return done[loop]

    return get


# The kernel each loop's block tasks call (each worker runs at least one column block).
MAIN_KERNEL = {"masked": "_csc_masked_pass", "rank_cv": "_csc_masked_pass", "rank_cv_memory": "_csc_masked_pass",
               "masked_penalties": "_csc_masked_pass",
               "nb": "_csc_irls_zi_pass", "nb_zi": "_zi_estep_pass", "kl": "_csc_kl_pass",
               # the ALS pass compiled for the Cholesky solver (kernels/fused.py::_variants)
               "multistart_memory": "_csc_block_pass_s1", "consensus_memory": "_csc_block_pass_s1"}


@pytest.mark.parametrize("loop", LOOPS)
def test_workers_compile_nothing(reports, loop):
    workers = reports(loop)["workers"]
    assert len(workers) == 2
    ran = 0
    for stats in workers:
        # numba counts a compilation as a cache miss: none on any dnmf dispatcher
        assert {name: hm for name, hm in stats.items() if hm[1] > 0} == {}
        hits, misses = stats.get(MAIN_KERNEL[loop], (0, 0))
        assert misses == 0
        ran += hits >= 1  # the kernel ran here, loaded from the shipped entry
    # the block tasks of one fit run on both workers; whole fits go where the scheduler puts
    # them: at least one worker
    assert ran >= 1 if loop in WHOLE_FITS else ran == 2


@pytest.mark.parametrize("loop", LOOPS)
def test_cluster_fit_equals_in_process_fit(reports, loop):
    # the loops sum every partial in block order and results do not depend on the number of
    # workers (module docstrings of engine/masked.py, engine/irls.py, engine/kl.py); the workers
    # run the client's compiled code: bitwise equal (JSON keeps every float64 bit: repr round trip)
    report = reports(loop)
    assert report["cluster"] == report["local"]
