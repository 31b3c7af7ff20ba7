"""Pareto review, from MLflow alone (so it works after the search, on another machine, and on
`coun-tune pareto`); export of a pick lives in tracking.export.

review_pareto, idempotent (run it again after a resume and everything is brought up to date),
in named steps (load_front, mark_trials, log_importances, log_hypervolume, write_description,
log_front_artifacts, print_front):
  - on each trial run: metrics `is_pareto` (1/0), `pareto_rank` (0 = front, 1 = the front once
    it is removed, ...), `crowding_distance` (within its rank; the extremes of a front, which
    NSGA-II gives +inf, are logged as m + 1 for m objectives: above any interior point's value,
    which is at most m, and finite so charts keep their scale), `is_knee`; the tag `pareto`
    true/false; its colour in the UI's charts; the knee's mark in its run name;
  - two baseline runs under the search (the original and the oracle, from `base_models.json`
    on the parent) with their metrics and gaps, so they appear as points in the charts;
  - on the parent: `hypervolume` (over the original, see tracking.hypervolume) and its
    history, `hypervolume_raw`, `pareto_size`, parameter importances, `pareto.png`,
    `pareto.html`, the trials table (`trials.json` via log_table, which the UI renders, and
    `trials.parquet`), provenance tags and the Markdown description; the experiment gets the
    same description and opens in the training view;
  - prints the front and the link that opens the search's runs in the UI.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from coun_tune import pareto
from coun_tune.errors import UsageError
from coun_tune.report import STDOUT, table
from coun_tune.report import plus_minus as _pm
from coun_tune.tracking import describe
from coun_tune.tracking.hypervolume import hypervolume_history, hypervolume_over_original
from coun_tune.tracking.marks import (
    MIA_UNSTABLE,
    MIA_UNSTABLE_SPREAD,
    knee_run_name,
    knee_warning,
    mia_note,
    mia_unstable,
)
from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, child_runs

PARAM_SKIP = {"method"}
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"
MAX_NOTE = 8000
BASELINE = "coun_tune.baseline"  # tag of the reference runs: "original" | "oracle"
BASELINE_NAMES = {"original": "original (θo, before unlearning)", "oracle": "oracle (θr, retrained without D_f)"}


def objectives_of(parent) -> dict[str, str]:
    raw = parent.data.tags.get("coun_tune.objectives")
    return json.loads(raw) if raw else {"forget_gap": "min", "retain_acc": "max"}


def trial_rows(client, parent, include_pruned: bool = False) -> list[dict]:
    """One dict per completed trial run: run_id, trial_id, params (the config) and final metrics.
    Trials the early-stopping scheduler pruned (KILLED, `pruned_at_epoch`) hold truncated
    metrics: left out unless include_pruned. Baseline runs are not trials."""
    rows = []
    for run in child_runs(client, parent):
        if run.data.tags.get(ROLE, "trial") != "trial":
            continue
        pruned = run.info.status == "KILLED" and "pruned_at_epoch" in run.data.metrics
        if run.info.status != "FINISHED" and not (include_pruned and pruned):
            continue
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": run.data.tags.get(TRIAL_ID, ""),
                "trial_number": run.data.tags.get(describe.TRIAL_NUMBER),
                "run_name": run.info.run_name or "",
                "end_time": run.info.end_time or 0,
                **{f"param.{k}": v for k, v in run.data.params.items()},
                **run.data.metrics,
            }
        )
    rows.sort(key=lambda r: (int(r["trial_number"]) if str(r["trial_number"]).isdigit() else 0, r["trial_id"]))
    return rows


def _parent_json(client, run_id: str, name: str):
    with tempfile.TemporaryDirectory() as d:
        try:
            path = Path(client.download_artifacts(run_id, name, d))
        except Exception:  # an older search without it
            return None
        return yaml.safe_load(path.read_text())


def ensure_baselines(client, parent) -> dict[str, dict]:
    """The original's and the oracle's runs under the search (created once, from the parent's
    base_models.json): {label: {run_id, metric: value}} with gaps to the oracle."""
    from mlflow.entities import Metric

    from coun_tune.core.metrics import gaps

    base = _parent_json(client, parent.info.run_id, "base_models.json")
    if not base or "oracle" not in base:
        return {}
    existing = {r.data.tags.get(BASELINE): r for r in child_runs(client, parent) if r.data.tags.get(ROLE) == "baseline"}
    params = {k: v for k, v in parent.data.params.items() if k.startswith("scenario.") or k == "split_hash"}
    out = {}
    # The baselines span the search's own time (its start to its end, or now while it is still
    # open): their own training was cached or done before the search started, so there is no
    # truer time, and a 150 ms "duration" read as if the reference had been made in a blink.
    start, end = parent.info.start_time, parent.info.end_time or int(time.time() * 1000)
    for label in ("original", "oracle"):
        metrics = {k: float(v) for k, v in base[label].items() if isinstance(v, (int, float))}
        metrics.update(gaps(metrics, base["oracle"]))
        run = existing.get(label)
        if run is not None and run.info.end_time != end:  # the search went on (a resume): follow it
            client.set_terminated(run.info.run_id, status="FINISHED", end_time=end)
        if run is None:
            run = client.create_run(
                parent.info.experiment_id,
                start_time=start,
                run_name=BASELINE_NAMES[label],
                tags={
                    PARENT: parent.info.run_id,
                    ROLE: "baseline",
                    BASELINE: label,
                    describe.RUN_COLOR: describe.COLORS[label],
                    "status": "baseline",
                },
            )
            from coun_tune.tracking.mlflow_store import log_params

            log_params(client, run.info.run_id, params)
            ts = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
            client.set_terminated(run.info.run_id, status="FINISHED", end_time=end)
        out[label] = {"run_id": run.info.run_id, **metrics}
    return out


HOLDOUT_MEAN = re.compile(r"^holdout_(?P<metric>[a-z_]+)_mean$")
HOLDOUT, CALIBRATION = "hold-out", "calibration"


def pick_basis(rows: list[dict], names: list[str]) -> tuple[list[dict], str]:
    """What the front, the knee and every export pick are computed on: when the search's front
    was re-run on hold-out splits (tracking.holdout), the validated trials with every metric
    replaced by its hold-out mean (the calibration value kept as `calibration_<metric>`), and
    "hold-out"; otherwise the rows as they are, and "calibration"."""
    validated = [r for r in rows if all(f"holdout_{k}_mean" in r for k in names)]
    if not validated:
        return rows, CALIBRATION
    view = []
    for r in validated:
        v = dict(r)
        for k, value in r.items():
            m = HOLDOUT_MEAN.match(k)
            if m and not m["metric"].startswith("original_"):
                v[f"calibration_{m['metric']}"] = r.get(m["metric"])
                v[f"calibration_{m['metric']}_std"] = r.get(f"{m['metric']}_std", float("nan"))
                v[m["metric"]] = value
                v[f"{m['metric']}_std"] = r.get(f"holdout_{m['metric']}_std", float("nan"))
        view.append(v)
    return view, HOLDOUT


def basis_note(basis: str, rows: list[dict]) -> str:
    """The line that says what a pick was made on."""
    if basis != HOLDOUT:
        return "picked on the calibration values (the search had no hold-out check)"
    n = int(max((r.get("holdout_n", 0) for r in rows), default=0))
    return f"picked on hold-out means over {n} forget sets no trial was scored on (calibration values beside them)"


def rank_front(values: np.ndarray, modes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ranks (n,), crowding distance (n,) within each rank, +inf capped at m + 1)."""
    ranks = pareto.non_dominated_ranks(values, modes)
    crowd = np.zeros(len(values))
    for r in set(ranks.tolist()) - {-1}:
        idx = np.flatnonzero(ranks == r)
        crowd[idx] = pareto.crowding_distance(values[idx], modes)
    return ranks, np.minimum(crowd, len(modes) + 1.0)


