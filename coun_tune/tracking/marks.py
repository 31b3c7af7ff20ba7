"""The marks a review puts on trials: the knee (its run name and a warning when it is further
from the oracle than doing nothing) and an unstable MIA (a tag, and a line saying which avg_gap
values measure the attack rather than forgetting). Pure functions of the trial rows."""

from __future__ import annotations

from coun_tune.tracking import describe

KNEE_MARK = "★ knee · "  # run-name prefix of the knee's run (the runs table's name column)
# A trial's SVC MIA is "unstable" when the efficacy over MIA_RESAMPLES SVC fits on resampled
# members (core.metrics: mia_efficacy_resample_min/_max) spreads by more than this many points.
# Why 10: on near-perfect models the MIA is bistable (METHOD.md section 4); in the README's main
# job the stable trials spread by 0.1-2.3 points and the bistable ones by 57-83, so the cut is
# not delicate; and 10 points of mia_gap move avg_gap (the mean of four gaps) by 2.5, more than
# the whole range of avg_gap over the stable trials (1.35-1.60) and more than any gap between
# the knee and the untouched original: a difference that size is the attack's, not forgetting.
MIA_UNSTABLE_SPREAD = 10.0
MIA_UNSTABLE = "mia_unstable"  # trial tag: "true" | "false"


def knee_run_name(name: str, is_knee: bool) -> str:
    """The run name with the knee's marker added or removed (idempotent)."""
    bare = name[len(KNEE_MARK) :] if name.startswith(KNEE_MARK) else name
    return KNEE_MARK + bare if is_knee else bare


def mia_spread(row: dict) -> float | None:
    """max - min of the MIA efficacy over the resampled SVC fits, or None when not logged."""
    lo, hi = row.get("mia_efficacy_resample_min"), row.get("mia_efficacy_resample_max")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return None
    return float(hi) - float(lo)


def mia_unstable(row: dict) -> bool:
    spread = mia_spread(row)
    return spread is not None and spread > MIA_UNSTABLE_SPREAD


def mia_note(rows: list[dict]) -> str | None:
    """The description's line on trials whose avg_gap is driven by an unstable MIA: each with
    its avg_gap and the mean of its other three gaps (avg_gap without the MIA's term)."""
    parts = []
    for r in rows:
        if not mia_unstable(r) or not all(isinstance(r.get(k), (int, float)) for k in ("avg_gap", "mia_gap")):
            continue
        rest = (4 * r["avg_gap"] - r["mia_gap"]) / 3
        parts.append(
            f"trial {describe.trial_label(r)}: avg_gap {r['avg_gap']:.2f} ({rest:.2f} without mia_gap "
            f"{r['mia_gap']:.2f}; MIA spread {mia_spread(r):.1f})"
        )
    if not parts:
        return None
    return (
        f"**MIA unstable** (tag `{MIA_UNSTABLE}=true`: the SVC MIA's efficacy over the resampled fits spreads by "
        f"more than {MIA_UNSTABLE_SPREAD:g} points, so their mia_gap and avg_gap measure the attack, not forgetting): "
        + "; ".join(parts)
        + "."
    )


def knee_warning(knee_row: dict, original: dict) -> str | None:
    """A line when the knee is further from the oracle than doing nothing (its avg_gap or
    test_gap above the untouched original's, on the same forget sets), else None."""
    worse = [
        f"{k} {knee_row[k]:.2f} vs the original's {original[k]:.2f}"
        for k in ("avg_gap", "test_gap")
        if isinstance(knee_row.get(k), (int, float)) and isinstance(original.get(k), (int, float))
        if knee_row[k] > original[k]
    ]
    if not worse:
        return None
    return f"the knee is further from the oracle than the untouched original ({'; '.join(worse)})"
