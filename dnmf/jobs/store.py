"""The run store: one Zarr v3 group per run holding its results, checkpoints and record.

Layout of ``<output.dir>/<name>.zarr``::

    zarr.json attrs["dnmf_run"]   format, pipeline, name, run_id, status ("running" →
                                  "complete", or "failed" / "interrupted"), error, owner
                                  (host, pid), started, finished, attempts, config (resolved),
                                  versions, seeds, files (written beside the store), reports,
                                  dashboard, texts
              attrs["dnmf_complete"]  the completion marker: run_id, attempt, finished and the
                                  chunk count of every result array
    <group>/<array>               results written by the pipeline (e.g. model/w, nmfre/X)
    tables/<name>/                one table per group: a 1-D array per numeric column,
                                  attrs["dnmf_table"] with the column order and JSON columns
    checkpoint/<name>/            an engine checkpoint (e.g. checkpoint/nmf)
    checkpoint/tasks/<key>/       one finished sweep task; attrs["done"] written last

The completion marker ``attrs["dnmf_complete"]`` is written by :meth:`RunStore.mark_complete`
after everything else, in the same rewrite of ``zarr.json`` as ``status: "complete"``; a run
is complete only when both are there and the marker names this run and attempt (Zarr's local
store replaces ``zarr.json`` atomically, so an interrupted run never looks complete, and an
edited status alone does not make one). A failure or Ctrl-C sets status "failed" or
"interrupted" (:meth:`RunStore.mark_stopped`); only SIGKILL leaves "running", and then the
recorded owner process is gone (:meth:`RunStore.is_stale`).

Checkpoints are removed on completion, except an engine checkpoint whose fit stopped at its
iteration cap without converging: its valid slot is kept so that ``--resume`` with a larger
``model.maxit`` continues the fit.

Float arrays are written with fill value NaN and every chunk is written; :meth:`read_group`
refuses an array with missing chunks (:class:`~dnmf.engine.checkpoint.CheckpointError`)
instead of returning fill values.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import numbers
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..engine.checkpoint import CheckpointError, checkpoint_info, keep_valid_slot_only
from ..exceptions import InputError

logger = logging.getLogger(__name__)

__all__ = ["RunStore", "FORMAT", "now_iso"]

FORMAT = "dnmf-run/1"
META = "dnmf_run"
COMPLETE = "dnmf_complete"
_ARRAY_CONFIG = {"write_empty_chunks": True}  # every chunk on disk: a missing one is detectable


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _jsonable(value: Any) -> Any:
    """Plain JSON data (tuples are tagged so they come back as tuples)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and (value.dtype.kind in "USO" or value.ndim == 0):
        return _jsonable(value.tolist())
    raise TypeError(f"cannot store a {type(value).__name__} in run-store attributes")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _is_table(value: Any) -> bool:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False
    return isinstance(value, pd.DataFrame)


def _write_array(group, name: str, arr: np.ndarray, dims: tuple[str, ...] | None = None) -> None:
    arr = np.asarray(arr)
    named = {"dimension_names": tuple(dims)} if dims is not None else {}
    if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel())):
        z = group.create_array(name, shape=arr.shape, dtype=str, overwrite=True, config=_ARRAY_CONFIG, **named)
        if arr.size:
            z[...] = arr.astype(object)
        return
    fill = {"fill_value": np.nan} if arr.dtype.kind in "fc" else {}
    group.create_array(name, data=np.ascontiguousarray(arr), overwrite=True, config=_ARRAY_CONFIG, **fill, **named)