@dataclass
class Front:
    """A search's trials as a review sees them: every completed trial (`all_rows`, calibration
    values), the rows picks are made on (`rows`, see pick_basis) with their objective values
    (`values`, (n, m)), non-dominated ranks and crowding distances (n,), the knee's index into
    `rows`, and the reference runs (calibration `baselines`; `base_doc` = base_models.json)."""

    parent: Any
    objectives: dict[str, str]
    all_rows: list[dict]
    rows: list[dict]
    basis: str
    values: np.ndarray
    ranks: np.ndarray
    crowd: np.ndarray
    knee: int
    baselines: dict[str, dict]
    base_doc: dict

    @property
    def names(self) -> list[str]:
        return list(self.objectives)

    @property
    def modes(self) -> list[str]:
        return list(self.objectives.values())

    @property
    def mask(self) -> np.ndarray:
        return self.ranks == 0

    @property
    def held(self) -> bool:
        return self.basis == HOLDOUT

    @property
    def references(self) -> dict[str, dict]:
        """The original and the oracle on the forget sets the pick is made on."""
        return holdout_baselines(self.base_doc, self.names) if self.held else self.baselines

    @property
    def shown(self) -> list[int]:
        """The front's rows, by the first objective."""
        return sorted(np.flatnonzero(self.mask), key=lambda i: self.values[i, 0])


