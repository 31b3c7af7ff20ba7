"""Unlearning metrics (METHOD.md section 4) on hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from coun_tune.core.metrics import GAP_OF, gaps, loss_attack_accuracy, mia_metrics, svc_mia_efficacy

# ------------------------------------------------------------------------------ SVC MIA


@pytest.fixture(scope="module")
def separated():
    """Members (retain) near-certain, non-members (test) spread over [0.2, 0.9]."""
    rng = np.random.default_rng(0)
    return rng.uniform(0.99, 1.0, 400), rng.uniform(0.2, 0.9, 400), rng


def test_svc_mia_forget_like_nonmembers_is_near_100(separated):
    members, nonmembers, rng = separated
    forget = rng.uniform(0.2, 0.9, 300)
    assert svc_mia_efficacy(members, nonmembers, forget) > 97.0


def test_svc_mia_forget_like_members_is_near_0(separated):
    members, nonmembers, rng = separated
    forget = rng.uniform(0.99, 1.0, 300)
    assert svc_mia_efficacy(members, nonmembers, forget) < 3.0


def test_svc_mia_is_a_fraction_of_the_forget_set(separated):
    members, nonmembers, _ = separated
    # 3 clear non-members, 1 clear member -> exactly 75
    forget = np.array([0.3, 0.5, 0.7, 0.999])
    assert svc_mia_efficacy(members, nonmembers, forget) == pytest.approx(75.0)


# ------------------------------------------------------------------------ loss attack


def test_loss_attack_perfectly_separated_is_100():
    assert loss_attack_accuracy(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]), seed=0) == pytest.approx(100.0)


def test_loss_attack_hand_computed():
    # sorted: 0.1F 0.3T 0.5F 1.0T 2.0T 2.5F; predicting "forget" for the k lowest gives
    # accuracies 4/6, 3/6, 4/6, 3/6, 2/6, 3/6 -> best 4/6
    forget, test = np.array([0.1, 0.5, 2.5]), np.array([0.3, 1.0, 2.0])
    assert loss_attack_accuracy(forget, test, seed=0) == pytest.approx(100 * 4 / 6)
    assert loss_attack_accuracy(forget, test, seed=123) == pytest.approx(100 * 4 / 6)  # same sets, any order


def test_loss_attack_reversed_is_floored_at_50():
    # forget losses all above test losses: no "low loss = member" threshold beats chance
    assert loss_attack_accuracy(np.array([5.0, 6.0]), np.array([1.0, 2.0]), seed=0) == pytest.approx(50.0)


def test_loss_attack_identical_values_is_50():
    # a threshold cannot split tied losses (saturated models give many exact 0.0 losses)
    assert loss_attack_accuracy(np.zeros(20), np.zeros(20), seed=0) == pytest.approx(50.0)
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert loss_attack_accuracy(a, a.copy(), seed=0) == pytest.approx(50.0)


def test_loss_attack_ties_hand_computed():
    # forget all 0; test half 0, half 1: best cut predicts "forget" for every 0 -> (4 + 2) / 8
    forget, test = np.zeros(4), np.array([0.0, 0.0, 1.0, 1.0])
    assert loss_attack_accuracy(forget, test, seed=0) == pytest.approx(75.0)


def test_loss_attack_same_distribution_is_near_50():
    rng = np.random.default_rng(1)
    acc = loss_attack_accuracy(rng.exponential(1.0, 2000), rng.exponential(1.0, 3000), seed=0)
    assert 50.0 <= acc < 54.0


def test_loss_attack_uses_equal_sizes():
    # 3 forget samples, 100 test samples far above them: a subset of 3 test losses is drawn
    rng = np.random.default_rng(2)
    assert loss_attack_accuracy(np.array([0.0, 0.1, 0.2]), rng.uniform(5, 6, 100), seed=0) == pytest.approx(100.0)


# -------------------------------------------------------------------------------- gaps

ORACLE = {"retain_acc": 100.00, "forget_acc": 95.19, "unlearn_acc": 4.81, "test_acc": 94.67, "mia_efficacy": 11.02}
COUN = {"retain_acc": 99.99, "forget_acc": 95.88, "unlearn_acc": 4.12, "test_acc": 94.57, "mia_efficacy": 10.81}


def test_gaps_paper_coun_row():
    g = gaps(COUN, ORACLE)
    assert set(g) == {"retain_gap", "forget_gap", "test_gap", "mia_gap", "avg_gap"}
    assert g["retain_gap"] == pytest.approx(0.01)
    assert g["forget_gap"] == pytest.approx(0.69)
    assert g["test_gap"] == pytest.approx(0.10)
    assert g["mia_gap"] == pytest.approx(0.21)
    assert g["avg_gap"] == pytest.approx(0.2525)
    # forget_gap is |UA - UA*| = |FA - FA*|
    assert g["forget_gap"] == pytest.approx(abs(COUN["forget_acc"] - ORACLE["forget_acc"]))


def test_gaps_are_absolute_and_symmetric():
    g1, g2 = gaps(COUN, ORACLE), gaps(ORACLE, COUN)
    for k in g1:
        assert g1[k] == pytest.approx(g2[k]) and g1[k] >= 0


def test_gaps_to_self_are_zero():
    assert all(v == 0.0 for v in gaps(ORACLE, ORACLE).values())


def test_gaps_without_mia_omit_mia_and_avg():
    no_mia = {k: v for k, v in COUN.items() if k != "mia_efficacy"}
    g = gaps(no_mia, ORACLE)
    assert set(g) == {"retain_gap", "forget_gap", "test_gap"}
    assert g["forget_gap"] == pytest.approx(0.69)
    # missing on the oracle's side too
    g = gaps(COUN, {k: v for k, v in ORACLE.items() if k != "mia_efficacy"})
    assert "avg_gap" not in g and "mia_gap" not in g


def test_gap_names():
    assert GAP_OF == {
        "retain_gap": "retain_acc",
        "forget_gap": "unlearn_acc",
        "test_gap": "test_acc",
        "mia_gap": "mia_efficacy",
    }


# ------------------------------------------------------------------------- mia_metrics


def test_mia_metrics_saturation_fractions():
    # 10 retain, 10 test: the member subset is all of retain. 0.999 itself is not "above".
    retain = np.array([0.9995, 1.0, 0.99991, 0.9999, 0.999, 0.5, 0.6, 0.7, 0.8, 0.9])
    test = np.array([1.0, 0.999, 0.3, 0.4, 0.5, 0.6, 0.2, 0.1, 0.25, 0.35])
    forget = np.array([0.3, 0.95, 1.0])
    m = mia_metrics(retain, test, forget, seed=0)
    assert m["mia_member_saturated"] == pytest.approx(40.0)
    assert m["mia_nonmember_saturated"] == pytest.approx(10.0)
    assert m["mia_efficacy_resample_min"] <= m["mia_efficacy"] <= m["mia_efficacy_resample_max"]
    for k in ("mia_efficacy", "mia_efficacy_resample_min", "mia_efficacy_resample_max"):
        # a fraction of 3 forget samples
        assert round(m[k] * 3 / 100, 9) in (0.0, 1.0, 2.0, 3.0)
    assert mia_metrics(retain, test, forget, seed=0) == m  # seeded


def test_mia_metrics_member_subset_size_of_test():
    # 30 retain (20 saturated), 10 test: members are 10 of the retain samples
    retain = np.concatenate([np.full(20, 0.9999), np.full(10, 0.5)])
    test = np.full(10, 0.4)
    m = mia_metrics(retain, test, np.array([0.9999]), seed=3)
    frac = m["mia_member_saturated"]
    assert frac in [pytest.approx(10.0 * k) for k in range(11)]
    assert m["mia_nonmember_saturated"] == 0.0
    all_sat = mia_metrics(np.full(30, 0.99999), np.full(10, 0.5), np.array([0.5]), seed=3)
    assert all_sat["mia_member_saturated"] == pytest.approx(100.0)
    assert all_sat["mia_efficacy"] == pytest.approx(100.0)  # a forget sample at 0.5 looks like the test set


# ------------------------------------------------------------- the loss attack in evaluate


def test_evaluate_loss_attack_direction_forget_low_loss_test_high_is_100():
    """Through `evaluate` on a fixed model: every forget sample is classified right with a
    confident margin (low loss), every test sample wrong (high loss), so the attack that
    calls "forget" the low-loss side separates them perfectly: 100. Swapping the forget and
    test losses, or thresholding the other way, gives 50."""
    import torch
    from torch import nn

    from coun_tune.core.batching import Augmenter, DeviceSplit
    from coun_tune.core.dataset_arrays import AugmentPolicy
    from coun_tune.core.metrics import evaluate
    from coun_tune.core.model_base import FeatureClassifier

    class Sign(FeatureClassifier):
        """logits = 8 * (d, -d), d = pixel 0 - pixel 1 (normalised): class 0 when d > 0."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Identity()
            self.feature_dim = 2
            self.dummy = nn.Parameter(torch.zeros(1))

        def features(self, x):
            d = x[:, 0, 0, 0] - x[:, 0, 0, 1]
            return 8 * torch.stack([d, -d], 1) + self.dummy

    rng = np.random.default_rng(0)

    def split(n, label_is_right):
        x = np.zeros((n, 1, 1, 2), np.uint8)
        pos = rng.random(n) < 0.5
        x[:, 0, 0, 0] = np.where(pos, rng.integers(180, 256, n), rng.integers(0, 60, n))
        x[:, 0, 0, 1] = np.where(pos, rng.integers(0, 60, n), rng.integers(180, 256, n))
        right = np.where(pos, 0, 1)
        y = right if label_is_right else 1 - right
        return DeviceSplit(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    retain, forget, test = split(40, True), split(20, True), split(30, False)
    aug = Augmenter(AugmentPolicy(crop_padding=0, flip=False, mean=(0.0,), std=(1.0,)), "cpu")
    m = evaluate(Sign(), retain, forget, test, aug, seed=0)
    assert m["forget_acc"] == 100.0 and m["test_acc"] == 0.0  # the data are what the docstring says
    assert m["mia_loss_attack_acc"] == pytest.approx(100.0)
