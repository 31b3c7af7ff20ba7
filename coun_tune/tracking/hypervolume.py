"""The search's hypervolume as the improvement over doing nothing: the region the front
dominates and the untouched original does not (pareto.hypervolume_gain), and its history after
each completed trial. Pure functions of raw metric values."""

from __future__ import annotations

import numpy as np

from coun_tune import pareto


def hypervolume_over_original(
    front: np.ndarray, names: list[str], modes: list[str], original: dict, box_values: np.ndarray | None = None
) -> tuple[float, float, dict]:
    """(normalised, raw, info) hypervolume of a front (raw metric values, (n, m)) as the
    improvement over the untouched original (pareto.normalised_hypervolume_gain: the region
    the front dominates and doing nothing does not, as a share of what doing nothing leaves to
    gain in the box from the ideal point to the percent scale's worst end; a metric with no
    percent scale is bounded by `box_values`, default the front). Without the original's values
    (an older search): the plain share of the box, `info["original"]` None."""
    front = np.asarray(front, dtype=float).reshape(-1, len(names))
    box = front if box_values is None else np.asarray(box_values, dtype=float).reshape(-1, len(names))
    ref = pareto.reference_point(names, modes, box)
    ideal = pareto.ideal_point(names, modes, box)
    front_min = pareto.to_minimisation(front, modes)
    sign = np.array([1.0 if m == "min" else -1.0 for m in modes])  # back from the minimised space
    has_original = all(isinstance(original.get(k), (int, float)) for k in names)
    if has_original:
        base = pareto.to_minimisation(np.array([[original[k] for k in names]], dtype=float), modes)[0]
        raw = pareto.hypervolume_gain(front_min, base, ref)
        hv = pareto.normalised_hypervolume_gain(front_min, base, ref, ideal)
    else:
        raw = pareto.hypervolume(front_min, ref)
        hv = pareto.normalised_hypervolume(front_min, ref, ideal)
    info = {
        "normalised": hv,
        "raw": raw,
        "original": {k: float(original[k]) for k in names} if has_original else None,
        "reference": {k: float(v) + 0.0 for k, v in zip(names, (ref * sign).tolist())},
        "ideal": {k: float(v) + 0.0 for k, v in zip(names, (ideal * sign).tolist())},
    }
    return hv, raw, info


def hypervolume_history(
    rows: list[dict], names: list[str], modes: list[str], original: dict
) -> list[tuple[int, float]]:
    """[(end time ms, normalised hypervolume over the original)] after each completed trial, in
    order of completion: the front of the first k trials' (calibration) values, k = 1..n."""
    done = sorted(rows, key=lambda r: (r.get("end_time") or 0, int(r.get("trial_number") or 0)))
    every = np.array([[r[n] for n in names] for r in done], dtype=float)  # one box for every step
    out = []
    for k in range(1, len(done) + 1):
        v = np.array([[r[n] for n in names] for r in done[:k]], dtype=float)
        front = v[pareto.non_dominated_mask(v, modes)]
        out.append(
            (int(done[k - 1].get("end_time") or 0), hypervolume_over_original(front, names, modes, original, every)[0])
        )
    return out