def load_front(client, parent_run_id: str, objectives: dict[str, str] | None, include_pruned: bool) -> Front:
    parent = client.get_run(parent_run_id)
    objectives = objectives or objectives_of(parent)
    names = list(objectives)
    all_rows = [r for r in trial_rows(client, parent, include_pruned) if all(k in r for k in names)]
    if not all_rows:
        raise UsageError(f"search {parent_run_id} has no completed trial with {', '.join(names)}")
    rows, basis = pick_basis(all_rows, names)
    values = np.array([[r[k] for k in names] for r in rows], dtype=float)
    ranks, crowd = rank_front(values, list(objectives.values()))
    return Front(
        parent=parent,
        objectives=objectives,
        all_rows=all_rows,
        rows=rows,
        basis=basis,
        values=values,
        ranks=ranks,
        crowd=crowd,
        knee=pareto.pick_index(rows, objectives, "knee"),
        baselines=ensure_baselines(client, parent),
        base_doc=_parent_json(client, parent_run_id, "base_models.json") or {},
    )


def mark_trials(client, f: Front, ts: int) -> None:
    """Each trial's place on the front (metrics is_pareto, pareto_rank, crowding_distance,
    is_knee; tag and chart colour), the knee's run name and the unstable-MIA tag."""
    from mlflow.entities import Metric

    from coun_tune.tracking.models import model_ids_by_run

    model_ids = model_ids_by_run(client, f.parent.info.experiment_id)  # the Models tab shows them too
    for i, (r, rank, cd) in enumerate(zip(f.rows, f.ranks, f.crowd)):
        r.update(
            is_pareto=float(rank == 0), pareto_rank=float(rank), crowding_distance=float(cd), is_knee=float(i == f.knee)
        )
        client.log_batch(
            r["run_id"],
            metrics=[
                Metric(k, r[k], ts, 0, model_id=model_ids.get(r["run_id"]))
                for k in ("is_pareto", "pareto_rank", "crowding_distance", "is_knee")
            ],
        )
        client.set_tag(r["run_id"], "pareto", "true" if rank == 0 else "false")
        client.set_tag(r["run_id"], describe.RUN_COLOR, describe.COLORS["pareto" if rank == 0 else "dominated"])
    picked = {r["run_id"]: r for r in f.rows}
    for r in f.all_rows:  # every trial's own row carries its marks too (pick_basis copied them)
        r.update({k: picked[r["run_id"]][k] for k in ("is_pareto", "is_knee")} if r["run_id"] in picked else {})
    for r in f.all_rows:  # off the validated set: on no front a pick is made from
        if r["run_id"] not in picked:
            r.update(is_pareto=0.0, is_knee=0.0)
            client.log_batch(r["run_id"], metrics=[Metric(k, 0.0, ts, 0) for k in ("is_pareto", "is_knee")])
            client.set_tag(r["run_id"], "pareto", "false")
            client.set_tag(r["run_id"], describe.RUN_COLOR, describe.COLORS["dominated"])
    knee_run = f.rows[f.knee]["run_id"]
    for r in f.all_rows:  # the knee's run name carries the marker; a former knee's loses it
        named = knee_run_name(r.get("run_name", ""), r["run_id"] == knee_run)
        if named != r.get("run_name", ""):
            client.update_run(r["run_id"], name=named)
            r["run_name"] = named
        client.set_tag(r["run_id"], MIA_UNSTABLE, "true" if mia_unstable(r) else "false")


def log_importances(client, f: Front, spec: dict | None, params: list[str], searched: list[str], ts: int) -> dict:
    """Optuna's parameter importances per objective on the parent (metrics and a JSON)."""
    from mlflow.entities import Metric

    from coun_tune.tracking.importance import IMPORTANCE_PREFIX, param_importances

    # on every completed trial's calibration values: what the sampler searched on
    importances = param_importances(f.all_rows, f.objectives, (spec or {}).get("space") or {}, searched)
    run_id = f.parent.info.run_id
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"{IMPORTANCE_PREFIX}/{k}/{p}", v, ts, 0) for k, per in importances.items() for p, v in per.items()
        ],
    )
    if importances:
        client.log_dict(run_id, importances, "param_importances.json")
    return importances


def log_hypervolume(client, f: Front, ts: int) -> tuple[float, float, dict]:
    """The front's hypervolume over the original (on the pick's basis) and its history after
    each completed trial (on the calibration values), on the parent."""
    from mlflow.entities import Metric

    original = f.references.get("original", {})
    hv, hv_raw, hv_info = hypervolume_over_original(f.values[f.mask], f.names, f.modes, original, f.values)
    hv_info["basis"] = f.basis
    history = hypervolume_history(f.all_rows, f.names, f.modes, f.baselines.get("original", {}))
    run_id = f.parent.info.run_id
    client.log_batch(
        run_id,
        metrics=[
            Metric("hypervolume", hv, ts, 0),
            Metric("hypervolume_raw", hv_raw, ts, 0),
            Metric("pareto_size", float(f.mask.sum()), ts, 0),
            # step k: after the k-th completed trial (by end time); the trial's end time as the
            # timestamp, so a second review logs the same points (MLflow keeps them once)
            *[Metric(HV_HISTORY, v, t, k) for k, (t, v) in enumerate(history, start=1)],
        ],
    )
    # what the hypervolume is measured from: the original (doing nothing), in the box below
    client.set_tag(run_id, "hypervolume_reference", json.dumps(hv_info["original"] or hv_info["reference"]))
    client.set_tag(run_id, "hypervolume_box", json.dumps({"worst": hv_info["reference"], "ideal": hv_info["ideal"]}))
    return hv, hv_raw, hv_info


def front_table(f: Front, searched: list[str]) -> tuple[list[str], list[list]]:
    """(headers, rows) of the front as the CLI and pareto.html show it."""
    names, rows = f.names, f.rows
    extra = [m for m in ("avg_gap", "test_acc") if m not in names]
    headers = [
        "trial",
        *[f"{k} hold-out" if f.held else k for k in names],
        *([f"{k} calibration" for k in names] + ["flag"] if f.held else []),
        *extra,
        *searched,
    ]
    body = [
        [
            describe.trial_label(rows[i]) + (" (knee)" if i == f.knee else ""),
            *[_pm(rows[i][k], rows[i].get(f"{k}_std")) for k in names],
            *(
                [_pm(rows[i].get(f"calibration_{k}"), rows[i].get(f"calibration_{k}_std")) for k in names]
                + [rows[i].get("holdout_flagged_on", "") if rows[i].get("holdout_flag") else ""]
                if f.held
                else []
            ),
            *[rows[i].get(m) for m in extra],
            *[describe.short(rows[i].get(f"param.{p}")) for p in searched],
        ]
        for i in f.shown
    ]
    return headers, body


