"""dnmf.consensus: RcppML consensus_nmf and cNMF consensus, against plain NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import cophenet, fcluster, linkage
from scipy.optimize import nnls

import dnmf
from dnmf.consensus import (CNMFResult, ConsensusNMFResult, ConsensusNMFSweep, cnmf_consensus, cnmf_k_selection,
                            consensus_nmf)
from dnmf.exceptions import DnmfError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")

REPS = 12


@pytest.fixture(scope="module")
def sim():
    # three planted, block-structured factors with clear structure: 100 features × 60 samples
    return dnmf.simulate_nmf(100, 60, 3, noise=0.5, seed=1)


@pytest.fixture(scope="module")
def sweep(sim):
    return consensus_nmf(sim.A, [3, 4], reps=REPS, seed=7, client=False)


@pytest.fixture(scope="module")
def selection(sim):
    return cnmf_k_selection(sim.A, [3, 5], reps=REPS, seed=3, client=False)


# -- references written out in plain NumPy / SciPy --------------------------------------------


def ref_hard_consensus(models, axis="features"):
    """Σ_r 1[argmax_r(a) = argmax_r(b)] / reps, pair by pair from each model's loadings."""
    xs = [m.w if axis == "features" else m.h.T for m in models]
    n = xs[0].shape[0]
    c = np.zeros((n, n))
    for x in xs:
        lab = [int(np.argmax(x[i])) for i in range(n)]
        for a in range(n):
            for b in range(n):
                c[a, b] += lab[a] == lab[b]
    return c / len(models)


def ref_knn_jaccard_consensus(models, knn, axis="features"):
    """RcppML c_knn_jaccard as a loop: kNN by cosine (ties to the lower index), Jaccard of sets."""
    n = (models[0].w if axis == "features" else models[0].h.T).shape[0]
    kk = min(knn, n - 1)
    c = np.zeros((n, n))
    for m in models:
        x = np.asarray(m.w if axis == "features" else m.h.T, dtype=np.float64)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = xn @ xn.T
        sets = [set(sorted((j for j in range(n) if j != i), key=lambda j: (-s[i, j], j))[:kk]) for i in range(n)]
        for a in range(n):
            for b in range(n):
                c[a, b] += 1.0 if a == b else len(sets[a] & sets[b]) / len(sets[a] | sets[b])
    return c / len(models)


def ref_stats(c):
    """Dispersion (Kim & Park 2007), PAC over pairs a < b, cophenetic correlation (Pearson)."""
    n = c.shape[0]
    disp = sum(4 * (c[i, j] - 0.5) ** 2 for i in range(n) for j in range(n)) / n ** 2
    pairs = [c[i, j] for i in range(n) for j in range(i + 1, n)]
    pac = sum(0.1 < v < 0.9 for v in pairs) / len(pairs)
    d = np.array([1 - v for v in pairs])  # condensed 1 − C, row-major upper triangle
    z = linkage(d, method="average")
    coph = np.corrcoef(d, cophenet(z))[0, 1]
    return disp, pac, coph, z


def same_partition(x, y):
    return np.array_equal(x[:, None] == x[None, :], y[:, None] == y[None, :])


# -- consensus_nmf -------------------------------------------------------------------------------


def test_planted_true_k_is_crisp_and_wrong_k_is_not(sweep):
    assert isinstance(sweep, ConsensusNMFSweep)
    t = sweep.table
    assert list(t.columns) == ["k", "cophenetic", "dispersion", "PAC"] and list(t["k"]) == [3, 4]
    r3, r4 = sweep[3], sweep[4]
    # every restart at the true k puts each planted feature block on its own factor, so the
    # consensus is exactly 0/1: cophenetic and dispersion are 1 up to rounding of the Pearson sum
    assert r3.cophenetic == pytest.approx(1.0, abs=1e-12)
    assert r3.dispersion == pytest.approx(1.0, abs=1e-12) and r3.pac == 0.0
    # k = 4 splits a planted block differently across restarts (on this matrix: cophenetic
    # 0.99, dispersion 0.90, PAC 0.10); both statistics are lower, PAC higher
    assert r4.cophenetic < r3.cophenetic - 1e-3
    assert r4.dispersion < r3.dispersion - 0.02 and r4.pac > 0.02
    # the three planted feature blocks (rows 0-32, 33-65, 66-99) are the three clusters
    truth = np.repeat([0, 1, 2], [33, 33, 34])
    assert same_partition(r3.clusters, truth)
    assert r3.clusters[0] == 0 and set(r3.clusters.tolist()) == {0, 1, 2}  # R cutree numbering, 0-based


