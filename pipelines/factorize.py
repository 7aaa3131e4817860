"""NMF of one matrix (A ≈ W·diag(d)·H) on the job's cluster, with checkpoints and plots.

Config sections::

    input:                     # exactly one source
      dataset: pbmc3k          #   a bundled data set (dnmf.datasets.load_<name>)
      path: data/counts.h5ad   #   or a file / store: .mtx[.gz], .npz, .npy, .h5ad, .zarr
      layer: counts            #   AnnData layer (default X)
      synthetic: {m: 20000, n: 100000, density: 0.01, k: 10, seed: 0}
                               #   or a planted sparse matrix, generated into `path` if missing
      normalize: none          # none (default): factorize the values as stored (raw counts);
                               # log1p: log(1 + x); cp10k_log1p: scale each sample (column) to
                               # 10,000 in total, then log(1 + x) (scanpy's normalize_total
                               # with target_sum=1e4 followed by log1p)
      n_top_features: null     # or keep the n features (rows) of highest score after
                               # normalize (dnmf.preprocess.select_features)
      feature_flavor: variance # score of that selection: variance (default), or seurat:
                               # scanpy's flavor="seurat" normalized dispersion
    model: {k: 10, tol: 1e-4, maxit: 100, seed: null, L1: [0, 0], L2: [0, 0], norm: L1, ...}

``model`` is declared once, in :data:`dnmf.params.NMF_PARAMS` (with :func:`dnmf.nmf`'s
defaults, ranges and doc lines; ``init: random`` is nmf's None, ``out_of_core: auto`` its None):
``seed: null`` draws fresh entropy (recorded in the run), ``block_nnz: null`` lets the library
choose the blocking from the data (:func:`dnmf.core.default_block_nnz`).

``input.normalize`` and ``input.n_top_features`` are :func:`dnmf.preprocess.recipe`: they run
block by block on the column blocks, as each block is loaded: sparse blocks stay sparse
(log1p(0) = 0, so the stored pattern is kept), nothing is densified and the matrix is never held
whole. A sample whose values sum to 0 stays all zero. Feature selection reads the normalized
matrix once more (one pass of block sums, as tasks on the cluster, for the per-feature variance
or, with ``input.feature_flavor: seurat``, scanpy's normalized dispersion).

Outputs: ``model/`` (w, d, h, loss_history, tol_history, row_names, col_names, the coordinate
arrays feature, sample and factor, and the fit record; every array carries Zarr v3
``dimension_names`` — w: (feature, factor), h: (factor, sample), d: (factor,) — so
``xarray.open_zarr(store, group="model")`` opens it as a Dataset; ``n_top_features`` is -1 when all features were kept), ``<run>-top-features.csv``
(:meth:`dnmf.NMFModel.top_features` with ``n = output.top_features``, 20 by default: factor,
rank, feature name, weight, specificity), ``<run>-convergence.png``, ``<run>-factors.png`` (W on
each factor's top features, rows labelled by feature name), ``<run>-top-features.png`` (a bar
chart of each factor's top features by name) and, for AnnData inputs, an AnnData
copy with ``obsm["X_nmf"]``, ``varm["NMF_W"]``, ``uns["nmf"]`` (annotations only; X stays in
the input; ``uns["nmf"]["params"]`` holds the fit's parameters, as scanpy's
``uns["pca"]["params"]``). A store written by ``dnmf convert`` from an ``.h5ad`` carries the
cell and gene names, so its AnnData copy has them as ``obs_names`` / ``var_names``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

import dnmf
import dnmf.anndata
import dnmf.datasets
import dnmf.io
import dnmf.params
import dnmf.preprocess
from dnmf.core import default_block_nnz

#: Bytes per stored entry of a block at the very least (float32 values).
MIN_BYTES_PER_ENTRY = 4

MATRIX_SUFFIXES = (".mtx", ".mtx.gz", ".npz", ".npy", ".h5ad", ".zarr")

#: ``input.normalize`` choices (see the module docstring; implemented in :mod:`dnmf.preprocess`).
NORMALIZATIONS = dnmf.preprocess.NORMALIZATIONS

def _meta(doc: str, **kw) -> dict:
    return {"doc": doc, **kw}


#: Dimension names (Zarr v3 ``dimension_names``) of the arrays of the run store's ``model/`` group.
MODEL_DIMS = {
    "w": ("feature", "factor"), "d": ("factor",), "h": ("factor", "sample"),
    "loss_history": ("iteration",), "tol_history": ("iteration",),
    "row_names": ("feature",), "col_names": ("sample",),
    "feature": ("feature",), "sample": ("sample",), "factor": ("factor",),
}

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
    normalize: Literal["none", "log1p", "cp10k_log1p"] = field(default="none", metadata=_meta(
        "transform before the fit: none (values as stored, e.g. raw counts), log1p, or cp10k_log1p "
        "(each sample scaled to 10,000 in total, then log1p)"))
    n_top_features: int | None = field(default=None, metadata=_meta(
        "keep this many features (rows) of highest score (feature_flavor) after normalize (null: all); "
        "see dnmf.preprocess.select_features", min=1))
    feature_flavor: Literal["variance", "seurat"] = field(default="variance", metadata=_meta(
        "score of that selection: variance, or seurat (scanpy's flavor='seurat' normalized dispersion "
        "in 20 bins of mean expression; expects log-transformed data)"))

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


def _min_worker_memory(self) -> tuple[int, str]:
    """Memory one block needs at the very least (the config rejects smaller worker limits)."""
    if self.block_nnz is None:
        # the library's default for a matrix of unknown size is its lower bound
        least = default_block_nnz(None)
        return (least * MIN_BYTES_PER_ENTRY,
                f"model.block_nnz = null: the library's default is at least {least} stored entries "
                f"× {MIN_BYTES_PER_ENTRY} bytes; set a smaller model.block_nnz or raise the limit")
    return (self.block_nnz * MIN_BYTES_PER_ENTRY,
            f"model.block_nnz = {self.block_nnz} stored entries × {MIN_BYTES_PER_ENTRY} bytes at least; "
            "lower model.block_nnz or raise the limit")


#: ``model:`` of the factorize pipeline: the YAML parameters of :data:`dnmf.params.NMF_PARAMS`
#: (names, types, ranges, defaults and doc lines declared once there, shared with ``nmf``).
FactorizeModel = dnmf.params.config_section(
    dnmf.params.NMF_PARAMS, "FactorizeModel", module=__name__,
    doc="``model:`` of the factorize pipeline (the arguments of :func:`dnmf.nmf`, with its defaults).",
    namespace={"min_worker_memory": _min_worker_memory})


SECTIONS = {"input": FactorizeInput, "model": FactorizeModel}


def check_config(config) -> Iterator[tuple[str, str, Any]]:
    """Checks across sections: the rank must not exceed the input's smaller dimension."""
    yield from check_ranks(config.input, "model.k", config.model.k)


