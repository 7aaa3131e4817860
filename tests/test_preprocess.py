"""dnmf.preprocess against plain NumPy references (scanpy's formulas written out; scanpy is not a dependency)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
import dnmf.preprocess as pp
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


def _plain_cp10k_log1p(A):
    """scanpy's normalize_total(target_sum=1e4) + log1p, written out on a dense genes × cells array."""
    totals = A.sum(axis=0)
    scaled = np.where(totals > 0, A * (1e4 / np.where(totals > 0, totals, 1.0)), 0.0)
    return np.log1p(scaled)


def _counts(dtype=np.float64, seed=3):
    rng = np.random.default_rng(seed)
    keep = np.ones(30, dtype=dtype)
    keep[4] = 0  # an empty sample stays empty
    A = sp.csc_matrix(sp.random(40, 30, density=0.2, random_state=rng, format="csc", dtype=dtype) @ sp.diags(keep))
    A.data = np.ceil(A.data * 20).astype(dtype)  # count-like
    A.eliminate_zeros()
    return A


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_blocks_match_a_plain_numpy_reference(sparse, dtype):
    A = _counts(dtype)
    data = A if sparse else A.toarray()
    dense = A.toarray().astype(np.float64)
    for method, ref in (("log1p", np.log1p(dense)), ("cp10k_log1p", _plain_cp10k_log1p(dense))):
        blocked = pp.recipe(data, method, block_nnz=40)  # several blocks
        assert blocked.n_blocks > 1 and blocked.sparse == sparse and blocked.dtype == dtype
        got = blocked.to_scipy()
        if sparse:
            assert sp.issparse(got) and got.nnz == A.nnz  # the stored pattern is kept: nothing densified
            got = got.toarray()
        assert got.dtype == dtype
        # float32 storage rounds the transformed values: relative 1e-6; float64 is exact to rounding
        np.testing.assert_allclose(got, ref, rtol=1e-6 if dtype == np.float32 else 1e-12)
        assert np.all(got[:, 4] == 0)
    totals = pp.normalize_total(data, 1e4, block_nnz=40).to_scipy()
    totals = np.asarray(totals.sum(axis=0)).ravel()
    np.testing.assert_allclose(totals[totals > 0], 1e4, rtol=1e-5)  # float32 values: 1e-5 relative
    assert pp.recipe(data, "none", block_nnz=40).to_scipy().sum() == pytest.approx(A.sum())


def test_lazy_store_blocks_are_transformed_on_load(tmp_path):
    A = _counts(seed=5)
    names = tuple(f"g{i}" for i in range(A.shape[0]))
    path = dnmf.io.write_zarr(A, str(tmp_path / "a.zarr"), block_nnz=60)
    blocked = pp.recipe(path, "cp10k_log1p", n_top_features=10)
    assert not blocked.in_memory and blocked.n_blocks > 1
    assert all(isinstance(s, pp.TransformedSource) and len(s.transforms) == 3 for s in blocked.sources)
    pickle.loads(pickle.dumps(blocked.sources[0]))  # shipped to workers
    ref = _plain_cp10k_log1p(A.toarray())
    var = ref.var(axis=1, ddof=1)
    keep = np.sort(np.argsort(-var, kind="stable")[:10])
    np.testing.assert_allclose(blocked.to_scipy().toarray(), ref[keep], rtol=1e-12)
    assert blocked.shape == (10, A.shape[1]) and blocked.sparse
    # names follow the selection (a DataFrame's index is a source of names)
    import pandas as pd

    frame = pd.DataFrame(A.toarray(), index=list(names))
    sel = pp.recipe(frame, "cp10k_log1p", n_top_features=10)
    assert sel.row_names == tuple(names[i] for i in keep)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_feature_variances_and_selection_match_numpy(sparse):
    A = _counts(seed=7)
    X = _plain_cp10k_log1p(A.toarray())
    blocked = pp.recipe(A if sparse else A.toarray(), "cp10k_log1p", block_nnz=50)
    mean, var = pp.feature_variances(blocked)
    # one pass of float64 block sums vs NumPy's two-pass formula: equal to 1e-9 relative
    np.testing.assert_allclose(mean, X.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var, X.var(axis=1, ddof=1), rtol=1e-9, atol=1e-12)
    for n_top in (1, 7, 40, 100):
        sel = pp.select_features(blocked, n_top)
        keep = np.sort(np.argsort(-X.var(axis=1, ddof=1), kind="stable")[:n_top])
        assert sel.sparse == sparse and sel.n_blocks == blocked.n_blocks
        got = sel.to_scipy()
        np.testing.assert_allclose(got.toarray() if sparse else got, X[keep], rtol=1e-12)


