"""Calibration over several forget sets and the hold-out check: pure numpy, no Ray, no MLflow.

Why: a config tuned on one forget set (and one oracle seed) fits that set's noise. On the
README's main job, Spearman's rho of forget_gap between one calibration split and the mean
over three unseen ones was 0.54 (issue 14), so a trial is scored on several splits and the
objective it reports is their mean; the front it builds is then re-measured on hold-out splits
no trial was scored on, and picks are made on those.

Names (one per concept, the same in reports, MLflow, parquet and docs):
    <metric>               the mean over the calibration splits (what the sampler, mo_asha,
                           the front and export read, unchanged)
    <metric>_std           the sample standard deviation over the calibration splits (ddof 1)
    <metric>_split<seed>   the value on calibration split <seed>
    holdout_<metric>_mean  the mean over the hold-out splits of a front config
    holdout_<metric>_std   their sample standard deviation
    holdout_flag           1 when the hold-out mean lies outside the calibration mean's band
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

SPLIT_METRIC = re.compile(r"^(?P<metric>[a-z_]+?)_(?:std|split\d+)$")
HOLDOUT_METRIC = re.compile(r"^holdout_(?P<metric>[a-z_]+?)_(?:mean|std)$")
# the oracle-noise gap that measures each objective's noise floor (core.metrics.GAP_OF's gaps)
NOISE_OF = {
    "forget_gap": "forget_gap",
    "forget_acc": "forget_gap",
    "retain_acc": "retain_gap",
    "retain_gap": "retain_gap",
    "test_acc": "test_gap",
    "test_gap": "test_gap",
    "mia_efficacy": "mia_gap",
    "mia_gap": "mia_gap",
    "avg_gap": "avg_gap",
}


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (ddof 1); NaN for fewer than two values."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) >= 2 else math.nan


def summarise_splits(per_split: Mapping[int, Mapping[str, float]], detail: Sequence[str]) -> dict[str, float]:
    """One report from the metrics of one epoch on each calibration split.

    per_split: {split seed: {metric: value}} (the same epoch on every split). Every metric that
    all splits hold is averaged under its own name; for each metric in `detail` that all hold,
    `<metric>_std` (sample std) and `<metric>_split<seed>` are added when there are two or more
    splits (one split: the report is that split's metrics, as without calibration)."""
    seeds = list(per_split)
    if not seeds:
        raise ValueError("no split to summarise")
    if len(seeds) == 1:
        return dict(per_split[seeds[0]])
    common = set.intersection(*(set(m) for m in per_split.values()))
    out = {k: float(np.mean([per_split[s][k] for s in seeds])) for k in sorted(common)}
    for k in detail:
        if k not in common:
            continue
        values = [float(per_split[s][k]) for s in seeds]
        out[f"{k}_std"] = sample_std(values)
        out.update({f"{k}_split{s}": v for s, v in zip(seeds, values)})
    return out


def is_split_metric(key: str) -> bool:
    """True for the per-split and hold-out names above (what a trial's MLflow run logs besides
    core.metrics.METRICS)."""
    return bool(SPLIT_METRIC.match(key) or HOLDOUT_METRIC.match(key))


def holdout_band(cal_std: float, n_cal: int, hold_std: float, n_hold: int, noise: float = 0.0) -> float:
    """Half-width of the band a hold-out mean should fall in around its calibration mean:
    2 standard errors of the difference of the two means, sqrt(s_c^2 / n_c + s_h^2 / n_h), plus
    the oracle's own seed noise on that metric (0 when not measured). A mean over one split has
    no std; its term is left out (the band is then narrower than the truth: a flag is likelier)."""
    var = 0.0
    for s, n in ((cal_std, n_cal), (hold_std, n_hold)):
        if n >= 2 and math.isfinite(s):
            var += s * s / n
    return 2.0 * math.sqrt(var) + (noise if math.isfinite(noise) else 0.0)


def holdout_flag(cal_mean: float, cal_std: float, n_cal: int, hold_values: Sequence[float], noise: float = 0.0) -> bool:
    """True when the hold-out mean lies outside calibration mean +- holdout_band: the search's
    value for this config did not generalise to forget sets it never saw."""
    hold = np.asarray(hold_values, dtype=float)
    band = holdout_band(cal_std, n_cal, sample_std(hold), len(hold), noise)
    return bool(abs(float(hold.mean()) - cal_mean) > band)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
    constant side."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of one length")
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):  # ties share their average rank
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks
