"""How much do CoUn's metrics move with FastPath(fused_views=True)? One 2N forward for both views
normalises batch norm over both views together (and updates its running statistics once per
step instead of twice), so it is not the paper's computation. Same original, same oracle, same
seeds; the paper's two forwards vs fused, on a real scenario (default: digits, small_cnn, which
has batch norm; the engine's defaults otherwise).

    python benchmarks/fused_views_effect.py [--dataset digits] [--forget random:0.1] [--epochs 5] [--seeds 3]

Prints each metric's mean over seeds for both, their difference, and the seed-to-seed standard
deviation of the two-forward runs (the noise floor a difference is read against); the last
line is the largest |difference| / seed std over the metrics. Speed is measured on a GPU by
benchmarks/gpu_check.py (on a CPU fusing gains nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coun_tune.core.fastpath import FastPath  # noqa: E402
from coun_tune.core.pipeline import prepare, unlearn  # noqa: E402
from coun_tune.core.recipes import Scenario  # noqa: E402

METRICS = ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "forget_gap", "avg_gap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--forget", default="random:0.1")
    ap.add_argument("--recipe", default=None, help="base-model recipe (default: the dataset's)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="base-model cache (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fused_views_") as tmp:
        prep = prepare(
            Scenario(dataset=args.dataset, forget=args.forget, seed=0, recipe=args.recipe),
            cache_dir=args.cache_dir or tmp,
            log=lambda s: None,
        )
        runs: dict[str, list[dict]] = {"two forwards": [], "fused": []}
        for seed in range(args.seeds):
            for name, fast in (("two forwards", FastPath(fused_views=False)), ("fused", FastPath(fused_views=True))):
                _, met = unlearn(prep, "coun", {"epochs": args.epochs}, seed=seed, fast_path=fast)
                runs[name].append(met)
    print(
        f"{args.dataset} {args.forget}, CoUn defaults, {args.epochs} epochs, seeds 0..{args.seeds - 1}, "
        f"{prep.scen_data.retain.x.device}"
    )
    print(f"{'metric':<14} {'two fwd':>8} {'fused':>8} {'diff':>7} {'seed std':>8} {'|diff|/std':>10}")
    worst = 0.0
    for k in METRICS:
        a = np.array([m[k] for m in runs["two forwards"]])
        b = np.array([m[k] for m in runs["fused"]])
        std = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
        diff = float(b.mean() - a.mean())
        rel = abs(diff) / std if std > 0 else float("inf")
        worst = max(worst, rel)
        print(f"{k:<14} {a.mean():>8.2f} {b.mean():>8.2f} {diff:>+7.2f} {std:>8.2f} {rel:>10.2f}")
    wall = {n: np.mean([m["wall_seconds"] for m in r]) for n, r in runs.items()}
    print(f"training seconds per run (this device): two forwards {wall['two forwards']:.2f}, fused {wall['fused']:.2f}")
    print(f"max |diff| / seed std: {worst:.2f}")


if __name__ == "__main__":
    main()
