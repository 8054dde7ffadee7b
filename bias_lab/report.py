"""`bias-lab report`: the document the course asks for, generated from what the tracking store holds.

Reads runs (by default the latest top-level train, tune and bias_eval runs of the experiment; or the given run
ids), only reading the store, and writes one self-contained HTML file (plotly.js embedded once, opens offline) plus
a markdown twin. A summary first (the champion, each bias study's verdicts, each model's test accuracy); then per
run its key params and metrics, layer tables, trials, the bias comparison and conclusion, and every figure the run
logged (rebuilt from the figures' JSON, confusion matrices naming the classes); last, the system metrics.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import plotly.io as pio
from markdown_it import MarkdownIt
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from bias_lab import config, files, metrics, tracking
from bias_lab import markdown as md
from bias_lab.config import ReportConfig
from bias_lab.data import atomic_write
from bias_lab.demo import CLASSES as DEMO_CLASSES
from bias_lab.errors import UserError, check, first_line
from bias_lab.registry import CHAMPION

ENTRY_POINTS = ("train", "tune", "bias_eval", "bias_sweep")
KEY_PARAMS = tuple(  # the parameters every run section shows (a run logs 40-odd): data, model, recipe, bias setting
    """data_source data_digest model image_size epochs batch_size lr momentum seed crop_scale tta stem weights best_lr
    best_momentum best_batch_size hparams hparams_source classes p0 p1 sigma mitigation seeds n_trials pruner""".split()
)
WHERE = ("data", "cache_dir", "storage", "study_name")  # where files and the study were, not how it trained
TEXT_ARTIFACTS = ("conclusion.md", "comparison.md", "sweep.md", "model_summary.md")
MAX_TABLE_ROWS = 40  # the trials table of a long study is cut here; the CSV artifact has it all
STEP_ONLY = ("scheduled_lr", "best_val_accuracy_so_far")  # curves: their last value alone means little
EMPTY = ("", "''", '""')  # an empty param as bias_lab logs it, and as `mlflow run` logs an empty -P
SYSTEM = "system/"  # MLflow's sampled CPU / memory / GPU metrics: one table at the end, not in every run's
SYSTEM_SHOWN = {  # metric -> column: utilisation is the mean of a run's samples, memory the peak
    "cpu_utilization_percentage": "CPU % (mean)",
    "system_memory_usage_megabytes": "memory MB (peak)",
    "gpu_0_utilization_percentage": "GPU % (mean)",
    "gpu_0_memory_usage_megabytes": "GPU memory MB (peak)",
}
ROLES = ("model_1", "model_2", "model_3")  # a bias_eval's models: clean, shortcut, mitigated


@dataclass
class Section:
    title: str
    markdown: list[str] = field(default_factory=list)  # paragraphs / tables (markdown)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, plotly JSON)
    run: Run | None = None  # the run it shows (for the system metrics table)


def trials_table(df: pd.DataFrame) -> str:
    """The study's trials: one accuracy column (a pruned trial's Optuna value is a negative loss, not an
    accuracy), epochs, seconds and the sampled params."""
    acc, ep = "user_attrs_best_val_accuracy", "user_attrs_epochs_run"
    params = [c for c in df.columns if c.startswith("params_")]
    seconds = lambda t: pd.to_timedelta(t["duration"]).total_seconds() if pd.notna(t.get("duration")) else math.nan
    rows = [
        [int(t["number"]), str(t["state"]).lower(), md.fmt(float(t.get(acc, math.nan)), pct=True)]
        + [int(t[ep]) if pd.notna(t.get(ep)) else "n/a", f"{seconds(t):.1f}".replace("nan", "n/a")]
        + [t[c] for c in params]
        for _, t in df.head(MAX_TABLE_ROWS).iterrows()
    ]
    return md.table(
        ["trial", "state", "best val accuracy", "epochs", "seconds", *(c.removeprefix("params_") for c in params)], rows
    )


def check_output(out: Path) -> None:
    """Refuse, before anything is read or written, an output the report cannot write, or one that is its own
    markdown twin (the HTML would overwrite report.md)."""
    check(bool(out.name), f"--output '{out}' names no file: pass e.g. --output report.html")
    fix = f"pass --output {out.with_suffix('.html')} (the .md twin is written beside it)"
    check(out.suffix.lower() != ".md", f"--output {out} names the markdown twin: the HTML would overwrite it; {fix}")
    for p in (out, out.with_suffix(".md")):
        check(not p.is_dir(), f"--output: {p} is a folder: pass a file in it, e.g. --output {p / 'report.html'}")
    where = next(p for p in out.absolute().parents if p.exists())  # the folder the report would be created in
    check(where.is_dir(), f"--output {out}: {where} is a file, not a folder: pass a path in a folder")
    ok = os.access(where, os.W_OK | os.X_OK)
    check(ok, f"--output {out}: cannot write in {where} (permission denied): pass a folder you can write to")


def open_store() -> MlflowClient:
    """The tracking store, only read. Unlike tracking.setup (the commands that log runs) it creates and selects no
    experiment: `--experiment nope` leaves no experiment 'nope' behind, nor a new sqlite file where none was."""
    uri = mlflow.get_tracking_uri()
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None
    check(
        db is None or db.exists(),
        f"no tracking store at {uri}: run train/tune/bias_eval first, or set MLFLOW_TRACKING_URI",
    )
    tracking.check_server(uri)
    client = MlflowClient()
    try:
        with tracking.first_use_lock(uri):  # an older store's tables are migrated once, not by two processes
            client.search_experiments(max_results=1)
    except Exception as e:  # connection refused, bad URI, locked db... all mean the same to a user
        raise UserError(
            f"cannot use the MLflow tracking store {uri} ({first_line(e)}): start the server or fix MLFLOW_TRACKING_URI"
        ) from e
    return client


def select_runs(client: MlflowClient, cfg: ReportConfig) -> list[Run]:
    """The given runs, or the latest top-level run of each entry point: in `cfg.experiment`, or by default in
    'bias-lab' or else wherever the latest runs are (`mlflow run` without --experiment-name puts them in Default)."""
    if cfg.run_ids.strip():
        given = {rid: _get_run(client, rid) for rid in (r.strip() for r in cfg.run_ids.split(",")) if rid}
        missing = [rid for rid, run in given.items() if run is None][:1]
        store = f"the tracking store {mlflow.get_tracking_uri()}: check the id in the MLflow UI"
        check(not missing, f"run '{''.join(missing)}' is not in {store}")
        return [run for run in given.values() if run is not None]
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
            where = ", ".join(sorted({repr(client.get_experiment(r.info.experiment_id).name) for r in runs}))
            print(f"report: no runs in experiment '{name}'; reading the latest runs of {where}", file=sys.stderr)
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


def _get_run(client: MlflowClient, run_id: str | None) -> Run | None:
    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException:  # deleted, or from another store
        return None


def _float(text: str | None) -> float:
    try:
        return float(text or "nan")
    except ValueError:
        return math.nan


def class_names(params: dict[str, str]) -> dict[str, str]:
    """label -> 'label (name)' for a run's data: the demo's shapes, else the names in the data folder's optional
    classes.csv (the competition's labels are 1..4); {} when there are none."""
    data = params.get("data", "").strip("'\" ")
    names = {str(k): v for k, v in DEMO_CLASSES.items()} if data == "demo" else {}
    names = names or (files.class_names(Path(data).expanduser()) if data else {})
    return {k: f"{k} ({v})" for k, v in names.items()}


def _relabel_confusion(js: str, names: dict[str, str]) -> str:
    """A confusion matrix figure whose axes say the classes: 'pred 1' -> 'predicted 1 (disc)', 'true 1 (disc)'."""
    fig = pio.from_json(js)
    label = lambda v: v.split(" ", 1)[1] if v.startswith(("pred ", "predicted ", "true ")) else None
    tick = lambda v, word: f"{word} {names.get(label(v) or '', label(v))}" if label(v) else v
    for t in fig.data:
        if t.type == "heatmap" and t.x is not None and t.y is not None:
            t.x, t.y = [tick(v, "predicted") for v in t.x], [tick(v, "true") for v in t.y]
    fig.update_xaxes(title_text="predicted class").update_yaxes(title_text="true class")
    return fig.to_json()


def confusion_table(js: str) -> str:
    """The counts of a confusion matrix figure as a markdown table: rows the true class, columns the predicted."""
    t = next(d for d in json.loads(js)["data"] if d.get("type") == "heatmap")
    counts = t["text"]
    if isinstance(counts, dict):  # plotly's typed array: {dtype, bdata (base64), shape}
        flat = np.frombuffer(base64.b64decode(counts["bdata"]), dtype=counts["dtype"])
        counts = flat.reshape([int(n) for n in str(counts.get("shape", len(flat))).split(",")])
    rows = [[y.removeprefix("true "), *(int(c) for c in row)] for y, row in zip(t["y"], counts)]
    return md.table(["true / predicted", *(x.removeprefix("predicted ") for x in t["x"])], rows)


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
    fields = [f for f in ep.fields() if f.name in params and f.name not in (*KEY_PARAMS, *WHERE)]
    return {f.name: params[f.name] for f in fields if not _same(params[f.name], ep.default(f))}


def _run_section(client: MlflowClient, run: Run, depth: int = 0) -> list[Section]:
    rid = run.info.run_id
    tags = run.data.tags
    title = f"{tags.get('mlflow.runName', rid)} ({tags.get('entry_point', 'run')}{', ' + tags['role'] if 'role' in tags else ''})"
    sec = Section(title, run=run)
    if "pretrained" in tags:  # first, before any number it qualifies
        sec.markdown.append(f"**Pretrained:** this run {tags['pretrained']}.")
    params = {k: run.data.params[k] for k in KEY_PARAMS if run.data.params.get(k, "").strip() not in EMPTY}
    if params:
        sec.markdown.append(md.table(["parameter", "value"], params.items()))
    changed = changed_settings(run.data.params, tags.get("entry_point", ""))
    if changed:
        sec.markdown.append("**Changed from the defaults:** " + ", ".join(f"`{k}={v}`" for k, v in changed.items()))
    values = [(k, md.fmt(v)) for k, v in sorted(run.data.metrics.items()) if not k.startswith(("n_", SYSTEM))]
    if values := [(k, v) for k, v in values if k not in STEP_ONLY]:
        sec.markdown.append(md.table(["metric", "value"], values))
    files = _artifacts(client, rid)
    for name in TEXT_ARTIFACTS:
        if name in files:
            sec.markdown.append(f"**{name}**\n\n" + _load_text(rid, name))
    if "trials.csv" in files:
        df = pd.read_csv(io.StringIO(_load_text(rid, "trials.csv")))
        shown = f"first {MAX_TABLE_ROWS} of {len(df)}" if len(df) > MAX_TABLE_ROWS else str(len(df))
        sec.markdown.append(f"**Optuna trials** ({shown}; every trial in trials.csv)\n\n" + trials_table(df))
    for f in sorted(p for p in files if p.startswith("figures/") and p.endswith(".json")):
        js = _load_text(rid, f)
        js = _relabel_confusion(js, class_names(run.data.params)) if Path(f).stem == "confusion_matrix" else js
        sec.figures.append((Path(f).stem.replace("_", " "), js))
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


def _accuracy(m: dict[str, float], acc: float | None = None) -> str:
    """'test accuracy 87.5% [95% CI 80.1–92.3%] on 160 test images': the logged CI (binary), else Wilson's."""
    acc = m.get("test_accuracy", math.nan) if acc is None else acc
    n = int(m.get("n_test", 0))
    lo, hi = m.get("test_accuracy_ci_low", math.nan), m.get("test_accuracy_ci_high", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)) and n and math.isfinite(acc):
        lo, hi = metrics.wilson(round(acc * n), n)
    ci = f" [95% CI {100 * lo:.1f}–{100 * hi:.1f}%]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"test accuracy {md.fmt(acc, pct=True)}{ci}" + (f" on {n} test images" if n else "")


