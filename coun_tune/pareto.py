"""Pareto fronts, hypervolume and picks: pure numpy, no Ray, no MLflow.

Objectives come as `{metric: "min" | "max"}`; internally every objective is turned into one
to minimise (a "max" metric is negated), so "a dominates b" means a <= b everywhere and
a < b somewhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Reference points for the hypervolume, in the minimised space: a percent metric to maximise
# is bounded below by 0 (-> 0 after negation), a gap or percent metric to minimise by 100.
# pareto stays pure numpy (core.metrics imports torch), so these facts of the metric registry
# core.metrics.METRICS are restated here; tests/test_pareto.py checks that the two agree.
PERCENT_METRICS = {
    "retain_acc",
    "forget_acc",
    "unlearn_acc",
    "test_acc",
    "mia_efficacy",
    "mia_loss_attack_acc",
    "retain_gap",
    "forget_gap",
    "test_gap",
    "mia_gap",
    "avg_gap",
}
BETTER = {
    "retain_acc": "max",
    "test_acc": "max",
    "retain_gap": "min",
    "forget_gap": "min",
    "test_gap": "min",
    "mia_gap": "min",
    "avg_gap": "min",
    "wall_seconds": "min",
    "flops": "min",
}


def to_minimisation(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(n, m) raw metric values -> (n, m) values where smaller is better in every column."""
    sign = np.array([1.0 if m == "min" else -1.0 for m in modes])
    return np.asarray(values, dtype=float) * sign


def non_dominated_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(n,) bool: True for points no other point dominates. Duplicates of a front point are
    all on the front. Rows with NaN are never on it. O(n^2 m), fine for search-sized n.
    Values are rounded to 1e-9 first: metrics are percentages of counts, and two equal gaps
    computed along different float paths must tie, not dominate each other."""
    v = np.round(to_minimisation(values, modes), 9)
    n = len(v)
    ok = ~np.isnan(v).any(axis=1)
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        others = v[ok]
        dominated = np.any(np.all(others <= v[i], axis=1) & np.any(others < v[i], axis=1))
        mask[i] = not dominated
    return mask if n else np.zeros(0, dtype=bool)


def non_dominated_ranks(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(n,) int: 0 for the Pareto front, 1 for the front of what is left once it is removed,
    and so on (NSGA-II's non-dominated sorting, by repeated peeling). Rows with NaN get -1:
    they belong to no front. values: (n, m) raw metric values; modes: m of "min" | "max"."""
    v = np.asarray(values, dtype=float).reshape(len(values), -1) if len(values) else np.zeros((0, len(modes)))
    ranks = np.full(len(v), -1, dtype=int)
    left = np.flatnonzero(~np.isnan(v).any(axis=1))
    rank = 0
    while len(left):
        front = non_dominated_mask(v[left], modes)
        ranks[left[front]] = rank
        left = left[~front]
        rank += 1
    return ranks


def crowding_distance(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(n,) float: NSGA-II's crowding distance of each point within the given set (pass one
    front): per objective, the gap between its two neighbours in sorted order divided by the
    objective's range over the set, summed over objectives. The two extremes of any objective
    get +inf (always kept). An interior point's value is at most m (each term is <= 1).
    Direction does not matter (a distance), `modes` only fixes the column count and order.
    An objective with zero range contributes 0."""
    v = to_minimisation(values, modes) if len(values) else np.zeros((0, len(modes)))
    n, m = v.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(v[:, j], kind="stable")
        col = v[order, j]
        span = col[-1] - col[0]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    return dist


def reference_point(metrics: Sequence[str], modes: Sequence[str], values: np.ndarray) -> np.ndarray:
    """A reference point in the minimised space that every sensible point dominates: the
    percent scale's worst end for percent metrics, else 1.1 x the worst value seen."""
    v = to_minimisation(values, modes)
    ref = []
    for j, (m, mode) in enumerate(zip(metrics, modes)):
        if m in PERCENT_METRICS:
            ref.append(100.0 if mode == "min" else 0.0)
        else:
            worst = np.nanmax(v[:, j]) if len(v) else 1.0
            ref.append(worst + 0.1 * abs(worst) + 1e-12)
    return np.array(ref)


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume dominated by `points` (minimisation) up to `ref`, by slicing along the
    first objective (HSO). Points not strictly better than ref in every objective add nothing."""
    p = np.asarray(points, dtype=float)
    p = p[np.all(p < ref, axis=1)] if len(p) else p
    if len(p) == 0:
        return 0.0
    if p.shape[1] == 1:
        return float(ref[0] - p[:, 0].min())
    p = p[np.argsort(p[:, 0], kind="stable")]
    volume = 0.0
    for i in range(len(p)):
        upper = p[i + 1, 0] if i + 1 < len(p) else ref[0]
        width = upper - p[i, 0]
        if width > 0:
            volume += width * hypervolume(p[: i + 1, 1:], ref[1:])
    return float(volume)


def ideal_point(metrics: Sequence[str], modes: Sequence[str], values: np.ndarray) -> np.ndarray:
    """The best corner in the minimised space: the percent scale's best end for percent
    metrics (0 for a gap, -100 for an accuracy to maximise), else the best value seen."""
    v = to_minimisation(values, modes)
    return np.array(
        [
            (0.0 if mode == "min" else -100.0) if m in PERCENT_METRICS else (np.nanmin(v[:, j]) if len(v) else 0.0)
            for j, (m, mode) in enumerate(zip(metrics, modes))
        ]
    )


def normalised_hypervolume(points: np.ndarray, ref: np.ndarray, ideal: np.ndarray) -> float:
    """Hypervolume as a fraction of the box between `ideal` and `ref` (0..1; 1 = the ideal
    point itself was reached). Comparable across searches of one scenario's objectives."""
    box = float(np.prod(np.asarray(ref, dtype=float) - np.asarray(ideal, dtype=float)))
    return hypervolume(points, ref) / box if box > 0 else 0.0


