"""Job configurations: YAML → validated, frozen dataclasses (DESIGN §7, CONVENTIONS §14).

A job config is a YAML mapping::

    pipeline: factorize          # a registered pipeline (entry point group "dnmf.pipelines")
    name: quickstart             # the run's name (default: the file's stem)
    input: {...}                 # the pipeline's sections (its ``SECTIONS``)
    model: {...}
    cluster: {kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB}
    checkpoint: {every: 10}
    output: {dir: runs, plots: true, anndata: h5ad, performance_report: true}
    progress: auto

:func:`load_config` reads, overrides (``--set model.k=5``) and validates it into a
:class:`JobConfig` *before anything runs*; every problem is one :class:`dnmf.ConfigError`
naming the key path, what is allowed and what was given, in the library's template:
"The config key 'model.k' must be an int in [1, inf). Got 0 instead."

Sections are declared as frozen dataclasses; the field's type annotation is the schema and
``field(metadata=...)`` adds constraints, so a pipeline declares its sections with nothing but
:mod:`dataclasses`:

``doc``
    one line for ``dnmf validate --explain``;
``min``, ``max``, ``min_open``, ``max_open``
    bounds of an int or float (closed unless ``*_open``);
``choices``
    allowed strings;
``exists``
    a path that must exist (relative paths, here and everywhere in a config, start from the
    working directory);
``nbytes``
    a memory size: an int (bytes) or a string such as ``"4 GiB"``;
``pair``
    a (W side, H side) pair; a scalar is recycled to both sides.

A section may define ``validate(self)`` yielding ``(key, expected, got)`` (or ``(key,
expected, got, note)``) for checks that involve several keys. ``from_dict(to_dict(c)) == c`` for every valid config.

This module belongs to the job layer (with :mod:`dnmf.cli` and :mod:`dnmf.jobs`). Pipelines
register under the ``dnmf.pipelines`` entry-point group (:func:`get_pipeline`); no module of
dnmf imports the ``pipelines`` package.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, Union

from .exceptions import ConfigError

__all__ = [
    "JobConfig",
    "LocalClusterConfig",
    "AddressClusterConfig",
    "JobqueueClusterConfig",
    "CheckpointConfig",
    "OutputConfig",
    "load_config",
    "read_config_dict",
    "apply_overrides",
    "build_section",
    "section_to_dict",
    "describe_section",
    "config_error",
    "parse_nbytes",
    "parse_yaml",
    "pipeline_names",
    "pipeline_summary",
    "get_pipeline",
    "PIPELINE_GROUP",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_WALLTIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
_ADDRESS_RE = re.compile(r"^([a-z][a-z0-9+.-]*://)?[^\s:/]+(:\d+)?$|^[a-z][a-z0-9+.-]*://\S+$")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def config_error(key: str, expected: str, got: Any, note: str = "") -> ConfigError:
    """The standard error: "The config key 'model.k' must be <expected>. Got <got!r> instead."

    The error carries ``key``, ``expected`` and ``got`` attributes.
    """
    msg = f"The config key '{key}' must be {expected}. Got {_show(got)} instead."
    if note:
        msg += f" {note}"
    err = ConfigError(msg)
    err.key, err.expected, err.got, err.note = key, expected, got, note
    return err


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


# ---------------------------------------------------------------------------------------------
# Memory sizes
# ---------------------------------------------------------------------------------------------


def parse_nbytes(value: Any) -> int:
    """Bytes of a memory size: an int, or a string like ``"4 GiB"`` / ``"500MB"``.

    Raises ``ValueError`` for anything else (including sizes ≤ 0).
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, str):
        from dask.utils import parse_bytes

        n = int(parse_bytes(value))
    else:
        raise ValueError(value)
    if n <= 0:
        raise ValueError(value)
    return n


def _format_bytes(n: float) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n))


# ---------------------------------------------------------------------------------------------
# Type-driven validation
# ---------------------------------------------------------------------------------------------