def champion(client: MlflowClient, name: str) -> str:
    """One line on the registered champion: its test accuracy and interval, val accuracy, data and origin."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model, or no version carries the alias
        return f"**Champion:** none — no model is registered as `{name}@{CHAMPION}` in this store (tune registers one)."
    t = mv.tags
    final, tune = _get_run(client, t.get("final_run_id")), _get_run(client, t.get("tune_run_id") or mv.run_id)
    m, src = (dict(final.data.metrics) if final else {}), (final or tune)
    p, rt = (src.data.params, src.data.tags) if src else ({}, {})
    synthetic = "synthetic images (not ImageNet)" if rt.get("synthetic_data") == "true" else "not synthetic"
    data = f"{p.get('data_source', 'source unknown')}, digest {t.get('data_digest', '?')}, {synthetic}"
    origin = f"tune run {tune.info.run_name if tune else '?'} trial {t.get('optuna_trial', '?')}"
    weights = f", weights {t['weights']}" if t.get("weights", "none") != "none" else ""
    chance = f" ({k:.0f} classes: chance is {100 / k:.0f}%)" if (k := _float(p.get("num_classes"))) > 0 else ""
    return (
        f"**Champion:** {name} v{mv.version} — {_accuracy(m, m.get('test_accuracy', _float(t.get('test_accuracy'))))}"
        f"{chance}, val accuracy {md.fmt(_float(t.get('val_accuracy')), pct=True)}; data: {data}; from {origin}{weights}."
    )


def _in_short(client: MlflowClient, run_id: str) -> list[str]:
    """The conclusion in one sentence: the 'In short:' line of the run's conclusion.md."""
    if "conclusion.md" not in {a.path for a in client.list_artifacts(run_id)}:
        return []
    lines = _load_text(run_id, "conclusion.md").splitlines()
    return [line.removeprefix("- ") for line in lines if line.startswith("- In short:")][:1]


