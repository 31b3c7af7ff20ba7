"""MLflow models of coun-tune's unlearned networks: logging, registering, loading back.

A trial's (or an applied request's) final network is logged as an MLflow PyTorch model on its run
(MLflow 3 "logged model": it shows in the run's and the experiment's Models tab and can be
registered), named by its trial (`trial_7`; an applied request's: `unlearned_model`), with the
run's params and final metrics on the model itself (the Models tab's columns). Beside the
flavor's own files the model directory holds

    model.pt         plain state dict: torch.load(..., weights_only=True), never a pickle of code
    config.yaml      the `coun-tune unlearn --config` document that made it (hparams resolved)
    model_info.json  arch, dataset, num_classes, image_shape (C, H, W), method, hparams
    metrics.json     its final metrics (when known)

so `load_model_uri` rebuilds the network from data alone. The flavor is saved in the pt2
format (torch.export: serving needs torch only) with a pickle fallback when export fails;
requirements are pinned explicitly (inferring them costs seconds per model).

Registering a model (`register_model`) makes the registry and the logged model agree in the UI,
as MLflow's own `mlflow.register_model` does: the logged model's tag `mlflow.modelVersions`
lists its versions (the UI's "Registered" badge and the Models tab's column read it; MLflow's
server sets it on create_model_version, a SQLite client does not), and the version's
description says which pick it is, its objective values, and links to the search and the run.

Everything goes through an explicit `MlflowClient`: a Ray driver, a test and a CLI command
may each point at their own store, so the global tracking URI of fluent mlflow is not used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from coun_tune.errors import UsageError

# The logged model's name when its run is not a numbered trial (an applied request), and the
# runs:/RUN_ID/unlearned_model path that still resolves to any run's logged model. Not "model":
# the run's plain `model/` artifacts keep that path, and MLflow 3.17 resolves a runs:/ path that
# names a logged model through the process-global tracking URI (an `mlflow.db` appears in the cwd).
MODEL_NAME = "unlearned_model"
TRIAL_NUMBER = "coun_tune.trial_number"  # = describe.TRIAL_NUMBER (the trial logger's numbering)
MODEL_VERSIONS = "mlflow.modelVersions"  # = mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
NOTE = "mlflow.note.content"  # a logged model's (as a run's) Markdown description in the UI
FILES = ("model.pt", "config.yaml", "model_info.json", "metrics.json")
# Flavor formats tried in turn. pt2 (torch.export) serves with torch alone but costs 2-20 s per
# model on a CPU driver (the first export of a process imports the compiler stack); pickle
# costs ~0.2 s and needs coun-tune importable where it is served. Trials log with the first.
SERIALIZATIONS = tuple(os.environ.get("COUN_TUNE_MODEL_FORMAT", "pickle,pt2").split(","))


def _requirements(serialization: str) -> list[str]:
    import torch

    import coun_tune

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    if serialization == "pickle":  # a pickled module references coun_tune's classes by import path
        reqs.append(f"coun-tune=={coun_tune.__version__}")
    return reqs


def model_info(config: dict, state: dict) -> dict:
    """arch, dataset, num_classes, image_shape of a coun-tune architecture's state dict, read
    from the state dict itself (classifier rows, the in_channels that fit) and core's registries
    (image size per dataset or per fixed-size architecture)."""
    from coun_tune.core.datasets import IMAGE_SIZES
    from coun_tune.core.engine import resolve_hparams
    from coun_tune.core.models import ARCH_INPUT_SIZE, build_model

    scenario = config.get("scenario", {})
    arch, dataset = scenario.get("arch"), scenario.get("dataset")
    num_classes = int(state["fc.weight"].shape[0])
    size = ARCH_INPUT_SIZE.get(arch) or IMAGE_SIZES.get(dataset)
    channels = None
    for c in (1, 3, 4, 2):  # the channel count whose freshly built model has exactly these shapes
        ref = build_model(arch, c, num_classes).state_dict()
        if ref.keys() == state.keys() and all(ref[k].shape == state[k].shape for k in ref):
            channels = c
            break
    if channels is None or size is None:
        raise UsageError(f"cannot tell the input shape of a {arch} model on dataset {dataset!r}")
    return {
        "arch": arch,
        "dataset": dataset,
        "num_classes": num_classes,
        "image_shape": [channels, size, size],
        "method": config.get("method"),
        "hparams": resolve_hparams(config["method"], config.get("hparams", {})),
    }


def model_name_for(run) -> str:
    """The logged model's name: `trial_<number>` for a search's trial (the number of its run
    name and of the front table), else `unlearned_model`."""
    number = run.data.tags.get(TRIAL_NUMBER)
    return f"trial_{number}" if number else MODEL_NAME


def model_description(client, run, info: dict) -> str:
    """The logged model's Markdown description (the model page's "Description"): what it is
    (which trial of which search, arch, method) and links to its run and its search's runs."""
    from coun_tune.tracking import describe
    from coun_tune.tracking.mlflow_store import PARENT

    exp, number, parent_id = run.info.experiment_id, run.data.tags.get(TRIAL_NUMBER), run.data.tags.get(PARENT)
    what = f"trial {number}" if number else f"run `{run.info.run_name}`"
    text = f"**{what}**: {info.get('method')} unlearning of a {info.get('arch')} on {info.get('dataset')}"
    links = [f"[its run]({describe.run_fragment(exp, run.info.run_id)})"]
    if parent_id:
        try:
            text += f", from coun-tune search `{client.get_run(parent_id).info.run_name}`"
        except Exception:  # noqa: S110  (a parent that is gone: the link below says which it was)
            pass
        links.append(f"[the search's runs]({describe.runs_fragment(exp, parent_id)})")
    uri = f"runs:/{run.info.run_id}/{model_name_for(run)}"
    return f"{text}.\n\n" + " · ".join(links) + f"\n\nModel URI `{uri}` (`coun-tune apply --model` takes it).\n"


