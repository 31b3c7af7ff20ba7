"""Scenarios beyond random forgetting: class-wise, sequential; and the digits claim that CoUn
moves the forget gap towards the oracle's."""

import numpy as np
import pytest

from coun_tune.core.pipeline import prepare, unlearn, unlearn_sequential
from coun_tune.core.recipes import Scenario
from coun_tune.core.splits import sequential_splits


def test_classwise_oracle_has_ua_and_mia_100(digits, session_cache_dir):
    prep = prepare(
        Scenario(dataset="digits", forget="class:3", seed=0, recipe="tiny"),
        session_cache_dir,
        "cpu",
        log=lambda s: None,
        data=digits,
    )
    assert set(digits.train_y[prep.split.forget_idx]) == {3}
    assert 3 not in set(digits.test_y[prep.split.test_idx])  # the forgotten class leaves the test set
    assert prep.base.oracle_metrics["unlearn_acc"] == 100.0
    assert prep.base.oracle_metrics["mia_efficacy"] == 100.0
    assert prep.base.original_metrics["unlearn_acc"] < 10.0  # the original still knows class 3


def test_original_is_shared_across_forget_specs(digits, session_cache_dir, prepared):
    other = prepare(
        Scenario(dataset="digits", forget="random:0.2", seed=0, recipe="tiny"),
        session_cache_dir,
        "cpu",
        log=lambda s: None,
        data=digits,
    )
    assert other.base.from_cache["original"]  # trained on all of D: one original per dataset/recipe/seed
    assert other.base.cache_entries["original"] == prepared.base.cache_entries["original"]
    assert other.base.cache_entries["oracle"] != prepared.base.cache_entries["oracle"]


def test_sequential_requests_are_disjoint_and_retain_is_the_rest(digits, tmp_path):
    specs = ["random:0.05", "class:3", "random:0.05", "class:7:0.5"]
    splits = sequential_splits(digits, specs, 0, tmp_path)
    n = len(digits.train_y)
    requests, before = [], np.zeros(0, dtype=np.int64)
    for s in splits:
        assert np.all(np.isin(before, s.forget_idx))  # cumulative
        request = np.setdiff1d(s.forget_idx, before)
        assert len(request) > 0
        for earlier in requests:
            assert len(np.intersect1d(earlier, request)) == 0
        requests.append(request)
        before = s.forget_idx
        assert len(np.intersect1d(s.forget_idx, s.retain_idx)) == 0
    all_requests = np.concatenate(requests)
    assert np.array_equal(splits[-1].retain_idx, np.setdiff1d(np.arange(n), all_requests))
    assert len(requests[0]) == len(requests[2]) == round(0.05 * n)
    assert set(digits.train_y[requests[1]]) == {3} and not np.any(digits.train_y[splits[-1].retain_idx] == 3)
    assert 3 not in set(digits.test_y[splits[-1].test_idx])
    # the same requests give the same files; written once
    again = sequential_splits(digits, specs, 0, tmp_path)
    assert [s.split_hash for s in again] == [s.split_hash for s in splits]


def test_sequential_unlearning_measures_each_request_against_its_oracle(digits, session_cache_dir):
    scen = Scenario(dataset="digits", forget=("random:0.05", "random:0.05"), seed=0, recipe="tiny")
    model, records = unlearn_sequential(
        scen, "coun", {"epochs": 1}, cache_dir=session_cache_dir, device="cpu", log=lambda s: None, data=digits
    )
    assert [r["request"] for r in records] == [1, 2]
    assert records[1]["num_forget"] > records[0]["num_forget"]
    assert records[0]["split_hash"] != records[1]["split_hash"]
    for r in records:
        assert np.isfinite(r["unlearned"]["avg_gap"])
        assert r["unlearned"]["forget_gap"] == pytest.approx(
            abs(r["unlearned"]["unlearn_acc"] - r["oracle"]["unlearn_acc"])
        )


def test_coun_beats_the_original_gaps_on_digits_half(tmp_path_factory):
    """The acceptance check with the shipped digits recipe on a scenario where the original's
    gaps stand above the oracle's seed noise (random 50%; at 10% the original is already within
    it, so "beats the original" there is a coin flip). Measured (seed 0, CPU): original
    forget_gap 1.39 / avg_gap 1.57 -> CoUn (tau 0.3, lambda 1, lr 0.05, 10 epochs) 0.00 / 0.38."""
    cache = tmp_path_factory.mktemp("digits_recipe")
    prep = prepare(Scenario(dataset="digits", forget="random:0.5", seed=0), cache, "cpu", log=lambda s: None)
    original = prep.base.original_metrics
    assert original["retain_acc"] >= 99.0  # the original memorized D
    assert original["forget_gap"] > 1.0 and original["avg_gap"] > 1.0
    _, metrics = unlearn(prep, "coun", {"temperature": 0.3, "cl_weight": 1.0, "lr": 0.05, "epochs": 10})
    assert metrics["forget_gap"] < original["forget_gap"] - 0.5
    assert metrics["avg_gap"] < original["avg_gap"] - 0.5
    assert metrics["retain_acc"] >= 97.0
    second = prepare(Scenario(dataset="digits", forget="random:0.5", seed=0), cache, "cpu", log=lambda s: None)
    assert second.base.from_cache == {"original": True, "oracle": True}
    assert second.base.oracle_metrics == prep.base.oracle_metrics


def test_oracle_seed_spread_is_the_gap_between_retrained_oracles(prepared, session_cache_dir, digits):
    from coun_tune.core.base_models import ensure_base_models, oracle_seed_spread
    from coun_tune.core.metrics import gaps

    args = (
        digits,
        prepared.split,
        prepared.scenario,
        prepared.scen_data,
        session_cache_dir,
        prepared.base.oracle_metrics,
    )
    assert oracle_seed_spread(*args, 1, log=lambda s: None) == {}
    noise = oracle_seed_spread(*args, 2, log=lambda s: None)
    other = ensure_base_models(
        digits,
        prepared.split,
        Scenario(**{**prepared.scenario.to_dict(), "seed": 1}),
        prepared.scen_data,
        session_cache_dir,
        lambda s: None,
        roles=("oracle",),
    )
    assert other.from_cache["oracle"]  # trained by the spread, cached like any oracle
    expected = gaps(other.oracle_metrics, prepared.base.oracle_metrics)
    assert noise["oracle_noise_avg_gap"] == pytest.approx(expected["avg_gap"])
    assert noise["oracle_noise_seeds"] == 1.0


def test_split_seed_draws_another_forget_set_for_the_same_original(prepared, digits, session_cache_dir):
    from dataclasses import replace

    other = prepare(replace(prepared.scenario, split_seed=5), session_cache_dir, "cpu", log=lambda s: None, data=digits)
    assert not np.array_equal(other.split.forget_idx, prepared.split.forget_idx)
    assert len(other.split.forget_idx) == len(prepared.split.forget_idx)
    assert other.base.cache_entries["original"] == prepared.base.cache_entries["original"]  # the deployed model
    assert other.base.cache_entries["oracle"] != prepared.base.cache_entries["oracle"]  # its own oracle
