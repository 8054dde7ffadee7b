"""`bias-lab report`: the document the course asks for, generated from what the tracking store holds.

Reads runs (by default the latest top-level train, tune and bias_eval runs of the experiment; or the given run
ids) and writes one self-contained HTML file (plotly.js embedded once, opens offline) plus a markdown twin:
per run its key params and metrics, the layer table of each model, the tuning trials, the bias comparison and
its generated conclusion, explanations, and every figure the run logged (rebuilt from the figures' JSON).
"""

from __future__ import annotations

import html
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import plotly.io as pio
from markdown_it import MarkdownIt
from mlflow import MlflowClient
from mlflow.entities import Run

from bias_lab import config, tracking
from bias_lab import markdown as md
from bias_lab.config import ReportConfig
from bias_lab.data import atomic_write
from bias_lab.errors import UserError, check

ENTRY_POINTS = ("train", "tune", "bias_eval", "bias_sweep")
KEY_PARAMS = (
    "data_source",
    "data_digest",
    "model",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "seed",
    "crop_scale",
    "tta",
    "stem",
    "weights",
    "best_lr",
    "best_momentum",
    "best_batch_size",
    "hparams",
    "hparams_source",
    "classes",
    "p0",
    "p1",
    "sigma",
    "mitigation",
    "seeds",
    "n_trials",
    "pruner",
)
WHERE = ("data", "cache_dir", "storage", "study_name")  # where files and the study were, not how it trained
TEXT_ARTIFACTS = ("conclusion.md", "comparison.md", "sweep.md", "model_summary.md")
MAX_TABLE_ROWS = 40  # the trials table of a long study is cut here; the CSV artifact has it all
STEP_ONLY = ("scheduled_lr", "best_val_accuracy_so_far")  # curves: their last value alone means little


@dataclass
class Section:
    title: str
    markdown: list[str] = field(default_factory=list)  # paragraphs / tables (markdown)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, plotly JSON)


def trials_table(df: pd.DataFrame) -> str:
    """The study's trials: one accuracy column (a pruned trial's Optuna value is a negative loss, not an
    accuracy), epochs, seconds and the sampled params."""
    acc, ep = "user_attrs_best_val_accuracy", "user_attrs_epochs_run"
    params = [c for c in df.columns if c.startswith("params_")]
    rows = []
    for _, t in df.head(MAX_TABLE_ROWS).iterrows():
        seconds = pd.to_timedelta(t["duration"]).total_seconds() if pd.notna(t.get("duration")) else math.nan
        rows.append(
            [
                int(t["number"]),
                str(t["state"]).lower(),
                md.fmt(float(t[acc]), pct=True) if pd.notna(t.get(acc)) else "n/a",
                int(t[ep]) if pd.notna(t.get(ep)) else "n/a",
                f"{seconds:.1f}" if math.isfinite(seconds) else "n/a",
                *(t[c] for c in params),
            ]
        )
    return md.table(
        ["trial", "state", "best val accuracy", "epochs", "seconds", *(c.removeprefix("params_") for c in params)], rows
    )


def select_runs(client: MlflowClient, cfg: ReportConfig) -> list[Run]:
    """The given runs, or the latest top-level run of each entry point: in `cfg.experiment`, or by default in
    'bias-lab' or else wherever the latest runs are (`mlflow run` without --experiment-name puts them in Default)."""
    if cfg.run_ids.strip():
        runs = []
        for rid in (r.strip() for r in cfg.run_ids.split(",") if r.strip()):
            try:
                runs.append(client.get_run(rid))
            except Exception as e:
                raise UserError(
                    f"run '{rid}' is not in the tracking store {mlflow.get_tracking_uri()}: check the id in the MLflow UI"
                ) from e
        return runs
    named = cfg.experiment.strip()
    name = named or tracking.DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    check(
        exp is not None or not named,
        f"experiment '{name}' is not in {mlflow.get_tracking_uri()}: run train/tune/bias_eval first, or pass --experiment",
    )
    runs = _latest(client, [exp.experiment_id] if exp else [])
    if not runs and not named:  # the default: look wherever the runs are
        runs = _latest(client, [e.experiment_id for e in client.search_experiments()])
        if runs:
            where = sorted({client.get_experiment(r.info.experiment_id).name for r in runs})
            print(
                f"report: no runs in experiment '{name}'; reading the latest runs of {', '.join(map(repr, where))}",
                file=sys.stderr,
            )
    check(
        bool(runs),
        f"no finished train/tune/bias_eval run in {'experiment ' + repr(name) if named else mlflow.get_tracking_uri()}: "
        "run one first",
    )
    return runs


def _latest(client: MlflowClient, experiment_ids: list[str]) -> list[Run]:
    """The latest finished top-level run of each entry point in these experiments."""
    runs = []
    for ep in ENTRY_POINTS if experiment_ids else ():
        found = client.search_runs(
            experiment_ids,
            f"tags.entry_point = '{ep}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        runs += [r for r in found if "mlflow.parentRunId" not in r.data.tags][:1]
    return runs


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path or None):
        if a.is_dir:
            if not a.path.endswith("model"):  # the model folder holds weights, not report material
                out += _artifacts(client, run_id, a.path)
        else:
            out.append(a.path)
    return out