def log_model(client, run_id: str, model, config: dict, info: dict, metrics: dict | None = None, step: int = 0) -> str:
    """Log `model` (an eval-able torch module on any device) as the run's MLflow PyTorch model,
    named by model_name_for(run), with the run's params and latest metrics on it.
    info: model_info(...) (image_shape gives the signature: float32 (N, C, H, W), the
    dataset's normalisation applied; output (N, num_classes) logits). Returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run = client.get_run(run_id)
    # the run's params (scenario, split_hash, every hyperparameter) then the model's own hparams
    params = {**run.data.params, **{k: str(v) for k, v in info.get("hparams", {}).items()}}
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=model_name_for(run),
        source_run_id=run_id,
        params=params,
        model_type="pytorch",
        tags={
            "coun_tune.arch": str(info["arch"]),
            "coun_tune.method": str(info["method"]),
            NOTE: model_description(client, run, info),
        },
    )
    try:
        _save(client, logged, run_id, model, config, info, metrics)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    log_run_metrics_to_model(client, run_id, logged.model_id)
    return logged.model_id


def log_run_metrics_to_model(client, run_id: str, model_id: str, keys=None) -> int:
    """Put the run's latest value of each metric (or of `keys`) on its logged model: the Models
    tab's metric columns and the model page's metrics. Each is the run's own last point (same
    value, step and timestamp), which MLflow's store keeps once in the run's history, so the run's
    curves gain no point. Call it again after logging more (the review's is_pareto): the model
    gets the newer values. Returns how many metrics it logged."""
    from mlflow.entities import Metric

    metrics = []
    for key in sorted(keys if keys is not None else client.get_run(run_id).data.metrics):
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp, m.value))  # MLflow's own 'latest'
            metrics.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    return len(metrics)


def _save(client, logged, run_id: str, model, config: dict, info: dict, metrics: dict | None) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.models import Model, infer_signature

    model = model.to("cpu").eval()
    # a batch of 2, not 1: torch.export specialises a dimension whose example size is 1
    example = np.random.default_rng(0).standard_normal((2, *info["image_shape"])).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_NAME
        for fmt in SERIALIZATIONS:
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
                metadata={
                    "input": "float32 (N, C, H, W): uint8 / 255, normalised as the dataset",
                    "output": "(N, num_classes) logits",
                    "serialization": fmt,
                },
            )
            try:
                # MLflow warns on every pickle save; coun-tune itself never unpickles (it loads
                # the plain state dict beside it with weights_only=True), and the warning
                # buries the search's progress table
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
                mlflow.pytorch.save_model(
                    model,
                    str(path),
                    mlflow_model=mlflow_model,
                    signature=signature,
                    input_example=example,
                    pip_requirements=_requirements(fmt),
                    serialization_format=fmt,
                )
                break
            except Exception:  # torch.export cannot trace every module: try the next format
                shutil.rmtree(path, ignore_errors=True)
                if fmt == SERIALIZATIONS[-1]:
                    raise
        torch.save(state, path / "model.pt")
        (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (path / "model_info.json").write_text(json.dumps(info, indent=2))
        if metrics is not None:
            (path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        client.log_model_artifacts(logged.model_id, str(path))


def resolve_config_file(path: Path) -> dict:
    """Rewrite a trial's config.yaml with every hyperparameter of its method, defaults included."""
    from coun_tune.core.engine import resolve_hparams

    config = yaml.safe_load(Path(path).read_text())
    config["hparams"] = resolve_hparams(config["method"], config.get("hparams") or {})
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def log_model_from_files(client, run_id: str, directory: Path, step: int = 0) -> str:
    """Log the MLflow model of a trial from its checkpoint files (model.pt, config.yaml and, if
    there, metrics.json): the network is rebuilt from the state dict, no pickle involved."""
    import torch

    from coun_tune.core.models import build_model

    directory = Path(directory)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    info = model_info(config, state)
    config = {**config, "hparams": info["hparams"]}  # every hyperparameter, defaults included
    model = build_model(info["arch"], info["image_shape"][0], info["num_classes"])
    model.load_state_dict(state)
    metrics = json.loads((directory / "metrics.json").read_text()) if (directory / "metrics.json").is_file() else None
    return log_model(client, run_id, model, config, info, metrics, step)


def logged_model_of(client, run_id: str):
    """The run's logged model (the latest READY one coun-tune logged from it), or None."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found, token = [], None
    while True:
        page = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=token
        )
        found += [m for m in page if m.source_run_id == run_id and m.status == LoggedModelStatus.READY]
        token = page.token
        if not token:
            break
    return max(found, key=lambda m: m.creation_timestamp) if found else None


def model_ids_by_run(client, experiment_id: str) -> dict[str, str]:
    """{source run id: model id} of every READY logged model of the experiment (the latest one
    per run), in one paged search: for logging a metric on a run and its model at once,
    `Metric(key, value, ts, step, model_id=ids.get(run_id))` (how the review can put is_pareto
    and pareto_rank in the Models tab's columns without one request per trial)."""
    from mlflow.entities import LoggedModelStatus

    latest, token = {}, None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        for m in page:
            if m.source_run_id and m.status == LoggedModelStatus.READY:
                old = latest.get(m.source_run_id)
                if old is None or m.creation_timestamp > old.creation_timestamp:
                    latest[m.source_run_id] = m
        token = page.token
        if not token:
            return {run_id: m.model_id for run_id, m in latest.items()}


def mark_registered(client, model_id: str, name: str, version) -> list[dict]:
    """Add {name, version} to the logged model's `mlflow.modelVersions` tag, in MLflow's own
    format (a JSON list of {"name": ..., "version": ...}, appended to, never duplicated; MLflow's
    server writes the version as a number, its fluent client as a string: either counts as
    present). The UI reads this tag: without it a registered model is badged "Not registered".
    Returns the tag's list."""
    logged = client.get_logged_model(model_id)
    try:
        versions = json.loads(logged.tags.get(MODEL_VERSIONS) or "[]")
    except ValueError:  # a tag someone wrote by hand: replaced by a well-formed one
        versions = []
    versions = [v for v in versions if isinstance(v, dict)] if isinstance(versions, list) else []
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
        versions.append({"name": name, "version": int(version) if str(version).isdigit() else version})
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS: json.dumps(versions)})
    return versions


