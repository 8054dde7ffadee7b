"""What a run records, in one place: its setup (params, dataset, splits), a trained model's epochs, measures,
figures, tags and weights, and a bias model's explanations. The computing modules hand their results here and
never touch MLflow themselves; a torchrun rank other than 0 simply does not call it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from bias_lab import card, explain, metrics, plots, pretrained, registry, tracking
from bias_lab.config import DataConfig, TrainConfig, flat
from bias_lab.device import device_info
from bias_lab.loop import EpochHook
from bias_lab.pipeline import Prepared, Trained

LARGE_WEIGHT_DECAY = 0.01  # 20x the usual 5e-4: beyond it the decay term alone can make SGD overshoot


def divergence_cause(cfg: TrainConfig) -> str:
    """The likely cause of a diverged run, and the fix: a large weight_decay, else the learning rate."""
    if cfg.weight_decay > LARGE_WEIGHT_DECAY:
        return f"weight_decay={cfg.weight_decay:g} is large: lower it (5e-4 is usual)"
    return f"lr={cfg.lr:g} is too high: lower it (e.g. 10x)"


def setup(prep: Prepared, data_cfg: DataConfig, *configs: Any, skip: tuple[str, ...] = ()) -> None:
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


def epochs(prep: Prepared, then: EpochHook | None = None) -> EpochHook:
    """An epoch hook that logs each epoch's metrics to the active run as training goes (the UI's live curves),
    then calls `then` (e.g. tune's pruning report). Without a val split there are no val numbers to log."""
    no_val = len(prep.val) == 0

    def hook(epoch: int, m: dict[str, float]) -> None:
        _log_epoch(epoch, m, no_val)
        if then is not None:
            then(epoch, m)

    return hook


def _log_epoch(epoch: int, m: dict[str, float], no_val: bool) -> None:
    """One epoch's metrics at step `epoch`; without a val split there are no val numbers to log."""
    tracking.log_metrics({k: v for k, v in m.items() if not (no_val and k.startswith("val_"))}, step=epoch)


def record(t: Trained, *, history: bool = False, model: bool = True) -> None:
    """A trained model on the active run: its layer table, device, measures, figures, tags and (finite) weights.

    `history`: log the per-epoch metrics too (they were not logged live: tune's kept trial, recorded in its final
    run). The learning curves are drawn for tested models only (a tune trial's curves are in its metrics, not 5 MB
    of HTML each). `model`: log the weights, registrable (tune logs its final model on the parent, a sweep may not)."""
    if history:
        for epoch, m in enumerate(t.fit.history, 1):
            _log_epoch(epoch, m, t.no_val)
    if t.pretrained:
        mlflow.set_tag("pretrained", pretrained.CAVEAT)
    mlflow.log_text(t.summary.markdown(), "model_summary.md")
    mlflow.log_text(t.summary.csv(), "model_summary.csv")
    tracking.log_params(device_info(t.device))  # the device actually used: `auto` says nothing
    tracking.log_metrics({"total_params": t.summary.total_params, "macs_per_image": t.summary.macs, **t.measures})
    if t.tested:
        tracking.log_figure(plots.learning_curves(t.fit.history, f"{t.cfg.model}: learning curves"), "learning_curves")
    if t.confusion is not None:
        named = [f"{c} ({t.meta.name_of(c)})" if t.meta.name_of(c) else c for c in t.meta.classes]  # '1 (disc)'
        tracking.log_figure(plots.confusion_matrix(t.confusion, named), "confusion_matrix")
    _tags(t)
    if model and t.finite:
        tracking.log_model(t.model, t.meta)
    elif model:  # a NaN model would predict one class for every image, yet be registrable
        mlflow.set_tag(
            "model_not_logged",
            "the weights are not finite (training diverged before any good epoch): "
            "no model was logged; " + divergence_cause(t.cfg),
        )


def _tags(t: Trained) -> None:
    """What a reader of the run must not miss: no val or test split, an undefined DI and why, a divergence."""
    if t.no_val:
        mlflow.set_tag(
            "no_val_split",
            "the val split is empty (val_fraction=0): the last epoch's weights were kept, no val metrics were logged",
        )
    if t.no_test:
        mlflow.set_tag(
            "no_test_split",
            "the test split is empty (test_fraction=0): no test metrics were logged; set test_fraction > 0 for them",
        )
    out = t.measures
    for k in ("test_di", "decorrelated_test_di"):
        if k in out and not math.isfinite(out[k]):
            mlflow.set_tag(
                f"{k}_note",
                metrics.explain({kk.removeprefix(k[:-2]): v for kk, v in out.items() if kk.startswith(k[:-2])}),
            )
    if t.fit.diverged:
        mlflow.set_tag("diverged", f"loss became non-finite at epoch {t.fit.epochs_run}: {divergence_cause(t.cfg)}")


def explanations(t: Trained, prep: Prepared, seed: int) -> dict[str, float]:
    """The eps ablation and saliency of a bias model on the active run (metrics and figure); returns the metrics."""
    found, fig = explain.explain(t.model, prep, seed, t.cfg.tta)
    tracking.log_metrics(found)
    tracking.log_figure(fig, "saliency")
    return found


def model_card(facts: card.Card) -> None:
    """A model's card on the active run: `model_card.md`, and its opening (headline, "Can I trust this model?") as
    the run's Description, the first thing its page shows."""
    mlflow.log_text(card.render(facts), registry.CARD_FILE)
    tracking.set_description(card.summary(facts, registry.CARD_FILE), registry.CARD_FILE)
