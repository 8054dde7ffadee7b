"""Smoke run of benchmarks/bench_accuracy.py on tiny generated data (its --quick mode), so it does not rot.

Nothing is timed or compared here: the numbers of a 5 s budget on 120 random images mean nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.mark.slow  # ~60-90 s on a quiet 2-core machine, >300 s at load 13: two `bias-lab train` subprocesses + the textbook loop
def test_bench_accuracy_quick_prints_table_targets_and_offline_figure(tmp_path: Path) -> None:
    out = tmp_path / "acc.html"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_accuracy.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "| recipe | epochs | train s | test accuracy |" in text, text
    assert re.search(r"^\| textbook lenet \| \d+ \| \d+ \| [01]\.\d{3} \|", text, re.M), text
    assert re.search(r"^\| bias_lab lenet \| \d+ \| \d+ \| [01]\.\d{3} \|", text, re.M), text
    assert re.search(r"^TARGET bias_lab_best - textbook_best >= \+5 pts .* (PASS|FAIL)$", text, re.M), text
    assert re.search(
        r"^TARGET bias_lab >= 0\.75 test accuracy within 600 training s: .+ "
        r"(PASS|SKIP \(not reached at this budget; run --budget 600\))$",
        text,
        re.M,
    ), text
    assert "load average" in text
    page = out.read_text()
    assert "Plotly.newPlot(" in page
    assert '<script src="http' not in page and not re.search(r"<script[^>]*\bsrc=", page), (
        "the figure must render offline"
    )
