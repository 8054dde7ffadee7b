"""How a process ends its runs, whatever interrupts it: every run ends with a true status (FINISHED, FAILED,
KILLED) even when SIGINT / SIGTERM arrive repeatedly or land while another connection holds the sqlite store.

Signals become exceptions only at safe points (never inside the store's own code, never while runs are being
ended), the first one wins and later ones are ignored, and ending a run stops MLflow's background writers first,
then writes each status with retries while the store is locked. tracking.run uses `held` and `end`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bias_lab.errors import first_line


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs and trials unwind and end KILLED."""


# Python runs a signal handler between two bytecodes of the main thread, wherever it is. Raised inside SQLAlchemy
# (between a write and its commit, in the connection pool), the interrupt leaves a connection checked out with its
# write transaction open, kept alive by the exception's traceback: ending the run then waits out sqlite's 20 s busy
# timeout and fails with "database is locked", the run left RUNNING. And a second signal raised while runs are being
# ended aborts the ending: children stay RUNNING. So SIGINT and SIGTERM become exceptions only at safe points: a
# signal landing in the store's code (MLflow, SQLAlchemy, Optuna's storage) is raised as that call returns to the
# project's code (a profile hook on the main thread watches for it), and one landing while runs are being ended is
# raised once they are. Once one has been raised the process is ending: later ones are ignored.
_STORE_MODULES = ("mlflow.", "sqlalchemy.", "alembic.", "optuna.storages.", "sqlite3.")
_REDELIVER_S = 0.02  # without the profile hook (another profiler holds it): how often the held signal is re-sent


class _SignalState:
    pid = 0  # the process that installed the handlers (a forked child inherits them, not this state's meaning)
    main_thread = 0
    pending: int | None = None  # a signal held until the main thread is at a safe point
    raised: int | None = None  # the signal that is ending the process
    holding = 0  # depth of sections that must not be interrupted (ending runs)
    store_call: Any = None  # the outermost store frame the pending signal landed in
    handled: tuple[int, ...] = ()  # the signals whose handler is ours


_signals = _SignalState()


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated(f"terminated by signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def _deliver() -> None:
    """Raise the pending signal now: from here on the process is ending, and the signals are ignored (SIG_IGN,
    not a handler that returns: Python restores the default handlers as it exits, and one more signal then would
    kill the process instead of letting it exit 130, or 143 for SIGTERM)."""
    signum, _signals.pending, _signals.store_call = _signals.pending, None, None
    if signum is not None and _signals.raised is None:
        _signals.raised = signum
        for handled in _signals.handled:
            signal.signal(handled, signal.SIG_IGN)
        raise _interrupt(signum)


def _store_call(frame: Any) -> Any:
    """The outermost frame of the store's code on the stack of `frame` (None: not in the store's code)."""
    outer = None
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORE_MODULES):
            outer = frame
        frame = frame.f_back
    return outer


def _on_store_return(frame: Any, event: str, _arg: Any) -> None:
    """Profile hook while a signal is pending: raise it as the store call it landed in returns (an exception a
    profile function raises comes out of the returning call, and the hook is removed)."""
    if _signals.pending is None or _signals.raised is not None:
        sys.setprofile(None)
    elif event == "return" and frame is _signals.store_call and not _signals.holding:
        sys.setprofile(None)
        _deliver()


def _redeliver() -> None:
    """Poke the main thread with the held signal until its handler has raised it (or the process ignores it)."""
    while (signum := _signals.pending) is not None and _signals.raised is None:
        time.sleep(_REDELIVER_S)
        if not _signals.holding:
            with contextlib.suppress(OSError, ValueError):  # the main thread is gone: nothing left to interrupt
                signal.pthread_kill(_signals.main_thread, signum)


