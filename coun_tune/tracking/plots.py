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
) -> str:
    """Draws the first two objectives; writes the PNG to `path`, returns the figure as SVG.
    rows: the completed trials ({trial_id, metric: value}); mask: (len(rows),) bool front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r[names[0]] for r in rows], dtype=float)
    y = np.array([r[names[1]] for r in rows], dtype=float) if len(names) > 1 else np.zeros(len(rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
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
