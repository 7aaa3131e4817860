"""Ship the client's compiled numba kernels to Dask workers whose cache lacks them (issue 12).

Kernels are ``numba.njit(cache=True)``; before a distributed fit the client compiles (or loads)
the variant the fit uses, which writes numba's on-disk cache. Workers on this machine or on a
shared file system load it from there. A worker on another node — its own install, or its own
``NUMBA_CACHE_DIR`` — would compile each kernel itself (~2.5 s and ~150 MB of LLVM memory per
worker). :func:`ship_kernels` sends the client's cache entries (numba's index ``.nbi`` and data
``.nbc`` files) of the dnmf dispatchers compiled in this process to every worker, present and
future, through a worker plugin (:func:`kernel_cache_plugin`). Each worker writes them where *its own* numba looks
for the same function, and only when its dnmf kernel sources have the same contents as the
client's; otherwise it installs nothing and compiles as before.

Why this is safe: numba keys each cache entry on the signature, the CPU target (triple, CPU name
and features) and a hash of the function's bytecode, and stamps the index with its source file.
A worker on another CPU model misses and compiles. numba's cache of a kernel that inlines
others (``kernels/irls.py`` inlines ``kernels/masked.py``, ``kernels/column.py`` and
``_losses.py``) is keyed on its own file only, so entries are installed only when one hash over
every source file the kernels come from (all of ``dnmf/kernels/*.py`` and ``dnmf/_losses.py``)
matches; the index is then written with the worker's own source stamp, so a node with its own
copy of the same dnmf version hits.

numba has no public API for cache files; the few internals used (``Dispatcher._cache``,
``FunctionCache._cache_file``, ``_impl``, ``IndexDataCacheFile`` paths and writers, all of numba
0.5x–0.6x) are wrapped so that any exception — another numba version — logs a debug message and
leaves the worker to compile.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import logging
import os
import pickle
import sys
import weakref

import numba
import numpy as np

from ..kernels._sources import kernel_source_hash, module_dispatchers, source_files

__all__ = ["collect_entries", "compile_for_workers", "install_entries", "kernel_cache_plugin", "kernel_source_hash",
           "ship_kernels"]

logger = logging.getLogger(__name__)

#: Modules whose ``numba.njit(cache=True)`` dispatchers are shipped (module globals, and values of
#: module-level dicts of variants such as ``fused._CSC_BLOCK_PASS``).
KERNEL_MODULES = ("dnmf.kernels.column", "dnmf.kernels.nnls", "dnmf.kernels.fused", "dnmf.kernels.masked",
                  "dnmf.kernels.irls", "dnmf.kernels.kl", "dnmf._losses")

# Digest of the entries last registered per client (so a fit registers once per client and kernel set).
_SHIPPED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _dispatchers():
    """(module name, dispatcher) of every numba dispatcher of :data:`KERNEL_MODULES` loaded in
    this process, in a fixed order."""
    for modname in KERNEL_MODULES:
        mod = sys.modules.get(modname)
        if mod is not None:
            for d in module_dispatchers(vars(mod)):
                yield modname, d


def _find_dispatcher(modname: str, qualname: str):
    """The dispatcher of module ``modname`` whose Python function is named ``qualname``."""
    importlib.import_module(modname)
    for mod, d in _dispatchers():
        if mod == modname and d.py_func.__qualname__ == qualname:
            return d
    return None


def _collect_entry(modname: str, dispatcher) -> dict | None:
    """The cache entry of one dispatcher: its index's overloads for the signatures compiled or
    loaded in this process on this CPU target, and their data files' bytes."""
    from numba.core.caching import FunctionCache

    cache = getattr(dispatcher, "_cache", None)
    if not isinstance(cache, FunctionCache) or not dispatcher.signatures:
        return None
    source = os.path.realpath(inspect.getfile(dispatcher.py_func))
    if source not in {os.path.realpath(p) for p in source_files()}:
        return None  # not a file the source hash covers
    cache_file = cache._cache_file
    overloads = cache_file._load_index()  # numba's own read: {} when missing, stale or of another version
    magic = dispatcher.targetctx.codegen().magic_tuple()
    sigs = set(dispatcher.signatures)
    keep = {key: name for key, name in overloads.items() if key[0] in sigs and key[1] == magic}
    if not keep:
        return None
    data = {}
    for name in sorted(set(keep.values())):
        with open(cache_file._data_path(name), "rb") as f:
            data[name] = f.read()
    return {"module": modname, "qualname": dispatcher.py_func.__qualname__,
            "filename_base": cache._impl.filename_base, "overloads": pickle.dumps(keep, protocol=-1),
            "data": data}


