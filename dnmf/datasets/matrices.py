"""Bundled matrices of RcppML 1.0: pbmc3k, hawaiibirds and aml (features × samples).

The files in ``dnmf/datasets/data/`` are compact, exact copies of the exports in the shared
data folder, written by :mod:`dnmf.datasets._build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["Dataset", "load_pbmc3k", "load_hawaiibirds", "load_aml"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A matrix with its row and column annotations.

    Attributes
    ----------
    X : scipy.sparse.csc_array or ndarray of shape (m, n)
        The data, **features × samples** (the orientation of :func:`dnmf.nmf`), float64.
    obs : pandas.DataFrame with n rows
        Annotations of the samples (columns of X), indexed by sample name.
    var : pandas.DataFrame with m rows
        Annotations of the features (rows of X), indexed by feature name.
    name : str
        Short name (the loader's suffix).
    description : str
        What the data are and where they come from.
    """

    X: Any
    obs: Any
    var: Any
    name: str
    description: str

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) = (features, samples)."""
        return tuple(self.X.shape)

    def __repr__(self) -> str:
        kind = "sparse" if not isinstance(self.X, np.ndarray) else "dense"
        m, n = self.shape
        return (f"Dataset({self.name!r}: {m} features × {n} samples, {kind}; "
                f"obs columns {list(self.obs.columns)}, var columns {list(self.var.columns)})")

    def to_anndata(self):
        """An ``anndata.AnnData`` in AnnData's orientation (samples × features).

        ``adata.X`` is ``X.T`` — for sparse data a CSR view of the same arrays, no copy —
        with ``obs`` = samples and ``var`` = features.
        """
        import anndata

        Xt = self.X.T
        if not isinstance(Xt, np.ndarray):
            import scipy.sparse as sp

            Xt = sp.csr_matrix(Xt)  # AnnData stores scipy matrices; csc_array.T is already CSR
        return anndata.AnnData(X=Xt, obs=self.obs.copy(), var=self.var.copy())


def _read(name: str) -> dict:
    with resources.files("dnmf.datasets").joinpath(f"data/{name}.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}


def _frame(arrays: dict, prefix: str, n: int, default_index: str):
    import pandas as pd

    index = arrays.get(f"{prefix}_index")
    if index is None:
        index = [f"{default_index}{i + 1}" for i in range(n)]
    cols = {key[len(prefix) + 2:]: arrays[key] for key in arrays if key.startswith(f"{prefix}__")}
    # string metadata are labels (cell type, island, ...): categorical columns
    frame = pd.DataFrame({c: (pd.Categorical(v.astype(object)) if v.dtype.kind == "U" else v)
                          for c, v in cols.items()},
                         index=pd.Index([str(i) for i in index], dtype=object))
    if frame.shape[0] != n:
        raise RuntimeError(f"the packaged data set is damaged ({prefix} has {frame.shape[0]} rows, expected {n})")
    return frame


def _load(name: str, description: str, feature: str, sample: str) -> Dataset:
    import scipy.sparse as sp

    arrays = _read(name)
    m, n = (int(v) for v in arrays["shape"])
    if str(arrays["format"]) == "csc":
        X = sp.csc_array(
            (arrays["data"].astype(np.float64), arrays["indices"].astype(np.int32), arrays["indptr"].astype(np.int32)),
            shape=(m, n),
        )
    else:
        X = np.ascontiguousarray(arrays["X"], dtype=np.float64)
    obs = _frame(arrays, "obs", n, sample)
    var = _frame(arrays, "var", m, feature)
    return Dataset(X=X, obs=obs, var=var, name=name, description=description)


def load_pbmc3k() -> Dataset:
    """10x Genomics PBMC 3k single-cell RNA counts, as bundled with RcppML 1.0.

    Returns
    -------
    Dataset
        ``X``: 13,714 genes × 2,638 cells, ``scipy.sparse.csc_array`` of integer counts
        (float64), 2,238,732 non-zeros (6.2 %). ``obs["cell_type"]``: 9 annotated cell types.
        RcppML ships no gene or cell names, so the indexes are ``gene1…`` and ``cell1…``.

    Examples
    --------
    >>> from dnmf.datasets import load_pbmc3k
    >>> data = load_pbmc3k()
    >>> data.X.shape, data.X.nnz, data.obs["cell_type"].nunique()
    ((13714, 2638), 2238732, 9)
    """
    return _load(
        "pbmc3k",
        "10x Genomics PBMC 3k: raw UMI counts of 13,714 genes (rows) in 2,638 cells (columns) with "
        "9 annotated cell types; RcppML 1.0's data(pbmc3k).",
        feature="gene",
        sample="cell",
    )


def load_hawaiibirds() -> Dataset:
    """Frequencies of bird species in grid cells of the Hawaiian islands (RcppML 1.0).

    Returns
    -------
    Dataset
        ``X``: 183 species × 1,183 grid cells, sparse, values in (0, 1], 30,815 non-zeros.
        ``var`` (species): ``status`` (native / introduced), ``type``; ``obs`` (grid cells):
        ``island``, ``lat``, ``lng``.

    Examples
    --------
    >>> from dnmf.datasets import load_hawaiibirds
    >>> data = load_hawaiibirds()
    >>> data.X.shape, sorted(data.obs.columns)
    ((183, 1183), ['island', 'lat', 'lng'])
    """
    return _load(
        "hawaiibirds",
        "eBird observation frequencies of 183 bird species (rows) in 1,183 grid cells (columns) of the "
        "Hawaiian islands; RcppML 1.0's data(hawaiibirds).",
        feature="species",
        sample="grid",
    )


def load_aml() -> Dataset:
    """DNA methylation of acute myelogenous leukemia samples (RcppML 1.0).

    Returns
    -------
    Dataset
        ``X``: 824 genomic regions × 135 samples, dense ndarray of methylation beta values in
        [0, 1). ``obs["category"]``: AML subtype or control (6 categories), indexed by sample.

    Examples
    --------
    >>> from dnmf.datasets import load_aml
    >>> data = load_aml()
    >>> data.X.shape, data.obs["category"].nunique()
    ((824, 135), 6)
    """
    return _load(
        "aml",
        "DNA methylation beta values of 824 differentially methylated regions (rows) in 135 samples "
        "(columns): AML subtypes and controls; RcppML 1.0's data(aml).",
        feature="region",
        sample="sample",
    )
