"""Unlearning metrics (METHOD.md section 4), all in percent unless the name says otherwise.

Names used everywhere (JSON, MLflow, YAML):
  retain_acc, forget_acc, unlearn_acc (= 100 - forget_acc), test_acc, mia_efficacy,
  retain_gap, forget_gap (= |UA - UA*|), test_gap, mia_gap, avg_gap (mean of the four),
  wall_seconds, flops.
Cost (`flops_from_work`): FLOPs = 2 x MACs of the Conv2d/Linear layers, in the paper's
  convention (METHOD.md section 4): a trained sample costs (views + 2) forward-equivalents,
  each of its views forwarded once and the backward counted as two forwards once per sample;
  a forward alone (a teacher's, an evaluation) costs 1. So FT, NoT, l1-sparse and Retrain cost
  3 per trained sample and CoUn (two views) 4 per retain sample: CoUn/FT = 4/3 at equal
  epochs. The paper's CoUn figure on CIFAR-10 fixes it: 45k retain images x 40 epochs x 4 x
  2 x 0.557 GMACs (ResNet-18) = 8.02 PFLOPs. `flops_true` (a diagnostic) is the work as run:
  every view is a forward and a backward of its own, 3 forward-equivalents per view trained:
  FT 3, CoUn 6 per retain sample.
Diagnostics of the MIA (it is bistable on near-perfect models, METHOD.md section 4):
  mia_member_saturated, mia_nonmember_saturated: % of members (retain sample) / non-members
      (test) with true-label confidence above 0.999;
  mia_efficacy_resample_min / _max: the score over a few SVC fits on resampled members;
  mia_loss_attack_acc: accuracy of the best loss threshold separating forget from test
      (50 = indistinguishable), a secondary, attack-style view.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from coun_tune.core.batching import Augmenter, DeviceSplit, ordered_batches

GAP_OF = {"retain_gap": "retain_acc", "forget_gap": "unlearn_acc", "test_gap": "test_acc", "mia_gap": "mia_efficacy"}

# The one registry of what a run reports: name -> (better: "min" | "max" | None, percent?).
# `better` is None where neither direction is "better" in itself (forget accuracy should
# match the oracle's, not be high or low). Search specs, MLflow logging, the Pareto reference
# point and `best:` picks all read this.
METRICS: dict[str, tuple[str | None, bool]] = {
    "retain_acc": ("max", True),
    "forget_acc": (None, True),
    "unlearn_acc": (None, True),
    "test_acc": ("max", True),
    "mia_efficacy": (None, True),
    "mia_loss_attack_acc": (None, True),
    "retain_gap": ("min", True),
    "forget_gap": ("min", True),
    "test_gap": ("min", True),
    "mia_gap": ("min", True),
    "avg_gap": ("min", True),
    "wall_seconds": ("min", False),
    "flops": ("min", False),
}
DIAGNOSTICS = (
    "flops_true",
    "mia_efficacy_resample_min",
    "mia_efficacy_resample_max",
    "mia_member_saturated",
    "mia_nonmember_saturated",
    "loss",
    "epoch",
)
SATURATED = 0.999
MIA_RESAMPLES = 5
# Bump when anything here (or the evaluation it calls: predict, the MIA, the loss attack, the
# member draw) changes what a model scores: metrics cached beside a model (base_models'
# meta.json, keyed by split hash and this version) are then recomputed, not served stale.
METRICS_CODE_VERSION = 1


@torch.no_grad()
def predict(
    model: torch.nn.Module, split: DeviceSplit, augmenter: Augmenter, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-time pass: (correct (N,) bool, true-label softmax confidence (N,), CE loss (N,))."""
    was_training = model.training
    model.eval()
    correct, conf, loss = [], [], []
    for idx in ordered_batches(len(split), batch_size, split.x.device):
        logits = model(augmenter.normalize(split.x[idx])).float()
        y = split.y[idx]
        correct.append((logits.argmax(1) == y).cpu())
        conf.append(F.softmax(logits, 1).gather(1, y[:, None])[:, 0].cpu())
        loss.append(F.cross_entropy(logits, y, reduction="none").cpu())
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return cat(correct).astype(bool), cat(conf).astype(np.float64), cat(loss).astype(np.float64)


def svc_mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray) -> float:
    """SalUn's confidence MIA: an RBF SVC (C=3, gamma="auto") fit on members (label 1) vs
    non-members (label 0) using the true-label confidence as the single feature; returns
    100 x the fraction of forget samples it predicts to be non-members."""
    from sklearn.svm import SVC

    x = np.concatenate([member_conf, nonmember_conf])[:, None]
    y = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    clf = SVC(C=3, kernel="rbf", gamma="auto").fit(x, y)
    return float(100.0 * np.mean(clf.predict(forget_conf[:, None]) == 0))