def collect_entries() -> list[dict]:
    """numba cache entries of the dnmf kernels compiled (or loaded from the cache) in this
    process, for :func:`install_entries` elsewhere.

    Only dispatchers of :data:`KERNEL_MODULES` defined in the files :func:`kernel_source_hash`
    covers, only the signatures this process holds, only for this CPU target.

    Returns
    -------
    list of dict
        One entry per dispatcher (module, qualified name, numba's file name base, pickled index
        overloads, data file bytes by name). Empty when nothing is cached or numba's internals
        differ from those this module knows (logged at debug level).
    """
    entries = []
    for modname, d in _dispatchers():
        try:
            entry = _collect_entry(modname, d)
        except Exception as exc:  # another numba version: ship nothing of this kernel
            logger.debug("kernel cache: cannot read numba's cache of %s: %r", d.py_func.__qualname__, exc)
            continue
        if entry is not None:
            entries.append(entry)
    return entries


def _install_entry(entry: dict) -> int:
    """Write one shipped entry where this process's numba looks for its dispatcher; returns the
    number of overloads added (0 if all were present)."""
    d = _find_dispatcher(entry["module"], entry["qualname"])
    if d is None or getattr(d, "_cache", None) is None:
        return 0
    cache = d._cache
    if cache._impl.filename_base != entry["filename_base"]:  # other Python version or line number
        return 0
    cache_file = cache._cache_file
    existing = cache_file._load_index()  # {} when missing, stale or of another numba version
    new = {key: name for key, name in pickle.loads(entry["overloads"]).items() if key not in existing}
    if not new:
        return 0
    cache._impl.locator.ensure_cache_path()
    used = set(existing.values())
    free = (n for n in (cache_file._data_name(i) for i in itertools.count(1)) if n not in used)
    for key, name in new.items():
        target = next(free)
        with cache_file._open_for_write(cache_file._data_path(target)) as f:
            f.write(entry["data"][name])
        existing[key] = target
    cache_file._save_index(existing)  # with this process's own source stamp
    return len(new)


def install_entries(entries: list[dict], source_hash: str, numba_version: str) -> int:
    """Install entries from :func:`collect_entries` of another process into this process's numba
    cache, if this process's dnmf kernel sources and numba version are the same as theirs.

    Parameters
    ----------
    entries : list of dict
        From :func:`collect_entries`.
    source_hash : str
        :func:`kernel_source_hash` of the process that collected them.
    numba_version : str
        Its ``numba.__version__``.

    Returns
    -------
    int
        Overloads added (0 when sources or numba differ, or everything was present). Never
        raises: a failure is logged at debug level and numba compiles as without the entries.
    """
    try:
        if numba_version != numba.__version__:
            logger.debug("kernel cache: numba %s here, %s on the client; nothing installed",
                         numba.__version__, numba_version)
            return 0
        if kernel_source_hash() != source_hash:
            logger.debug("kernel cache: dnmf kernel sources here differ from the client's; nothing installed")
            return 0
    except Exception as exc:
        logger.debug("kernel cache: cannot hash the kernel sources here: %r", exc)
        return 0
    added = 0
    for entry in entries:
        try:
            added += _install_entry(entry)
        except Exception as exc:  # another numba version, unwritable cache: compile as before
            logger.debug("kernel cache: cannot install %s: %r", entry.get("qualname"), exc)
    return added


