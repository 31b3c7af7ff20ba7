"""The knee marked in its run's name (and only its run's, across reviews), and trials whose SVC
MIA is unstable flagged, on a real SQLite store with trials of known metrics.

Trials (forget_gap min, retain_acc max), front {1, 2, 3}:
  1: (0, 80), 2: (1, 95), 3: (2, 98)
knee: min-max scaled forget_gap (0, .5, 1), -retain_acc (1, 3/18, 0); distances to the origin
  1, sqrt(.25 + .0278) = .527, 1 -> trial 2.
Then trial 4 (0, 100) dominates all three: the front is {4}, the knee trial 4.
MIA resample spreads (max - min): trial 1 5 - 3 = 2 (stable), trial 2 86.72 - 3.62 = 83.1
(unstable), trial 3 13.5 - 3.5 = 10.0 (exactly the threshold: not above it, stable).
Trial 2's gaps retain 1, forget 1, test 1, mia 53 -> avg_gap 14; without the MIA term 1.00.
"""

from __future__ import annotations

import io
import os

import pytest

from tests._fake_search import make_search

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

MIA = [(3.0, 5.0), (3.62, 86.72), (3.5, 13.5)]
TRIALS = [
    {"forget_gap": 0.0, "retain_acc": 80.0, "mia_gap": 2.0, "avg_gap": 1.0},
    {"forget_gap": 1.0, "retain_acc": 95.0, "mia_gap": 53.0, "avg_gap": 14.0},
    {"forget_gap": 2.0, "retain_acc": 98.0, "mia_gap": 3.0, "avg_gap": 2.0},
]
for t, (lo, hi) in zip(TRIALS, MIA):
    t.update(mia_efficacy_resample_min=lo, mia_efficacy_resample_max=hi)


def add_trial(client, parent: str, number: int, metrics: dict) -> str:
    """One more finished trial run under the search, as the trial logger leaves it."""
    from coun_tune.tracking.describe import TRIAL_NUMBER
    from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, log_params

    exp = client.get_run(parent).info.experiment_id
    run = client.create_run(
        exp,
        run_name=f"trial {number} · lr 0.{number}",
        tags={PARENT: parent, ROLE: "trial", TRIAL_ID: f"t{number}", TRIAL_NUMBER: str(number)},
    ).info.run_id
    log_params(client, run, {"method": "coun", "lr": number / 100, "epochs": 1})
    for k, v in metrics.items():
        client.log_metric(run, k, v, step=1)
    client.set_terminated(run, status="FINISHED")
    return run


@pytest.fixture
def search(tmp_path):
    uri, client, parent, runs = make_search(tmp_path, TRIALS, name="marks", with_models=False)
    return client, parent, runs


def names(client, runs):
    return [client.get_run(r).info.run_name for r in runs]


def test_the_knee_run_is_named_so_and_loses_the_mark_when_the_knee_moves(search):
    from coun_tune.tracking.review import review_pareto

    client, parent, runs = search
    review_pareto(client, parent, out=io.StringIO())
    review_pareto(client, parent, out=io.StringIO())  # idempotent: one marker, not two
    assert names(client, runs) == ["trial 1", "★ knee · trial 2", "trial 3"]
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "[trial 2 ★ knee](#/experiments/" in note and "[trial 1](" in note and "[trial 3](" in note
    assert [client.get_run(r).data.metrics["is_knee"] for r in runs] == [0.0, 1.0, 0.0]
    assert client.get_run(runs[1]).info.status == "FINISHED"  # renaming leaves the status alone

    runs.append(add_trial(client, parent, 4, {"forget_gap": 0.0, "retain_acc": 100.0}))
    review_pareto(client, parent, out=io.StringIO())
    assert names(client, runs) == ["trial 1", "trial 2", "trial 3", "★ knee · trial 4 · lr 0.4"]


def test_unstable_mia_is_tagged_and_explained(search):
    from coun_tune.tracking.review import review_pareto

    client, parent, runs = search
    out = io.StringIO()
    review_pareto(client, parent, out=out)
    assert [client.get_run(r).data.tags["mia_unstable"] for r in runs] == ["false", "true", "false"]
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    line = next(x for x in note.splitlines() if x.startswith("**MIA unstable**"))
    assert "trial 2: avg_gap 14.00 (1.00 without mia_gap 53.00; MIA spread 83.1)" in line
    assert "trial 1:" not in line and "trial 3:" not in line
    assert "MIA unstable on trial 2 (" in out.getvalue()


def test_no_mia_note_when_every_trial_is_stable(tmp_path):
    from coun_tune.tracking.review import review_pareto

    stable = [{**t, "mia_efficacy_resample_max": t["mia_efficacy_resample_min"] + 1.0} for t in TRIALS]
    uri, client, parent, runs = make_search(tmp_path, stable, name="stable", with_models=False)
    out = io.StringIO()
    review_pareto(client, parent, out=out)
    assert "MIA unstable" not in client.get_run(parent).data.tags["mlflow.note.content"]
    assert "MIA unstable" not in out.getvalue()
    assert {client.get_run(r).data.tags["mia_unstable"] for r in runs} == {"false"}
