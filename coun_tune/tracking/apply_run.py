"""MLflow side of `coun-tune apply`: what the search recorded for the applied config, and the
run that records an apply (provenance, before/after metrics, the unlearned model as an MLflow
PyTorch model, a new registry version).

The apply run is not nested under the search (it is no trial of it); it is tagged
  coun_tune.role = "apply", coun_tune.search_run, coun_tune.trial_run, coun_tune.request_sha256
and lives in the search's experiment when the search is in this store, else in `coun-tune-apply`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from coun_tune.tracking.mlflow_store import ROLE, client_for, ensure_experiment, log_params

APPLY_EXPERIMENT = "coun-tune-apply"
CALIBRATION = (
    "retain_acc",
    "forget_acc",
    "unlearn_acc",
    "test_acc",
    "mia_efficacy",
    "mia_loss_attack_acc",
    "forget_gap",
    "avg_gap",
)


def _run_or_none(client, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None  # exported from another store: nothing to read here


def search_records(tracking_uri: str, provenance: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(the picked trial's final metrics, its hold-out metrics `holdout_*` (`transfer_*` from
    searches before the hold-out check)) from the trial run named in the exported config, if
    that run is in this store; else ({}, {})."""
    client = client_for(tracking_uri)
    run = _run_or_none(client, provenance.get("trial_run_id") or provenance.get("run_id"))
    if run is None:
        return {}, {}
    m = run.data.metrics
    return (
        {k: float(m[k]) for k in CALIBRATION if k in m},
        {k: float(v) for k, v in sorted(m.items()) if k.startswith(("holdout_", "transfer_"))},
    )


def _experiment_id(client, tracking_uri: str, name: str | None, search_run) -> str:
    if name:
        return ensure_experiment(client, tracking_uri, name)
    if search_run is not None:
        return search_run.info.experiment_id
    return ensure_experiment(client, tracking_uri, APPLY_EXPERIMENT)


def log_apply_run(plan, model, result: dict) -> dict[str, Any]:
    """Log one FINISHED run for an apply and register its model. Returns run_id, model_uri
    (runs:/ID/model) and registered_uri (models:/NAME/VERSION, or None when no name is known)."""
    from mlflow.entities import Metric

    client = client_for(plan.tracking_uri)
    prov = plan.provenance
    search_run = _run_or_none(client, prov.get("search_run_id"))
    exp_id = _experiment_id(client, plan.tracking_uri, plan.experiment, search_run)
    tags = {
        ROLE: "apply",
        "coun_tune.request_sha256": plan.request_sha256,
        "mlflow.source.name": "coun-tune apply",
        "coun_tune.model_source": plan.model_source,
    }
    for key, tag in (
        ("search_run_id", "coun_tune.search_run"),
        ("trial_run_id", "coun_tune.trial_run"),
        ("trial_id", "coun_tune.trial_id_applied"),
    ):
        if prov.get(key):
            tags[tag] = str(prov[key])
    run = client.create_run(exp_id, run_name=f"apply {plan.cfg.method} request {plan.request_sha256[:8]}", tags=tags)
    run_id = run.info.run_id
    try:
        cfg = result["config"]
        params = {
            "method": cfg["method"],
            "arch": plan.arch,
            "model_source": plan.model_source,
            "data": plan.data_path,
            "data_format": plan.data.source,
            "batch_size": plan.batch_size,
            "seed": plan.seed,
            "request_sha256": plan.request_sha256,
            "num_forget": len(plan.forget_idx),
            "num_train": len(plan.data.arrays.train_y),
            "num_test": len(plan.data.arrays.test_y),
            **{f"hp.{k}": v for k, v in cfg["hparams"].items()},
            **{f"data.{k}": v for k, v in cfg["data"].items()},
            **{f"source.{k}": v for k, v in prov.items() if not isinstance(v, (dict, list))},
        }
        log_params(client, run_id, params)
        metrics = [
            Metric(f"{when}_{k}", float(v), 0, 0)
            for when in ("before", "after")
            for k, v in result[when].items()
            if isinstance(v, (int, float))
        ]
        metrics += [Metric(k, float(v), 0, 0) for k, v in result["transfer"].items()]
        metrics += [Metric(f"search_trial_{k}", float(v), 0, 0) for k, v in result["calibration"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        with tempfile.TemporaryDirectory() as d:
            for name in ("config.yaml", "metrics.json"):
                client.log_artifact(run_id, str(plan.out / name))
            (Path(d) / "request.json").write_text(json.dumps(result["request"], indent=2))
            client.log_artifact(run_id, str(Path(d) / "request.json"))
        model_uri = log_model(client, run_id, model, plan)
        registered = None
        if plan.register:
            from coun_tune.tracking.models import register_model

            registered = register_model(client, run_id, plan.register, plan.alias)
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return {"run_id": run_id, "experiment_id": exp_id, "model_uri": model_uri, "registered_uri": registered}


def log_model(client, run_id: str, model, plan) -> str:
    """The unlearned model (the user's own class) as the run's MLflow PyTorch model, with the
    applied config.yaml, model_info.json and metrics.json beside it (tracking/models.py), so
    `coun-tune apply --model models:/NAME@ALIAS` can apply the next request to it. Returns
    runs:/ID/model."""
    import yaml

    from coun_tune.tracking import models

    config = yaml.safe_load((plan.out / "config.yaml").read_text())
    arrays = plan.data.arrays
    info = {
        "arch": plan.arch,
        "dataset": "user",
        "data": plan.data_path,
        "num_classes": arrays.num_classes,
        "image_shape": list(arrays.image_shape),
        "method": config["method"],
        "hparams": config["hparams"],
    }
    metrics = json.loads((plan.out / "metrics.json").read_text())
    models.log_model(client, run_id, model, config, info, metrics)
    return f"runs:/{run_id}/{models.MODEL_NAME}"
