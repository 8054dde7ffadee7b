"""`bias-lab report` reads the tracking store and writes one self-contained HTML (+ markdown) that opens on the
answer: the champion, each bias study's verdicts, each trained model's test accuracy; then the per-run details."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from bias_lab import metrics

from .conftest import FAST, invoke

TINY_BIAS = ["--image-size", "32", "--model", "lenet", "--epochs", "1", "--batch-size", "16", "--bootstrap", "200"]


def _sections(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, re.M)


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
    # the answer first: a summary before the run's own section, in both files
    assert _sections(md)[:2] == ["Summary", "train-lenet (train)"], _sections(md)
    assert page.index("<h2>Summary</h2>") < page.index("<h2>train-lenet (train)</h2>")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "no model is registered as `bias-lab@champion`" in summary, summary
    assert re.search(r"train-lenet\*\* \(train\): lenet, test accuracy \d+\.\d% \[95% CI \d", summary), summary
    # empty params ('' or "''", e.g. classes) are left out of the parameter tables
    assert not re.search(r"^\| \w+ \| *(''|\"\")? *\|$", md, re.M)
    # the confusion matrix says the class names (kaggle_data's classes.csv: 1 disc, 2 cross, ...)
    assert "true 1 (disc)" in page and "predicted 4 (square)" in page
    assert "| true / predicted | 1 (disc) | 2 (cross) | 3 (triangle) | 4 (square) |" in md


def _finished_run(client: mlflow.MlflowClient) -> None:
    """A finished train run, made through the client: something for the report to read, in seconds."""
    exp = client.create_experiment("bias-lab")
    run = client.create_run(exp, tags={"entry_point": "train"}, run_name="train-lenet")
    client.log_metric(run.info.run_id, "test_accuracy", 0.5)
    client.set_terminated(run.info.run_id)


def test_report_errors_are_one_line(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    code, out = invoke("report", "--experiment", "nope", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "experiment 'nope'" in out and len(out.strip().splitlines()) == 1
    assert client.get_experiment_by_name("nope") is None, "the report created the experiment it did not find"
    code, out = invoke("report", "--run-ids", "0123456789abcdef", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "is not in the tracking store" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    assert {e.name for e in client.search_experiments()} == {"Default"}, "a report only reads the store"


def _one_line_and_nothing_written(code: int, out: str, folder: Path, before: set[Path], *words: str) -> None:
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1, out
    assert all(w in out for w in words), out
    assert set(folder.rglob("*")) == before, "the report wrote something before refusing"


def test_report_refuses_to_write_html_over_its_markdown_twin(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    _finished_run(client)
    before = set(tmp_path.rglob("*"))
    code, out = invoke("report", "--output", str(tmp_path / "report.md"))
    _one_line_and_nothing_written(code, out, tmp_path, before, "--output", "report.html", "markdown twin")


def test_report_to_a_folder_is_one_line(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    _finished_run(client)
    (tmp_path / "out.html").mkdir()
    (tmp_path / "file").write_text("x")
    before = set(tmp_path.rglob("*"))
    code, out = invoke("report", "--output", str(tmp_path / "out.html"))
    _one_line_and_nothing_written(code, out, tmp_path, before, "is a folder")
    code, out = invoke("report", "--output", str(tmp_path / "file" / "report.html"))
    _one_line_and_nothing_written(code, out, tmp_path, before, "is a file, not a folder")
    code, out = invoke("report", "--output", str(tmp_path / "file" / "deeper" / "report.html"))
    _one_line_and_nothing_written(code, out, tmp_path, before, "is a file, not a folder")


def test_report_to_an_unwritable_folder_is_one_line(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    _finished_run(client)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    before = set(tmp_path.rglob("*"))
    args = ["report", "--output", str(locked / "sub" / "report.html")]
    try:
        if os.geteuid() != 0:
            code, out = invoke(*args)
        else:  # root writes anywhere: drop the capability that lets it (the folder's mode then applies)
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: no folder is unwritable")
            p = subprocess.run(
                [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", sys.executable, "-m"]
                + ["bias_lab.cli", *args],
                capture_output=True,
                text=True,
                timeout=300,
            )
            code, out = p.returncode, p.stderr
    finally:
        locked.chmod(0o755)
    _one_line_and_nothing_written(code, out, tmp_path, before, "cannot write", str(locked))


def test_report_without_a_store_creates_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report reads a store: pointed at a sqlite file that is not there, it says so instead of creating one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'none.db'}")
    code, out = invoke("report", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "no tracking store at" in out and out.count("\n") == 1, out
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "r.md").exists()


def test_summary_gives_an_interval_for_a_run_that_logged_none(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    """A run that logged test_accuracy and n_test but no interval (an older run): the summary computes Wilson's."""
    exp = client.create_experiment("bias-lab")
    run = client.create_run(exp, tags={"entry_point": "train"}, run_name="train-old")
    client.log_param(run.info.run_id, "model", "lenet")
    for key, value in (("test_accuracy", 0.8), ("n_test", 50), ("system/cpu_utilization_percentage", 40.0)):
        client.log_metric(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "system/cpu_utilization_percentage", 60.0, step=1)
    client.set_terminated(run.info.run_id)
    code, out = invoke("report", "--output", str(tmp_path / "r.html"))
    assert code == 0, out
    md = (tmp_path / "r.md").read_text()
    lo, hi = metrics.wilson(40, 50)
    assert (
        f"**train-old** (train): lenet, test accuracy 80.0% [95% CI {100 * lo:.1f}–{100 * hi:.1f}%] on 50 test images."
        in md
    )
    assert "| train-old (train) | 50 |" in md.split("## System metrics")[1]  # the mean of its two samples
