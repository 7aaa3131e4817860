"""Job pipelines: one module per pipeline, found by name.

A config's ``pipeline: NAME`` names a module ``pipelines/NAME.py``, registered in
``pyproject.toml`` under the ``dnmf.pipelines`` entry-point group (``NAME =
"pipelines.NAME"``), through which the ``dnmf`` CLI and job runner find it
(:func:`dnmf.config.get_pipeline`). Adding a pipeline is adding that entry point (then
``pip install -e .`` again) and one module that defines

``SECTIONS``
    ``{"input": InputDataclass, "model": ModelDataclass, ...}``: the config sections it reads,
    as frozen dataclasses whose annotations and ``field(metadata=...)`` are the schema (see
    :mod:`dnmf.config`); they are validated before anything runs;
``run(config, job)``
    the job itself: read the inputs, fit, and write every result through ``job`` (the run's
    store, checkpoints, progress, plots and the Dask client; see :class:`dnmf.jobs.Job`).

and optionally ``check_config(config)`` yielding ``(key, expected, got)`` for checks across
sections. Its docstring's first line says what it does (``dnmf validate --list``). Modules whose
name starts with ``_`` are not pipelines. Pipelines import only the public dnmf API
(``import dnmf`` names, :mod:`dnmf.io`, :mod:`dnmf.datasets`); the library never imports
this package. :func:`registry` lists the modules of this package (a test checks that the
entry points name exactly these).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["pipeline_names", "get_pipeline", "registry"]

_REGISTRY: dict[str, ModuleType] | None = None


def registry() -> dict[str, ModuleType]:
    """``{name: module}`` of every pipeline module in this package (imported once)."""
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            missing = [a for a in ("SECTIONS", "run") if not hasattr(module, a)]
            if missing:
                raise TypeError(f"pipeline module {module.__name__} must define {', '.join(missing)}")
            found[info.name] = module
        _REGISTRY = found
    return _REGISTRY


def pipeline_names() -> list[str]:
    """Names a config's ``pipeline:`` key accepts."""
    return list(registry())


def get_pipeline(name: str) -> ModuleType:
    """The module of pipeline ``name`` (KeyError listing the valid names otherwise)."""
    reg = registry()
    if name not in reg:
        raise KeyError(f"unknown pipeline {name!r}; available: {', '.join(reg)}")
    return reg[name]