def version_description(client, run_id: str, model_id: str, alias: str, pick: str | None = None) -> str:
    """The Markdown description of a registered version: which pick it is (the alias), the
    trial, its objective values (the search's objectives, with the original's and the oracle's
    when the review logged them), and links to the search's runs, the trial's run and its
    logged model (relative UI routes: they work wherever the UI is served)."""
    from coun_tune.tracking import describe
    from coun_tune.tracking.mlflow_store import PARENT

    run = client.get_run(run_id)
    exp, tags = run.info.experiment_id, run.data.tags
    parent_id = tags.get(PARENT)
    parent = client.get_run(parent_id) if parent_id else None
    raw = parent.data.tags.get("coun_tune.objectives") if parent else None
    objectives = json.loads(raw) if raw else {}
    number = tags.get(TRIAL_NUMBER)
    what = f"trial {number}" if number else f"run `{run.info.run_name}`"
    source = f" of coun-tune search `{parent.info.run_name}`" if parent is not None else ""
    lines = [f"**{pick or alias}** (alias `@{alias}`): {what}{source}."]
    metrics = run.data.metrics
    shown = list(objectives) or [m for m in ("forget_gap", "retain_acc") if m in metrics]
    extra = [m for m in ("avg_gap", "test_acc", "forget_acc", "mia_efficacy") if m in metrics and m not in shown]
    rows = [[f"{what}", *[metrics.get(k) for k in shown + extra]]]
    if parent is not None:  # the review's baseline runs, when there
        from coun_tune.tracking.mlflow_store import ROLE, child_runs

        for b in sorted(
            (r for r in child_runs(client, parent) if r.data.tags.get(ROLE) == "baseline"),
            key=lambda r: r.data.tags.get("coun_tune.baseline", ""),
        ):
            rows.append(
                [b.data.tags.get("coun_tune.baseline", "baseline"), *[b.data.metrics.get(k) for k in shown + extra]]
            )
    headers = ["run", *[f"{k} ({describe.ARROW[objectives[k]]})" if k in objectives else k for k in shown], *extra]
    lines += ["", describe.md_table(headers, rows), ""]
    links = [f"[the trial's run]({describe.run_fragment(exp, run_id)})"]
    if parent is not None:
        links.insert(0, f"[the search's runs]({describe.runs_fragment(exp, parent_id)})")
        links.append(f"[the search run]({describe.run_fragment(exp, parent_id)})")
    links.append(f"[the logged model](#/experiments/{exp}/models/{model_id})")
    lines += ["**Links**: " + " · ".join(links), ""]
    lines += [f"Source run `{run_id}`, logged model `{model_id}`."]
    return "\n".join(lines) + "\n"