def _bounds_text(kind: str, meta: Mapping) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if kind == "int":
        lo_s = "-inf" if lo is None else str(int(lo))
        hi_s = "inf" if hi is None else str(int(hi))
    else:
        lo_s = "-inf" if lo is None else repr(float(lo))
        hi_s = "inf" if hi is None else repr(float(hi))
    left = "(" if lo is None or meta.get("min_open") else "["
    right = ")" if hi is None or meta.get("max_open") else "]"
    return f"{left}{lo_s}, {hi_s}{right}"


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp, meta: Mapping) -> str:
    """Human description of what a field accepts (used in every error message)."""
    if meta.get("nbytes"):
        text = "a memory size (an int number of bytes or a string such as '4 GiB')"
        if _accepts_literal(tp, "auto"):
            text += " or 'auto'"
        return text
    if _is_union(tp):
        parts = [_describe(a, meta) for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp):
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(tp)
    if origin is Literal:
        vals = typing.get_args(tp)
        return ("one of " if len(vals) > 1 else "") + ", ".join(repr(v) for v in vals)
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an int in {_bounds_text('int', meta)}"
    if tp is float:
        return f"a float in {_bounds_text('float', meta)}"
    if tp is str:
        if "choices" in meta:
            return "one of " + ", ".join(repr(c) for c in meta["choices"])
        if meta.get("exists"):
            return "an existing file or directory"
        return meta.get("expected", "a string")
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0]
        inner = _describe(item, meta)
        if meta.get("pair"):
            return f"{inner} or a list of two such values [W side, H side]"
        return f"a list of values each {inner}" if not inner.startswith("a") else f"a list of {_plural(inner)}"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(repr(f.name) for f in dataclasses.fields(tp))
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    for art in ("an ", "a "):
        if text.startswith(art):
            head, _, rest = text[len(art):].partition(" ")
            return f"{head}s {rest}".strip()
    return text


def _accepts_literal(tp, value) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if _is_union(tp):
        return any(_accepts_literal(a, value) for a in typing.get_args(tp))
    return False


def _convert(value: Any, tp, meta: Mapping, key: str, ctx: "_Context") -> Any:
    """Check ``value`` against the annotated type ``tp`` (plus ``meta``); return the stored value."""
    expected = _describe(tp, meta)
    if meta.get("nbytes"):
        if _accepts_literal(tp, value):
            return value
        try:
            parse_nbytes(value)
        except (ValueError, TypeError):
            raise config_error(key, expected, value) from None
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise config_error(key, expected, value)
        dc_args = [a for a in args if dataclasses.is_dataclass(a)]
        if len(dc_args) == 1:
            return _build(dc_args[0], value, key, ctx)
        if dc_args:
            return _build_tagged(value, dc_args, key, ctx)
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, meta, key, ctx)
            except ConfigError as e:
                if _type_matches(value, a):  # right type, wrong value: keep the member's note
                    raise config_error(key, expected, value, getattr(e, "note", "")) from None
        raise config_error(key, expected, value)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise config_error(key, expected, value)
    if tp is Any:
        return _freeze(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise config_error(key, expected, value)
    if tp is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise config_error(key, expected, value)
        _check_bounds(int(value), meta, key, expected)
        return int(value)
    if tp is float:
        v = _as_float(value)
        if v is None:
            raise config_error(key, expected, value)
        _check_bounds(v, meta, key, expected, raw=value)
        return v
    if tp is str:
        if not isinstance(value, str):
            raise config_error(key, expected, value)
        if "choices" in meta and value not in meta["choices"]:
            raise config_error(key, expected, value)
        if "pattern" in meta and not re.match(meta["pattern"], value):
            raise config_error(key, expected, value)
        if meta.get("exists"):
            p = ctx.resolve(value)
            if not p.exists():
                raise config_error(key, expected, value, f"(no such file or directory: {str(p)!r})")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0]
        if meta.get("pair"):
            if isinstance(value, (list, tuple)):
                if len(value) != 2:
                    raise config_error(key, expected, value)
                return tuple(_convert(v, item, meta, key, ctx) for v in value)
            v = _convert(value, item, meta, key, ctx)
            return (v, v)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise config_error(key, expected, value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item, meta, key, ctx))
            except ConfigError:
                raise config_error(f"{key}[{i}]", _describe(item, meta), v) from None
        if meta.get("nonempty") and not out:
            raise config_error(key, "a non-empty list", value)
        return tuple(out)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise config_error(key, expected, value)
        return _freeze(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, ctx)
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a schema bug, not user input