def check_ranks(inp: "FactorizeInput", key: str, ks) -> Iterator[tuple[str, str, Any]]:
    """The rank(s) ``ks`` (an int or a list) at most min(m, n) of the input as preprocessed
    (after ``n_top_features``); the input must be readable. ``key`` names the config key."""
    try:
        shape = input_shape(inp)
    except (OSError, ValueError, KeyError) as e:
        yield ("input.path", "a readable matrix file or store", inp.path, f"({type(e).__name__}: {_first_line(e)})")
        return
    if shape is not None and inp.n_top_features is not None:
        shape = (min(shape[0], inp.n_top_features), shape[1])
    many = not isinstance(ks, int)
    if shape is not None and (max(ks) if many else ks) > min(shape):
        m, n = shape
        what = "ranks in" if many else "an int in"
        yield (key, f"{what} [1, {min(shape)}] (at most min(m, n) of the {m} × {n} input)", list(ks) if many else ks)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """The matrix to factorize and, for AnnData inputs, its obs/var tables."""

    data: Any
    obs: Any = None
    var: Any = None


# ---------------------------------------------------------------------------------------------
# The input's shape, read cheaply (headers and metadata only) for `dnmf validate`
# ---------------------------------------------------------------------------------------------


def input_shape(inp: FactorizeInput) -> tuple[int, int] | None:
    """(m, n) = (features, samples) of the input without reading its values (None: unknown).

    Bundled data sets: their ``shape`` entry; synthetic inputs: (m, n); files and stores:
    :func:`dnmf.io.peek_shape`. Raises OSError / ValueError / KeyError when the file cannot be
    read at all.
    """
    if inp.dataset is not None:
        return _dataset_shape(inp.dataset)
    if inp.synthetic is not None:
        return (inp.synthetic.m, inp.synthetic.n)
    if inp.path is None:
        return None
    return dnmf.io.peek_shape(inp.path, inp.layer)