def write_description(
    client, f: Front, name: str, spec: dict | None, hv_info: dict, searched: list[str], importances: dict, warning
) -> None:
    """The parent's and the experiment's Markdown description (what the pick rests on first),
    provenance tags, and the shared view the review link opens."""
    parent, run_id = f.parent, f.parent.info.run_id
    prov = describe.provenance()
    for k, v in prov.items():
        client.set_tag(run_id, k, v)
    baselines = {k: {**v, "run_id": f.baselines.get(k, {}).get("run_id")} for k, v in f.references.items()}

    def describe_search(spec_shown: dict | None) -> str:
        return describe.search_description(
            name=name,
            experiment_id=parent.info.experiment_id,
            parent_run_id=run_id,
            tracking_uri=client.tracking_uri,
            scenario={
                k[len("scenario.") :]: v
                for k, v in parent.data.params.items()
                if k.startswith("scenario.") and v not in ("None", "")
            },
            split_hash=parent.data.params.get("split_hash"),
            method=parent.data.tags.get("coun_tune.method", "?"),
            objectives=f.objectives,
            hv=hv_info,
            front=[f.rows[i] for i in f.shown],
            baselines=baselines,
            param_names=searched,
            n_trials=len(f.all_rows),
            importances=importances,
            n_validated=len(f.rows) if f.held else None,
            spec=spec_shown,
            prov=prov,
        )

    n_cal = len(json.loads(parent.data.tags.get(CAL_TAG, "[0]")))
    block = pick_lines(f.rows, f.shown, f.names, f.knee, f.basis, n_cal=n_cal)
    block += [f"**Warning**: {warning}", ""] if warning else []
    unstable_note = mia_note(f.all_rows)
    block += [unstable_note, ""] if unstable_note else []

    def with_block(text: str) -> str:  # after the heading: what the pick rests on comes first
        head, _, rest = text.partition("\n")
        return "\n".join([head, "", *block]) + rest

    note = with_block(describe_search(spec))
    if len(note) > MAX_NOTE:  # MLflow caps a run tag at 8000 characters; spec.yaml is an artifact anyway
        note = with_block(describe_search(None))
    if len(note) > MAX_NOTE:
        note = note[: MAX_NOTE - 80] + "\n\n(cut here: the whole front is in trials.json)\n"
    experiment_id = parent.info.experiment_id
    client.set_tag(run_id, describe.NOTE, note)
    client.set_experiment_tag(experiment_id, describe.NOTE, note)
    client.set_experiment_tag(experiment_id, describe.EXPERIMENT_KIND, "custom_model_development")
    client.set_experiment_tag(
        experiment_id,
        describe.SHARED_VIEW + describe.share_key(run_id),
        json.dumps(describe.view_state(run_id, f.objectives, searched)),
    )


TABLE_METRICS = (
    "retain_acc",
    "forget_acc",
    "test_acc",
    "mia_efficacy",
    "forget_gap",
    "avg_gap",
    "wall_seconds",
    "flops",
)


