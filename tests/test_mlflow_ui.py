"""The review in a real browser: a tiny real search (local Ray, Optuna, SQLite MLflow), a real
`mlflow server` on 127.0.0.1 over its store, and headless Chromium (Debian's, driven by
Playwright) opening the link the search printed.

It must show, with no setup by hand: the search's runs (trials and the two baselines) sorted
front first with the Pareto metrics as columns, the chart view with the Pareto section, the
parent's description with links to the front's runs, and the Pareto plot artifact; after
`coun-tune export --pick knee`, the knee's logged model badged registered (its version in the
model page's side panel, not "Not registered"), and the Models tab listing one model per trial,
named by it, with its metrics and the knee's registered version."""

from __future__ import annotations

import re

import pytest

from tests._browser import (
    browser,
    export_knee,
    grid_rows,
    image_loaded,
    mlflow_server,
    model_page,
    models_tab,
    open_page,
    printed_fragment,
    registered_versions,
    tiny_search,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from coun_tune.tracking.mlflow_store import client_for

    root = tmp_path_factory.mktemp("ui")
    uri, stdout = tiny_search(root, name="ui_review", num_samples=3)
    client = client_for(uri)
    exp = client.get_experiment_by_name("ui_review").experiment_id
    runs = client.search_runs([exp])
    parent = next(r for r in runs if r.data.tags.get("coun_tune.role") == "search")
    trials = [r for r in runs if r.data.tags.get("coun_tune.role") == "trial"]
    baselines = [r for r in runs if r.data.tags.get("coun_tune.role") == "baseline"]
    knee_run, _ = export_knee(root, uri, parent.info.run_id)  # registers the knee's model as ui_review@knee
    with mlflow_server(uri) as base:
        yield {
            "base": base,
            "stdout": stdout,
            "exp": exp,
            "parent": parent,
            "trials": trials,
            "baselines": baselines,
            "client": client,
            "knee_run": knee_run,
        }


def test_printed_link_opens_the_search_runs_front_first(served):
    fragment = printed_fragment(served["stdout"])
    assert "workflowType=machine_learning" in fragment  # the training view, not the GenAI overview
    front = [r.info.run_name for r in served["trials"] if r.data.metrics["is_pareto"] == 1.0]
    dominated = [r.info.run_name for r in served["trials"] if r.data.metrics["is_pareto"] == 0.0]
    assert front and len(served["baselines"]) == 2
    with browser() as b:
        page = open_page(b, f"{served['base']}/{fragment}", "is_pareto")
        body = page.inner_text("body")
        assert "coun-tune search" in body  # the experiment's description
        assert f"{len(served['trials']) + 2} matching runs" in body  # this search's trials and baselines
        for name in front + dominated + [r.info.run_name for r in served["baselines"]]:
            assert name in body, name
        assert max(body.index(n) for n in front) < min((body.index(n) for n in dominated), default=len(body))
        for column in ("is_pareto", "pareto_rank", "is_knee", "forget_gap", "retain_acc"):
            assert column in body, column
        assert "crowding_distance" not in body  # a sampler's tie-breaker: not a default column
        page.close()
        charts = open_page(b, f"{served['base']}/{fragment}&compareRunsMode=CHART", "Pareto front (coun-tune)")
        assert "Pareto front (coun-tune)" in charts.inner_text("body")


def test_parent_description_links_the_front(served):
    parent = served["parent"]
    front_ids = [r.info.run_id for r in served["trials"] if r.data.metrics["is_pareto"] == 1.0]
    with browser() as b:
        page = open_page(
            b,
            f"{served['base']}/#/experiments/{served['exp']}/runs/{parent.info.run_id}?workflowType=machine_learning",
            "Pareto front",
        )
        more = page.get_by_text("Show more", exact=True)
        if more.count():
            more.first.click()
        body = page.inner_text("body")
        hv = served["parent"].data.metrics["hypervolume"]
        assert f"Hypervolume: {hv:.4f}" in body
        assert "forget_gap (↓ lower is better)" in body and "retain_acc (↑ higher is better)" in body
        for run_id in front_ids:  # each front trial is a link to its run
            assert page.locator(f"a[href*='runs/{run_id}']").count() >= 1, run_id


def test_pareto_plot_artifact_loads(served):
    parent = served["parent"].info.run_id
    with browser() as b:
        page = open_page(
            b,
            f"{served['base']}/#/experiments/{served['exp']}/runs/{parent}/artifacts/pareto.png"
            "?workflowType=machine_learning",
            "pareto.png",
        )
        assert image_loaded(page)
        assert re.search(r"trials\.json", page.inner_text("body"))  # the trials table beside it


def test_knee_model_page_shows_it_registered(served):
    from coun_tune.tracking.models import logged_model_of

    client = served["client"]
    knee = logged_model_of(client, served["knee_run"])
    other = next(
        logged_model_of(client, r.info.run_id) for r in served["trials"] if r.info.run_id != served["knee_run"]
    )
    with browser() as b:
        page = model_page(b, served["base"], served["exp"], knee.model_id, knee.name)
        body = page.inner_text("body")
        assert knee.name.startswith("trial_")
        assert "Not registered" not in body
        assert registered_versions(body) == "ui_review v1"
        page.close()
        # the same page for a trial nobody exported: badged "Not registered" (the check can fail)
        page = model_page(b, served["base"], served["exp"], other.model_id, other.name)
        body = page.inner_text("body")
        assert "Not registered" in body and registered_versions(body) == "None"
        page.close()
        # the registered version's page describes the pick and links back to the search and the run
        page = open_page(b, f"{served['base']}/#/models/ui_review/versions/1", "@knee")
        body = page.inner_text("body")
        assert "knee (alias @knee): trial " in body
        assert page.locator(f"a[href*='runs/{served['knee_run']}']").count() >= 1
        page.close()


def test_models_tab_lists_one_named_model_per_trial_with_metrics(served):
    trials = served["trials"]
    with browser() as b:
        page = models_tab(b, served["base"], served["exp"], "trial_1")
        rows = grid_rows(page)
    assert sorted(rows) == sorted(
        f"trial_{r.data.tags['coun_tune.trial_number']}" for r in trials
    )  # no unlearned_model
    for run in trials:
        row = rows[f"trial_{run.data.tags['coun_tune.trial_number']}"]
        assert row["Source run"] == run.info.run_name
        for metric in ("forget_gap", "retain_acc", "test_acc"):  # the model's own metrics, as columns
            assert float(row[metric]) == pytest.approx(run.data.metrics[metric]), (metric, row)
        registered = "ui_review\nv1" if run.info.run_id == served["knee_run"] else "-"
        assert row["Registered models"] == registered, row