def kernel_cache_plugin(entries: list[dict], source_hash: str, numba_version: str):
    """A ``distributed.WorkerPlugin`` installing the client's numba cache entries on each worker
    when it starts (and on every worker that joins later), with :func:`install_entries`.

    The plugin's class is made here rather than at module level so that ``distributed`` pickles
    it by value (cloudpickle; a class local to a function cannot be pickled by reference), and
    its ``setup`` imports dnmf only when it runs: a worker of a shared cluster without dnmf, or
    with a dnmf lacking this module, then unpickles it and does nothing, instead of failing to
    start (a worker fails to start when a registered plugin cannot be unpickled).

    Parameters
    ----------
    entries : list of dict
        From :func:`collect_entries`.
    source_hash : str
        :func:`kernel_source_hash` of the client.
    numba_version : str
        The client's ``numba.__version__``.

    Returns
    -------
    distributed.WorkerPlugin
        With attributes ``name`` (``"dnmf-kernel-cache"``: a client that compiled more kernels
        registers a superset that replaces the scheduler's copy, re-running ``setup``, which
        skips entries already present) and ``installed`` (overloads added on this worker, set by
        ``setup``; None before).
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class KernelCachePlugin(WorkerPlugin):
        name = "dnmf-kernel-cache"

        def __init__(self, entries, source_hash, numba_version):
            self.entries = entries
            self.source_hash = source_hash
            self.numba_version = numba_version
            self.installed = None

        def setup(self, worker) -> None:
            try:
                from dnmf.engine.kernel_cache import install_entries
            except ImportError:  # no dnmf, or one without this module, on this worker
                self.installed, self.entries = 0, None
                return
            self.installed = install_entries(self.entries, self.source_hash, self.numba_version)
            self.entries = None  # written out; the scheduler keeps its copy for later workers

    return KernelCachePlugin(entries, source_hash, numba_version)


def _digest(entries: list[dict], source_hash: str) -> str:
    """What identifies a set of shipped entries (so a client receives each set once)."""
    h = hashlib.sha256(source_hash.encode())
    for entry in entries:
        h.update(entry["filename_base"].encode())
        h.update(entry["overloads"])
        for name in sorted(entry["data"]):
            h.update(hashlib.sha256(entry["data"][name]).digest())
    return h.hexdigest()


def ship_kernels(client) -> str | None:
    """Send the numba cache entries of the dnmf kernels compiled in this process to every
    worker of ``client``, present and future (a :func:`kernel_cache_plugin`).

    Call after compiling the kernels a fit uses (``warm_up_kernels`` of ``engine/als.py``,
    ``engine/masked.py``, ``engine/irls.py``, ``engine/kl.py``). Once per
    client and set of kernels; a few hundred kB per worker. A worker installs the entries only
    where its dnmf kernel sources and numba version equal the client's, writing them where its
    own numba looks (``NUMBA_CACHE_DIR``, the in-tree ``__pycache__`` or the user-wide cache).

    Parameters
    ----------
    client : distributed.Client

    Returns
    -------
    str or None
        The plugin's name, or None when nothing was shipped (no cache entries, the same entries
        already shipped through this client, or a failure, logged at debug level: workers then
        compile as before).
    """
    try:
        entries = collect_entries()
        if not entries:
            return None
        source_hash = kernel_source_hash()
        digest = _digest(entries, source_hash)
        if _SHIPPED.get(client) == digest:
            return None
        plugin = kernel_cache_plugin(entries, source_hash, numba.__version__)
        client.register_plugin(plugin, name=plugin.name)
        _SHIPPED[client] = digest
        return plugin.name
    except Exception as exc:  # never fail a fit for this: the workers compile instead
        logger.debug("kernel cache: not shipped to the workers: %r", exc)
        return None


def first_columns(A, n_cols: int):
    """The first ``n_cols`` columns (all rows) of A — a BlockedMatrix's first block, a scipy
    sparse matrix or a NumPy array — in A's own kind and dtype."""
    import scipy.sparse as sp

    from ..io.blocks import BlockedMatrix, CSCBlock

    if isinstance(A, BlockedMatrix):
        A = A.sources[0].load()
        if isinstance(A, CSCBlock):
            A = A.to_scipy()
    if sp.issparse(A):
        return sp.csc_array(A)[:, :n_cols]
    return np.asarray(A)[:, :n_cols]


def compile_for_workers(client, fit_small, A, k: int) -> bool:
    """Compile here the kernels of fits that run whole on workers, and ship them.

    The grids of rank cross-validation, consensus NMF and multi-start fits of an in-memory
    matrix send each fit, whole and in-process, as one task to a worker, where a worker
    without numba's cache compiles the fit's kernels (~20 s for the masked loop). This runs
    ``fit_small(small)`` — the grid's first fit with one iteration, without the user's callback,
    checkpoint or progress — on ``small``, the first columns of A with all its rows (so
    arguments with one row per row of A still fit), which compiles the same signatures here, then
    :func:`ship_kernels`. Best effort: arguments tied to A's columns (a mask, an H target) make
    the small fit fail, logged at debug level, and the workers compile as before.

    Returns whether the kernels were compiled and shipped.
    """
    import warnings

    try:
        small = first_columns(A, max(64, 4 * int(k)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one iteration does not converge
            fit_small(small)
    except Exception as exc:  # noqa: BLE001 - a speed-up only: the grid's own fits report errors
        logger.debug("kernel cache: nothing compiled for the workers: %r", exc)
        return False
    ship_kernels(client)
    return True


def quiet_kwargs(kwargs) -> dict:
    """``kwargs`` of a fit for :func:`compile_for_workers`: one iteration, and none of the user's
    callback, checkpoint, resume or progress output."""
    out = dict(kwargs, maxit=1)
    out.update({key: None for key in ("on_iteration", "checkpoint") if key in out})
    out.update({key: False for key in ("resume", "verbose") if key in out})
    return out