def log_front_artifacts(
    client, f: Front, name: str, params: list[str], hv: float, hv_info: dict, headers: list[str], body: list[list]
) -> None:
    """The trials table (`trials.json` as an MLflow table, `trials.parquet`), `pareto.png` and
    `pareto.html` on the parent."""
    import pandas as pd

    from coun_tune.tracking.plots import pareto_figure, pareto_page

    run_id = f.parent.info.run_id
    table_cols = [  # what a reviewer reads first: the trial, its objectives, its place on the front
        "trial",
        *f.names,
        "is_knee",
        "is_pareto",
        "pareto_rank",
        *[m for m in TABLE_METRICS if m not in f.names],
        *[p[6:] for p in params],
        "crowding_distance",  # NSGA-II's tie-breaker within a rank: bookkeeping, last
        "run_id",
    ]
    trials = pd.DataFrame(
        [
            {c: (describe.trial_label(r) if c == "trial" else r.get(c, r.get(f"param.{c}"))) for c in table_cols}
            for r in f.rows
        ]
    )
    with tempfile.TemporaryDirectory() as d:
        # log_table's own format and tag (the UI shows the file as a table), written whole:
        # log_table itself appends to an existing table, and a review may run again
        trials.to_json(Path(d) / "trials.json", orient="split", index=False)
        logged = json.loads(client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        if {"path": "trials.json", "type": "table"} not in logged:
            client.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps([*logged, {"path": "trials.json", "type": "table"}]))
        as_text = {c: str for c in ["trial", "run_id", *[p[6:] for p in params]]}
        trials.astype(as_text).to_parquet(Path(d) / "trials.parquet")
        title = (
            f"{name}: Pareto front of {len(f.rows)} trials (labels: trial numbers), hypervolume {hv:.3f}"
            if not f.held
            else f"{name}: front on hold-out means ({len(f.rows)} configs; hollow: calibration), HV {hv:.3f}"
        )
        svg = pareto_figure(
            f.rows,
            f.names,
            f.modes,
            f.mask,
            f.references,
            Path(d) / "pareto.png",
            title,
            knee=f.knee,
            noise=f.base_doc.get("oracle_noise") or {},
        )
        caption = f"hypervolume {hv:.4f} {describe.hypervolume_sentence(hv_info, f.basis)}"
        (Path(d) / "pareto.html").write_text(pareto_page(svg, headers, body, title, caption))
        for name_ in ("trials.json", "trials.parquet", "pareto.png", "pareto.html"):
            client.log_artifact(run_id, str(Path(d) / name_))


def print_front(f: Front, hv: float, hv_info: dict, headers: list[str], body: list[list], warning, out) -> None:
    """The front table, what it rests on, the knee's warning and the unstable-MIA trials."""
    print(
        "\nPareto front ("
        + ", ".join(f"{k}: {v}" for k, v in f.objectives.items())
        + f") on the {f.basis} values; hypervolume {hv:.4f} "
        + f"{describe.hypervolume_sentence(hv_info, f.basis, box=False)}:",
        file=out,
    )
    print(table(headers, body), file=out)
    n_front = int(f.mask.sum())
    if f.held:
        print(
            f"{n_front} of the {len(f.rows)} configs re-run on hold-out forget sets on the front "
            f"({len(f.all_rows)} completed trials); {basis_note(f.basis, f.rows)}",
            file=out,
        )
    else:
        print(f"{n_front} of {len(f.rows)} completed trials on the front", file=out)
    if warning:
        print(f"warning: {warning}", file=out)
    unstable = [describe.trial_label(r) for r in f.all_rows if mia_unstable(r)]
    if unstable:
        print(
            f"MIA unstable on trial{'s' if len(unstable) > 1 else ''} {', '.join(unstable)} (resample spread above "
            f"{MIA_UNSTABLE_SPREAD:g} points: their mia_gap/avg_gap measure the attack; tag {MIA_UNSTABLE}=true)",
            file=out,
        )


def review_pareto(
    client, parent_run_id: str, objectives: dict[str, str] | None = None, out=STDOUT, include_pruned: bool = False
) -> dict:
    """Compute the front of a search from MLflow and write it back (see the module docstring)."""
    f = load_front(client, parent_run_id, objectives, include_pruned)
    ts = int(time.time() * 1000)
    mark_trials(client, f, ts)
    params = sorted({k for r in f.rows for k in r if k.startswith("param.") and k[6:] not in PARAM_SKIP})
    spec = _parent_json(client, parent_run_id, "spec.yaml")
    searched = searched_names(spec, params)
    importances = log_importances(client, f, spec, params, searched, ts)
    hv, hv_raw, hv_info = log_hypervolume(client, f, ts)
    headers, body = front_table(f, searched)
    name = (spec or {}).get("name") or client.get_experiment(f.parent.info.experiment_id).name
    warning = knee_warning(f.rows[f.knee], f.references.get("original", {}))
    write_description(client, f, name, spec, hv_info, searched, importances, warning)
    log_front_artifacts(client, f, name, params, hv, hv_info, headers, body)
    print_front(f, hv, hv_info, headers, body, warning, out)
    print_review_link(client.tracking_uri, f.parent.info.experiment_id, parent_run_id, out)
    return {
        "rows": f.rows,
        "all_rows": f.all_rows,
        "basis": f.basis,
        "knee": f.knee,
        "mask": f.mask.tolist(),
        "hypervolume": hv,
        "hypervolume_raw": hv_raw,
        "objectives": f.objectives,
        "baselines": f.baselines,
    }


