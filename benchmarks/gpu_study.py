"""GPU study (issue 15, item 5): CoUn, FT and NegGrad+ with and without the CL plug-in on the
memorizing Fashion-MNIST original, at fixed configs, on 3 held-out forget sets.

    .venv/bin/python benchmarks/gpu_study.py                       # one GPU (sized for 15 min of one H200)
    .venv/bin/python benchmarks/gpu_study.py --quick --dataset digits --out-dir /tmp/gs   # any CPU, ~30 s

What it does, in order, all through coun_tune.core (pipeline.prepare / pipeline.unlearn, the
base-model cache, the engine), so the numbers are the ones `coun-tune unlearn` gives:
1. Trains (or loads from the cache: --cache-dir, default $COUN_TUNE_CACHE or
   ~/.cache/coun-tune) the scenario's original (theta_o on D = D_r + D_u; ResNet-18, the
   `fashion_mnist` recipe: 60 epochs, batch 256, SGD 0.1, x0.1 at 50% and 75%, crop+flip) and
   the oracle of the first forget set.
2. The memorization check (as benchmarks/fmnist_check.py): the original's train accuracy on D
   in eval mode, once with one crop+flip draw per sample (the augmentation unlearning trains
   with) and once with the test transform. Below --min-train-acc (99) on the augmented pass, it
   stops there (exit 3): the original's gaps to the oracle would be noise (METHOD.md section 5),
   and the JSON and Markdown say so instead of holding a comparison.
3. For each held-out forget set (scenario fashion_mnist, random:0.1, seed 0 for the original;
   split seeds 1, 2, 3 draw the forget sets, each with its own oracle trained on its D_r), runs
   each variant once from theta_o (unlearning seed 0) and measures it against that oracle.
4. Writes <out-dir>/gpu_study.json (every per-split value, the resolved configs, timings) and
   <out-dir>/gpu_study.md (mean +- sample std over the splits, ddof = 1; and the plug-in's
   paired effect on avg_gap with a 95% Student-t interval over the same splits).

The fixed configs (CONFIGS below) are not tuned: every variant gets the same lr (0.05, cosine
to lr/100) and the same epochs (10; SGD steps = epochs x ceil(54,000 / 256) = 2,110 at the
default batch 256), so the table isolates the loss. The plug-in is the paper's best setting
(cl_weight 1.0, temperature 0.1); NegGrad+ uses beta 0.999 (its declared default, inside the
paper's [0.95, 0.9999]). CoUn is FT with the plug-in, so FT / CoUn is the plug-in's effect on
FT and NegGrad+ / NegGrad+ +CL its effect on NegGrad+. A fixed-config comparison says what
these settings do at this budget; it is not the tuned comparison (benchmarks/reproduce.py).

Budget (an estimate, not measured: no GPU was lent to the session that wrote this): the
original and 3 oracles are 4 x 60 ResNet-18 epochs of <= 60k 28x28 images, the unlearning
12 runs x 10 epochs of 54k (CoUn's second view: 4/3 of the forward-equivalents). Every model's
metrics include the SVC MIA, CPU work: 5 RBF-SVC fits on 20,000 one-feature points (members
vs the 10,000 test images), measured at 13 s of CPU per fit on a loaded 2-core box, so up to
about a minute per model. The 6 base-model evaluations (the original on each split, each
oracle) run in the main process; the 12 unlearning runs run --workers (4) at a time in worker
processes that share the GPU, each MIA on its own core. The base models are cached: a rerun
(other configs, --epochs) trains only the unlearning runs. Progress lines (epoch k/N, s/epoch,
ETA) go to stderr.

--quick (CI, CPU): small_cnn with the `tiny` recipe (8 epochs), 2 unlearning epochs, batch
64, the same 3 splits and the same four variants; on `--dataset digits` (bundled with
scikit-learn, no files) or on Fashion-MNIST IDX files under --data-root. Its numbers check
the script, not the methods.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the source tree, also without PYTHONPATH
# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP): on a small
# shared CPU, spinning threads made steps up to 10x slower (benchmarks/gpu_check.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coun_tune.report import MAIN_ROWS  # noqa: E402

JSON_NAME, MD_NAME = "gpu_study.json", "gpu_study.md"
SPLIT_SEEDS = (1, 2, 3)
MIN_TRAIN_ACC = 99.0
# (label, method, fixed hyperparameters): the four variants, CoUn = FT + the plug-in.
COMMON = {"lr": 0.05, "epochs": 10}
PLUGIN = {"cl_weight": 1.0, "temperature": 0.1}
CONFIGS: list[tuple[str, str, dict]] = [
    ("FT", "ft", {**COMMON, "cl_weight": 0.0}),
    ("CoUn", "coun", {**COMMON, **PLUGIN}),
    ("NegGrad+", "neggrad_plus", {**COMMON, "neggrad_beta": 0.999, "cl_weight": 0.0}),
    ("NegGrad+ +CL", "neggrad_plus", {**COMMON, "neggrad_beta": 0.999, **PLUGIN}),
]
# (without, with) the plug-in: their paired avg_gap difference is reported per split
PLUGIN_PAIRS = [("FT", "CoUn"), ("NegGrad+", "NegGrad+ +CL")]
QUICK = {"arch": "small_cnn", "recipe": "tiny", "epochs": 2, "batch_size": 64}
# Markdown columns: (header, metric key); every cell is mean +- sample std over the splits
COLUMNS = [
    ("RA", "retain_acc"),
    ("UA", "unlearn_acc"),
    ("TA", "test_acc"),
    ("MIA", "mia_efficacy"),
    ("Avg. Gap", "avg_gap"),
    ("forget_gap", "forget_gap"),
    ("wall s", "wall_seconds"),
]
KEEP = (*MAIN_ROWS, "flops_true")  # the report's rows, and the measured flops beside the convention's


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict:
    """mean, sample std (ddof = 1; None for one value), n and the per-split values."""
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": len(v),
        "values": [float(x) for x in v],
    }


def paired(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """b - a over the same splits: the mean difference and its two-sided Student-t interval."""
    from scipy import stats

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "lo": None, "hi": None, "values": d.tolist()}
    s = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)
    return {"mean": mean, "std": s, "n": n, "lo": mean - half, "hi": mean + half, "level": level, "values": d.tolist()}


_WORKER: dict = {}  # per process: the dataset and the prepared splits, loaded once


def unlearn_task(task: dict) -> dict[str, float]:
    """One unlearning run, in this process or a worker: the split's base models read from the
    cache (the main process trained them; nothing is trained or written here), the variant
    run from theta_o, its final metrics against that split's oracle."""
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.pipeline import prepare, unlearn

    scen = task["scenario"]
    key = (scen.dataset, scen.data_root)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER.update(key=key, data=task.get("data") or load_dataset(*key), preps={})
    preps = _WORKER["preps"]
    s = task["split_seed"]
    if s not in preps:
        preps[s] = prepare(
            scen.with_split(s),
            task["cache_dir"],
            task["device"],
            log=lambda _: None,
            data=_WORKER["data"],
            train_missing=False,
        )
    _, m = unlearn(preps[s], task["method"], task["hparams"], batch_size=task["batch_size"], seed=task["seed"])
    return {k: float(m[k]) for k in KEEP if k in m}


