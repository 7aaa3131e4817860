"""The kernels' source files, their hash, and a guard against numba cache entries of other sources.

numba stamps each ``cache=True`` entry with its *own* source file only (modification time and
size). A kernel that calls or inlines functions of another file — the fused pass inlines
``column.py`` and ``nnls.py``, the IRLS pass ``masked.py``, ``column.py`` and ``_losses.py`` —
keeps loading its old machine code, with the old callees compiled into it, after only a callee's
file changed: an editable install updated by ``git pull``, or a kernel edited by hand, would run
stale code without a word. :func:`guard_cache` closes that gap: every kernel module calls it once
its dispatchers exist, before any of them can load an entry. It keeps, beside the module's cache
entries, the hash of all kernel sources (:func:`kernel_source_hash`) they were compiled from, and
drops the module's entries (numba's own ``flush``: an empty index) when the hash differs, so they
are compiled anew and the stamp is rewritten.

numba has no public API for cache locations; the internals used (``Dispatcher._cache``,
``Cache._cache_path``, ``Cache.flush``) are wrapped so that any exception — another numba version —
logs a debug message and leaves numba's own behaviour.
"""

from __future__ import annotations

import functools
import logging
import os

__all__ = ["guard_cache", "kernel_source_hash", "module_dispatchers", "source_files"]

logger = logging.getLogger(__name__)

#: The ``dnmf`` package directory of this process.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: File name suffix of a module's stamp in a numba cache directory.
STAMP_SUFFIX = ".dnmf-sources"


def source_files(package_dir: str = PACKAGE_DIR) -> list[str]:
    """The dnmf source files the kernels are compiled from: ``kernels/*.py`` and ``_losses.py``
    of the package at ``package_dir``, sorted."""
    kdir = os.path.join(package_dir, "kernels")
    files = [os.path.join(kdir, f) for f in os.listdir(kdir) if f.endswith(".py")]
    return sorted(files) + [os.path.join(package_dir, "_losses.py")]


def kernel_source_hash(package_dir: str = PACKAGE_DIR) -> str:
    """SHA-256 over the names and contents of every kernel source file of the dnmf package at
    ``package_dir`` (default: this process's). Two installs with the same hash compile the
    same kernels; mtimes do not enter.

    Parameters
    ----------
    package_dir : str, optional
        Directory of a ``dnmf`` package.

    Returns
    -------
    str
        Hex digest.
    """
    import hashlib

    h = hashlib.sha256()
    for path in source_files(package_dir):
        with open(path, "rb") as f:
            content = f.read()
        h.update(os.path.relpath(path, package_dir).encode())
        h.update(len(content).to_bytes(8, "little"))
        h.update(content)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _own_hash() -> str:
    return kernel_source_hash()


def module_dispatchers(namespace: dict) -> list:
    """The numba dispatchers among a module's globals and the values of its module-level dicts
    (compiled variants such as ``fused._CSC_BLOCK_PASS``), each once."""
    from numba.core.dispatcher import Dispatcher

    out, seen = [], set()
    for value in list(namespace.values()):
        for d in (value.values() if isinstance(value, dict) else (value,)):
            if isinstance(d, Dispatcher) and id(d) not in seen:
                seen.add(id(d))
                out.append(d)
    return out


def guard_cache(module: str, namespace: dict) -> int:
    """Drop the numba cache entries of module ``module``'s kernels if they were compiled from
    kernel sources other than this process's (see the module docstring).

    Called at the end of each kernel module with its ``globals()``. Per cache directory its
    dispatchers use, the file ``<module>.dnmf-sources`` holds the :func:`kernel_source_hash` their
    entries come from; when it is missing or differs, every one of the module's dispatchers in
    that directory that has an index is flushed (numba then compiles and saves anew) and the
    file is rewritten. A fresh cache (no file, no index) only gets the file.

    Returns
    -------
    int
        The number of dispatchers flushed.
    """
    flushed = 0
    try:
        digest = _own_hash()
        by_dir: dict = {}
        for d in module_dispatchers(namespace):
            cache = getattr(d, "_cache", None)
            path = getattr(cache, "_cache_path", None)
            if path is not None:
                by_dir.setdefault(path, []).append(d)
        for path, ds in by_dir.items():
            stamp = os.path.join(path, module + STAMP_SUFFIX)
            try:
                with open(stamp) as f:
                    if f.read().strip() == digest:
                        continue
            except OSError:  # no stamp: a fresh cache, or entries of a dnmf without stamps
                pass
            for d in ds:
                index = getattr(d._cache._cache_file, "_index_path", None)
                if index is None or os.path.exists(index):  # an entry to drop
                    d._cache.flush()
                    flushed += 1
            os.makedirs(path, exist_ok=True)
            tmp = f"{stamp}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(digest + "\n")
            os.replace(tmp, stamp)  # atomic: a concurrent reader sees the old or the new stamp
    except Exception as exc:  # noqa: BLE001 — another numba version, or a read-only cache
        logger.debug("kernel cache guard of %s: %r", module, exc)
    if flushed:
        logger.debug("kernel cache guard: %d entries of %s compiled from other sources dropped", flushed, module)
    return flushed
