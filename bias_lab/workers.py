"""Which process is doing a piece of work, and whether it is gone: `host:pid:start`, the start time telling a
reused pid apart. tune records it on trials and runs (a dead worker's trial is re-queued); train records it next
to a checkpoint (a live owner's run is never ended)."""

from __future__ import annotations

import os
import socket

import psutil


def _proc_start(pid: int) -> str:
    """When a process started (epoch seconds, to the 1/100 s the kernel keeps); '' when it is gone or hidden."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.Error, OSError):
        return ""


def worker_dead(worker: str) -> bool:
    """True when `worker` (host:pid:start) ran on this machine and that process is gone; False when unknown."""
    parts = worker.split(":")
    if len(parts) < 3 or ":".join(parts[:-2]) != socket.gethostname() or not parts[-2].isdigit():
        return False  # another machine (only a heartbeat, RDB, can tell) or no worker recorded
    pid, start = int(parts[-2]), parts[-1]
    if not psutil.pid_exists(pid):
        return True
    return bool(start) and _proc_start(pid) not in ("", start)  # '' (another user's, hidden): count it alive


def identity(pid: int) -> str:
    """The `host:pid:start` of a process of this machine."""
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid)}"


WORKER = identity(os.getpid())  # this process
