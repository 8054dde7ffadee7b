"""One model, end to end: data -> splits -> (eps channel) -> model -> fit -> test measures. Records nothing.

`prepare` builds the tensors once (tune reuses them for every trial, bias_eval for every model); `train` trains
one model and measures it, returning a `Trained`, which bias_lab.recorder writes to MLflow. The commands (train,
tune, bias_eval, bias_sweep) are built from these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bias_lab import bias as biasmod
from bias_lab import files, metrics, pretrained
from bias_lab.config import BiasConfig, DataConfig, TrainConfig
from bias_lab.data import Dataset, Split, check_classes, load, pixel_stats, stratified_split
from bias_lab.loop import EpochHook, FitResult, InputHook, Norm, Part, fit, predict
from bias_lab.models import ModelMeta, Summary, adapt_imagenet, build, finite_weights, resolve_stem, summarize


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
        """The preprocessing a logged model needs at prediction time, with the class names of the data's
        classes.csv."""
        names = files.class_names(Path(self.dataset.root)) if self.dataset.root else {}
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
            class_names=[names.get(c, "") for c in self.dataset.classes],
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
    low, high = metrics.wilson(int((y == pred).sum()), len(y))  # the accuracy's 95% CI over the test images
    out = {
        "test_accuracy": metrics.accuracy(y, pred),
        "test_accuracy_ci_low": low,
        "test_accuracy_ci_high": high,
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


@dataclass
class Trained:
    """One model trained (and, unless asked not to, tested): everything a recorder writes and a command returns."""

    model: nn.Module  # the network with its kept (best-val) weights, without any training-time wrapper
    cfg: TrainConfig
    meta: ModelMeta  # the preprocessing it needs at prediction time
    fit: FitResult
    summary: Summary  # the layer table
    device: torch.device
    measures: dict[str, float]  # timings, best val, and the test measures when tested
    confusion: np.ndarray | None = None  # test split, rows = true class
    pretrained: bool = False  # an ImageNet backbone was loaded
    tested: bool = True  # the test split was asked for (tune's trials never read it)
    no_val: bool = False  # val_fraction=0: the last epoch's weights were kept, there are no val numbers

    @property
    def no_test(self) -> bool:
        """The test split was asked for but is empty (test_fraction=0)."""
        return self.tested and self.finite and "test_accuracy" not in self.measures

    @property
    def finite(self) -> bool:
        return finite_weights(self.model)


def train(
    prep: Prepared,
    cfg: TrainConfig,
    device: torch.device,
    *,
    test: bool = True,
    bootstrap: int = 1000,
    on_epoch: EpochHook | None = None,
    input_hook: InputHook | None = None,
    checkpoint: Path | None = None,
    wrap: Any = None,
) -> Trained:
    """Train one model on `prep` and measure it on the test split (`test`); records nothing.

    `wrap(model) -> model` lets a caller add modules around the network (e.g. an adversarial head) before
    training; `on_epoch`, `input_hook` and `checkpoint` go to loop.fit. `bootstrap`: resamples of the DI's CI.
    """
    torch.manual_seed(cfg.seed)  # every model starts from its own seed, whatever trained before it in this process
    meta = prep.meta(cfg)
    net = build(cfg.model, prep.channels, len(prep.dataset.classes), meta.image_size, meta.stem, meta.width)
    backbone = adapt_imagenet(net, cfg.model, pretrained.state_dict(cfg.model)) if cfg.weights == "imagenet" else []
    summary = summarize(net, prep.channels, meta.image_size)
    model = (wrap(net) if wrap else net).to(device)
    frozen = [p for n, p in net.named_parameters() if n in backbone]  # before the first cfg.freeze_epochs
    res = fit(
        model,
        prep.train,
        prep.val,
        cfg,
        prep.norm,
        on_epoch=on_epoch,
        input_hook=input_hook,
        checkpoint=checkpoint,
        frozen=frozen,
    )
    no_val = len(prep.val) == 0
    out = {
        "train_time_s": res.train_time_s,
        "images_per_s": res.images_per_s,
        **({} if no_val else {"best_val_accuracy": res.best_val_accuracy, "best_epoch": float(res.best_epoch)}),
        "epochs_run": float(res.epochs_run),
        "diverged": float(res.diverged),
    }
    trained = Trained(net, cfg, meta, res, summary, device, out, None, bool(backbone), False, no_val)
    if test and not trained.finite:  # diverged before any good epoch: a NaN model has no test accuracy
        return dataclasses.replace(trained, tested=True)
    return tested(trained, prep, bootstrap) if test else trained


def tested(t: Trained, prep: Prepared, bootstrap: int = 1000) -> Trained:
    """`t` with its test measures (test_fraction=0, or a class too small to lend one: nothing to measure)."""
    if len(prep.test) == 0:
        return dataclasses.replace(t, tested=True)
    m, cm = measure(t.model, prep, bootstrap, t.cfg.seed, t.cfg.tta)
    return dataclasses.replace(t, measures={**t.measures, **m}, confusion=cm, tested=True)


def baselines(prep: Prepared) -> tuple[float, dict[str, float]]:
    """Chance (majority-class share) and the labels' own DI on a binary task's test split, in distribution and
    decorrelated: what a model that learned the task but ignores eps would score."""
    y = prep.test.labels.numpy()
    assert prep.test.s is not None and prep.test_decorrelated is not None and prep.test_decorrelated.s is not None
    chance = max(y.mean(), 1 - y.mean()) if len(y) else math.nan
    return chance, {
        "in distribution": metrics.base_rate_di(y, prep.test.s.numpy()),
        "decorrelated": metrics.base_rate_di(y, prep.test_decorrelated.s.numpy()),
    }
