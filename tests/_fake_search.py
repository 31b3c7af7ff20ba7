"""A finished search written straight into a real SQLite MLflow store, with trials of known
metrics (no Ray, no training): what the runner and the trial logger leave behind, so the
review and the export can be checked against hand computations.

Trial i (1-based) gets the Tune id `t{i}`, lr = i / 100 and, with models, a small_cnn whose
weights are drawn with torch seed i (so a loaded model tells which trial it came from)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

OBJECTIVES = {"forget_gap": "min", "retain_acc": "max"}
SCENARIO = {"dataset": "digits", "forget": "random:0.1", "seed": 0, "arch": "small_cnn", "recipe": "tiny"}
# forget_acc 100 vs the oracle's 90: the original's forget_gap is 10 (|unlearn_acc - unlearn_acc*|)
BASE_MODELS = {
    "original": {"retain_acc": 100.0, "forget_acc": 100.0, "unlearn_acc": 0.0, "test_acc": 97.0, "mia_efficacy": 5.0},
    "oracle": {"retain_acc": 99.0, "forget_acc": 90.0, "unlearn_acc": 10.0, "test_acc": 96.0, "mia_efficacy": 15.0},
}


def trial_weights(i: int) -> dict[str, torch.Tensor]:
    from coun_tune.core.models import build_model

    torch.manual_seed(i)
    return build_model("small_cnn", 1, 10).state_dict()


def make_search(root: Path, trials: list[dict[str, float]], *, name: str = "fake", with_models: bool = True):
    """Returns (tracking_uri, client, parent_run_id, [trial run ids])."""
    from coun_tune.tracking.describe import TRIAL_NUMBER
    from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, client_for, ensure_experiment, log_params
    from coun_tune.tracking.models import log_model_from_files

    uri = f"sqlite:///{root}/mlflow.db"
    client = client_for(uri)
    exp = ensure_experiment(client, uri, name)
    parent = client.create_run(
        exp,
        run_name=f"{name}_search",
        tags={ROLE: "search", "coun_tune.method": "coun", "coun_tune.objectives": json.dumps(OBJECTIVES)},
    ).info.run_id
    log_params(
        client,
        parent,
        {"method": "coun", "split_hash": "feedbeef", **{f"scenario.{k}": v for k, v in SCENARIO.items()}},
    )
    spec = {
        "name": name,
        "scenario": SCENARIO,
        "method": "coun",
        "objectives": OBJECTIVES,
        "space": {"lr": {"log": [0.001, 0.1]}, "epochs": 1},
    }
    client.log_dict(parent, spec, "spec.yaml")
    client.log_dict(parent, BASE_MODELS, "base_models.json")
    run_ids = []
    for i, metrics in enumerate(trials, start=1):
        run = client.create_run(
            exp, run_name=f"trial {i}", tags={PARENT: parent, ROLE: "trial", TRIAL_ID: f"t{i}", TRIAL_NUMBER: str(i)}
        ).info.run_id
        log_params(client, run, {"method": "coun", "lr": i / 100, "epochs": 1})
        for k, v in metrics.items():
            client.log_metric(run, k, v, step=1)
        if with_models:
            ck = root / f"ck{i}"
            ck.mkdir()
            torch.save(trial_weights(i), ck / "model.pt")
            (ck / "config.yaml").write_text(
                yaml.safe_dump(
                    {"scenario": SCENARIO, "method": "coun", "hparams": {"lr": i / 100, "epochs": 1}, "seed": 0}
                )
            )
            (ck / "metrics.json").write_text(json.dumps(metrics))
            for f in ("model.pt", "config.yaml", "metrics.json"):  # as the trial logger does
                client.log_artifact(run, str(ck / f), artifact_path="model")
            log_model_from_files(client, run, ck, step=1)
        client.set_terminated(run, status="FINISHED")
        run_ids.append(run)
    client.set_terminated(parent, status="FINISHED")
    return uri, client, parent, run_ids
