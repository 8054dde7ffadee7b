"""MLflow: where runs go, how they end, and how models are saved and loaded back without pickles.

Runs always end: an exception ends them FAILED with the error as a tag and a text artifact, Ctrl-C and
SIGTERM end them KILLED (bias_lab.shutdown: true statuses whatever the signals); metrics logged before stay. Models are
logged as pyfuncs that take images (bias_lab.serving: `mlflow.pyfunc.load_model` and `mlflow models serve` work) with a
state_dict and a `bias_lab.json` of the preprocessing, which is what `load_model` here reads: weights_only, no code
from the artifact store runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from bias_lab import inference, serving, shutdown
from bias_lab.errors import UserError, first_line
from bias_lab.models import ModelMeta

DEFAULT_EXPERIMENT = "bias-lab"


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at its store (MLFLOW_TRACKING_URI, else ./mlflow.db) and check it answers; returns the URI."""
    uri = mlflow.get_tracking_uri()
    check_server(uri)
    _check_writable(uri)
    for attempt in range(3):
        try:
            with first_use_lock(uri):
                _open(experiment)
            return uri
        except Exception as e:  # connection refused, bad URI, locked db... all mean the same to a user
            if attempt < 2 and _creation_race(e):
                time.sleep(1.0 + attempt)  # another process was creating the tables: the next try finds them made
                continue
            raise UserError(
                f"cannot use the MLflow tracking store {uri} ({first_line(e)}): start the server or fix MLFLOW_TRACKING_URI"
            ) from e
    raise AssertionError("unreachable")


def check_server(uri: str) -> None:
    """A tracking server that does not answer fails in seconds, in one line, not after MLflow's ~4 min of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5)
    except requests.RequestException as e:
        raise UserError(
            f"cannot use the MLflow tracking store {uri} ({type(e).__name__}): start the server or fix MLFLOW_TRACKING_URI"
        ) from e


def _check_writable(uri: str) -> None:
    """A sqlite store that can be read but not written (a read-only file or folder, an immutable file) fails at the
    run's first write, with SQLAlchemy's tracebacks, after the data was decoded: say so first, in one line."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not path.exists():
        return  # created on first use: a folder that cannot hold it fails in _open, one line too
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
        try:
            con.execute("BEGIN IMMEDIATE")  # the write lock, then a write that is rolled back: what a run will do
            con.execute("CREATE TABLE bias_lab_write_probe (x INTEGER)")
            con.rollback()
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e) or "already exists" in str(e):
            return  # another process is writing: the store is writable
        raise UserError(
            f"the MLflow tracking store {path} cannot be written ({e}): make it and its folder writable, or point "
            "MLFLOW_TRACKING_URI at a store you can write"
        ) from None


def set_description(markdown: str, full: str) -> None:
    """The run page's Description (`mlflow.note.content`, markdown). MLflow caps a tag at 8,000 characters: a longer
    text is cut at a line end, with a pointer to the artifact `full` that holds all of it."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    limit = MAX_TAG_VAL_LENGTH - 120
    if len(markdown) > limit:
        cut = markdown.rfind("\n", 0, limit)
        markdown = (
            markdown[: cut if cut > 0 else limit]
            + f"\n\n(cut here: a run description holds 8,000 characters; all of it is in `{full}`)"
        )
    mlflow.set_tag("mlflow.note.content", markdown)


# What the experiment holds, in MLflow 3's own vocabulary. MLflow 3.17's UI does not act on it (its sidebar switch
# and `?workflowType=` decide; see UI_MODE), but it is true and later versions read it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# The runs table's headline columns. MLflow's UI shows no metric there by default and keeps a person's column choice
# in their browser; a shared view (an experiment tag the UI reads when the address names its key) is the one place
# a tool can set them. The addresses printed here open it.
RUNS_VIEW_KEY = "bias-lab"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
_HEADLINE = [
    "metrics.`test_accuracy`",
    "tags.`model_2_verdict`",  # bias_eval: biased / not biased / mirrors the labels / inconclusive...
    "metrics.`shortcut_accuracy_gain`",
    "metrics.`model_2_decorrelated_test_di`",
    "metrics.`best_val_accuracy`",
    "params.`model`",
    "params.`lr`",
    "params.`batch_size`",
]
RUNS_VIEW = {
    "selectedColumns": _HEADLINE,
    "columnOrder": _HEADLINE,
    "columnWidths": {c: max(90, 8 * len(c.split("`")[1]) + 40) for c in _HEADLINE},  # px: each whole header shows
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}


def _open(experiment: str) -> None:
    client = MlflowClient()
    client.search_experiments(max_results=1)  # creates and migrates the tables of a new database store
    if not (
        os.environ.get("MLFLOW_EXPERIMENT_ID")
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or os.environ.get("MLFLOW_RUN_ID")
    ):
        # create first: when K workers start together, mlflow.set_experiment's loser of the create race returns
        # without activating the experiment and its runs land in Default (mlflow/tracking/fluent.py)
        if client.get_experiment_by_name(experiment) is None:
            with contextlib.suppress(MlflowException):  # another worker created it a moment ago
                client.create_experiment(experiment)
        mlflow.set_experiment(experiment)
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or mlflow.tracking.fluent._get_experiment_id()
    if not exp_id:
        return
    with contextlib.suppress(MlflowException):  # labels for the UI: never worth failing a run over
        tags = client.get_experiment(exp_id).tags
        wanted = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], RUNS_VIEW_TAG: json.dumps(RUNS_VIEW)}
        for key, value in wanted.items():
            if key not in tags or (key == RUNS_VIEW_TAG and tags[key] != value):  # ours: kept current
                client.set_experiment_tag(exp_id, key, value)


def _creation_race(e: Exception) -> bool:
    """The errors of two processes creating one new database store's tables at once (MLflow does not lock)."""
    text = str(e).lower()
    return any(w in text for w in ("already exists", "duplicate", "unique constraint", "alembic", "migration"))


