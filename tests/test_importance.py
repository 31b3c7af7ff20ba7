"""Optuna's hyperparameter importances per objective, on the search's parent run and in its
description, from a real SQLite store (the review rebuilds the study from MLflow's rows).

Ten trials: lr = i / 100 (_fake_search), temperature t_i a permutation of 0.05..0.50 that is
uncorrelated with lr; forget_gap = 50 * lr depends on lr alone, retain_acc = 100 - 10 * t on
temperature alone. So fANOVA must give lr nearly all of forget_gap's variance and temperature
nearly all of retain_acc's; and the numbers must equal Optuna's own, computed here on a study
Optuna ran itself (suggest_float with the spec's domains, the same seeded evaluator)."""

from __future__ import annotations

import io
import json
import os

import pytest

from tests._fake_search import OBJECTIVES, make_search

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

LR = [i / 100 for i in range(1, 11)]
TEMPERATURE = [0.05 * (1 + (7 * i) % 10) for i in range(10)]  # 0.05, 0.4, 0.25, ...: a permutation
SPACE = {"lr": {"log": [0.005, 0.2]}, "temperature": {"uniform": [0.05, 0.5]}, "epochs": 1}


def objective_values(lr: float, t: float) -> dict[str, float]:
    return {"forget_gap": 50 * lr, "retain_acc": 100 - 10 * t}


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    from coun_tune.tracking.review import review_pareto

    root = tmp_path_factory.mktemp("importance")
    trials = [objective_values(lr, t) for lr, t in zip(LR, TEMPERATURE)]
    uri, client, parent, runs = make_search(root, trials, name="importance", with_models=False)
    for run, t in zip(runs, TEMPERATURE):
        client.log_param(run, "temperature", t)
    spec = json.loads(json.dumps({"name": "importance", "objectives": OBJECTIVES, "space": SPACE}))
    client.log_dict(parent, spec, "spec.yaml")
    review_pareto(client, parent, out=io.StringIO())
    return client, parent


def optunas_own() -> dict[str, dict[str, float]]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "maximize"])
    for lr, t in zip(LR, TEMPERATURE):
        study.enqueue_trial({"lr": lr, "temperature": t})

    def objective(trial):
        lr = trial.suggest_float("lr", 0.005, 0.2, log=True)
        t = trial.suggest_float("temperature", 0.05, 0.5)
        v = objective_values(lr, t)
        return v["forget_gap"], v["retain_acc"]

    study.optimize(objective, n_trials=len(LR))
    return {
        k: get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), target=lambda t, i=i: t.values[i])
        for i, k in enumerate(OBJECTIVES)
    }


def test_importances_on_the_parent_match_optunas_own(reviewed):
    client, parent = reviewed
    m = client.get_run(parent).data.metrics
    got = {k: {p: m[f"param_importance/{k}/{p}"] for p in ("lr", "temperature")} for k in OBJECTIVES}
    assert got["forget_gap"]["lr"] > 0.9 and got["retain_acc"]["temperature"] > 0.9
    for k in OBJECTIVES:
        assert sum(got[k].values()) == pytest.approx(1.0)
        assert got[k] == pytest.approx(optunas_own()[k], abs=1e-9)
    assert "param_importance/forget_gap/epochs" not in m  # fixed, not searched


def test_importances_in_the_description(reviewed):
    client, parent = reviewed
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "**Hyperparameter importance** per objective" in note
    m = client.get_run(parent).data.metrics
    row = next(x for x in note.splitlines() if x.replace("\u00a0", "").startswith("|lr|"))
    cells = [c.strip("\u00a0") for c in row.strip("|").split("|")]
    assert cells == ["lr", f"{m['param_importance/forget_gap/lr']:.3g}", f"{m['param_importance/retain_acc/lr']:.3g}"]
