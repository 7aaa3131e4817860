"""NMF of one matrix (A ≈ W·diag(d)·H) on the job's cluster, with checkpoints and plots.

Config sections::

    input:                     # exactly one source
      dataset: pbmc3k          #   a bundled data set (dnmf.datasets.load_<name>)
      path: data/counts.h5ad   #   or a file / store: .mtx[.gz], .npz, .npy, .h5ad, .zarr
      layer: counts            #   AnnData layer (default X)
      synthetic: {m: 20000, n: 100000, density: 0.01, k: 10, seed: 0}
                               #   or a planted sparse matrix, generated into `path` if missing
    model: {k: 10, tol: 1e-4, maxit: 100, seed: 1, L1: [0, 0], L2: [0, 0], norm: L1, ...}

Outputs: ``model/`` (w, d, h, loss_history, tol_history, row_names, col_names and the fit
record), ``<run>-convergence.png``, ``<run>-factors.png`` and, for AnnData inputs, an AnnData
copy with ``obsm["X_nmf"]``, ``varm["NMF_W"]``, ``uns["nmf"]`` (annotations only; X stays in
the input).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

import dnmf
import dnmf.datasets
import dnmf.io

#: Bytes per stored entry of a block at the very least (float32 values).
MIN_BYTES_PER_ENTRY = 4

MATRIX_SUFFIXES = (".mtx", ".mtx.gz", ".npz", ".npy", ".h5ad", ".zarr")


def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


#: Bundled data sets that are not one matrix (Orthodont is NMF-RE's Y and A).
NOT_MATRICES = ("orthodont",)


def dataset_names() -> list[str]:
    """Bundled matrices a config can name: ``dnmf.datasets.load_<name>`` loaders."""
    return sorted(n[len("load_"):] for n in dir(dnmf.datasets)
                  if n.startswith("load_") and callable(getattr(dnmf.datasets, n))
                  and n[len("load_"):] not in NOT_MATRICES)


@dataclass(frozen=True)
class SyntheticInput:
    """A sparse m × n matrix with a planted rank-k structure, written as an nnz-balanced Zarr store."""

    m: int = field(metadata=_meta("features (rows)", min=1))
    n: int = field(metadata=_meta("samples (columns)", min=1))
    density: float = field(metadata=_meta("fraction of stored entries", min=0.0, min_open=True, max=1.0))
    k: int = field(default=10, metadata=_meta("planted rank", min=1))
    noise: float = field(default=0.1, metadata=_meta("relative noise on the stored entries", min=0.0))
    seed: int = field(default=0, metadata=_meta("seed of the generator", min=0))
    block_nnz: int = field(default=1_000_000, metadata=_meta("stored entries per column block of the store", min=1))


@dataclass(frozen=True)
class FactorizeInput:
    """``input:`` of the factorize pipeline."""

    dataset: str | None = field(default=None, metadata=_meta("bundled data set"))
    path: str | None = field(default=None, metadata=_meta(
        "matrix file or store (features × samples; AnnData is cells × genes)"))
    layer: str | None = field(default=None, metadata=_meta("AnnData layer to factorize (default X)"))
    synthetic: SyntheticInput | None = field(default=None, metadata=_meta(
        "generate a planted sparse matrix into `path` when it does not exist"))

    def validate(self) -> Iterator[tuple[str, str, Any]]:
        sources = {s: getattr(self, s) for s in ("dataset", "path", "synthetic") if getattr(self, s) is not None}
        if self.dataset is not None:
            names = dataset_names()
            if self.dataset not in names:
                yield ("dataset", "one of " + ", ".join(repr(n) for n in names), self.dataset)
            if len(sources) > 1:
                yield ("", "a mapping with exactly one of 'dataset', 'path' or 'synthetic' (with 'path')",
                       {k: v for k, v in sources.items() if k != "synthetic"})
        elif self.synthetic is not None:
            if self.path is None:
                yield ("path", "the Zarr store to generate the synthetic matrix into (e.g. 'runs/synthetic.zarr')",
                       None)
            elif not self.path.endswith(".zarr"):
                yield ("path", "a path ending in '.zarr' (the generated store)", self.path)
        elif self.path is not None:
            if not Path(os.path.expanduser(self.path)).exists():
                yield ("path", "an existing file or directory", self.path)
            elif not self.path.lower().endswith(MATRIX_SUFFIXES):
                yield ("path", "a matrix file or store ending in " + ", ".join(MATRIX_SUFFIXES), self.path)
        else:
            yield ("", "a mapping with exactly one of 'dataset', 'path' or 'synthetic' (with 'path')", {})


@dataclass(frozen=True)
class FactorizeModel:
    """``model:`` of the factorize pipeline (the arguments of :func:`dnmf.nmf`)."""

    k: int = field(metadata=_meta("rank", min=1))
    tol: float = field(default=1e-4, metadata=_meta("relative loss change that stops the fit", min=0.0))
    maxit: int = field(default=100, metadata=_meta("maximum iterations", min=1))
    seed: int = field(default=1, metadata=_meta("seed of the initialization", min=0))
    L1: tuple[float, float] = field(default=(0.0, 0.0), metadata=_meta("lasso penalty (W side, H side)",
                                                                        min=0.0, pair=True))
    L2: tuple[float, float] = field(default=(0.0, 0.0), metadata=_meta("ridge penalty (W side, H side)",
                                                                        min=0.0, pair=True))
    nonneg: tuple[bool, bool] = field(default=(True, True), metadata=_meta("non-negativity of (W, H)", pair=True))
    norm: Literal["L1", "L2", "none"] = field(default="L1", metadata=_meta("norm of W's columns and H's rows"))
    sort_model: bool = field(default=True, metadata=_meta("sort factors by decreasing d"))
    init: Literal["random", "svd", "lanczos", "irlba", "randomized"] = field(
        default="random", metadata=_meta("initial W"))
    solver: Literal["auto", "cholesky", "cd", "exact"] = field(default="auto", metadata=_meta("NNLS solver"))
    patience: int = field(default=5, metadata=_meta("iterations below tol needed to stop", min=1))
    block_nnz: int = field(default=1_000_000, metadata=_meta("target stored entries per column block", min=1))
    out_of_core: Literal["auto"] | bool = field(default="auto", metadata=_meta(
        "stream blocks from disk every iteration (auto: when the matrix does not fit the workers)"))

    def min_worker_memory(self) -> tuple[int, str]:
        """Memory one block needs at the very least (the config rejects smaller worker limits)."""
        return (self.block_nnz * MIN_BYTES_PER_ENTRY,
                f"model.block_nnz = {self.block_nnz} stored entries × {MIN_BYTES_PER_ENTRY} bytes at least; "
                "lower model.block_nnz or raise the limit")


SECTIONS = {"input": FactorizeInput, "model": FactorizeModel}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """The matrix to factorize and, for AnnData inputs, its obs/var tables."""

    data: Any
    obs: Any = None
    var: Any = None


def _anndata_annotations(path: str):
    """obs and var of an .h5ad file or an AnnData Zarr store, without reading X (None otherwise)."""
    import anndata

    read_elem = getattr(getattr(anndata, "io", anndata), "read_elem", None) or anndata.experimental.read_elem
    if path.lower().endswith(".h5ad"):
        import h5py

        with h5py.File(path, "r") as f:
            return read_elem(f["obs"]), read_elem(f["var"])
    import zarr

    try:
        g = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 - not a group: not an AnnData store
        return None
    if g.attrs.get("encoding-type") != "anndata":
        return None
    return read_elem(g["obs"]), read_elem(g["var"])


@dataclass(frozen=True)
class SyntheticBlockSource:
    """Columns ``start:start + n_cols`` of the planted matrix of ``spec``, generated on ``load()``.

    A lazy block source for :class:`dnmf.io.BlockedMatrix`: small and picklable, so a matrix
    larger than memory is generated and written one block at a time.
    """

    spec: SyntheticInput
    start: int
    n_cols: int

    @property
    def per_col(self) -> int:
        return max(1, int(round(self.spec.density * self.spec.m)))

    @property
    def nnz(self) -> int:
        return self.n_cols * self.per_col

    def load(self):
        """The block as a :class:`dnmf.io.CSCBlock` (float32 values, int32 rows, int64 indptr).

        Column j stores ``round(density·m)`` entries at distinct random rows with values
        ``(W h_j)_i · (1 + noise·ε)`` clipped at 0, where W (m × k) and h_j (k) are
        uniform(0, 1): a sparse sample of a rank-k non-negative matrix. W draws from the seed
        sequence ``(seed, spawn_key=(0,))`` and column j from ``(seed, spawn_key=(1, j))``, so the
        matrix depends only on the spec's m, n, density, k, noise and seed — not on the blocks.
        """
        spec, per_col, nj = self.spec, self.per_col, self.n_cols
        W = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,))).uniform(size=(spec.m, spec.k))
        rows = np.empty((nj, per_col), dtype=np.int32)
        vals = np.empty((nj, per_col))
        for c in range(nj):
            rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(1, self.start + c)))
            h = rng.uniform(size=spec.k)
            r = np.sort(rng.choice(spec.m, per_col, replace=False))
            rows[c] = r
            vals[c] = (W[r] @ h) * (1.0 + spec.noise * rng.standard_normal(per_col))
        vals = np.maximum(vals, 0.0).astype(np.float32)
        indptr = np.arange(0, nj * per_col + 1, per_col, dtype=np.int64)
        return dnmf.io.CSCBlock(vals.ravel(), rows.ravel(), indptr, spec.m)


def synthetic_matrix(spec: SyntheticInput):
    """The planted matrix of ``spec`` as a lazy :class:`dnmf.io.BlockedMatrix` (~block_nnz per block)."""
    per_col = max(1, int(round(spec.density * spec.m)))
    cols = max(1, spec.block_nnz // per_col)
    sources = tuple(SyntheticBlockSource(spec, start, min(cols, spec.n - start)) for start in range(0, spec.n, cols))
    return dnmf.io.BlockedMatrix(shape=(spec.m, spec.n), dtype=np.dtype(np.float32), sources=sources, sparse=True,
                                 in_memory=False)


def _ensure_synthetic(spec: SyntheticInput, path: str, job) -> None:
    """Generate the synthetic store at ``path`` unless it exists with the same parameters."""
    import dataclasses

    import zarr

    params = dataclasses.asdict(spec)
    if os.path.exists(path):
        try:
            stored = zarr.open_group(path, mode="r").attrs.get("dnmf_synthetic")
        except Exception:  # noqa: BLE001 - any unreadable store is "not ours"
            stored = None
        if stored != json.loads(json.dumps(params)):
            raise dnmf.InputError(f"The store {path!r} exists but was not generated from input.synthetic = {params} "
                                  f"(it holds {stored}). Remove it or change input.path.")
        job.echo(f"synthetic input: reusing {path}")
        return
    job.echo(f"synthetic input: generating a {spec.m} × {spec.n} matrix (density {spec.density}) into {path}")
    tmp = f"{path}.partial"
    dnmf.io.write_zarr(synthetic_matrix(spec), tmp, block_nnz=spec.block_nnz)
    zarr.open_group(tmp, mode="a").attrs["dnmf_synthetic"] = params
    os.replace(tmp, path)  # the store appears complete or not at all


def load_input(inp: FactorizeInput, job) -> _Loaded:
    """The matrix named by ``input:`` (plus obs/var for AnnData inputs)."""
    if inp.dataset is not None:
        data = getattr(dnmf.datasets, f"load_{inp.dataset}")()
        if isinstance(data, dnmf.datasets.Dataset):
            # X is features × samples already; obs annotates samples (AnnData's cells), var features.
            if inp.layer is not None:
                raise dnmf.InputError(f"The bundled data set {inp.dataset!r} has no layers (only X). "
                                      f"Got input.layer = {inp.layer!r} instead; remove input.layer.")
            return _Loaded(data.X, data.obs, data.var)
        if hasattr(data, "obs") and hasattr(data, "var"):
            if inp.layer is not None:
                return _Loaded(dnmf.io.as_blocked(data, layer=inp.layer), data.obs, data.var)
            return _Loaded(data, data.obs, data.var)
        return _Loaded(data)
    path = os.path.expanduser(inp.path)
    if inp.synthetic is not None:
        _ensure_synthetic(inp.synthetic, path, job)
        return _Loaded(path)
    ann = _anndata_annotations(path) if path.lower().endswith((".h5ad", ".zarr")) else None
    if inp.layer is not None:
        data = dnmf.io.as_blocked(path, layer=inp.layer)
    else:
        data = path
    return _Loaded(data, *(ann or (None, None)))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _fit(A, cfg: FactorizeModel, job):
    start = job.store.checkpoint_iteration("nmf") if job.resume else None
    bar = job.progress("fit", cfg.maxit, initial=start or 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dnmf.ConvergenceWarning)
        model = dnmf.nmf(
            A, cfg.k, tol=cfg.tol, maxit=cfg.maxit, seed=cfg.seed, L1=cfg.L1, L2=cfg.L2, nonneg=cfg.nonneg,
            norm=cfg.norm, sort_model=cfg.sort_model, init=cfg.init, solver=cfg.solver, patience=cfg.patience,
            client=job.client, block_nnz=cfg.block_nnz,
            out_of_core=None if cfg.out_of_core == "auto" else cfg.out_of_core,
            checkpoint=job.checkpoint_path("nmf"), checkpoint_every=job.checkpoint_every, resume=job.resume,
            on_iteration=job.iteration_callback(bar),
        )
    misc = model.misc
    bar.close(f"loss {misc['loss']:.6g}, {'converged' if misc['converged'] else 'not converged'}")
    for w in caught:
        if issubclass(w.category, dnmf.ConvergenceWarning):
            job.echo(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _model_record(model, cfg: FactorizeModel) -> dict:
    misc = model.misc
    m, n, k = model.shape
    return {
        "w": model.w, "d": model.d, "h": model.h,
        "loss_history": np.asarray(misc["loss_history"], dtype=float),
        "tol_history": np.asarray(misc["tol_history"], dtype=float),
        "shape": [m, n], "k": k, "iter": int(misc["iter"]), "loss": float(misc["loss"]),
        "converged": bool(misc["converged"]), "runtime": float(misc["runtime"]), "seed": misc["seed"],
        "solver": misc["solver"], "norm": misc["norm"], "init": str(misc["init"]), "n_blocks": int(misc["n_blocks"]),
        "out_of_core": bool(misc["out_of_core"]), "executor": misc["executor"],
        "L1": list(misc["L1"]), "L2": list(misc["L2"]), "nonneg": list(misc["nonneg"]),
    }


def _write_anndata(loaded: _Loaded, model, job) -> None:
    import anndata

    fmt = job.config.output.anndata
    if fmt == "none" or loaded.obs is None:
        return
    misc = model.misc
    adata = anndata.AnnData(obs=loaded.obs.copy(), var=loaded.var.copy())
    adata.obsm["X_nmf"] = np.ascontiguousarray((model.h * model.d[:, None]).T)
    adata.varm["NMF_W"] = np.ascontiguousarray(model.w)
    adata.uns["nmf"] = {
        "d": np.asarray(model.d), "k": int(model.k), "layer": job.config.input.layer or "X",
        "iter": int(misc["iter"]), "loss": float(misc["loss"]), "loss_history": np.asarray(misc["loss_history"]),
        "converged": bool(misc["converged"]), "solver": misc["solver"], "norm": misc["norm"],
        "seed": -1 if misc["seed"] is None else int(misc["seed"]),
        "L1": np.asarray(misc["L1"]), "L2": np.asarray(misc["L2"]),
    }
    if fmt == "h5ad":
        path = job.output_path("anndata.h5ad")
        adata.write_h5ad(path)
    else:
        path = job.output_path("anndata.zarr")
        adata.write_zarr(path)
    job.add_file(path)


def run(config, job) -> None:
    """Fit ``dnmf.nmf`` on the input and write the model, plots and AnnData copy."""
    cfg: FactorizeModel = config.model
    loaded = load_input(config.input, job)
    model = _fit(loaded.data, cfg, job)
    job.add_seeds(nmf=cfg.seed, nmf_entropy=str(model.misc["seed_entropy"]))
    record = _model_record(model, cfg)
    rows, cols = model.misc.get("row_names"), model.misc.get("col_names")
    if rows is not None:
        record["row_names"] = np.asarray([str(r) for r in rows])
    if cols is not None:
        record["col_names"] = np.asarray([str(c) for c in cols])
    job.write("model", record)
    job.save_figure(job.plots.convergence(record["loss_history"], tol=record["tol_history"],
                                          title=f"{config.name}: NMF k={model.k}"), "convergence")
    job.save_figure(job.plots.factor_heatmap(model.w, row_names=rows, title=f"{config.name}: top features of W"),
                    "factors")
    _write_anndata(loaded, model, job)