def test_hard_consensus_and_statistics_equal_plain_reference(sweep):
    for r in (sweep[3], sweep[4]):
        assert isinstance(r, ConsensusNMFResult) and len(r.models) == REPS
        c = ref_hard_consensus(r.models)
        # co-membership counts are exact integers in float64 in both computations
        np.testing.assert_array_equal(r.consensus, c)
        disp, pac, coph, z = ref_stats(c)
        # dispersion: same terms summed in a different order, so agreement to float rounding
        assert r.dispersion == pytest.approx(disp, rel=1e-12)
        assert r.pac == pac
        assert r.cophenetic == pytest.approx(coph, rel=1e-12)  # Pearson in numpy vs scipy
        assert same_partition(r.clusters, fcluster(z, r.k, criterion="maxclust"))
        np.testing.assert_array_equal(r.linkage, z)


def test_restart_seeds_are_seed_plus_i(sim, sweep):
    r = sweep[4]
    assert r.seeds == tuple(7 + i for i in range(1, REPS + 1))
    # restart 1 is the fit nmf(A, k, seed=seed + 1), as RcppML's replicate i uses seed + i
    np.testing.assert_array_equal(r.models[0].w, dnmf.nmf(sim.A, 4, seed=8, client=False).w)


def test_knn_jaccard_equals_plain_loop(sim):
    for axis, knn in (("features", 7), ("samples", 5)):
        r = consensus_nmf(sim.A, 4, reps=4, method="knn_jaccard", knn=knn, seed=2, client=False, axis=axis)
        assert r.knn == knn and r.method == "knn_jaccard" and r.axis == axis
        c = ref_knn_jaccard_consensus(r.models, knn, axis=axis)
        # Jaccard ratios of the same integers, summed over restarts in the same order
        np.testing.assert_allclose(r.consensus, c, rtol=1e-13, atol=0)
        disp, pac, coph, _ = ref_stats(c)
        assert r.dispersion == pytest.approx(disp, rel=1e-12) and r.pac == pac
        assert r.cophenetic == pytest.approx(coph, rel=1e-12)


def test_samples_axis_uses_h(sim):
    r = consensus_nmf(sim.A, 3, reps=4, seed=1, client=False, axis="samples")
    assert r.consensus.shape == (60, 60)
    np.testing.assert_array_equal(r.consensus, ref_hard_consensus(r.models, axis="samples"))