def _load_text(run_id: str, path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


def _same(logged: str, default: object) -> bool:
    """Whether a logged param string is `default`: `mlflow run` logs its -P text ('10' or '10.0' for an int,
    "''" for an empty string), bias_lab logs str(value)."""
    text = logged.strip()
    if isinstance(default, bool):
        return text.lower() in (("true", "1") if default else ("false", "0"))
    if isinstance(default, int | float):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    return text.strip("'\"") == str(default)


def changed_settings(params: dict[str, str], entry_point: str) -> dict[str, str]:
    """The settings a run of `entry_point` changed from that command's defaults, beyond KEY_PARAMS: its recipe
    (width, label_smoothing, ema, ...) at a glance, which the parameter table alone would hide among 40 params."""
    ep = config.ENTRY_POINTS.get(entry_point)
    if ep is None:
        return {}
    return {
        f.name: params[f.name]
        for f in ep.fields()
        if f.name in params
        and f.name not in KEY_PARAMS
        and f.name not in WHERE
        and not _same(params[f.name], ep.default(f))
    }


def _run_section(client: MlflowClient, run: Run, depth: int = 0) -> list[Section]:
    rid = run.info.run_id
    tags = run.data.tags
    title = f"{tags.get('mlflow.runName', rid)} ({tags.get('entry_point', 'run')}{', ' + tags['role'] if 'role' in tags else ''})"
    sec = Section(title)
    if "pretrained" in tags:  # first, before any number it qualifies
        sec.markdown.append(f"**Pretrained:** this run {tags['pretrained']}.")
    params = {k: run.data.params[k] for k in KEY_PARAMS if k in run.data.params}
    if params:
        sec.markdown.append(md.table(["parameter", "value"], params.items()))
    changed = changed_settings(run.data.params, tags.get("entry_point", ""))
    if changed:
        sec.markdown.append("**Changed from the defaults:** " + ", ".join(f"`{k}={v}`" for k, v in changed.items()))
    metrics = {k: v for k, v in sorted(run.data.metrics.items()) if not k.startswith("n_") and k not in STEP_ONLY}
    if metrics:
        sec.markdown.append(md.table(["metric", "value"], ((k, md.fmt(v)) for k, v in metrics.items())))
    files = _artifacts(client, rid)
    for name in TEXT_ARTIFACTS:
        if name in files:
            sec.markdown.append(f"**{name}**\n\n" + _load_text(rid, name))
    if "trials.csv" in files:
        df = pd.read_csv(io.StringIO(_load_text(rid, "trials.csv")))
        shown = f"first {MAX_TABLE_ROWS} of {len(df)}" if len(df) > MAX_TABLE_ROWS else str(len(df))
        sec.markdown.append(f"**Optuna trials** ({shown}; every trial in trials.csv)\n\n" + trials_table(df))
    for f in sorted(p for p in files if p.startswith("figures/") and p.endswith(".json")):
        sec.figures.append((Path(f).stem.replace("_", " "), _load_text(rid, f)))
    sections = [sec]
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'", order_by=["attributes.start_time ASC"]
    )
    trials = [c for c in children if c.data.tags.get("role") == "trial"]
    for child in children:
        if child.data.tags.get("role") != "trial" and depth < 2:
            sections += _run_section(client, child, depth + 1)
    if trials:
        sec.markdown.append(f"{len(trials)} trial runs are nested under this run in the MLflow UI.")
    return sections


def to_markdown(sections: list[Section]) -> str:
    out = ["# bias_lab report", "", f"Generated from {mlflow.get_tracking_uri()}.", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for m in s.markdown:
            out += [m, ""]
        out += [f"- figure: {cap} (in the HTML report)" for cap, _ in s.figures] + [""]
    return "\n".join(out)


MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in an artifact stays text


def _md_block(text: str) -> str:
    """One markdown block -> HTML, headings moved under the run's <h2> (an artifact's '# x' is an <h4> here)."""
    return re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m[1]}h{min(int(m[2]) + 3, 6)}>", MARKDOWN.render(text))


def render_html(sections: list[Section]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>bias_lab report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}",
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}",
        "code{background:#f3f3f3;padding:0 3px;border-radius:3px}",
        "h2{border-bottom:2px solid #333;margin-top:2em}</style></head><body>",
        "<h1>bias_lab report</h1>",
        f"<p>Generated from <code>{html.escape(mlflow.get_tracking_uri())}</code>.</p>",
    ]
    first = True
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [_md_block(m) for m in s.markdown]
        for cap, js in s.figures:
            fig = pio.from_json(js)
            parts.append(f"<h4>{html.escape(cap)}</h4>")
            parts.append(pio.to_html(fig, include_plotlyjs=first, full_html=False))  # plotly.js once, inline: offline
            first = False
    parts.append("</body></html>")
    return "\n".join(parts)


def run_report(cfg: ReportConfig) -> Path:
    """Write the HTML report (and its markdown twin next to it); returns the HTML path."""
    tracking.setup(cfg.experiment.strip() or tracking.DEFAULT_EXPERIMENT)
    client = MlflowClient()
    sections = [s for run in select_runs(client, cfg) for s in _run_section(client, run)]
    out = Path(cfg.output)
    html_text, md_text = render_html(sections), to_markdown(sections)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(md_text, encoding="utf-8"))
    atomic_write(out, lambda tmp: tmp.write_text(html_text, encoding="utf-8"))
    print(f"report: {out} ({len(sections)} sections) and {out.with_suffix('.md')}")
    return out
