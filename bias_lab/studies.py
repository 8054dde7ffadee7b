"""Where an Optuna study lives, and what happens to the trials of workers that died.

A journal file next to the MLflow store by default (one machine, any number of workers), or an RDB URL (workers on
several machines; Optuna's heartbeat then fails the trials of a worker that stopped beating). Either way a dead
worker's trial is failed, its params re-queued once and its MLflow runs ended KILLED, so nothing stays RUNNING.
Never in the MLflow tracking store: Optuna would create its tables in MLflow's database (refused before it opens).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import warnings
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from bias_lab.errors import UserError, check, first_line
from bias_lab.workers import worker_dead

HEARTBEAT_S = 60  # RDB: a trial whose worker has not beaten for GRACE_S is stale (Optuna's documented values)
GRACE_S = 120
JOURNAL_FILE = "optuna.journal"
SQLITE_FILE = "sqlite file"  # what _database calls a sqlite URL's (or a journal's) file


# ----------------------------------------------------------------------------------------------- storage


def default_storage_path() -> Path:
    """optuna.journal next to the MLflow sqlite db / file store; the cwd when tracking is remote."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).expanduser().resolve().parent / JOURNAL_FILE
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri).expanduser().resolve().parent / JOURNAL_FILE
    return Path.cwd() / JOURNAL_FILE


def _redact(url: str) -> str:
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url.split("@")[-1]


def _engine_kwargs(url: str) -> dict[str, Any]:
    """PostgreSQL: give up on an unreachable host after 10 s (not the OS's ~2 min TCP timeout), and test pooled
    connections before use, so a long-running worker survives a restarted server or a dropped idle connection."""
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _database(url: str) -> tuple[str, ...] | None:
    """What a database URL points at: (SQLITE_FILE, the resolved file) or (backend, host, port, database); None
    for a URL of no database (an http tracking server, sqlite in memory)."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        backend = u.get_backend_name()
    except Exception:  # not a database URL
        return None
    if backend != "sqlite":
        return (backend, u.host or "", str(u.port or ""), u.database or "")
    in_memory = u.database in (None, "", ":memory:")
    return None if in_memory else (SQLITE_FILE, str(Path(str(u.database)).expanduser().resolve()))


def _same(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if a == b:
        return True
    files = a[0] == b[0] == SQLITE_FILE and Path(a[1]).exists() and Path(b[1]).exists()
    return files and os.path.samefile(a[1], b[1])  # hard links


def _mlflow_tables(path: Path) -> bool:
    """The sqlite file `path` holds MLflow's tables: it is a tracking store."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
            names = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error:  # not a sqlite file (a journal): not MLflow's
        return False
    return {"experiments", "alembic_version"} <= names


def _refuse_tracking_store(spec: str, target: tuple[str, ...] | None) -> None:
    """Opening a storage writes Optuna's tables (or journal) wherever it points: never into the MLflow tracking
    store (by path, or by host and database), nor into another sqlite file that holds MLflow's tables."""
    if target is None:
        return
    tracking = _database(mlflow.get_tracking_uri())
    if tracking is not None and _same(tracking, target):
        problem = "is the MLflow tracking store"
    elif target[0] == SQLITE_FILE and _mlflow_tables(Path(target[1])):
        problem = "holds MLflow's tables (an MLflow tracking store)"
    else:
        return
    rdb = "://" in spec
    raise UserError(
        f"storage {_redact(spec) if rdb else target[1]} {problem}: Optuna would write its "
        f"{'tables' if rdb else 'journal'} into it; pass another file, e.g. --storage "
        f"{'sqlite:///optuna.db' if rdb else JOURNAL_FILE}"
    )