def hypervolume_gain(points: np.ndarray, baseline: np.ndarray, ref: np.ndarray) -> float:
    """The hypervolume `points` add to what `baseline` alone dominates (all minimised, up to
    `ref`): HV(points + baseline) - HV(baseline), the region the points dominate and the
    baseline does not. With the untouched original as the baseline this is the improvement
    over doing nothing. (Taking the original itself as the reference point would count only
    points that beat it in every objective: the original's retain_acc is the best there is, so
    every search would score 0.)"""
    p = np.asarray(points, dtype=float).reshape(-1, len(ref))
    b = np.asarray(baseline, dtype=float).reshape(1, len(ref))
    return hypervolume(np.vstack([p, b]), ref) - hypervolume(b, ref)


def normalised_hypervolume_gain(points: np.ndarray, baseline: np.ndarray, ref: np.ndarray, ideal: np.ndarray) -> float:
    """hypervolume_gain as a fraction of what the baseline leaves to gain in the box between
    `ideal` and `ref` (0: no better than the baseline; 1: the ideal point reached)."""
    box = float(np.prod(np.asarray(ref, dtype=float) - np.asarray(ideal, dtype=float)))
    left = box - hypervolume(np.asarray(baseline, dtype=float).reshape(1, len(ref)), ref)
    return hypervolume_gain(points, baseline, ref) / left if left > 0 else 0.0


def knee_index(values: np.ndarray, modes: Sequence[str]) -> int:
    """Index (into `values`, which should be the front) of the point closest to the ideal
    point after min-max scaling each objective over the front: a balanced compromise.
    Equally close points (a two-point front is always a tie: both at distance 1) are told apart
    by the objectives in their order (the first objective's better value wins), never by row
    order, which follows the trials' start order and so differs between runs of one search."""
    v = to_minimisation(values, modes)
    lo, hi = v.min(axis=0), v.max(axis=0)
    scaled = (v - lo) / np.where(hi > lo, hi - lo, 1.0)
    dist = np.linalg.norm(scaled, axis=1)
    tied = np.flatnonzero(dist <= dist.min() + 1e-12)
    best = np.lexsort(v[tied].T[::-1])[0]  # lexsort's primary key is its last: the first objective
    return int(tied[best])


_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*(-?[0-9.eE+-]+)\s*$")


def parse_pick(pick: str) -> tuple[str, str | None, str | None, float | None]:
    """`knee` | `best:METRIC` | `METRIC>=X` (also <=, >, <). Returns (kind, metric, op, value)."""
    from coun_tune.errors import UsageError

    if pick == "knee":
        return "knee", None, None, None
    if pick.startswith("best:") and len(pick) > 5:
        return "best", pick[5:], None, None
    m = _CONSTRAINT.match(pick)
    if m:
        return "constraint", m.group(1), m.group(2), float(m.group(3))
    raise UsageError(f"bad --pick {pick!r}; use knee, best:METRIC or a constraint such as retain_acc>=99")


def pick_index(rows: list[dict], objectives: dict[str, str], pick: str) -> int:
    """Choose one row (a trial's final metrics) from the Pareto front by `pick`:
    knee: the knee of the front; best:M: the front's best M (by its objective's mode, or
    "min" for gaps); a constraint: the knee of the front points that satisfy it."""
    from coun_tune.errors import UsageError

    kind, metric, op, value = parse_pick(pick)
    names, modes = list(objectives), list(objectives.values())
    values = np.array([[r.get(k, np.nan) for k in names] for r in rows], dtype=float)
    front = np.flatnonzero(non_dominated_mask(values, modes))
    if len(front) == 0:
        raise UsageError("no completed trial with all objectives: nothing to pick from")
    if kind == "knee":
        return int(front[knee_index(values[front], modes)])
    if any(metric not in rows[i] for i in front):
        raise UsageError(f"metric {metric!r} is not logged by the trials")
    col = np.array([rows[i][metric] for i in front], dtype=float)
    if kind == "best":
        mode = objectives.get(metric) or BETTER.get(metric)
        if mode is None:
            raise UsageError(
                f"best:{metric}: {metric} has no better direction (it should match the oracle's); "
                "pick by its gap or by a constraint instead"
            )
        return int(front[np.nanargmin(col) if mode == "min" else np.nanargmax(col)])
    ok = {">=": col >= value, "<=": col <= value, ">": col > value, "<": col < value}[op]
    if not ok.any():
        raise UsageError(
            f"no Pareto trial satisfies {pick} (range on the front: {np.nanmin(col):.2f}..{np.nanmax(col):.2f})"
        )
    sub = front[ok]
    return int(sub[knee_index(values[sub], modes)])
