"""Model cards: what render() and summary() say from a card's facts, and the registry round trip that attaches a
card to a registered version (artifact model_card.md + the version's description)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from bias_lab import card, files, registry, tracking
from bias_lab.card import BiasFacts, Card
from bias_lab.metrics import wilson
from bias_lab.models import ModelMeta, build

NAMES = {"1": "disc", "2": "cross", "3": "triangle", "4": "square"}
CONFUSION = np.array([[45, 0, 0, 0], [1, 43, 1, 0], [2, 1, 38, 4], [0, 0, 4, 41]])  # 167 of 180 right


def demo_card(**changes) -> Card:
    """A LeNet tuned on the synthetic demo: 4 classes, 180 test images, 92.8% test accuracy."""
    base = Card(
        name="bias-lab",
        version="3",
        arch="lenet",
        in_channels=1,
        image_size=64,
        classes=["1", "2", "3", "4"],
        data_source="demo",
        data_digest="3f9a1c2e",
        synthetic=True,
        n_train=840,
        n_val=180,
        n_test=180,
        epochs=10,
        lr=0.0123456,
        momentum=0.9,
        batch_size=64,
        val_accuracy=0.9833333333333333,
        test_accuracy=167 / 180,
        class_names=NAMES,
        width=1,
        stem="small",
        weight_decay=5e-4,
        seed=0,
        optuna_study="tune-demo",
        optuna_trial=7,
        n_trials_complete=12,
        confusion=CONFUSION,
    )
    return dataclasses.replace(base, **changes)


def section(md: str, title: str) -> str:
    """The text of the `## title` section, up to the next section."""
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else len(md)]


def test_synthetic_card_warns_first_and_names_every_class() -> None:
    md = card.render(demo_card())
    trust = section(md, "Can I trust this model?")
    first = trust.split("\n")[2]  # the answer, before what was tested
    assert "SYNTHETIC" in first and "not photos" in first and "disc, cross, triangle, square" in first
    assert "Real photos: never" in section(md, "Can I trust this model?")
    classes = section(md, "Classes")
    for i, (label, name) in enumerate(NAMES.items()):
        assert f"| {i} | {label} | {name} |" in classes
    assert "1=disc, 2=cross, 3=triangle, 4=square" in md.split("\n")[2]  # the headline
    real = section(card.render(demo_card(synthetic=False, data_source="data/tiny4")), "Can I trust this model?")
    assert "SYNTHETIC" not in real and "synthetic" not in real and "Real photos" not in real


def test_numbers_are_rounded_for_people_and_the_ci_is_wilsons() -> None:
    md = card.render(demo_card())
    lo, hi = wilson(167, 180)
    assert f"Test accuracy 92.8% (95% CI {100 * lo:.1f}%–{100 * hi:.1f}%, 180 images)" in md
    assert card.test_ci(demo_card()) == (lo, hi)
    assert "| learning rate | 0.0123 |" in md and "0.0123456" not in md
    assert "trial 7 of Optuna study tune-demo (best val accuracy of 12 complete trials)" in md
    assert "the command line defaults" in card.render(demo_card(optuna_study=None, optuna_trial=None))
    assert "A large enough test" not in md  # 180 images
    small = card.render(demo_card(n_test=40, test_accuracy=0.9, confusion=None))
    lo, hi = wilson(36, 40)
    assert f"A large enough test: 40 images give a CI {100 * (hi - lo):.0f} points wide" in small


def test_per_class_accuracy_from_the_confusion_matrix() -> None:
    assert card.per_class_accuracy(np.array([[8, 2], [1, 9]])) == [0.8, 0.9]  # rows = true class
    nan_row = card.per_class_accuracy(np.array([[0, 0], [3, 1]]))
    assert math.isnan(nan_row[0]) and nan_row[1] == 0.25
    md = card.render(demo_card())
    assert "| 2 | 3 | triangle | 84.4% | 45 |" in section(md, "Classes")
    assert "| 0 | 1 | disc | 100.0% | 45 |" in section(md, "Classes")
    assert "spans 84.4%–100.0%; 3 (triangle) is recognised least often" in md  # 15.6 points apart: uneven
    even = card.render(demo_card(confusion=np.diag([45, 44, 43, 45])))
    assert "Even performance across classes" not in even


def test_bias_card_shows_di_beside_the_labels_di_and_the_verdict() -> None:
    bias = BiasFacts(
        role="model_2: trained with eps present with a label-dependent probability",
        di_test=0.3123,
        di_test_ci=(0.2211, 0.4105),
        di_decorrelated=0.4567,
        di_decorrelated_ci=(0.3301, 0.6049),
        labels_di_test=0.2501,
        labels_di_decorrelated=1.0212,
        verdict="biased",
        ablation={"as trained": 0.97, "eps zeroed": 0.61, "eps shuffled": 0.55},
        mitigation=None,
    )
    md = card.render(
        demo_card(
            task="binary",
            pair=("1", "2"),
            classes=["1", "2"],
            in_channels=2,
            bias=bias,
            confusion=np.array([[40, 5], [9, 36]]),
        )
    )
    study = section(md, "Bias study")
    assert "| in distribution | 0.31 | 0.22–0.41 | 0.25 |" in study
    assert "| decorrelated (S independent of y) | 0.46 | 0.33–0.60 | 1.02 |" in study
    assert "| eps zeroed | 61.0% |" in study and "**biased**" in study
    trust = section(md, "Can I trust this model?")
    assert "Four-fifths rule on the decorrelated test: **biased** (DI 0.46, labels' DI 1.02)" in trust
    assert trust.split("\n\n")[1].startswith("> **No: its decisions follow S")  # the answer first, then the rest
    fair = card.render(demo_card(bias=dataclasses.replace(bias, verdict="not biased"), classes=["1", "2"]))
    assert "> **No" not in section(fair, "Can I trust this model?")
    assert "no bias study" not in md
    assert "binary: 1 (disc) vs 2 (cross)" in md and "2 channels (grayscale + noise channel eps)" in md
    assert "`mlflow models serve -m models:/bias-lab/3`" in section(md, "Model")
    assert "| 1 | 2 | cross | 80.0% | 45 |" in section(md, "Classes")
    plain = card.render(demo_card())
    assert "Four-fifths rule: not applied, no bias study was run on this model." in plain
    assert "## Bias study" not in plain


def test_pretrained_weights_are_named_as_untested() -> None:
    md = card.render(demo_card(weights="imagenet", arch="resnet18", synthetic=False))
    assert "torchvision's ImageNet-1k weights" in section(md, "Can I trust this model?")
    assert "ImageNet-1k" not in section(card.render(demo_card()), "Can I trust this model?")


def test_summary_is_short_headline_first_and_points_at_the_card() -> None:
    uri = "runs:/0123abcd/model_card.md"
    s = card.summary(demo_card(), uri)
    assert s.startswith(card.headline(demo_card())) and s.endswith(f"`{uri}`") and len(s) <= card.SUMMARY_LIMIT
    assert "SYNTHETIC" in s and "(cut here)" not in s
    many = [str(i) for i in range(300)]  # a long card: cut at a line end, the pointer still last
    big = demo_card(classes=many, class_names={c: f"class number {c} " * 3 for c in many}, confusion=None)
    s = card.summary(big, uri)
    assert len(s) <= card.SUMMARY_LIMIT and s.endswith(f"`{uri}`") and "(cut here)" in s


def test_registry_round_trip(client) -> None:
    mlflow.set_experiment("cards")
    with mlflow.start_run() as run:
        info = tracking.log_model(build("lenet", 1, 4, 32), ModelMeta("lenet", 1, 32, 0.5, 0.25, list("1234")))
    tags = registry.rounded({"test_accuracy": 0.9277777777777778, "batch_size": 64, "model": "lenet"})
    assert tags == {"test_accuracy": "0.9278", "batch_size": "64", "model": "lenet"}
    decision = registry.register_champion(info.model_uri, "m", "d1", 0.98, tags)
    facts = demo_card(name="m", version=str(decision["version"]))
    uri = registry.describe_version("m", decision["version"], facts, run.info.run_id)
    registry.describe_registered_model("m")

    mv = client.get_model_version("m", str(decision["version"]))
    assert uri == f"runs:/{run.info.run_id}/model_card.md"
    assert mv.description.startswith(card.headline(facts)) and mv.description.endswith(f"`{uri}`")
    assert mv.tags["test_accuracy"] == "0.9278" and mv.tags["val_accuracy"] == "0.98"
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert mlflow.artifacts.load_text(uri) == card.render(facts)
    described = client.get_registered_model("m").description
    assert "champion" in described and "model_card.md" in described and "tune" in described


def test_class_names_read_from_classes_csv(tmp_path: Path) -> None:
    (tmp_path / "classes.csv").write_text("label,wnid,name\n1,n07715103,cauliflower\n2,n02504458,elephant\n")
    assert files.class_names(tmp_path) == {"1": "cauliflower", "2": "elephant"}
    (tmp_path / "classes.csv").write_text("label,name\n1,disc\n2,cross\n")  # the demo's columns
    assert files.class_names(tmp_path) == {"1": "disc", "2": "cross"}
    (tmp_path / "classes.csv").write_bytes(b"\xff\xfe\x00label")  # not UTF-8
    assert files.class_names(tmp_path) == {}
    (tmp_path / "classes.csv").write_text("id,label\n1,2\n")  # no name column
    assert files.class_names(tmp_path) == {}
    assert files.class_names(tmp_path / "absent") == {}


def test_a_model_at_chance_is_said_not_to_have_learned() -> None:
    """A 4-class model at 26% on 180 images: its CI reaches chance (25%), so the card says it did not learn."""
    weak = demo_card(test_accuracy=0.26, n_test=180)
    assert "did not learn its task" in card.headline(weak) and "**No: it did not learn its task.**" in card.render(weak)
    assert "did not learn" not in card.render(demo_card(test_accuracy=0.9, n_test=180))


def test_a_train_run_opens_on_its_card_and_a_binary_one_on_its_bias_verdict(easy_data: Path, client) -> None:
    """train's run carries model_card.md and opens on the card's headline; on a pair of classes the card also holds
    the bias study (here without eps: a biased verdict could not say the model follows eps)."""
    from .conftest import FAST, invoke

    code, out = invoke("train", "--data", str(easy_data), *FAST)
    assert code == 0, out
    code, out = invoke("train", "--data", str(easy_data), *FAST, "--classes", "1,2")
    assert code == 0, out
    exp = client.get_experiment_by_name("bias-lab").experiment_id
    plain, pair = sorted(client.search_runs([exp]), key=lambda r: r.info.start_time)
    for run in (plain, pair):
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"**{run.info.run_name}**: LeNet on ") and "## Can I trust this model?" in note
        assert "Test accuracy" in note.splitlines()[0] and "Hyperparameters from the command line." in note
    full = mlflow.artifacts.load_text(f"runs:/{pair.info.run_id}/{registry.CARD_FILE}")
    assert "## Bias study" in full and "trained on the images only" in full and "follow S" not in full
    assert "## Bias study" not in mlflow.artifacts.load_text(f"runs:/{plain.info.run_id}/{registry.CARD_FILE}")


def test_bias_facts_judge_the_decorrelated_test_beside_the_labels_di(kaggle_data: Path) -> None:
    """of_bias takes the labels' DI from the split itself and judges the decorrelated test, as the comparison does:
    a model that mirrors the labels in distribution (DI 0, like S = y) but has DI 0.1 decorrelated is biased."""
    from bias_lab import facts, pipeline
    from bias_lab.config import BiasConfig, DataConfig

    prep = pipeline.prepare(DataConfig(data=str(kaggle_data), image_size=32), BiasConfig(bias=True), seed=0)
    found = {
        "test_accuracy": 0.99,
        "test_accuracy_ci_low": 0.95,
        **{f"test_{k}": v for k, v in (("di", 0.0), ("di_ci_low", 0.0), ("di_ci_high", 0.05))},
        **{f"decorrelated_test_{k}": v for k, v in (("di", 0.1), ("di_ci_low", 0.02), ("di_ci_high", 0.2))},
        "ablation_zero_eps_test_accuracy": 0.5,
    }
    study = facts.of_bias(found, prep, "model_2: eps with p0=0, p1=1")
    assert study.labels_di_test == 0.0 and study.labels_di_decorrelated == pytest.approx(1.0, abs=0.3)
    assert study.verdict == "biased"
    assert study.ablation == {"as trained": 0.99, "zeroed": 0.5}
