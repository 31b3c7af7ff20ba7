"""Pareto fronts, hypervolume and picks against hand-computed answers."""

import numpy as np
import pytest

from coun_tune import pareto
from coun_tune.errors import UsageError

MODES = ["min", "max"]  # forget_gap: min, retain_acc: max


def test_front_hand_computed():
    v = np.array([[1.0, 90.0], [2.0, 95.0], [3.0, 94.0], [0.5, 80.0], [2.0, 95.0], [np.nan, 99.0]])
    # [3, 94] is dominated by [2, 95]; the duplicate [2, 95] stays; NaN rows never count
    assert pareto.non_dominated_mask(v, MODES).tolist() == [True, True, False, True, True, False]


def test_equal_values_from_different_float_paths_tie():
    a = 3.4722222222222223 - 2.083333333333333
    b = 2.083333333333333 - 0.6944444444444444
    assert a != b  # the float paths really differ
    v = np.array([[a, 96.9], [b, 98.8]])
    assert pareto.non_dominated_mask(v, MODES).tolist() == [False, True]


def test_three_objectives():
    v = np.array([[1, 90, 5], [1, 90, 4], [2, 99, 9]], dtype=float)
    assert pareto.non_dominated_mask(v, ["min", "max", "min"]).tolist() == [False, True, True]


def test_hypervolume_2d_hand_computed():
    # minimised points (1,-90), (2,-95), (0.5,-80), reference (100, 0):
    # [0.5,1) x 80 + [1,2) x 90 + [2,100) x 95 = 40 + 90 + 9310
    pts = pareto.to_minimisation(np.array([[1, 90], [2, 95], [0.5, 80]], dtype=float), MODES)
    assert pareto.hypervolume(pts, np.array([100.0, 0.0])) == pytest.approx(9440.0)


def test_hypervolume_3d_boxes():
    # two boxes from the origin-ish: (0,0,0)->(2,1,1) and (0,0,0)->(1,2,1) with ref (2,2,1):
    # union = 2 + 2 - 1 (overlap 1x1x1) = 3
    pts = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert pareto.hypervolume(pts, np.array([2.0, 2.0, 1.0])) == pytest.approx(3.0)


def test_hypervolume_ignores_points_beyond_reference():
    assert pareto.hypervolume(np.array([[5.0, 5.0]]), np.array([4.0, 10.0])) == 0.0


def test_reference_point_percent_and_other():
    ref = pareto.reference_point(
        ["forget_gap", "retain_acc", "wall_seconds"],
        ["min", "max", "min"],
        np.array([[1.0, 90.0, 10.0], [2.0, 95.0, 20.0]]),
    )
    assert ref.tolist() == pytest.approx([100.0, 0.0, 22.0])


def test_knee_is_balanced_point():
    v = np.array([[0.0, 80.0], [1.0, 95.0], [5.0, 100.0]])
    # scaled: (0, 1), (0.2, 0.25), (1, 0) -> distances 1, 0.32, 1
    assert pareto.knee_index(v, MODES) == 1


@pytest.mark.parametrize(
    "pick,expected",
    [
        ("knee", 1),
        ("best:forget_gap", 0),
        ("best:retain_acc", 2),
        ("retain_acc>=99", 2),
        ("forget_gap<=1", 0),
    ],
)
def test_pick_index(pick, expected):
    rows = [
        {"forget_gap": 0.0, "retain_acc": 80.0},
        {"forget_gap": 1.5, "retain_acc": 95.0},
        {"forget_gap": 5.0, "retain_acc": 100.0},
        {"forget_gap": 6.0, "retain_acc": 90.0},
    ]
    assert pareto.pick_index(rows, {"forget_gap": "min", "retain_acc": "max"}, pick) == expected


@pytest.mark.parametrize("pick", ["best", "knee2", "retain_acc=>9", ""])
def test_bad_pick(pick):
    with pytest.raises(UsageError):
        pareto.parse_pick(pick)


def test_unsatisfiable_constraint():
    rows = [{"forget_gap": 0.0, "retain_acc": 80.0}]
    with pytest.raises(UsageError, match="no Pareto trial satisfies"):
        pareto.pick_index(rows, {"forget_gap": "min", "retain_acc": "max"}, "retain_acc>=99")


def test_pareto_facts_agree_with_the_metric_registry():
    from coun_tune.core.metrics import METRICS

    assert pareto.PERCENT_METRICS == {m for m, (_, pct) in METRICS.items() if pct}
    assert pareto.BETTER == {m: better for m, (better, _) in METRICS.items() if better}


