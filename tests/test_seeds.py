"""Seeds (RcppML §1.3): multi-start over seeds or matrices, and R's runif start (issue 8).

References: RcppML 1.0 itself (shared/tools/rcppml, run once; numbers stored here):
``set.seed(42); runif(3)`` = 0.914806, 0.9370754, 0.2861395; ``nmf(aml, 6, seed = 42,
tol = 1e-6, threads = 2)`` runs 100 iterations to loss 2390.711 with loss_history starting
25697.96, 5449.242, 3817.664. (The vignette's 80 iterations / 2386.559 came from an older
version.)
"""

from __future__ import annotations

import numpy as np
import pytest

import dnmf
from dnmf.exceptions import InputError

pytestmark = pytest.mark.filterwarnings("ignore::dnmf.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def aml():
    return dnmf.datasets.load_aml().X


def test_r_rng_starts_where_rcppml_starts(aml):
    model = dnmf.nmf(aml, 6, seed=42, r_rng=True, tol=1e-6, client=False)
    # RcppML computes in float32: its losses carry ~1e-6 relative noise per operation, which
    # over 100 iterations of a non-convex fit stays within 1e-5 here (measured 4e-6).
    assert model.misc["iter"] == 100
    np.testing.assert_allclose(model.misc["loss"], 2390.711, rtol=1e-5)
    np.testing.assert_allclose(model.misc["loss_history"][:3], [25697.96, 5449.242, 3817.664], rtol=3e-5)
    assert model.misc["init"] == "random (R stream)"
    from dnmf.core import _r_rng_w

    np.testing.assert_allclose(_r_rng_w(4, 2, 42)[:3, 0], [0.914806, 0.9370754, 0.2861395], rtol=1e-6)


def test_multi_start_returns_the_lowest_loss_start(aml):
    model = dnmf.nmf(aml, 4, seed=[3, 1, 2], maxit=15, client=False)
    table = model.misc["all_inits"]
    assert list(table["seed"]) == [3, 1, 2] and table["selected"].sum() == 1
    best = int(np.argmin(table["loss"]))
    assert table["selected"][best]
    single = dnmf.nmf(aml, 4, seed=int(table["seed"][best]), maxit=15, client=False)
    # the selected start is that fit, unchanged
    np.testing.assert_array_equal(model.w, single.w)
    np.testing.assert_array_equal(model.h, single.h)
    assert model.misc["loss"] == table["loss"].min()


def test_multi_start_over_matrices_and_on_a_cluster(aml):
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(0)
    inits = [rng.uniform(size=(aml.shape[0], 3)) for _ in range(3)]
    here = dnmf.nmf(aml, 3, init=inits, maxit=10, client=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        there = dnmf.nmf(aml, 3, init=inits, maxit=10, client=client)
    # whole fits as tasks on the workers: the same arithmetic, bitwise
    assert here.misc["all_inits"].equals(there.misc["all_inits"])
    np.testing.assert_array_equal(here.w, there.w)
    assert list(here.misc["all_inits"]["init"]) == ["matrix 1", "matrix 2", "matrix 3"]


def test_seed_errors_name_the_parameter(aml):
    with pytest.raises(InputError, match="'r_rng' parameter"):
        dnmf.nmf(aml, 2, r_rng=True, client=False)
    with pytest.raises(InputError, match="'seed' parameter .*multi-start is not allowed with CV"):
        dnmf.nmf(aml, 2, seed=[1, 2], test_fraction=0.1, client=False)
    with pytest.raises(InputError, match="'seed' parameter .*distinct"):
        dnmf.nmf(aml, 2, seed=[1, 1], client=False)
    with pytest.raises(InputError, match="'init' parameter"):
        dnmf.nmf(aml, 2, init=[], client=False)
