"""The `train` command: one tracked run of one model, resumable from its checkpoint.

The run and the checkpoint belong together: a `.run` file next to the checkpoint records the MLflow run and the
process that own it, so `resume=true` continues that run, a second train of the same configuration is refused while
the first lives, and a run whose process was SIGKILLed is ended KILLED rather than left RUNNING.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
import torch

from bias_lab import config, distributed, facts, pipeline, pretrained, recorder, tracking
from bias_lab.checkpoint import check_checkpoint
from bias_lab.config import TRAIN_ONLY, BiasConfig, DataConfig, TrainConfig, flat
from bias_lab.data import cache_dir, check_cache_dir
from bias_lab.device import resolve_device, seed_everything
from bias_lab.errors import UserError, check
from bias_lab.workers import WORKER, worker_dead


def checkpoint_path(
    data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, digest: str, device_type: str | None = None
) -> Path:
    """Where `train` checkpoints: one file per configuration and kind of device (`device_type`, default: what
    train_cfg.device resolves to), so `resume=true` with the same command finds it. device=auto and device=cuda on
    a GPU share one, as do runs differing only in threads; a CPU and a GPU run do not: a checkpoint's random
    streams (and bf16 vs fp32 numbers) belong to one kind of device. (A CPU key hashes no device type; a setting
    added to TrainConfig changes every key, so an older version's checkpoint is not resumed.)"""
    device_type = device_type or resolve_device(train_cfg.device).type
    key = {
        k: v
        for k, v in flat(data_cfg, train_cfg, bias_cfg).items()
        if k not in (*TRAIN_ONLY, "device", "threads", "cache_dir")
    }
    if device_type != "cpu":
        key["device_type"] = device_type
    h = hashlib.sha256(json.dumps({**key, "digest": digest}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(data_cfg) / "checkpoints" / f"{train_cfg.model}-{h}.pt"


def run_train(data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig) -> dict[str, float]:
    """The `train` command: one tracked run; returns its metrics (rank 0's; {} on the other torchrun ranks)."""
    config.validate("train", data_cfg, train_cfg, bias_cfg)  # before any data is decoded or run opened
    check_cache_dir(data_cfg)  # a file where the cache should be: before the demo is generated into it
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    device = resolve_device(train_cfg.device)  # device=cuda without a usable GPU: a one-line error, before any work
    with distributed.session(device):
        if distributed.is_main():
            tracking.setup()
        # before pipeline.prepare: `threads` shapes its float sums too
        seed_everything(train_cfg.seed, train_cfg.threads, train_cfg.deterministic)
        # The checkpoint's name holds the data's digest, a hash of the decoded pixels: on a resume they come from
        # the cache the interrupted run filled, so the checkpoint is checked before any image is decoded (and
        # before its run is re-opened, in _train_tracked); only if the cache was lost are they decoded first.
        with distributed.main_first():  # rank 0 decodes into the cache, the other ranks then read it
            prep = pipeline.prepare(data_cfg, bias_cfg, train_cfg.seed)
        ck = checkpoint_path(data_cfg, train_cfg, bias_cfg, prep.dataset.digest, device.type)
        if not distributed.is_main():  # torchrun: the same steps on another shard; rank 0 tests and records
            pipeline.train(prep, train_cfg, device, test=False, checkpoint=ck)
            return {}
        return _train_tracked(prep, data_cfg, train_cfg, bias_cfg, ck, device)


def _train_tracked(
    prep: pipeline.Prepared,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    bias_cfg: BiasConfig,
    ck: Path,
    device: torch.device,
) -> dict[str, float]:
    run_file = ck.with_suffix(".run")  # the MLflow run that owns the checkpoint, and its process: resume continues it
    with contextlib.ExitStack() as stack:
        with _owning(ck):  # from reading the owner to recording this process: of two trains started at once, one
            previous, train_cfg = _take_over(run_file, ck, train_cfg)
            active = stack.enter_context(
                tracking.run(f"train-{train_cfg.model}", tags={"entry_point": "train"}, run_id=previous)
            )
            # an unwritable folder (warned once): the checkpoint would fail too, so train without one
            checkpoint = ck if _write_owner(run_file, active.info.run_id) else None
        if previous:
            _resumed(previous)
        else:
            recorder.setup(prep, data_cfg, train_cfg, bias_cfg)
        tracking.log_params({"world_size": distributed.world()})
        if checkpoint is not None:
            mlflow.set_tag("checkpoint", str(checkpoint))
        trained = pipeline.train(prep, train_cfg, device, checkpoint=checkpoint, on_epoch=recorder.epochs(prep))
        recorder.record(trained)
        check(
            trained.finite,  # a NaN model has no test accuracy: the run ends FAILED, saying why
            f"training diverged at epoch {trained.fit.epochs_run}: the weights are not finite, so nothing was "
            f"tested and no model was logged; {recorder.divergence_cause(train_cfg)}",
        )
        out = trained.measures
        if "test_accuracy" in out:
            role = "trained with the eps channel (bias=true)" if prep.eps else "trained on the images only"
            bias = facts.of_bias(out, prep, role) if prep.binary else None
            plain = facts.of_trained(trained, prep, active.info.run_name, "")
            recorder.model_card(dataclasses.replace(plain, hparams_source="the command line", bias=bias))
        print(", ".join(f"{k}={v:.4g}" for k, v in out.items() if k in _SHOWN), file=sys.stderr)
        print(tracking.ui_hint(active), file=sys.stderr)
    if checkpoint is not None:
        _finished(ck, run_file, active.info.run_id, train_cfg.keep_checkpoint)
    return out


def _take_over(run_file: Path, ck: Path, train_cfg: TrainConfig) -> tuple[str | None, TrainConfig]:
    """The run to continue (None: start a fresh one) and the settings to train with, decided from the checkpoint's
    owner; a live owner, or a checkpoint resume=true cannot read, is refused here, before any run is opened."""
    owner = _read_owner(run_file)
    status = _status(owner.get("run_id"))  # None: no such run (deleted, or another store): start a fresh one
    _refuse_live_owner(owner, status, run_file)
    previous = owner.get("run_id") if status is not None else None
    if previous and train_cfg.resume and status == "FINISHED":
        # re-opening it would log a second model into a good run, and turn it FAILED if the resume failed
        warnings.warn(
            f"resume=true but run {previous} of this configuration already FINISHED: starting a fresh run "
            "(the finished run is left as it is)"
        )
        previous = None
        train_cfg = dataclasses.replace(train_cfg, resume=False)  # its checkpoint is the end: train from scratch
    if train_cfg.resume and ck.exists():  # fit would read it: a damaged one leaves the interrupted run as it is
        check_checkpoint(ck)
    if previous and not (train_cfg.resume and ck.exists()):
        if status == "RUNNING":  # a fresh start: the SIGKILLed run it replaces must not stay RUNNING
            _end_orphan(previous)
        previous = None
    if train_cfg.resume and not previous:  # said, so resume=true in the run's params is not read as a continuation
        warnings.warn(
            "resume=true but there is no unfinished run of this configuration to continue (a finished run "
            "deletes its checkpoint unless keep_checkpoint=true): starting a fresh run"
        )
    return previous, train_cfg


OWNER_LOCK_S = 120.0  # taking ownership is a store read and a run start: a lock held longer belongs to a stuck train


@contextlib.contextmanager
def _owning(ck: Path) -> Iterator[None]:
    """Hold the cache's checkpoint lock (a file lock: the system frees it when its process dies), so that reading a
    configuration's owner and recording this process as the new one are one step: two trains of one configuration
    started together both found no live owner, and both trained into one checkpoint. Without a writable cache
    there is no checkpoint to share (_write_owner warns): nothing is held."""
    from filelock import FileLock, Timeout

    path, lock = ck.parent.parent / "checkpoints.lock", None
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        lock = FileLock(str(path), timeout=OWNER_LOCK_S)
    if lock is None:
        yield
        return
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"another train has held {path} for {OWNER_LOCK_S:.0f} s while taking over its checkpoint: "
            "wait for it and try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _resumed(run_id: str) -> None:
    """Mark the re-opened run resumed. The error its interruption recorded moves to `resumed_after`: a run that
    now finishes has no error, one that fails again records its own."""
    client = mlflow.MlflowClient()
    error = client.get_run(run_id).data.tags.get("error")
    mlflow.set_tag("resumed", "true")
    if error is not None:
        mlflow.set_tag("resumed_after", error)
        client.delete_tag(run_id, "error")


def _read_owner(run_file: Path) -> dict[str, Any]:
    """{run_id, worker} recorded next to a checkpoint; {} when there is none. A bare run id is an older file."""
    try:
        text = run_file.read_text().strip()
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    return owner if isinstance(owner, dict) else {"run_id": text}


def _write_owner(run_file: Path, run_id: str) -> bool:
    """Record this process as the run's owner. False (one warning) when the cache folder is not writable: that
    only costs the resume, never the run."""
    owner = {"run_id": run_id, "worker": WORKER}
    try:
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(owner))
    except OSError as e:
        warnings.warn(
            f"cannot write the checkpoint files in {run_file.parent} ({e.strerror or e}): training goes on "
            "without checkpoints, so it cannot be resumed; point cache_dir at a writable folder"
        )
        return False
    return True


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that owns the checkpoint may still be training. This process (an earlier train in the
    same Python session, done by now) counts as gone; another host's process cannot be checked, so it counts as
    alive."""
    worker = owner.get("worker")
    return isinstance(worker, str) and worker != WORKER and not worker_dead(worker)


def _refuse_live_owner(owner: dict[str, Any], status: str | None, run_file: Path) -> None:
    """Two trains of one configuration (only device or threads differ) would share one checkpoint and one run: the
    second must neither end the first's run nor overwrite its checkpoint. Refuse, rather than write elsewhere: a
    separate checkpoint could not be found by `resume=true`, and the two runs would train the same thing."""
    if status == "RUNNING" and _alive(owner):
        host, pid = owner["worker"].rsplit(":", 2)[:2]
        raise UserError(
            f"another train of this configuration is running (pid {pid} on {host}, "
            f"run {owner['run_id']}): wait for it, or change a setting (e.g. seed); if that process is not "
            f"a bias-lab train, delete {run_file}"
        )


def _status(run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except Exception:
        return None


def _end_orphan(run_id: str) -> None:
    """End a RUNNING run left by a killed `train` (SIGKILL runs no handler) as KILLED. Only called once its
    owner process is known to be gone (_refuse_live_owner)."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "error", "killed (the process ended without closing its run); superseded by a new run")
    client.set_terminated(run_id, "KILLED")


def _finished(ck: Path, run_file: Path, run_id: str, keep: bool) -> None:
    """After a FINISHED run: its checkpoint only served resuming, so delete it (and its .run file) unless asked to
    keep it; a kept one stays without an owner process, so the next train of this configuration is not refused."""
    try:
        if keep:
            run_file.write_text(json.dumps({"run_id": run_id}))
        else:
            for f in (ck, run_file):  # the checkpoint may never have been written (an unwritable cache)
                if f.exists():
                    f.unlink()
    except OSError as e:
        warnings.warn(
            f"cannot {'update' if keep else 'delete'} the checkpoint files {ck.with_suffix('.*')} "
            f"({e.strerror or e}): delete them by hand"
        )


_SHOWN = ("best_val_accuracy", "test_accuracy", "test_di", "decorrelated_test_di", "train_time_s", "images_per_s")
