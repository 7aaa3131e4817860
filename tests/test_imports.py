"""The intra-package import graph of ``dnmf``: layers import downwards, never in a cycle.

The graph is built from the source (``ast``), not by importing, so it sees every import —
module-level and inside functions alike (a function-level import still ties the two modules
together; it only hides the cycle from the interpreter until the function runs).

Edges:

* ``import dnmf.a.b`` and ``from dnmf.a import b`` (or the relative forms ``from .b import x``,
  ``from ..a import b``) depend on the module named; ``from pkg import name`` depends on the
  package ``pkg`` (its ``__init__`` runs) and, when ``pkg.name`` is a module, on that module
  too.
* A parent package being imported implicitly (``dnmf.a`` before ``dnmf.a.b``) is *not* an
  edge: every submodule would otherwise sit in a cycle with its package's ``__init__``. So
  ``from . import sibling`` inside ``dnmf.a`` depends on ``dnmf.a.sibling`` only, while
  ``from . import name`` of a name defined in ``dnmf/a/__init__.py`` depends on ``dnmf.a``.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import dnmf

#: Packages that must be free of import cycles (the NMF-RE / nmfkc layers, issue 13).
ACYCLIC_PACKAGES = ("dnmf.mixed", "dnmf.covariates")

#: Cycles elsewhere in the package that are known and being removed (each a sorted tuple of
#: module names). Empty this list as they go; the test fails on a new cycle *and* on a listed
#: cycle that no longer exists, so the list cannot go stale.
KNOWN_CYCLES: list[tuple[str, ...]] = []


def _modules() -> dict[str, Path]:
    """Every module of the ``dnmf`` package: dotted name -> source path."""
    out = {"dnmf": Path(dnmf.__file__)}
    for info in pkgutil.walk_packages(dnmf.__path__, prefix="dnmf."):
        base = Path(info.module_finder.path) / info.name.rsplit(".", 1)[-1]
        path = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
        if path.exists():
            out[info.name] = path
    return out


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``dnmf`` modules it imports (anywhere in its source)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name
                    # "import dnmf.a.b" binds dnmf but runs dnmf.a.b: depend on the deepest known module
                    while name and name not in mods:
                        name = name.rpartition(".")[0]
                    if name:
                        graph[mod].add(name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node.level, node.module)
                subs = [f"{target}.{a.name}" for a in node.names]
                graph[mod].update(s for s in subs if s in mods)
                # target's __init__ runs (or the name is one it defines); a package that
                # encloses mod is already initialising, so only a name it defines counts
                encloses = mod.startswith(target + ".")
                if target in mods and (not encloses or not all(s in mods for s in subs)):
                    graph[mod].add(target)
        graph[mod].discard(mod)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _within(cycle: tuple[str, ...], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in cycle)


def test_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    # module level, relative: nmfkc's inference imports the result type of nmfkc
    assert "dnmf.covariates.nmfkc" in graph["dnmf.covariates.inference"]
    # a package __init__ depends on what it re-exports
    assert "dnmf.mixed.nmfre" in graph["dnmf.mixed"]
    # function level: NMF-RE's initialiser calls nmfkc through the covariates package
    assert "dnmf.covariates" in graph["dnmf.mixed.fit"]


def test_find_cycles_on_a_toy_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(g) == [("a", "b", "c")]


@pytest.mark.parametrize("package", ACYCLIC_PACKAGES)
def test_no_import_cycle_in_layered_packages(package):
    """No cycle through any module of dnmf.mixed or dnmf.covariates (function-level imports count)."""
    bad = [c for c in find_cycles(import_graph()) if _within(c, package)]
    assert not bad, f"import cycles through {package}: {bad}"


def test_cycles_elsewhere_are_known():
    """Any other cycle must be listed in KNOWN_CYCLES; a listed cycle that is gone must be removed."""
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not new, f"new import cycles in dnmf: {new}"
    assert not gone, f"cycles fixed — remove them from KNOWN_CYCLES: {gone}"


def _imports_pipelines() -> list[str]:
    out = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "pipelines" or n.startswith("pipelines.") for n in names):
                out.append(mod)
    return sorted(set(out))


def test_library_does_not_import_pipelines():
    """dnmf is the library; pipelines/ sits on top of it and is never imported by it."""
    assert _imports_pipelines() == []


def test_public_names_of_the_nmfre_layers():
    """Names other code imports stay where they were; the new ones are exported."""
    import dataclasses

    import dnmf.io
    import dnmf.mixed
    import dnmf.mixed.blocks
    import dnmf.mixed.scan
    from dnmf.mixed.nmfre import (  # noqa: F401 - importable from here, as before the split
        DEFAULT_RATES,
        NMFREResult,
        df_u,
        kmeans_start,
        lambda_for_cap,
        nmfkc_eu_stats,
    )

    assert {"choose_rate", "DEFAULT_RATES"} <= set(dnmf.mixed.__all__)
    assert dnmf.mixed.choose_rate is dnmf.mixed.scan.choose_rate
    assert dnmf.mixed.DEFAULT_RATES == DEFAULT_RATES
    for name in dnmf.mixed.__all__:
        assert getattr(dnmf.mixed, name) is not None
    # the blocked result is an NMFREResult that adds only its block fields
    Blocked = dnmf.mixed.NMFREBlockedResult
    assert issubclass(Blocked, NMFREResult)
    own = {f.name for f in dataclasses.fields(Blocked)} - {f.name for f in dataclasses.fields(NMFREResult)}
    assert own == {"U_blocks", "col_bounds", "iter_times", "timings"}
    # the blocked fit's private Y conversion no longer shadows the public reader
    assert not hasattr(dnmf.mixed.blocks, "as_blocked")
    assert callable(dnmf.io.as_blocked)


def test_every_public_name_imports_and_is_documented():
    """Each name of ``dnmf.__all__`` (the lazy map included) imports, and the module docstring's
    "Public API" list names exactly the lazy names and the exceptions."""
    import re

    for name in dnmf.__all__:
        assert getattr(dnmf, name) is not None, name
    assert set(dnmf._LAZY) <= set(dnmf.__all__)
    documented = set(re.findall(r":(?:func|class|mod):`(?:dnmf\.)?(\w+)`", dnmf.__doc__))
    assert documented == set(dnmf.__all__) - {"__version__"}
    assert issubclass(dnmf.CheckpointError, dnmf.DnmfError) and issubclass(dnmf.WorkerLostError, dnmf.DnmfError)
    from dnmf.engine.checkpoint import CheckpointError

    assert CheckpointError is dnmf.CheckpointError
    err = dnmf.CheckpointError("damaged", path="/x.zarr", problems={"slot0": "chunk missing"})
    assert (err.path, err.problems) == ("/x.zarr", {"slot0": "chunk missing"})


def _fresh_stdout(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (which has imported nothing yet)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_nmfre_pipeline_import_stays_light():
    """`dnmf validate` of an nmfre config imports pipelines.nmfre: no SciPy, numba or Dask
    (they took it from 0.3 s to 2.4 s); they are imported where a fit or inference needs them."""
    assert _fresh_stdout("import sys, pipelines.nmfre; "
                         "print(sorted(m for m in ('scipy.stats', 'scipy.optimize', 'numba', 'dask', 'distributed') "
                         "if m in sys.modules))") == "[]"


def test_in_process_fit_imports_neither_dask_nor_distributed():
    """Without ``distributed`` imported there can be no default client, so an in-process fit
    does not import it (~0.3 s of a first fit, issue 12), nor dask (~0.15 s: dnmf's types tell
    dask their size by ``__sizeof__``, tests/test_io.py); a fit with a default client still uses
    it (tests/test_engine_cluster.py)."""
    assert _fresh_stdout(
        "import sys, warnings, scipy.sparse as sp, dnmf; warnings.simplefilter('ignore'); "
        "m = dnmf.nmf(sp.random(60, 80, density=0.2, random_state=0, format='csc'), 3, maxit=3, seed=1); "
        "print(type(m).__name__, sorted(k for k in ('dask', 'distributed') if k in sys.modules))") == "NMFModel []"