def test_local_and_dask_cluster_give_identical_results(sim):
    distributed = pytest.importorskip("distributed")
    kw = dict(reps=6, seed=5)
    local = consensus_nmf(sim.A, 4, method="knn_jaccard", client=False, **kw)
    local_c = cnmf_consensus(sim.A, 3, client=False, **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        remote = consensus_nmf(sim.A, 4, method="knn_jaccard", client=client, **kw)
        remote_c = cnmf_consensus(sim.A, 3, client=client, **kw)
    # same seeds fixed before submission ⇒ the same fits, bit for bit
    np.testing.assert_array_equal(local.consensus, remote.consensus)
    for a, b in zip(local.models, remote.models):
        np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(local.clusters, remote.clusters)
    np.testing.assert_array_equal(local_c.programs, remote_c.programs)
    np.testing.assert_array_equal(local_c.usage, remote_c.usage)


def test_seed_none_records_entropy_and_reruns(sim):
    a = consensus_nmf(sim.A, 4, reps=3, client=False)
    assert a.seed_entropy is not None
    b = consensus_nmf(sim.A, 4, reps=3, seed=np.random.SeedSequence(a.seed_entropy), client=False)
    np.testing.assert_array_equal(a.consensus, b.consensus)


def test_plots_return_figures(sweep, selection):
    from matplotlib.figure import Figure

    assert isinstance(sweep[4].plot(), Figure)
    assert isinstance(sweep.plot(), Figure)
    assert isinstance(selection.plot(), Figure)
    assert isinstance(selection[3].plot(), Figure)
    assert "cophenetic" in str(sweep[4]) and "PAC" in str(sweep)


def test_invalid_arguments(sim):
    with pytest.raises(InputError, match="'method' parameter of consensus_nmf"):
        consensus_nmf(sim.A, 3, method="soft")
    with pytest.raises(InputError, match="'axis' parameter"):
        consensus_nmf(sim.A, 3, axis="rows")
    with pytest.raises(InputError, match="maxitt"):
        consensus_nmf(sim.A, 3, maxitt=5)
    with pytest.raises(InputError, match="'checkpoint' parameter"):
        consensus_nmf(sim.A, 3, checkpoint="x.npz")
    with pytest.raises(InputError, match="distinct"):
        consensus_nmf(sim.A, [3, 3])
    with pytest.raises(InputError, match="'k' parameter of cnmf_consensus"):
        cnmf_consensus(sim.A, [3, 4])
    with pytest.raises(InputError, match="local_neighborhood_size"):
        cnmf_consensus(sim.A, 3, reps=3, local_neighborhood_size=0.1, client=False)
    with pytest.raises(DnmfError, match="Increase density_threshold"):
        cnmf_consensus(sim.A, 3, reps=4, density_threshold=0.0, client=False)


# -- cNMF consensus --------------------------------------------------------------------------------


def ref_silhouette(x, labels):
    """Mean silhouette (Rousseeuw 1987) with Euclidean distances, written out."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    s = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            s.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        s.append((b - a) / max(a, b))
    return float(np.mean(s))


def test_cnmf_recovers_planted_programs_and_stability_peaks_at_true_k(sim, selection):
    r3, r5 = selection[3], selection[5]
    assert isinstance(r3, CNMFResult)
    cs = dnmf.cosine(r3.programs, sim.w)
    match = dnmf.bipartite_match(cs, maximize=True)
    # noise 0.5 leaves each planted program clearly recoverable: matched cosines are ≈ 0.998
    # here; 0.9 is RcppML's own recovery criterion (spec §13.1)
    assert np.all(cs[match.rows, match.cols] >= 0.9)
    assert r3.stability > r5.stability
    t = selection.table
    assert list(t.columns) == ["k", "stability", "error"] and list(t["k"]) == [3, 5]
    # the same seeds give the same restarts as a single-rank call
    single = cnmf_consensus(sim.A, 3, reps=REPS, seed=3, client=False)
    np.testing.assert_array_equal(single.programs, r3.programs)


@pytest.mark.parametrize("k", [3, 5])  # at k = 5 the density filter drops programs (4 of 60 here)
def test_cnmf_steps_equal_plain_reference(sim, selection, k):
    r = selection[k]
    reps = REPS
    # 1. stacked L2-normalized restart programs
    progs = r.replicate_programs
    np.testing.assert_allclose(np.linalg.norm(progs, axis=0), 1.0, rtol=1e-12)
    # 2. local density: mean distance to the n nearest other programs
    n_nb = int(0.30 * reps)
    assert r.n_neighbors == n_nb
    x = progs.T
    dens = []
    for i in range(len(x)):
        dist = sorted(np.linalg.norm(x[j] - x[i]) for j in range(len(x)) if j != i)
        dens.append(sum(dist[:n_nb]) / n_nb)
    # pdist vs norm of differences: float rounding only
    np.testing.assert_allclose(r.local_density, dens, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(r.kept, np.array(dens) < 0.5)
    kept = x[r.kept]
    labels = r.labels[r.kept]
    assert np.all(r.labels[~r.kept] == -1) and set(labels.tolist()) == set(range(k))
    # 3. stability = silhouette of the k-means labels on the kept programs
    assert r.stability == pytest.approx(ref_silhouette(kept, labels), rel=1e-10)
    # 4. median program per cluster, scaled to sum 1
    for c in range(k):
        med = np.median(kept[labels == c], axis=0)
        np.testing.assert_allclose(r.programs[:, c], med / med.sum(), rtol=1e-12)
    # 5. usage = NNLS per column with the programs fixed; error = ‖A − P U‖²_F
    for j in range(0, 60, 7):
        ref, _ = nnls(r.programs, sim.A[:, j])
        # active-set NNLS in dnmf vs scipy's: same optimum, agreement to solver precision
        np.testing.assert_allclose(r.usage[:, j], ref, rtol=1e-6, atol=1e-10)
    err = np.sum((sim.A - r.programs @ r.usage) ** 2)
    assert r.error == pytest.approx(err, rel=1e-9)  # blockwise evaluate vs one dense sum
    model = r.to_model()
    np.testing.assert_allclose(model.w @ np.diag(model.d) @ model.h, r.programs @ r.usage, rtol=1e-12, atol=1e-15)


def test_cnmf_sparse_input_error_without_densifying(sim):
    sp = pytest.importorskip("scipy.sparse")
    a = sim.A.copy()
    a[a < 0.5 * a.mean()] = 0.0
    r = cnmf_consensus(sp.csc_array(a), 3, reps=5, seed=1, client=False, density_threshold=2.0)
    assert r.kept.all()  # threshold 2 keeps every program (unit vectors are at most 2 apart)
    # blockwise sparse evaluate vs a dense sum of squares
    assert r.error == pytest.approx(np.sum((a - r.programs @ r.usage) ** 2), rel=1e-9)


# -- rank selection on a planted 3-cluster design; 1 worker vs 2 ---------------------------------


def planted_three_clusters(seed=0, m=90, n=60, noise=0.2):
    """Three equal, disjoint feature × sample blocks on a 0.1 background, with ±noise relative jitter.

    The blocks are exchangeable, so a rank-2 fit has to merge or drop a block, and which one
    depends on the restart: the consensus at k = 2 is not crisp, at k = 3 it is.
    """
    rng = np.random.default_rng(seed)
    w = np.kron(np.eye(3), np.ones((m // 3, 1)))
    h = np.kron(np.eye(3), np.ones((1, n // 3)))
    a = w @ h + 0.1
    return a * rng.uniform(1 - noise, 1 + noise, size=a.shape)


def test_planted_three_clusters_select_k3():
    A = planted_three_clusters()
    ks = [2, 3, 4, 5]
    sweep = consensus_nmf(A, ks, reps=20, seed=1, client=False)
    t = sweep.table
    assert list(t["k"]) == ks  # one row per rank, in the order given
    # statistics recomputed by the plain reference from each rank's consensus matrix
    ref = {q: ref_stats(ref_hard_consensus(sweep[q].models)) for q in ks}
    coph = np.array([ref[q][2] for q in ks])
    np.testing.assert_allclose(t["cophenetic"], coph, rtol=1e-12)  # Pearson in numpy vs scipy
    # the criterion: dispersion > 0.95 at the planted k and the best cophenetic there.
    # Measured: k = 2 0.99863 / 0.427, k = 3 1 / 1, k = 4 0.99778 / 0.854, k = 5 0.99384 / 0.815
    # (cophenetic / dispersion); the fits are seeded, so these numbers are fixed, and the
    # margins (≥ 1.3e-3 in cophenetic) are far above rounding (1e-15).
    assert ks[int(np.argmax(coph))] == 3
    assert ks[int(np.argmax(t["cophenetic"]))] == 3
    assert all(t["cophenetic"][i] < 1.0 - 1e-3 for i in (0, 2, 3))
    assert sweep[3].dispersion > 0.95 and ref[3][0] > 0.95
    assert all(sweep[q].dispersion < 0.9 for q in (2, 4, 5))
    # the three clusters at k = 3 are the planted feature blocks
    assert same_partition(sweep[3].clusters, np.repeat([0, 1, 2], 30))


@pytest.fixture(scope="module")
def one_and_two_workers():
    """The same consensus and cNMF sweeps on a 1-worker and a 2-worker LocalCluster (processes)."""
    distributed = pytest.importorskip("distributed")
    A = planted_three_clusters(seed=1)
    out = {}
    for n_workers in (1, 2):
        with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            with distributed.get_task_stream(client) as ts:
                hard = consensus_nmf(A, [2, 3, 4], reps=8, seed=3, client=client)
                knn = consensus_nmf(A, [2, 3, 4], reps=8, seed=3, method="knn_jaccard", knn=8, client=client)
                cnmf = cnmf_k_selection(A, [2, 3, 4], reps=8, seed=3, client=client)
            workers = {rec["worker"] for rec in ts.data}
        out[n_workers] = (hard, knn, cnmf, workers)
    return out


def test_identical_tables_on_one_and_two_workers(one_and_two_workers):
    import pandas as pd

    one, two = one_and_two_workers[1], one_and_two_workers[2]
    assert len(one[3]) == 1 and len(two[3]) == 2  # the restarts really ran on both workers
    for a, b in zip(one[:3], two[:3]):
        # seeds fixed before submission and serial per-restart arithmetic ⇒ bitwise equal
        pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
        for q in a.ks:
            ra, rb = a[q], b[q]
            if isinstance(ra, ConsensusNMFResult):
                np.testing.assert_array_equal(ra.consensus, rb.consensus)
                np.testing.assert_array_equal(ra.clusters, rb.clusters)
            else:
                np.testing.assert_array_equal(ra.programs, rb.programs)
                np.testing.assert_array_equal(ra.usage, rb.usage)
    # and the cluster runs equal the in-process run (no client)
    A = planted_three_clusters(seed=1)
    local = consensus_nmf(A, [2, 3, 4], reps=8, seed=3, client=False)
    pd.testing.assert_frame_equal(local.table, two[0].table, check_exact=True)


def test_best_k_follows_each_statistic():
    def res(k, coph, disp, pac):
        return ConsensusNMFResult(consensus=np.eye(2), clusters=np.zeros(2, dtype=np.int64), cophenetic=coph,
                                  dispersion=disp, pac=pac, linkage=np.zeros((1, 4)), order=np.arange(2),
                                  models=(), k=k, reps=1, method="hard", knn=None, axis="features", seeds=(1,))

    # hand-made statistics: cophenetic peaks at 3 (NaN at 2 never wins), dispersion ties at 3 and
    # 4 (the rank given first wins), PAC is lowest at 5
    sweep = ConsensusNMFSweep(ks=(2, 3, 4, 5), results={2: res(2, np.nan, 0.5, 0.4), 3: res(3, 0.99, 0.9, 0.2),
                                                        4: res(4, 0.98, 0.9, 0.3), 5: res(5, 0.97, 0.8, 0.1)})
    assert sweep.best_k() == 3 and sweep.best_k("dispersion") == 3 and sweep.best_k("pac") == 5
    with pytest.raises(InputError, match="'criterion' parameter of ConsensusNMFSweep.best_k"):
        sweep.best_k("stability")
    nan = ConsensusNMFSweep(ks=(2,), results={2: res(2, np.nan, 0.5, 0.4)})
    with pytest.raises(DnmfError, match="cophenetic is NaN at every rank"):
        nan.best_k()


def test_cnmf_best_k(selection):
    t = selection.table
    assert selection.best_k() == int(t["k"][int(np.argmax(t["stability"]))]) == 3
    assert selection.best_k("error") == int(t["k"][int(np.argmin(t["error"]))])


def test_from_models_equals_the_direct_call(sim, sweep, selection):
    # restarts fitted elsewhere (the consensus pipeline's checkpointed tasks) give the same result
    for q in (3, 4):
        r = sweep[q]
        models = [dnmf.NMFModel(w=m.w, d=m.d, h=m.h) for m in r.models]  # bare models, summaries recomputed
        again = ConsensusNMFResult.from_models(models, seeds=r.seeds)
        np.testing.assert_array_equal(again.consensus, r.consensus)
        np.testing.assert_array_equal(again.clusters, r.clusters)
        assert (again.cophenetic, again.dispersion, again.pac, again.reps, again.k) == (
            r.cophenetic, r.dispersion, r.pac, r.reps, r.k)
    c = selection[3]
    models = [dnmf.nmf(sim.A, 3, seed=s, client=False) for s in c.seeds]
    again = CNMFResult.from_models(sim.A, models, seeds=c.seeds)
    np.testing.assert_array_equal(again.programs, c.programs)
    np.testing.assert_array_equal(again.usage, c.usage)
    assert again.stability == c.stability and again.error == c.error
    with pytest.raises(InputError, match="'models' parameter of ConsensusNMFResult.from_models"):
        ConsensusNMFResult.from_models([sweep[3].models[0], sweep[4].models[0]])
    with pytest.raises(InputError, match="'models' parameter of CNMFResult.from_models"):
        CNMFResult.from_models(sim.A, models[:1])


def test_results_do_not_depend_on_the_models_memory_layout(sim, selection):
    # nmf returns F-ordered W; a store gives C-ordered copies: the same numbers, bit for bit
    c = selection[5]  # k = 5: outliers dropped, so density, k-means and silhouette all take part
    models = [dnmf.nmf(sim.A, 5, seed=s, client=False) for s in c.seeds]
    a = CNMFResult.from_models(sim.A, models, seeds=c.seeds)
    b = CNMFResult.from_models(sim.A, [dnmf.NMFModel(w=np.ascontiguousarray(m.w), d=m.d, h=np.asfortranarray(m.h))
                                       for m in models], seeds=c.seeds)
    assert a.stability == b.stability and a.error == b.error
    np.testing.assert_array_equal(a.programs, b.programs)
    np.testing.assert_array_equal(a.local_density, b.local_density)
    for axis in ("features", "samples"):
        x = ConsensusNMFResult.from_models(models, method="knn_jaccard", knn=6, axis=axis)
        y = ConsensusNMFResult.from_models([dnmf.NMFModel(w=np.ascontiguousarray(m.w), d=m.d,
                                                          h=np.asfortranarray(m.h)) for m in models],
                                           method="knn_jaccard", knn=6, axis=axis)
        np.testing.assert_array_equal(x.consensus, y.consensus)


def test_plots_draw_the_ordered_consensus_and_the_statistics(sweep, selection):
    from scipy.cluster.hierarchy import leaves_list

    r = sweep[4]
    # the heatmap is the consensus with rows and columns in the average-linkage tree's leaf order
    np.testing.assert_array_equal(r.order, leaves_list(linkage(1 - r.consensus[np.triu_indices(100, 1)],
                                                               method="average")))
    img = r.plot().axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(img), r.consensus[np.ix_(r.order, r.order)])
    # the rank-selection plots draw the tables' columns against k
    ax = sweep.plot().axes[0]
    t = sweep.table
    for line, col in zip(ax.get_lines(), ("cophenetic", "dispersion", "PAC")):
        np.testing.assert_array_equal(line.get_xdata(), t["k"])
        np.testing.assert_array_equal(line.get_ydata(), t[col])
    fig = selection.plot()
    s = selection.table
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_ydata(), s["stability"])
    np.testing.assert_array_equal(fig.axes[1].get_lines()[0].get_ydata(), s["error"])


def ref_cutree(z, k):
    """R's cutree(k) written out: apply the first n − k merges of the linkage, one set per group."""
    n = len(z) + 1
    groups = {i: {i} for i in range(n)}
    for i, (a, b) in enumerate(z[:n - k, :2].astype(int)):
        groups[n + i] = groups.pop(a) | groups.pop(b)
    labels = np.empty(n, dtype=int)
    for g, members in enumerate(groups.values()):
        labels[sorted(members)] = g
    return labels


def test_clusters_follow_the_merge_order_when_heights_tie():
    from dnmf.consensus import hard_connectivity

    # random hard labels over few restarts give consensus values that are multiples of 1/reps,
    # so merge heights tie often, also at the cut; scipy's cut_tree departs from the merge order
    # in 11 of these 300 draws
    rng = np.random.default_rng(0)
    ties = 0
    for _ in range(300):
        n, reps, k = int(rng.integers(5, 40)), int(rng.integers(2, 6)), int(rng.integers(2, 6))
        labels = rng.integers(0, k, size=(reps, n))
        c = hard_connectivity(labels, k) / reps
        res = ConsensusNMFResult.from_models([dnmf.NMFModel(w=np.eye(k)[lab] + 0.0, d=np.ones(k),
                                                             h=np.ones((k, 2))) for lab in labels])
        np.testing.assert_array_equal(res.consensus, c)
        ref = ref_cutree(res.linkage, k)
        assert same_partition(res.clusters, ref) and len(set(res.clusters.tolist())) == k
        assert res.clusters[0] == 0 and np.all(np.diff(np.unique(res.clusters, return_index=True)[1]) > 0)
        # every cluster is a subtree: contiguous in the heatmap's leaf order
        in_order = res.clusters[res.order]
        assert np.count_nonzero(np.diff(in_order)) == k - 1
        ties += bool(res.linkage[n - k - 1, 2] == res.linkage[n - k, 2]) if n - k >= 1 else 0
    assert ties > 0  # the draws do exercise tied cut heights
