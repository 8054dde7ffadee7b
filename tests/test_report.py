"""`bias-lab report` reads the tracking store and writes one self-contained HTML (+ markdown)."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import FAST, invoke


def test_report_from_tracked_runs(kaggle_data: Path, tmp_path: Path) -> None:
    assert invoke("train", "--data", str(kaggle_data), *FAST, "--width", "2", "--label-smoothing", "0.1")[0] == 0
    code, out = invoke("report", "--output", str(tmp_path / "out" / "report.html"))
    assert code == 0, out
    page = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    assert (
        len(re.findall(r"\* plotly\.js v\d", page)) == 1 and "Plotly.newPlot" in page
    )  # embedded once, figures rebuilt
    assert not re.search(r"<script[^>]*\bsrc=", page), "the report loads a script from elsewhere: blank offline"
    assert "learning curves" in page and "confusion matrix" in page
    assert "test_accuracy" in md and "MACs per image" in md  # metrics and the layer table
    assert not list((tmp_path / "out").glob(".*.tmp"))
    # the recipe beyond the key params, and nothing left at its default (ema=0.0, tta=True, ...)
    assert "**Changed from the defaults:** `label_smoothing=0.1`, `width=2`\n" in md + "\n"
    assert "<strong>Changed from the defaults:</strong> <code>label_smoothing=0.1</code>" in page  # markdown rendered
    assert '<td style="text-align:right">' in page, "the layer table's numbers are not right-aligned"


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    code, out = invoke("report", "--run-ids", "0123456789abcdef", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "is not in the tracking store" in out and len(out.strip().splitlines()) == 1
    code, out = invoke("report", "--experiment", "nope", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "experiment 'nope'" in out
    assert not (tmp_path / "r.html").exists()
