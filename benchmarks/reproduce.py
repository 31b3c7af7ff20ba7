"""The paper's comparison under equal search budgets (issue 9, METHOD.md sections 3, 6, 7).

For each method (ft, coun, neggrad_plus, l1_sparse, salun, scrub, not, rl, and neggrad_plus /
l1_sparse / salun / not with the CL plug-in):
  1. an equal-budget search: the same scenario, sampler, number of trials, seed and epoch range;
     each method's own hyperparameters over its declared ranges (config/method_spaces.py);
  2. the search's knee config (`coun-tune export --pick knee`), re-run on held-out forget sets
     (other split seeds, the same original), each measured against its own oracle.
The table gives RA / UA / TA / MIA / Avg. Gap as mean +- std over the held-out seeds (the
paper's form), each front's hypervolume (all fronts against one shared reference point, so
they compare), the oracle's own seed-to-seed noise and the original's gaps.

    python benchmarks/reproduce.py                                  # digits_half, 8 trials
    python benchmarks/reproduce.py --spec search_spaces/fashion_mnist_coun.yaml --trials 16 --out docs/results_fmnist.md

Searches run through the real CLI (`coun-tune search`, local Ray, MLflow), so what is compared
is exactly what a user would get. Everything goes under --workdir (MLflow store, Tune dirs, base
models), so a rerun reuses the base models and splits but starts new searches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

VARIANTS = [
    ("ft", False),
    ("coun", False),
    ("neggrad_plus", False),
    ("neggrad_plus", True),
    ("l1_sparse", False),
    ("l1_sparse", True),
    ("salun", False),
    ("salun", True),
    ("scrub", False),
    ("not", False),
    ("not", True),
    ("rl", False),
]
COLUMNS = [
    ("RA", "retain_acc"),
    ("UA", "unlearn_acc"),
    ("TA", "test_acc"),
    ("MIA", "mia_efficacy"),
    ("Avg. Gap", "avg_gap"),
]
GAPS = ["retain_gap", "forget_gap", "test_gap", "mia_gap", "avg_gap"]


def variant_name(method: str, cl: bool) -> str:
    return method + ("+CL" if cl else "")


def variant_spec(base: dict, method: str, cl: bool, trials: int, epochs: tuple[int, int], workdir: Path) -> dict:
    """The base spec's scenario, sampler and seed with this method's declared search space; the
    epoch range and the trial count are the same for every method (the equal budget)."""
    from coun_tune.config.method_spaces import method_spec

    generated = method_spec(method, base["scenario"]["dataset"], cl=cl)
    space = dict(generated["space"])
    space["epochs"] = {"int": [int(epochs[0]), int(epochs[1])]}
    slug = variant_name(method, cl).replace("+CL", "_cl")
    return {
        "name": f"repro_{base['name']}_{slug}",
        "scenario": base["scenario"],
        "method": method,
        "objectives": base["objectives"],
        "space": space,
        "sampler": base.get("sampler", "nsga2"),
        "num_samples": trials,
        "max_concurrent_trials": base.get("max_concurrent_trials", 2),
        "resources_per_trial": base.get("resources_per_trial", {"cpu": 1, "gpu": 0}),
        "seed": base.get("seed", 0),
        "storage_path": str(workdir / "tune"),
        "cache_dir": str(workdir / "cache"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    }


def coun_tune(*args: str) -> None:
    cmd = [sys.executable, "-m", "coun_tune", *args]
    print("$ coun-tune " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise SystemExit(f"coun-tune {args[0]} failed with exit code {proc.returncode}")


def front_rows(tracking_uri: str, name: str, objectives: dict[str, str]) -> tuple[list[dict], np.ndarray]:
    """The completed trials of the latest search `name` and the mask of its Pareto front."""
    from coun_tune import pareto
    from coun_tune.tracking.mlflow_store import client_for, find_parent_run
    from coun_tune.tracking.review import trial_rows

    client = client_for(tracking_uri)
    rows = [r for r in trial_rows(client, find_parent_run(client, name)) if all(k in r for k in objectives)]
    values = np.array([[r[k] for k in objectives] for r in rows], dtype=float)
    return rows, pareto.non_dominated_mask(values, list(objectives.values()))


def held_out(config_path: Path, seeds: list[int], cache_dir: Path, datasets: dict) -> list[dict]:
    """The exported config re-run on each held-out forget set, against that split's own oracle."""
    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.pipeline import prepare, unlearn

    cfg = build_unlearn_config(yaml.safe_load(config_path.read_text()), {})
    key = (cfg.scenario.dataset, cfg.scenario.data_root)
    if key not in datasets:
        datasets[key] = load_dataset(*key)
    out = []
    for s in seeds:
        prep = prepare(replace(cfg.scenario, split_seed=s), cache_dir, "cpu", log=lambda _: None, data=datasets[key])
        _, m = unlearn(prep, cfg.method, cfg.hparams, batch_size=cfg.batch_size, seed=cfg.seed)
        out.append(
            {
                "split_seed": s,
                **{k: float(v) for k, v in m.items() if isinstance(v, (int, float))},
                "oracle": prep.base.oracle_metrics,
                "original": prep.base.original_metrics,
            }
        )
    return out


