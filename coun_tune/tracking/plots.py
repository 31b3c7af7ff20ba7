"""The Pareto plot of a search (PNG for MLflow's image viewer, the same figure as inline SVG in a
self-contained HTML page with the front's table): every completed trial labelled by its
number, the front joined in order, each axis marked with its better direction, and the
original and the oracle drawn as reference points."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coun_tune.tracking.describe import COLORS, trial_label

_BETTER_AXIS = {"min": "(better: lower ←)", "max": "(better: higher ↑)"}


def pareto_figure(
    rows: list[dict],
    names: Sequence[str],
    modes: Sequence[str],
    mask: np.ndarray,
    baselines: dict[str, dict],
    path: Path,
    title: str,
    knee: int | None = None,
    noise: dict[str, float] | None = None,
) -> str:
    """Draws the first two objectives; writes the PNG to `path`, returns the figure as SVG.
    rows: the completed trials ({trial_id, metric: value}); mask: (len(rows),) bool front.
    Error bars: `<metric>_std` (the std over calibration or hold-out splits) where rows have it;
    a row with `calibration_<metric>` (a hold-out view) also gets a hollow marker at its
    calibration value, joined to its hold-out point. knee: the row index marked as the knee.
    noise: oracle_noise_<gap> (base_models.json); a gap objective's band [0, noise] is shaded:
    a gap inside it is as close to the oracle as another retraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r[names[0]] for r in rows], dtype=float)
    y = np.array([r[names[1]] for r in rows], dtype=float) if len(names) > 1 else np.zeros(len(rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    xs = np.array([r.get(f"{names[0]}_std", np.nan) for r in rows], dtype=float)
    ys = np.array([r.get(f"{names[1]}_std", np.nan) for r in rows], dtype=float) if len(names) > 1 else xs * np.nan
    if np.isfinite(xs).any() or np.isfinite(ys).any():
        ax.errorbar(
            x, y, xerr=np.nan_to_num(xs), yerr=np.nan_to_num(ys), fmt="none", ecolor="0.6", lw=0.8, zorder=1,
            label="± std over splits",
        )  # fmt: skip
    cx = np.array([r.get(f"calibration_{names[0]}", np.nan) for r in rows], dtype=float)
    cy = np.array([r.get(f"calibration_{names[1]}", np.nan) for r in rows], dtype=float) if len(names) > 1 else cx
    has_cal = np.isfinite(cx) & np.isfinite(cy)
    if has_cal.any():
        for xi, yi, ci, di in zip(x[has_cal], y[has_cal], cx[has_cal], cy[has_cal]):
            ax.plot([ci, xi], [di, yi], ls=":", lw=0.8, c="0.5", zorder=1)
        ax.scatter(
            cx[has_cal], cy[has_cal], s=30, facecolors="none", edgecolors="0.4", label="calibration value", zorder=2
        )
    gap = {"forget_gap", "retain_gap", "test_gap", "mia_gap", "avg_gap"}
    band = (noise or {}).get(f"oracle_noise_{names[0]}") if names[0] in gap else None
    if band:
        ax.axvspan(0, band, color=COLORS["oracle"], alpha=0.12, label=f"oracle seed noise ({names[0]} ≤ {band:.2f})")
    if knee is not None and 0 <= knee < len(rows):
        ax.scatter([x[knee]], [y[knee]], s=220, facecolors="none", edgecolors="black", lw=1.5, label="knee", zorder=5)
    ax.scatter(x[~mask], y[~mask], s=28, c=COLORS["dominated"], label="dominated trial", zorder=2)
    order = np.argsort(x[mask], kind="stable")
    ax.plot(x[mask][order], y[mask][order], "o-", ms=6, c=COLORS["pareto"], label="Pareto front", zorder=3)
    labels: dict[tuple[float, float], tuple[list[str], bool]] = {}  # trials on one point share a label
    for r, xi, yi, on in zip(rows, x, y, mask):
        names_here, front_here = labels.setdefault((round(xi, 9), round(yi, 9)), ([], False))
        labels[(round(xi, 9), round(yi, 9))] = ([*names_here, trial_label(r)], front_here or bool(on))
    for (xi, yi), (names_here, on) in labels.items():
        ax.annotate(
            ", ".join(names_here),
            (xi, yi),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
            color=COLORS["pareto"] if on else "0.35",
        )
    for label, marker in (("original", "s"), ("oracle", "*")):
        b = baselines.get(label)
        if b is None or any(not isinstance(b.get(n), (int, float)) for n in names[:2]):
            continue
        bx, by = float(b[names[0]]), float(b[names[1]]) if len(names) > 1 else 0.0
        ax.scatter(
            [bx],
            [by],
            marker=marker,
            s=120 if marker == "*" else 60,
            c=COLORS[label],
            edgecolors="black",
            linewidths=0.6,
            label=f"{label} (reference)",
            zorder=4,
        )
        ax.annotate(label, (bx, by), textcoords="offset points", xytext=(6, -10), fontsize=8, color=COLORS[label])
    ax.set_xlabel(f"{names[0]} {_BETTER_AXIS[modes[0]]}")
    if len(names) > 1:
        ax.set_ylabel(f"{names[1]} {_BETTER_AXIS[modes[1]]}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    return svg.getvalue()


def pareto_page(svg: str, headers: list[str], rows: list[list], title: str, note: str = "") -> str:
    """A self-contained page (no scripts, no network): the plot and the front's table."""

    def cell(v):
        return html.escape("–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head>"
        f"<body><h2>{html.escape(title)}</h2>{svg[svg.find('<svg') :]}<p>{html.escape(note)}</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>"
    )
