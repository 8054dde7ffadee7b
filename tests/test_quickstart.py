"""The README's Quick start as a person runs it: `mlflow run . -e tune` in a fresh copy of the project (the
default ./mlflow.db store, no environment set up), then `bias-lab report` with no flags; and every markdown
table the project writes parses with the same number of cells in every row."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from bias_lab import markdown as md

from .conftest import REPO

README = (REPO / "README.md").read_text()
SMALL = ["-P", "n_trials=2", "-P", "epochs=2", "-P", "image_size=32"]  # the README's command, smaller


def quickstart_command() -> list[str]:
    """The `mlflow run` of the README's first Quick-start command, as written there."""
    block = README[README.index("## Quick start") :]
    line = next(l for l in block.splitlines() if "mlflow run . -e tune" in l)
    return line[line.index("mlflow run") :].split("#")[0].split()


def split_row(line: str) -> list[str]:
    """The cells of one markdown table row, honouring `\\|` escapes (the inverse of bias_lab.markdown.table)."""
    cells, cur, i, s = [], [], 0, line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "|\\":
            cur.append(s[i + 1])
            i += 2
            continue
        if s[i] == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(s[i])
        i += 1
    cells.append("".join(cur).strip())
    return cells


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`, as rows of cells."""
    out, cur = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            cur.append(split_row(line))
        elif cur:
            out.append(cur)
            cur = []
    return out


def assert_tables_well_formed(text: str, where: str) -> int:
    found = tables(text)
    for t in found:
        assert len(t) >= 2 and all(set(c) <= set("-: ") and c for c in t[1]), f"{where}: no separator row under {t[0]}"
        widths = {len(r) for r in t}
        assert widths == {len(t[0])}, f"{where}: rows of {sorted(widths)} cells in the table headed {t[0]}"
    return len(found)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the project's tracked files, after the README's tune and a short bias_eval ran in it."""
    root = tmp_path_factory.mktemp("clone") / "bias_lab"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the default store: ./mlflow.db
    env.update(
        BIAS_LAB_CACHE=str(root.parent / "cache"),
        TQDM_DISABLE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = quickstart_command()
    assert cmd[:5] == ["mlflow", "run", ".", "-e", "tune"] and "--experiment-name" in cmd, cmd
    for args in (cmd + SMALL, [*cmd[:4], "bias_eval", *cmd[5:], "-P", "epochs=3", "-P", "image_size=32"]):
        p = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "experiment 'bias-lab', run " in p.stderr and "mlflow ui" in p.stderr  # the last lines say where to look
    return root, env


def test_quickstart_runs_land_in_bias_lab_and_report_needs_no_flags(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bias-lab")
    assert (
        exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    )  # the UI opens its runs
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert {r.data.tags.get("entry_point") for r in runs} == {"tune", "bias_eval"}
    assert not client.search_runs(["0"]), "runs landed in the Default experiment"
    p = subprocess.run(["bias-lab", "report"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    page, text = (root / "report.html").read_text(), (root / "report.md").read_text()
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1 and not re.search(r"<script[^>]*\bsrc=", page)
    assert "optimization history" in page and "comparison" in page and "**Optuna trials** (2;" in text
    tune_section = text.split("## tune-lenet")[1].split("## final")[0]
    assert (
        "0 days" not in text and "\n| lr |" not in tune_section and "\n| best_lr |" in tune_section
    )  # tune used no single lr
    # `mlflow run` logs every -P as text ('10', "''", 'False'): none of that reads as a change from the defaults
    assert "Changed from the defaults" not in text, text[text.find("Changed from") - 500 :][:1000]
    assert assert_tables_well_formed(text, "report.md") >= 8
    _report_opens_on_the_champion_and_the_verdicts(client, text, page)


def _report_opens_on_the_champion_and_the_verdicts(client: mlflow.MlflowClient, md: str, page: str) -> None:
    """The summary comes first and says what the store holds: the champion with its numbers, each study's
    verdicts and its one-sentence conclusion."""
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections[0] == "Summary" and page.index("<h2>Summary</h2>") < page.index("<h2>tune-lenet")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    mv = client.get_model_version_by_alias("bias-lab", "champion")
    final = client.get_run(mv.tags["final_run_id"]).data.metrics
    acc, n = final["test_accuracy"], int(final["n_test"])
    lo, hi = final["test_accuracy_ci_low"], final["test_accuracy_ci_high"]
    assert (
        f"**Champion:** bias-lab v{mv.version} — test accuracy {100 * acc:.1f}% "
        f"[95% CI {100 * lo:.1f}–{100 * hi:.1f}%] on {n} test images (4 classes: chance is 25%)"
    ) in summary, summary
    assert f"digest {mv.tags['data_digest']}" in summary and "synthetic" in summary
    assert f"trial {mv.tags['optuna_trial']}" in summary
    exp = client.get_experiment_by_name("bias-lab").experiment_id
    [parent] = [
        r
        for r in client.search_runs([exp])
        if r.data.tags.get("entry_point") == "bias_eval" and "mlflow.parentRunId" not in r.data.tags
    ]
    tags, m = parent.data.tags, parent.data.metrics
    for k in (1, 2):
        row = (
            f"| model_{k} | {tags[f'model_{k}_verdict']} | {100 * m[f'model_{k}_test_accuracy']:.1f}% | "
            f"{100 * m[f'model_{k}_decorrelated_test_accuracy']:.1f}% |"
        )
        assert row in summary, (row, summary)
    conclusion = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/conclusion.md")
    [short] = [line[2:] for line in conclusion.splitlines() if line.startswith("- In short:")]
    assert short in summary
    assert md.count("system/") == 0  # system metrics, when sampled, are in one table at the end, not per run


def test_report_finds_runs_made_without_an_experiment_name(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """`mlflow run` without --experiment-name puts runs in Default: the report still finds them, and says so."""
    root, env = project
    store = tmp_path / "mlflow.db"
    shutil.copy(root / "mlflow.db", store)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("bias-lab")
    client.rename_experiment(exp.experiment_id, "elsewhere")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    p = subprocess.run(
        ["bias-lab", "report", "--output", str(tmp_path / "r.html")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "reading the latest runs of 'elsewhere'" in p.stderr, p.stderr
    p = subprocess.run(
        ["bias-lab", "report", "--experiment", "bias-lab", "--output", str(tmp_path / "s.html")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "experiment 'bias-lab' is not in" in p.stderr  # a named experiment is read as named


def test_every_markdown_table_parses(project: tuple[Path, dict[str, str]]) -> None:
    """Tables the runs wrote (comparison, conclusion, layer tables, run descriptions): equal cells in every row."""
    root, _ = project
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bias-lab")
    n = 0
    for r in client.search_runs([exp.experiment_id], max_results=100):
        if "mlflow.note.content" in r.data.tags:
            n += assert_tables_well_formed(r.data.tags["mlflow.note.content"], f"{r.info.run_name} description")
        for name in ("comparison.md", "conclusion.md", "model_summary.md"):
            if name in {a.path for a in client.list_artifacts(r.info.run_id)}:
                n += assert_tables_well_formed(Path(client.download_artifacts(r.info.run_id, name)).read_text(), name)
    assert n >= 6


def test_a_pipe_in_a_header_is_escaped() -> None:
    text = md.table(["P(ŷ=1|S=0)", "b"], [["x|y", 1.5]])
    assert [len(r) for r in tables(text)[0]] == [2, 2, 2] and tables(text)[0][2] == ["x|y", "1.5"]


def test_a_description_longer_than_mlflow_keeps_is_cut_with_a_pointer(client: mlflow.MlflowClient) -> None:
    """MLflow refuses a tag over 8,000 characters: a long conclusion must not fail the run, only be cut."""
    from bias_lab import tracking

    with mlflow.start_run() as run:
        tracking.set_description("\n".join(f"- line {i}: " + "x" * 60 for i in range(300)), "conclusion.md")
    note = client.get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.endswith("all of it is in `conclusion.md`)") and "- line 100: " in note


def test_a_run_whose_figures_cannot_be_written_ends_failed_not_running(
    client: mlflow.MlflowClient, monkeypatch
) -> None:
    import plotly.graph_objects as go

    from bias_lab import tracking

    def full_disk(run_id: str) -> None:
        tracking._figures.pop(run_id, None)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "_write_figures", full_disk)
    try:
        with tracking.run("figures") as run:
            tracking.log_figure(go.Figure(), "empty")
    except OSError:
        pass
    assert client.get_run(run.info.run_id).info.status == "FAILED"