def _on_signal(signum: int, frame: Any) -> None:
    if os.getpid() != _signals.pid:  # a forked child: no runs of its own to end
        raise _interrupt(signum)
    if _signals.raised is not None:  # already ending: a second Ctrl-C must not abort it
        return
    if _signals.pending is None:
        _signals.pending = signum
    if _signals.holding:  # raised as the section ends
        return
    if (store_call := _store_call(frame)) is None:
        _deliver()
    if _signals.store_call is None:
        _signals.store_call = store_call
        if sys.getprofile() is None:
            sys.setprofile(_on_store_return)
        else:
            threading.Thread(target=_redeliver, name="bias-lab-signal", daemon=True).start()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A section SIGINT/SIGTERM do not interrupt: one arriving is raised as it ends (unless one was already)."""
    _signals.holding += 1
    try:
        yield
    finally:
        _signals.holding -= 1
        if not _signals.holding and _signals.pending is not None:
            _deliver()


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt, at safe points only (see above). A SIGINT ignored
    when the process started (a background job's) stays ignored."""

    _signals.pid, _signals.main_thread = os.getpid(), threading.main_thread().ident or 0
    was = signal.getsignal(signal.SIGINT)
    ours = was in (signal.default_int_handler, _on_signal) or (
        signal.SIGINT in _signals.handled and was == signal.SIG_IGN
    )
    _signals.handled = (signal.SIGTERM, signal.SIGINT) if ours else (signal.SIGTERM,)
    _signals.pending = _signals.raised = _signals.store_call = None
    for signum in _signals.handled:
        signal.signal(signum, _on_signal)


END_RETRY_S = 30.0  # how long a status write is retried while another connection holds the sqlite store


def end(active: mlflow.ActiveRun, status: str, message: str, tb: str | None = None) -> None:
    """End `active` and every run stacked above it (children a failure left open) with `status`, SIGINT/SIGTERM
    held meanwhile. MLflow's background writers stop first: they hold the store and would write to ended runs."""
    run_id = active.info.run_id
    client = MlflowClient()
    stack = [r.info.run_id for r in _active_stack()]
    ending = stack[stack.index(run_id) :][::-1] if run_id in stack else [run_id]  # top of the stack first
    deadline = time.monotonic() + END_RETRY_S
    with held(), _store_errors_quiet():
        _stop_writers(ending)
        with contextlib.suppress(Exception):  # ending the run matters more than recording why
            client.set_tag(run_id, "error", message[:5000])
            if tb:
                client.log_text(run_id, tb, "error.txt")
        for rid in ending:
            if run_id in stack:
                _end_top(client, rid, status, deadline)
            else:
                _write_status(client, rid, status, deadline)


def _end_top(client: MlflowClient, run_id: str, status: str, deadline: float) -> None:
    """mlflow.end_run of the active run `run_id`, its status write retried while the store is locked."""
    try:
        mlflow.end_run(status)  # pops it off the active stack, then writes its status
    except Exception:  # popped; the write failed
        _write_status(client, run_id, status, deadline)


def _active_stack() -> list[mlflow.ActiveRun]:
    """The active runs, outermost first (mlflow.active_run is the last)."""
    from mlflow.tracking import fluent

    stack: Any = getattr(fluent, "_active_run_stack", None)
    return list(stack.get()) if stack is not None else []


def _stop_writers(run_ids: list[str]) -> None:
    """Stop MLflow's system-metrics samplers of `run_ids` (their last samples written) and flush async logging."""
    from mlflow.tracking import fluent

    monitors = getattr(fluent, "run_id_to_system_metrics_monitor", {})
    for rid in run_ids:
        if (monitor := monitors.pop(rid, None)) is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()


def _write_status(client: MlflowClient, run_id: str, status: str, deadline: float) -> None:
    """set_terminated, retried with a growing pause while the store is locked, until it lands or `deadline`."""
    pause = 0.05
    while True:
        try:
            client.set_terminated(run_id, status)
            return
        except MlflowException as e:
            locked = any(w in str(e).lower() for w in ("database is locked", "database is busy"))
            if not locked or time.monotonic() + pause > deadline:
                import warnings

                warnings.warn(f"could not mark run {run_id} {status} ({first_line(e)}): it shows RUNNING", stacklevel=3)
                return
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


@contextlib.contextmanager
def _store_errors_quiet() -> Iterator[None]:
    """MLflow logs a locked sqlite store with a traceback; while runs are ended `_write_status` retries instead."""
    import logging

    log = logging.getLogger("mlflow.store.db.utils")
    was, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was


def finish(run_id: str) -> None:
    """End the active run `run_id` FINISHED: its writers stopped first, the status written even under a held lock."""
    with held(), _store_errors_quiet():
        _stop_writers([run_id])
        _end_top(MlflowClient(), run_id, "FINISHED", time.monotonic() + END_RETRY_S)