def test_best_of_a_metric_without_direction_is_refused():
    rows = [{"forget_gap": 0.0, "retain_acc": 80.0, "forget_acc": 90.0}]
    with pytest.raises(UsageError, match="no better direction"):
        pareto.pick_index(rows, {"forget_gap": "min", "retain_acc": "max"}, "best:forget_acc")


def test_non_dominated_ranks_hand_computed():
    # front {0, 1, 3}; [3, 94] is dominated only by [2, 95] -> rank 1; [4, 70] by [3, 94] too -> rank 2
    v = np.array([[1.0, 90.0], [2.0, 95.0], [3.0, 94.0], [0.5, 80.0], [4.0, 70.0], [np.nan, 99.0]])
    assert pareto.non_dominated_ranks(v, MODES).tolist() == [0, 0, 1, 0, 2, -1]
    # the same points with retain_acc to minimise instead: the order of the fronts turns round
    assert pareto.non_dominated_ranks(v[:5], ["min", "min"]).tolist() == [1, 2, 2, 0, 0]


def test_crowding_distance_hand_computed():
    # a front given out of order: (1, 90), (6, 100), (0, 80), (3, 95); ranges 6 and 20
    # (1, 90): (3 - 0) / 6 + (95 - 80) / 20 = 0.5 + 0.75;  (3, 95): (6 - 1) / 6 + (100 - 90) / 20
    v = np.array([[1.0, 90.0], [6.0, 100.0], [0.0, 80.0], [3.0, 95.0]])
    d = pareto.crowding_distance(v, MODES)
    assert d[0] == pytest.approx(1.25) and d[3] == pytest.approx(5 / 6 + 0.5)
    assert np.isinf(d[1]) and np.isinf(d[2])
    assert np.isinf(pareto.crowding_distance(v[:2], MODES)).all()


def test_normalised_hypervolume_hand_computed():
    # 2-D, 3 points: (forget_gap, retain_acc) = (1, 90), (2, 95), (0.5, 80); reference (100, 0) in the
    # minimised space, ideal (0, -100): HV = 0.5*80 + 1*90 + 98*95 = 9440 of a 100 x 100 box
    v = np.array([[1, 90], [2, 95], [0.5, 80]], dtype=float)
    names = ["forget_gap", "retain_acc"]
    ref = pareto.reference_point(names, MODES, v)
    ideal = pareto.ideal_point(names, MODES, v)
    assert ref.tolist() == [100.0, 0.0] and ideal.tolist() == [0.0, -100.0]
    assert pareto.normalised_hypervolume(pareto.to_minimisation(v, MODES), ref, ideal) == pytest.approx(0.944)


def test_hypervolume_gain_over_a_baseline_by_hand():
    """Minimised (forget_gap, -retain_acc), box from the ideal (0, -100) to ref (100, 0).
    Baseline (the original) (10, -100): it alone dominates [10, 100) x 100 = 9000; 1000 left.
    Front A (2, -95), B (5, -99), plus C (12, -90) which the baseline dominates:
    with the baseline, slices [2,5) x 95 + [5,10) x 99 + [10,100) x 100 = 285 + 495 + 9000 = 9780:
    gain 780, normalised 780 / 1000 = 0.78. The original as the reference point would give 0
    here (no point beats retain_acc 100), which is why the gain is measured this way."""
    from coun_tune.pareto import hypervolume, hypervolume_gain, normalised_hypervolume_gain

    pts = np.array([[2.0, -95.0], [5.0, -99.0], [12.0, -90.0]])
    base, ref, ideal = np.array([10.0, -100.0]), np.array([100.0, 0.0]), np.array([0.0, -100.0])
    assert hypervolume_gain(pts, base, ref) == pytest.approx(780.0)
    assert normalised_hypervolume_gain(pts, base, ref, ideal) == pytest.approx(0.78)
    assert hypervolume(pts, base) == 0.0  # the degenerate reference point
    assert hypervolume_gain(pts[2:], base, ref) == 0.0  # dominated by doing nothing: no gain
    assert normalised_hypervolume_gain(np.array([[0.0, -100.0]]), base, ref, ideal) == pytest.approx(1.0)


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_a_tied_knee_does_not_depend_on_row_order(order):
    """A two-point front: both points scale to (0, 1) and (1, 0), distance 1 from the ideal.
    The tie goes to the better first objective (forget_gap 0.69, min) in either row order."""
    front = np.array([[0.69, 95.98], [1.39, 98.30]])[order]
    chosen = front[pareto.knee_index(front, ["min", "max"])]
    assert chosen.tolist() == [0.69, 95.98]
    # the first objective decides, whichever it is: with retain_acc first, 98.30 (max) wins
    swapped = front[:, ::-1]
    assert swapped[pareto.knee_index(swapped, ["max", "min"])].tolist() == [98.30, 1.39]
