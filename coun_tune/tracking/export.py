"""Export: pick one config of a search's front (knee, best:METRIC, or a constraint), write the
YAML `coun-tune unlearn --config` / `coun-tune apply --config` take, and register the trial's
MLflow model with an alias naming the pick. Reads MLflow alone (tracking.review's rows)."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

from coun_tune import pareto
from coun_tune.errors import UsageError
from coun_tune.report import STDOUT, fmt
from coun_tune.report import plus_minus as _pm
from coun_tune.tracking import describe
from coun_tune.tracking.review import HOLDOUT, basis_note, objectives_of, pick_basis, trial_rows


def alias_for(pick: str) -> str:
    """An MLflow alias naming the pick: knee, best_retain_acc, retain_acc_ge_99."""
    kind, metric, op, value = pareto.parse_pick(pick)
    if kind == "knee":
        return "knee"
    if kind == "best":
        return f"best_{metric}"
    ops = {">=": "ge", "<=": "le", ">": "gt", "<": "lt"}
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{metric}_{ops[op]}_{value:g}")


def export_config(
    client,
    parent_run_id: str,
    pick: str,
    output: str | Path,
    include_pruned: bool = False,
    model_name: str | None = None,
    register: bool = True,
    stream=STDOUT,
) -> Path:
    """Write the picked trial's unlearn config (its `model/config.yaml`: every hyperparameter,
    defaults included) to `output` with a header naming the search, the trial, its metrics and
    its registered model: `model_name` (default: the search's experiment name) version N with
    the alias of the pick (knee, best_M, M_ge_X)."""
    from coun_tune.tracking.models import log_model_from_files, logged_model_of, register_model, resolve_config_file

    parent = client.get_run(parent_run_id)
    objectives = objectives_of(parent)
    rows = [r for r in trial_rows(client, parent, include_pruned) if all(k in r for k in objectives)]
    if not rows:
        raise UsageError(f"search {parent_run_id} has no completed trial to export")
    rows, basis = pick_basis(rows, list(objectives))
    row = rows[pareto.pick_index(rows, objectives, pick)]
    with tempfile.TemporaryDirectory() as d:
        try:
            local = Path(client.download_artifacts(row["run_id"], "model", d))
        except Exception:
            raise UsageError(f"trial run {row['run_id']} has no model/config.yaml artifact") from None
        if not (local / "config.yaml").is_file():
            raise UsageError(f"trial run {row['run_id']} has no model/config.yaml artifact")
        cfg = resolve_config_file(local / "config.yaml")  # every hyperparameter, defaults included
        model_uri, not_registered = None, None
        if register:
            try:
                if logged_model_of(client, row["run_id"]) is None and (local / "model.pt").is_file():
                    log_model_from_files(client, row["run_id"], local)  # a run logged before models existed
                name = model_name or client.get_experiment(parent.info.experiment_id).name
                model_uri = register_model(client, row["run_id"], name, alias_for(pick), pick=pick)
            except Exception as e:  # the config is still worth writing; say why there is no model
                not_registered = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(
                    f"coun-tune: warning: the picked trial's model was not registered ({not_registered})",
                    file=sys.stderr,
                )
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = {
        k: round(float(row[k]), 4)
        for k in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "forget_gap", "avg_gap")
        if k in row
    }
    header = (
        f"# exported by coun-tune from search run {parent_run_id}, trial {describe.trial_label(row)} "
        f"(Tune id {row['trial_id']}) "
        f"(MLflow run {row['run_id']}), pick {pick!r}\n# {basis_note(basis, rows)}\n"
        f"# trial metrics ({basis}): {json.dumps(metrics)}\n"
    )
    if basis == HOLDOUT:
        cal = {
            k: round(float(row[f"calibration_{k}"]), 4) for k in objectives if row.get(f"calibration_{k}") is not None
        }
        header += f"# calibration values: {json.dumps(cal)}\n"
    if not_registered:
        header += f"# model not registered: {not_registered}\n"
    alias_uri = model_uri.rsplit("/", 1)[0] + "@" + alias_for(pick) if model_uri else None
    if model_uri:
        header += f"# model_uri: {model_uri}  (alias {alias_uri})\n"
    print(export_line(row, objectives, basis, rows, model_uri, alias_uri, not_registered), file=stream)
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return out


def export_line(
    row: dict,
    objectives: dict[str, str],
    basis: str,
    rows: list[dict],
    model_uri: str | None,
    alias_uri: str | None,
    not_registered: str | None = None,
) -> str:
    """What export prints: the trial by the number its run is named with, its objective values
    (on the basis the pick was made on, ± std over the forget sets), what the pick rests on and
    the registered model's URI (version and alias), or why there is none."""
    values = ", ".join(f"{k} {fmt(_pm(row[k], row.get(f'{k}_std')))}" for k in objectives)
    where = (
        f"registered model {model_uri} (alias {alias_uri})"
        if model_uri
        else f"model not registered ({not_registered})"
        if not_registered
        else "model not registered (--no-register)"
    )
    return f"export: trial {describe.trial_label(row)} ({values}; {basis} values), {basis_note(basis, rows)}\n  {where}"


def exported_model_uri(path: str | Path) -> str | None:
    """The `# model_uri:` an exported YAML records (comments keep the file a valid
    `coun-tune unlearn --config`), or None."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("# model_uri: "):
            return line[len("# model_uri: ") :].split()[0]
    return None
