"""Does a tuned config transfer? Re-run each Pareto config of a search on held-out forget
sets (other split seeds, the same original), each measured against its own oracle, and report
the spread next to the calibration value (METHOD.md section 7).

A real deletion request has no oracle, so the config a user exports was tuned on a proxy
forget set. If a config's forget_gap on held-out forget sets is far from its calibration
value, the search fitted the proxy, not the method.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from coun_tune import pareto
from coun_tune.report import table
from coun_tune.tracking.review import objectives_of, trial_rows


def transfer_check(
    client,
    parent_run_id: str,
    split_seeds: list[int],
    cache_dir: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    out=sys.stdout,
) -> list[dict]:
    """Returns one record per (Pareto trial, split seed) with the run's final metrics; logs
    `transfer.parquet` on the parent run and `transfer_<objective>_mean/_std` on each trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.metrics import METRICS
    from coun_tune.core.pipeline import prepare, unlearn

    parent = client.get_run(parent_run_id)
    objectives = objectives_of(parent)
    names = list(objectives)
    rows = [r for r in trial_rows(client, parent) if all(k in r for k in names)]
    if not rows:
        from coun_tune.errors import UsageError

        raise UsageError(f"search {parent_run_id} has no completed trial to re-run on held-out forget sets")
    values = np.array([[r[k] for k in names] for r in rows], dtype=float)
    front = [rows[i] for i in np.flatnonzero(pareto.non_dominated_mask(values, list(objectives.values())))]
    records, datasets = [], {}
    for row in front:
        with tempfile.TemporaryDirectory() as d:
            cfg = build_unlearn_config(
                yaml.safe_load(Path(client.download_artifacts(row["run_id"], "model/config.yaml", d)).read_text()), {}
            )
        key = (cfg.scenario.dataset, cfg.scenario.data_root)
        if key not in datasets:
            datasets[key] = load_dataset(*key)
        for s in split_seeds:
            log(f"trial {row['trial_id']}: held-out forget set, split seed {s}")
            prep = prepare(replace(cfg.scenario, split_seed=s), cache_dir, device, log=log, data=datasets[key])
            _, m = unlearn(prep, cfg.method, cfg.hparams, batch_size=cfg.batch_size, seed=cfg.seed)
            records.append(
                {
                    "run_id": row["run_id"],
                    "trial_id": row["trial_id"],
                    "split_seed": s,
                    **{k: float(m[k]) for k in METRICS if k in m},
                }
            )
    summary = []
    for row in front:
        mine = [r for r in records if r["run_id"] == row["run_id"]]
        line = [row["trial_id"]]
        for k in names:
            held = np.array([r[k] for r in mine])
            client.log_metric(row["run_id"], f"transfer_{k}_mean", float(held.mean()))
            client.log_metric(row["run_id"], f"transfer_{k}_std", float(held.std()))
            line += [row[k], f"{held.mean():.2f} +- {held.std():.2f}"]
        summary.append(line)
    with tempfile.TemporaryDirectory() as d:
        cols = sorted({k for r in records for k in r})
        pq.write_table(pa.table({c: [r.get(c) for r in records] for c in cols}), Path(d) / "transfer.parquet")
        client.log_artifact(parent_run_id, str(Path(d) / "transfer.parquet"))
    headers = ["trial"] + [h for k in names for h in (f"{k} (calibration)", f"{k} (held-out, n={len(split_seeds)})")]
    print(
        f"\nPareto configs on held-out forget sets (split seeds {', '.join(map(str, split_seeds))}), "
        "each against its own oracle:",
        file=out,
    )
    print(table(headers, summary), file=out)
    return records