@torch.no_grad()
def train_accuracy(prep, augment: bool) -> float:
    """The original's accuracy on D = D_r + D_u in eval mode: one crop+flip draw per sample
    (the augmentation unlearning trains with) or the test transform (fmnist_check.py's check)."""
    sd, model = prep.scen_data, prep.base.original
    was_training = model.training
    model.eval()
    g = torch.Generator(device=sd.retain.x.device).manual_seed(1234)
    ok = n = 0
    for part in (sd.retain, sd.forget):
        for s in range(0, len(part), 1000):
            xb, yb = part.x[s : s + 1000], part.y[s : s + 1000]
            v = sd.augmenter(xb, g) if augment else sd.augmenter.normalize(xb)
            ok += (model(v).argmax(1) == yb).sum().item()
            n += len(yb)
    model.train(was_training)
    return 100.0 * ok / n


def pm(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.2f}" if s["std"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def render(doc: dict) -> str:
    """The Markdown page: setup, the check, one table (mean ± sample std over the splits) and
    the plug-in's paired avg_gap effect."""
    check = doc["check"]
    lines = [
        "# GPU study: CoUn, FT and NegGrad+ with and without the CL plug-in",
        "",
        f"Written by `{doc['command']}` ({doc['finished']}, {doc['device']}, torch {doc['torch']}).",
        "",
        f"Scenario: {json.dumps(doc['scenario'])}; held-out forget sets: split seeds "
        f"{', '.join(str(s) for s in doc['split_seeds'])}, each measured against its own oracle "
        "(trained on that split's D_r); the original is the same for all (seed "
        f"{doc['scenario']['seed']}). Unlearning seed {doc['unlearn_seed']}, batch {doc['batch_size']}.",
        "",
        f"Memorization check (original, eval mode, on D): train accuracy {check['train_acc_augmented']:.2f}% "
        f"with one crop+flip draw per sample, {check['train_acc_clean']:.2f}% with the test transform; "
        f"required >= {check['min_train_acc']:g}% augmented: **{'passed' if check['passed'] else 'FAILED'}**.",
        "",
    ]
    if not check["passed"]:
        lines += [
            "The original does not memorize its training data, so no comparison was run (METHOD.md section 5).",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "Fixed configs (not tuned; the same lr and epochs for every variant):",
        "",
        *[f"- {label} (`{c['method']}`): `{json.dumps(c['hparams'])}`" for label, c in doc["configs"].items()],
        "",
        f"Mean ± sample std (ddof = 1) over {len(doc['split_seeds'])} forget sets; percent except wall s "
        f"(seconds of unlearning, {doc['workers']} run(s) at a time on the device; for the oracle and the "
        "original, of their training, as cached). "
        "UA = 100 - forget accuracy; Avg. Gap = mean of the |RA|, |UA|, |TA|, |MIA| gaps to each split's oracle.",
        "",
        "| model | " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for label, row in [*doc["reference"].items(), *doc["rows"].items()]:
        cells = [pm(row["summary"].get(k)) for _, k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The plug-in's effect on Avg. Gap, paired over the same forget sets (with - without; "
        "negative = closer to the oracle), 95% Student-t interval:",
        "",
        "| pair | mean difference | 95% interval | reading |",
        "|---|---|---|---|",
    ]
    for name, p in doc["plugin_effect"].items():
        if p["lo"] is None:
            lines.append(f"| {name} | {p['mean']:.2f} | - | one split: no interval |")
            continue
        reading = (
            "no difference detected at this budget"
            if p["lo"] <= 0 <= p["hi"]
            else ("the plug-in is closer to the oracle" if p["hi"] < 0 else "the plug-in is further from the oracle")
        )
        lines.append(f"| {name} | {p['mean']:.2f} | [{p['lo']:.2f}, {p['hi']:.2f}] | {reading} |")
    t = doc["timing"]
    lines += [
        "",
        f"Wall time: {t['total_s']:.0f} s in all ({t['base_models_s']:.0f} s base models and their metrics, "
        f"trained or read from the cache; {t['unlearning_s']:.0f} s unlearning runs with their metrics).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small_cnn, tiny recipe, 2 epochs")
    ap.add_argument("--dataset", default="fashion_mnist", help="default fashion_mnist (digits: --quick without files)")
    ap.add_argument("--data-root", help="the dataset's files (default: the dataset's default root)")
    ap.add_argument("--cache-dir", help="base-model cache (default $COUN_TUNE_CACHE or ~/.cache/coun-tune)")
    ap.add_argument("--out-dir", default="docs/gpu_study", help=f"where {JSON_NAME} and {MD_NAME} go")
    ap.add_argument("--device", help="cuda, cpu, ... (default: cuda when present)")
    ap.add_argument("--split-seeds", default=",".join(map(str, SPLIT_SEEDS)), help="held-out forget sets")
    ap.add_argument("--epochs", type=int, help="unlearning epochs for every variant (default 10; --quick 2)")
    ap.add_argument(
        "--workers",
        type=int,
        help="unlearning runs at once, in worker processes (default 4 on a GPU, else 1): the SVC MIA "
        "of each run's metrics is CPU work, run beside the others",
    )
    ap.add_argument("--min-train-acc", type=float, default=MIN_TRAIN_ACC, help="the memorization gate (%%)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.engine import resolve_hparams
    from coun_tune.core.metrics import gaps
    from coun_tune.core.pipeline import pick_device, prepare
    from coun_tune.core.recipes import Scenario

    t_start = time.perf_counter()
    seeds = [int(s) for s in args.split_seeds.split(",") if s.strip()]
    quick = QUICK if args.quick else {}
    scenario = Scenario(
        dataset=args.dataset,
        forget="random:0.1",
        seed=0,
        arch=quick.get("arch"),
        recipe=quick.get("recipe"),
        data_root=args.data_root,
    )
    epochs = args.epochs or quick.get("epochs") or COMMON["epochs"]
    configs = {
        label: {"method": method, "hparams": resolve_hparams(method, {**hp, "epochs": epochs})}
        for label, method, hp in CONFIGS
    }
    batch_size = quick.get("batch_size") or scenario.defaults.batch_size
    device = pick_device(args.device)
    workers = args.workers or (4 if device.type == "cuda" else 1)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/gpu_study.py", *(sys.argv[1:] if argv is None else argv)])
    doc: dict = {
        "study": "gpu_study",
        "command": command,
        "quick": args.quick,
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scenario": scenario.to_dict(),
        "recipe": scenario.train_recipe.to_dict(),
        "split_seeds": seeds,
        "unlearn_seed": 0,
        "batch_size": batch_size,
        "workers": workers,
        "configs": configs,
    }
    log(f"gpu_study: {args.dataset} on {device_name}; splits {seeds}; variants {', '.join(configs)}")

    data = load_dataset(scenario.dataset, scenario.data_root)
    t_base = time.perf_counter()
    preps = []
    for k, s in enumerate(seeds):
        preps.append(prepare(scenario.with_split(s), args.cache_dir, device, log=log, data=data))
        if k == 0:  # the original is the same for every split: check it before training more oracles
            check = {
                "train_acc_augmented": train_accuracy(preps[0], True),
                "train_acc_clean": train_accuracy(preps[0], False),
                "min_train_acc": args.min_train_acc,
            }
            check["passed"] = check["train_acc_augmented"] >= args.min_train_acc
            doc["check"] = check
            log(f"gpu_study: memorization check {json.dumps(check)}")
            if not check["passed"]:
                doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
                doc["timing"] = {"total_s": time.perf_counter() - t_start}
                (out_dir / JSON_NAME).write_text(json.dumps(doc, indent=2) + "\n")
                (out_dir / MD_NAME).write_text(render(doc))
                log(f"gpu_study: the original does not memorize (< {args.min_train_acc:g}% augmented); stopped")
                return 3
    base_s = time.perf_counter() - t_base

    reference: dict[str, list[dict]] = {"Oracle": [], "Original": []}
    for s, prep in zip(seeds, preps):
        oracle, original = prep.base.oracle_metrics, prep.base.original_metrics
        reference["Oracle"].append({"split_seed": s, **{k: float(oracle[k]) for k in KEEP if k in oracle}})
        reference["Original"].append(
            {
                "split_seed": s,
                **{k: float(original[k]) for k in KEEP if k in original},
                **gaps(original, oracle),
            }
        )
    for row in reference["Oracle"]:
        row.update(retain_gap=0.0, forget_gap=0.0, test_gap=0.0, mia_gap=0.0, avg_gap=0.0)

    t_unlearn = time.perf_counter()
    tasks = [
        {
            "scenario": scenario,
            "split_seed": s,
            "label": label,
            "method": c["method"],
            "hparams": c["hparams"],
            "batch_size": batch_size,
            "seed": doc["unlearn_seed"],
            "cache_dir": args.cache_dir,
            "device": str(device),
        }
        for s in seeds
        for label, c in configs.items()
    ]
    if workers > 1:  # the runs share the GPU; each one's SVC MIA runs on its own CPU core
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(unlearn_task, tasks))
    else:
        _WORKER.update(key=(scenario.dataset, scenario.data_root), data=data, preps=dict(zip(seeds, preps)))
        results = [unlearn_task(t) for t in tasks]
    per_split: dict[str, list[dict]] = {label: [] for label in configs}
    for t, m in zip(tasks, results):
        per_split[t["label"]].append({"split_seed": t["split_seed"], **m})
        log(
            f"gpu_study: split {t['split_seed']} {t['label']}: avg_gap {m['avg_gap']:.2f} "
            f"forget_gap {m['forget_gap']:.2f} RA {m['retain_acc']:.2f} ({m['wall_seconds']:.1f} s)"
        )
    unlearn_s = time.perf_counter() - t_unlearn

    def rows_of(records: dict[str, list[dict]]) -> dict:
        return {
            label: {
                "per_split": recs,
                "summary": {k: summary([r[k] for r in recs]) for k in KEEP if all(k in r for r in recs)},
            }
            for label, recs in records.items()
        }

    doc["reference"] = rows_of(reference)
    doc["rows"] = rows_of(per_split)
    doc["plugin_effect"] = {
        f"{b} - {a}": paired(
            [r["avg_gap"] for r in per_split[a]],
            [r["avg_gap"] for r in per_split[b]],
        )
        for a, b in PLUGIN_PAIRS
    }
    doc["timing"] = {"total_s": time.perf_counter() - t_start, "base_models_s": base_s, "unlearning_s": unlearn_s}
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out_dir / JSON_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / MD_NAME).write_text(render(doc))
    log(f"gpu_study: wrote {out_dir / JSON_NAME} and {out_dir / MD_NAME} ({doc['timing']['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