def open_storage(spec: str) -> tuple[optuna.storages.BaseStorage, str]:
    """(storage, description). A URL with '://' is an RDB (heartbeat on), anything else a journal file path."""
    if "://" in spec:
        _refuse_tracking_store(spec, _database(spec))
        retry = (
            getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            or optuna.storages.RetryFailedTrialCallback
        )
        key = (
            "heartbeat_stale_trial_callback" if retry.__name__.startswith("RetryHeartbeat") else "failed_trial_callback"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                on_stale = _StaleTrialCallback(retry(max_retry=1))
                callback: dict[str, Any] = {key: on_stale}  # the keyword's name depends on the Optuna version
                rdb = optuna.storages.RDBStorage(
                    spec,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    engine_kwargs=_engine_kwargs(spec),
                    **callback,
                )
        except Exception as e:  # no driver, refused connection, bad URL, unwritable sqlite file
            raise UserError(
                f"cannot open the Optuna storage {_redact(spec)} ({first_line(e)}): start the database, "
                "install its driver (pip install -e '.[postgres]'), or fix --storage"
            ) from e
        return rdb, _redact(spec)
    path = Path(spec).expanduser() if spec else default_storage_path()
    _refuse_tracking_store(spec, (SQLITE_FILE, str(path.resolve())))
    check(
        path.parent.is_dir(),
        f"storage {path}: folder {path.parent} does not exist: create it or pass another --storage",
    )
    try:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        _check_journal(path)
        journal = JournalStorage(JournalFileBackend(str(path)))
        journal.get_all_studies()  # replays the file now: a bad journal fails here, not in the middle of the command
        return journal, str(path.resolve())
    except OSError as e:
        raise UserError(
            f"cannot open the Optuna journal {path} ({first_line(e)}): pass a writable --storage path"
        ) from e
    except Exception as e:  # replaying a file that is no Optuna journal: JSON, Unicode, key, type, assertion errors
        raise UserError(
            f"{path} is not an Optuna journal ({type(e).__name__}: {first_line(e)}): pass another --storage "
            "path, or move the file away to start a new study"
        ) from e


def _check_journal(path: Path) -> None:
    """Every complete line of an existing journal is a JSON operation. Optuna skips a bad line while it is the last
    one (a write cut short) and fails on it once another worker appends: find it before any work."""
    if not path.exists():
        return
    import json

    with path.open("rb") as f:
        for line in f:
            if line.endswith(b"\n") and line.strip() and not isinstance(json.loads(line), dict):
                raise ValueError("a line is not a journal operation")


# ----------------------------------------------------------------------------------------------- workers


def _end_runs_of(client: MlflowClient, run_ids: list[str], why: str) -> list[str]:
    """End the RUNNING runs among `run_ids` as KILLED; returns those ended."""
    ended = []
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            client.set_tag(run_id, "error", why)
            client.set_tag(run_id, "state", "failed")
            client.set_terminated(run_id, "KILLED")
            ended.append(run_id)
        except MlflowException:  # deleted run, or one in another tracking store
            continue
    return ended


class _StaleTrialCallback:
    """RDB heartbeat: a stale trial is failed by Optuna; end its MLflow runs and re-queue its params once."""

    def __init__(self, retry: Callable[[optuna.Study, FrozenTrial], None]) -> None:
        self.retry = retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        ids = [trial.user_attrs[k] for k in ("mlflow_run_id", "mlflow_parent_run_id") if k in trial.user_attrs]
        _end_runs_of(MlflowClient(), ids, f"trial {trial.number}: its worker stopped beating (killed?)")
        self.retry(study, trial)


def recover(study: optuna.Study, study_name: str) -> list[int]:
    """Fail the RUNNING trials of dead workers (re-queued once) and end their MLflow runs; returns their numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RDB heartbeat (any machine); a no-op for the journal
        retry = (
            getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            or optuna.storages.RetryFailedTrialCallback
        )(max_retry=1)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker_of", t.number) != t.number:
            continue  # a re-queued trial just taken by a live worker: the attrs are still those of the one it retries
        if not worker_dead(t.user_attrs.get("worker", "")):
            continue
        try:  # a lost race (another worker failed it first) raises instead of skipping: only the winner re-queues it
            study.tell(t.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            continue
        failed.append(t.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            retry(study, t)
    # MLflow runs of dead workers of this study: parents and children (also a parent killed before any trial)
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        exps = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(
            exps, f"tags.optuna_study = '{study_name}' and attributes.status = 'RUNNING'", max_results=1000
        )
        dead = [r.info.run_id for r in running if worker_dead(r.data.tags.get("worker", ""))]
        _end_runs_of(client, dead, "its tune worker died (killed) before ending it; found by the next tune")
    for n in failed:
        print(f"trial {n}: its worker died mid-trial; marked failed and its params re-queued", file=sys.stderr)
    return failed
