"""Regenerate the packaged copies of pbmc3k, hawaiibirds and aml from the shared data folder.

Run ``python -m dnmf.datasets._build /work/shared/data`` (the folder holding ``pbmc3k/``,
``hawaiibirds/``, ``aml/``). Each data set becomes one ``dnmf/datasets/data/<name>.npz``
(``numpy.savez_compressed``, readable without pickle) with keys

* ``format`` ("csc" or "dense"), ``shape``; for CSC ``data``, ``indices``, ``indptr`` (sorted
  row indices); for dense ``X``;
* ``obs_index`` / ``var_index`` (column / row names) when the source has names;
* ``obs__<column>`` / ``var__<column>`` for each metadata column of ``cols.csv`` / ``rows.csv``.

pbmc3k stores its integer counts as uint16 with int16 row indices (values ≤ 419, rows < 13714:
both exact), which keeps the file under 4 MB; the other two keep float64 values bit for bit.

Gene names of pbmc3k: RcppML's export in the shared folder has none (its ``rows.csv`` holds only
the 1-based ``index``; ``meta.json``: "no gene names stored"), so the bundled copy has none and
:func:`dnmf.datasets.load_pbmc3k` names the genes ``gene1…``. When ``rows.csv`` gains a name
column (:data:`NAME_COLUMNS`), rebuilding stores it as ``var_index`` and the loader uses it; the
matrix arrays do not change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Columns of a ``rows.csv`` / ``cols.csv`` taken as the names (index), first found first.
NAME_COLUMNS = ("name", "symbol", "gene_symbol", "gene", "feature_name")


def _metadata(frame, prefix: str, index_col: str | None, drop: tuple[str, ...]) -> dict:
    out = {}
    if index_col is not None:
        out[f"{prefix}_index"] = frame[index_col].astype(str).to_numpy().astype(np.str_)
    for col in frame.columns:
        if col in drop or col == index_col:
            continue
        values = frame[col].to_numpy()
        out[f"{prefix}__{col}"] = values.astype(np.str_) if values.dtype == object else values
    return out


def _csc(path: Path):
    import scipy.io
    import scipy.sparse as sp

    A = sp.csc_array(scipy.io.mmread(path))
    A.sum_duplicates()
    A.sort_indices()
    return A


def _name_column(frame) -> str | None:
    return next((c for c in NAME_COLUMNS if c in frame.columns), None)


def build_pbmc3k(src: Path, out_dir: Path = DATA_DIR) -> Path:
    import pandas as pd

    A = _csc(src / "matrix.mtx.gz")
    data = A.data.astype(np.uint16)
    indices = A.indices.astype(np.int16)
    if not (np.array_equal(data, A.data) and np.array_equal(indices, A.indices)):
        raise ValueError("pbmc3k does not fit uint16 values / int16 row indices")
    rows, cols = pd.read_csv(src / "rows.csv"), pd.read_csv(src / "cols.csv")
    if len(rows) != A.shape[0] or len(cols) != A.shape[1]:
        raise ValueError(f"pbmc3k: rows.csv has {len(rows)} lines and cols.csv {len(cols)}; "
                         f"expected {A.shape[0]} and {A.shape[1]} (the matrix's shape)")
    out = Path(out_dir) / "pbmc3k.npz"
    np.savez_compressed(out, format=np.str_("csc"), shape=np.array(A.shape, dtype=np.int64), data=data,
                        indices=indices, indptr=A.indptr.astype(np.int32),
                        **_metadata(rows, "var", _name_column(rows), ("index",)),
                        **_metadata(cols, "obs", None, ("index",)))
    return out


def build_hawaiibirds(src: Path) -> Path:
    import pandas as pd

    A = _csc(src / "matrix.mtx")
    rows, cols = pd.read_csv(src / "rows.csv"), pd.read_csv(src / "cols.csv")
    out = DATA_DIR / "hawaiibirds.npz"
    # `species` and `grid` repeat `name` (the R dimnames) and become the index.
    np.savez_compressed(out, format=np.str_("csc"), shape=np.array(A.shape, dtype=np.int64),
                        data=A.data.astype(np.float64), indices=A.indices.astype(np.int32),
                        indptr=A.indptr.astype(np.int32),
                        **_metadata(rows, "var", "name", ("index", "species")),
                        **_metadata(cols, "obs", "name", ("index", "grid")))
    return out


def build_aml(src: Path) -> Path:
    import pandas as pd

    X = np.loadtxt(src / "matrix.csv", delimiter=",", dtype=np.float64)
    rows, cols = pd.read_csv(src / "rows.csv"), pd.read_csv(src / "cols.csv")
    out = DATA_DIR / "aml.npz"
    # cols.csv's `name` is the R colname, which is the (non-unique) category; `samples` is unique.
    np.savez_compressed(out, format=np.str_("dense"), shape=np.array(X.shape, dtype=np.int64), X=X,
                        **_metadata(rows, "var", "name", ("index",)),
                        **_metadata(cols, "obs", "samples", ("index", "name")))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m dnmf.datasets._build SHARED_DATA_DIR")
    src = Path(argv[0])
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for build, name in ((build_pbmc3k, "pbmc3k"), (build_hawaiibirds, "hawaiibirds"), (build_aml, "aml")):
        path = build(src / name)
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
