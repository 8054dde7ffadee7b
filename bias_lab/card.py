"""A model card for every tested model (a registered version, a train run, a bias study's models): what the model is, what it was trained and tested on, and whether
to trust it, answered from those facts.

`Card` holds the facts (architecture, classes, data, training, results, an optional bias study); `render` writes
the full model_card.md, `summary` the version's Description in the MLflow Model Registry (headline first, at most
4,000 characters, ending with a pointer to the full card). The "Can I trust this model?" section follows the
requirements the course cites from the EU AI Act (data quality, transparency, robustness, non-discrimination,
human oversight): what was tested, what was not, and what a person must check. Pure: no MLflow, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bias_lab.markdown import fmt, table
from bias_lab.metrics import FOUR_FIFTHS, wilson

SUMMARY_LIMIT = 4000  # characters of a version's Description (the sqlite store holds 5,000)
SMALL_TEST = 100  # fewer test images than this: the accuracy's CI is too wide to compare models
UNEVEN = 0.15  # per-class test accuracies further apart than 15 points: the model is uneven across classes
ARCH_NAMES = {"lenet": "LeNet", "alexnet": "AlexNet", "resnet18": "ResNet-18", "resnet34": "ResNet-34"}


@dataclass(frozen=True)
class BiasFacts:
    """A bias-study model's disparate impact DI = P(y_hat=1|S=0) / P(y_hat=1|S=1) (S=1: eps present)."""

    role: str  # e.g. "model_2: trained with eps present with a label-dependent probability"
    di_test: float  # in distribution: S correlated with y as in training
    di_test_ci: tuple[float, float]
    di_decorrelated: float  # S independent of y: DI of the model, not of the data
    di_decorrelated_ci: tuple[float, float]
    labels_di_test: float  # the labels' own DI on the same split (what a perfect classifier scores)
    labels_di_decorrelated: float
    verdict: str  # the four-fifths rule on the decorrelated test (verdict.Verdict.text())
    ablation: dict[str, float] = field(default_factory=dict)  # test accuracy by eps treatment: as trained, zeroed...
    mitigation: str | None = None  # what was done against the shortcut, None when nothing


@dataclass(frozen=True)
class Card:
    """The facts a model card states. Optional facts are None (or empty) when unknown."""

    name: str  # registered model name
    version: str
    arch: str  # lenet / alexnet / resnet18 / resnet34
    in_channels: int  # image channels + 1 when the eps channel is appended
    image_size: int  # side of the square input, px
    classes: list[str]  # label strings, in output order
    data_source: str  # the data folder, or "demo"
    data_digest: str
    synthetic: bool  # the generated demo shapes, not photos
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    lr: float
    momentum: float
    batch_size: int
    val_accuracy: float  # best val accuracy: what picked the hyperparameters and the champion
    test_accuracy: float
    class_names: dict[str, str] = field(default_factory=dict)  # label -> name, e.g. {"1": "cauliflower"}
    width: int | None = None  # LeNet's channel multiplier
    stem: str | None = None  # "small" / "imagenet"
    grayscale: bool = True
    task: str = "multiclass"  # or "binary"
    pair: tuple[str, str] | None = None  # the binary task's (class 0, class 1) labels
    weight_decay: float | None = None
    seed: int | None = None
    label_smoothing: float | None = None
    tta: bool = False  # predictions average the image and its mirror
    weights: str = "none"  # "imagenet": started from torchvision's ImageNet-1k weights
    hparams_source: str = ""  # where the hyperparameters came from, when not an Optuna study of this card's
    optuna_study: str | None = None  # None: the hyperparameters are the command line's
    optuna_trial: int | None = None
    n_trials_complete: int | None = None
    confusion: np.ndarray | None = None  # test split; rows = true class, columns = predicted, in `classes` order
    bias: BiasFacts | None = None


def pct(x: float) -> str:
    """An accuracy as a person reads it: 92.8%."""
    return fmt(x, pct=True)


def di(x: float) -> str:
    """A DI to 2 decimals (n/a, inf when undefined)."""
    return "n/a" if math.isnan(x) else "inf" if math.isinf(x) else f"{x:.2f}"


def test_ci(card: Card) -> tuple[float, float]:
    """The test accuracy's 95% Wilson interval."""
    return wilson(round(card.test_accuracy * card.n_test), card.n_test)