def bias_summary(client: MlflowClient, run: Run) -> str:
    """A bias study: its setting, each model's verdict (decorrelated test) and accuracies, its conclusion."""
    t, m, p = run.data.tags, run.data.metrics, run.data.params
    pair = " vs ".join(class_names(p).get(v, v) for v in (p.get("label_y0", "?"), p.get("label_y1", "?")))
    setting = [f"{k}={_float(p[k]):g}" for k in ("p0", "p1", "sigma") if k in p]
    setting += [f"mitigation {p['mitigation']}"] if p.get("mitigation", "none") != "none" else []
    setting += [f"mean of {p['seeds']} seeds"] if _float(p.get("seeds")) > 1 else []
    title = f"**Bias study {run.info.run_name}**: {p.get('model', '?')}, classes {pair}, {', '.join(setting)}"
    pct = lambda k: md.fmt(m.get(k, math.nan), pct=True)
    rows = [
        [r, t.get(f"{r}_verdict", "n/a"), pct(f"{r}_test_accuracy"), pct(f"{r}_decorrelated_test_accuracy")]
        for r in ROLES
        if f"{r}_verdict" in t or f"{r}_test_accuracy" in m
    ]
    head = ["model", "verdict (decorrelated test)", "test accuracy", "decorrelated test accuracy"]
    return "\n\n".join([title, md.table(head, rows), *_in_short(client, run.info.run_id)])


