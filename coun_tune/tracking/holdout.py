"""The hold-out check of a search's front, from MLflow: which configs, what to log, what to show.

A real deletion request has no oracle, so a config is tuned on proxy forget sets (the
calibration splits). The front those trials make is re-run on hold-out splits no trial was
scored on (search.holdout runs them as Ray tasks), and from then on every pick (the front,
the knee, export) is made on the hold-out means (review.pick_basis).

On each validated trial run: `holdout_<metric>_mean` / `holdout_<metric>_std` (sample std)
for the objectives and the headline metrics, `holdout_flag` (1 when an objective's hold-out
mean lies outside its calibration mean +- calibration.holdout_band) and the tag
`holdout_flagged_on`. On the parent: `holdout.parquet` (one row per run, plus the original's
rows: the do-nothing reference), `holdout.json` (a table the MLflow UI shows), the original's
`holdout_original_<metric>_mean`, and the tag `coun_tune.holdout_done`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from coun_tune import pareto
from coun_tune.calibration import NOISE_OF, holdout_flag, sample_std
from coun_tune.errors import UsageError
from coun_tune.report import STDOUT
from coun_tune.tracking.review import LOGGED_ARTIFACTS, objectives_of, trial_rows

SHOWN = ("forget_gap", "retain_acc", "test_acc", "avg_gap")  # logged beside the objectives
HOLDOUT_DONE = "coun_tune.holdout_done"


def calibration_front(client, parent) -> list[dict]:
    """The completed trials on the front of their calibration values (the objectives' means
    over the calibration splits): the configs the hold-out check re-runs."""
    objectives = objectives_of(parent)
    names = list(objectives)
    rows = [r for r in trial_rows(client, parent) if all(k in r for k in names)]
    if not rows:
        raise UsageError(f"search {parent.info.run_id} has no completed trial to re-run on held-out forget sets")
    values = np.array([[r[k] for k in names] for r in rows], dtype=float)
    return [rows[i] for i in np.flatnonzero(pareto.non_dominated_mask(values, list(objectives.values())))]


def front_configs(client, front: list[dict]) -> dict[str, dict]:
    """{trial run id: its `coun-tune unlearn --config` document (model/config.yaml)}."""
    out = {}
    for row in front:
        with tempfile.TemporaryDirectory() as d:
            try:
                path = Path(client.download_artifacts(row["run_id"], "model/config.yaml", d))
            except Exception:
                raise UsageError(f"trial run {row['run_id']} has no model/config.yaml artifact") from None
            out[row["run_id"]] = yaml.safe_load(path.read_text())
    return out


def summarise(
    front: list[dict],
    records: list[dict],
    objectives: dict[str, str],
    n_cal: int,
    noise: dict[str, float],
) -> dict[str, dict[str, float]]:
    """{run id: holdout_<m>_mean / _std for m in the objectives and SHOWN, holdout_n and
    holdout_flag}. `noise`: the oracle-noise gaps (oracle_noise_<gap>; {} when not measured)."""
    out = {}
    for row in front:
        mine = [r for r in records if r["key"] == row["run_id"]]
        if not mine:
            continue
        m: dict[str, float] = {"holdout_n": float(len(mine))}
        for k in dict.fromkeys([*objectives, *SHOWN]):
            held = [r[k] for r in mine if k in r]
            if len(held) == len(mine):
                m[f"holdout_{k}_mean"] = float(np.mean(held))
                m[f"holdout_{k}_std"] = sample_std(held)
        flagged = [
            k
            for k in objectives
            if holdout_flag(
                float(row[k]),
                float(row.get(f"{k}_std", float("nan"))),
                n_cal,
                [r[k] for r in mine],
                noise.get(f"oracle_noise_{NOISE_OF.get(k, k)}", 0.0),
            )
        ]
        m["holdout_flag"] = float(bool(flagged))
        m["_flagged_on"] = ",".join(flagged)  # a tag, not a metric
        out[row["run_id"]] = m
    return out


def log_holdout(
    client,
    parent_run_id: str,
    front: list[dict],
    records: list[dict],
    split_seeds: list[int],
    reference: dict[int, dict],
    noise: dict[str, float],
    out=STDOUT,
) -> dict[str, dict[str, float]]:
    """Write the check's results to MLflow (see the module docstring) and print the table of
    calibration beside hold-out. `reference`: {split seed: the original's metrics with gaps to
    that split's oracle}. Returns summarise()'s dict."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.entities import Metric

    from coun_tune.report import plus_minus as _pm
    from coun_tune.report import table
    from coun_tune.tracking.describe import trial_label

    parent = client.get_run(parent_run_id)
    objectives = objectives_of(parent)
    n_cal = len(json.loads(parent.data.tags.get("coun_tune.calibration_seeds", "[0]")))
    summary = summarise(front, records, objectives, n_cal, noise)
    ts = int(pd.Timestamp.now().timestamp() * 1000)
    for run_id, m in summary.items():
        client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in m.items() if not k.startswith("_")])
        client.set_tag(run_id, "holdout_flagged_on", m["_flagged_on"] or "none")
    ref_rows = [{"key": "original", "split_seed": s, **reference[s]} for s in split_seeds if s in reference]
    original = {}
    for k in dict.fromkeys([*objectives, *SHOWN]):
        vals = [r[k] for r in ref_rows if k in r]
        if vals and len(vals) == len(ref_rows):
            original[f"holdout_original_{k}_mean"] = float(np.mean(vals))
    if original:
        client.log_batch(parent_run_id, metrics=[Metric(k, v, ts, 0) for k, v in original.items()])
    labels = {row["run_id"]: trial_label(row) for row in front}
    rows = [{"trial": labels.get(r["key"], r["key"]), **r} for r in [*records, *ref_rows]]
    lines, shown = [], []
    for row in front:
        m = summary.get(row["run_id"])
        if m is None:
            continue
        line = {"trial": labels[row["run_id"]], "run_id": row["run_id"]}
        for k in objectives:
            line[f"{k} calibration"] = _pm(row[k], row.get(f"{k}_std"))
            line[f"{k} hold-out"] = _pm(m.get(f"holdout_{k}_mean"), m.get(f"holdout_{k}_std"))
        line["flag"] = f"outside band: {m['_flagged_on']}" if m["_flagged_on"] else ""
        line = {k: ("" if v is None else v) for k, v in line.items()}
        lines.append(line)
        shown.append([v for k, v in line.items() if k != "run_id"])
    if original:
        orig_line = ["original (do nothing)"]
        for k in objectives:
            orig_line += ["", f"{original.get(f'holdout_original_{k}_mean', float('nan')):.2f}"]
        shown.append([*orig_line, ""])
    with tempfile.TemporaryDirectory() as d:
        cols = sorted({k for r in rows for k in r})
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), Path(d) / "holdout.parquet")
        pd.DataFrame(lines).to_json(Path(d) / "holdout.json", orient="split", index=False)
        logged = json.loads(client.get_run(parent_run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        if {"path": "holdout.json", "type": "table"} not in logged:
            client.set_tag(
                parent_run_id, LOGGED_ARTIFACTS, json.dumps([*logged, {"path": "holdout.json", "type": "table"}])
            )
        for f in ("holdout.parquet", "holdout.json"):
            client.log_artifact(parent_run_id, str(Path(d) / f))
    client.set_tag(parent_run_id, HOLDOUT_DONE, json.dumps(list(split_seeds)))
    headers = ["trial"] + [h for k in objectives for h in (f"{k} calibration", f"{k} hold-out")] + ["flag"]
    print(
        f"\nhold-out check: the calibration front ({len(lines)} configs, means over {n_cal} calibration "
        f"split{'s' if n_cal != 1 else ''}) re-run on {len(split_seeds)} forget sets no trial saw "
        f"(split seeds {', '.join(map(str, split_seeds))}), each against its own oracle (mean +- sample std):",
        file=out,
    )
    print(table(headers, shown), file=out)
    n_flag = sum(1 for m in summary.values() if m["_flagged_on"])
    if n_flag:
        print(
            f"{n_flag} config(s) flagged: their hold-out mean lies outside calibration mean +- 2 standard errors "
            "+ the oracle noise floor (the search's value for them did not generalise)",
            file=out,
        )
    return summary


def validate_front(
    client,
    parent_run_id: str,
    split_seeds: list[int],
    run: Callable[[dict[str, dict], set, Callable[[dict], None], dict[str, str]], None],
    reference: dict[int, dict],
    noise: dict[str, float],
    records: list[dict] | None = None,
    save: Callable[[list[dict]], None] | None = None,
    out=STDOUT,
) -> dict[str, dict[str, float]]:
    """The hold-out check of a search: its calibration front re-run on `split_seeds` by
    `run(configs, done, on_record, labels)` (search.holdout.run_configs bound to a Ray cluster;
    labels: {run id: trial label} for its progress lines), then
    logged. `records`: runs finished before an interruption (not repeated); `save(records)` is
    called after each new one, so a Ctrl-C loses at most the runs in flight."""
    parent = client.get_run(parent_run_id)
    front = calibration_front(client, parent)
    configs = front_configs(client, front)
    records = [r for r in (records or []) if r["key"] in configs and r["split_seed"] in split_seeds]
    done = {(r["key"], r["split_seed"]) for r in records}

    def on_record(rec: dict) -> None:
        records.append(rec)
        if save is not None:
            save(records)

    from coun_tune.tracking.describe import trial_label

    run(configs, done, on_record, {row["run_id"]: f"trial {trial_label(row)}" for row in front})
    return log_holdout(client, parent_run_id, front, records, split_seeds, reference, noise, out)