def per_class_accuracy(confusion: np.ndarray) -> list[float]:
    """Recall of each class (diagonal / row sum) of a confusion matrix; NaN for a class without test images."""
    m = np.asarray(confusion, dtype=float)
    rows = m.sum(axis=1)
    return [float(m[i, i] / rows[i]) if rows[i] else math.nan for i in range(len(m))]


def _confusion(card: Card) -> np.ndarray | None:
    """The card's confusion matrix when it is one row and column per class, else None (not shown)."""
    if card.confusion is None:
        return None
    m = np.asarray(card.confusion)
    return m if m.shape == (len(card.classes), len(card.classes)) else None


def class_label(card: Card, label: str) -> str:
    """'1 (cauliflower)' when the name is known, else the label."""
    name = card.class_names.get(label)
    return f"{label} ({name})" if name else label


def hparam_origin(card: Card) -> str:
    """Where lr, momentum and batch size came from."""
    if card.hparams_source:
        return card.hparams_source
    if card.optuna_study is None:
        return "the command line defaults"
    of = f" of {card.n_trials_complete} complete trials" if card.n_trials_complete is not None else ""
    trial = f"trial {card.optuna_trial}" if card.optuna_trial is not None else "the best trial"
    return f"{trial} of Optuna study {card.optuna_study} (best val accuracy{of})"


def title(card: Card) -> str:
    """'bias-lab v3' for a registered version, the run's model name ('model_2') for one that is not."""
    return f"{card.name} v{card.version}" if card.version else card.name


def headline(card: Card) -> str:
    """One line: which model, on what, how good."""
    lo, hi = test_ci(card)
    arch = ARCH_NAMES.get(card.arch, card.arch)
    what = ", ".join(f"{c}={card.class_names[c]}" if c in card.class_names else c for c in card.classes)
    data = "SYNTHETIC demo data" if card.synthetic else f"data {card.data_digest}"
    return (
        f"**{title(card)}**: {arch} on {len(card.classes)} classes ({what}), {data}. "
        f"Test accuracy {pct(card.test_accuracy)} (95% CI {pct(lo)}–{pct(hi)}, {card.n_test} images), "
        f"val accuracy {pct(card.val_accuracy)}."
        + ("" if learned(card) else " It did not learn its task (the CI reaches chance).")
    )


def _model_rows(card: Card) -> list[tuple[str, str]]:
    """The architecture table's rows."""
    extra = card.in_channels - (1 if card.grayscale else 3)
    kind = ("grayscale" if card.grayscale else "RGB") + (" + noise channel eps" if extra > 0 else "")
    channels = f"{card.in_channels} channel{'s' if card.in_channels > 1 else ''} ({kind})"
    task = (
        "multiclass"
        if card.task != "binary" or not card.pair
        else "binary: " + " vs ".join(class_label(card, c) for c in card.pair)
    )
    weights = "started from torchvision's ImageNet-1k weights" if card.weights == "imagenet" else "trained from scratch"
    rows = [("architecture", ARCH_NAMES.get(card.arch, card.arch))]
    rows += [("width", str(card.width))] if card.width is not None else []
    rows += [("stem", card.stem)] if card.stem else []
    return rows + [
        ("input", f"{card.image_size}×{card.image_size} px, {channels}"),
        ("task", task),
        ("outputs", ", ".join(class_label(card, c) for c in card.classes)),
        ("weights", weights),
        ("test-time augmentation", "image + mirror averaged" if card.tta else "none"),
        ("use", _use(card)),
    ]


def _use(card: Card) -> str:
    """How to get predictions from it: the pyfunc takes image files as they come (bias_lab.serving)."""
    how = (
        f"any image (bytes or a path), decoded, made grayscale and resized to {card.image_size} px as in training; "
        "returns label, class name and probabilities"
    )
    return how + (f": `mlflow models serve -m models:/{card.name}/{card.version}`" if card.version else "")