CAL_TAG = "coun_tune.calibration_seeds"
HV_HISTORY = "hypervolume_history"


def pick_lines(rows: list[dict], shown: list[int], names: list[str], knee: int, basis: str, n_cal: int) -> list[str]:
    """The description's first paragraph: what the front and the picks rest on, with the
    calibration and hold-out values side by side when there was a hold-out check."""
    if basis != HOLDOUT:
        what = (
            f"means over {n_cal} calibration forget sets (± sample std)" if n_cal > 1 else "one calibration forget set"
        )
        return [
            f"**Not validated on unseen forget sets**: the front is computed on {what}. Add "
            "`holdout: {split_seeds: [...]}` to the spec, or run `coun-tune transfer`, before trusting a pick.",
            "",
        ]
    n = int(max((r.get("holdout_n", 0) for r in rows), default=0))
    head = ["trial", *[h for k in names for h in (f"{k} calibration", f"{k} hold-out")], "flag"]
    body = [
        [
            describe.trial_label(rows[i]) + (" (knee)" if i == knee else ""),
            *[
                v
                for k in names
                for v in (
                    _pm(rows[i].get(f"calibration_{k}"), rows[i].get(f"calibration_{k}_std")),
                    _pm(rows[i][k], rows[i].get(f"{k}_std")),
                )
            ],
            "⚑ " + rows[i].get("holdout_flagged_on", "") if rows[i].get("holdout_flag") else "",
        ]
        for i in shown
    ]
    return [
        f"**Picked on hold-out means** over {n} forget sets no trial was scored on (the front, the knee and every "
        f"export); calibration means over {n_cal} splits beside them (mean ± sample std). ⚑: the hold-out mean lies "
        "outside the calibration mean ± 2 standard errors + the oracle's seed noise (the search's value did not "
        "generalise). The table `holdout.json` and `holdout.parquet` hold every run.",
        "",
        describe.md_table(head, body, padded=True),
        "",
    ]


def holdout_baselines(base_doc: dict, names: list[str]) -> dict[str, dict]:
    """The original and the oracle as reference points on the hold-out splits: the mean of each
    metric over the hold-out splits (the original's gaps each to its split's oracle; the
    oracle's gaps are 0 by definition)."""
    from coun_tune.core.metrics import gaps

    splits = [v for v in (base_doc.get("splits") or {}).values() if v.get("role") == "holdout"]
    if not splits:
        return {}
    out = {}
    for label in ("original", "oracle"):
        per = [{**sp[label], **gaps(sp[label], sp["oracle"])} for sp in splits]
        out[label] = {k: float(np.mean([p[k] for p in per])) for k in per[0] if all(k in p for p in per)}
    return out


def print_review_link(tracking_uri: str, experiment_id: str, parent_run_id: str, out=STDOUT) -> None:
    cmd = describe.ui_command(tracking_uri)
    print("\nreview in MLflow" + (f" (serve it first: {cmd})" if cmd else "") + ":", file=out)
    print(f"  {describe.runs_link(tracking_uri, experiment_id, parent_run_id)}", file=out)


def searched_names(spec: dict | None, params: list[str]) -> list[str]:
    """The hyperparameters the search varied (the spec's space entries that are domains), in
    the spec's order; without a spec, every logged hyperparameter."""
    space = (spec or {}).get("space") or {}
    varied = [k for k, v in space.items() if isinstance(v, dict) and f"param.{k}" in params]
    return varied or [p[6:] for p in params if not p.startswith(("param.scenario.", "param.split_hash"))]
