"""10x Genomics Cell Ranger outputs: the matrix folder and the ``.h5`` file, as genes × cells.

* A **folder** (``filtered_feature_bc_matrix/``) holds ``matrix.mtx[.gz]`` (MatrixMarket,
  genes × cells), ``features.tsv[.gz]`` (Cell Ranger ≥ 3: id, name, feature type; or
  ``genes.tsv[.gz]`` with id and name, Cell Ranger 2) and ``barcodes.tsv[.gz]``. It is read into
  memory (MatrixMarket has no random access).
* An **.h5 file** stores the matrix as CSC genes × cells — each cell a column: Cell Ranger ≥ 3
  in the group ``matrix`` (``data``, ``indices``, ``indptr``, ``shape``, ``barcodes``,
  ``features/{id, name, feature_type, genome}``), Cell Ranger 2 in one group per genome
  (``genes``, ``gene_names`` instead of ``features``). A column block is a slice of ``indptr``,
  ``data`` and ``indices``, so it is read lazily, block by block
  (:class:`dnmf.io.hdf5.H5SparseSource`), and a file larger than memory streams.

Rows are named by gene symbol (``var_names="gene_symbols"``, scanpy's default) or by feature id
(``"gene_ids"``), made unique like AnnData's ``var_names_make_unique`` (the second "A" becomes
"A-1", the third "A-2", skipping names already present); columns by barcode. As scanpy's readers
do by default, only the "Gene Expression" features are kept (``gex_only``), so the antibody,
CRISPR or peak features of multimodal runs do not enter a gene-expression factorization.
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

from .._validation import check_int, check_option, param_error
from ..exceptions import InputError
from .blocks import BlockedMatrix
from .hdf5 import H5_ERRORS, h5_sparse_blocked, h5_strings
from .memory import _from_scipy
from .validate import parse_error

__all__ = ["read_10x", "is_10x_folder", "make_unique", "VAR_NAMES"]

_FUNC = "read_10x"
#: Row names of a 10x matrix: gene symbols (scanpy's default) or feature ids (Ensembl).
VAR_NAMES = ("gene_symbols", "gene_ids")
_GEX = "Gene Expression"


def make_unique(names, join: str = "-") -> tuple[str, ...]:
    """Names made unique as ``anndata.AnnData.var_names_make_unique`` does.

    The first occurrence of a name is kept; later ones get ``join`` and 1, 2, ... appended,
    skipping any candidate that is already a name.

    Examples
    --------
    >>> make_unique(["A", "B", "A", "A-1", "A"])
    ('A', 'B', 'A-2', 'A-1', 'A-3')
    """
    names = [str(x) for x in names]
    taken = set(names)
    if len(taken) == len(names):
        return tuple(names)
    seen: set[str] = set()
    counter: dict[str, int] = {}
    out = []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
            continue
        while True:
            counter[name] = counter.get(name, 0) + 1
            candidate = f"{name}{join}{counter[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        out.append(candidate)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Folder
# ---------------------------------------------------------------------------------------------


def _find(folder: str, *stems: str) -> str | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def is_10x_folder(path: str) -> bool:
    """Whether ``path`` is a directory holding ``matrix.mtx`` or ``matrix.mtx.gz``."""
    return os.path.isdir(path) and _find(path, "matrix.mtx") is not None


def _read_tsv(path: str) -> list[list[str]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise parse_error(path, "a tab-separated 10x table" + (" (gzip-compressed)" if opener is gzip.open else ""),
                          e) from e


def _feature_rows(table: list[list[str]], path: str, var_names: str, gex_only: bool):
    """(kept rows, their names) of a features/genes table."""
    if any(len(row) < 2 for row in table):
        row = next(i for i, r in enumerate(table) if len(r) < 2)
        raise InputError(f"The 10x features file {path!r} must have at least 2 tab-separated columns (id, name) "
                         f"on every line; line {row + 1} has {len(table[row])}.")
    keep = np.ones(len(table), dtype=bool)
    if gex_only and all(len(row) >= 3 for row in table):
        keep = np.array([row[2] == _GEX for row in table], dtype=bool)
    col = 1 if var_names == "gene_symbols" else 0
    return np.flatnonzero(keep), make_unique(row[col] for row, k in zip(table, keep) if k)


def _read_folder(folder: str, var_names: str, gex_only: bool, block_nnz: int, dtype: Any) -> BlockedMatrix:
    import scipy.io
    import scipy.sparse as sp

    matrix_path = _find(folder, "matrix.mtx")
    features_path = _find(folder, "features.tsv", "genes.tsv")
    barcodes_path = _find(folder, "barcodes.tsv")
    for what, found in (("features.tsv[.gz] (or genes.tsv[.gz])", features_path),
                        ("barcodes.tsv[.gz]", barcodes_path)):
        if found is None:
            raise InputError(f"The 10x folder {folder!r} passed to {_FUNC} has a matrix but no {what}; a Cell "
                             f"Ranger matrix folder holds matrix.mtx, features.tsv and barcodes.tsv (gzipped or not).")
    kind = "a MatrixMarket file" + (" (gzip-compressed)" if matrix_path.lower().endswith(".gz") else "")
    try:
        matrix = scipy.io.mmread(matrix_path)
    except (ValueError, EOFError, OSError, IndexError) as e:
        raise parse_error(matrix_path, kind, e) from e
    features = _read_tsv(features_path)
    barcodes = [row[0] for row in _read_tsv(barcodes_path)]
    m, n = matrix.shape
    if len(features) != m or len(barcodes) != n:
        raise InputError(f"The 10x folder {folder!r} passed to {_FUNC} is inconsistent: its matrix is {m} × {n} "
                         f"(features × barcodes) but it lists {len(features)} features and {len(barcodes)} "
                         f"barcodes.")
    rows, names = _feature_rows(features, features_path, var_names, gex_only)
    if rows.size == 0:
        raise InputError(f"The 10x folder {folder!r} has no '{_GEX}' features; pass gex_only=False to read "
                         f"all features.")
    if sp.issparse(matrix):
        matrix = sp.csr_array(matrix)
        if rows.size < m:
            matrix = matrix[rows]
    elif rows.size < m:
        matrix = np.asarray(matrix)[rows]
    try:
        blocked = _from_scipy(sp.csc_array(matrix), block_nnz, dtype, (names, tuple(barcodes)))
    except InputError as e:
        raise InputError(f"{e} A was read from {matrix_path!r}.") from e
    return blocked


# ---------------------------------------------------------------------------------------------
# .h5
# ---------------------------------------------------------------------------------------------


def _strings(g, key: str, path: str) -> tuple[str, ...]:
    out = h5_strings(g[key]) if key in g else None
    if out is None:
        raise InputError(f"The 10x .h5 file {path!r} has no readable '{g.name.strip('/')}/{key}' string array.")
    return out


def _read_h5(path: str, var_names: str, gex_only: bool, genome: str | None, block_nnz: int,
             dtype: Any) -> BlockedMatrix:
    import h5py

    try:
        f = h5py.File(path, "r")
    except H5_ERRORS as e:
        raise parse_error(path, "a 10x Genomics .h5 file", e) from e
    try:
        with f:
            return _open_h5(path, f, var_names, gex_only, genome, block_nnz, dtype)
    except InputError:
        raise
    except H5_ERRORS as e:
        raise parse_error(path, "a 10x Genomics .h5 file", e) from e


def _open_h5(path: str, f, var_names: str, gex_only: bool, genome, block_nnz: int, dtype: Any) -> BlockedMatrix:
    import h5py

    def is_matrix(g):
        return isinstance(g, h5py.Group) and {"data", "indices", "indptr", "shape", "barcodes"} <= set(g.keys())

    if is_matrix(f.get("matrix")) and "features" in f["matrix"]:  # Cell Ranger ≥ 3
        name = "matrix"
        g = f[name]
        feats = g["features"]
        ids, symbols = _strings(feats, "id", path), _strings(feats, "name", path)
        keep = np.ones(len(ids), dtype=bool)
        if gex_only and "feature_type" in feats:
            keep &= np.array([t == _GEX for t in _strings(feats, "feature_type", path)])
        if genome is not None:
            genomes = _strings(feats, "genome", path) if "genome" in feats else ()
            if genome not in set(genomes):
                raise param_error("genome", _FUNC, f"None or a genome of the file: {sorted(set(genomes))}", genome)
            keep &= np.array([x == genome for x in genomes])
    else:  # Cell Ranger 2: one group per genome
        genomes = sorted(k for k in f.keys() if is_matrix(f[k]) and "genes" in f[k])
        if not genomes:
            raise InputError(f"The file {path!r} passed to {_FUNC} is not a 10x Genomics .h5 matrix: expected a "
                             f"'matrix' group (Cell Ranger ≥ 3) or a group per genome with data, indices, indptr, "
                             f"shape, barcodes and genes (Cell Ranger 2); found {sorted(f.keys())}.")
        if genome is None and len(genomes) > 1:
            raise param_error("genome", _FUNC, f"one of the file's genomes {genomes}", genome)
        if genome is not None and genome not in genomes:
            raise param_error("genome", _FUNC, f"None or a genome of the file: {genomes}", genome)
        name = genome or genomes[0]
        g = f[name]
        ids, symbols = _strings(g, "genes", path), _strings(g, "gene_names", path)
        keep = np.ones(len(ids), dtype=bool)
    shape = tuple(int(s) for s in np.asarray(g["shape"][()]).ravel())
    barcodes = _strings(g, "barcodes", path)
    if len(shape) != 2 or len(ids) != shape[0] or len(symbols) != shape[0] or len(barcodes) != shape[1]:
        raise InputError(f"The 10x .h5 file {path!r} is inconsistent: its matrix has shape {shape} (features × "
                         f"barcodes) but it lists {len(ids)} features and {len(barcodes)} barcodes.")
    if not keep.any():
        raise InputError(f"The 10x .h5 file {path!r} has no features left to read ('{_GEX}' only: "
                         f"{gex_only}, genome: {genome!r}); pass gex_only=False to read all features.")
    names = make_unique(np.asarray(symbols if var_names == "gene_symbols" else ids, dtype=object)[keep])
    row_map = None
    if not keep.all():
        row_map = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
    return h5_sparse_blocked(os.path.abspath(path), g, name, shape, block_nnz, dtype, names=(names, barcodes),
                             row_map=row_map)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def read_10x(path, *, var_names: str = "gene_symbols", gex_only: bool = True, genome: str | None = None,
             block_nnz: int = 1_000_000, dtype: Any = None) -> BlockedMatrix:
    """Read a 10x Genomics Cell Ranger matrix (folder or ``.h5``) as genes × cells.

    :func:`dnmf.io.as_blocked` (and so :func:`dnmf.nmf`) reads these paths with the defaults;
    call this function for the other options and pass its result on.

    Parameters
    ----------
    path : str or os.PathLike
        A matrix folder (holding ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``,
        ``barcodes.tsv[.gz]``) or a ``.h5`` file (Cell Ranger 2 or ≥ 3).
    var_names : {"gene_symbols", "gene_ids"}, default "gene_symbols"
        Name rows by gene symbol or by feature id; names are made unique (see the module notes).
    gex_only : bool, default True
        Keep only the "Gene Expression" features (files with a feature type; Cell Ranger 2 files
        have genes only).
    genome : str, optional
        Keep the features of this genome (multi-genome references); required for a Cell Ranger 2
        file with several genomes.
    block_nnz : int, default 1_000_000
        Target stored entries per column block.
    dtype : {None, float32, float64}, optional
        Value dtype; the integer counts become float64 by default.

    Returns
    -------
    BlockedMatrix
        Genes × cells, ``row_names`` the genes and ``col_names`` the barcodes. An ``.h5`` file is
        read lazily (``in_memory`` False): only ``indptr`` is read here, each block on ``load()``.

    Raises
    ------
    InputError
        A missing or unreadable file, an inconsistent folder (the matrix and the tables differ in
        size), a file that is not a 10x matrix, a bad parameter.

    Examples
    --------
    >>> import dnmf
    >>> A = dnmf.io.read_10x("filtered_feature_bc_matrix.h5", var_names="gene_ids")  # doctest: +SKIP
    >>> model = dnmf.nmf(A, 10)  # doctest: +SKIP
    >>> model.top_features(n=20)  # doctest: +SKIP
    """
    var_names = check_option(var_names, "var_names", _FUNC, VAR_NAMES)
    if not isinstance(gex_only, (bool, np.bool_)):
        raise param_error("gex_only", _FUNC, "a bool", gex_only)
    if genome is not None and not isinstance(genome, str):
        raise param_error("genome", _FUNC, "None or a str", genome)
    block_nnz = check_int(block_nnz, "block_nnz", _FUNC, low=1)
    path = os.path.expanduser(os.fspath(path))
    if is_10x_folder(path):
        if genome is not None:
            raise param_error("genome", _FUNC, "None for a 10x folder", genome)
        return _read_folder(path, var_names, bool(gex_only), block_nnz, dtype)
    if os.path.isfile(path):
        return _read_h5(path, var_names, bool(gex_only), genome, block_nnz, dtype)
    raise InputError(f"The path passed to {_FUNC} must be a 10x matrix folder (holding matrix.mtx[.gz]) or a .h5 "
                     f"file; got {path!r}, which {'is a folder without matrix.mtx' if os.path.isdir(path) else 'does not exist'}.")
