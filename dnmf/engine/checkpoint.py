"""Checkpoints of the ALS state in a Zarr group, with crash-safe slot flipping and integrity checks.

Layout of the group at ``path``::

    zarr.json attrs: format, fingerprint, slot (the valid slot, or absent), iteration
    slot0/ slot1/     w (m×k), d (k), h_scale (k), h/<j> (n_j × k, one array per block)
                      attrs: fingerprint, iteration, loss_history, tol_history, below_tol, ...,
                             arrays (sha256 of every array), checksum (of all of the above)

A save removes the *other* slot, writes its arrays (each worker writes its own blocks' H
arrays, so no two writers share a chunk), then the slot's attributes with the checksums, and
only then flips ``slot`` in the root attributes. A process killed mid-save leaves the previous
slot valid; a resumed fit continues from it and reproduces the uninterrupted run exactly (the
loop is deterministic given the state).

Integrity
---------
Float arrays are written with fill value NaN and every chunk is written, so a missing chunk
file is seen (``nchunks_initialized < nchunks``, or NaN where data should be) instead of being
read back as zeros. Every array's SHA-256 and a checksum over the slot's attributes (iteration
count, loss history, convergence flags) are verified on load; the iteration count must match
the stored loss history. A damaged slot is never resumed: :meth:`Checkpointer.load` falls back
to the other slot with a warning when that one is valid, and raises :class:`CheckpointError`
when neither is.

Only what shapes the arithmetic enters the :func:`fingerprint`: ``maxit`` and
``checkpoint_every`` only extend or space out a run, so a fit that stopped at ``maxit`` can be
resumed with a larger one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..exceptions import CheckpointError, InputError

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "CheckpointError", "fingerprint", "checkpoint_info", "EXTEND_ONLY_OPTIONS"]

FORMAT = "dnmf-als-checkpoint/2"
SLOTS = ("slot0", "slot1")

#: Options that only extend a fit or space its checkpoints: left out of the fingerprint.
EXTEND_ONLY_OPTIONS = ("maxit", "checkpoint_every")

_STATE_KEYS = ("fingerprint", "iteration", "loss_history", "tol_history", "below_tol", "has_h", "converged",
               "stopped_by_callback", "n_blocks", "arrays")


class _Damaged(ValueError):
    """What is wrong with a slot, found by the checks here (not a read or decode failure)."""


def fingerprint(shape, col_bounds, opts_dict: dict) -> str:
    """Hash of what must match for a checkpoint to be resumable (``EXTEND_ONLY_OPTIONS`` left out)."""
    opts = {k: v for k, v in opts_dict.items() if k not in EXTEND_ONLY_OPTIONS}
    payload = json.dumps(
        {"shape": list(shape), "col_bounds": [int(c) for c in col_bounds], "opts": opts},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _record_checksum(record: dict) -> str:
    payload = json.dumps({k: record[k] for k in _STATE_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _create(path: str, arr: np.ndarray, one_chunk: bool = False) -> str:
    """Write ``arr`` as a new float64 array at ``path`` (in a slot just emptied, whose parent
    groups exist): fill value NaN, every chunk written (so a missing chunk is visible),
    uncompressed; returns its digest.

    A save writes one array per H block, and their creation was most of a save's cost. Created
    by path (no reopening of the root group, no overwrite pass) and uncompressed (dense factors
    barely compress), an array takes ~4 ms here instead of ~10.
    """
    import zarr

    arr = np.ascontiguousarray(arr, dtype=np.float64)
    zarr.create_array(path, data=arr, chunks=arr.shape if one_chunk and arr.size else "auto", fill_value=np.nan,
                      compressors=None, config={"write_empty_chunks": True})
    return _digest(arr)


def _write_h(ht, j, path, slot):
    """Write block ``j``'s H_jᵀ into ``slot`` (runs where the block lives); returns its digest."""
    return _create(f"{path}/{slot}/h/{j}", ht, one_chunk=True)


def _read_checked(group, name: str, digest: str | None) -> np.ndarray:
    """Read ``group[name]``; _Damaged naming what is wrong when data is missing or altered."""
    arr = group[name]
    if arr.nchunks_initialized != arr.nchunks:
        raise _Damaged(f"{arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunk(s) missing in {name!r}")
    data = np.asarray(arr[...])
    if digest is None or _digest(data) != digest:
        raise _Damaged(f"checksum mismatch in {name!r} (the data was altered)")
    if not np.all(np.isfinite(data)):
        raise _Damaged(f"non-finite values in {name!r}")
    return data


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _root_attrs(path: Path) -> dict:
    """Attributes of the checkpoint's root zarr.json (ValueError/OSError when unreadable)."""
    meta = _read_json(path / "zarr.json")
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        raise _Damaged("zarr.json is not a Zarr group's metadata")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _Damaged("zarr.json attributes are not a mapping")
    return attrs