def test_preprocess_errors():
    A = _counts()
    with pytest.raises(InputError, match="normalize"):
        pp.recipe(A, "zscore")
    with pytest.raises(InputError, match=r"'n_top_features' parameter of select_features must be an int in \[1, inf\)"):
        pp.select_features(A, 0)
    with pytest.raises(InputError, match=r"'target_sum' parameter of normalize_total"):
        pp.normalize_total(A, -1.0)


def test_fit_on_preprocessed_data_keeps_names():
    import anndata
    import pandas as pd

    A = _counts(seed=9)
    adata = anndata.AnnData(X=sp.csr_matrix(A.T), obs=pd.DataFrame(index=[f"c{j}" for j in range(A.shape[1])]),
                            var=pd.DataFrame(index=[f"g{i}" for i in range(A.shape[0])]))
    model = dnmf.nmf(pp.recipe(adata, n_top_features=20), 3, seed=0, maxit=3, tol=0, client=False)
    assert len(model.feature_names) == 20 and model.sample_names == tuple(adata.obs_names)


# ---------------------------------------------------------------------------------------------
# scanpy's flavor="seurat" normalized dispersion
# ---------------------------------------------------------------------------------------------


def _scanpy_seurat_reference(X_log, n_bins=20):
    """scanpy's ``_highly_variable_genes_single_batch(flavor="seurat")`` written out on a dense
    log1p'd genes × cells array, with pandas' ``cut`` and ``groupby`` as scanpy uses them."""
    import pandas as pd

    X = np.expm1(X_log)
    mean, var = X.mean(axis=1), X.var(axis=1, ddof=1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    one_gene_per_bin = stats["dev"].isnull()
    stats.loc[one_gene_per_bin, "dev"] = stats.loc[one_gene_per_bin, "avg"]
    stats.loc[one_gene_per_bin, "avg"] = 0
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - stats["avg"]) / stats["dev"]
    return df, np.asarray(df["mean_bin"].cat.codes)


def _scanpy_top(norm, n_top):
    """scanpy's ``n_top_genes`` rule: every gene scoring at least the n-th highest (NaN never)."""
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    return np.flatnonzero(np.nan_to_num(norm, nan=-np.inf) >= finite[n_top - 1])