def register_model(client, run_id: str, name: str, alias: str, pick: str | None = None) -> str:
    """Register the run's MLflow model under `name` (created if new) and point `alias` at it.
    Registering the same logged model again reuses its version. The logged model is tagged with
    its versions (mark_registered), gets the run's latest metrics (log_run_metrics_to_model: the
    review's is_pareto and pareto_rank, logged after the model) and the version is described
    (version_description; `pick`, the pick as the user wrote it, defaults to the alias).
    Returns the version's URI,
    `models:/NAME/VERSION` (immutable; `models:/NAME@ALIAS` follows the alias)."""
    from mlflow.exceptions import MlflowException

    logged = logged_model_of(client, run_id)
    if logged is None:
        raise UsageError(f"run {run_id} has no MLflow model to register (was it logged by an older coun-tune?)")
    try:
        client.create_registered_model(name, description="Unlearned models exported by coun-tune.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    same = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.run_id == run_id and v.source == logged.artifact_location
    ]
    # source: the storage location itself. A `models:/ID` source makes MLflow's SQL registry look
    # the model up through the process-global tracking URI, not this client's (an MLflow TODO).
    version = (
        same[0]
        if same
        else client.create_model_version(
            name,
            source=logged.artifact_location,
            run_id=run_id,
            model_id=logged.model_id,
            tags={"coun_tune.run_id": run_id},
        )
    )
    mark_registered(client, logged.model_id, name, version.version)
    # what was logged on the run since the model (the review's is_pareto, pareto_rank, ...) goes
    # on the registered model too; values already there are kept once
    log_run_metrics_to_model(client, run_id, logged.model_id)
    client.update_model_version(
        name, str(version.version), description=version_description(client, run_id, logged.model_id, alias, pick)
    )
    client.set_registered_model_alias(name, alias, str(version.version))
    return f"models:/{name}/{version.version}"


