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

from .conftest import FAST, all_runs, invoke

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
    assert "| true \\ predicted | 1 (disc) | 2 (cross) | 3 (triangle) | 4 (square) |" in md


@pytest.mark.slow
def test_report_opens_on_the_champion_and_the_verdicts(
    kaggle_data: Path, tmp_path: Path, client: mlflow.MlflowClient
) -> None:
    """tune registers the champion and bias_eval gives verdicts: the summary says both first, with their numbers."""
    code, out = invoke("tune", "--data", str(kaggle_data), *FAST, "--n-trials", "2")
    assert code == 0, out
    code, out = invoke("bias-eval", "--data", str(kaggle_data), *TINY_BIAS, "--classes", "1,2")
    assert code == 0, out
    code, out = invoke("report", "--output", str(tmp_path / "report.html"))
    assert code == 0, out
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    runs = {r.info.run_name: r for r in all_runs(client)}
    final, parent = runs["final-lenet"].data, runs["bias_eval-lenet-1v2"]
    assert _sections(md)[0] == "Summary" and page.index("<h2>Summary</h2>") < page.index("<h2>tune-lenet")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    acc, n = final.metrics["test_accuracy"], int(final.metrics["n_test"])
    lo, hi = metrics.wilson(round(acc * n), n)  # multiclass: no CI metric logged, the report computes Wilson's
    mv = client.get_model_version_by_alias("bias-lab", "champion")
    assert (
        f"**Champion:** bias-lab v{mv.version} — test accuracy {100 * acc:.1f}% "
        f"[95% CI {100 * lo:.1f}–{100 * hi:.1f}%] on {n} test images, val accuracy "
        f"{100 * float(mv.tags['val_accuracy']):.1f}%"
    ) in summary, summary
    assert f"digest {mv.tags['data_digest']}" in summary and "synthetic" not in summary  # kaggle_data: a folder
    assert f"from tune run tune-lenet trial {mv.tags['optuna_trial']}" in summary
    assert "classes 1 (disc) vs 2 (cross), p0=0, p1=1" in summary, summary
    tags, m = parent.data.tags, parent.data.metrics
    for k in (1, 2):
        row = (
            f"| model_{k} | {tags[f'model_{k}_verdict']} | {100 * m[f'model_{k}_test_accuracy']:.1f}% | "
            f"{100 * m[f'model_{k}_decorrelated_test_accuracy']:.1f}% |"
        )
        assert row in summary, (row, summary)
    conclusion = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/conclusion.md")
    [short] = [line[2:] for line in conclusion.splitlines() if line.startswith("- In short:")]
    assert short in summary
    assert "Bias study" in page[: page.index("<h2>tune-lenet")] and "<table>" in page[: page.index("<h2>tune-lenet")]
    # system metrics: one table at the end, none in the per-run metric tables
    assert _sections(md)[-1] == "System metrics" and md.count("system/") == 0, _sections(md)
    system = md.split("## System metrics")[1]
    assert "| tune-lenet |" in system and "CPU %" in system


def _finished_run(client: mlflow.MlflowClient) -> None:
    """A finished train run, made through the client: something for the report to read, in seconds."""
    exp = client.create_experiment("bias-lab")
    run = client.create_run(exp, tags={"entry_point": "train"}, run_name="train-lenet")
    client.log_metric(run.info.run_id, "test_accuracy", 0.5)
    client.set_terminated(run.info.run_id)


def test_report_errors_are_one_line(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    code, out = invoke("report", "--run-ids", "0123456789abcdef", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "is not in the tracking store" in out and len(out.strip().splitlines()) == 1
    code, out = invoke("report", "--experiment", "nope", "--output", str(tmp_path / "r.html"))
    assert code == 2 and "experiment 'nope'" in out
    assert not (tmp_path / "r.html").exists()
    assert client.get_experiment_by_name("nope") is None, "the report created the experiment it did not find"


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
