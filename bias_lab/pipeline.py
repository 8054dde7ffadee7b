"""One training run, end to end: data -> splits -> (eps channel) -> model -> fit -> test measures -> MLflow.

`prepare` builds the tensors once (tune reuses them for every trial, bias_eval for every model);
`train_model` trains one model inside the active MLflow run and returns the metrics it logged;
`run_train` is the `train` command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from bias_lab import bias as biasmod
from bias_lab import distributed as D
from bias_lab import metrics as M
from bias_lab import plots, tracking
from bias_lab.config import TRAIN_ONLY, BiasConfig, DataConfig, TrainConfig, flat
from bias_lab.data import Dataset, Split, cache_dir, check_classes, load, pixel_stats, stratified_split
from bias_lab.errors import UserError
from bias_lab.models import build, finite_weights, summarize
from bias_lab.loop import EpochHook, InputHook, Norm, Part, fit, predict, resolve_device, seed_everything, validate
from bias_lab.workers import WORKER, worker_dead


@dataclass
class Prepared:
    """Everything a model needs, built once per (data, split seed, bias setting)."""

    dataset: Dataset  # the binary subset when the task is binary
    split: Split
    norm: Norm
    train: Part
    val: Part
    test: Part  # in-distribution test: S drawn with (p0, p1)
    test_decorrelated: Part | None  # binary only: same images, S drawn with p0 = p1 = 0.5
    binary: bool
    eps: bool  # whether the model input carries the eps channel
    bias: BiasConfig

    @property
    def channels(self) -> int:
        return self.train.channels

    def meta(self, cfg: TrainConfig) -> dict[str, Any]:
        """The preprocessing a logged model needs at prediction time."""
        return {
            "arch": cfg.model,
            "in_channels": self.channels,
            "image_size": int(self.dataset.images.shape[-1]),
            "grayscale": True,
            "mean": self.norm.mean,
            "std": self.norm.std,
            "classes": self.dataset.classes,
            "task": "binary" if self.binary else "multiclass",
            "eps_channel": self.eps,
            "bias": dataclasses.asdict(self.bias) if self.binary else None,
            "dataset_digest": self.dataset.digest,
        }


def _part(ds: Dataset, idx: np.ndarray, ch: biasmod.Channel | None, eps: bool) -> Part:
    t = torch.from_numpy(idx)
    return Part(
        images=ds.images[t],
        labels=ds.labels[t],
        eps=ch.eps[t] if (ch is not None and eps) else None,
        s=ch.s[t] if ch is not None else None,
    )


def prepare(data_cfg: DataConfig, bias_cfg: BiasConfig, seed: int, *, binary: bool | None = None,
            eps: bool | None = None, train_p: tuple[float, float] | None = None, ds: Dataset | None = None) -> Prepared:
    """Load (cached), split, and attach S / eps.

    binary: restrict to `bias_cfg.classes` (default: when bias is on or classes are given).
    eps: append the eps channel (default: bias_cfg.bias). train_p: (p0, p1) of the channel seen in training
    and validation, when it differs from the measured distribution (model_1_mode=decorrelated).
    """
    biasmod.validate(bias_cfg)
    ds = ds if ds is not None else load(data_cfg)
    check_classes(ds)
    binary = bool(bias_cfg.bias or bias_cfg.classes.strip()) if binary is None else binary
    eps = bias_cfg.bias if eps is None else eps
    if binary:
        ds = biasmod.binary_task(ds, bias_cfg.classes)
    split = stratified_split(ds.labels, data_cfg.val_fraction, data_cfg.test_fraction, seed, classes=ds.classes)
    size = int(ds.images.shape[-1])
    ch = ch_train = ch_dec = None
    if binary:
        ch = biasmod.draw(ds.labels, bias_cfg.p0, bias_cfg.p1, bias_cfg.sigma, seed, size)
        ch_train = ch if train_p is None else biasmod.draw(ds.labels, *train_p, bias_cfg.sigma, seed, size)
        ch_dec = biasmod.draw(ds.labels, 0.5, 0.5, bias_cfg.sigma, seed + biasmod.DECORRELATED_SEED_OFFSET, size)
    mean, std = pixel_stats(ds.images[torch.from_numpy(split.train)])
    return Prepared(
        dataset=ds,
        split=split,
        norm=Norm(mean, std),
        train=_part(ds, split.train, ch_train, eps),
        val=_part(ds, split.val, ch_train, eps),
        test=_part(ds, split.test, ch, eps),
        test_decorrelated=_part(ds, split.test, ch_dec, eps) if binary else None,
        binary=binary,
        eps=eps,
        bias=bias_cfg,
    )


def measure(model: nn.Module, prep: Prepared, bootstrap: int = 1000, seed: int = 0) -> tuple[dict[str, float], np.ndarray]:
    """Final numbers on the held-out test split (the only place test data is read). Returns (metrics, confusion)."""
    logits = predict(model, prep.test, prep.norm)
    y = prep.test.labels.numpy()
    pred = logits.argmax(1).numpy()
    out = {
        "test_accuracy": M.accuracy(y, pred),
        "test_loss": float(torch.nn.functional.cross_entropy(logits, prep.test.labels)) if len(y) else math.nan,
    }
    if prep.binary:
        out.update({f"test_{k}": v for k, v in M.fairness(y, pred, prep.test.s.numpy(), bootstrap, seed).items() if k != "accuracy"})
        dec = prep.test_decorrelated
        dpred = predict(model, dec, prep.norm).argmax(1).numpy()
        out.update({f"decorrelated_test_{k}": v for k, v in M.fairness(y, dpred, dec.s.numpy(), bootstrap, seed).items()})
    return out, M.confusion(y, pred, len(prep.dataset.classes))


def train_model(prep: Prepared, cfg: TrainConfig, *, log: bool = True, on_epoch: EpochHook | None = None,
                input_hook: InputHook | None = None, checkpoint: Path | None = None, log_model: bool = True,
                bootstrap: int = 1000, test: bool = True, wrap: Any = None) -> tuple[nn.Module, dict[str, float]]:
    """Train one model on `prep` inside the active MLflow run; return (model with best-val weights, metrics).

    `test=False` skips the test split entirely (tune's trials). `wrap(model) -> model` lets a caller add
    modules around the network (e.g. an adversarial head) before training.
    """
    seed_everything(cfg.seed, cfg.threads)
    device = resolve_device(cfg.device)
    net = build(cfg.model, prep.channels, len(prep.dataset.classes), int(prep.dataset.images.shape[-1]))
    summary = summarize(net, prep.channels, int(prep.dataset.images.shape[-1]))
    model = (wrap(net) if wrap else net).to(device)
    if log:
        mlflow.log_text(summary.markdown(), "model_summary.md")
        mlflow.log_text(summary.csv(), "model_summary.csv")
        tracking.log_metrics({"total_params": summary.total_params, "macs_per_image": summary.macs})

    def hook(epoch: int, m: dict[str, float]) -> None:
        if log:
            tracking.log_metrics(m, step=epoch)
        if on_epoch is not None:
            on_epoch(epoch, m)

    res = fit(model, prep.train, prep.val, cfg, prep.norm, on_epoch=hook, input_hook=input_hook, checkpoint=checkpoint)
    out = {
        "train_time_s": res.train_time_s,
        "images_per_s": res.images_per_s,
        "best_val_accuracy": res.best_val_accuracy,
        "best_epoch": float(res.best_epoch),
        "epochs_run": float(res.epochs_run),
        "diverged": float(res.diverged),
    }
    cm = None
    no_test = test and len(prep.test) == 0  # test_fraction=0 (or a class too small to lend one): nothing to measure
    if test and not no_test:
        m, cm = measure(net, prep, bootstrap, cfg.seed)
        out.update(m)
    if log:
        tracking.log_metrics(out)
        if test:  # full runs only: a tune trial's curves are in its metrics, not 5 MB of HTML each
            tracking.log_figure(plots.learning_curves(res.history, f"{cfg.model}: learning curves"), "learning_curves")
        if cm is not None:
            tracking.log_figure(plots.confusion_matrix(cm, prep.dataset.classes), "confusion_matrix")
        if no_test:
            mlflow.set_tag("no_test_split", "the test split is empty (test_fraction=0): no test metrics were logged; "
                                            "set test_fraction > 0 for them")
        for k in ("test_di", "decorrelated_test_di"):
            if k in out and not math.isfinite(out[k]):
                mlflow.set_tag(f"{k}_note", M.explain({kk.removeprefix(k[:-2]): v for kk, v in out.items() if kk.startswith(k[:-2])}))
        if res.diverged:
            mlflow.set_tag("diverged", f"loss became non-finite at epoch {res.epochs_run}: {divergence_cause(cfg)}")
        finite = finite_weights(net)
        if log_model and not finite:  # a NaN model would predict one class for every image, yet be registrable
            mlflow.set_tag("model_not_logged", "the weights are not finite (training diverged before any good epoch): "
                                               "no model was logged; " + divergence_cause(cfg))
        if log_model and finite:
            tracking.log_model(net, prep.meta(cfg))
    return net, out


LARGE_WEIGHT_DECAY = 0.01  # 20x the usual 5e-4: beyond it the decay term alone can make SGD overshoot


def divergence_cause(cfg: TrainConfig) -> str:
    """The likely cause of a diverged run, and the fix: a large weight_decay, else the learning rate."""
    if cfg.weight_decay > LARGE_WEIGHT_DECAY:
        return f"weight_decay={cfg.weight_decay:g} is large: lower it (5e-4 is usual)"
    return f"lr={cfg.lr:g} is too high: lower it (e.g. 10x)"


def log_setup(prep: Prepared, data_cfg: DataConfig, *configs: Any, skip: tuple[str, ...] = ()) -> None:
    """Params (every knob the run uses, verbatim; not `skip`), dataset inputs, split sizes and data tags of the active run."""
    ds = prep.dataset
    tracking.log_params({**flat(data_cfg, *configs, skip=skip), "data_digest": ds.digest, "data_source": ds.source,
                         "in_channels": prep.channels, "num_classes": len(ds.classes)})
    n = len(ds.labels)
    splits = np.empty(n, dtype=object)
    for name in ("train", "val", "test"):
        splits[getattr(prep.split, name)] = name
    tracking.log_dataset(ds.ids, [ds.classes[i] for i in ds.labels.tolist()], list(splits), ds.source, ds.digest,
                         Path(ds.source).name if ds.layout != "demo" else "demo")
    tracking.log_metrics({"n_train": len(prep.split.train), "n_val": len(prep.split.val), "n_test": len(prep.split.test),
                          "n_skipped_files": len(ds.skipped)})
    mlflow.set_tags({"data_layout": ds.layout, "synthetic_data": str(ds.layout == "demo").lower(), "task": "binary" if prep.binary else "multiclass"})
    if ds.skipped:
        mlflow.log_text("\n".join(ds.skipped), "skipped_files.txt")


def checkpoint_path(data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, digest: str) -> Path:
    """Where `train` checkpoints: one file per configuration, so `resume=true` with the same command finds it."""
    key = {k: v for k, v in flat(data_cfg, train_cfg, bias_cfg).items()
           if k not in (*TRAIN_ONLY, "device", "threads", "cache_dir")}
    h = hashlib.sha256(json.dumps({**key, "digest": digest}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(data_cfg) / "checkpoints" / f"{train_cfg.model}-{h}.pt"


def run_train(data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig) -> dict[str, float]:
    """The `train` command: one tracked run; returns its metrics (rank 0's; {} on the other torchrun ranks)."""
    validate(train_cfg)  # before any data is decoded or run opened: a bad setting costs nothing
    with D.session(resolve_device(train_cfg.device)):
        if D.is_main():
            tracking.setup()
        seed_everything(train_cfg.seed, train_cfg.threads)  # before prepare: `threads` shapes its float sums too
        with D.main_first():  # rank 0 decodes into the cache, the other ranks then read it
            prep = prepare(data_cfg, bias_cfg, train_cfg.seed)
        ck = checkpoint_path(data_cfg, train_cfg, bias_cfg, prep.dataset.digest)
        if not D.is_main():  # torchrun: the same steps on another shard; rank 0 tests and logs
            train_model(prep, train_cfg, log=False, checkpoint=ck, test=False)
            return {}
        return _train_tracked(prep, data_cfg, train_cfg, bias_cfg, ck)


def _train_tracked(prep: Prepared, data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, ck: Path) -> dict[str, float]:
    run_file = ck.with_suffix(".run")  # the MLflow run that owns the checkpoint, and its process: resume continues it
    owner = _read_owner(run_file)
    status = _status(owner.get("run_id"))  # None: no such run (deleted, or another store): start a fresh one
    _refuse_live_owner(owner, status, run_file)
    previous = owner.get("run_id") if status is not None else None
    if previous and train_cfg.resume and status == "FINISHED":
        # re-opening it would log a second model into a good run, and turn it FAILED if the resume failed
        warnings.warn(f"resume=true but run {previous} of this configuration already FINISHED: starting a fresh run "
                      "(the finished run is left as it is)")
        previous = None
        train_cfg = dataclasses.replace(train_cfg, resume=False)  # its checkpoint is the end: train from scratch
    if previous and not (train_cfg.resume and ck.exists()):
        if status == "RUNNING":  # a fresh start: the SIGKILLed run it replaces must not stay RUNNING
            _end_orphan(previous)
        previous = None
    if train_cfg.resume and not previous:  # said, so resume=true in the run's params is not read as a continuation
        warnings.warn("resume=true but there is no unfinished run of this configuration to continue (a finished run "
                      "deletes its checkpoint unless keep_checkpoint=true): starting a fresh run")
    with tracking.run(f"train-{train_cfg.model}", tags={"entry_point": "train"}, run_id=previous) as active:
        # an unwritable folder (warned once): the checkpoint would fail too, so train without one
        checkpoint = ck if _write_owner(run_file, active.info.run_id) else None
        if previous:
            mlflow.set_tag("resumed", "true")
        else:
            log_setup(prep, data_cfg, train_cfg, bias_cfg)
        tracking.log_params({"device_resolved": str(resolve_device(train_cfg.device)), "world_size": D.world()})
        if checkpoint is not None:
            mlflow.set_tag("checkpoint", str(checkpoint))
        _, out = train_model(prep, train_cfg, checkpoint=checkpoint)
        print(", ".join(f"{k}={v:.4g}" for k, v in out.items() if k in _SHOWN), file=sys.stderr)
        print(tracking.ui_hint(active), file=sys.stderr)
    if checkpoint is not None:
        _finished(ck, run_file, active.info.run_id, train_cfg.keep_checkpoint)
    return out


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
        warnings.warn(f"cannot write the checkpoint files in {run_file.parent} ({e.strerror or e}): training goes on "
                      "without checkpoints, so it cannot be resumed; point cache_dir at a writable folder")
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
        raise UserError(f"another train of this configuration is running (pid {pid} on {host}, "
                        f"run {owner['run_id']}): wait for it, or change a setting (e.g. seed); if that process is not "
                        f"a bias-lab train, delete {run_file}")


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
        warnings.warn(f"cannot {'update' if keep else 'delete'} the checkpoint files {ck.with_suffix('.*')} "
                      f"({e.strerror or e}): delete them by hand")


_SHOWN = ("best_val_accuracy", "test_accuracy", "test_di", "decorrelated_test_di", "train_time_s", "images_per_s")