def reference_rows(base: dict, seeds: list[int], cache_dir: Path, datasets: dict, oracle_seeds: int) -> dict:
    """The oracle (its metrics), the original (its gaps to the oracle) and the oracle's noise
    floor (gaps between oracles retrained with other seeds), each over the held-out splits."""
    from coun_tune.config.unlearn_config import validate_scenario
    from coun_tune.core.base_models import oracle_seed_spread
    from coun_tune.core.metrics import gaps
    from coun_tune.core.pipeline import prepare

    scenario = validate_scenario(base["scenario"])
    key = (scenario.dataset, scenario.data_root)
    rows: dict[str, list[dict]] = {"oracle": [], "original": [], "noise": []}
    for s in seeds:
        prep = prepare(replace(scenario, split_seed=s), cache_dir, "cpu", log=lambda _: None, data=datasets[key])
        rows["oracle"].append(dict(prep.base.oracle_metrics, avg_gap=0.0))
        rows["original"].append(
            {**prep.base.original_metrics, **gaps(prep.base.original_metrics, prep.base.oracle_metrics)}
        )
        noise = oracle_seed_spread(
            prep.data,
            prep.split,
            prep.scenario,
            prep.scen_data,
            cache_dir,
            prep.base.oracle_metrics,
            oracle_seeds,
            log=lambda _: None,
        )
        rows["noise"].append({g: noise[f"oracle_noise_{g}"] for g in GAPS})
    return rows


def mean_std(records: list[dict], key: str) -> str:
    v = np.array([r[key] for r in records if key in r], dtype=float)
    return f"{v.mean():.2f} +- {v.std():.2f}" if len(v) else "-"