def _hvg_counts(seed=11):
    """200 genes × 150 cells of counts with a spread of expression levels, an all-zero gene and one
    very highly expressed gene (alone in its mean bin)."""
    rng = np.random.default_rng(seed)
    level = np.exp(rng.uniform(-3, 1.5, size=200))[:, None]
    A = rng.poisson(level * rng.gamma(2.0, 0.5, size=(200, 150))).astype(np.float64)
    A[7] = 0.0
    A[9] = rng.poisson(400.0, size=150)
    return sp.csc_matrix(A)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_seurat_dispersions_match_scanpys_algorithm(sparse):
    A = _hvg_counts()
    X_log = _plain_cp10k_log1p(A.toarray())
    ref, ref_bins = _scanpy_seurat_reference(X_log)
    assert np.bincount(ref_bins)[ref_bins[9]] == 1  # the one-gene-bin rule is exercised
    blocked = pp.recipe(A if sparse else A.toarray(), "cp10k_log1p", block_nnz=2_000)
    assert blocked.n_blocks > 3 and blocked.sparse == sparse
    got = pp.feature_dispersions(blocked, client=False)
    np.testing.assert_array_equal(got.mean_bin, ref_bins)
    # Block sums in float64 (Σx² − nμ², added in a tree) vs NumPy's two-pass mean and variance:
    # the one-pass formula loses log10(Σx²/(nσ²)) ≤ 3 digits of 16 on these data, so 1e-10 holds
    # with room; the logs and the z-scores (bin deviations ≥ 0.1) keep that accuracy.
    np.testing.assert_allclose(got.means, ref["means"], rtol=1e-10)
    np.testing.assert_allclose(got.dispersions, ref["dispersions"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.dispersions_norm, ref["dispersions_norm"], rtol=1e-10, atol=1e-10)
    assert np.isnan(got.dispersions_norm[7]) and np.isfinite(np.delete(got.dispersions_norm, 7)).all()
    assert got.dispersions_norm[9] == 1.0  # alone in its bin: scanpy's 1
    norm = np.asarray(ref["dispersions_norm"])
    for n_top in (1, 15, 60, 197):
        sel = pp.select_features(blocked, n_top, flavor="seurat", client=False)
        keep = _scanpy_top(norm, n_top)
        assert len(keep) == n_top  # no ties on these data: scanpy keeps exactly n_top too
        assert sel.shape == (n_top, 150) and sel.sparse == sparse
        got_rows = sel.to_scipy()
        np.testing.assert_allclose(got_rows.toarray() if sparse else got_rows, X_log[keep], rtol=1e-12)
    # all the finite scores: the undefined one (the all-zero gene, dispersion 0/1e-12) is left out
    sel = pp.select_features(blocked, 199, flavor="seurat", client=False)
    got_rows = sel.to_scipy()
    np.testing.assert_allclose(got_rows.toarray() if sparse else got_rows, np.delete(X_log, 7, axis=0), rtol=1e-12)


def test_mean_bins_follow_pandas_cut():
    import pandas as pd

    rng = np.random.default_rng(2)
    for x in (rng.normal(size=500), np.r_[0.0, 1.0, np.linspace(0, 1, 21)], np.full(5, 2.5), np.zeros(4)):
        for n_bins in (1, 3, 20):
            np.testing.assert_array_equal(pp._mean_bins(x, n_bins), pd.cut(x, n_bins).codes)


def test_feature_statistics_run_as_block_tasks_on_the_cluster(tmp_path):
    """On a cluster the block sums are tasks on the workers, reading the lazy store there; the
    fixed reduction tree makes them bit for bit those of the thread pool here."""
    distributed = pytest.importorskip("distributed")
    A = _hvg_counts(seed=4)
    path = dnmf.io.write_zarr(A, str(tmp_path / "counts.zarr"), block_nnz=1_500)
    blocked = pp.recipe(path, "cp10k_log1p")
    assert not blocked.in_memory and blocked.n_blocks > 3
    here_var = pp.feature_variances(blocked, client=False)
    here_disp = pp.feature_dispersions(blocked, client=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            var = pp.feature_variances(blocked, client=client)
            disp = pp.feature_dispersions(blocked)  # the default client
            sel = pp.select_features(blocked, 30, flavor="seurat")
        workers = set(client.scheduler_info(n_workers=-1)["workers"])
    chunks = [t for t in stream.data if t["key"].startswith("feature_moments_chunk")]
    assert len(chunks) == 3 * blocked.n_blocks and {t["worker"] for t in chunks} <= workers
    for a, b in zip(var, here_var):
        np.testing.assert_array_equal(a, b)
    for field in ("means", "dispersions", "mean_bin", "dispersions_norm"):
        np.testing.assert_array_equal(getattr(disp, field), getattr(here_disp, field))
    keep = np.sort(np.argsort(-np.nan_to_num(here_disp.dispersions_norm, nan=-np.inf), kind="stable")[:30])
    np.testing.assert_array_equal(sel.to_scipy().toarray(), blocked.to_scipy().toarray()[keep])
    # and against the plain variance path: the same per-feature sums, before expm1 / after
    ref = _plain_cp10k_log1p(A.toarray())
    np.testing.assert_allclose(var[1], ref.var(axis=1, ddof=1), rtol=1e-9, atol=1e-12)  # as the variance test


def test_feature_selection_errors():
    A = _counts()
    with pytest.raises(InputError, match=r"The 'flavor' parameter of select_features must be one of 'variance', "
                                         r"'seurat'. Got 'cell_ranger' instead."):
        pp.select_features(A, 3, flavor="cell_ranger")
    with pytest.raises(InputError, match=r"The 'feature_flavor' parameter of recipe must be one of"):
        pp.recipe(A, n_top_features=3, feature_flavor="dispersion")
    with pytest.raises(InputError, match=r"The 'n_bins' parameter of feature_dispersions must be an int in \[1, inf\)"):
        pp.feature_dispersions(A, n_bins=0)


def test_factorize_pipeline_selects_features_by_seurat_dispersion(tmp_path):
    import dataclasses

    from dnmf.config import JobConfig
    from dnmf.jobs import RunStore, run_job

    config = JobConfig.from_dict({
        "pipeline": "factorize", "name": "hvg",
        "input": {"dataset": "hawaiibirds", "normalize": "log1p", "n_top_features": 40, "feature_flavor": "seurat"},
        "model": {"k": 3, "maxit": 3, "tol": 0, "seed": 2},
        "output": {"dir": str(tmp_path), "anndata": "none", "performance_report": False, "plots": False},
        "progress": "none"})
    res = run_job(config, client=False, echo=lambda line: None)
    model = RunStore.open(res.store).read_group("model")
    birds = dnmf.datasets.load_hawaiibirds()
    log = np.log1p(birds.X.toarray())  # species × grid cells, as the pipeline reads it
    ref, _ = _scanpy_seurat_reference(log)
    norm = np.asarray(ref["dispersions_norm"])
    keep = _scanpy_top(norm, 40)
    assert len(keep) == 40
    assert list(model["row_names"]) == [str(birds.var.index[i]) for i in keep]
    plain = pp.recipe(dataclasses.replace(dnmf.io.as_blocked(birds.X), row_names=tuple(map(str, birds.var.index))),
                      "log1p", 40)  # the default flavor, variance, picks other species
    assert set(plain.row_names) != set(model["row_names"])
    with pytest.raises(dnmf.ConfigError, match=r"feature_flavor"):
        JobConfig.from_dict({**config.to_dict(), "input": {"dataset": "hawaiibirds", "feature_flavor": "dispersion"}})