def _dataset_shape(name: str) -> tuple[int, int] | None:
    import importlib.resources

    try:  # the bundled .npz holds a `shape` entry: read it alone
        with importlib.resources.files("dnmf.datasets").joinpath(f"data/{name}.npz").open("rb") as fh:
            with np.load(fh, allow_pickle=False) as f:
                shape = tuple(int(v) for v in f["shape"])
                return shape if len(shape) == 2 else None
    except (OSError, KeyError, ValueError):
        return tuple(getattr(dnmf.datasets, f"load_{name}")().shape)


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


def load_input(inp: FactorizeInput, job, block_nnz: int | None = None) -> _Loaded:
    """The matrix named by ``input:`` (plus obs/var for AnnData inputs), preprocessed as ``input:`` says.

    ``normalize`` and ``n_top_features`` are :func:`dnmf.preprocess.recipe`, blocked as
    :func:`dnmf.nmf` would block the raw input (``block_nnz`` or the library's default).
    """
    loaded = _load_raw(inp, job, block_nnz)
    if inp.normalize == "none" and inp.n_top_features is None:
        return loaded
    steps = [] if inp.normalize == "none" else [f"{inp.normalize} normalization"]
    if inp.n_top_features is not None:
        score = "variance" if inp.feature_flavor == "variance" else "normalized dispersion (seurat)"
        steps.append(f"the {inp.n_top_features} features of highest {score}")
    job.echo(f"input: {' then '.join(steps)}, block by block")
    data = dnmf.preprocess.recipe(loaded.data, inp.normalize, inp.n_top_features, feature_flavor=inp.feature_flavor,
                                  block_nnz=block_nnz or default_block_nnz(loaded.data), client=job.client)
    obs, var = loaded.obs, loaded.var
    if var is not None and data.shape[0] != len(var):  # features selected: var follows by name
        keep = (var.index.astype(str).get_indexer(list(data.row_names)) if data.row_names is not None
                else np.full(data.shape[0], -1))
        if (keep >= 0).all():
            var = var.iloc[keep]
        else:  # names that do not match var's index: no AnnData copy rather than a wrong one
            obs, var = None, None
    return _Loaded(data, obs, var)


