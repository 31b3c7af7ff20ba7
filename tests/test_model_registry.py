"""The registry and the logged models agree, on a real SQLite store (a finished search written
by tests/_fake_search.py, as the trial logger leaves it):

- each trial's logged model is named by its trial (`trial_<number>`), and carries the run's
  params and final metrics (the Models tab's columns), without adding points to the run's curves;
- registering a trial's model tags the logged model with `mlflow.modelVersions` in MLflow's own
  format (the tag the UI reads for its "Registered" badge), once per version, and describes the
  version (the pick, the objective values, links to the search, the run and the model);
- `runs:/RUN_ID/<model name>` and the older `runs:/RUN_ID/unlearned_model` both resolve.

The UI itself (the knee's model page badged registered) is checked in tests/test_mlflow_ui.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests._fake_search import make_search, trial_weights

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRIALS = [
    {"forget_gap": 0.0, "retain_acc": 80.0, "test_acc": 90.0},
    {"forget_gap": 1.0, "retain_acc": 95.0, "test_acc": 93.0},
    {"forget_gap": 2.0, "retain_acc": 98.0, "test_acc": 92.0},
]
NAME = "registry_demo"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return (root, *make_search(root, TRIALS, name=NAME))


def test_each_trials_model_is_named_by_its_trial_with_params_and_final_metrics(store):
    from coun_tune.tracking.models import logged_model_of

    root, uri, client, parent, run_ids = store
    exp = client.get_run(parent).info.experiment_id
    names = sorted(m.name for m in client.search_logged_models([exp]))
    assert names == ["trial_1", "trial_2", "trial_3"]  # not three models called unlearned_model
    for i, run_id in enumerate(run_ids, start=1):
        model = logged_model_of(client, run_id)
        assert model.name == f"trial_{i}"
        assert model.params["lr"] == str(i / 100)  # the run's params ...
        assert model.params["temperature"]  # ... and every hyperparameter, defaults included
        assert {m.key: m.value for m in model.metrics} == TRIALS[i - 1]
        assert {m.step for m in model.metrics} == {1}  # the run's final step
        note = model.tags["mlflow.note.content"]  # the model page's description
        assert note.startswith(f"**trial {i}**: coun unlearning of a small_cnn on digits, from coun-tune search")
        assert f"(#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning)" in note
        assert f"viewStateShareKey=coun-tune-{parent})" in note and f"`runs:/{run_id}/trial_{i}`" in note
        # the run's own curve is untouched: one point per metric, as logged by the trial
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "retain_acc")] == [
            (1, TRIALS[i - 1]["retain_acc"])
        ]


def test_models_tab_sorts_and_filters_on_the_trials_metrics(store):
    """What the experiment's Models tab asks the server: the best retain_acc first."""
    root, uri, client, parent, run_ids = store
    exp = client.get_run(parent).info.experiment_id
    ranked = client.search_logged_models(
        [exp],
        filter_string="metrics.retain_acc >= 95",
        order_by=[{"field_name": "metrics.retain_acc", "ascending": False}],
    )
    assert [m.name for m in ranked] == ["trial_3", "trial_2"]


