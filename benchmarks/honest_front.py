"""Does calibrating every trial on several forget sets give a front that holds on forget sets no
search saw? (issue 14)

On `digits_half`, per search seed, three real searches (Ray Tune + Optuna NSGA-II, MLflow):
    1-split            calibration [0],        N trials
    3-split, = compute calibration [0, 1, 2],  N / 3 trials  (the same number of unlearning runs)
    3-split, = trials  calibration [0, 1, 2],  N trials
Then every completed trial's config is re-run on FRESH forget sets (split seeds 200..204, each
with its own oracle; disjoint from every calibration and hold-out seed) as Ray tasks, and each
search is judged there:
    hv_fresh       normalised hypervolume of the search's calibration front, re-measured on the
                   fresh means: the share of the box between the best and the worst fresh values
                   of all trials of the run (one box for every search, so ratios compare)
    spearman       Spearman's rho between each trial's calibration forget_gap and its fresh mean
    knee_fresh     the fresh forget_gap / retain_acc of the config the search exports (its knee)
Ratios (3-split / 1-split, per seed, then mean and sample std over seeds) are printed last.

    python benchmarks/honest_front.py                  # N = 9, seeds 0 1 2, 5 fresh sets
    python benchmarks/honest_front.py --trials 6 --seeds 0 --fresh 3   # a quicker look
The searches use the README's space (digits_half.yaml) with the spec's calibration replaced.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coun_tune import pareto  # noqa: E402
from coun_tune.calibration import sample_std, spearman  # noqa: E402

OBJ = {"forget_gap": "min", "retain_acc": "max"}
FRESH_BASE = 200


def variants(n: int) -> list[tuple[str, list[int], int]]:
    return [("1-split", [0], n), ("3-split =compute", [0, 1, 2], max(2, n // 3)), ("3-split =trials", [0, 1, 2], n)]


def run_searches(work: Path, seeds: list[int], n: int) -> list[dict]:
    """Every (variant, seed) search; returns [{variant, seed, parent_run_id}]."""
    from coun_tune.config.search_spec import validate_search_spec
    from coun_tune.search.runner import run_search

    base = yaml.safe_load((ROOT / "search_spaces" / "digits_half.yaml").read_text())
    base.pop("holdout", None)
    base.pop("oracle_seeds", None)
    out = []
    for seed in seeds:
        for label, cal, trials in variants(n):
            doc = {
                **base,
                "name": f"hf_{label.split()[0]}_{'c' if 'compute' in label else 't'}_{seed}",
                "calibration": {"split_seeds": cal},
                "num_samples": trials,
                "seed": seed,
                "storage_path": str(work / "results"),
                "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            }
            t0 = time.time()
            outcome = run_search(validate_search_spec(doc), out=io.StringIO())
            print(f"search {label:18s} seed {seed}: {trials} trials, {time.time() - t0:.0f} s", flush=True)
            out.append({"variant": label, "seed": seed, "parent": outcome.parent_run_id})
    return out


def fresh_records(client, searches: list[dict], fresh: list[int], cache: str) -> tuple[dict, dict]:
    """({search parent: [trial rows]}, {config json: [fresh metrics per seed]}): every completed
    trial's config re-run on every fresh split, identical configs once."""
    import ray

    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.datasets import load_dataset
    from coun_tune.search.holdout import run_configs
    from coun_tune.search.ray_session import RaySession
    from coun_tune.search.trainable import ensure_splits
    from coun_tune.tracking.holdout import front_configs
    from coun_tune.tracking.review import trial_rows

    rows_of, configs = {}, {}
    for s in searches:
        rows = [r for r in trial_rows(client, client.get_run(s["parent"])) if all(k in r for k in OBJ)]
        docs = front_configs(client, rows)
        for r in rows:
            r["config_key"] = json.dumps(docs[r["run_id"]], sort_keys=True)
            configs[r["config_key"]] = docs[r["run_id"]]
        rows_of[s["parent"]] = rows
    keyed = {f"c{i}": doc for i, doc in enumerate(configs.values())}
    back = {f"c{i}": k for i, k in enumerate(configs)}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    resources = {"cpu": 1.0, "gpu": 0.0}
    with RaySession(None, log=lambda line: None):
        data = load_dataset("digits")
        ref = ray.put(data)
        scenario = build_unlearn_config(next(iter(keyed.values())), {}).scenario
        ensure_splits(scenario, fresh, cache, ref, resources, out=io.StringIO())
        t0 = time.time()
        run_configs(
            keyed,
            fresh,
            cache,
            ref,
            resources,
            set(),
            lambda rec: results[back[rec["key"]]].append(rec),
            log=lambda _: None,
        )
        print(f"fresh re-runs: {len(keyed)} configs x {len(fresh)} forget sets, {time.time() - t0:.0f} s", flush=True)
    return rows_of, results