def _type_matches(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return _as_float(value) is not None
    if tp is str:
        return isinstance(value, str)
    return False


def _as_float(value) -> float | None:
    """A real number; numeric strings are accepted because YAML 1.1 reads ``1e-4`` as a string."""
    import math

    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return v if math.isfinite(v) else None


def _check_bounds(v, meta, key, expected, raw=None):
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (v < lo or (meta.get("min_open") and v == lo)):
        raise config_error(key, expected, v if raw is None else raw)
    if hi is not None and (v > hi or (meta.get("max_open") and v == hi)):
        raise config_error(key, expected, v if raw is None else raw)


def _freeze(value):
    """Plain-data copy: mappings stay dicts (for Any/dict fields), lists become tuples."""
    if isinstance(value, Mapping):
        return {str(k): _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class _Context:
    """What validation needs besides the values: where relative paths start."""

    base_dir: Path

    def resolve(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, data: Any, path: str, ctx: _Context, *, skip: Iterable[str] = ()):
    """Validate the mapping ``data`` into the dataclass ``cls`` (``path`` names it in errors)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise config_error(path, _describe(cls, {}), data)
    hints = _field_types(cls)
    flds = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    names = [f.name for f in flds]
    for k in data:
        if k not in names:
            raise _unknown_key(path, k, names)
    kwargs = {}
    for f in flds:
        key = _join(path, f.name)
        meta = dict(f.metadata)
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], meta, key, ctx)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(
                f"The config key '{key}' is missing: it must be {_describe(hints[f.name], meta)}"
                + (f" ({meta['doc']})" if meta.get("doc") else "")
                + "."
            )
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        for sub, expected, got, *note in check() or ():
            raise config_error(_join(path, sub), expected, got, *note)
    return obj


def _unknown_key(path: str, key: Any, allowed: Sequence[str]) -> ConfigError:
    where = f"under '{path}'" if path else "at the top level"
    near = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    full = _join(path, str(key))
    err = ConfigError(
        f"The config key '{full}' is not recognized. Allowed keys {where}: "
        + ", ".join(repr(a) for a in allowed)
        + f". Got {key!r} instead.{hint}"
    )
    err.key, err.expected, err.got = full, "one of " + ", ".join(repr(a) for a in allowed), key
    return err


def _build_tagged(value, classes: Sequence[type], key: str, ctx: _Context):
    """A union of dataclasses told apart by their ``kind`` field (e.g. cluster kinds)."""
    kinds: dict[str, type] = {}
    for c in classes:
        for k in typing.get_args(_field_types(c)["kind"]):
            kinds[k] = c
    if not isinstance(value, Mapping):
        raise config_error(key, "a mapping with a 'kind' key (" + ", ".join(repr(k) for k in kinds) + ")", value)
    kind = value.get("kind", next(iter(kinds)))
    if kind not in kinds:
        raise config_error(_join(key, "kind"), "one of " + ", ".join(repr(k) for k in kinds), kind)
    return _build(kinds[kind], dict(value, kind=kind), key, ctx)


def build_section(cls, data: Any, path: str):
    """Validate ``data`` into the section dataclass ``cls``; errors name keys under ``path``."""
    return _build(cls, data, path, _Context(Path.cwd()))


def section_to_dict(obj) -> Any:
    """Plain YAML-ready data of a section (dataclass → dict, tuple → list), every key included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: section_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [section_to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: section_to_dict(v) for k, v in obj.items()}
    return obj


def describe_section(cls, path: str) -> list[str]:
    """``key: expected (default) — doc`` lines for every key of a section (``--explain``)."""
    hints = _field_types(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        key = _join(path, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_section(tp, key))
            continue
        if f.default is not MISSING:
            default = f"default {section_to_dict(f.default)!r}"
        elif f.default_factory is not MISSING:
            default = f"default {section_to_dict(f.default_factory())!r}"
        else:
            default = "required"
        doc = f" — {meta['doc']}" if meta.get("doc") else ""
        lines.append(f"{key}: {_describe(tp, meta)} ({default}){doc}")
    return lines


def _f(default=MISSING, doc: str = "", **meta):
    """Shorthand for a documented config field."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        frozen = _freeze(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Generic sections: cluster, checkpoint, output
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalClusterConfig:
    """``cluster: {kind: local}``: a ``distributed.LocalCluster`` on this machine (the default)."""

    kind: Literal["local"] = _f("local", "a LocalCluster on this machine")
    n_workers: int | None = _f(None, "worker processes (null: sized to the machine by dask)", min=1)
    threads_per_worker: int | None = _f(None, "threads per worker (null: dask's choice)", min=1)
    memory_limit: Literal["auto"] | int | str = _f("auto", "memory limit per worker", nbytes=True)
    processes: bool = _f(True, "workers in separate processes (false: threads of this process)")
    dashboard_address: str | None = _f(":8787", "dashboard address (null: no dashboard)")
    local_directory: str | None = _f(None, "scratch directory of the workers")

    def worker_memory(self) -> tuple[str, int, Any] | None:
        """``(key, bytes per worker, value given)`` when the config fixes it, else None."""
        if self.memory_limit == "auto":
            return None
        return ("memory_limit", parse_nbytes(self.memory_limit), self.memory_limit)


@dataclass(frozen=True, kw_only=True)
class AddressClusterConfig:
    """``cluster: {kind: address, address: tcp://host:8786}``: connect to a running scheduler."""

    kind: Literal["address"] = _f("address", "an existing scheduler")
    address: str = _f(doc="scheduler address", pattern=_ADDRESS_RE.pattern,
                      expected="a scheduler address such as 'tcp://10.0.0.5:8786'")

    def worker_memory(self):
        return None


@dataclass(frozen=True)
class JobqueueClusterConfig:
    """``cluster: {kind: slurm}`` or ``{kind: pbs}``: workers submitted as batch jobs (dask-jobqueue)."""

    kind: Literal["slurm", "pbs"] = _f("slurm", "batch system")
    cores: int = _f(1, "cores per job", min=1)
    memory: int | str = _f("4 GiB", "memory per job", nbytes=True)
    processes: int = _f(1, "worker processes per job (they share cores and memory)", min=1)
    jobs: int = _f(1, "number of jobs to submit", min=1)
    walltime: str = _f("01:00:00", "wall-clock limit per job", pattern=_WALLTIME_RE.pattern,
                       expected="a wall time such as '01:30:00' or '2-00:00:00'")
    queue: str | None = _f(None, "partition (SLURM) or queue (PBS)")
    account: str | None = _f(None, "account / project to charge")
    job_name: str = _f("dnmf", "job name", pattern=r"^[A-Za-z0-9._-]+$",
                       expected="a job name of letters, digits, '.', '_' or '-'")
    job_extra_directives: tuple[str, ...] = _f([], "extra #SBATCH / #PBS directives")
    job_script_prologue: tuple[str, ...] = _f([], "shell lines run before the worker starts")
    local_directory: str | None = _f(None, "node-local scratch directory")
    log_directory: str | None = _f(None, "where the batch system writes job logs")
    interface: str | None = _f(None, "network interface of the workers (e.g. ib0)")
    python: str | None = _f(None, "python executable on the compute nodes")
    dashboard_address: str | None = _f(":8787", "dashboard address of the scheduler (null: none)")

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        per_worker = self.cores // self.processes
        if per_worker < 1:
            yield ("processes", f"an int in [1, {self.cores}] (at most one worker per core of the job)",
                   self.processes)

    def worker_memory(self):
        return ("memory", parse_nbytes(self.memory) // self.processes, self.memory)


ClusterConfig = Union[LocalClusterConfig, AddressClusterConfig, JobqueueClusterConfig]


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint:``: how often a running job saves its state into its store."""

    every: int = _f(10, "iterations between checkpoints of an iterative fit", min=1)


@dataclass(frozen=True)
class OutputConfig:
    """``output:``: where and what a run writes."""

    dir: str = _f("runs", "folder of the run's store <dir>/<name>.zarr and the files beside it")
    plots: bool = _f(True, "write PNG plots beside the store")
    anndata: Literal["h5ad", "zarr", "none"] = _f("h5ad", "AnnData copy of the results for AnnData inputs")
    performance_report: bool = _f(True, "save a Dask performance report (HTML) beside the store")
    top_features: int = _f(20, "features per factor in the <run>-top-features.csv table and plot (factorize)",
                           min=1)

    def validate(self) -> Iterator[tuple[str, str, Any, str]]:
        problem = _unwritable_dir(Path(os.path.expanduser(self.dir)))
        if problem:
            yield ("dir", "a directory that exists or can be created", self.dir, f"({problem})")


def _unwritable_dir(path: Path) -> str:
    """Why ``path`` cannot be used or created as a writable directory ("" when it can)."""
    path = path if path.is_absolute() else Path.cwd() / path
    if path.exists():
        if not path.is_dir():
            return f"{str(path)!r} is a file"
        return "" if os.access(path, os.W_OK | os.X_OK) else f"{str(path)!r} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create it: {str(parent)!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {str(parent)!r} is not writable"
    return ""


#: Keys every job config has, in the order ``to_dict`` writes them.
GENERIC_KEYS = ("pipeline", "name", "cluster", "checkpoint", "output", "progress")
PROGRESS_MODES = ("auto", "bar", "log", "none")


# ---------------------------------------------------------------------------------------------
# The job config
# ---------------------------------------------------------------------------------------------


#: Entry-point group under which job pipelines register (``pyproject.toml``)::
#:
#:     [project.entry-points."dnmf.pipelines"]
#:     factorize = "pipelines.factorize"
#:
#: The job layer finds pipelines by name through it; dnmf never imports ``pipelines`` itself.
PIPELINE_GROUP = "dnmf.pipelines"

_PIPELINES: dict[str, types.ModuleType] = {}


def _pipeline_entry_points() -> dict:
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in sorted(entry_points(group=PIPELINE_GROUP), key=lambda ep: ep.name)}
    if not found:
        raise ConfigError(f"No job pipelines are registered (entry-point group {PIPELINE_GROUP!r}): dnmf's "
                          "installation metadata predates them; reinstall it (`pip install -e .` in a checkout).")
    return found


def pipeline_names() -> list[str]:
    """Names a config's ``pipeline:`` key accepts: the ``dnmf.pipelines`` entry points, sorted."""
    return list(_pipeline_entry_points())


def pipeline_summary(name: str) -> str:
    """The first line of pipeline ``name``'s docstring, read from its source without importing it
    (``dnmf validate --list`` stays fast however heavy a pipeline's imports are)."""
    import ast
    import importlib.util

    eps = _pipeline_entry_points()
    if name not in eps:
        raise KeyError(f"unknown pipeline {name!r}; available: {', '.join(eps)}")
    try:
        spec = importlib.util.find_spec(eps[name].module)
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
        doc = get_pipeline(name).__doc__
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def get_pipeline(name: str) -> types.ModuleType:
    """The module registered as pipeline ``name`` (KeyError listing the valid names otherwise).

    A pipeline module defines ``SECTIONS`` (``{"input": dataclass, ...}``) and ``run(config,
    job)``, and optionally ``check_config(config)``; see ``pipelines/__init__.py``.
    """
    if name in _PIPELINES:
        return _PIPELINES[name]
    eps = _pipeline_entry_points()
    if name not in eps:
        raise KeyError(f"unknown pipeline {name!r}; available: {', '.join(eps)}")
    module = eps[name].load()
    missing = [a for a in ("SECTIONS", "run") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"pipeline module {module.__name__} must define {', '.join(missing)}")
    _PIPELINES[name] = module
    return module


@dataclass(frozen=True)
class JobConfig:
    """A validated job: the pipeline's sections plus cluster, checkpoint, output and progress.

    Attributes
    ----------
    pipeline : str
        Name of a registered pipeline (:func:`pipeline_names`).
    name : str
        Run name; the store is ``<output.dir>/<name>.zarr``.
    sections : tuple of (str, dataclass)
        The pipeline's own sections (``input``, ``model``, ...), also reachable as attributes
        (``config.model.k``).
    cluster : LocalClusterConfig, AddressClusterConfig or JobqueueClusterConfig
    checkpoint : CheckpointConfig
    output : OutputConfig
    progress : {"auto", "bar", "log", "none"}
        Progress display: a bar on a terminal and log lines otherwise ("auto").
    """

    pipeline: str
    name: str
    sections: tuple
    cluster: ClusterConfig = field(default_factory=LocalClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    progress: str = "auto"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in object.__getattribute__(self, "sections"):
            if key == name:
                return value
        raise AttributeError(f"{type(self).__name__!s} has no section {name!r}")

    def section(self, name: str):
        """The pipeline section ``name`` (same as attribute access)."""
        return getattr(self, name)

    @property
    def store_path(self) -> Path:
        """``<output.dir>/<name>.zarr``."""
        return Path(self.output.dir) / f"{self.name}.zarr"

    # -- (de)serialization ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, default_name: str | None = None) -> "JobConfig":
        """Validate a plain mapping (parsed YAML) into a JobConfig.

        Parameters
        ----------
        data : mapping
            The config.
        default_name : str, optional
            Run name when the config has no ``name`` (``load_config`` passes the file stem).

        Raises
        ------
        dnmf.ConfigError
            The first problem found, naming its key path, what is allowed and what was given.
        """
        ctx = _Context(Path.cwd())
        if not isinstance(data, Mapping):
            raise ConfigError(f"A job config must be a mapping of keys to values. Got {_show(data)} instead.")
        names = pipeline_names()
        if "pipeline" not in data:
            raise ConfigError("The config key 'pipeline' is missing: it must be one of "
                              + ", ".join(repr(n) for n in names) + ".")
        pname = data["pipeline"]
        if not isinstance(pname, str) or pname not in names:
            raise config_error("pipeline", "one of " + ", ".join(repr(n) for n in names), pname)
        pipe = get_pipeline(pname)
        section_classes: dict = dict(pipe.SECTIONS)
        allowed = ["pipeline", "name", *section_classes, "cluster", "checkpoint", "output", "progress"]
        for k in data:
            if k not in allowed:
                raise _unknown_key("", k, allowed)
        name = data.get("name", default_name or pname)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise config_error("name", "a run name of letters, digits, '.', '_' or '-' (it names the output files)",
                               name)
        sections = tuple((s, _build(c, data.get(s), s, ctx)) for s, c in section_classes.items())
        cluster = _build_tagged(data.get("cluster") or {}, typing.get_args(ClusterConfig), "cluster", ctx)
        checkpoint = _build(CheckpointConfig, data.get("checkpoint"), "checkpoint", ctx)
        output = _build(OutputConfig, data.get("output"), "output", ctx)
        progress = data.get("progress", "auto")
        if progress not in PROGRESS_MODES or not isinstance(progress, str):
            raise config_error("progress", "one of " + ", ".join(repr(p) for p in PROGRESS_MODES), progress)
        cfg = cls(pipeline=pname, name=name, sections=sections, cluster=cluster, checkpoint=checkpoint,
                  output=output, progress=progress)
        check = getattr(pipe, "check_config", None)
        if callable(check):
            for key, expected, got, *note in check(cfg) or ():
                raise config_error(key, expected, got, *note)
        _check_worker_memory(cfg)
        return cfg

    def to_dict(self) -> dict:
        """Plain data with every key (defaults filled in): the resolved config."""
        out: dict[str, Any] = {"pipeline": self.pipeline, "name": self.name}
        for key, value in self.sections:
            out[key] = section_to_dict(value)
        out["cluster"] = section_to_dict(self.cluster)
        out["checkpoint"] = section_to_dict(self.checkpoint)
        out["output"] = section_to_dict(self.output)
        out["progress"] = self.progress
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_worker_memory(cfg: JobConfig) -> None:
    """A worker must hold at least one block: reject memory limits below that."""
    need = None
    for _, section in cfg.sections:
        fn = getattr(section, "min_worker_memory", None)
        if callable(fn):
            need = fn()
            if need is not None:
                break
    have = cfg.cluster.worker_memory()
    if need is None or have is None:
        return
    nbytes, why = need
    key, per_worker, given = have
    if per_worker < nbytes:
        extra = "" if key == "memory_limit" else f" per worker (memory / processes = {_format_bytes(per_worker)})"
        raise config_error(f"cluster.{key}", f"at least {_format_bytes(nbytes)}{extra} to hold one block ({why})",
                           given)


# ---------------------------------------------------------------------------------------------
# YAML files and overrides
# ---------------------------------------------------------------------------------------------


def _yaml_loader():
    """A SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:  # the keys as written (merged `<<` keys may be overridden)
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
                    if first is not key_node:
                        raise _DuplicateKey(key, first.start_mark.line + 1, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with duplicate keys rejected; ``where`` names the text in errors.

    Raises
    ------
    dnmf.ConfigError
        Invalid YAML, or a key given twice in one mapping (both line numbers named).
    """
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{where} gives the key {e.key!r} twice in one mapping (lines {e.first} and {e.second}); "
                          "keep one.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from e


def read_config_dict(path: str | os.PathLike) -> dict:
    """Parse a YAML config file into a mapping.

    ConfigError for a missing or unreadable file, a binary (non-UTF-8) file, invalid YAML,
    duplicate keys, or a document that is not a mapping.
    """
    p = Path(path)
    where = f"The config file {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{where} is a directory; give a YAML file.")
    if not p.is_file():
        raise ConfigError(f"{where} does not exist (working directory: {os.getcwd()!r}).")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} must be a UTF-8 text (YAML) file; byte {e.start} is {raw[e.start:e.start + 1]!r} "
                          "(is it a binary file?).") from None
    if "\x00" in text:
        raise ConfigError(f"{where} must be a UTF-8 text (YAML) file; it holds NUL bytes (is it a binary file?).")
    data = parse_yaml(text, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of keys to values. "
                          f"Got {_show(data)} instead.")
    return data


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides with dotted keys (``model.maxit=3``) to a config mapping.

    VALUE is parsed as YAML (``3`` → int, ``[1, 2]`` → list, ``null`` → None); intermediate
    mappings are created as needed. Returns a new mapping.
    """
    import copy

    out = copy.deepcopy(dict(data))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"An override must be KEY=VALUE with a dotted key, e.g. 'model.maxit=3'. "
                              f"Got {item!r} instead.")
        key, _, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"An override must be KEY=VALUE with a dotted key, e.g. 'model.maxit=3'. "
                              f"Got {item!r} instead.")
        value = parse_yaml(raw, f"The value of the override {item!r}") if raw.strip() else ""
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise config_error(where, f"a mapping to set '{key}' inside it", nxt)
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> JobConfig:
    """Read, override and validate a YAML job config.

    Parameters
    ----------
    path : path
        YAML file.
    overrides : iterable of str
        ``KEY=VALUE`` items with dotted keys (``model.maxit=3``), applied before validation.
    Returns
    -------
    JobConfig

    Raises
    ------
    dnmf.ConfigError
    """
    data = apply_overrides(read_config_dict(path), overrides)
    return JobConfig.from_dict(data, default_name=Path(path).stem)
