"""What a person sees in the MLflow UI without setting anything up: run names, the link that
opens a search's runs, run colours, provenance, and the Markdown descriptions (the tag
`mlflow.note.content`, rendered on the run's and the experiment's overview).

Links: MLflow 3.17 opens an experiment on its GenAI overview unless the experiment's kind is
set or the URL asks for the training view. Its runs page keeps the search box, the sort order
and the table/chart switch in the URL (read from the UI's bundle, 3.17.2, and checked in
tests/test_mlflow_ui.py): `#/experiments/<id>/runs?workflowType=machine_learning&searchFilter=
...&orderByKey=...&orderByAsc=true&compareRunsMode=CHART`. Only numeric metrics can colour or
filter the chart view, so the Pareto membership is a metric; the tag `mlflow.runColor` gives
each run its colour in every chart (front red, dominated grey, the original and the oracle
blue and green).
"""

from __future__ import annotations

import subprocess
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from coun_tune.tracking.mlflow_store import PARENT, coun_tune_command, sqlite_path

NOTE = "mlflow.note.content"
EXPERIMENT_KIND = "mlflow.experimentKind"  # "custom_model_development": the classic training view
RUN_COLOR = "mlflow.runColor"
TRIAL_NUMBER = "coun_tune.trial_number"
COLORS = {"pareto": "#d62728", "dominated": "#9e9e9e", "original": "#1f77b4", "oracle": "#2ca02c"}
ARROW = {"min": "↓ lower is better", "max": "↑ higher is better"}
DEFAULT_UI = "http://127.0.0.1:5000"


def trial_label(row: dict) -> str:
    """A trial's number (the logger numbers trials in order of start), else its Tune id."""
    return str(row.get("trial_number") or row.get("trial_id") or "?")


def short(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return str(v)
    return f"{v:.3g}" if isinstance(v, float) and v != int(v) else str(int(v))


def run_name(number: str, sampled: dict[str, Any]) -> str:
    """`trial 7 · lr 0.0512 · temperature 0.12 · epochs 2`: what makes this trial different."""
    return " · ".join([f"trial {number}", *[f"{k} {short(v)}" for k, v in sampled.items()]])


def point(values: dict[str, float]) -> str:
    """`forget_gap 1.44, retain_acc 100` (no dict repr, no -0.0)."""
    return ", ".join(f"{k} {short(float(v) + 0.0)}" for k, v in values.items())


def hypervolume_sentence(hv: dict, basis: str = "calibration", box: bool = True) -> str:
    """What the hypervolume number means (CLI, pareto.html, description), after the number.
    hv: review.hypervolume_over_original's info; box: also name the box's corners."""
    corners = f" in the box from ({point(hv['ideal'])}) to ({point(hv['reference'])})" if box else ""
    if hv.get("original"):
        return (
            f"over doing nothing: the share of what the untouched original ({point(hv['original'])}, {basis}) "
            f"leaves to gain{corners} that the front gains (0: no better than doing nothing, 1: the ideal point; "
            f"raw gain {hv['raw']:.4g})"
        )
    return f"the share of the box{corners} the front dominates (raw {hv['raw']:.4g})"


# --- links ----------------------------------------------------------------------------------


def ui_base(tracking_uri: str) -> str:
    """Where the UI of this tracking store is: the server itself, or a local `mlflow ui`."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves the UI of a SQLite store (None: a server is its own UI): it works
    pasted into a fresh shell (this environment's mlflow by absolute path) and runs light (one
    worker, no job runner); see mlflow_store.mlflow_ui_command."""
    from coun_tune.tracking.mlflow_store import mlflow_ui_command

    db = sqlite_path(tracking_uri)
    return None if db is None else mlflow_ui_command(db, port=int(DEFAULT_UI.rsplit(":", 1)[1]))


SHARED_VIEW = "mlflow.sharedViewState."  # experiment tag prefix of a saved view (the UI's "Share")
PARETO_SECTION = "coun-tune-pareto"


def share_key(parent_run_id: str) -> str:
    return f"coun-tune-{parent_run_id}"


def view_state(parent_run_id: str, objectives: dict[str, str], searched: Sequence[str]) -> dict:
    """A saved view of the runs page (the JSON the UI's "Share" stores in an experiment tag):
    this search's runs (trials and baselines) sorted by `pareto_rank`, the objectives, the
    Pareto metrics and the searched hyperparameters as columns, and a chart section with the
    objectives' scatter (points coloured by run colour: the front red) and a parallel
    coordinates chart of the searched hyperparameters against the objectives."""
    names = list(objectives)
    # objectives first (MLflow 3.17 lays metric columns out in its own key order, not this
    # list's; a UI that honours the order gets them first); crowding_distance stays a metric
    # but not a default column: it is a sampler's tie-breaker, not something to pick by
    metrics = [*names, *[m for m in ("is_knee", "is_pareto", "pareto_rank", "avg_gap", "test_acc") if m not in names]]
    charts = []
    for i, (x, y) in enumerate(zip(names, names[1:] + names[:1]) if len(names) > 2 else [tuple(names)]):
        if len(names) < 2:
            break
        charts.append(
            {
                "uuid": f"coun-tune-scatter-{i}",
                "type": "SCATTER",
                "runsCountToCompare": 100,
                "metricSectionId": PARETO_SECTION,
                "deleted": False,
                "isGenerated": False,
                "displayName": f"{x} vs {y} (red: Pareto front)",
                "xaxis": {"key": x, "type": "METRIC"},
                "yaxis": {"key": y, "type": "METRIC"},
            }
        )
    charts.append(
        {
            "uuid": "coun-tune-parallel",
            "type": "PARALLEL",
            "runsCountToCompare": 100,
            "metricSectionId": PARETO_SECTION,
            "deleted": False,
            "isGenerated": False,
            "displayName": "hyperparameters against the objectives",
            "selectedParams": list(searched),
            "selectedMetrics": [*names, "is_pareto"],
            "showAllRuns": True,
        }
    )
    return {
        "searchFilter": f"tags.`{PARENT}` = '{parent_run_id}'",
        "orderByKey": "metrics.`pareto_rank`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [*[f"metrics.`{m}`" for m in metrics], *[f"params.`{p}`" for p in searched]],
        "compareRunCharts": charts,
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "compareRunSections": [
            {
                "uuid": PARETO_SECTION,
                "name": "Pareto front (coun-tune)",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
    }


def runs_fragment(experiment_id: str, parent_run_id: str, chart: bool = False, shared: bool = True) -> str:
    """The UI's hash route of one search's runs (trials and baselines), front first: through
    the saved view (columns and charts set up) or, with shared=False, the plain filter."""
    query = {"workflowType": "machine_learning"}
    if shared:  # the UI ignores a saved view when the URL also holds search facets
        query["viewStateShareKey"] = share_key(parent_run_id)
    else:
        query.update(
            {
                "searchFilter": f"tags.`{PARENT}` = '{parent_run_id}'",
                "orderByKey": "metrics.`pareto_rank`",
                "orderByAsc": "true",
            }
        )
    if chart:
        query["compareRunsMode"] = "CHART"
    return f"#/experiments/{experiment_id}/runs?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


def run_fragment(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def runs_link(tracking_uri: str, experiment_id: str, parent_run_id: str, chart: bool = False) -> str:
    return f"{ui_base(tracking_uri)}/{runs_fragment(experiment_id, parent_run_id, chart)}"


# --- provenance -----------------------------------------------------------------------------


def provenance() -> dict[str, str]:
    """coun-tune's version, and the git commit when it runs from a checkout (dirty if edited)."""
    import coun_tune

    out = {"coun_tune.version": coun_tune.__version__}
    root = Path(coun_tune.__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", ""
        if commit:
            out["mlflow.source.git.commit"] = commit
            out["coun_tune.git_dirty"] = "true" if dirty else "false"
    return out


# --- Markdown -------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    return "–" if v is None else short(v).replace("|", "\\|")


PAD = "\u00a0\u00a0"  # no-break spaces: Markdown keeps them, so cells stay apart in the UI


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], padded: bool = False) -> str:
    """A GitHub-style Markdown table. padded: MLflow's note renderer draws tables with no cell
    padding or borders, so plain cells run together ("0.5199.81"): every cell is padded with
    no-break spaces, and numeric columns are right-aligned (`---:`) so their digits line up
    (the search's descriptions; unpadded: `| a | b |`, as registry descriptions are read)."""
    cells = [[c if isinstance(c, str) and c.startswith("[") else _cell(c) for c in r] for r in rows]
    if not padded:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    numeric = [
        bool(cells) and all(_numeric(r[j]) or r[j] == "–" for r in cells) and any(_numeric(r[j]) for r in cells)
        for j in range(len(headers))
    ]
    lines = [
        "|" + "|".join(f"{PAD}{h}{PAD}" for h in headers) + "|",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["|" + "|".join(f"{PAD}{c}{PAD}" for c in r) + "|" for r in cells]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text.split(" ")[0])
    except ValueError:
        return False
    return True


def search_description(
    *,
    name: str,
    experiment_id: str,
    parent_run_id: str,
    tracking_uri: str,
    scenario: dict,
    split_hash: str | None,
    method: str,
    objectives: dict[str, str],
    hv: dict,
    front: list[dict],
    baselines: dict[str, dict],
    param_names: list[str],
    n_trials: int,
    spec: dict | None,
    prov: dict[str, str],
    importances: dict[str, dict[str, float]] | None = None,
    n_validated: int | None = None,
) -> str:
    """The parent run's (and the experiment's) Markdown description.
    hv: {normalised, raw, reference: {metric: value}, ideal: {metric: value}} in metric units.
    front: rows of the Pareto trials ({run_id, trial_id, metrics..., param.X...})."""
    names = list(objectives)
    extra = [m for m in ("avg_gap", "test_acc") if m not in names]
    scen = ", ".join(f"{k} {v}" for k, v in scenario.items() if v is not None)
    lines = [
        f"## coun-tune search `{name}`: {method}",
        "",
        f"**Scenario**: {scen}" + (f"; split_hash `{split_hash}`" if split_hash else ""),
        "",
        "**Objectives**: " + ", ".join(f"{k} ({ARROW[m]})" for k, m in objectives.items()),
        "",
        f"**Hypervolume**: {hv['normalised']:.4f} {hypervolume_sentence(hv, hv.get('basis', 'calibration'))}. "
        "Its history after each completed trial (calibration values) is the metric `hypervolume_history`.",
        "",
        f"**Pareto front**: {len(front)} of "
        + (
            f"the {n_validated} configs re-run on hold-out forget sets ({n_trials} completed trials)"
            if n_validated is not None
            else f"{n_trials} completed trials"
        )
        + " (each row links to its run):",
        "",
    ]
    rows = [
        [
            f"[trial {trial_label(r)}{' ★ knee' if r.get('is_knee') == 1.0 else ''}]"
            f"({run_fragment(experiment_id, r['run_id'])})",
            *[r.get(k) for k in names],
            *[r.get(m) for m in extra],
            *[r.get(f"param.{p}") for p in param_names],
        ]
        for r in front
    ]
    for label, b in baselines.items():
        cell = f"[{label}]({run_fragment(experiment_id, b['run_id'])})" if b.get("run_id") else label
        rows.append([cell, *[b.get(k) for k in names], *[b.get(m) for m in extra], *[None] * len(param_names)])
    lines += [md_table(["run", *names, *extra, *param_names], rows, padded=True), ""]
    if importances:
        objs = [k for k in names if k in importances]
        order = sorted(param_names, key=lambda p: -importances[objs[0]].get(p, 0.0))
        lines += [
            "**Hyperparameter importance** per objective (Optuna's fANOVA over every completed trial's calibration "
            "values; each column sums to 1; metrics `param_importance/<objective>/<param>`):",
            "",
            md_table(
                ["hyperparameter", *objs], [[p, *[importances[k].get(p) for k in objs]] for p in order], padded=True
            ),
            "",
        ]
    lines += [
        f"**Review**: [this search's runs]({runs_fragment(experiment_id, parent_run_id)}) "
        f"(sorted by `pareto_rank`; `is_pareto` = 1 on the front) · "
        f"[charts]({runs_fragment(experiment_id, parent_run_id, chart=True)}) "
        "(red: Pareto front, grey: dominated, blue: original, green: oracle) · "
        "`pareto.png`, `pareto.html` and the trials table `trials.json` are this run's artifacts.",
        "",
        "**Export** the knee (or `best:METRIC`, or a constraint such as `retain_acc>=99`):",
        "`"
        + coun_tune_command(
            "export", parent_run_id, "--pick", "knee", "--output", "picked.yaml", "--tracking-uri", tracking_uri
        )
        + "`",
        "",
    ]
    prov_line = f"coun-tune {prov.get('coun_tune.version', '?')}"
    if prov.get("mlflow.source.git.commit"):
        prov_line += f", git commit `{prov['mlflow.source.git.commit'][:12]}`"
        prov_line += " (with uncommitted changes)" if prov.get("coun_tune.git_dirty") == "true" else ""
    lines += [f"**Provenance**: {prov_line}; the spec (also `spec.yaml` in this run's artifacts):"]
    if spec:
        lines += ["", "```yaml", yaml.safe_dump(spec, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"