def loss_attack_accuracy(forget_loss: np.ndarray, test_loss: np.ndarray, seed: int) -> float:
    """Best single-threshold accuracy (percent) telling forget samples (low loss = member)
    from an equal-size random subset of the test set; 50 means indistinguishable."""
    rng = np.random.default_rng(seed)
    n = min(len(forget_loss), len(test_loss))
    a = rng.choice(forget_loss, n, replace=False)
    b = rng.choice(test_loss, n, replace=False)
    values = np.concatenate([a, b])
    is_forget = np.concatenate([np.ones(n), np.zeros(n)])
    order = np.argsort(values, kind="stable")
    # predict "forget" for the k lowest losses; accuracy for every k in one cumulative sum
    hits = np.cumsum(is_forget[order])
    k = np.arange(1, 2 * n + 1)
    acc = (hits + (n - (k - hits))) / (2 * n)
    return float(100.0 * max(acc[np.r_[np.diff(values[order]) != 0, True]].max(), 0.5))  # no cut inside ties


def mia_metrics(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, seed: int) -> dict[str, float]:
    """The faithful SVC MIA plus what makes its jumps visible.

    Members are a seeded random subset of the retain set of size |test| (SalUn takes the first
    |test|; a seeded subset avoids any ordering bias), non-members the test set."""
    rng = np.random.default_rng(seed)
    n = min(len(test_conf), len(retain_conf))
    draws = [rng.choice(len(retain_conf), n, replace=False) for _ in range(MIA_RESAMPLES)]
    scores = [svc_mia_efficacy(retain_conf[d], test_conf, forget_conf) for d in draws]
    members = retain_conf[draws[0]]
    return {
        "mia_efficacy": scores[0],
        "mia_efficacy_resample_min": float(min(scores)),
        "mia_efficacy_resample_max": float(max(scores)),
        "mia_member_saturated": float(100.0 * np.mean(members > SATURATED)),
        "mia_nonmember_saturated": float(100.0 * np.mean(test_conf > SATURATED)),
    }


def member_seed(split_hash: str) -> int:
    """The seed of a split's MIA member sample (and of the loss attack's test subset), derived
    from its hash alone: every model scored on one split meets the same members."""
    return int(hashlib.sha256(f"mia-members:{split_hash}".encode()).hexdigest()[:16], 16)


def flops_from_work(work: dict[str, int], forward_macs: int) -> dict[str, float]:
    """`flops` (the paper's convention, see the module docstring) and `flops_true` from a run's
    sample counts (MethodContext.work): work["trained"] samples went forward + backward once,
    work["views"] further views of those samples went forward + backward with them (the CL
    plug-in's second view), work["forward_only"] samples went forward alone.
    forward_macs = MACs of one forward of one sample. Per trained sample with v views:
    flops = v + 2 forward-equivalents, flops_true = 3 v."""
    fwd = 2 * forward_macs  # FLOPs = 2 x MACs
    trained, views, forward_only = work["trained"], work.get("views", 0), work["forward_only"]
    return {
        "flops": float(fwd * ((trained + views) + 2 * trained + forward_only)),
        "flops_true": float(fwd * (3 * (trained + views) + forward_only)),
    }


def evaluate(
    model: torch.nn.Module,
    retain: DeviceSplit,
    forget: DeviceSplit,
    test: DeviceSplit,
    augmenter: Augmenter,
    seed: int,
    with_mia: bool = True,
) -> dict[str, float]:
    """Accuracies (and, if asked, the MIA metrics) of a model on one scenario's three splits,
    in eval mode with the test-time transform (normalisation only). `seed` draws the MIA's
    members: pass member_seed(split_hash), so it is a property of the split, not of a run."""
    r_ok, r_conf, _ = predict(model, retain, augmenter)
    f_ok, f_conf, f_loss = predict(model, forget, augmenter)
    t_ok, t_conf, t_loss = predict(model, test, augmenter)
    out = {
        "retain_acc": float(100.0 * r_ok.mean()),
        "forget_acc": float(100.0 * f_ok.mean()),
        "test_acc": float(100.0 * t_ok.mean()),
    }
    out["unlearn_acc"] = 100.0 - out["forget_acc"]
    if with_mia:
        out.update(mia_metrics(r_conf, t_conf, f_conf, seed))
        out["mia_loss_attack_acc"] = loss_attack_accuracy(f_loss, t_loss, seed)
    return out


def gaps(metrics: dict[str, float], oracle: dict[str, float]) -> dict[str, float]:
    """The four absolute gaps to the oracle and their mean (the paper's "Avg. Gap"). A gap
    whose metric is missing (MIA on an epoch that skipped it) is left out, and so is avg_gap."""
    out = {g: abs(metrics[m] - oracle[m]) for g, m in GAP_OF.items() if m in metrics and m in oracle}
    if len(out) == len(GAP_OF):
        out["avg_gap"] = float(np.mean([out[g] for g in GAP_OF]))
    return out
