"""The runner's plan, without Ray: search directories (claimed atomically, found again by
--resume), the search state, the spec hash, and spec fields for cluster storage."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from coun_tune.config.search_spec import validate_search_spec
from coun_tune.errors import UsageError
from coun_tune.search.plan import SEARCH_STATE, SearchState, claim_search_dir, latest_search, spec_hash

DOC = {
    "name": "p",
    "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"},
    "method": "coun",
    "space": {"temperature": {"log": [0.03, 0.3]}, "epochs": 1},
    "num_samples": 2,
}


def test_searches_started_at_once_get_their_own_directories(tmp_path, monkeypatch):
    import coun_tune.search.plan as plan

    monkeypatch.setattr(plan.time, "strftime", lambda fmt: "20260101-120000")  # all in the same second
    got, errors = [], []

    def claim():
        try:
            got.append(claim_search_dir(str(tmp_path), "p"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 8 and len(set(got)) == 8
    assert sorted(Path(g).name for g in got) == sorted(p.name for p in tmp_path.iterdir())
    assert sorted(Path(g).name for g in got) == sorted(
        ["p_20260101-120000"] + [f"p_20260101-120000-{k}" for k in range(2, 9)]
    )


def test_resume_finds_the_latest_search_of_its_spec(tmp_path):
    for name in (
        "p_20260101-000000",
        "p_20260101-000000-2",
        "p_20260101-000000-10",
        "p_20251231-235959",
        "p_x_20270101-000000",
        "pp_20270101-000000",
        "p_20270101-000000",
    ):
        (tmp_path / name).mkdir()
        if name != "p_20270101-000000":  # the newest has no state yet (its start failed): skipped
            (tmp_path / name / SEARCH_STATE).write_text("{}")
    assert Path(latest_search(str(tmp_path), "p")).name == "p_20260101-000000-10"
    assert Path(latest_search(str(tmp_path), "p_x")).name == "p_x_20270101-000000"
    with pytest.raises(UsageError, match="no search named 'q'"):
        latest_search(str(tmp_path), "q")


def test_search_state_round_trips_and_a_broken_one_is_one_line(tmp_path):
    state = SearchState("run1", "7", "sqlite:///x.db", "abc", status="interrupted")
    state.save(str(tmp_path))
    assert SearchState.load(str(tmp_path)) == state
    assert json.loads((tmp_path / SEARCH_STATE).read_text())["spec_hash"] == "abc"
    (tmp_path / SEARCH_STATE).write_text("{not json")
    with pytest.raises(UsageError, match="unreadable"):
        SearchState.load(str(tmp_path))


def test_spec_hash_ignores_layout_and_sees_every_value():
    a = validate_search_spec(dict(DOC))
    b = validate_search_spec(dict(reversed(list(DOC.items()))))
    c = validate_search_spec({**DOC, "num_samples": 3})
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)


def test_cluster_storage_fields():
    spec = validate_search_spec(
        {
            **DOC,
            "storage_path": "s3://bucket/searches",
            "cache_dir": "s3://bucket/cache",
            "storage_endpoint": "http://127.0.0.1:9000",
            "scheduler": {"type": "mo_asha", "grace_epochs": 2},
            "space": {"temperature": {"log": [0.03, 0.3]}, "epochs": {"int": [2, 4]}},  # a rung at 2 exists
        }
    )
    assert (spec.storage_path, spec.cache_dir, spec.storage_endpoint) == (
        "s3://bucket/searches",
        "s3://bucket/cache",
        "http://127.0.0.1:9000",
    )
    assert spec.scheduler == {"type": "mo_asha", "grace_epochs": 2, "reduction_factor": 2}
    plain = validate_search_spec(dict(DOC))
    assert plain.scheduler is None and plain.storage_endpoint is None and plain.cache_dir is None


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_tpe_and_gp_use_their_model_after_half_the_budget(sampler):
    """Optuna's TPE and GP draw their first 10 trials at random by default, which made an
    8-trial search random search. Here: the first 4 of 8 are the random sampler's draws (same
    seed), the 5th comes from the model. Real Optuna, a toy two-objective function."""
    import optuna

    from coun_tune.search.runner import make_sampler, optuna_space

    doc = {**DOC, "space": {"temperature": {"log": [0.03, 0.3]}, "lr": {"log": [0.01, 0.1]}, "epochs": 1}}
    spec = validate_search_spec({**doc, "num_samples": 8, "sampler": sampler, "seed": 3})
    dists = optuna_space(spec.space)

    def proposals(s) -> list[dict]:
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=s)
        for _ in range(spec.num_samples):
            t = study.ask(dists)
            study.tell(t, [(t.params["lr"] - 0.03) ** 2, -abs(t.params["temperature"] - 0.1)])
        return [t.params for t in study.trials]

    model, random = proposals(make_sampler(spec)), proposals(optuna.samplers.RandomSampler(seed=3))
    assert model[:4] == random[:4]
    assert model[4] != random[4]
