"""The client ships its compiled numba kernels to workers whose cache lacks them (issue 12).

Each test starts a real 2-worker LocalCluster of processes whose numba cache is empty (their own
``NUMBA_CACHE_DIR``, or their own copy of the dnmf package with its empty in-tree cache), fits,
and reads numba's per-dispatcher counters on the workers: a cache hit and no miss means the
worker loaded the client's compiled kernel instead of compiling it.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.engine import kernel_cache

distributed = pytest.importorskip("distributed")

# 300 × 400 at 10 %: 12,000 nonzeros in blocks of ≤ 3,000 ⇒ ≥ 4 blocks, so both workers run the
# block pass; 5 iterations are enough to exercise it several times per worker.
A = sp.random(300, 400, density=0.1, random_state=0, format="csc")
FIT = dict(k=5, seed=1, maxit=5, block_nnz=3000)


def _block_pass_stats():
    """On a worker: which dnmf kernel dispatchers hold compiled code, with numba's cache hit and
    miss counts, and where dnmf and numba's cache live."""
    import dnmf as worker_dnmf
    from dnmf.kernels import fused

    out = {"dnmf": worker_dnmf.__file__, "compiled": {}}
    for name, d in kernel_cache._dispatchers():
        if d.signatures:
            out["compiled"][d.py_func.__qualname__] = (sum(d.stats.cache_hits.values()),
                                                       sum(d.stats.cache_misses.values()))
    out["cache_path"] = fused._CSC_BLOCK_PASS[1, False]._cache.cache_path
    return out


def _installed(dask_worker):
    return {n: p.installed for n, p in dask_worker.plugins.items() if n == "dnmf-kernel-cache"}


def _local_fit_stats():
    """On a worker: an in-process fit (the block pass runs here), then :func:`_block_pass_stats`."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dnmf.nmf(A, client=False, **FIT)
    return _block_pass_stats()


def _fit(env, preload=None, late_worker_cache=None):
    """A fit on a fresh 2-worker process cluster with ``env``; returns the model, the workers'
    kernel statistics and what the plugin installed on each. With ``late_worker_cache``, a third
    worker with that ``NUMBA_CACHE_DIR`` joins after the fit; its entry in the statistics is
    ``(installed, stats of an in-process fit run on it)``."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=env, preload=preload) as cluster, distributed.Client(cluster) as client:
        with pytest.warns(dnmf.exceptions.ConvergenceWarning):
            model = dnmf.nmf(A, client=client, **FIT)
        stats = client.run(_block_pass_stats)
        installed = client.run(_installed)
        late = None
        if late_worker_cache is not None:
            # the same kernels through the same client are not shipped again ...
            assert kernel_cache.ship_kernels(client) is None
            # ... and a worker that joins later gets them from the scheduler's plugin
            proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                     "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                                    env={**os.environ, "NUMBA_CACHE_DIR": str(late_worker_cache),
                                         "PYTHONPATH": os.path.dirname(__file__)},  # imports this module
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                client.wait_for_workers(3, timeout=60)
                new = sorted(set(client.scheduler_info()["workers"]) - set(stats))
                late = (client.run(_installed, workers=new)[new[0]],
                        client.submit(_local_fit_stats, workers=new, pure=False).result(timeout=120))
            finally:
                proc.kill()  # a worker without a nanny, started here; nothing of it is needed now
                proc.wait(timeout=30)
    return model, stats, installed, late


@pytest.fixture(scope="module")
def local_model():
    with pytest.warns(dnmf.exceptions.ConvergenceWarning):
        return dnmf.nmf(A, client=False, **FIT)


def _assert_same_fit(model, local_model):
    # the workers run the same compiled code on the same blocks, reduced in fixed block order
    # (engine/executor.py::tree_reduce) ⇒ bitwise equal to the in-process fit
    np.testing.assert_array_equal(model.w, local_model.w)
    np.testing.assert_array_equal(model.h, local_model.h)
    np.testing.assert_array_equal(model.d, local_model.d)