def _training_rows(card: Card) -> list[tuple[str, str]]:
    """The training table's rows (known facts only)."""
    opt = [
        ("weight decay", card.weight_decay),
        ("label smoothing", card.label_smoothing),
        ("seed", card.seed),
    ]
    return [
        ("hyperparameters from", hparam_origin(card)),
        ("epochs", str(card.epochs)),
        ("learning rate", f"{card.lr:.3g}"),
        ("momentum", f"{card.momentum:.3g}"),
        ("batch size", str(card.batch_size)),
    ] + [(k, f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in opt if v is not None]


def _classes_table(card: Card) -> str:
    """Each output class with its name and, given a confusion matrix, its test accuracy and image count."""
    m = _confusion(card)
    per = per_class_accuracy(m) if m is not None else None
    counts = m.sum(axis=1) if m is not None else None
    rows = []
    for i, c in enumerate(card.classes):
        row = [str(i), c, card.class_names.get(c, "unknown")]
        if per is not None and counts is not None:
            row += [pct(per[i]), str(int(counts[i]))]
        rows.append(row)
    head = ["output", "label", "name"] + (["test accuracy", "test images"] if per is not None else [])
    return table(head, rows)


def _bias_section(b: BiasFacts) -> list[str]:
    """DI in distribution and decorrelated, beside the labels' own DI; the eps ablation; the verdict."""
    band = f"{FOUR_FIFTHS[0]:g}–{FOUR_FIFTHS[1]:g}"
    rows = [
        ["in distribution", di(b.di_test), f"{di(b.di_test_ci[0])}–{di(b.di_test_ci[1])}", di(b.labels_di_test)],
        [
            "decorrelated (S independent of y)",
            di(b.di_decorrelated),
            f"{di(b.di_decorrelated_ci[0])}–{di(b.di_decorrelated_ci[1])}",
            di(b.labels_di_decorrelated),
        ],
    ]
    out = [
        "## Bias study",
        "",
        f"{b.role}. DI = P(ŷ=1|S=0) / P(ŷ=1|S=1), S=1 where the noise channel eps is present; the four-fifths "
        f"rule asks for {band}. The labels' DI is what a perfect classifier scores on the same split.",
        "",
        table(["test", "model DI", "95% CI", "labels' DI"], rows),
        "",
    ]
    if b.ablation:
        out += [table(["eps at test time", "test accuracy"], [[k, pct(v)] for k, v in b.ablation.items()]), ""]
    out += [f"- Mitigation: {b.mitigation or 'none'}.", f"- Four-fifths verdict (decorrelated test): **{b.verdict}**."]
    return out + [""]


def _tested(card: Card) -> list[str]:
    """What the numbers do say."""
    lo, hi = test_ci(card)
    src = "synthetic demo images" if card.synthetic else f"images from the same data ({card.data_digest})"
    out = [
        f"- Accuracy {pct(card.test_accuracy)} on {card.n_test} held-out {src}, never used for training or "
        f"tuning: 95% CI {pct(lo)}–{pct(hi)} (±{100 * (hi - lo) / 2:.1f} points).",
        f"- Val accuracy {pct(card.val_accuracy)} on {card.n_val} images chose the hyperparameters, so it is "
        "optimistic: the test accuracy is the number to quote.",
    ]
    if (m := _confusion(card)) is not None:
        per = per_class_accuracy(m)
        out.append(
            "- Per class: " + ", ".join(f"{class_label(card, c)} {pct(a)}" for c, a in zip(card.classes, per)) + "."
        )
    if card.bias is not None:
        out.append(
            f"- Disparate impact between images with and without the noise channel eps (S): DI "
            f"{di(card.bias.di_decorrelated)} on the decorrelated test (see Bias study)."
        )
    return out


def _not_tested(card: Card) -> list[str]:
    """What the numbers do not say, worst first."""
    lo, hi = test_ci(card)
    out = [
        f"- Other distributions (robustness): other cameras, lighting, backgrounds, sizes than {card.image_size} px "
        f"{'grayscale' if card.grayscale else 'RGB'}; images of none of its {len(card.classes)} classes "
        "(it always answers one of them)."
    ]
    if card.synthetic:
        out.insert(0, "- **Real photos: never. Trained and tested on synthetic shapes only.**")
    if card.weights == "imagenet":
        out.append(
            "- Where its start came from (transparency): torchvision's ImageNet-1k weights, trained on photos that "
            "may include these classes and even these test images; its accuracy is not comparable with a model "
            "trained from scratch."
        )
    if card.n_test < SMALL_TEST:
        out.append(
            f"- A large enough test: {card.n_test} images give a CI {100 * (hi - lo):.0f} points wide; "
            "a difference between models smaller than that means nothing."
        )
    m = _confusion(card)
    accs = per_class_accuracy(m) if m is not None else []
    per = [a for a in accs if not math.isnan(a)]
    if per and max(per) - min(per) > UNEVEN:
        worst = card.classes[int(np.nanargmin(accs))]
        out.append(
            f"- Even performance across classes: per-class accuracy spans {pct(min(per))}–{pct(max(per))}; "
            f"{class_label(card, worst)} is recognised least often."
        )
    if card.bias is None:
        out.append("- Other groups (non-discrimination): no bias study was run on this model.")
    else:
        out.append("- Other groups (non-discrimination): only S, the presence of eps, was studied.")
    return out


def _oversight(card: Card) -> list[str]:
    """What a person must do before relying on a prediction."""
    out = ["- A person checks each prediction before any decision is taken on it."]
    if card.bias is None:
        out.append("- Four-fifths rule: not applied, no bias study was run on this model.")
    else:
        out.append(
            f"- Four-fifths rule on the decorrelated test: **{card.bias.verdict}** "
            f"(DI {di(card.bias.di_decorrelated)}, labels' DI {di(card.bias.labels_di_decorrelated)})."
        )
    return out


def trust(card: Card) -> list[str]:
    """The "Can I trust this model?" section, answered from the card's facts."""
    if card.synthetic:
        names = ", ".join(card.class_names.get(c, c) for c in card.classes)
        answer = (
            "> **WARNING: SYNTHETIC DATA. This model was trained and tested on bias_lab's generated demo images "
            f"(drawn shapes), not photos. Its numbers say nothing about real photos of {names}: do not use it on "
            "them.**"
        )
    else:
        answer = "Only for images like its test split, and only with a person checking its predictions."
    if card.bias is not None and card.bias.verdict == "biased":
        eps = card.in_channels > (1 if card.grayscale else 3)  # a model without eps cannot follow it
        answer = (
            ("> **No: its decisions follow S, the noise channel eps, not the image.**" if eps else "> **No.**")
            + f" On the decorrelated test (S independent of the label) its DI is {di(card.bias.di_decorrelated)} "
            f"where the labels' is {di(card.bias.labels_di_decorrelated)}: the four-fifths rule says biased."
            + (" Its in-distribution accuracy comes from eps." if eps else "")
            + "\n\n"
            + answer
        )
    if not learned(card):
        answer = (
            f"> **No: it did not learn its task.** Its test accuracy's 95% CI ({pct(test_ci(card)[0])}–"
            f"{pct(test_ci(card)[1])}) reaches chance ({pct(1 / len(card.classes))} for {len(card.classes)} "
            "classes): train longer or tune it before using it.\n\n" + answer
        )
    return [
        "## Can I trust this model?",
        "",
        answer,
        "",
        "**What was tested** (data quality, transparency)",
        "",
        *_tested(card),
        "",
        "**What was NOT tested**",
        "",
        *_not_tested(card),
        "",
        "**Human oversight**",
        "",
        *_oversight(card),
        "",
    ]


def learned(card: Card) -> bool:
    """The test accuracy's 95% CI lies above chance (1 / number of classes)."""
    return test_ci(card)[0] > 1 / max(len(card.classes), 1)


def render(card: Card) -> str:
    """The full model card (model_card.md)."""
    data_rows = [
        ("source", "the built-in demo (SYNTHETIC shapes, not photos)" if card.synthetic else card.data_source),
        ("digest", card.data_digest),
        ("images", f"{card.n_train} train, {card.n_val} val, {card.n_test} test"),
    ]
    out = [f"# Model card: {title(card)}", "", headline(card), ""]
    out += trust(card)
    out += ["## Model", "", table(["", ""], _model_rows(card)), "", "## Classes", "", _classes_table(card), ""]
    out += ["## Data", "", table(["", ""], data_rows), "", "## Training", "", table(["", ""], _training_rows(card))]
    out += [""] + (_bias_section(card.bias) if card.bias is not None else [])
    return "\n".join(out)


def summary(card: Card, full_artifact_uri: str) -> str:
    """The version's Description: headline, trust section, pointer to the full card; cut at a line end so that it
    stays within SUMMARY_LIMIT characters."""
    pointer = f"Full model card: `{full_artifact_uri}`"
    body = "\n".join([headline(card), "", f"Hyperparameters from {hparam_origin(card)}.", "", *trust(card)])
    room = SUMMARY_LIMIT - len(pointer) - 2
    if len(body) > room:
        cut_note = "(cut here)"
        end = body.rfind("\n", 0, room - len(cut_note) - 1)
        body = body[: end if end > 0 else room - len(cut_note) - 1] + "\n" + cut_note
    return f"{body.rstrip()}\n\n{pointer}"
