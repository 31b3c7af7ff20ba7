"""Cache keys that must move with what they cache (issue 15): the base-model key with the seed
in both roles, and the base models' cached metrics with the metric code's version."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from coun_tune.core import base_models
from coun_tune.core.base_models import cache_key, ensure_base_models, metrics_key
from coun_tune.core.metrics import METRICS_CODE_VERSION
from coun_tune.core.splits import materialize_split


@pytest.mark.parametrize("role", ["original", "oracle"])
def test_base_model_cache_key_changes_with_the_seed(digits, scenario, tmp_path, role):
    split = materialize_split(digits, "random:0.1", 0, tmp_path)
    key0, inputs0 = cache_key(digits, split, scenario, role)
    key1, inputs1 = cache_key(digits, split, dataclasses.replace(scenario, seed=scenario.seed + 1), role)
    assert key0 != key1 and inputs1["seed"] == inputs0["seed"] + 1
    assert cache_key(digits, split, scenario, role)[0] == key0  # and nothing else moved it
    other_role = "oracle" if role == "original" else "original"
    assert cache_key(digits, split, scenario, other_role)[0] != key0


def test_metrics_key_holds_the_split_and_the_metric_code_version():
    assert metrics_key("abc") == f"abc:metrics-v{METRICS_CODE_VERSION}"
    assert metrics_key("abc") != metrics_key("abd")


def test_a_metric_code_change_recomputes_cached_base_model_metrics(prepared, tmp_path, monkeypatch):
    """A copy of the session's cached original/oracle: served from meta.json as they are; with
    METRICS_CODE_VERSION bumped, the same weights (nothing retrained) get their metrics
    recomputed and stored under the new key beside the old ones."""
    src = prepared.base.cache_entries
    for role in ("original", "oracle"):
        shutil.copytree(src[role], tmp_path / "models" / src[role].name)
    args = (prepared.data, prepared.split, prepared.scenario, prepared.scen_data, tmp_path)
    logs: list[str] = []
    again = ensure_base_models(*args, log=logs.append, train_missing=False)
    assert again.from_cache == {"original": True, "oracle": True}
    meta = json.loads((tmp_path / "models" / src["oracle"].name / "meta.json").read_text())
    assert set(meta["metrics_by_split"]) == {metrics_key(prepared.split.split_hash)}

    # poison the cached value: served as-is under the current version, recomputed under the next
    meta["metrics_by_split"][metrics_key(prepared.split.split_hash)]["test_acc"] = -1.0
    (tmp_path / "models" / src["oracle"].name / "meta.json").write_text(json.dumps(meta))
    stale = ensure_base_models(*args, log=logs.append, train_missing=False)
    assert stale.oracle_metrics["test_acc"] == -1.0

    monkeypatch.setattr(base_models, "METRICS_CODE_VERSION", METRICS_CODE_VERSION + 1)
    fresh = ensure_base_models(*args, log=logs.append, train_missing=False)
    assert fresh.from_cache == {"original": True, "oracle": True}  # the weights were not retrained
    assert fresh.oracle_metrics["test_acc"] == prepared.base.oracle_metrics["test_acc"] > 0
    meta = json.loads((tmp_path / "models" / src["oracle"].name / "meta.json").read_text())
    new_key = f"{prepared.split.split_hash}:metrics-v{METRICS_CODE_VERSION + 1}"
    assert new_key in meta["metrics_by_split"] and meta["metrics_by_split"][new_key]["test_acc"] > 0
