"""Markdown tables and number formats shared by every text bias_lab writes (comparison.md, conclusion.md,
sweep.md, model_summary.md, the report, the run descriptions shown in the MLflow UI).

One writer so that every table escapes its cells: a `|` inside a header such as `P(ŷ=1|S=0)` would otherwise
split the cell and misalign the whole table.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def fmt(x: Any, pct: bool = False) -> str:
    """A number as a person reads it: 3 significant digits (or a percentage), `n/a` for NaN, `inf` for ±inf."""
    if isinstance(x, str):
        return x
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"  # 5,910 images/s, not 5.91e+03


def cell(value: Any) -> str:
    """One table cell: numbers formatted, `|` escaped, line breaks flattened."""
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(head: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; every row has exactly len(head) cells. `align`: '', 'l', 'r' per column."""
    marks = {"": "---", "l": ":---", "r": "---:"}
    lines = [
        "| " + " | ".join(cell(h) for h in head) + " |",
        "|" + "|".join(marks[a] for a in (align or [""] * len(head))) + "|",
    ]
    for r in rows:
        r = list(r)
        if len(r) != len(head):
            raise ValueError(f"table row has {len(r)} cells for {len(head)} columns: {r}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)
