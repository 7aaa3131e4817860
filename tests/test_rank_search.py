"""dnmf.rank_search: spec §5.7 on synthetic loss curves whose outcome is derived by hand below.

No fit is involved: ``evaluate`` is a closed-form curve that records the ranks asked for.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dnmf.exceptions import InputError
from dnmf.rank_search import RankEvaluation, RankSearchResult, rank_search

PHI = (1 + math.sqrt(5)) / 2


class Curve:
    """evaluate(r) = (train(r), test(r)), recording every call."""

    def __init__(self, train, test):
        self.train, self.test, self.calls = train, test, []

    def __call__(self, r):
        self.calls.append(r)
        return self.train(r), self.test(r)


def test_overfitting_bracket_then_golden_section():
    # train(r) = 1 + 1/r³, test(r) = (r − 11)² + 5 (test minimum at 11), k in [2, 50].
    #
    # Exponential phase, rel = |train_r − train_prev| / train_prev:
    #   r=2: train 1.125,     test 86 (first fit: no check)
    #   r=4: train 1.015625,  test 54; rel = 0.0972 ≥ 0.01 → go on
    #   r=8: train 1.001953,  test 14; rel = 0.01346 ≥ 0.01 → go on
    #   r=16: train 1.000244, test 30; rel = 0.00171 < 0.01 and 30 > 14 → overfitting:
    #         k_low = 8, k_high = 16.
    # Golden section (φ = 1.618034):
    #   [8, 16]: 8/φ = 4.944; k1 = int(16 − 4.944 + 0.5) = int(11.56) = 11,
    #            k2 = int(8 + 4.944 + 0.5) = int(13.44) = 13; test 5 < 9 → k_high = 13
    #   [8, 13]: 5/φ = 3.090; k1 = int(10.41) = 10, k2 = int(11.59) = 11 (fitted before);
    #            test 6 < 5 is false → k_low = 10
    #   [10, 13]: 3/φ = 1.854; k1 = int(11.65) = 11 (fitted before), k2 = int(12.35) = 12;
    #            test 5 < 6 → k_high = 12
    #   [10, 12]: k_high − k_low = 2, not > 2 → stop; k_optimal = k_low = 10
    # (the spec returns k_low, so the search lands one below the test minimum here).
    curve = Curve(lambda r: 1 + 1 / r ** 3, lambda r: (r - 11) ** 2 + 5)
    res = rank_search(curve, k_min=2, k_max=50)
    assert isinstance(res, RankSearchResult)
    assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (10, 10, 12, True)
    assert curve.calls == [2, 4, 8, 16, 11, 13, 10, 12]  # rank 11 asked twice, fitted once
    t = res.table
    assert list(t.columns) == ["rank", "train", "test", "phase"]
    assert list(t["rank"]) == [2, 4, 8, 16, 11, 13, 10, 12]
    assert list(t["phase"]) == ["exponential"] * 4 + ["golden"] * 4
    np.testing.assert_array_equal(t["train"], [1 + 1 / r ** 3 for r in t["rank"]])
    np.testing.assert_array_equal(t["test"], [(r - 11) ** 2 + 5 for r in t["rank"]])
    assert res.as_misc() == {"k_optimal": 10, "k_low": 10, "k_high": 12, "overfitting_detected": True}
    assert "k_optimal = 10" in str(res)


def test_golden_points_follow_the_formula():
    # the same search replayed with the spec's formulas, written out independently
    test = lambda r: (r - 11) ** 2 + 5  # noqa: E731
    lo, hi, seen = 8, 16, []
    while hi - lo > 2:
        k1 = math.floor(hi - (hi - lo) / PHI + 0.5)
        k2 = math.floor(lo + (hi - lo) / PHI + 0.5)
        if k1 <= lo or k2 >= hi or k1 >= k2:
            break
        seen += [k1, k2]
        if test(k1) < test(k2):
            hi = k2
        else:
            lo = k1
    res = rank_search(lambda r: (1 + 1 / r ** 3, test(r)), 2, 50)
    assert seen == [11, 13, 10, 11, 11, 12] and (res.k_low, res.k_high) == (lo, hi)


def test_golden_phase_stops_on_k1_ge_k2():
    # train flat from the start of the range, test(4) = 3 < test(2) = 4 (no trigger at 4),
    # test(8) = 5 > 3 with train change 0 → k_low = 4, k_high = 8.
    # Golden: 4/φ = 2.472; k1 = int(8 − 2.472 + 0.5) = int(6.03) = 6, k2 = int(4 + 2.472 + 0.5)
    # = int(6.97) = 6; k1 ≥ k2 → stop before fitting anything: k_optimal = 4.
    curve = Curve(lambda r: 1.0, lambda r: {2: 4.0, 4: 3.0, 8: 5.0}[r])
    res = rank_search(curve, 2, 50)
    assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (4, 4, 8, True)
    assert curve.calls == [2, 4, 8]


def test_k_max_reached_without_overfitting():
    # train(r) = 100/r halves at every doubling (rel change 0.5, and 0.36 from 32 to 50), so the
    # train loss never flattens: ranks 2, 4, 8, 16, 32, then 64 > 50 with 32 < 50 → 50 once;
    # after 50 the next doubling exceeds k_max and 50 is not < 50 → stop. k_optimal = 50.
    for test in (lambda r: 100 / r, lambda r: float(r)):  # test falling, or rising all along
        curve = Curve(lambda r: 100 / r, test)
        res = rank_search(curve, 2, 50)
        assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (50, 50, 50, False)
        assert curve.calls == [2, 4, 8, 16, 32, 50]
        assert set(res.table["phase"]) == {"exponential"}


def test_flat_train_but_falling_test_is_not_overfitting():
    # both conditions are needed: train constant (rel change 0) but test falling → never triggers
    res = rank_search(lambda r: (1.0, 1.0 / r), 3, 20)
    # 3, 6, 12, then 24 > 20 with 12 < 20 → 20
    assert [e.rank for e in res.evaluations] == [3, 6, 12, 20]
    assert res.k_optimal == 20 and not res.overfitting_detected


def test_doubling_lands_on_k_max_exactly():
    # k_min = 4, k_max = 16: 4, 8, 16; the next doubling (32) exceeds k_max and 16 is not < 16,
    # so k_max is not fitted twice
    curve = Curve(lambda r: 10.0 / r, lambda r: 10.0 / r)
    res = rank_search(curve, 4, 16)
    assert curve.calls == [4, 8, 16] and res.k_optimal == 16


def test_trigger_on_the_k_max_step():
    # k in [2, 40]: 2, 4, 8, 16, 32, 40. train 1/r until 32, then flat (train(40) = train(32));
    # test falls until 32 and rises at 40 → k_low = 32, k_high = 40.
    # Golden: 8/φ = 4.944; k1 = int(40 − 4.944 + 0.5) = 35, k2 = int(32 + 4.944 + 0.5) = 37;
    # test(35) = 1 < test(37) = 3 → k_high = 37. [32, 37]: 5/φ = 3.090; k1 = int(34.41) = 34,
    # k2 = int(35.59) = 35; test(34) = 0 < test(35) = 1 → k_high = 35. [32, 35]: 3/φ = 1.854;
    # k1 = int(33.65) = 33, k2 = int(34.35) = 34; test(33) = 1 < test(34) = 0 is false →
    # k_low = 33. [33, 35]: width 2 → stop; k_optimal = 33.
    train = lambda r: 1.0 / min(r, 32)  # noqa: E731
    test = lambda r: 10.0 / r if r <= 32 else abs(r - 34)  # noqa: E731
    curve = Curve(train, test)
    res = rank_search(curve, 2, 40)
    assert curve.calls == [2, 4, 8, 16, 32, 40, 35, 37, 34, 33]
    assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (33, 33, 35, True)


def test_two_rank_bracket_skips_the_golden_phase():
    # k in [3, 5]: 3, then 6 > 5 with 3 < 5 → 5. Train flat, test up → k_low = 3, k_high = 5;
    # 5 − 3 = 2 is not > 2, so k_optimal = 3 without golden fits.
    res = rank_search(lambda r: (2.0, float(r)), 3, 5)
    assert [e.rank for e in res.evaluations] == [3, 5]
    assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (3, 3, 5, True)


def test_zero_train_loss_uses_the_1e15_guard():
    # train 0 → 0: |0 − 0| / (0 + 1e-15) = 0 < 0.01, test up → overfitting at the second fit
    res = rank_search(lambda r: (0.0, float(r)), 2, 8)
    assert (res.k_low, res.k_high, res.overfitting_detected) == (2, 4, True)


def test_k_min_equals_k_max():
    curve = Curve(lambda r: 1.0, lambda r: 1.0)
    res = rank_search(curve, 7, 7)
    assert curve.calls == [7]
    assert (res.k_optimal, res.k_low, res.k_high, res.overfitting_detected) == (7, 7, 7, False)
    assert res.evaluations == (RankEvaluation(7, 1.0, 1.0, "exponential"),)


def test_defaults_are_rcppml_cv_k_range():
    curve = Curve(lambda r: 100 / r, lambda r: 100 / r)
    rank_search(curve)
    assert curve.calls == [2, 4, 8, 16, 32, 50]  # cv_k_range = c(2, 50)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k_min=0), "The 'k_min' parameter of rank_search must be an int in [1, inf]. Got 0 instead."),
    (dict(k_min=2.0), "The 'k_min' parameter of rank_search must be an int in [1, inf]. Got 2.0 instead."),
    (dict(k_min=True), "The 'k_min' parameter of rank_search must be an int in [1, inf]. Got True instead."),
    (dict(k_min=5, k_max=4), "The 'k_max' parameter of rank_search must be an int in [5, inf]. Got 4 instead."),
    (dict(k_max="50"), "The 'k_max' parameter of rank_search must be an int in [2, inf]. Got '50' instead."),
])
def test_invalid_ranges_name_the_parameter(kwargs, message):
    with pytest.raises(InputError) as e:
        rank_search(lambda r: (1.0, 1.0), **kwargs)
    assert str(e.value) == message


def test_invalid_evaluate():
    with pytest.raises(InputError, match="The 'evaluate' parameter of rank_search must be a callable"):
        rank_search(None)
    for bad in (1.0, (1.0,), (1.0, float("nan")), (1.0, "2"), (1.0, float("inf")), None):
        with pytest.raises(InputError, match=r"'evaluate' parameter of rank_search must return \(train_loss, "
                                             r"test_loss\), two finite real numbers\. Got .* at rank 2\."):
            rank_search(lambda r, bad=bad: bad)


def test_numpy_losses_are_accepted():
    # a fit returns numpy scalars (float32 for float32 input): stored as Python floats
    res = rank_search(lambda r: (np.float32(1.0 / r), np.float64(1.0 / r)), 2, 4)
    assert [type(e.train) for e in res.evaluations] == [float, float] and res.evaluations[0].train == 0.5


def test_plot_draws_the_losses_by_rank():
    res = rank_search(lambda r: (1 + 1 / r ** 3, (r - 11) ** 2 + 5), 2, 50)
    fig = res.plot()
    train, = fig.axes[0].get_lines()[:1]
    test, golden = fig.axes[1].get_lines()[:2]
    ranks = [2, 4, 8, 10, 11, 12, 13, 16]  # the evaluated ranks, sorted
    np.testing.assert_array_equal(train.get_xdata(), ranks)
    np.testing.assert_array_equal(train.get_ydata(), [1 + 1 / r ** 3 for r in ranks])
    np.testing.assert_array_equal(test.get_ydata(), [(r - 11) ** 2 + 5 for r in ranks])
    np.testing.assert_array_equal(golden.get_xdata(), [10, 11, 12, 13])
