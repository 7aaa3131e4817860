"""The run store: one Zarr v3 group per run holding its results, checkpoints and record.

Layout of ``<output.dir>/<name>.zarr``::

    zarr.json attrs["dnmf_run"]   format, pipeline, name, status ("running" → "complete"),
                                  started, finished, attempts, config (resolved), versions,
                                  seeds, files (written beside the store), dashboard, texts
    <group>/<array>               results written by the pipeline (e.g. model/w, nmfre/X)
    tables/<name>/                one table per group: a 1-D array per numeric column,
                                  attrs["dnmf_table"] with the column order and JSON columns
    checkpoint/<name>/            an engine checkpoint (e.g. checkpoint/nmf)
    checkpoint/tasks/<key>/       one finished sweep task; attrs["done"] written last

The completion marker is ``status: "complete"``, set by :meth:`RunStore.mark_complete` after
everything else is written and the checkpoints are removed; Zarr's local store replaces
``zarr.json`` atomically, so an interrupted run never looks complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import numbers
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..exceptions import InputError

logger = logging.getLogger(__name__)

__all__ = ["RunStore", "FORMAT", "now_iso"]

FORMAT = "dnmf-run/1"
META = "dnmf_run"


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


def _is_table(value: Any) -> bool:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False
    return isinstance(value, pd.DataFrame)


def _write_array(group, name: str, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel())):
        z = group.create_array(name, shape=arr.shape, dtype=str, overwrite=True)
        if arr.size:
            z[...] = arr.astype(object)
        return
    group.create_array(name, data=np.ascontiguousarray(arr), overwrite=True)


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
        except (OSError, ValueError):
            return False
        return META in attrs

    @classmethod
    def create(cls, path, meta: Mapping[str, Any]) -> "RunStore":
        """A new store at ``path`` (replacing whatever was there) with status "running"."""
        import zarr

        p = Path(path)
        if p.exists():
            shutil.rmtree(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(p), mode="w")
        record = {"format": FORMAT, "status": "running", "started": now_iso(), "finished": None, "attempts": 1,
                  "files": [], "seeds": {}, "texts": {}}
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
        return self.status == "complete"

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

    def mark_complete(self) -> None:
        """Remove the checkpoints, then set status "complete" (the last write of a run)."""
        self.clear_checkpoints()
        self.update_meta(status="complete", finished=now_iso())

    # -- results ----------------------------------------------------------------------------------
    def write_group(self, name: str, values: Mapping[str, Any]) -> None:
        """Write a results group: arrays become Zarr arrays, DataFrames tables, the rest attrs."""
        root = self._root()
        g = root.require_group(name)
        attrs = {}
        for key, value in values.items():
            if "/" in key:
                raise ValueError(f"result name {key!r} must not contain '/'")
            if _is_table(value):
                self._write_table(g, key, value)
            elif isinstance(value, np.ndarray) and value.ndim > 0:
                _write_array(g, key, value)
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
                arr = node[...]
                out[key] = np.asarray(arr.astype(object) if arr.dtype.kind == "T" else arr)
        return out

    def write_table(self, name: str, table) -> None:
        """A pandas DataFrame as ``tables/<name>``."""
        g = self._root().require_group("tables")
        self._write_table(g, name, table)

    def read_table(self, name: str):
        """The DataFrame at ``tables/<name>``."""
        return self._read_table(self._root("r")["tables"][name])

    @staticmethod
    def _write_table(parent, name: str, table) -> None:
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        columns = [str(c) for c in table.columns]
        json_cols = {}
        for col, label in zip(table.columns, columns):
            v = table[col].to_numpy()
            if v.dtype.kind in "fiub":
                g.create_array(label, data=np.ascontiguousarray(v), overwrite=True)
            else:
                json_cols[label] = [_jsonable(x) for x in v.tolist()]
        g.attrs["dnmf_table"] = {"columns": columns, "json_columns": json_cols, "n_rows": int(len(table))}

    @staticmethod
    def _read_table(g):
        import pandas as pd

        spec = dict(g.attrs["dnmf_table"])
        data = {}
        for col in spec["columns"]:
            if col in spec["json_columns"]:
                data[col] = pd.Series(spec["json_columns"][col], dtype=object)
            else:
                data[col] = np.asarray(g[col][...])
        return pd.DataFrame(data, columns=spec["columns"])

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> str:
        """Path of an engine checkpoint group inside the store (``checkpoint/<name>``)."""
        return str(self.path / "checkpoint" / name)

    def _task_group_name(self, key: str) -> str:
        return f"checkpoint/tasks/{key}"

    def task_done(self, key: str) -> bool:
        """True when sweep task ``key`` finished and was saved."""
        import zarr

        try:
            g = zarr.open_group(str(self.path / "checkpoint" / "tasks" / key), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
        return bool(g.attrs.get("done", False))

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
        p = self.path / "checkpoint"
        if p.exists():
            shutil.rmtree(p)

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
