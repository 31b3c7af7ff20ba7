"""Plain-text tables for the terminal."""

from __future__ import annotations

import sys
from collections.abc import Sequence


class _CurrentStdout:
    """A default `out=` that writes to whatever sys.stdout is when it writes, not the stream
    that was sys.stdout when the function was defined (a default of sys.stdout is bound at
    import, and under a test's captured output that stream is closed afterwards)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


STDOUT = _CurrentStdout()

MAIN_ROWS = (
    "retain_acc",
    "forget_acc",
    "unlearn_acc",
    "test_acc",
    "mia_efficacy",
    "retain_gap",
    "forget_gap",
    "test_gap",
    "mia_gap",
    "avg_gap",
    "wall_seconds",
    "flops",
)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.2f}"
    return str(v)


def plus_minus(mean, std):
    """`mean +- std` (2 decimals) when the std over splits is known, else the mean as it is
    (fmt renders it; None as "-")."""
    if mean is None or std is None or std != std or std in (float("inf"), float("-inf")):
        return mean
    return f"{mean:.2f} +- {std:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def metrics_table(columns: dict[str, dict[str, float]], rows: Sequence[str] = MAIN_ROWS) -> str:
    """One row per metric, one column per model (original, oracle, unlearned)."""
    return table(["metric", *columns], [[m, *[col.get(m) for col in columns.values()]] for m in rows])