def first_use_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a sqlite store. MLflow creates and migrates the tables on first use, without a lock:
    K processes starting on a new mlflow.db together failed 2 in 3 times ('table params already exists',
    half-applied migrations, which a retry cannot mend). PostgreSQL runs the creation in transactions: there the
    loser of the race gets an error and `setup` retries."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///").split("?")[0] + ".lock", timeout=300)


def active_run_id() -> str:
    """The id of the active run; an error (not an AttributeError on None) when there is none."""
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no active MLflow run")
    return active.info.run_id


@contextlib.contextmanager
def run(
    name: str | None = None,
    *,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """mlflow.start_run that always ends the run: FINISHED, FAILED (error logged) or KILLED.

    `run_id` re-opens an existing run (resuming an interrupted `train`); MLFLOW_RUN_ID (set by `mlflow run`)
    wins over it for a top-level run, as in mlflow.start_run. `system_metrics`: MLflow samples CPU, memory (and,
    with nvidia-ml-py installed, GPU) utilisation every 10 s into system/* metrics, the run's "System metrics" tab.
    """
    if run_id and not nested and not os.environ.get("MLFLOW_RUN_ID"):
        active = mlflow.start_run(run_id=run_id, tags=tags, log_system_metrics=system_metrics)
    else:
        active = mlflow.start_run(
            run_name=name, nested=nested, tags=tags, parent_run_id=parent_run_id, log_system_metrics=system_metrics
        )
    try:
        yield active
        _write_figures(active.info.run_id)  # in the try: a failure to write them ends the run FAILED, not RUNNING
    except BaseException as e:
        with shutdown.held():  # a signal now is raised once the run has ended
            with contextlib.suppress(Exception):  # what was drawn before the failure (tune's best-so-far summary)
                _write_figures(active.info.run_id)
            if isinstance(e, KeyboardInterrupt):
                shutdown.end(active, "KILLED", f"interrupted: {str(e) or 'Ctrl-C'}")
            else:
                shutdown.end(active, "FAILED", f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    else:
        current = mlflow.active_run()
        if current is not None and current.info.run_id == active.info.run_id:
            shutdown.finish(active.info.run_id)


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log metrics; an infinite one (a DI with a zero denominator) is stored as NaN: SQL tracking stores turn ±inf
    into ±1.797e308, which the UI, the Compare view and the report would show as a number. The caller tags why
    (an undefined DI's `*_di_note`)."""
    mlflow.log_metrics({f"{prefix}{k}": math.nan if math.isinf(v) else float(v) for k, v in metrics.items()}, step=step)


def log_params(params: dict[str, Any]) -> None:
    """Log params, skipping keys the run already has (`mlflow run` logs the entry point's own -P values first,
    quoting empty strings as "''"; MLflow refuses to change a param)."""
    run = mlflow.active_run()
    have = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items() if k not in have})


def log_dataset(ids: list[str], labels: list[str], splits: list[str], source: str, digest: str, name: str) -> None:
    """mlflow.data dataset of (id, label, split), one log_input per split context."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    df = pd.DataFrame({"id": ids, "label": labels, "split": splits})
    for context in ("train", "val", "test"):
        part = df[df.split == context].reset_index(drop=True)
        ds = from_pandas(
            part, source=source, targets="label", name=f"{name}-{context}", digest=f"{digest}-{context}"[:36]
        )
        for attempt in range(3):
            try:
                mlflow.log_input(ds, context=context)
                break
            except MlflowException as e:  # a parallel worker inserted the same dataset row a moment ago (sqlite
                if (
                    "unique constraint" not in str(e).lower() or attempt == 2
                ):  # says UNIQUE constraint): the retry finds it
                    raise
                time.sleep(0.5 * (attempt + 1))


FIGURES_FILE = "figures.html"
_figures: dict[str, dict[str, Any]] = {}  # run id -> {artifact name: figure}, in the order they were logged


def log_table(table: Any, name: str) -> None:
    """A pandas table twice: `name`.csv for spreadsheets and `name`.json, which the MLflow UI browses as a table.
    Times become text and durations seconds (`<column>_s`): the JSON table has no type for either."""
    mlflow.log_text(table.to_csv(index=False), f"{name}.csv")
    table = table.copy()
    for col in table.columns:
        if str(table[col].dtype).startswith("timedelta"):
            table[col] = table[col].dt.total_seconds()
            table = table.rename(columns={col: f"{col}_s"})
        elif str(table[col].dtype).startswith("datetime"):
            table[col] = table[col].astype(str)
    mlflow.log_table(table, f"{name}.json")


def log_figure(fig: Any, name: str) -> None:
    """Add a plotly figure to the active run: its JSON as `figures/<name>.json` now (what `bias-lab report` rebuilds
    figures from), and a place in the run's one `figures.html`, written when the run ends.

    figures.html embeds plotly.js once (about 4.7 MB) so it renders offline, in the MLflow UI's artifact viewer too:
    mlflow.log_figure's HTML loads plotly.js from a CDN and shows an empty frame without internet, and one
    inlined copy per figure would make a 20-trial tune ~35 MB instead of ~10."""
    _figures.setdefault(active_run_id(), {})[name] = fig
    mlflow.log_text(fig.to_json(), f"figures/{name}.json")


def _write_figures(run_id: str) -> None:
    """The run's figures.html, once, as the run ends (tracking.run calls it): every figure the run logged."""
    import plotly.io as pio

    figs = _figures.pop(run_id, {})
    if not figs:
        return
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>figures</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:0 12px}h2{font-size:15px;margin:18px 0 0}</style></head><body>",
    ]
    for i, (n, f) in enumerate(figs.items()):
        parts += [
            f"<h2>{n.replace('_', ' ')}</h2>",
            pio.to_html(
                f, include_plotlyjs=i == 0, full_html=False, default_width="100%", config={"displaylogo": False}
            ),
        ]
    MlflowClient().log_text(run_id, "\n".join([*parts, "</body></html>"]), FIGURES_FILE)