def run_summary(client: MlflowClient, run: Run) -> str:
    t, m = run.data.tags, run.data.metrics
    name = f"**{run.info.run_name}** ({t.get('entry_point', 'run')})"
    if t.get("entry_point") == "bias_eval":
        return bias_summary(client, run)
    if t.get("entry_point") == "tune":
        if "best_trial_number" not in m:
            return f"{name}: no trial completed, nothing registered."
        best = f"best val accuracy {md.fmt(m['best_val_accuracy'], pct=True)} (trial {int(m['best_trial_number'])})"
        moved = "moved to it" if t.get("champion_moved") == "true" else f"stays v{t.get('champion_version', '?')}"
        reg = f"; registered {t.get('registered_model')} v{t.get('registered_version')}, champion {moved}"
        return f"{name}: {int(m.get('n_trials_complete', 0))} trials complete, {best}{reg if 'registered_version' in t else ''}."
    if "test_accuracy" in m:
        return f"{name}: {run.data.params.get('model', '?')}, {_accuracy(m)}."
    return f"{name}: details in its section below."


def summary(client: MlflowClient, runs: list[Run]) -> Section:
    """The answer first: the champion of the registered model (bias-lab, or as the runs name it), then each run."""
    names = sorted({r.data.tags["registered_model"] for r in runs if "registered_model" in r.data.tags})
    sec = Section("Summary", [champion(client, n) for n in names or [config.TuneConfig().registered_model]])
    sec.markdown += [run_summary(client, r) for r in runs]
    return sec


