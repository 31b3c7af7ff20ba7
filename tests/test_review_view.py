"""The small things a reviewer meets first in the MLflow UI: the saved view's default columns,
the description's tables, the baseline runs' times (issue 16, point 6)."""

from __future__ import annotations

import io
import os

from tests._fake_search import make_search

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
NB = "\u00a0\u00a0"


def test_saved_view_columns_objectives_first_no_crowding_distance():
    from coun_tune.tracking.describe import view_state

    view = view_state("abc", {"forget_gap": "min", "retain_acc": "max"}, ["lr", "temperature"])
    cols = view["selectedColumns"]
    assert cols[:2] == ["metrics.`forget_gap`", "metrics.`retain_acc`"]
    assert "metrics.`crowding_distance`" not in cols  # a sampler's tie-breaker: 3.0 on most trials
    assert {"metrics.`is_knee`", "metrics.`is_pareto`", "params.`lr`"} <= set(cols)


def test_description_tables_keep_cells_apart():
    """By hand: no-break-space padding in every cell, numbers right-aligned, text left."""
    from coun_tune.tracking.describe import md_table

    got = md_table(["run", "forget_gap", "lr"], [["[trial 3](#/x)", 0.51, "0.0619"], ["original", 1.44, None]], True)
    assert got.splitlines() == [
        f"|{NB}run{NB}|{NB}forget_gap{NB}|{NB}lr{NB}|",
        "|:---|---:|---:|",
        f"|{NB}[trial 3](#/x){NB}|{NB}0.51{NB}|{NB}0.0619{NB}|",
        f"|{NB}original{NB}|{NB}1.44{NB}|{NB}–{NB}|",
    ]
    assert md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"  # unpadded, as before


def test_the_search_description_uses_the_padded_tables(tmp_path):
    from coun_tune.tracking.review import review_pareto

    uri, client, parent, runs = make_search(
        tmp_path, [{"forget_gap": 1.0, "retain_acc": 95.0}, {"forget_gap": 2.0, "retain_acc": 98.0}], name="pad"
    )
    review_pareto(client, parent, out=io.StringIO())
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    head = next(x for x in note.splitlines() if "forget_gap" in x and x.startswith("|"))
    assert head.startswith(f"|{NB}run{NB}|{NB}forget_gap{NB}|")


def test_baseline_runs_span_the_search(tmp_path):
    from coun_tune.tracking.review import review_pareto

    uri, client, parent, runs = make_search(
        tmp_path, [{"forget_gap": 1.0, "retain_acc": 95.0}], name="times", with_models=False
    )
    review_pareto(client, parent, out=io.StringIO())
    review_pareto(client, parent, out=io.StringIO())
    p = client.get_run(parent).info
    exp = p.experiment_id
    base = client.search_runs([exp], filter_string="tags.`coun_tune.role` = 'baseline'")
    assert len(base) == 2
    for b in base:
        assert (b.info.start_time, b.info.end_time) == (p.start_time, p.end_time), b.info.run_name
        assert b.info.status == "FINISHED"


def test_hold_out_front_counted_against_the_configs_re_run(tmp_path):
    """Trials 1 and 2 were re-run on hold-out sets (both on the hold-out front: (1, 95), (2, 98)),
    trial 3 was not: the description counts the front against the 2 configs, beside 3 trials."""
    from coun_tune.tracking.review import review_pareto

    trials = [
        {"forget_gap": 1.0, "retain_acc": 95.0, "holdout_forget_gap_mean": 1.0, "holdout_retain_acc_mean": 95.0},
        {"forget_gap": 2.0, "retain_acc": 98.0, "holdout_forget_gap_mean": 2.0, "holdout_retain_acc_mean": 98.0},
        {"forget_gap": 3.0, "retain_acc": 90.0},
    ]
    uri, client, parent, runs = make_search(tmp_path, trials, name="held", with_models=False)
    review_pareto(client, parent, out=io.StringIO())
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "**Pareto front**: 2 of the 2 configs re-run on hold-out forget sets (3 completed trials)" in note


def test_trials_table_objectives_first_crowding_distance_last(tmp_path):
    import json

    from coun_tune.tracking.review import review_pareto

    uri, client, parent, runs = make_search(
        tmp_path, [{"forget_gap": 1.0, "retain_acc": 95.0}, {"forget_gap": 2.0, "retain_acc": 98.0}], name="cols"
    )
    review_pareto(client, parent, out=io.StringIO())
    cols = json.loads(open(client.download_artifacts(parent, "trials.json", str(tmp_path))).read())["columns"]
    assert cols[:5] == ["trial", "forget_gap", "retain_acc", "is_knee", "is_pareto"]
    assert cols[-2:] == ["crowding_distance", "run_id"]