# MLflow 3's UI opens an experiment on its GenAI overview unless the sidebar's "Model training" switch was chosen
# once (it is kept in the browser) or the address says so: the addresses printed here say so.
UI_MODE = "?workflowType=machine_learning"


def address(page: str) -> str:
    """The URL of `page` (what follows the UI's root, '#/experiments/...'): on the tracking server for an http
    store, else on `mlflow ui`'s default address."""
    uri = mlflow.get_tracking_uri()
    root = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{root}/{page}"


def _start_ui() -> str:
    """What to run before opening an address: nothing for a server, else `mlflow ui`, naming the store unless it
    is `mlflow ui`'s own default (./mlflow.db)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return ""
    here = uri == "sqlite:///mlflow.db" or uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return f"`mlflow ui{'' if here else f' --backend-store-uri {uri}'}`, then "


def ui_hint(run: Any) -> str:
    """Where a person finds a run: the experiment, the run id and the address of its page in the MLflow UI, then
    the address of every run side by side with the headline columns (RUNS_VIEW)."""
    exp = MlflowClient().get_experiment(run.info.experiment_id)
    page = address(f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}{UI_MODE}")
    hint = f"experiment '{exp.name}', run {run.info.run_id} ({run.info.run_name}): see it with {_start_ui()}{page}"
    if RUNS_VIEW_TAG in exp.tags:
        runs = f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"
        hint += f"\nall runs side by side: {address(runs)}"
    if exp.experiment_id == "0" and os.environ.get("MLFLOW_RUN_ID"):
        hint += f"\nnote: this run is in the 'Default' experiment: pass `--experiment-name {DEFAULT_EXPERIMENT}` to `mlflow run`"
    return hint


def log_model(model: nn.Module, meta: ModelMeta, name: str = "model") -> Any:
    """Log `model` with its preprocessing `meta`, as a pyfunc that takes images (bias_lab.serving)."""
    import torchvision

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        "pillow",
        "numpy",
        "pandas",
        "tqdm",
    ]
    return serving.log(model, meta, requirements, name)


def load_model(model_uri: str, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a logged model from its state_dict (weights_only) and return it with its preprocessing meta."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as e:
        raise UserError(
            f"cannot load model '{model_uri}' ({first_line(e)}): check the name/alias/version in the MLflow UI, or run tune first"
        ) from e
    metas, weights = list(local.rglob(inference.META_FILE)), list(local.rglob(inference.WEIGHTS_FILE))
    if not metas or not weights:
        raise UserError(
            f"'{model_uri}' is not a bias_lab model (no {inference.META_FILE}): pass a model logged by bias-lab train/tune"
        )
    model, meta = inference.rebuild(metas[0], weights[0], model_uri)
    return model.to(device), meta