def _load_raw(inp: FactorizeInput, job, block_nnz: int | None = None) -> _Loaded:
    if inp.dataset is not None:
        data = getattr(dnmf.datasets, f"load_{inp.dataset}")()
        if isinstance(data, dnmf.datasets.Dataset):
            # X is features × samples already; obs annotates samples (AnnData's cells), var features.
            if inp.layer is not None:
                raise dnmf.InputError(f"The bundled data set {inp.dataset!r} has no layers (only X). "
                                      f"Got input.layer = {inp.layer!r} instead; remove input.layer.")
            # names travel with the matrix (into the model's feature/sample names and the outputs)
            blocked = dnmf.io.as_blocked(data.X, block_nnz=block_nnz or default_block_nnz(data.X))
            blocked = dataclasses.replace(blocked, row_names=tuple(str(v) for v in data.var.index),
                                          col_names=tuple(str(v) for v in data.obs.index))
            return _Loaded(blocked, data.obs, data.var)
        if hasattr(data, "obs") and hasattr(data, "var"):
            if inp.layer is not None:
                return _Loaded(dnmf.io.as_blocked(data, layer=inp.layer), data.obs, data.var)
            return _Loaded(data, data.obs, data.var)
        return _Loaded(data)
    path = os.path.expanduser(inp.path)
    if inp.synthetic is not None:
        _ensure_synthetic(inp.synthetic, path, job)
        return _Loaded(path)
    ann = dnmf.anndata.read_annotations(path) if path.lower().endswith((".h5ad", ".zarr")) else None
    if inp.layer is not None:
        data = dnmf.io.as_blocked(path, layer=inp.layer)
    elif ann is None and path.lower().endswith(".zarr"):
        # a store written by `dnmf convert` keeps its blocking and carries the names of its source
        # (an .h5ad's var_names and obs_names): they become the AnnData copy's var and obs
        data = dnmf.io.as_blocked(path)
        if data.row_names is not None and data.col_names is not None:
            import pandas as pd

            ann = (pd.DataFrame(index=pd.Index(data.col_names, dtype=object)),
                   pd.DataFrame(index=pd.Index(data.row_names, dtype=object)))
    else:
        data = path
    return _Loaded(data, *(ann or (None, None)))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _seed(cfg: FactorizeModel, job):
    """``model.seed``, or for ``seed: null`` fresh entropy drawn once per run and kept in the store.

    A resumed run reuses the recorded entropy, so its start matches the checkpoint's.
    """
    if cfg.seed is not None:
        return cfg.seed
    if job.resume:
        entropy = (job.store.meta.get("seeds") or {}).get("nmf_entropy")
        if entropy is not None:
            return np.random.SeedSequence(int(entropy))
    seq = np.random.SeedSequence()
    job.add_seeds(nmf=None, nmf_entropy=str(seq.entropy))
    return seq


