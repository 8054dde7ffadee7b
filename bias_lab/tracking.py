"""MLflow: where runs go, how they end, and how models are saved and loaded back without pickles.

Runs always end: an exception ends them FAILED with the error as a tag and a text artifact, Ctrl-C and
SIGTERM end them KILLED; metrics logged before stay. Models are logged with MLflow's PyTorch flavour (so the
UI, the registry and `mlflow.pytorch.load_model` work) plus a state_dict and a `bias_lab.json` of the
preprocessing, which is what `load_model` here reads: weights_only, no code from the artifact store runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from bias_lab.errors import UserError, first_line
from bias_lab.models import build

DEFAULT_EXPERIMENT = "bias-lab"
META_FILE = "bias_lab.json"
WEIGHTS_FILE = "weights.pt"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs and trials unwind and end KILLED."""


def install_signal_handlers() -> None:
    def on_term(signum: int, _frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at its store (MLFLOW_TRACKING_URI, else ./mlflow.db) and check it answers; returns the URI."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):  # a refused server fails in seconds, not after MLflow's ~4 min of retries
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5)
        except requests.RequestException as e:
            raise UserError(f"cannot use the MLflow tracking store {uri} ({type(e).__name__}): start the server or fix MLFLOW_TRACKING_URI") from e
    for attempt in range(3):
        try:
            with _first_use_lock(uri):
                _open(experiment)
            return uri
        except Exception as e:  # connection refused, bad URI, locked db... all mean the same to a user
            if attempt < 2 and _creation_race(e):
                time.sleep(1.0 + attempt)  # another process was creating the tables: the next try finds them made
                continue
            raise UserError(f"cannot use the MLflow tracking store {uri} ({first_line(e)}): start the server or fix MLFLOW_TRACKING_URI") from e
    raise AssertionError("unreachable")


def _open(experiment: str) -> None:
    client = MlflowClient()
    client.search_experiments(max_results=1)  # creates and migrates the tables of a new database store
    if not (os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_RUN_ID")):
        # create first: when K workers start together, mlflow.set_experiment's loser of the create race returns
        # without activating the experiment and its runs land in Default (mlflow/tracking/fluent.py)
        if client.get_experiment_by_name(experiment) is None:
            with contextlib.suppress(MlflowException):  # another worker created it a moment ago
                client.create_experiment(experiment)
        mlflow.set_experiment(experiment)


def _creation_race(e: Exception) -> bool:
    """The errors of two processes creating one new database store's tables at once (MLflow does not lock)."""
    text = str(e).lower()
    return any(w in text for w in ("already exists", "duplicate", "unique constraint", "alembic", "migration"))


def _first_use_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a sqlite store. MLflow creates and migrates the tables on first use, without a lock:
    K processes starting on a new mlflow.db together failed 2 in 3 times ('table params already exists',
    half-applied migrations, which a retry cannot mend). PostgreSQL runs the creation in transactions: there the
    loser of the race gets an error and `setup` retries."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///").split("?")[0] + ".lock", timeout=300)