def _package_copy(tmp_path, mtime, append=None):
    """A copy of the dnmf package (no caches) under ``tmp_path/pkg`` with every file's mtime set
    to ``mtime``, and a worker preload putting it first on ``sys.path``."""
    root = tmp_path / "pkg"
    src = os.path.dirname(dnmf.__file__)
    shutil.copytree(src, root / "dnmf", ignore=shutil.ignore_patterns("__pycache__"))
    if append is not None:
        with open(root / "dnmf" / "kernels" / "fused.py", "a") as f:
            f.write(append)
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (mtime, mtime))
    preload = tmp_path / "preload_pkg.py"
    preload.write_text(f"import sys\nsys.path.insert(0, {str(root)!r})\n")
    return root, str(preload)


def _own_cache_env(tmp_path):
    """Keep the workers off a NUMBA_CACHE_DIR this process may have: a fresh empty one."""
    if "NUMBA_CACHE_DIR" in os.environ:
        d = tmp_path / "numba_cache"
        d.mkdir()
        return {"NUMBA_CACHE_DIR": str(d)}
    return {}


def test_workers_with_empty_cache_dir_load_the_clients_kernel(tmp_path, local_model):
    cache, late_cache = tmp_path / "worker_cache", tmp_path / "late_worker_cache"
    cache.mkdir()
    late_cache.mkdir()
    model, stats, installed, late = _fit({"NUMBA_CACHE_DIR": str(cache)}, late_worker_cache=late_cache)
    assert len(stats) == 2
    for s in stats.values():
        assert s["cache_path"].startswith(str(cache))
        # the block pass was loaded from the cache (hits) and nothing was compiled: no misses,
        # and none of the kernels it inlines (chol_solve, column steps) holds compiled code
        assert list(s["compiled"]) == ["_csc_block_pass_s1"]
        hits, misses = s["compiled"]["_csc_block_pass_s1"]
        assert hits >= 1 and misses == 0
    # both workers share this cache dir and install at the same time, one index file per kernel:
    # each entry is written by whichever worker gets to it first, or by both (an index is
    # replaced whole, so a second writer rewrites the same content). The client ships every dnmf
    # kernel this process holds — the block pass at least, more after other tests of the same
    # session compiled theirs — so the counts split in any way; what matters is asserted above
    # (both workers loaded the pass without compiling) and that some worker wrote.
    most = max(v for w in installed.values() for v in w.values())
    assert most >= 1
    assert any(f.endswith(".nbc") for f in os.listdir(next(iter(stats.values()))["cache_path"]))
    _assert_same_fit(model, local_model)
    # the late worker, with a cache of its own, installed the entry and ran the pass without compiling
    late_installed, late_stats = late
    # it installs all it was sent: at least what either first worker wrote
    assert list(late_installed) == ["dnmf-kernel-cache"] and late_installed["dnmf-kernel-cache"] >= most
    assert late_stats["cache_path"].startswith(str(late_cache))
    assert list(late_stats["compiled"]) == ["_csc_block_pass_s1"]
    assert late_stats["compiled"]["_csc_block_pass_s1"][1] == 0


def test_worker_with_same_source_other_mtime_hits(tmp_path, local_model):
    root, preload = _package_copy(tmp_path, mtime=1_000_000_000)
    model, stats, installed, _ = _fit(_own_cache_env(tmp_path), preload=[preload])
    for s in stats.values():
        assert s["dnmf"].startswith(str(root))  # the worker really runs its own copy
        assert s["cache_path"].startswith(str(tmp_path))  # with its own, initially empty, cache
        assert list(s["compiled"]) == ["_csc_block_pass_s1"]
        hits, misses = s["compiled"]["_csc_block_pass_s1"]
        assert hits >= 1 and misses == 0
    assert sum(v for w in installed.values() for v in w.values()) >= 1
    _assert_same_fit(model, local_model)


def test_worker_with_other_source_compiles(tmp_path, local_model):
    root, preload = _package_copy(tmp_path, mtime=time.time(), append="# a local change\n")
    model, stats, installed, _ = _fit(_own_cache_env(tmp_path), preload=[preload])
    for s in stats.values():
        assert s["dnmf"].startswith(str(root))
        assert s["cache_path"].startswith(str(tmp_path))
        hits, misses = s["compiled"]["_csc_block_pass_s1"]
        assert hits == 0 and misses == 1  # compiled here: the client's entry was not installed
    assert all(v == 0 for w in installed.values() for v in w.values())
    _assert_same_fit(model, local_model)


def test_source_hash_covers_kernels_and_losses(tmp_path):
    root = tmp_path / "dnmf"
    src = os.path.dirname(dnmf.__file__)
    shutil.copytree(os.path.join(src, "kernels"), root / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(src, "_losses.py"), root / "_losses.py")
    base = kernel_cache.kernel_source_hash(str(root))
    assert base == kernel_cache.kernel_source_hash(src)
    os.utime(root / "_losses.py", (1, 1))
    assert kernel_cache.kernel_source_hash(str(root)) == base  # contents only, not mtimes
    with open(root / "_losses.py", "a") as f:
        f.write("\n")
    assert kernel_cache.kernel_source_hash(str(root)) != base


def test_install_refuses_other_numba_or_sources():
    entries = [{"module": "dnmf.kernels.fused", "qualname": "nope", "filename_base": "x", "overloads": b"",
                "data": {}}]
    assert kernel_cache.install_entries(entries, kernel_cache.kernel_source_hash(), "0.0.0") == 0
    assert kernel_cache.install_entries(entries, "0" * 64, kernel_cache.numba.__version__) == 0
    # a malformed entry is skipped (logged), never raised
    assert kernel_cache.install_entries(entries, kernel_cache.kernel_source_hash(),
                                        kernel_cache.numba.__version__) == 0


