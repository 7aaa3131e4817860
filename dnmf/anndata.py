"""AnnData integration: factorize ``adata.X`` (cells × genes) and store the result in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from .models import NMFModel

__all__ = ["fit", "uns_record", "read_annotations"]


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
        unit-norm columns; ``uns["nmf"]`` = :func:`uns_record`: d, the loss history and, as
        scanpy's ``uns["pca"]["params"]``, ``uns["nmf"]["params"]`` (the fit's parameters).

    See Also
    --------
    NMFModel.predict : with an AnnData argument it returns cells × k, the layout of ``obsm``.
    """
    from .core import nmf as _nmf
    from .io import as_blocked

    blocked = as_blocked(adata, layer=layer)
    model = _nmf(blocked, k, **nmf_kwargs)
    adata.obsm[f"X_{key}"] = np.ascontiguousarray((model.h * model.d[:, None]).T)
    adata.varm[f"{key.upper()}_W"] = np.ascontiguousarray(model.w)
    scalars = {name: value for name, value in nmf_kwargs.items()
               if isinstance(value, (str, bool, int, float, np.integer, np.floating)) and name != "seed"}
    adata.uns[key] = uns_record(model, layer=layer, **scalars)
    return model


def uns_record(model: NMFModel, *, layer: str | None = None, **params: Any) -> dict:
    """The ``uns["nmf"]`` entry of a fitted model, following scanpy's conventions.

    Like ``uns["pca"]`` (``{"params": {...}, "variance": ..., "variance_ratio": ...}``):
    ``params`` is a dict of the fit's parameters — ``k``, ``layer``, ``seed`` (-1 when drawn
    fresh), ``L1``, ``L2``, ``nonneg``, ``norm``, ``solver``, ``init`` and the
    ``params`` keywords given here (the scalar keywords passed to :func:`fit`, e.g. ``maxit`` and
    ``tol``; the pipeline's ``normalize``; None values are left out) — and the results sit
    beside it: ``d`` (k), ``loss_history``, ``iter``, ``loss``, ``converged``. ``k``,
    ``layer``, ``seed``, ``solver``, ``norm``, ``L1`` and ``L2`` are also kept at the top level,
    where earlier versions wrote them.
    """
    misc = model.misc
    seed = -1 if misc.get("seed") is None else int(misc["seed"])
    fit_params = {
        "k": int(model.k), "layer": layer or "X", "seed": seed,
        "L1": np.asarray(misc["L1"], dtype=float), "L2": np.asarray(misc["L2"], dtype=float),
        "nonneg": np.asarray(misc.get("nonneg", (True, True)), dtype=bool), "norm": str(misc["norm"]),
        "solver": str(misc["solver"]), "init": str(misc.get("init")),
        **{name: value for name, value in params.items() if value is not None},
    }
    return {
        "params": fit_params,
        "d": np.asarray(model.d),
        "k": int(model.k),
        "layer": layer or "X",
        "iter": int(misc["iter"]),
        "loss": float(misc["loss"]),
        "loss_history": np.asarray(misc["loss_history"]),
        "converged": bool(misc["converged"]),
        "solver": misc["solver"],
        "norm": misc["norm"],
        "seed": seed,
        "L1": np.asarray(misc["L1"]),
        "L2": np.asarray(misc["L2"]),
    }


def read_annotations(path: str):
    """``(obs, var)`` of an .h5ad file or an AnnData Zarr store, without reading X.

    None when ``path`` is a Zarr store that is not AnnData (or not a Zarr group at all). Used by
    the pipelines to carry cell and gene annotations into their outputs.
    """
    if str(path).lower().endswith(".h5ad"):
        import h5py

        read_elem = _read_elem()
        with h5py.File(path, "r") as f:
            return read_elem(f["obs"]), read_elem(f["var"])
    import zarr

    try:
        g = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 - not a group: not an AnnData store
        return None
    if g.attrs.get("encoding-type") != "anndata":
        return None
    read_elem = _read_elem()
    return read_elem(g["obs"]), read_elem(g["var"])


def _read_elem():
    import anndata  # only for AnnData inputs

    return getattr(getattr(anndata, "io", anndata), "read_elem", None) or anndata.experimental.read_elem