def _fit(A, cfg: FactorizeModel, job):
    seed = _seed(cfg, job)
    start = job.store.checkpoint_iteration("nmf") if job.resume else None
    bar = job.progress("fit", cfg.maxit, initial=start or 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dnmf.ConvergenceWarning)
        model = dnmf.nmf(
            A, **{**dnmf.params.config_kwargs(dnmf.params.NMF_PARAMS, cfg), "seed": seed},
            client=job.client, checkpoint=job.checkpoint_path("nmf"), checkpoint_every=job.checkpoint_every,
            resume=job.resume, on_iteration=job.iteration_callback(bar),
        )
    misc = model.misc
    bar.close(f"loss {misc['loss']:.6g}, {'converged' if misc['converged'] else 'not converged'}")
    for w in caught:
        if issubclass(w.category, dnmf.ConvergenceWarning):
            job.echo(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _model_record(model, cfg: FactorizeModel, normalize: str = "none") -> dict:
    misc = model.misc
    m, n, k = model.shape
    return {
        "w": model.w, "d": model.d, "h": model.h,
        "loss_history": np.asarray(misc["loss_history"], dtype=float),
        "tol_history": np.asarray(misc["tol_history"], dtype=float),
        "shape": [m, n], "k": k, "normalize": normalize, "iter": int(misc["iter"]), "loss": float(misc["loss"]),
        "converged": bool(misc["converged"]), "runtime": float(misc["runtime"]), "seed": misc["seed"],
        "solver": misc["solver"], "norm": misc["norm"], "init": str(misc["init"]), "n_blocks": int(misc["n_blocks"]),
        "out_of_core": bool(misc["out_of_core"]), "executor": misc["executor"],
        "L1": list(misc["L1"]), "L2": list(misc["L2"]), "nonneg": list(misc["nonneg"]),
        "L21": list(misc["L21"]), "angular": list(misc["angular"]), "upper_bound": list(misc["upper_bound"]),
        "graph_lambda": list(misc["graph_lambda"]),
        "loss_type": str(misc["loss_type"]), "loss_covers": str(misc["loss_covers"]),
        **_dispersion_record(misc["dispersion"]),
        **({} if misc["zi_pi"] is None else {"zi_pi": np.asarray(misc["zi_pi"], dtype=float),
                                             "zi_pi_history": np.asarray(misc["zi_pi_history"], dtype=float)}),
    }


def _dispersion_record(dispersion) -> dict:
    """The fitted dispersion (θ, r or φ of a gp / nb / gamma / inverse_gaussian / tweedie fit): a
    per-feature or per-sample array, a global number, or nothing (mse, kl, dispersion "none")."""
    if dispersion is None:
        return {}
    arr = np.asarray(dispersion, dtype=float)
    return {"dispersion": float(arr) if arr.ndim == 0 else arr}


def _write_anndata(loaded: _Loaded, model, job) -> None:
    fmt = job.config.output.anndata
    if fmt == "none" or loaded.obs is None:
        return
    import anndata  # only when an AnnData copy is written

    adata = anndata.AnnData(obs=loaded.obs.copy(), var=loaded.var.copy())
    adata.obsm["X_nmf"] = np.ascontiguousarray((model.h * model.d[:, None]).T)
    adata.varm["NMF_W"] = np.ascontiguousarray(model.w)
    inp = job.config.input
    record = dnmf.anndata.uns_record(model, layer=inp.layer, normalize=inp.normalize,
                                     n_top_features=inp.n_top_features, maxit=int(job.config.model.maxit),
                                     tol=float(job.config.model.tol))
    record["normalize"] = inp.normalize
    adata.uns["nmf"] = record
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
    loaded = load_input(config.input, job, cfg.block_nnz)
    model = _fit(loaded.data, cfg, job)
    job.add_seeds(nmf=cfg.seed, nmf_entropy=str(model.misc["seed_entropy"]))
    record = _model_record(model, cfg, config.input.normalize)
    record["n_top_features"] = -1 if config.input.n_top_features is None else int(config.input.n_top_features)
    m, n, k = model.shape
    rows, cols = model.feature_names, model.sample_names
    if rows is not None:
        record["row_names"] = np.asarray([str(r) for r in rows])
    if cols is not None:
        record["col_names"] = np.asarray([str(c) for c in cols])
    # coordinates: names where the input had them, else positions; with MODEL_DIMS the group opens
    # as an xarray.Dataset (xarray.open_zarr(store, group="model"))
    record["feature"] = record["row_names"] if rows is not None else np.arange(m)
    record["sample"] = record["col_names"] if cols is not None else np.arange(n)
    record["factor"] = np.arange(k)
    dims = dict(MODEL_DIMS)
    disp = record.get("dispersion")
    if isinstance(disp, np.ndarray):  # per_row: one per feature, per_col: one per sample
        dims["dispersion"] = ("feature",) if cfg.dispersion == "per_row" else ("sample",)
    if "zi_pi" in record:  # zero-inflation: π per feature (zi "row") or per sample ("col")
        dims["zi_pi"] = ("feature",) if cfg.zi == "row" else ("sample",)
        dims["zi_pi_history"] = ("iteration",)
    job.store.write_group("model", record, dims=dims)
    job.save_figure(job.plots.convergence(record["loss_history"], tol=record["tol_history"],
                                          title=f"{config.name}: NMF k={model.k}"), "convergence")
    job.save_figure(job.plots.factor_heatmap(model.w, row_names=model.feature_names,
                                             title=f"{config.name}: top features of W"), "factors")
    top = model.top_features(config.output.top_features)
    top_path = job.output_path("top-features.csv")
    top.to_csv(top_path, index=False)
    job.add_file(top_path)
    job.save_figure(job.plots.top_features(top, title=f"{config.name}: top {config.output.top_features} "
                                                      "features per factor (share of the factor)"), "top-features")
    _write_anndata(loaded, model, job)
