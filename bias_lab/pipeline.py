"""One training run, end to end: data -> splits -> (eps channel) -> model -> fit -> test measures -> MLflow.

`prepare` builds the tensors once (tune reuses them for every trial, bias_eval for every model);
`train_model` trains one model inside the active MLflow run and returns the metrics it logged. The commands
(train, tune, bias_eval, bias_sweep) are built from these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from bias_lab import bias as biasmod
from bias_lab import metrics, plots, pretrained, tracking
from bias_lab.config import BiasConfig, DataConfig, TrainConfig, flat
from bias_lab.data import Dataset, Split, check_classes, load, pixel_stats, stratified_split
from bias_lab.loop import (
    EpochHook,
    FitResult,
    InputHook,
    Norm,
    Part,
    device_info,
    fit,
    predict,
    resolve_device,
    seed_everything,
)
from bias_lab.models import adapt_imagenet, build, finite_weights, resolve_stem, summarize
from bias_lab.registry import ModelMeta


@dataclass
class Prepared:
    """Everything a model needs, built once per (data, split seed, bias setting)."""

    dataset: Dataset  # the binary subset when the task is binary
    split: Split
    norm: Norm
    train: Part
    val: Part
    test: Part  # in-distribution test: S drawn with (p0, p1)
    test_decorrelated: Part | None  # binary only: same images, S = 1 on half of each class
    binary: bool
    eps: bool  # whether the model input carries the eps channel
    bias: BiasConfig

    @property
    def channels(self) -> int:
        return self.train.channels

    def meta(self, cfg: TrainConfig) -> ModelMeta:
        """The preprocessing a logged model needs at prediction time."""
        return ModelMeta(
            arch=cfg.model,
            in_channels=self.channels,
            image_size=int(self.dataset.images.shape[-1]),
            mean=self.norm.mean,
            std=self.norm.std,
            classes=self.dataset.classes,
            task="binary" if self.binary else "multiclass",
            eps_channel=self.eps,
            bias=dataclasses.asdict(self.bias) if self.binary else None,
            dataset_digest=self.dataset.digest,
            stem=resolve_stem(cfg.model, cfg.stem, int(self.dataset.images.shape[-1]), cfg.weights != "none"),
            tta=cfg.tta,
            weights=cfg.weights,
            width=cfg.width,
        )


def _part(ds: Dataset, idx: np.ndarray, ch: biasmod.Channel | None, eps: bool) -> Part:
    t = torch.from_numpy(idx)
    return Part(
        images=ds.images[t],
        labels=ds.labels[t],
        eps=ch.eps[t] if (ch is not None and eps) else None,
        s=ch.s[t] if ch is not None else None,
    )


def prepare(
    data_cfg: DataConfig,
    bias_cfg: BiasConfig,
    seed: int,
    *,
    binary: bool | None = None,
    eps: bool | None = None,
    train_p: tuple[float, float] | None = None,
    ds: Dataset | None = None,
) -> Prepared:
    """Load (cached), split, and attach S / eps.

    binary: restrict to `bias_cfg.classes` (default: when bias is on or classes are given).
    eps: append the eps channel (default: bias_cfg.bias). train_p: (p0, p1) of the channel seen in training
    and validation, when it differs from the measured distribution (model_1_mode=decorrelated).
    """
    bias_cfg.validate()
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
        ch_dec = biasmod.draw_decorrelated(
            ds.labels, split.test, bias_cfg.sigma, seed + biasmod.DECORRELATED_SEED_OFFSET, size
        )
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


def measure(
    model: nn.Module, prep: Prepared, bootstrap: int = 1000, seed: int = 0, tta: bool = False
) -> tuple[dict[str, float], np.ndarray]:
    """Final numbers on the held-out test split (the only place test data is read). Returns (metrics, confusion).
    With `tta`, predictions average the image and its mirror; test_accuracy_no_tta says what that changed."""
    logits = predict(model, prep.test, prep.norm, tta=tta)
    y = prep.test.labels.numpy()
    pred = logits.argmax(1).numpy()
    out = {
        "test_accuracy": metrics.accuracy(y, pred),
        "test_loss": float(torch.nn.functional.cross_entropy(logits, prep.test.labels)) if len(y) else math.nan,
    }
    if tta:
        out["test_accuracy_no_tta"] = metrics.accuracy(y, predict(model, prep.test, prep.norm).argmax(1).numpy())
    dec = prep.test_decorrelated
    if prep.binary and prep.test.s is not None and dec is not None and dec.s is not None:  # binary: all three are set
        out.update(
            {
                f"test_{k}": v
                for k, v in metrics.fairness(y, pred, prep.test.s.numpy(), bootstrap, seed).items()
                if k != "accuracy"
            }
        )
        dpred = predict(model, dec, prep.norm, tta=tta).argmax(1).numpy()
        out.update(
            {f"decorrelated_test_{k}": v for k, v in metrics.fairness(y, dpred, dec.s.numpy(), bootstrap, seed).items()}
        )
    return out, metrics.confusion(y, pred, len(prep.dataset.classes))


@dataclass(frozen=True)
class Outputs:
    """What train_model records besides training the model: each caller's choice, named."""

    mlflow: bool = True  # params, metrics and figures to the active run (False: a torchrun rank other than 0)
    test: bool = True  # measure on the test split (False: tune's trials, which must never read it)
    model: bool = True  # log the model, registrable (False: tune logs its final model itself, a sweep many)
    bootstrap: int = 1000  # resamples of the DI confidence interval


@dataclass
class Trained:
    """A fit already done with these settings and seed: its kept weights (on the CPU) and result. train_model records
    it instead of training again (tune's final run: its best trial, trained in this process, is what a retrain would
    reproduce bit for bit)."""

    state: dict[str, torch.Tensor]
    result: FitResult


def train_model(
    prep: Prepared,
    cfg: TrainConfig,
    outputs: Outputs = Outputs(),
    *,
    on_epoch: EpochHook | None = None,
    input_hook: InputHook | None = None,
    checkpoint: Path | None = None,
    wrap: Any = None,
    reuse: Trained | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train one model on `prep` inside the active MLflow run; return (model with best-val weights, metrics).

    `wrap(model) -> model` lets a caller add modules around the network (e.g. an adversarial head) before
    training; `on_epoch`, `input_hook` and `checkpoint` go to loop.fit. With `reuse`, its weights and per-epoch
    metrics are recorded as this run's, with no training.
    """
    log, test = outputs.mlflow, outputs.test
    seed_everything(cfg.seed, cfg.threads, cfg.deterministic)
    device = resolve_device(cfg.device)
    meta = prep.meta(cfg)
    net = build(cfg.model, prep.channels, len(prep.dataset.classes), meta.image_size, meta.stem, meta.width)
    backbone = adapt_imagenet(net, cfg.model, pretrained.state_dict(cfg.model)) if cfg.weights == "imagenet" else []
    summary = summarize(net, prep.channels, meta.image_size)
    model = (wrap(net) if wrap else net).to(device)
    if log and backbone:
        mlflow.set_tag("pretrained", pretrained.CAVEAT)
    if log:
        mlflow.log_text(summary.markdown(), "model_summary.md")
        mlflow.log_text(summary.csv(), "model_summary.csv")
        tracking.log_params(device_info(device))  # the device actually used: `auto` says nothing (train logs it first)
        tracking.log_metrics({"total_params": summary.total_params, "macs_per_image": summary.macs})

    no_val = len(prep.val) == 0  # val_fraction=0 (train on train+val): the last epoch is kept, nothing to log

    def hook(epoch: int, m: dict[str, float]) -> None:
        if log:
            tracking.log_metrics({k: v for k, v in m.items() if not (no_val and k.startswith("val_"))}, step=epoch)
        if on_epoch is not None:
            on_epoch(epoch, m)

    frozen = [p for n, p in net.named_parameters() if n in backbone]  # before the first cfg.freeze_epochs
    if reuse is not None:
        net.load_state_dict(reuse.state)
        res = reuse.result
        for epoch, m in enumerate(res.history, 1):
            hook(epoch, m)
    else:
        res = fit(
            model,
            prep.train,
            prep.val,
            cfg,
            prep.norm,
            on_epoch=hook,
            input_hook=input_hook,
            checkpoint=checkpoint,
            frozen=frozen,
        )
    out = {
        "train_time_s": res.train_time_s,
        "images_per_s": res.images_per_s,
        **({} if no_val else {"best_val_accuracy": res.best_val_accuracy, "best_epoch": float(res.best_epoch)}),
        "epochs_run": float(res.epochs_run),
        "diverged": float(res.diverged),
    }
    cm = None
    no_test = test and len(prep.test) == 0  # test_fraction=0 (or a class too small to lend one): nothing to measure
    if test and not no_test:
        m, cm = measure(net, prep, outputs.bootstrap, cfg.seed, cfg.tta)
        out.update(m)
    if log:
        tracking.log_metrics(out)
        if test:  # full runs only: a tune trial's curves are in its metrics, not 5 MB of HTML each
            tracking.log_figure(plots.learning_curves(res.history, f"{cfg.model}: learning curves"), "learning_curves")
        if cm is not None:
            tracking.log_figure(plots.confusion_matrix(cm, prep.dataset.classes), "confusion_matrix")
        if no_val:
            mlflow.set_tag(
                "no_val_split",
                "the val split is empty (val_fraction=0): the last epoch's weights were kept, no val metrics were logged",
            )
        if no_test:
            mlflow.set_tag(
                "no_test_split",
                "the test split is empty (test_fraction=0): no test metrics were logged; "
                "set test_fraction > 0 for them",
            )
        for k in ("test_di", "decorrelated_test_di"):
            if k in out and not math.isfinite(out[k]):
                mlflow.set_tag(
                    f"{k}_note",
                    metrics.explain({kk.removeprefix(k[:-2]): v for kk, v in out.items() if kk.startswith(k[:-2])}),
                )
        if res.diverged:
            mlflow.set_tag("diverged", f"loss became non-finite at epoch {res.epochs_run}: {divergence_cause(cfg)}")
        finite = finite_weights(net)
        if outputs.model and not finite:  # a NaN model would predict one class for every image, yet be registrable
            mlflow.set_tag(
                "model_not_logged",
                "the weights are not finite (training diverged before any good epoch): "
                "no model was logged; " + divergence_cause(cfg),
            )
        if outputs.model and finite:
            tracking.log_model(net, meta)
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
    tracking.log_params(
        {
            **flat(data_cfg, *configs, skip=skip),
            "data_digest": ds.digest,
            "data_source": ds.source,
            "in_channels": prep.channels,
            "num_classes": len(ds.classes),
        }
    )
    n = len(ds.labels)
    splits = np.empty(n, dtype=object)
    for name in ("train", "val", "test"):
        splits[getattr(prep.split, name)] = name
    tracking.log_dataset(
        ds.ids,
        [ds.classes[i] for i in ds.labels.tolist()],
        list(splits),
        ds.source,
        ds.digest,
        Path(ds.source).name if ds.layout != "demo" else "demo",
    )
    tracking.log_metrics(
        {
            "n_train": len(prep.split.train),
            "n_val": len(prep.split.val),
            "n_test": len(prep.split.test),
            "n_skipped_files": len(ds.skipped),
        }
    )
    mlflow.set_tags(
        {
            "data_layout": ds.layout,
            "synthetic_data": str(ds.layout == "demo").lower(),
            "task": "binary" if prep.binary else "multiclass",
        }
    )
    if ds.skipped:
        mlflow.log_text("\n".join(ds.skipped), "skipped_files.txt")