def _slot_attrs(path: Path, slot: str) -> dict:
    attrs = _read_json(path / slot / "zarr.json").get("attributes", {})
    if "checksum" not in attrs or _record_checksum(attrs) != attrs["checksum"]:
        raise _Damaged("its attributes do not match their checksum (incomplete save or edited)")
    return attrs


def checkpoint_info(path) -> dict | None:
    """Attributes of the valid slot of the checkpoint at ``path`` (None when there is none).

    Reads attributes only (no arrays): ``slot``, ``iteration``, ``converged``,
    ``stopped_by_callback``, ... A checkpoint whose pointer or slot attributes cannot be read
    or fail their checksum gives None.
    """
    p = Path(path)
    try:
        slot = _root_attrs(p).get("slot")
        if slot not in SLOTS:
            return None
        return {"slot": slot, **_slot_attrs(p, slot)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_valid_slot_only(path) -> None:
    """Remove the slot that is not the valid one (a kept final checkpoint needs one copy only)."""
    info = checkpoint_info(path)
    if info is None:
        return
    for slot in SLOTS:
        if slot != info["slot"] and (Path(path) / slot).exists():
            shutil.rmtree(Path(path) / slot)


class Checkpointer:
    """Saves and loads :class:`~dnmf.engine.als.ALSState` to a Zarr group."""

    def __init__(self, path: str, fp: str, n_blocks: int):
        self.path = str(path)
        self.fp = fp
        self.n_blocks = n_blocks

    def _root(self, mode="a"):
        import zarr

        return zarr.open_group(self.path, mode=mode)

    def save(self, state, executor) -> None:
        root = self._root()
        cur = root.attrs.get("slot")
        slot = "slot1" if cur == "slot0" else "slot0"
        if root.attrs.get("fingerprint") not in (None, self.fp):
            raise InputError(f"Checkpoint at {self.path!r} belongs to another fit; refusing to overwrite it.")
        if root.attrs.get("format") != FORMAT or "fingerprint" not in root.attrs:
            root.attrs.update({"format": FORMAT, "fingerprint": self.fp})
        # 1. invalidate the target slot: a save cut short leaves a slot without attributes.
        if slot in root:
            del root[slot]
        g = root.create_group(slot)
        # 2. arrays (H blocks on the workers that hold them), each with its digest.
        digests = {name: _create(f"{self.path}/{slot}/{name}", val)
                   for name, val in (("w", state.w), ("d", state.d), ("h_scale", state.h_scale))}
        has_h = state.ht[0] is not None
        if has_h:
            g.create_group("h")
            done = executor.map_blocks(_write_h, state.ht, list(range(self.n_blocks)), args=(self.path, slot))
            for j, d in enumerate(executor.gather(done)):
                digests[f"h/{j}"] = d
        # 3. the slot's attributes with their checksum: the slot is valid from here on.
        record = {
            "fingerprint": self.fp,
            "iteration": int(state.iteration),
            "loss_history": [float(x) for x in state.loss_history],
            "tol_history": [float(x) for x in state.tol_history],
            "below_tol": int(state.below_tol),
            "has_h": bool(has_h),
            "converged": bool(state.converged),
            "stopped_by_callback": bool(state.stopped_by_callback),
            "n_blocks": int(self.n_blocks),
            "arrays": digests,
        }
        record["checksum"] = _record_checksum(record)
        g.attrs.update(record)
        # 4. flip last: until this write the previous slot stays the valid one.
        root.attrs.update({"slot": slot, "iteration": int(state.iteration)})
        logger.info("checkpoint: iteration %d saved to %s/%s", state.iteration, self.path, slot)

    # -- loading ----------------------------------------------------------------------------------
    def _load_slot(self, slot: str):
        """The state in ``slot``; _Damaged (or a read/decode error) saying what is wrong."""
        import zarr

        from .als import ALSState

        p = Path(self.path)
        attrs = _slot_attrs(p, slot)
        if attrs["fingerprint"] != self.fp:
            raise _Foreign(slot)
        it = attrs["iteration"]
        if not isinstance(it, int) or it < 0 or it != len(attrs["loss_history"]) or it != len(attrs["tol_history"]):
            raise _Damaged(f"iteration {it!r} does not match the stored loss history "
                             f"({len(attrs['loss_history'])} entries)")
        if not 0 <= attrs["below_tol"] <= it or attrs["n_blocks"] != self.n_blocks:
            raise _Damaged("inconsistent loop counters")
        g = zarr.open_group(str(p / slot), mode="r")  # not through the root: it may be the damaged part
        digests = attrs["arrays"]
        w = _read_checked(g, "w", digests.get("w"))
        d = _read_checked(g, "d", digests.get("d"))
        h_scale = _read_checked(g, "h_scale", digests.get("h_scale"))
        k = d.shape[0]
        if w.ndim != 2 or w.shape[1] != k or h_scale.shape != (k,):
            raise _Damaged(f"factor shapes do not agree (w {w.shape}, d {d.shape}, h_scale {h_scale.shape})")
        if attrs["has_h"]:
            ht = [_read_checked(g, f"h/{j}", digests.get(f"h/{j}")) for j in range(self.n_blocks)]
            if any(h.ndim != 2 or h.shape[1] != k for h in ht):
                raise _Damaged("H block shapes do not agree with k")
        else:
            if it > 0:
                raise _Damaged(f"iteration {it} but no H was saved")
            ht = [None] * self.n_blocks
        return ALSState(w=w, d=d, ht=ht, h_scale=h_scale, iteration=it, loss_history=list(attrs["loss_history"]),
                        tol_history=list(attrs["tol_history"]), below_tol=int(attrs["below_tol"]),
                        converged=bool(attrs["converged"]), stopped_by_callback=bool(attrs["stopped_by_callback"]))

    def load(self):
        """The saved state, or None when there is no checkpoint at ``path``.

        Raises
        ------
        InputError
            The checkpoint belongs to another fit (matrix, block layout or options).
        CheckpointError
            No slot holds a valid state (missing chunks, unreadable or altered data).
        """
        p = Path(self.path)
        if not p.exists():
            return None
        problems: dict[str, str] = {}
        pointed = None
        try:
            root = _root_attrs(p)
        except (OSError, ValueError) as e:
            if not (p / "zarr.json").exists() and not any((p / s).exists() for s in SLOTS):
                return None
            problems["zarr.json"] = str(e) if isinstance(e, _Damaged) else f"unreadable ({type(e).__name__}: {e})"
            root = None
        if root is not None:
            if root.get("fingerprint") not in (None, self.fp):
                raise self._foreign_error()
            pointed = root.get("slot")
            if pointed is None:
                return None  # no save ever completed
            if pointed not in SLOTS:
                problems["slot"] = f"the 'slot' attribute {pointed!r} is not one of {', '.join(SLOTS)}"
        order = [pointed, *(s for s in SLOTS if s != pointed)] if pointed in SLOTS else list(SLOTS)
        found = []
        for slot in order:
            if not (p / slot).exists():
                problems[slot] = "missing"
                continue
            try:
                found.append((slot, self._load_slot(slot)))
            except _Foreign:
                raise self._foreign_error() from None
            except Exception as e:  # noqa: BLE001 - any read/decode failure means a damaged slot
                problems[slot] = str(e) if isinstance(e, _Damaged) else f"unreadable ({type(e).__name__}: {e})"
            if found and pointed in SLOTS:
                break
        if not found:
            detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
            raise CheckpointError(
                f"The checkpoint at {self.path!r} is damaged and no slot holds a valid state ({detail}). "
                "Start the fit again without resuming from it.", path=self.path, problems=problems)
        slot, state = max(found, key=lambda sv: sv[1].iteration)
        if slot != pointed:
            damaged = "; ".join(f"{k}: {v}" for k, v in problems.items())
            logger.warning("checkpoint %s: %s; resuming from %s (iteration %d) instead", self.path, damaged,
                           slot, state.iteration)
            self._repoint(slot, state.iteration)
        return state

    def _foreign_error(self) -> InputError:
        return InputError(
            f"Cannot resume from the checkpoint at {self.path!r}: it was written for another matrix, "
            "block layout or set of options. Remove it or start without resume."
        )

    def _repoint(self, slot: str, iteration: int) -> None:
        """Point the root at the valid ``slot`` (rewriting a broken root zarr.json), so the next
        save overwrites the damaged slot, not the one resumed from."""
        f = Path(self.path) / "zarr.json"
        doc = {"zarr_format": 3, "node_type": "group",
               "attributes": {"format": FORMAT, "fingerprint": self.fp, "slot": slot, "iteration": int(iteration)}}
        tmp = f.with_name("zarr.json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, f)


class _Foreign(Exception):
    """A slot written by another fit (not damage: refused like a foreign checkpoint)."""