def _read_array(node, store_path) -> np.ndarray:
    """All of a Zarr array; CheckpointError when chunks are missing (never fill values)."""
    if node.nchunks_initialized != node.nchunks:
        missing = node.nchunks - node.nchunks_initialized
        raise CheckpointError(
            f"The run store at {str(store_path)!r} is damaged: {missing} of {node.nchunks} chunk(s) of "
            f"{node.path!r} are missing. Run it again with --overwrite.", path=str(store_path),
            problems={node.path: f"{missing} chunk(s) missing"})
    try:
        arr = node[...]
    except Exception as e:  # noqa: BLE001 - a chunk that does not decode: damaged, said once
        raise CheckpointError(
            f"The run store at {str(store_path)!r} is damaged: {node.path!r} cannot be read ({type(e).__name__}: "
            f"{e}). Run it again with --overwrite.", path=str(store_path),
            problems={node.path: f"unreadable ({type(e).__name__})"}) from e
    return np.asarray(arr.astype(object) if arr.dtype.kind == "T" else arr)


def _missing_chunks(group) -> list[str]:
    """Arrays under ``group`` (recursively) with chunks missing on disk."""
    import zarr

    out = []
    for key, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array) and node.nchunks_initialized != node.nchunks:
            out.append(key)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """A run's Zarr store (see the module docstring for the layout).

    Parameters
    ----------
    path : path
        ``<output.dir>/<name>.zarr``.
    """

    def __init__(self, path):
        self.path = Path(path)

    # -- lifecycle ------------------------------------------------------------------------------
    @staticmethod
    def exists(path) -> bool:
        """True when ``path`` holds a dnmf run store."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            return False
        try:
            attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            return False
        return META in attrs

    @staticmethod
    def damage(path) -> str | None:
        """What is wrong with a Zarr store at ``path`` whose zarr.json cannot be read (else None)."""
        f = Path(path) / "zarr.json"
        if not f.is_file():
            return None
        try:
            doc = json.loads(f.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
                return "its zarr.json is not Zarr group metadata"
        except (OSError, ValueError) as e:
            return f"its zarr.json cannot be read ({type(e).__name__}: {e})"
        return None

    @classmethod
    def create(cls, path, meta: Mapping[str, Any]) -> "RunStore":
        """A new store at ``path`` (replacing whatever was there) with status "running"."""
        import zarr

        p = Path(path)
        if p.exists():
            shutil.rmtree(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(p), mode="w")
        record = {"format": FORMAT, "run_id": uuid.uuid4().hex, "status": "running", "started": now_iso(),
                  "finished": None, "attempts": 1, "owner": _owner(), "files": [], "reports": [], "seeds": {},
                  "texts": {}}
        record.update(meta)
        root.attrs[META] = _jsonable(record)
        return cls(p)

    @classmethod
    def open(cls, path) -> "RunStore":
        """An existing run store (InputError when ``path`` is not one)."""
        if not cls.exists(path):
            raise InputError(f"{str(path)!r} is not a dnmf run store (no '{META}' record in its zarr.json).")
        return cls(path)

    def _root(self, mode: str = "a"):
        import zarr

        return zarr.open_group(str(self.path), mode=mode)

    @property
    def meta(self) -> dict:
        """The run record (``attrs["dnmf_run"]``)."""
        return _from_json(dict(self._root("r").attrs[META]))

    def update_meta(self, **values: Any) -> None:
        """Update keys of the run record (one atomic rewrite of zarr.json)."""
        root = self._root()
        record = dict(root.attrs[META])
        record.update(_jsonable(values))
        root.attrs[META] = record

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    @property
    def is_complete(self) -> bool:
        """True when status is "complete" and the completion marker names this run and attempt."""
        attrs = self._root("r").attrs
        meta = _from_json(dict(attrs[META]))
        if meta.get("status") != "complete":
            return False
        if "run_id" not in meta:  # a store written before the completion marker existed
            return True
        marker = attrs.get(COMPLETE)
        return (isinstance(marker, Mapping) and marker.get("run_id") == meta["run_id"]
                and marker.get("attempt") == meta.get("attempts", 1))

    def is_stale(self) -> bool:
        """True when status is "running" but the process that ran it (on this host) is gone."""
        meta = self.meta
        owner = meta.get("owner") or {}
        if meta.get("status") != "running" or owner.get("host") != socket.gethostname() or "pid" not in owner:
            return False
        return owner["pid"] != os.getpid() and not _pid_alive(int(owner["pid"]))

    def reopen(self) -> None:
        """Start another attempt: status "running", attempts + 1, the completion marker removed."""
        root = self._root()
        attrs = dict(root.attrs)
        record = dict(attrs[META])
        record.update(_jsonable({"status": "running", "attempts": int(record.get("attempts", 1)) + 1,
                                 "owner": _owner(), "error": None, "finished": None}))
        attrs[META] = record
        attrs.pop(COMPLETE, None)
        root.attrs.put(attrs)

    def mark_stopped(self, status: str, error: str | None = None) -> None:
        """Record a failed ("failed") or interrupted ("interrupted") attempt; it stays resumable."""
        self.update_meta(status=status, error=error, finished=now_iso())

    def add_file(self, path) -> None:
        """Record a file written beside the store (a plot, a report, an AnnData copy)."""
        files = list(self.meta.get("files", []))
        name = str(path)
        if name not in files:
            files.append(name)
        self.update_meta(files=files)

    def add_seeds(self, **seeds: Any) -> None:
        rec = dict(self.meta.get("seeds", {}))
        rec.update(seeds)
        self.update_meta(seeds=rec)

    def add_text(self, name: str, text: str) -> None:
        """Keep a text (e.g. a model summary) in the run record."""
        rec = dict(self.meta.get("texts", {}))
        rec[name] = text
        self.update_meta(texts=rec)

    def add_report(self, path) -> None:
        """Record a performance report written beside the store (one per attempt)."""
        name = Path(path).name
        reports = list(self.meta.get("reports", []))
        if name not in reports:
            reports.append(name)
        self.update_meta(reports=reports)
        self.add_file(name)

    def mark_complete(self) -> None:
        """Remove the checkpoints (keeping those a larger maxit can extend), then write status
        "complete" and the completion marker together: the last write of a run."""
        fits = {name: {"iteration": int(info["iteration"]), "converged": bool(info.get("converged")),
                       "stopped_by_callback": bool(info.get("stopped_by_callback"))}
                for name, info in self._engine_checkpoints().items() if info}
        self._clear_checkpoints(keep_extendable=True)
        root = self._root()
        record = dict(root.attrs[META])
        finished = now_iso()
        record.update(status="complete", finished=finished)
        marker = {"run_id": record.get("run_id"), "attempt": record.get("attempts", 1), "finished": finished,
                  "fits": fits, "arrays": self._chunk_counts()}
        root.attrs.update({META: record, COMPLETE: marker})

    # -- results ----------------------------------------------------------------------------------
    def write_group(self, name: str, values: Mapping[str, Any],
                    dims: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """Write a results group: arrays become Zarr arrays, DataFrames tables, the rest attrs.

        ``dims`` names the axes of arrays (Zarr v3 ``dimension_names``), e.g. ``{"w": ("feature",
        "factor")}``; with a 1-D coordinate array per dimension name in the group (``feature``,
        ``factor``, ...) the group opens as an ``xarray.Dataset`` (``xarray.open_zarr(store,
        group=name)``).
        """
        dims = dims or {}
        root = self._root()
        g = root.require_group(name)
        attrs = {}
        for key, value in values.items():
            if "/" in key:
                raise ValueError(f"result name {key!r} must not contain '/'")
            if _is_table(value):
                self._write_table(g, key, value)
            elif isinstance(value, np.ndarray) and value.ndim > 0:
                _write_array(g, key, value, dims.get(key))
            else:
                attrs[key] = _jsonable(value)
        if attrs:
            g.attrs.update(attrs)

    def read_group(self, name: str) -> dict:
        """Everything :meth:`write_group` wrote under ``name`` (arrays as numpy)."""
        import zarr

        g = self._root("r")[name]
        out = {k: _from_json(v) for k, v in g.attrs.items() if k not in ("done", "dnmf_table")}
        for key, node in g.members():
            if isinstance(node, zarr.Group):
                if "dnmf_table" in node.attrs:
                    out[key] = self._read_table(node)
            else:
                out[key] = _read_array(node, self.path)
        return out

    def write_table(self, name: str, table) -> None:
        """A pandas DataFrame as ``tables/<name>``."""
        g = self._root().require_group("tables")
        self._write_table(g, name, table)

    def read_table(self, name: str):
        """The DataFrame at ``tables/<name>``."""
        return self._read_table(self._root("r")["tables"][name])

    def _write_table(self, parent, name: str, table) -> None:
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        columns = [str(c) for c in table.columns]
        json_cols = {}
        for col, label in zip(table.columns, columns):
            v = table[col].to_numpy()
            if v.dtype.kind in "fiub":
                _write_array(g, label, v)
            else:
                json_cols[label] = [_jsonable(x) for x in v.tolist()]
        g.attrs["dnmf_table"] = {"columns": columns, "json_columns": json_cols, "n_rows": int(len(table))}

    def _read_table(self, g):
        import pandas as pd

        spec = dict(g.attrs["dnmf_table"])
        data = {}
        for col in spec["columns"]:
            if col in spec["json_columns"]:
                data[col] = pd.Series(spec["json_columns"][col], dtype=object)
            else:
                data[col] = _read_array(g[col], self.path)
        return pd.DataFrame(data, columns=spec["columns"])

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> str:
        """Path of an engine checkpoint group inside the store (``checkpoint/<name>``)."""
        self._root().require_group("checkpoint")  # a Zarr group, so the store's hierarchy stays walkable
        return str(self.path / "checkpoint" / name)

    def _task_group_name(self, key: str) -> str:
        return f"checkpoint/tasks/{key}"

    def task_done(self, key: str) -> bool:
        """True when sweep task ``key`` finished and was saved whole (a damaged one is redone)."""
        import zarr

        try:
            g = zarr.open_group(str(self.path / "checkpoint" / "tasks" / key), mode="r")
            if not g.attrs.get("done", False):
                return False
            missing = _missing_chunks(g)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
        except Exception as e:  # noqa: BLE001 - unreadable metadata: the task is redone
            missing = [f"unreadable ({type(e).__name__}: {e})"]
        if missing:
            logger.warning("sweep task %r in %s is damaged (chunks missing in %s); running it again", key, self.path,
                           ", ".join(missing))
            return False
        return True

    def save_task(self, key: str, payload: Mapping[str, Any]) -> None:
        """Save a finished sweep task's result; its ``done`` flag is written last."""
        name = self._task_group_name(key)
        root = self._root()
        if name in root:
            del root[name]
        self.write_group(name, payload)
        root[name].attrs["done"] = True

    def load_task(self, key: str) -> dict:
        """The payload :meth:`save_task` saved for ``key``."""
        return self.read_group(self._task_group_name(key))

    def clear_checkpoints(self) -> None:
        """Remove every checkpoint."""
        self._clear_checkpoints(keep_extendable=False)

    def _clear_checkpoints(self, keep_extendable: bool) -> None:
        p = self.path / "checkpoint"
        if not p.exists():
            return
        kept = False
        for d in p.iterdir():
            if not d.is_dir():
                continue  # the group's own zarr.json
            info = checkpoint_info(d) if keep_extendable and d.name != "tasks" else None
            if info is not None and not info.get("converged") and not info.get("stopped_by_callback"):
                keep_valid_slot_only(d)  # a fit stopped by maxit: a larger maxit continues it
                kept = True
            else:
                shutil.rmtree(d)
        if not kept:
            shutil.rmtree(p)

    def extendable_checkpoints(self) -> dict[str, int]:
        """``{name: iteration}`` of the engine checkpoints a complete run kept (fits stopped by maxit)."""
        out = {}
        for name, info in self._engine_checkpoints().items():
            if info is not None and not info.get("converged") and not info.get("stopped_by_callback"):
                out[name] = int(info["iteration"])
        return out

    def completed_fits(self) -> dict[str, dict]:
        """``{name: {iteration, converged, stopped_by_callback}}`` of the engine-checkpointed fits
        of a complete run (from its completion marker)."""
        marker = self._root("r").attrs.get(COMPLETE) or {}
        return dict(marker.get("fits") or {})

    def tasks_done(self) -> int:
        """How many sweep tasks are saved as finished."""
        p = self.path / "checkpoint" / "tasks"
        if not p.is_dir():
            return 0
        return sum(self.task_done(t.name) for t in p.iterdir() if t.is_dir())

    def checkpoint_iterations(self) -> dict[str, int]:
        """``{name: iteration}`` of every engine checkpoint with a valid slot."""
        return {name: int(info["iteration"]) for name, info in self._engine_checkpoints().items() if info}

    def _engine_checkpoints(self) -> dict[str, dict | None]:
        p = self.path / "checkpoint"
        if not p.is_dir():
            return {}
        return {d.name: checkpoint_info(d) for d in sorted(p.iterdir()) if d.is_dir() and d.name != "tasks"}

    def has_progress(self) -> bool:
        """True when a checkpoint holds work a resumption would reuse (a saved slot, damaged or
        not, or a finished sweep task); False when the run stopped before its first checkpoint."""
        p = self.path / "checkpoint"
        if not p.is_dir():
            return False
        for d in p.iterdir():
            if d.name == "tasks" and d.is_dir():
                if any(self.task_done(t.name) for t in d.iterdir() if t.is_dir()):
                    return True
            elif d.is_dir():
                root = d / "zarr.json"
                if any((d / s / "zarr.json").is_file() for s in ("slot0", "slot1")) or (
                        root.is_file() and self.damage(d) is not None):
                    return True
        return False

    def _chunk_counts(self) -> dict[str, int]:
        """``{array path: chunks}`` of every result array (the completion marker's manifest)."""
        import zarr

        out = {}

        def walk(g, prefix):
            for key, node in g.members():
                path = f"{prefix}{key}"
                if path == "checkpoint":
                    continue
                if isinstance(node, zarr.Group):
                    walk(node, path + "/")
                else:
                    out[path] = int(node.nchunks)

        walk(self._root("r"), "")
        return out

    def verify(self) -> list[str]:
        """Problems of a complete run's results against its completion marker (empty: none)."""
        marker = self._root("r").attrs.get(COMPLETE) or {}
        problems = []
        root = self._root("r")
        for path, n in sorted((marker.get("arrays") or {}).items()):
            try:
                node = root[path]
            except KeyError:
                problems.append(f"{path}: missing")
                continue
            if node.nchunks_initialized != n:
                problems.append(f"{path}: {n - node.nchunks_initialized} of {n} chunk(s) missing")
        return problems

    def checkpoint_iteration(self, name: str) -> int | None:
        """Iteration of the valid slot of an engine checkpoint, or None when there is none."""
        f = self.path / "checkpoint" / name / "zarr.json"
        if not f.is_file():
            return None
        try:
            attrs = json.loads(f.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        return attrs.get("iteration") if attrs.get("slot") else None

    # -- listing --------------------------------------------------------------------------------
    def tree(self) -> list[tuple[str, str]]:
        """``(path, description)`` of every array and table, sorted by path."""
        import zarr

        out = []

        def walk(g, prefix):
            for key, node in sorted(g.members(), key=lambda kv: kv[0]):
                path = f"{prefix}{key}"
                if isinstance(node, zarr.Group):
                    if "dnmf_table" in node.attrs:
                        spec = node.attrs["dnmf_table"]
                        out.append((path, f"table {spec['n_rows']} rows × {len(spec['columns'])} columns: "
                                          + ", ".join(spec["columns"])))
                    else:
                        walk(node, path + "/")
                else:
                    dtype = "str" if node.dtype.kind == "T" else str(node.dtype)
                    out.append((path, f"{dtype} {'×'.join(str(s) for s in node.shape)}"))

        walk(self._root("r"), "")
        return out
