"""What a model card states, gathered from a trained and tested model, its data and its measures (bias_lab.card
writes the text). Pure: no MLflow, no I/O."""

from __future__ import annotations

import math

from bias_lab.card import BiasFacts, Card
from bias_lab.pipeline import Prepared, Trained, baselines
from bias_lab.verdict import judge


def of_trained(
    t: Trained,
    prep: Prepared,
    name: str,
    version: str,
    study: str | None = None,
    trial: int | None = None,
    n_complete: int | None = None,
) -> Card:
    """The card of a trained, tested model registered as `name` v`version` (`study` / `trial`: where its
    hyperparameters came from, None for the command line's)."""
    ds, cfg, meta = prep.dataset, t.cfg, t.meta
    return Card(
        name=name,
        version=str(version),
        arch=cfg.model,
        in_channels=meta.in_channels,
        image_size=meta.image_size,
        classes=list(ds.classes),
        data_source="demo" if ds.layout == "demo" else ds.source,
        data_digest=ds.digest,
        synthetic=ds.layout == "demo",
        n_train=len(prep.split.train),
        n_val=len(prep.split.val),
        n_test=len(prep.split.test),
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        batch_size=cfg.batch_size,
        val_accuracy=t.measures.get("best_val_accuracy", math.nan),
        test_accuracy=t.measures.get("test_accuracy", math.nan),
        class_names={c: n for c, n in zip(meta.classes, meta.class_names) if n},  # from the data's classes.csv
        width=cfg.width if cfg.model == "lenet" else None,
        stem=meta.stem if cfg.model != "lenet" else None,
        task="binary" if prep.binary else "multiclass",
        pair=(ds.classes[0], ds.classes[1]) if prep.binary else None,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        label_smoothing=cfg.label_smoothing,
        tta=cfg.tta,
        weights=cfg.weights,
        optuna_study=study,
        optuna_trial=trial,
        n_trials_complete=n_complete,
        confusion=t.confusion,
    )


def of_bias(
    found: dict[str, float], prep: Prepared, role: str, note: str = "", mitigation: str | None = None
) -> BiasFacts:
    """A binary-task model's bias facts from its measures (`found`: the run's test and ablation metrics), with the
    labels' own DI and the verdict the comparison would give it (`note`: why the verdict does not apply)."""
    chance, base = baselines(prep)
    g = lambda k: found.get(k, math.nan)  # noqa: E731
    ablation = [
        ("as trained", "test_accuracy"),
        ("zeroed", "ablation_zero_eps_test_accuracy"),
        ("shuffled across images", "ablation_shuffle_eps_test_accuracy"),
    ]
    return BiasFacts(
        role=role,
        di_test=g("test_di"),
        di_test_ci=(g("test_di_ci_low"), g("test_di_ci_high")),
        di_decorrelated=g("decorrelated_test_di"),
        di_decorrelated_ci=(g("decorrelated_test_di_ci_low"), g("decorrelated_test_di_ci_high")),
        labels_di_test=base["in distribution"],
        labels_di_decorrelated=base["decorrelated"],
        verdict=judge(found, "", "decorrelated_test_", chance, base["decorrelated"], note).text(),
        ablation={what: g(key) for what, key in ablation if prep.eps and key in found},
        mitigation=mitigation,
    )