def test_registering_tags_the_logged_model_once_and_describes_the_version(store):
    from coun_tune.tracking.models import MODEL_VERSIONS, logged_model_of, mark_registered, register_model

    root, uri, client, parent, run_ids = store
    exp = client.get_run(parent).info.experiment_id
    knee = run_ids[1]
    client.log_metric(knee, "is_pareto", 1.0, step=0)  # as the review does, after the model was logged
    assert register_model(client, knee, NAME, "knee", pick="knee") == f"models:/{NAME}/1"
    assert register_model(client, knee, NAME, "knee", pick="knee") == f"models:/{NAME}/1"  # again: same version
    model = logged_model_of(client, knee)
    keys = [m.key for m in model.metrics]
    assert sorted(keys) == ["forget_gap", "is_pareto", "retain_acc", "test_acc"]  # the review's too, once each
    # MLflow's own format (what its server and mlflow.register_model write), one entry per version
    assert json.loads(model.tags[MODEL_VERSIONS]) == [{"name": NAME, "version": 1}]
    # MLflow's fluent client writes the version as a string: the same version, not a second one
    assert mark_registered(client, model.model_id, NAME, "1") == [{"name": NAME, "version": 1}]
    assert json.loads(logged_model_of(client, knee).tags[MODEL_VERSIONS]) == [{"name": NAME, "version": 1}]
    # the other trials stay unregistered
    assert MODEL_VERSIONS not in logged_model_of(client, run_ids[0]).tags

    # another pick of another trial: version 2, on that trial's model only
    assert register_model(client, run_ids[2], NAME, "best_retain_acc", pick="best:retain_acc") == f"models:/{NAME}/2"
    assert json.loads(logged_model_of(client, run_ids[2]).tags[MODEL_VERSIONS]) == [{"name": NAME, "version": 2}]
    assert json.loads(logged_model_of(client, knee).tags[MODEL_VERSIONS]) == [{"name": NAME, "version": 1}]
    # the same model under a second registered name: both listed
    register_model(client, knee, "another_name", "knee")
    assert json.loads(logged_model_of(client, knee).tags[MODEL_VERSIONS]) == [
        {"name": NAME, "version": 1},
        {"name": "another_name", "version": 1},
    ]

    v1 = client.get_model_version(NAME, "1")
    assert v1.run_id == knee and v1.source == model.artifact_location
    text = v1.description
    assert text.startswith("**knee** (alias `@knee`): trial 2 of coun-tune search")
    assert "forget_gap (↓ lower is better)" in text and "retain_acc (↑ higher is better)" in text
    assert "| trial 2 | 1 | 95 | 93 |" in text  # its objective values (and test_acc)
    assert f"(#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=coun-tune-{parent})" in text
    assert f"(#/experiments/{exp}/runs/{knee}?workflowType=machine_learning)" in text
    assert f"(#/experiments/{exp}/models/{model.model_id})" in text
    v2 = client.get_model_version(NAME, "2").description
    assert (
        v2.startswith("**best:retain_acc** (alias `@best_retain_acc`): trial 3") and "| trial 3 | 2 | 98 | 92 |" in v2
    )


def test_runs_uris_resolve_by_the_models_name_and_the_older_name(store):
    from coun_tune.errors import UsageError
    from coun_tune.tracking.models import MODEL_NAME, load_model_uri

    root, uri, client, parent, run_ids = store
    for path in ("trial_3", MODEL_NAME, ""):
        state, config = load_model_uri(f"runs:/{run_ids[2]}/{path}", uri)
        assert torch.equal(state["fc.weight"], trial_weights(3)["fc.weight"]), path
        assert config["arch"] == "small_cnn"
    with pytest.raises(UsageError):  # another trial's model name is not this run's model
        load_model_uri(f"runs:/{run_ids[2]}/trial_1", uri)


def test_model_ids_by_run_lets_one_batch_log_on_the_run_and_its_model(store):
    """What the review needs to put is_pareto in the Models tab: each run's model id from one
    search, then one log_batch per run writes the metric on both."""
    from mlflow.entities import Metric

    from coun_tune.tracking.models import logged_model_of, model_ids_by_run

    root, uri, client, parent, run_ids = store
    exp = client.get_run(parent).info.experiment_id
    ids = model_ids_by_run(client, exp)
    assert ids == {r: logged_model_of(client, r).model_id for r in run_ids}
    client.log_batch(run_ids[0], metrics=[Metric("pareto_rank", 0.0, 1, 0, model_id=ids[run_ids[0]])])
    assert {m.key: m.value for m in logged_model_of(client, run_ids[0]).metrics}["pareto_rank"] == 0.0
    assert client.get_run(run_ids[0]).data.metrics["pareto_rank"] == 0.0