@contextlib.contextmanager
def run(name: str | None = None, *, nested: bool = False, tags: dict[str, str] | None = None,
        parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """mlflow.start_run that always ends the run: FINISHED, FAILED (error logged) or KILLED.

    `run_id` re-opens an existing run (resuming an interrupted `train`); MLFLOW_RUN_ID (set by `mlflow run`)
    wins over it for a top-level run, as in mlflow.start_run.
    """
    if run_id and not nested and not os.environ.get("MLFLOW_RUN_ID"):
        active = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        active = mlflow.start_run(run_name=name, nested=nested, tags=tags, parent_run_id=parent_run_id)
    try:
        yield active
    except KeyboardInterrupt as e:
        _end(active, "KILLED", f"interrupted: {e or 'Ctrl-C'}")
        raise
    except BaseException as e:
        _end(active, "FAILED", f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    else:
        if mlflow.active_run() and mlflow.active_run().info.run_id == active.info.run_id:
            mlflow.end_run("FINISHED")


def _end(active: mlflow.ActiveRun, status: str, message: str, tb: str | None = None) -> None:
    run_id = active.info.run_id
    client = MlflowClient()
    with contextlib.suppress(Exception):  # ending the run matters more than recording why
        client.set_tag(run_id, "error", message[:5000])
        if tb:
            client.log_text(run_id, tb, "error.txt")
    # end every run stacked above ours (children left open by the failure), then ours
    while (top := mlflow.active_run()) is not None:
        mlflow.end_run(status)
        if top.info.run_id == run_id:
            return
    client.set_terminated(run_id, status)


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log finite metrics; NaN/inf (an undefined DI, say) are logged too, MLflow stores them as is."""
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)


def log_params(params: dict[str, Any]) -> None:
    """Log params, skipping keys the run already has (`mlflow run` logs the entry point's own -P values first,
    quoting empty strings as "''"; MLflow refuses to change a param)."""
    run = mlflow.active_run()
    have = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items() if k not in have})


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(obj, indent=2, default=str, allow_nan=True), artifact_file)


def log_dataset(ids: list[str], labels: list[str], splits: list[str], source: str, digest: str, name: str) -> None:
    """mlflow.data dataset of (id, label, split), one log_input per split context."""
    import pandas as pd

    df = pd.DataFrame({"id": ids, "label": labels, "split": splits})
    for context in ("train", "val", "test"):
        part = df[df.split == context].reset_index(drop=True)
        ds = mlflow.data.from_pandas(part, source=source, targets="label", name=f"{name}-{context}", digest=f"{digest}-{context}"[:36])
        for attempt in range(3):
            try:
                mlflow.log_input(ds, context=context)
                break
            except MlflowException as e:  # a parallel worker inserted the same dataset row a moment ago (sqlite
                if "unique constraint" not in str(e).lower() or attempt == 2:  # says UNIQUE constraint): the retry finds it
                    raise
                time.sleep(0.5 * (attempt + 1))


def log_figure(fig: Any, artifact_file: str) -> None:
    """A plotly figure as self-contained HTML (opens offline, in the MLflow UI too) plus its JSON beside it,
    from which `bias-lab report` rebuilds every figure with a single copy of plotly.js."""
    mlflow.log_figure(fig, artifact_file)
    mlflow.log_text(fig.to_json(), str(Path(artifact_file).with_suffix(".json")))


def log_model(model: nn.Module, meta: dict[str, Any], name: str = "model") -> Any:
    """Log `model` with its preprocessing `meta` (arch, in_channels, image_size, mean, std, classes...)."""
    c, s = meta["in_channels"], meta["image_size"]
    from mlflow.models import infer_signature

    example = np.zeros((2, c, s, s), dtype=np.float32)  # batch 2: a batch of 1 would freeze the exported batch size
    signature = infer_signature(example, np.zeros((1, len(meta["classes"])), dtype=np.float32))
    cpu_model = model.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta_path = Path(tmp) / WEIGHTS_FILE, Path(tmp) / META_FILE
        torch.save(cpu_model.state_dict(), weights)
        meta_path.write_text(json.dumps(meta, indent=2))
        return mlflow.pytorch.log_model(
            cpu_model,
            name=name,
            signature=signature,
            input_example=example,
            metadata={"bias_lab": meta},
            extra_files=[str(weights), str(meta_path)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision", f"mlflow=={mlflow.__version__}"],
        )


def load_model(model_uri: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a logged model from its state_dict (weights_only) and return it with its preprocessing meta."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as e:
        raise UserError(f"cannot load model '{model_uri}' ({first_line(e)}): check the name/alias/version in the MLflow UI, or run tune first") from e
    metas = list(local.rglob(META_FILE))
    weights = list(local.rglob(WEIGHTS_FILE))
    if not metas or not weights:
        raise UserError(f"'{model_uri}' is not a bias_lab model (no {META_FILE}): pass a model logged by bias-lab train/tune")
    meta = json.loads(metas[0].read_text())
    model = build(meta["arch"], meta["in_channels"], len(meta["classes"]), meta["image_size"])
    model.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta
