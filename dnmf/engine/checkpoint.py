"""Checkpoints of the ALS state in a Zarr group, with crash-safe slot flipping.

Layout of the group at ``path``::

    zarr.json attrs: format, fingerprint, slot (the valid slot, or absent), iteration
    slot0/ slot1/     w (m×k), d (k), h_scale (k), h/<j> (n_j × k, one array per block)
                      attrs: iteration, loss_history, tol_history, below_tol, ...

A save writes the *other* slot completely (each worker writes its own blocks' H arrays, so
no two writers share a chunk), then flips ``slot`` in the root attributes. A process killed
mid-save leaves the previous slot valid; a resumed fit continues from it and reproduces the
uninterrupted run exactly (the loop is deterministic given the state).
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from ..exceptions import InputError

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "fingerprint"]

FORMAT = "dnmf-als-checkpoint/1"


def fingerprint(shape, col_bounds, opts_dict: dict) -> str:
    """Hash of what must match for a checkpoint to be resumable."""
    payload = json.dumps(
        {"shape": list(shape), "col_bounds": [int(c) for c in col_bounds], "opts": opts_dict},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _write_h(ht, j, path, slot):
    import zarr

    root = zarr.open_group(path, mode="a")
    arr = np.asarray(ht, dtype=np.float64)
    root.create_array(f"{slot}/h/{j}", data=arr, overwrite=True, chunks=arr.shape)
    return None


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
        if "fingerprint" not in root.attrs:
            root.attrs.update({"format": FORMAT, "fingerprint": self.fp})
        for name, val in (("w", state.w), ("d", state.d), ("h_scale", state.h_scale)):
            root.create_array(f"{slot}/{name}", data=np.asarray(val, dtype=np.float64), overwrite=True)
        if state.ht[0] is not None:
            done = executor.map_blocks(_write_h, state.ht, list(range(self.n_blocks)), args=(self.path, slot))
            executor.gather(done)
        g = root[slot]
        g.attrs.update(
            {
                "iteration": int(state.iteration),
                "loss_history": [float(x) for x in state.loss_history],
                "tol_history": [float(x) for x in state.tol_history],
                "below_tol": int(state.below_tol),
                "has_h": state.ht[0] is not None,
                "converged": bool(state.converged),
                "stopped_by_callback": bool(state.stopped_by_callback),
            }
        )
        # Flip last: until this write the previous slot stays the valid one.
        root.attrs.update({"slot": slot, "iteration": int(state.iteration)})
        logger.info("checkpoint: iteration %d saved to %s/%s", state.iteration, self.path, slot)

    def load(self):
        """The saved state, or None when there is no valid checkpoint at ``path``."""
        import zarr

        from .als import ALSState

        try:
            root = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        slot = root.attrs.get("slot")
        if slot is None:
            return None
        if root.attrs.get("fingerprint") != self.fp:
            raise InputError(
                f"Cannot resume from the checkpoint at {self.path!r}: it was written for another matrix, "
                "block layout or set of options. Remove it or start without resume."
            )
        g = root[slot]
        attrs = dict(g.attrs)
        ht = [np.asarray(g[f"h/{j}"][...]) for j in range(self.n_blocks)] if attrs["has_h"] else [None] * self.n_blocks
        return ALSState(
            w=np.asarray(g["w"][...]),
            d=np.asarray(g["d"][...]),
            ht=ht,
            h_scale=np.asarray(g["h_scale"][...]),
            iteration=int(attrs["iteration"]),
            loss_history=list(attrs["loss_history"]),
            tol_history=list(attrs["tol_history"]),
            below_tol=int(attrs["below_tol"]),
            converged=bool(attrs["converged"]),
            stopped_by_callback=bool(attrs["stopped_by_callback"]),
        )
