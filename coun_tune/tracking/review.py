"""Pareto review and config export, from MLflow alone (so they work after the search, on
another machine, and on `coun-tune pareto` / `coun-tune export`).

review_pareto, idempotent (run it again after a resume and everything is brought up to date):
  - on each trial run: metrics `is_pareto` (1/0), `pareto_rank` (0 = front, 1 = the front once
    it is removed, ...), `crowding_distance` (within its rank; the extremes of a front, which
    NSGA-II gives +inf, are logged as m + 1 for m objectives: above any interior point's value,
    which is at most m, and finite so charts keep their scale); the tag `pareto` true/false;
    its colour in the UI's charts;
  - two baseline runs under the search (the original and the oracle, from `base_models.json`
    on the parent) with their metrics and gaps, so they appear as points in the charts;
  - on the parent: `hypervolume` (normalised, see pareto.normalised_hypervolume),
    `hypervolume_raw`, `pareto_size`, the reference point, `pareto.png`, `pareto.html`, the
    trials table (`trials.json` via log_table, which the UI renders, and `trials.parquet`),
    provenance tags and the Markdown description; the experiment gets the same description
    and opens in the training view;
  - prints the front and the link that opens the search's runs in the UI.
export_config: picks one front config (knee, best:METRIC, or a constraint), writes the YAML
`coun-tune unlearn --config` takes, registers the trial's MLflow model with an alias.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from coun_tune import pareto
from coun_tune.errors import UsageError
from coun_tune.report import fmt, table
from coun_tune.report import plus_minus as _pm
from coun_tune.tracking import describe
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


KNEE_MARK = "★ knee · "  # run-name prefix of the knee's run (the runs table's name column)
# A trial's SVC MIA is "unstable" when the efficacy over MIA_RESAMPLES SVC fits on resampled
# members (core.metrics: mia_efficacy_resample_min/_max) spreads by more than this many points.
# Why 10: on near-perfect models the MIA is bistable (METHOD.md section 4); in the README's main
# job the stable trials spread by 0.1-2.3 points and the bistable ones by 57-83, so the cut is
# not delicate; and 10 points of mia_gap move avg_gap (the mean of four gaps) by 2.5, more than
# the whole range of avg_gap over the stable trials (1.35-1.60) and more than any gap between
# the knee and the untouched original: a difference that size is the attack's, not forgetting.
MIA_UNSTABLE_SPREAD = 10.0
MIA_UNSTABLE = "mia_unstable"  # trial tag: "true" | "false"


def knee_run_name(name: str, is_knee: bool) -> str:
    """The run name with the knee's marker added or removed (idempotent)."""
    bare = name[len(KNEE_MARK) :] if name.startswith(KNEE_MARK) else name
    return KNEE_MARK + bare if is_knee else bare


def mia_spread(row: dict) -> float | None:
    """max - min of the MIA efficacy over the resampled SVC fits, or None when not logged."""
    lo, hi = row.get("mia_efficacy_resample_min"), row.get("mia_efficacy_resample_max")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return None
    return float(hi) - float(lo)


def mia_unstable(row: dict) -> bool:
    spread = mia_spread(row)
    return spread is not None and spread > MIA_UNSTABLE_SPREAD


def mia_note(rows: list[dict]) -> str | None:
    """The description's line on trials whose avg_gap is driven by an unstable MIA: each with
    its avg_gap and the mean of its other three gaps (avg_gap without the MIA's term)."""
    parts = []
    for r in rows:
        if not mia_unstable(r) or not all(isinstance(r.get(k), (int, float)) for k in ("avg_gap", "mia_gap")):
            continue
        rest = (4 * r["avg_gap"] - r["mia_gap"]) / 3
        parts.append(
            f"trial {describe.trial_label(r)}: avg_gap {r['avg_gap']:.2f} ({rest:.2f} without mia_gap "
            f"{r['mia_gap']:.2f}; MIA spread {mia_spread(r):.1f})"
        )
    if not parts:
        return None
    return (
        f"**MIA unstable** (tag `{MIA_UNSTABLE}=true`: the SVC MIA's efficacy over the resampled fits spreads by "
        f"more than {MIA_UNSTABLE_SPREAD:g} points, so their mia_gap and avg_gap measure the attack, not forgetting): "
        + "; ".join(parts)
        + "."
    )


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


def review_pareto(
    client, parent_run_id: str, objectives: dict[str, str] | None = None, out=sys.stdout, include_pruned: bool = False
) -> dict:
    """Compute the front of a search from MLflow and write it back (see the module docstring)."""
    import pandas as pd
    from mlflow.entities import Metric

    from coun_tune.tracking.plots import pareto_figure, pareto_page

    parent = client.get_run(parent_run_id)
    objectives = objectives or objectives_of(parent)
    names, modes = list(objectives), list(objectives.values())
    all_rows = [r for r in trial_rows(client, parent, include_pruned) if all(k in r for k in names)]
    if not all_rows:
        raise UsageError(f"search {parent_run_id} has no completed trial with {', '.join(names)}")
    rows, basis = pick_basis(all_rows, names)
    values = np.array([[r[k] for k in names] for r in rows], dtype=float)
    ranks, crowd = rank_front(values, modes)
    knee = pareto.pick_index(rows, objectives, "knee")
    mask = ranks == 0
    held = basis == HOLDOUT
    baselines = ensure_baselines(client, parent)
    base_doc = _parent_json(client, parent_run_id, "base_models.json") or {}
    original = holdout_baselines(base_doc, names).get("original", {}) if held else baselines.get("original", {})
    hv, hv_raw, hv_info = hypervolume_over_original(values[mask], names, modes, original, values)
    hv_info["basis"] = basis
    cal_original = baselines.get("original", {})
    history = hypervolume_history(all_rows, names, modes, cal_original)

    ts = int(time.time() * 1000)
    from coun_tune.tracking.models import model_ids_by_run

    model_ids = model_ids_by_run(client, parent.info.experiment_id)  # the Models tab shows them too
    for i, (r, rank, cd) in enumerate(zip(rows, ranks, crowd)):
        r.update(
            is_pareto=float(rank == 0), pareto_rank=float(rank), crowding_distance=float(cd), is_knee=float(i == knee)
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
    picked = {r["run_id"] for r in rows}
    for r in all_rows:  # off the validated set: on no front a pick is made from
        if r["run_id"] not in picked:
            client.log_batch(r["run_id"], metrics=[Metric(k, 0.0, ts, 0) for k in ("is_pareto", "is_knee")])
            client.set_tag(r["run_id"], "pareto", "false")
            client.set_tag(r["run_id"], describe.RUN_COLOR, describe.COLORS["dominated"])
    knee_run = rows[knee]["run_id"]
    for r in all_rows:  # the knee's run name carries the marker; a former knee's loses it
        named = knee_run_name(r.get("run_name", ""), r["run_id"] == knee_run)
        if named != r.get("run_name", ""):
            client.update_run(r["run_id"], name=named)
            r["run_name"] = named
        client.set_tag(r["run_id"], MIA_UNSTABLE, "true" if mia_unstable(r) else "false")

    from coun_tune.tracking.importance import IMPORTANCE_PREFIX, param_importances

    params = sorted({k for r in rows for k in r if k.startswith("param.") and k[6:] not in PARAM_SKIP})
    spec = _parent_json(client, parent_run_id, "spec.yaml")
    searched = searched_names(spec, params)
    # on every completed trial's calibration values: what the sampler searched on
    importances = param_importances(all_rows, objectives, (spec or {}).get("space") or {}, searched)
    client.log_batch(
        parent_run_id,
        metrics=[
            Metric(f"{IMPORTANCE_PREFIX}/{k}/{p}", v, ts, 0) for k, per in importances.items() for p, v in per.items()
        ],
    )
    if importances:
        client.log_dict(parent_run_id, importances, "param_importances.json")

    prov = describe.provenance()
    for k, v in prov.items():
        client.set_tag(parent_run_id, k, v)
    client.log_batch(
        parent_run_id,
        metrics=[
            Metric("hypervolume", hv, ts, 0),
            Metric("hypervolume_raw", hv_raw, ts, 0),
            Metric("pareto_size", float(mask.sum()), ts, 0),
            # step k: after the k-th completed trial (by end time); the trial's end time as the
            # timestamp, so a second review logs the same points (MLflow keeps them once)
            *[Metric(HV_HISTORY, v, t, k) for k, (t, v) in enumerate(history, start=1)],
        ],
    )
    # what the hypervolume is measured from: the original (doing nothing), in the box below
    client.set_tag(parent_run_id, "hypervolume_reference", json.dumps(hv_info["original"] or hv_info["reference"]))
    client.set_tag(
        parent_run_id, "hypervolume_box", json.dumps({"worst": hv_info["reference"], "ideal": hv_info["ideal"]})
    )

    shown = sorted(np.flatnonzero(mask), key=lambda i: values[i, 0])
    extra = [m for m in ("avg_gap", "test_acc") if m not in names]
    headers = [
        "trial",
        *[f"{k} hold-out" if held else k for k in names],
        *([f"{k} calibration" for k in names] + ["flag"] if held else []),
        *extra,
        *searched,
    ]
    front_rows = [
        [
            describe.trial_label(rows[i]) + (" (knee)" if i == knee else ""),
            *[_pm(rows[i][k], rows[i].get(f"{k}_std")) for k in names],
            *(
                [_pm(rows[i].get(f"calibration_{k}"), rows[i].get(f"calibration_{k}_std")) for k in names]
                + [rows[i].get("holdout_flagged_on", "") if rows[i].get("holdout_flag") else ""]
                if held
                else []
            ),
            *[rows[i].get(m) for m in extra],
            *[describe.short(rows[i].get(f"param.{p}")) for p in searched],
        ]
        for i in shown
    ]
    name = (spec or {}).get("name") or client.get_experiment(parent.info.experiment_id).name
    tracking_uri = client.tracking_uri
    describe_search = (
        lambda spec_shown: describe.search_description(  # noqa: E731
            name=name,
            experiment_id=parent.info.experiment_id,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            scenario={
                k[len("scenario.") :]: v
                for k, v in parent.data.params.items()
                if k.startswith("scenario.") and v not in ("None", "")
            },
            split_hash=parent.data.params.get("split_hash"),
            method=parent.data.tags.get("coun_tune.method", "?"),
            objectives=objectives,
            hv=hv_info,
            front=[rows[i] for i in shown],
            baselines={
                k: {**v, "run_id": baselines.get(k, {}).get("run_id")}
                for k, v in (holdout_baselines(base_doc, names) if held else baselines).items()
            },
            param_names=searched,
            n_trials=len(all_rows),
            importances=importances,
            n_validated=len(rows) if held else None,
            spec=spec_shown,
            prov=prov,
        )
    )
    warning = knee_warning(rows[knee], original)
    block = pick_lines(rows, shown, names, knee, basis, n_cal=len(json.loads(parent.data.tags.get(CAL_TAG, "[0]"))))
    block += [f"**Warning**: {warning}", ""] if warning else []
    unstable_note = mia_note(all_rows)
    block += [unstable_note, ""] if unstable_note else []

    def with_block(text: str) -> str:  # after the heading: what the pick rests on comes first
        head, _, rest = text.partition("\n")
        return "\n".join([head, "", *block]) + rest

    note = with_block(describe_search(spec))
    if len(note) > MAX_NOTE:  # MLflow caps a run tag at 8000 characters; spec.yaml is an artifact anyway
        note = with_block(describe_search(None))
    if len(note) > MAX_NOTE:
        note = note[: MAX_NOTE - 80] + "\n\n(cut here: the whole front is in trials.json)\n"
    client.set_tag(parent_run_id, describe.NOTE, note)
    client.set_experiment_tag(parent.info.experiment_id, describe.NOTE, note)
    client.set_experiment_tag(parent.info.experiment_id, describe.EXPERIMENT_KIND, "custom_model_development")
    client.set_experiment_tag(
        parent.info.experiment_id,
        describe.SHARED_VIEW + describe.share_key(parent_run_id),
        json.dumps(describe.view_state(parent_run_id, objectives, searched)),
    )

    table_cols = [  # what a reviewer reads first: the trial, its objectives, its place on the front
        "trial",
        *names,
        "is_knee",
        "is_pareto",
        "pareto_rank",
        *[
            m
            for m in (
                "retain_acc",
                "forget_acc",
                "test_acc",
                "mia_efficacy",
                "forget_gap",
                "avg_gap",
                "wall_seconds",
                "flops",
            )
            if m not in names
        ],
        *[p[6:] for p in params],
        "crowding_distance",  # NSGA-II's tie-breaker within a rank: bookkeeping, last
        "run_id",
    ]
    trials = pd.DataFrame(
        [
            {c: (describe.trial_label(r) if c == "trial" else r.get(c, r.get(f"param.{c}"))) for c in table_cols}
            for r in rows
        ]
    )
    with tempfile.TemporaryDirectory() as d:
        # log_table's own format and tag (the UI shows the file as a table), written whole:
        # log_table itself appends to an existing table, and a review may run again
        trials.to_json(Path(d) / "trials.json", orient="split", index=False)
        logged = json.loads(client.get_run(parent_run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        if {"path": "trials.json", "type": "table"} not in logged:
            client.set_tag(
                parent_run_id, LOGGED_ARTIFACTS, json.dumps([*logged, {"path": "trials.json", "type": "table"}])
            )
        as_text = {c: str for c in ["trial", "run_id", *[p[6:] for p in params]]}
        trials.astype(as_text).to_parquet(Path(d) / "trials.parquet")
        title = (
            f"{name}: Pareto front of {len(rows)} trials (labels: trial numbers), hypervolume {hv:.3f}"
            if not held
            else f"{name}: front on hold-out means ({len(rows)} configs; hollow: calibration), HV {hv:.3f}"
        )
        svg = pareto_figure(
            rows,
            names,
            modes,
            mask,
            holdout_baselines(base_doc, names) if held else baselines,
            Path(d) / "pareto.png",
            title,
            knee=knee,
            noise=base_doc.get("oracle_noise") or {},
        )
        (Path(d) / "pareto.html").write_text(
            pareto_page(
                svg, headers, front_rows, title, f"hypervolume {hv:.4f} {describe.hypervolume_sentence(hv_info, basis)}"
            )
        )
        for f in ("trials.json", "trials.parquet", "pareto.png", "pareto.html"):
            client.log_artifact(parent_run_id, str(Path(d) / f))

    print(
        "\nPareto front ("
        + ", ".join(f"{k}: {v}" for k, v in objectives.items())
        + f") on the {basis} values; hypervolume {hv:.4f} {describe.hypervolume_sentence(hv_info, basis, box=False)}:",
        file=out,
    )
    print(table(headers, front_rows), file=out)
    if held:
        print(
            f"{int(mask.sum())} of the {len(rows)} configs re-run on hold-out forget sets on the front "
            f"({len(all_rows)} completed trials); {basis_note(basis, rows)}",
            file=out,
        )
    else:
        print(f"{int(mask.sum())} of {len(rows)} completed trials on the front", file=out)
    if warning:
        print(f"warning: {warning}", file=out)
    unstable = [describe.trial_label(r) for r in all_rows if mia_unstable(r)]
    if unstable:
        print(
            f"MIA unstable on trial{'s' if len(unstable) > 1 else ''} {', '.join(unstable)} (resample spread above "
            f"{MIA_UNSTABLE_SPREAD:g} points: their mia_gap/avg_gap measure the attack; tag {MIA_UNSTABLE}=true)",
            file=out,
        )
    print_review_link(tracking_uri, parent.info.experiment_id, parent_run_id, out)
    return {
        "rows": rows,
        "basis": basis,
        "knee": knee,
        "mask": mask.tolist(),
        "hypervolume": hv,
        "hypervolume_raw": hv_raw,
        "objectives": objectives,
        "baselines": baselines,
    }


CAL_TAG = "coun_tune.calibration_seeds"
HV_HISTORY = "hypervolume_history"


def hypervolume_over_original(
    front: np.ndarray, names: list[str], modes: list[str], original: dict, box_values: np.ndarray | None = None
) -> tuple[float, float, dict]:
    """(normalised, raw, info) hypervolume of a front (raw metric values, (n, m)) as the
    improvement over the untouched original (pareto.normalised_hypervolume_gain: the region
    the front dominates and doing nothing does not, as a share of what doing nothing leaves to
    gain in the box from the ideal point to the percent scale's worst end; a metric with no
    percent scale is bounded by `box_values`, default the front). Without the original's values
    (an older search): the plain share of the box, `info["original"]` None."""
    front = np.asarray(front, dtype=float).reshape(-1, len(names))
    box = front if box_values is None else np.asarray(box_values, dtype=float).reshape(-1, len(names))
    ref = pareto.reference_point(names, modes, box)
    ideal = pareto.ideal_point(names, modes, box)
    front_min = pareto.to_minimisation(front, modes)
    sign = np.array([1.0 if m == "min" else -1.0 for m in modes])  # back from the minimised space
    has_original = all(isinstance(original.get(k), (int, float)) for k in names)
    if has_original:
        base = pareto.to_minimisation(np.array([[original[k] for k in names]], dtype=float), modes)[0]
        raw = pareto.hypervolume_gain(front_min, base, ref)
        hv = pareto.normalised_hypervolume_gain(front_min, base, ref, ideal)
    else:
        raw = pareto.hypervolume(front_min, ref)
        hv = pareto.normalised_hypervolume(front_min, ref, ideal)
    info = {
        "normalised": hv,
        "raw": raw,
        "original": {k: float(original[k]) for k in names} if has_original else None,
        "reference": {k: float(v) + 0.0 for k, v in zip(names, (ref * sign).tolist())},
        "ideal": {k: float(v) + 0.0 for k, v in zip(names, (ideal * sign).tolist())},
    }
    return hv, raw, info


def hypervolume_history(
    rows: list[dict], names: list[str], modes: list[str], original: dict
) -> list[tuple[int, float]]:
    """[(end time ms, normalised hypervolume over the original)] after each completed trial, in
    order of completion: the front of the first k trials' (calibration) values, k = 1..n."""
    done = sorted(rows, key=lambda r: (r.get("end_time") or 0, int(r.get("trial_number") or 0)))
    every = np.array([[r[n] for n in names] for r in done], dtype=float)  # one box for every step
    out = []
    for k in range(1, len(done) + 1):
        v = np.array([[r[n] for n in names] for r in done[:k]], dtype=float)
        front = v[pareto.non_dominated_mask(v, modes)]
        out.append(
            (int(done[k - 1].get("end_time") or 0), hypervolume_over_original(front, names, modes, original, every)[0])
        )
    return out


def knee_warning(knee_row: dict, original: dict) -> str | None:
    """A line when the knee is further from the oracle than doing nothing (its avg_gap or
    test_gap above the untouched original's, on the same forget sets), else None."""
    worse = [
        f"{k} {knee_row[k]:.2f} vs the original's {original[k]:.2f}"
        for k in ("avg_gap", "test_gap")
        if isinstance(knee_row.get(k), (int, float)) and isinstance(original.get(k), (int, float))
        if knee_row[k] > original[k]
    ]
    if not worse:
        return None
    return f"the knee is further from the oracle than the untouched original ({'; '.join(worse)})"


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


def print_review_link(tracking_uri: str, experiment_id: str, parent_run_id: str, out=sys.stdout) -> None:
    cmd = describe.ui_command(tracking_uri)
    print("\nreview in MLflow" + (f" (serve it first: {cmd})" if cmd else "") + ":", file=out)
    print(f"  {describe.runs_link(tracking_uri, experiment_id, parent_run_id)}", file=out)


def searched_names(spec: dict | None, params: list[str]) -> list[str]:
    """The hyperparameters the search varied (the spec's space entries that are domains), in
    the spec's order; without a spec, every logged hyperparameter."""
    space = (spec or {}).get("space") or {}
    varied = [k for k, v in space.items() if isinstance(v, dict) and f"param.{k}" in params]
    return varied or [p[6:] for p in params if not p.startswith(("param.scenario.", "param.split_hash"))]


# --- export ---------------------------------------------------------------------------------


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
    stream=sys.stdout,
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