def _artifact_location(client, uri: str) -> str:
    """The storage location of a model URI's files, resolved through this client (MLflow's own
    `models:/` resolution reads the process-global tracking/registry URI instead)."""
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/") :].partition("/")
            logged = logged_model_of(client, run_id)
            # "" or the model's name (trial_7), or unlearned_model (what older coun-tune printed)
            if logged is not None and path.strip("/") not in ("", MODEL_NAME, logged.name):
                logged = None
            # any other path (runs:/RUN_ID/model): the run's plain artifacts there
            if logged:
                return logged.artifact_location
            return client.get_run(run_id).info.artifact_uri + "/" + path.strip("/")
        rest = uri[len("models:/") :].strip("/")
        if rest.startswith("m-") and "/" not in rest and "@" not in rest:
            return client.get_logged_model(rest).artifact_location
        if "@" in rest:
            version = client.get_model_version_by_alias(*rest.split("@", 1))
        elif "/" in rest:
            version = client.get_model_version(*rest.rsplit("/", 1))
        else:
            raise UsageError(f"model URI {uri!r}: give a version or an alias: models:/NAME/VERSION, models:/NAME@ALIAS")
        model_id = getattr(version, "model_id", None)
        return client.get_logged_model(model_id).artifact_location if model_id else version.source
    except MlflowException as e:
        raise UsageError(f"model URI {uri!r} not found: {str(e).splitlines()[0][:200]}") from None


def _download(location: str, tracking_uri: str, name: str, dst: str) -> Path | None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        return Path(get_artifact_repository(location, tracking_uri=tracking_uri).download_artifacts(name, dst))
    except Exception:  # absent file: the caller says what is missing
        return None


def load_model_uri(uri: str, tracking_uri: str) -> tuple[dict, dict]:
    """(state dict, config) of the model at `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    `models:/MODEL_ID`, `runs:/RUN_ID/<model name>` (trial_7; `unlearned_model` works for any
    run) or `runs:/RUN_ID/model` (the plain files).
    The state dict is read with
    torch.load(weights_only=True) on the CPU; the config is the model's config.yaml with
    model_info.json's keys on top: arch, dataset, num_classes, image_shape, method, hparams."""
    import torch

    if not uri.startswith(("models:/", "runs:/")) or uri.rstrip("/") in ("models:", "runs:"):
        raise UsageError(f"model URI {uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    from coun_tune.tracking.mlflow_store import client_for

    location = _artifact_location(client_for(tracking_uri), uri)
    with tempfile.TemporaryDirectory() as d:
        weights, config_file, info_file = (
            _download(location, tracking_uri, f, d) for f in ("model.pt", "config.yaml", "model_info.json")
        )
        if weights is None or config_file is None:
            raise UsageError(f"model URI {uri!r} has no model.pt/config.yaml (not a coun-tune model)")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"model URI {uri!r}: model.pt is not a readable state dict ({type(e).__name__})") from None
        config = yaml.safe_load(config_file.read_text()) or {}
        info = json.loads(info_file.read_text()) if info_file is not None else model_info(config, state)
    if not isinstance(state, dict):
        raise UsageError(f"model URI {uri!r}: model.pt holds a {type(state).__name__}, not a state dict")
    return state, {**config, **info}


def model_uri_details(client, uri: str) -> dict[str, Any]:
    """Where a registered model URI points: name, version, run id, model id (for provenance)."""
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        v = client.get_model_version_by_alias(name, alias)
    else:
        name, version = rest.rsplit("/", 1)
        v = client.get_model_version(name, version)
    return {"name": name, "version": str(v.version), "run_id": v.run_id, "model_id": getattr(v, "model_id", None)}
