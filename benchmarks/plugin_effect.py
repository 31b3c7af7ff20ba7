"""Does the CL plug-in help each method? One scenario, each method at its declared defaults,
with the plug-in off and on (cl_weight 1, temperature 0.3), same original, same oracle.

    python benchmarks/plugin_effect.py [--forget random:0.5] [--epochs 10] [--methods ft,neggrad_plus,...]

Defaults, not tuned configs: a method the plug-in hurts here may still gain after a search
(`search_spaces/fashion_mnist/<method>_cl.yaml`). Prints forget_gap / avg_gap / retain_acc.
"""

from __future__ import annotations

import argparse

import torch

from coun_tune.core.methods import METHODS
from coun_tune.core.pipeline import prepare, unlearn
from coun_tune.core.recipes import Scenario
from coun_tune.report import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--forget", default="random:0.5")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", default="ft,neggrad_plus,l1_sparse,not,salun")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prep = prepare(Scenario(dataset=args.dataset, forget=args.forget, seed=0), log=lambda s: None)
    o = prep.base.original_metrics
    rows = [["original", "-", o["forget_gap"], o["avg_gap"], o["retain_acc"]]]
    for m in args.methods.split(","):
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}")
        for cl in (0.0, 1.0):
            _, met = unlearn(prep, m, {"epochs": args.epochs, "cl_weight": cl, "temperature": 0.3})
            rows.append([m, "on" if cl else "off", met["forget_gap"], met["avg_gap"], met["retain_acc"]])
    print(table(["method", "plug-in", "forget_gap", "avg_gap", "retain_acc"], rows))


if __name__ == "__main__":
    main()
