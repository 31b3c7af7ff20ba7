"""The Pareto review writes back what the MLflow UI needs, on a real SQLite store with trials
of known metrics, against hand computations.

Trials (forget_gap min, retain_acc max):
  1: (0, 80), 2: (1, 95), 3: (2, 98), 4: (4, 99.5)  the front (rank 0)
  5: (3, 90)  dominated by 2 and 3; 6: (5, 99) dominated by 4   rank 1
  7: (6, 85)  dominated by 5 too                                rank 2
Crowding distance on the front (ranges 4 and 19.5): trial 2: (2-0)/4 + (98-80)/19.5 = 1.4231,
  trial 3: (4-1)/4 + (99.5-95)/19.5 = 0.9808; the extremes 1 and 4 are infinite: logged as m+1 = 3.
Hypervolume over doing nothing: the original (_fake_search.BASE_MODELS) has forget_gap 10
  (forget_acc 100 vs the oracle's 90) and retain_acc 100; alone it dominates [10,100) x 100 =
  9000 of the box [0,100] x [0,100], leaving 1000 to gain. Front + original:
  [0,1) x 80 + [1,2) x 95 + [2,4) x 98 + [4,10) x 99.5 + 9000 = 80 + 95 + 196 + 597 + 9000 = 9968:
  gain 968 -> 0.968 (the front alone would score 0.9923 of the box, the original alone 0.9).
History in order of completion (trials end in order 1..7): after trial 1 [0,10) x 80 = 800 ->
  0.8; after 2: 80 + [1,10) x 95 = 935 -> 0.935; after 3: 80 + 95 + [2,10) x 98 = 959 -> 0.959;
  after 4: 0.968, and 5, 6, 7 (dominated) leave it there.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from tests._fake_search import make_search

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRIALS = [(0.0, 80.0), (1.0, 95.0), (2.0, 98.0), (4.0, 99.5), (3.0, 90.0), (5.0, 99.0), (6.0, 85.0)]
RANKS = [0, 0, 0, 0, 1, 1, 2]


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    from coun_tune.tracking.review import review_pareto

    root = tmp_path_factory.mktemp("review")
    uri, client, parent, runs = make_search(
        root, [{"forget_gap": f, "retain_acc": r} for f, r in TRIALS], name="reviewed", with_models=False
    )
    out = io.StringIO()
    review_pareto(client, parent, out=out)
    review_pareto(client, parent, out=io.StringIO())  # again (as `coun-tune pareto` would): idempotent
    return uri, client, parent, runs, out.getvalue()


def test_pareto_metrics_on_every_trial(reviewed):
    uri, client, parent, runs, _ = reviewed
    got = [client.get_run(r).data.metrics for r in runs]
    assert [m["pareto_rank"] for m in got] == RANKS
    assert [m["is_pareto"] for m in got] == [1.0 if r == 0 else 0.0 for r in RANKS]
    assert [client.get_run(r).data.tags["pareto"] for r in runs] == ["true" if r == 0 else "false" for r in RANKS]
    cd = [m["crowding_distance"] for m in got[:4]]
    assert cd == pytest.approx([3.0, 2 / 4 + 18 / 19.5, 3 / 4 + 4.5 / 19.5, 3.0])
    colours = [client.get_run(r).data.tags["mlflow.runColor"] for r in runs]
    assert len(set(colours[:4])) == 1 and colours[4] != colours[0]


def test_hypervolume_over_doing_nothing_against_hand_computation(reviewed):
    uri, client, parent, runs, out = reviewed
    m = client.get_run(parent).data.metrics
    assert m["hypervolume_raw"] == pytest.approx(968.0)
    assert m["hypervolume"] == pytest.approx(0.968)
    assert m["pareto_size"] == 4
    tags = client.get_run(parent).data.tags
    assert json.loads(tags["hypervolume_reference"]) == {"forget_gap": 10.0, "retain_acc": 100.0}  # the original
    assert json.loads(tags["hypervolume_box"]) == {
        "worst": {"forget_gap": 100.0, "retain_acc": 0.0},
        "ideal": {"forget_gap": 0.0, "retain_acc": 100.0},
    }
    said = "0.9680 over doing nothing: the share of what the untouched original (forget_gap 10, retain_acc 100"
    assert f"hypervolume {said}" in out and f"**Hypervolume**: {said}" in tags["mlflow.note.content"]


def test_hypervolume_history_one_point_per_completed_trial(reviewed):
    """Logged by two reviews, kept once: step k = the k-th completed trial."""
    uri, client, parent, runs, out = reviewed
    history = sorted(client.get_metric_history(parent, "hypervolume_history"), key=lambda h: h.step)
    assert [h.step for h in history] == [1, 2, 3, 4, 5, 6, 7]
    assert [h.value for h in history] == pytest.approx([0.8, 0.935, 0.959, 0.968, 0.968, 0.968, 0.968])
    ends = sorted(client.get_run(r).info.end_time for r in runs)
    assert [h.timestamp for h in history] == ends


def test_original_and_oracle_are_baseline_runs_under_the_search(reviewed):
    from coun_tune.tracking.review import trial_rows

    uri, client, parent, runs, _ = reviewed
    exp = client.get_run(parent).info.experiment_id
    base = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`coun_tune.role` = 'baseline'"
    )
    assert sorted(b.data.tags["coun_tune.baseline"] for b in base) == ["oracle", "original"]  # once, after 2 reviews
    by = {b.data.tags["coun_tune.baseline"]: b.data for b in base}
    # original forget_acc 100 vs the oracle's 90 -> forget_gap 10; the oracle's own gaps are 0
    assert by["original"].metrics["forget_gap"] == pytest.approx(10.0)
    assert by["original"].metrics["retain_acc"] == 100.0 and by["oracle"].metrics["forget_gap"] == 0.0
    assert by["original"].params["split_hash"] == "feedbeef"
    assert [r["run_id"] for r in trial_rows(client, client.get_run(parent))] == runs  # baselines are not trials


def test_descriptions_link_the_front_and_the_runs_view(reviewed):
    uri, client, parent, runs, out = reviewed
    run = client.get_run(parent)
    note = run.data.tags["mlflow.note.content"]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.note.content"] == note
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for r, rank in zip(runs, RANKS):
        assert (f"runs/{r}" in note) == (rank == 0), r
    assert "0.9680" in note and "forget_gap (↓" in note and "retain_acc (↑" in note
    assert "digits" in note and "feedbeef" in note
    assert "coun_tune.version" in run.data.tags
    # the printed link opens the saved view of this search: its runs, sorted by pareto_rank
    key = f"coun-tune-{parent}"
    assert f"#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}" in out
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    assert view["orderByKey"] == "metrics.`pareto_rank`" and view["orderByAsc"] is True
    assert "metrics.`is_pareto`" in view["selectedColumns"] and "params.`lr`" in view["selectedColumns"]
    scatter = [c for c in view["compareRunCharts"] if c["type"] == "SCATTER"]
    assert scatter[0]["xaxis"]["key"] == "forget_gap" and scatter[0]["yaxis"]["key"] == "retain_acc"


def test_trials_table_and_plots_on_the_parent(reviewed, tmp_path):
    uri, client, parent, runs, _ = reviewed
    files = {a.path for a in client.list_artifacts(parent)}
    assert {"trials.json", "trials.parquet", "pareto.png", "pareto.html"} <= files
    table = json.loads(open(client.download_artifacts(parent, "trials.json", str(tmp_path))).read())
    assert len(table["data"]) == len(TRIALS)  # written whole, not appended to by the second review
    col = table["columns"]
    rows = {r[col.index("run_id")]: r for r in table["data"]}
    assert [rows[r][col.index("pareto_rank")] for r in runs] == RANKS
    logged = json.loads(client.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "trials.json", "type": "table"} in logged
    page = open(client.download_artifacts(parent, "pareto.html", str(tmp_path))).read()
    assert "original" in page and "oracle" in page and "better: lower" in page
    # the caption says what the hypervolume is measured from, in words (was "{'retain_acc': -0.0}")
    caption = page.rsplit("<p>", 1)[1].split("</p>", 1)[0]
    assert "over doing nothing" in caption
    assert "(forget_gap 0, retain_acc 100) to (forget_gap 100, retain_acc 0)" in caption
    assert "-0" not in caption and "{" not in caption