def system_section(client: MlflowClient, sections: list[Section]) -> list[Section]:
    """One table of the runs' system metrics (MLflow samples them while a run trains), not one per run."""
    runs = [(s.title, s.run) for s in sections if s.run and any(k.startswith(SYSTEM) for k in s.run.data.metrics)]
    keys = [k for k in SYSTEM_SHOWN if any(SYSTEM + k in r.data.metrics for _, r in runs)]
    if not keys:
        return []
    history = lambda r, k: [h.value for h in client.get_metric_history(r.info.run_id, SYSTEM + k)]
    sig3 = lambda x: f"{float(f'{x:.3g}'):,g}"  # 3 significant digits, without an exponent below a million
    summed = lambda v, k: sig3(max(v) if "memory" in k else sum(v) / len(v)) if v else "n/a"
    rows = [[title, *(summed(history(r, k), k) for k in keys)] for title, r in runs]
    note = "Sampled by MLflow while each run trained: utilisation is the mean of the samples, memory the peak."
    head = ["run", *(SYSTEM_SHOWN[k] for k in keys)]
    return [Section("System metrics", [note, md.table(head, rows, ["l"] + ["r"] * len(keys))])]


def to_markdown(sections: list[Section]) -> str:
    out = ["# bias_lab report", "", f"Generated from {mlflow.get_tracking_uri()}.", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for m in s.markdown:  # an artifact's headings under the run's, as in the HTML ('# x' -> '#### x')
            out += [re.sub(r"(?m)^(#{1,3}) ", lambda h: "#" * (len(h[1]) + 3) + " ", m), ""]
        for cap, js in s.figures:  # a confusion matrix is small enough to read as a table
            table = cap == "confusion matrix"
            out += [f"**{cap}**\n\n{confusion_table(js)}" if table else f"- figure: {cap} (in the HTML report)", ""]
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
    """Write the HTML report and its markdown twin (the output checked first, the store only read); returns its path."""
    out = Path(cfg.output)
    check_output(out)
    client = open_store()
    runs = select_runs(client, cfg)
    details = [s for run in runs for s in _run_section(client, run)]
    sections = [summary(client, runs), *details, *system_section(client, details)]
    html_text, md_text = render_html(sections), to_markdown(sections)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(md_text, encoding="utf-8"))
    atomic_write(out, lambda tmp: tmp.write_text(html_text, encoding="utf-8"))
    print(f"report: {out} ({len(sections)} sections) and {out.with_suffix('.md')}")
    return out
