"""Calibration over several forget sets and the hold-out check: the pure parts (issue 14).

Every expected value is computed by hand in the test (means, sample stds with n - 1, standard
errors, ranks), never by the function under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coun_tune.calibration import holdout_band, holdout_flag, is_split_metric, sample_std, spearman, summarise_splits
from coun_tune.config.search_spec import validate_search_spec
from coun_tune.core.recipes import Scenario
from coun_tune.errors import UsageError
from coun_tune.tracking.review import CALIBRATION, HOLDOUT, pick_basis

SPLITS = {
    0: {"forget_gap": 1.0, "retain_acc": 99.0, "test_acc": 97.0, "epoch": 2.0},
    1: {"forget_gap": 2.0, "retain_acc": 98.0, "test_acc": 96.0, "epoch": 2.0},
    2: {"forget_gap": 4.5, "retain_acc": 97.0, "test_acc": 95.0, "epoch": 2.0, "mia_efficacy": 50.0},
}


def test_summary_is_the_mean_under_the_metric_name_with_sample_std_and_each_split():
    out = summarise_splits(SPLITS, ["forget_gap", "retain_acc"])
    assert out["forget_gap"] == pytest.approx(7.5 / 3)  # (1 + 2 + 4.5) / 3
    # sample std, n - 1: deviations -1.5, -0.5, 2.0 -> (2.25 + 0.25 + 4) / 2 = 3.25
    assert out["forget_gap_std"] == pytest.approx(math.sqrt(3.25))
    assert out["retain_acc"] == pytest.approx(98.0)
    assert out["retain_acc_std"] == pytest.approx(1.0)  # deviations 1, 0, -1 -> 2 / 2
    assert (out["forget_gap_split0"], out["forget_gap_split1"], out["forget_gap_split2"]) == (1.0, 2.0, 4.5)
    assert out["test_acc"] == pytest.approx(96.0) and "test_acc_std" not in out  # not a detail metric
    assert "mia_efficacy" not in out  # only one split measured it (an epoch without the MIA)
    assert out["epoch"] == 2.0


def test_one_split_reports_that_split_unchanged():
    assert summarise_splits({7: SPLITS[0]}, ["forget_gap"]) == SPLITS[0]


def test_sample_std_uses_n_minus_one_and_is_nan_for_one_value():
    assert sample_std([2.0, 4.0]) == pytest.approx(math.sqrt(2.0))  # (1 + 1) / 1
    assert math.isnan(sample_std([3.0]))


def test_holdout_band_is_two_standard_errors_of_the_difference_plus_noise():
    # s_c = 0.3 over 3 splits, s_h = 0.4 over 2: sqrt(0.09/3 + 0.16/2) = sqrt(0.11)
    assert holdout_band(0.3, 3, 0.4, 2) == pytest.approx(2 * math.sqrt(0.11))
    assert holdout_band(0.3, 3, 0.4, 2, noise=0.25) == pytest.approx(2 * math.sqrt(0.11) + 0.25)
    assert holdout_band(float("nan"), 1, 0.4, 2) == pytest.approx(2 * math.sqrt(0.08))  # one split: no std


def test_holdout_flag_fires_outside_the_band_only():
    hold = [1.0, 1.4]  # mean 1.2, sample std sqrt(0.08); band = 2 * sqrt(0.04/3 + 0.08/2) = 0.4619
    band = 2 * math.sqrt(0.2**2 / 3 + 0.08 / 2)
    assert not holdout_flag(1.2 - band + 0.01, 0.2, 3, hold)
    assert holdout_flag(1.2 - band - 0.01, 0.2, 3, hold)
    assert holdout_flag(1.2 + band + 0.01, 0.2, 3, hold)  # either direction
    assert not holdout_flag(1.2 + band + 0.01, 0.2, 3, hold, noise=0.05)  # the oracle's own noise widens it


def test_spearman_against_hand_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1 2 3 4; y = [1, 3, 2, 4] -> d^2 = 0 + 1 + 1 + 0 = 2; rho = 1 - 6*2 / (4*15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties share the mean rank: y = [1, 1, 2] -> ranks 1.5 1.5 3; Pearson of (1,2,3) and that
    r = np.corrcoef([1, 2, 3], [1.5, 1.5, 3])[0, 1]
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(r)
    assert math.isnan(spearman([1, 2], [2, 1]))


def test_split_metric_names():
    for k in ("forget_gap_std", "forget_gap_split12", "retain_acc_split0", "holdout_forget_gap_mean"):
        assert is_split_metric(k), k
    for k in ("forget_gap", "split_hash", "retain_acc_splits", "holdout_flag"):
        assert not is_split_metric(k), k


def _row(run, fg, ra, hfg=None, hra=None):
    r = {"run_id": run, "trial_id": run, "trial_number": run, "forget_gap": fg, "retain_acc": ra}
    if hfg is not None:
        r.update(holdout_forget_gap_mean=hfg, holdout_retain_acc_mean=hra, holdout_n=3.0)
    return r


def test_picks_use_hold_out_means_when_they_exist():
    """On calibration, trial a (lowest gap) is the best forget_gap; on the hold-out splits it
    is c: best:forget_gap and the knee follow the hold-out means, and only validated trials
    (those with hold-out values) are candidates."""
    from coun_tune import pareto

    rows = [
        _row("a", 0.1, 98.0, hfg=1.5, hra=98.2),
        _row("b", 0.5, 99.0, hfg=0.9, hra=99.1),
        _row("c", 1.4, 99.5, hfg=0.2, hra=99.8),
        _row("d", 0.05, 90.0),  # on no hold-out: never picked once a hold-out exists
    ]
    objectives = {"forget_gap": "min", "retain_acc": "max"}
    assert rows[pareto.pick_index(rows, objectives, "best:forget_gap")]["run_id"] == "d"  # calibration's answer
    view, basis = pick_basis(rows, list(objectives))
    assert basis == HOLDOUT and [r["run_id"] for r in view] == ["a", "b", "c"]
    assert view[0]["forget_gap"] == 1.5 and view[0]["calibration_forget_gap"] == 0.1
    assert view[pareto.pick_index(view, objectives, "best:forget_gap")]["run_id"] == "c"
    # on the hold-out means c dominates a and b: it is the whole front, hence the knee
    assert view[pareto.pick_index(view, objectives, "knee")]["run_id"] == "c"
    plain, basis = pick_basis(rows[3:], list(objectives))
    assert basis == CALIBRATION and plain == rows[3:]


# --- the spec ---------------------------------------------------------------------------------

BASE = {
    "name": "s",
    "scenario": {"dataset": "digits", "forget": "random:0.5", "seed": 0},
    "space": {"lr": {"log": [0.01, 0.1]}, "epochs": {"int": [2, 5]}},
}


def test_spec_calibration_and_holdout():
    spec = validate_search_spec(
        {**BASE, "calibration": {"split_seeds": [0, 1, 2]}, "holdout": {"split_seeds": [100, 101]}, "oracle_seeds": 3}
    )
    assert spec.calibration_seeds == (0, 1, 2) and spec.holdout_seeds == (100, 101) and spec.oracle_seeds == 3
    default = validate_search_spec({**BASE, "scenario": {**BASE["scenario"], "seed": 4}})
    assert default.calibration_seeds == (4,) and default.holdout_seeds == () and default.oracle_seeds == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"holdout": {"split_seeds": [1, 100]}, "calibration": {"split_seeds": [0, 1]}}, "must be unseen"),
        ({"holdout": {"split_seeds": [0]}}, "must be unseen"),  # the default calibration is the scenario's seed 0
        ({"calibration": {"split_seeds": []}}, "non-empty list"),
        ({"calibration": {"split_seeds": [0, 0]}}, "twice"),
        ({"calibration": {"split_seeds": [0, -1]}}, "integer >= 0"),
        ({"calibration": {"split_seeds": [0, 1.5]}}, "integer >= 0"),
        ({"calibration": [0, 1]}, "{split_seeds: [seed, ...]}"),
        ({"holdout": {"seeds": [3]}}, "{split_seeds: [seed, ...]}"),
        ({"oracle_seeds": 0}, "oracle_seeds"),
        ({"scheduler": {"type": "mo_asha", "grace_epochs": 6}}, "grace_epochs 6 is above"),
    ],
)
def test_bad_split_specs_are_one_line(extra, needle):
    with pytest.raises(UsageError, match=None) as e:
        validate_search_spec({**BASE, **extra})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_with_split_keeps_the_original_and_the_identity_of_the_own_split():
    s = Scenario(dataset="digits", forget="random:0.5", seed=3)
    assert s.with_split(3) is s  # the default calibration split: the scenario itself
    other = s.with_split(7)
    assert other.forget_seed == 7 and other.seed == 3  # the same original (its seed), another forget set
