"""Search quality: how good a front each sampler finds in N trials, and what MOASHA early
stopping costs and saves, on search_spaces/digits_half.yaml (CPU, real searches).

    .venv/bin/python benchmarks/search_quality.py --trials 8 --seeds 0 1 2

For each search seed: nsga2, tpe, gp and random with N trials, random with 2N, and nsga2 with
`scheduler: {type: mo_asha, grace_epochs: 1, reduction_factor: 3}` (against nsga2 at full
budget, the same seed). The quality of a search is the hypervolume of the Pareto front of its
finished trials (forget_gap min, retain_acc max; pruned trials are not results) up to ONE
reference point shared by every search of the run: the worst forget_gap and retain_acc of all
their finished trials pooled. (The percent scale's ends, 100 and 0, would put every search
within a fraction of a percent of every other.) Epochs spent: the epochs the trials actually
trained (a pruned trial up to the rung it was stopped at). All searches share one local Ray,
one base-model cache and one MLflow store in a temp dir. Ratios are printed last.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "digits_half.yaml"
SAMPLERS = ("nsga2", "tpe", "gp", "random")
MO_ASHA = {"type": "mo_asha", "grace_epochs": 1, "reduction_factor": 3}


OBJECTIVES = {"forget_gap": "min", "retain_acc": "max"}


def hypervolume(points: list[tuple[float, float]], ref) -> float:
    import numpy as np

    from coun_tune import pareto

    if not points:
        return 0.0
    v = np.array(points, dtype=float)
    front = v[pareto.non_dominated_mask(v, list(OBJECTIVES.values()))]
    return pareto.hypervolume(pareto.to_minimisation(front, list(OBJECTIVES.values())), ref)


def run_one(base_doc: dict, work: Path, name: str, **overrides) -> dict:
    """One real search; returns its finished trials' objective values, epochs spent, trial
    counts and wall seconds."""
    from coun_tune.config.search_spec import validate_search_spec
    from coun_tune.errors import UsageError
    from coun_tune.search.runner import run_search
    from coun_tune.tracking.mlflow_store import ROLE, child_runs, client_for, find_parent_run

    doc = {
        **base_doc,
        "name": name,
        "storage_path": str(work / "results"),
        "tracking_uri": f"sqlite:///{work}/mlflow.db",
        "cache_dir": str(work / "cache"),
        **overrides,
    }
    spec = validate_search_spec(doc, name)
    t0 = time.perf_counter()
    try:
        parent = client_for(spec.tracking_uri).get_run(run_search(spec, out=io.StringIO()).parent_run_id)
    except UsageError as e:  # the trials ran and are in MLflow; only a step after them (export) failed
        print(f"  {name}: the search raised after its trials: {e}", flush=True)
        parent = find_parent_run(client_for(spec.tracking_uri), name)
    wall = time.perf_counter() - t0
    client = client_for(spec.tracking_uri)
    runs = [
        r for r in child_runs(client, parent) if r.data.tags.get(ROLE) == "trial"
    ]  # not the review's original / oracle baseline runs
    epochs = sum(len(client.get_metric_history(r.info.run_id, "retain_acc")) for r in runs)
    pruned = sum(r.info.status == "KILLED" and "pruned_at_epoch" in r.data.metrics for r in runs)
    points = [
        tuple(r.data.metrics[k] for k in OBJECTIVES)
        for r in runs
        if r.info.status == "FINISHED" and all(k in r.data.metrics for k in OBJECTIVES)
    ]
    return {"points": points, "epochs": epochs, "trials": len(runs), "pruned": pruned, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    import yaml

    from coun_tune.search.ray_session import RaySession

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="N, trials per search (random also runs 2N)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search (sampler) seeds")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once (one CPU each)")
    ap.add_argument("--json", default=None, help="also write every search's results here (after each search)")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only these searches (labels below); ratios whose searches did not run are skipped",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="search epochs in [LOW, HIGH] instead of the spec's (a longer budget gives early stopping more rungs)",
    )
    ap.add_argument(
        "--merge",
        default=None,
        help="an earlier run's --json file (same --trials and --epochs): its searches of labels this run "
        "does not run join the results and the shared reference point",
    )
    args = ap.parse_args(argv)
    base = yaml.safe_load(SPEC.read_text())
    base.update(max_concurrent_trials=args.concurrent)
    if args.epochs:
        base["space"] = {**base["space"], "epochs": {"int": list(args.epochs)}}
    results: dict[tuple[str, int], dict] = {}
    plan = [(s, {"sampler": s, "num_samples": args.trials}) for s in SAMPLERS]
    plan += [
        ("random_2N", {"sampler": "random", "num_samples": 2 * args.trials}),
        ("nsga2_mo_asha", {"sampler": "nsga2", "num_samples": args.trials, "scheduler": MO_ASHA}),
    ]
    all_labels = [label for label, _ in plan]
    if args.only:
        plan = [(label, o) for label, o in plan if label in args.only]
    running = {label for label, _ in plan}
    if args.merge:
        for key, r in json.loads(Path(args.merge).read_text()).items():
            label, seed = key.rsplit("/", 1)
            if label not in running and int(seed) in args.seeds:
                results[(label, int(seed))] = {**r, "points": [tuple(p) for p in r["points"]]}
    with tempfile.TemporaryDirectory(prefix="ctune-bench-") as tmp, RaySession(None, log=lambda s: None):
        work = Path(tmp)
        for seed in args.seeds:
            for label, overrides in plan:
                r = run_one(base, work, f"{label}_s{seed}", seed=seed, **overrides)
                results[(label, seed)] = r
                if args.json:
                    Path(args.json).write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}))
                print(
                    f"{label:14s} seed {seed}: epochs {r['epochs']:3d}  trials {r['trials']:2d} "
                    f"(pruned {r['pruned']})  {r['wall_s']:5.0f} s",
                    flush=True,
                )
    import numpy as np

    pooled = np.array([p for r in results.values() for p in r["points"]], dtype=float)
    ref = np.array([pooled[:, 0].max(), -pooled[:, 1].min()])  # minimised space: (gap, -acc)
    for r in results.values():
        r["hypervolume"] = hypervolume(r["points"], ref)

    def mean(label: str, key: str) -> float:
        return statistics.mean(results[(label, s)][key] for s in args.seeds)

    def ratio(a: str, b: str, key: str = "hypervolume") -> str:
        if (a, args.seeds[0]) not in results or (b, args.seeds[0]) not in results:
            return "not run"
        per_seed = [results[(a, s)][key] / results[(b, s)][key] for s in args.seeds if results[(b, s)][key]]
        return f"{statistics.mean(per_seed):.3f} (per seed {', '.join(f'{x:.3f}' for x in per_seed)})"

    print(
        f"\nN = {args.trials} trials, seeds {args.seeds}, {args.concurrent} concurrent, epochs "
        f"{base['space']['epochs']}; reference point "
        f"forget_gap {ref[0]:.3f}, retain_acc {-ref[1]:.3f}; mean hypervolume:"
    )
    for label in all_labels:
        if all((label, s) in results for s in args.seeds):
            merged = "" if label in running else " (merged)"
            print(f"  {label:14s} {mean(label, 'hypervolume'):8.4f}   epochs {mean(label, 'epochs'):6.1f}{merged}")
    print("\nratios (mean over seeds of per-seed ratios):")
    for s in ("nsga2", "tpe", "gp", "random_2N"):
        print(f"  hypervolume {s:>9s} / random at N:  {ratio(s, 'random')}")
    print(f"  mo_asha / full budget (nsga2): hypervolume {ratio('nsga2_mo_asha', 'nsga2')}")
    print(f"  mo_asha / full budget (nsga2): epochs spent {ratio('nsga2_mo_asha', 'nsga2', 'epochs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
