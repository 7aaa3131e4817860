"""AnnData integration: factorize ``adata.X`` (cells × genes) and store the result in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from .models import NMFModel

__all__ = ["fit"]


def fit(adata: Any, k: int, *, layer: str | None = None, key: str = "nmf", **nmf_kwargs) -> NMFModel:
    """Run :func:`dnmf.nmf` on an AnnData object and write the factors into it.

    AnnData stores cells × genes; dnmf factorizes genes × cells (a CSR cells × genes matrix
    *is* a CSC genes × cells matrix, so nothing is copied).

    Parameters
    ----------
    adata : anndata.AnnData
    k : int
        Rank.
    layer : str, optional
        Factorize ``adata.layers[layer]`` instead of ``adata.X``.
    key : str, default "nmf"
        Names: ``obsm[f"X_{key}"]``, ``varm[f"{key.upper()}_W"]``, ``uns[key]``.
    **nmf_kwargs
        Passed to :func:`dnmf.nmf`.

    Returns
    -------
    NMFModel
        Also written to ``adata``: ``obsm["X_nmf"]`` (cells × k) = (diag(d)·H)ᵀ, so that
        ``X ≈ obsm["X_nmf"] @ varm["NMF_W"].T``; ``varm["NMF_W"]`` (genes × k) = W with
        unit-norm columns; ``uns["nmf"]`` = d, the parameters and the loss history.
    """
    from .core import nmf as _nmf
    from .io import as_blocked

    blocked = as_blocked(adata, layer=layer)
    model = _nmf(blocked, k, **nmf_kwargs)
    adata.obsm[f"X_{key}"] = np.ascontiguousarray((model.h * model.d[:, None]).T)
    adata.varm[f"{key.upper()}_W"] = np.ascontiguousarray(model.w)
    misc = model.misc
    adata.uns[key] = {
        "d": np.asarray(model.d),
        "k": int(k),
        "layer": layer or "X",
        "iter": int(misc["iter"]),
        "loss": float(misc["loss"]),
        "loss_history": np.asarray(misc["loss_history"]),
        "converged": bool(misc["converged"]),
        "solver": misc["solver"],
        "norm": misc["norm"],
        "seed": -1 if misc["seed"] is None else int(misc["seed"]),
        "L1": np.asarray(misc["L1"]),
        "L2": np.asarray(misc["L2"]),
    }
    return model