def render(base: dict, args, results: dict, refs: dict, hv: dict, wall: float) -> str:
    seeds = ", ".join(map(str, args.held_out_seeds))
    lines = [
        f"# Equal-budget comparison on `{base['name']}`",
        "",
        f"Produced by `python benchmarks/reproduce.py --spec {args.spec} --trials {args.trials} "
        f"--epochs {args.epochs} --held-out-seeds {','.join(map(str, args.held_out_seeds))}` "
        f"({time.strftime('%Y-%m-%d')}, {wall / 60:.0f} min on {os.cpu_count()} CPU cores).",
        "",
        f"Scenario: {json.dumps(base['scenario'])}. Each method: {args.trials} trials of "
        f"`{base.get('sampler', 'nsga2')}` (search seed {base.get('seed', 0)}), epochs in [{args.epochs}], objectives "
        f"{json.dumps(base['objectives'])}; its knee config re-run on held-out forget sets (split seeds {seeds}), "
        "each against its own oracle. Cells: mean +- std over those seeds, in percent. UA = 100 - forget accuracy. "
        "Metrics are the last epoch's (the paper likely reports the best epoch chosen against the oracle). "
        "HV: the front's hypervolume on the calibration split, normalised, all fronts against one reference point.",
        "",
        "| method | RA | UA | TA | MIA | Avg. Gap | forget_gap | HV (front) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.append("| Retrain (oracle) | " + " | ".join(mean_std(refs["oracle"], k) for _, k in COLUMNS) + " | 0 | - |")
    lines.append(
        "| Original (no unlearning) | "
        + " | ".join(mean_std(refs["original"], k) for _, k in COLUMNS)
        + f" | {mean_std(refs['original'], 'forget_gap')} | - |"
    )
    for name, recs in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(mean_std(recs, k) for _, k in COLUMNS)
            + f" | {mean_std(recs, 'forget_gap')} | {hv[name]:.3f} |"
        )
    lines += [
        "",
        f"Oracle noise floor (gaps of oracles retrained with {args.oracle_seeds - 1} other seed(s) to the "
        "scenario's oracle, per held-out split): " + ", ".join(f"{g} {mean_std(refs['noise'], g)}" for g in GAPS),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="search_spaces/digits_half.yaml", help="base spec: scenario, objectives, sampler")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", default="2,5", help="the epoch range every method searches")
    ap.add_argument("--held-out-seeds", default="1,2,3")
    ap.add_argument("--oracle-seeds", type=int, default=3, help="oracles (incl. the scenario's) for the noise row")
    ap.add_argument("--methods", default="", help="comma-separated subset, e.g. ft,coun,not+CL")
    ap.add_argument("--workdir", default="reproduce_work")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args(argv)
    args.held_out_seeds = [int(s) for s in args.held_out_seeds.split(",")]
    lo, hi = (int(x) for x in args.epochs.split(","))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.spec).read_text())
    chosen = [v for v in VARIANTS if not args.methods or variant_name(*v) in args.methods.split(",")]
    t0, results, fronts, datasets = time.time(), {}, {}, {}
    for method, cl in chosen:
        spec = variant_spec(base, method, cl, args.trials, (lo, hi), workdir)
        spec_path = workdir / f"{spec['name']}.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        coun_tune("search", str(spec_path))
        export = workdir / f"{spec['name']}_knee.yaml"
        coun_tune(
            "export", spec["name"], "--pick", "knee", "--output", str(export), "--tracking-uri", spec["tracking_uri"]
        )
        name = variant_name(method, cl)
        fronts[name] = front_rows(spec["tracking_uri"], spec["name"], base["objectives"])
        results[name] = held_out(export, args.held_out_seeds, workdir / "cache", datasets)
        print(f"{name}: held-out avg_gap {mean_std(results[name], 'avg_gap')}", flush=True)
    hv = shared_hypervolumes(fronts, base["objectives"])
    refs = reference_rows(base, args.held_out_seeds, workdir / "cache", datasets, args.oracle_seeds)
    text = render(base, args, results, refs, hv, time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    log_to_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", base, args, results, hv, text)
    print(text)
    return 0


def shared_hypervolumes(fronts: dict, objectives: dict[str, str]) -> dict[str, float]:
    """Each front's hypervolume in [0, 1]: objectives scaled by the range over *all* methods'
    trials and measured from one reference point, so the numbers compare across methods."""
    from coun_tune import pareto

    modes = list(objectives.values())
    every = np.vstack(
        [np.array([[r[k] for k in objectives] for r in rows], dtype=float) for rows, _ in fronts.values()]
    )
    lo_all, hi_all = every.min(axis=0), every.max(axis=0)
    span = np.where(hi_all > lo_all, hi_all - lo_all, 1.0)
    out = {}
    for name, (rows, mask) in fronts.items():
        vals = np.array([[r[k] for k in objectives] for r in rows], dtype=float)[mask]
        scaled = pareto.to_minimisation((vals - lo_all) / span, modes)
        ref = pareto.to_minimisation(np.array([[1.0 if m == "min" else 0.0 for m in modes]]), modes)[0]
        out[name] = float(pareto.hypervolume(scaled, ref + 0.1) / np.prod(np.full(len(modes), 1.1)))
    return out


def log_to_mlflow(tracking_uri: str, base: dict, args, results: dict, hv: dict, text: str) -> None:
    from coun_tune.tracking.mlflow_store import client_for, ensure_experiment

    client = client_for(tracking_uri)
    exp = ensure_experiment(client, tracking_uri, f"reproduce_{base['name']}")
    run = client.create_run(
        exp,
        run_name=f"reproduce {base['name']} {args.trials} trials",
        tags={"coun_tune.role": "reproduce", "mlflow.note.content": text},
    )
    for name, recs in results.items():
        slug = name.replace("+CL", "_cl")
        for k in ["avg_gap", "forget_gap", "retain_acc", "test_acc"]:
            client.log_metric(run.info.run_id, f"{slug}.{k}_mean", float(np.mean([r[k] for r in recs])))
        client.log_metric(run.info.run_id, f"{slug}.hypervolume", hv[name])
    client.log_text(run.info.run_id, text, "results.md")
    client.set_terminated(run.info.run_id)


if __name__ == "__main__":
    sys.exit(main())
