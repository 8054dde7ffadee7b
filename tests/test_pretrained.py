"""weights=imagenet (transfer learning), stems, test-time augmentation and crop scale: the recipe settings.

No network: the "ImageNet" weights are a seeded torchvision state_dict each test writes into a temporary torch hub
cache, exactly where torch.hub would have downloaded the real file.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from bias_lab import explain, pretrained, tracking
from bias_lab.config import BiasConfig, DataConfig, TrainConfig
from bias_lab.data import load
from bias_lab.device import seed_everything
from bias_lab.errors import UserError
from bias_lab.inference import labels, probabilities
from bias_lab.loop import Norm, Part, batch_inputs, fit, predict
from bias_lab.models import ModelMeta, adapt_imagenet, build, resolve_stem
from bias_lab.pipeline import prepare

from .conftest import all_runs, invoke, run_cli


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A torch hub cache holding resnet18's weights file (seeded random weights); returns that state_dict."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(123)
    state = tvm.resnet18().state_dict()
    path = pretrained.cached_file("resnet18")
    assert path.is_relative_to(tmp_path)  # the test's cache, not the user's
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_adapt_sums_rgb_filters_zeroes_eps_and_keeps_a_fresh_head(hub: dict[str, torch.Tensor]) -> None:
    net = build("resnet18", 2, 4, 64, resolve_stem("resnet18", "auto", 64, pretrained=True))
    fresh_fc = net.fc.weight.detach().clone()
    backbone = adapt_imagenet(net, "resnet18", pretrained.state_dict("resnet18"))
    assert torch.equal(net.conv1.weight[:, 0], hub["conv1.weight"].sum(dim=1))  # gray = R + G + B filters
    assert torch.count_nonzero(net.conv1.weight[:, 1]) == 0  # eps starts ignored
    assert torch.equal(net.layer3[1].conv2.weight, hub["layer3.1.conv2.weight"])
    assert torch.equal(net.fc.weight, fresh_fc) and net.fc.out_features == 4  # 4 classes, not 1000
    assert "fc.weight" not in backbone and "conv1.weight" in backbone and len(backbone) == 60


def test_frozen_backbone_trains_only_after_freeze_epochs(hub: dict[str, torch.Tensor]) -> None:
    seed_everything(0)
    net = build("resnet18", 1, 4, 32, "imagenet")
    backbone = adapt_imagenet(net, "resnet18", pretrained.state_dict("resnet18"))
    gen = torch.Generator().manual_seed(0)
    part = Part(torch.randint(0, 256, (48, 1, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(48) % 4)
    snaps: list[tuple[torch.Tensor, torch.Tensor]] = []
    cfg = TrainConfig(model="resnet18", epochs=2, batch_size=16, lr=0.05, freeze_epochs=1, weights="imagenet")

    def snap(epoch: int, _m: dict[str, float]) -> None:
        snaps.append((net.layer2[0].conv1.weight.detach().clone(), net.fc.weight.detach().clone()))

    fresh_fc = net.fc.weight.detach().clone()
    fit(
        net,
        part,
        part,
        cfg,
        Norm(0.45, 0.25),
        on_epoch=snap,
        frozen=[p for n, p in net.named_parameters() if n in backbone],
    )
    (conv_1, fc_1), (conv_2, _) = snaps
    assert torch.equal(conv_1, hub["layer2.0.conv1.weight"]) and not torch.equal(fc_1, fresh_fc)  # epoch 1: head only
    assert not torch.equal(conv_2, conv_1)  # epoch 2: everything
    assert all(p.requires_grad for p in net.parameters())


def test_train_with_imagenet_weights_is_tagged_and_logs_its_model(
    kaggle_data: Path, hub: dict, client, tmp_path: Path
) -> None:
    code, out = invoke(
        "train", "--data", str(kaggle_data), "--image-size", "32", "--model", "resnet18", "--epochs", "2",
        "--batch-size", "32", "--lr", "0.02", "--weights", "imagenet", "--freeze-epochs", "1",
    )  # fmt: skip
    assert code == 0, out
    (run,) = all_runs(client)
    assert run.data.params["weights"] == "imagenet" and run.data.params["freeze_epochs"] == "1"
    assert "not comparable with training from scratch" in run.data.tags["pretrained"]
    model, meta = tracking.load_model(f"runs:/{run.info.run_id}/model", torch.device("cpu"))  # rebuilt from meta
    assert (meta.weights, meta.stem, model.conv1.kernel_size) == ("imagenet", "imagenet", (7, 7))
    code, out = invoke("report", "--output", str(tmp_path / "report.html"))
    assert code == 0, out
    assert (
        "**Pretrained:** this run started from torchvision's ImageNet-1k weights"
        in (tmp_path / "report.md").read_text()
    )


def test_offline_without_the_file_is_one_line_before_any_work(
    kaggle_data: Path, tmp_path: Path, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    env = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}  # no network
    p = run_cli("train", "--data", str(kaggle_data), "--model", "resnet18", "--weights", "imagenet", env=env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert pretrained.cached_file("resnet18").name in lines[0] and "weights=none" in lines[0]
    assert all_runs(client) == []  # nothing started


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": "lenet", "weights": "imagenet"}, "no ImageNet weights for lenet"),
        ({"model": "resnet18", "weights": "imagenet", "stem": "small"}, "use stem=imagenet"),
        ({"model": "resnet18", "weights": "imagenet", "freeze_epochs": 10}, "fewer than epochs=10"),
        ({"model": "resnet18", "freeze_epochs": 1}, "set weights=imagenet"),
        ({"crop_scale": 0.0}, "crop_scale=0.0"),
        ({"crop_scale": math.nan}, "crop_scale=nan"),
    ],
)
def test_recipe_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**settings).validate()


def test_tta_averages_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    net = build("lenet", 1, 4, 32).eval()
    part = Part(torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    norm = Norm(0.4, 0.2)
    x = batch_inputs(part, torch.arange(6), norm)
    with torch.no_grad():
        want = ((net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2).log()
    got = predict(net, part, norm, tta=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(predict(net, part, norm), want, atol=1e-3)  # LeNet is not mirror-symmetric


def test_tta_run_reports_its_gain_and_the_model_predicts_with_it(kaggle_data: Path, client) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), "--image-size", "32", "--epochs", "2", "--tta", "true")
    assert code == 0, out
    (run,) = all_runs(client)
    assert {"test_accuracy", "test_accuracy_no_tta"} <= set(run.data.metrics)
    _, meta = tracking.load_model(f"runs:/{run.info.run_id}/model", torch.device("cpu"))
    assert meta.tta and meta.stem == "small"  # kaggle_submit predicts as the test accuracy was measured


class LeftVsRight(torch.nn.Module):
    """Logits [k * (left half - right half), 0, 0, 0]: class a or b alone, a for both halves together (mirror)."""

    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        d = x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3))
        return torch.stack([self.k * d, *[torch.zeros_like(d)] * 3], dim=1)


def test_kaggle_submit_predicts_with_the_models_tta() -> None:
    images = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    meta = ModelMeta(arch="lenet", in_channels=1, image_size=32, mean=0.45, std=0.25, classes=list("abcd"), tta=True)
    plain_meta = dataclasses.replace(meta, tta=False)
    plain = labels(probabilities(LeftVsRight(), plain_meta, images, batch_size=16), plain_meta)
    assert set(plain) == {"a", "b"}  # each image leans one way
    assert (
        labels(probabilities(LeftVsRight(), meta, images, batch_size=16), meta) == ["a"] * 64
    )  # with its mirror: no lean


def test_explain_ablations_predict_with_the_models_tta(kaggle_data: Path) -> None:
    """An ablation's accuracy sits beside test_accuracy: both must be measured the same way (with tta or without)."""
    data = DataConfig(data=str(kaggle_data), image_size=32)
    prep = prepare(data, BiasConfig(classes="1,3", p0=0.0, p1=1.0), 0, binary=True, eps=True, ds=load(data))
    model, zero = LeftVsRight(), explain.ablate(prep.test, "zero", 0)
    with_tta, _ = explain.explain(model, prep, seed=0, tta=True)
    plain, _ = explain.explain(model, prep, seed=0)
    key = "ablation_zero_eps_test_accuracy"
    assert with_tta[key] == explain.accuracy(model, zero, prep.norm, tta=True)
    assert with_tta[key] != plain[key]  # this model's mirror average changes its predictions