def split_mean(results: dict, row: dict, seeds: list[int], names: list[str]) -> list[float]:
    """A trial's fresh-set means over the given split seeds, one per objective."""
    recs = [x for x in results[row["config_key"]] if x["split_seed"] in seeds]
    return [float(np.mean([x[k] for x in recs])) for k in names]


def judge(searches: list[dict], rows_of: dict, results: dict) -> list[dict]:
    names, modes = list(OBJ), list(OBJ.values())

    def fresh_mean(r):
        return [float(np.mean([x[k] for x in results[r["config_key"]]])) for k in names]

    every = np.array([fresh_mean(r) for rows in rows_of.values() for r in rows])
    box_min = pareto.to_minimisation(every, modes)
    ref, ideal = box_min.max(axis=0), box_min.min(axis=0)
    out = []
    for s in searches:
        rows = rows_of[s["parent"]]
        cal = np.array([[r[k] for k in names] for r in rows])
        fr = np.array([fresh_mean(r) for r in rows])
        front = pareto.non_dominated_mask(cal, modes)
        hv = pareto.normalised_hypervolume(pareto.to_minimisation(fr[front], modes), ref, ideal)
        knee = pareto.pick_index(rows, OBJ, "knee")
        # the hold-out check, simulated: the first 2 fresh sets play the hold-out the calibration
        # front is re-run on and the knee is picked from (review.pick_basis), the other fresh
        # sets judge both knees
        seeds = sorted({x["split_seed"] for recs in results.values() for x in recs})
        hold, judge_on = seeds[:2], seeds[2:]
        on_front = [rows[i] for i in np.flatnonzero(front)]
        view = [{**r, **dict(zip(names, split_mean(results, r, hold, names)))} for r in on_front]
        knee_h = on_front[pareto.pick_index(view, OBJ, "knee")]
        out.append(
            {
                **s,
                "trials": len(rows),
                "hv_fresh": hv,
                "spearman": spearman(cal[:, 0], fr[:, 0]),
                "knee_forget_gap_cal": float(cal[knee, 0]),
                "knee_forget_gap_fresh": float(fr[knee, 0]),
                "knee_retain_acc_fresh": float(fr[knee, 1]),
                "knee_cal_forget_gap_judge": split_mean(results, rows[knee], judge_on, names)[0],
                "knee_hold_forget_gap_judge": split_mean(results, knee_h, judge_on, names)[0],
                # what the search would report for its knee vs what the judging sets give it
                "knee_cal_error": abs(float(cal[knee, 0]) - split_mean(results, rows[knee], judge_on, names)[0]),
                "knee_hold_error": abs(
                    split_mean(results, knee_h, hold, names)[0] - split_mean(results, knee_h, judge_on, names)[0]
                ),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=9, help="N: trials of the 1-split search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search (sampler) seeds")
    ap.add_argument("--fresh", type=int, default=5, help="fresh forget sets (split seeds 200, 201, ...)")
    ap.add_argument("--json", help="write the per-search figures and the raw records here")
    ap.add_argument(
        "--rejudge", nargs="+", help="judge the raw records of earlier --json files (merged) instead of searching"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="honest_front_"))
    cache = os.environ.setdefault("COUN_TUNE_CACHE", str(work / "cache"))
    fresh = [FRESH_BASE + i for i in range(args.fresh)]
    print(
        f"honest_front: N={args.trials}, search seeds {args.seeds}, fresh split seeds {fresh}, load {os.getloadavg()}"
    )
    import mlflow

    if args.rejudge:
        searches, rows_of, results = [], {}, {}
        for f in args.rejudge:
            raw = json.loads(Path(f).read_text())
            searches += raw["searches"]
            rows_of.update(raw["rows_of"])
            results.update(raw["results"])
        args.seeds = sorted({s["seed"] for s in searches})
    else:
        searches = run_searches(work, args.seeds, args.trials)
        client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        rows_of, results = fresh_records(client, searches, fresh, cache)
    judged = judge(searches, rows_of, results)
    if args.json:
        raw = {"searches": searches, "rows_of": rows_of, "results": results}
        Path(args.json).write_text(json.dumps({"judged": judged, **raw}, default=str))
    print("\nvariant             seed  trials  hv_fresh  spearman  knee forget_gap cal -> fresh  knee retain_acc fresh")
    for j in judged:
        print(
            f"{j['variant']:18s}  {j['seed']:4d}  {j['trials']:6d}  {j['hv_fresh']:8.3f}  {j['spearman']:8.2f}  "
            f"{j['knee_forget_gap_cal']:10.2f} -> {j['knee_forget_gap_fresh']:5.2f}  {j['knee_retain_acc_fresh']:10.2f}"
        )
    print("\nmeans over search seeds (sample std):")
    for label, _, _ in variants(args.trials):
        mine = [j for j in judged if j["variant"] == label]
        for k in (
            "hv_fresh",
            "spearman",
            "knee_forget_gap_fresh",
            "knee_retain_acc_fresh",
            "knee_cal_forget_gap_judge",
            "knee_hold_forget_gap_judge",
        ):
            v = [j[k] for j in mine]
            print(f"  {label:18s} {k:22s} {np.mean(v):6.2f} +- {sample_std(v):.2f}")
    print(
        "\npaired differences, 3-split - 1-split per search seed (mean, 95% t interval; 'not detected' if it spans 0):"
    )
    for label in ("3-split =compute", "3-split =trials"):
        for k in ("hv_fresh", "spearman", "knee_forget_gap_fresh"):
            d = [_of(judged, label, s)[k] - _of(judged, "1-split", s)[k] for s in args.seeds]
            lo, hi = t_interval(d)
            verdict = "not detected" if lo <= 0 <= hi else ("3-split higher" if lo > 0 else "3-split lower")
            print(f"  {label:18s} {k:22s} {np.mean(d):+7.3f}  [{lo:+.3f}, {hi:+.3f}]  {verdict}")
    print("\npicking on a hold-out (2 fresh sets) vs on calibration, judged on the other fresh sets:")
    for label, _, _ in variants(args.trials):
        d = [
            _of(judged, label, s)["knee_hold_forget_gap_judge"] - _of(judged, label, s)["knee_cal_forget_gap_judge"]
            for s in args.seeds
        ]
        lo, hi = t_interval(d)
        verdict = "not detected" if lo <= 0 <= hi else ("hold-out pick lower" if hi < 0 else "hold-out pick higher")
        print(
            f"  {label:18s} knee forget_gap, hold-out pick - calibration pick "
            f"{np.mean(d):+7.3f}  [{lo:+.3f}, {hi:+.3f}]  {verdict}"
        )
    print("\nhow far the value a search reports for its knee is from the knee's forget_gap on the judging sets:")
    for label, _, _ in variants(args.trials):
        mine = [_of(judged, label, s) for s in args.seeds]
        cal = [j["knee_cal_error"] for j in mine]
        hold = [j["knee_hold_error"] for j in mine]
        print(
            f"  {label:18s} |calibration value - judged| {np.mean(cal):.2f} +- {sample_std(cal):.2f}   "
            f"|hold-out value - judged| {np.mean(hold):.2f} +- {sample_std(hold):.2f}   "
            "paired difference %+.2f [%+.2f, %+.2f]"
            % (np.mean(np.subtract(hold, cal)), *t_interval(list(np.subtract(hold, cal))))
        )
    print(f"\nratios (3-split / 1-split, per seed; load {os.getloadavg()}):")
    for label in ("3-split =compute", "3-split =trials"):
        r = [_of(judged, label, s)["hv_fresh"] / _of(judged, "1-split", s)["hv_fresh"] for s in args.seeds]
        print(
            f"  hypervolume on fresh sets, {label:18s}: {np.mean(r):.3f} +- {sample_std(r):.3f}  "
            f"({', '.join(f'{x:.3f}' for x in r)})"
        )


def _of(judged: list[dict], label: str, seed: int) -> dict:
    return next(j for j in judged if j["variant"] == label and j["seed"] == seed)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The two-sided t interval of the mean (n - 1 degrees of freedom); NaNs dropped."""
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


if __name__ == "__main__":
    main()