def test_plugin_loads_and_does_nothing_on_a_worker_without_dnmf(tmp_path):
    """A worker of a shared cluster without dnmf must still start: the plugin is pickled by value
    and its setup does nothing there (a plugin that cannot be unpickled stops a worker starting)."""
    from distributed.protocol.pickle import dumps

    entries = kernel_cache.collect_entries()
    plugin = kernel_cache.kernel_cache_plugin(entries, kernel_cache.kernel_source_hash(),
                                              kernel_cache.numba.__version__)
    blob = tmp_path / "plugin.pkl"
    blob.write_bytes(dumps(plugin))
    code = ("import sys, pickle; sys.modules['dnmf'] = None\n"  # any import of dnmf fails
            f"p = pickle.loads(open({str(blob)!r}, 'rb').read()); p.setup(None); print(p.name, p.installed)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["dnmf-kernel-cache", "0"]


_MERGE_SCRIPT = """
import os, pickle, sys, warnings
import numpy as np, scipy.sparse as sp
import dnmf
from dnmf.engine import kernel_cache
from dnmf.kernels import fused
warnings.simplefilter("ignore")
A = sp.random(300, 400, density=0.1, random_state=0, format="csc")
dnmf.nmf(A.astype(np.float32), 5, seed=1, maxit=2, client=False)  # compiles the float32 pass here
entries, source_hash, version = pickle.load(open(sys.argv[1], "rb"))
added = kernel_cache.install_entries(entries, source_hash, version)
dnmf.nmf(A, 5, seed=1, maxit=2, client=False)  # the float64 pass: the installed entry
d = fused._CSC_BLOCK_PASS[1, False]
base = d._cache._impl.filename_base
files = sorted(f[len(base):] for f in os.listdir(d._cache.cache_path) if f.startswith(base + "."))
print(added, files, sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
"""


def _merge_result(stdout: str):
    """What ``_MERGE_SCRIPT`` printed: overloads added, data-file suffixes, cache hits, misses."""
    import ast

    line = stdout.strip().splitlines()[-1]
    added, rest = line.split(" ", 1)
    files = ast.literal_eval(rest[:rest.index("]") + 1])
    hits, misses = (int(x) for x in rest[rest.index("]") + 1:].split())
    return int(added), files, hits, misses


def test_install_merges_with_a_workers_own_entries(tmp_path, local_model):
    """A worker that compiled another signature itself (float32) keeps it: the shipped float64
    entry gets the next free data file and both are in the index; a process that already holds
    the dispatcher loads the entry installed after its import."""
    import pickle

    entries = [e for e in kernel_cache.collect_entries() if e["qualname"] == "_csc_block_pass_s1"]
    assert len(entries) == 1  # the float64 pass of local_model's fit
    payload = tmp_path / "entries.pkl"
    payload.write_bytes(pickle.dumps((entries, kernel_cache.kernel_source_hash(), kernel_cache.numba.__version__)))
    cache = tmp_path / "cache"
    cache.mkdir()
    res = subprocess.run([sys.executable, "-c", _MERGE_SCRIPT, str(payload)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})
    assert res.returncode == 0, res.stderr
    added, files, hits, misses = _merge_result(res.stdout)
    # the worker's own float32 entry keeps data file 1; the shipped signatures (float64, and the
    # float32 one too when an earlier test of this session compiled it here) take the next ones;
    # float32 compiled there (one miss), float64 loaded (one hit)
    assert added >= 1
    assert files == [f".{i}.nbc" for i in range(1, added + 2)] + [".nbi"]
    assert (hits, misses) == (1, 1)


# One column solve (kernels/column.py) that calls chol_solve (kernels/nnls.py): x = [10, -10]
# before the clip, so the clip's value shows which chol_solve the cached code runs.
_GUARD_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # the copy of dnmf under test
import numpy as np
from dnmf.kernels import column
from dnmf.kernels.nnls import SOLVER_CHOLESKY

f = column.SOLVE_COLUMN_BY_SOLVER[SOLVER_CHOLESKY]
G = np.array([[1.0, 0.9], [0.9, 1.0]])
x = np.zeros(2)
f(G, np.linalg.cholesky(G), np.array([1.0, -1.0]), x, SOLVER_CHOLESKY, True, 10, 1e-8, False)
print(json.dumps({"x": x.tolist(), "file": column.__file__, "hits": sum(f.stats.cache_hits.values()),
                  "misses": sum(f.stats.cache_misses.values())}))
"""


def test_cached_kernel_is_recompiled_when_a_callee_file_changes(tmp_path):
    # numba stamps a cache entry with its own file only: column.py's entry, with nnls.py's
    # chol_solve compiled into it, would load unchanged after nnls.py changed (an editable
    # install after `git pull`). kernels/_sources.py::guard_cache drops it.
    root = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(dnmf.__file__), root / "dnmf", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def run():
        res = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT, str(root)], capture_output=True, text=True,
                             timeout=120, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["file"].startswith(str(root))
        # x[0] = 1.9 / 0.19 = 10 to rounding (the Cholesky substitutions); x[1] is the clip's value
        assert out["x"][0] == pytest.approx(10.0, rel=1e-12)
        return out["hits"], out["misses"], out["x"][1]

    assert run() == (0, 1, 0.0)  # compiled
    assert run() == (1, 0, 0.0)  # same sources: the entry loads
    nnls = root / "dnmf" / "kernels" / "nnls.py"
    text = nnls.read_text()
    clip = "            if x[i] < 0.0:\n                x[i] = 0.0\n"
    assert text.count(clip) == 1, "chol_solve's clip changed: update this test's edit"
    nnls.write_text(text.replace(clip, "            if x[i] < 0.0:\n                x[i] = -7.0\n"))
    assert run() == (0, 1, -7.0)  # recompiled: the new clip (a stale entry would give 0.0 from a hit)
    assert run() == (1, 0, -7.0)  # and cached again under the new sources
