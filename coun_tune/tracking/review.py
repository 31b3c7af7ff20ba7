"""Pareto review and config export, from MLflow alone (so they work after the search, on
another machine, and on `coun-tune pareto` / `coun-tune export`).

review_pareto: non-dominated set of the completed trials' final metrics; tags every child
`pareto=true|false`; logs on the parent run a Pareto plot (PNG), the trials table (Parquet)
and the hypervolume.
export_config: picks one front config (knee, best:METRIC, or a constraint) and writes the YAML
`coun-tune unlearn --config` takes.
"""

from __future__ import annotations

import html
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from coun_tune import pareto
from coun_tune.errors import UsageError
from coun_tune.report import table
from coun_tune.tracking.mlflow_store import TRIAL_ID, child_runs

PARAM_SKIP = {"method"}


def objectives_of(parent) -> dict[str, str]:
    raw = parent.data.tags.get("coun_tune.objectives")
    return json.loads(raw) if raw else {"forget_gap": "min", "retain_acc": "max"}


def trial_rows(client, parent, include_pruned: bool = False) -> list[dict]:
    """One dict per completed child run: run_id, trial_id, params (the config) and final metrics.
    Trials the early-stopping scheduler pruned (KILLED, `pruned_at_epoch`) hold truncated
    metrics: left out unless include_pruned."""
    rows = []
    for run in child_runs(client, parent):
        pruned = run.info.status == "KILLED" and "pruned_at_epoch" in run.data.metrics
        if run.info.status != "FINISHED" and not (include_pruned and pruned):
            continue
        rows.append({"run_id": run.info.run_id, "trial_id": run.data.tags.get(TRIAL_ID, ""),
                     **{f"param.{k}": v for k, v in run.data.params.items()}, **run.data.metrics})
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _plot(rows: list[dict], names: list[str], mask: np.ndarray, path: Path) -> str:
    """Writes the PNG to `path` and returns the same figure as SVG text (for the HTML page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r[names[0]] for r in rows])
    y = np.array([r[names[1]] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    ax.scatter(x[~mask], y[~mask], c="0.6", label="dominated")
    order = np.argsort(x[mask])
    ax.plot(x[mask][order], y[mask][order], "o-", c="C3", label="Pareto front")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title("coun-tune search: Pareto front")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    return svg.getvalue()


def _html(svg: str, headers: list[str], rows: list[list], title: str) -> str:
    """A self-contained page (no scripts, no network): the plot and the front's table."""
    cell = lambda v: html.escape(str(v) if not isinstance(v, float) else f"{v:.4g}")  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head>"
            f"<body><h2>{html.escape(title)}</h2>{svg[svg.find('<svg'):]}<table><tr>{head}</tr>{body}</table></body></html>")


def review_pareto(client, parent_run_id: str, objectives: dict[str, str] | None = None, out=sys.stdout,
                  include_pruned: bool = False) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parent = client.get_run(parent_run_id)
    objectives = objectives or objectives_of(parent)
    names, modes = list(objectives), list(objectives.values())
    rows = [r for r in trial_rows(client, parent, include_pruned) if all(k in r for k in names)]
    if not rows:
        raise UsageError(f"search {parent_run_id} has no completed trial with {', '.join(names)}")
    values = np.array([[r[k] for k in names] for r in rows], dtype=float)
    mask = pareto.non_dominated_mask(values, modes)
    ref = pareto.reference_point(names, modes, values)
    hv = pareto.hypervolume(pareto.to_minimisation(values[mask], modes), ref)
    for r, on_front in zip(rows, mask):
        r["pareto"] = bool(on_front)
        client.set_tag(r["run_id"], "pareto", "true" if on_front else "false")
    client.log_metric(parent_run_id, "hypervolume", hv)
    client.log_metric(parent_run_id, "pareto_size", int(mask.sum()))
    client.set_tag(parent_run_id, "hypervolume_reference", json.dumps(dict(zip(names, ref.tolist()))))
    params = sorted({k for r in rows for k in r if k.startswith("param.") and k[6:] not in PARAM_SKIP})
    shown = sorted(np.flatnonzero(mask), key=lambda i: values[i, 0])
    extra = [m for m in ("avg_gap", "test_acc") if m not in names]
    headers = ["trial", *names, *extra, *[p[6:] for p in params]]
    front_rows = [[rows[i]["trial_id"], *[rows[i][k] for k in names], *[rows[i].get(m) for m in extra],
                   *[_short(rows[i].get(p)) for p in params]] for i in shown]
    with tempfile.TemporaryDirectory() as d:
        cols = sorted({k for r in rows for k in r})
        pq.write_table(pa.table({c: [None if r.get(c) is None else str(r[c]) if c.startswith("param.") or c in ("run_id", "trial_id")
                                     else r.get(c) for r in rows] for c in cols}), Path(d) / "trials.parquet")
        svg = _plot(rows, names, mask, Path(d) / "pareto.png")
        (Path(d) / "pareto.html").write_text(_html(svg, headers, front_rows, f"Pareto front, hypervolume {hv:.2f}"))
        for f in ("trials.parquet", "pareto.png", "pareto.html"):
            client.log_artifact(parent_run_id, str(Path(d) / f))
    print("\nPareto front (" + ", ".join(f"{k}: {v}" for k, v in objectives.items()) + f"), hypervolume {hv:.2f}:", file=out)
    print(table(headers, front_rows), file=out)
    print(f"{int(mask.sum())} of {len(rows)} completed trials on the front", file=out)
    return {"rows": rows, "mask": mask.tolist(), "hypervolume": hv, "objectives": objectives}


def _short(v):
    try:
        f = float(v)
        return f"{f:.4g}"
    except (TypeError, ValueError):
        return v


def export_config(client, parent_run_id: str, pick: str, output: str | Path, include_pruned: bool = False) -> Path:
    """Write the picked trial's unlearn config (its `model/config.yaml` artifact) to `output`,
    with a header naming the search, the trial and its metrics."""
    parent = client.get_run(parent_run_id)
    objectives = objectives_of(parent)
    rows = [r for r in trial_rows(client, parent, include_pruned) if all(k in r for k in objectives)]
    if not rows:
        raise UsageError(f"search {parent_run_id} has no completed trial to export")
    row = rows[pareto.pick_index(rows, objectives, pick)]
    with tempfile.TemporaryDirectory() as d:
        try:
            local = client.download_artifacts(row["run_id"], "model/config.yaml", d)
        except Exception:
            raise UsageError(f"trial run {row['run_id']} has no model/config.yaml artifact") from None
        cfg = yaml.safe_load(Path(local).read_text())
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: round(float(row[k]), 4) for k in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy",
                                                    "forget_gap", "avg_gap") if k in row}
    header = (f"# exported by coun-tune from search run {parent_run_id}, trial {row['trial_id']} "
              f"(MLflow run {row['run_id']}), pick {pick!r}\n# trial metrics: {json.dumps(metrics)}\n")
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return out
