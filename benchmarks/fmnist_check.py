"""Does the Fashion-MNIST original memorize? Trains (or loads from the cache) the scenario's
original and oracle through coun_tune.core.pipeline.prepare, then measures the original's train
accuracy (D = D_r + D_u) in eval mode twice: with the test transform, and with one crop+flip draw
per sample (coun_tune.core.batching.Augmenter, as unlearning sees its data). Prints one JSON line.
usage: PYTHONPATH=. python benchmarks/fmnist_check.py [ARCH|-] [CACHE_DIR] [DATASET] [RECIPE]"""

import json
import sys

import torch

from coun_tune.core.pipeline import prepare
from coun_tune.core.recipes import Scenario

arch = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
dataset = sys.argv[3] if len(sys.argv) > 3 else "fashion_mnist"
recipe = sys.argv[4] if len(sys.argv) > 4 else None
scen = Scenario(dataset=dataset, forget="random:0.1", seed=0, arch=arch, recipe=recipe)
prep = prepare(scen, cache_dir=sys.argv[2] if len(sys.argv) > 2 else "/tmp/coun-fmnist-cache")
sd, model = prep.scen_data, prep.base.original.eval()


@torch.no_grad()
def train_acc(augment: bool) -> float:
    g = torch.Generator(device=sd.retain.x.device).manual_seed(1234)
    ok = n = 0
    for part in (sd.retain, sd.forget):
        for s in range(0, len(part), 1000):
            xb, yb = part.x[s : s + 1000], part.y[s : s + 1000]
            v = sd.augmenter(xb, g) if augment else sd.augmenter.normalize(xb)
            ok += (model(v).argmax(1) == yb).sum().item()
            n += len(yb)
    return 100.0 * ok / n


o, r = prep.base.original_metrics, prep.base.oracle_metrics
print(
    json.dumps(
        {
            "arch": scen.arch_name,
            "recipe": scen.train_recipe.to_dict(),
            "train_acc_augmented": train_acc(True),
            "train_acc_clean": train_acc(False),
            "original": {k: o[k] for k in ("retain_acc", "forget_acc", "test_acc", "avg_gap") if k in o},
            "oracle": {k: r[k] for k in ("retain_acc", "forget_acc", "test_acc") if k in r},
            "original_gaps": {k: v for k, v in o.items() if k.endswith("_gap")},
            "train_seconds": {"original": o.get("wall_seconds"), "oracle": r.get("wall_seconds")},
        }
    )
)
