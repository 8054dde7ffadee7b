"""model_3's mitigations and the explanations (ablation, saliency), on tensors and in a tiny bias_eval run."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from bias_lab import bias_eval, config, explain, mitigation
from bias_lab.data import load
from bias_lab.models import build
from bias_lab.pipeline import prepare

from .conftest import all_runs, figures_page


def test_reweighing_makes_s_independent_of_y_and_says_when_it_cannot() -> None:
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(4000, generator=g) < 0.5).long()
    s = torch.rand(4000, generator=g) < torch.where(y == 1, 0.8, 0.3)
    w, note = mitigation.reweigh_weights(s, y)
    assert note == ""
    weighted = [float(w[(y == b) & s].sum() / w[y == b].sum()) for b in (0, 1)]  # weighted P(S=1 | y)
    assert weighted[0] == pytest.approx(weighted[1], abs=1e-6) and weighted[0] == pytest.approx(
        float(s.float().mean()), abs=1e-6
    )
    w, note = mitigation.reweigh_weights(y.bool(), y)  # p0=0, p1=1: S is y
    assert [float(w[(y == b) & y.bool()].sum() / w[y == b].sum()) for b in (0, 1)] == [0.0, 1.0]  # still S = y
    assert "(S=0, y=1)" in note and "(S=1, y=0)" in note


def test_channel_dropout_redraws_eps_independently_of_the_label() -> None:
    n, sigma = 4000, 2.0
    y = torch.arange(n) % 2
    x = torch.cat(
        [torch.randn(n, 1, 8, 8), torch.randn(n, 1, 8, 8) * sigma * y.view(-1, 1, 1, 1)], dim=1
    )  # eps iff y=1
    out = mitigation.channel_dropout(sigma, 1.0)(x, torch.arange(n), torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 0], x[:, 0])  # the image is untouched
    present = out[:, 1].flatten(1).abs().amax(1) > 0
    assert abs(present[y == 0].float().mean() - 0.5) < 0.05 and abs(present[y == 1].float().mean() - 0.5) < 0.05
    assert out[:, 1][present].std().item() == pytest.approx(sigma, rel=0.02)
    assert torch.all(out[:, 1][~present] == 0)
    half = mitigation.channel_dropout(sigma, 0.5)(x, torch.arange(n), torch.Generator().manual_seed(1))
    kept = (half[:, 1] == x[:, 1]).flatten(1).all(1)
    # half kept; of the re-drawn half, those zero before (y=0) and zero again (S'=0) look kept too: 1/2 + 1/2 * 1/4
    assert abs(kept.float().mean() - 0.625) < 0.03


def test_gradient_reversal_and_the_adversarial_wrapper() -> None:
    x = torch.ones(3, requires_grad=True)
    mitigation.GradReverse.apply(x, 2.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))
    for arch, features in (("lenet", 84), ("alexnet", 1024), ("resnet18", 512)):
        assert mitigation.last_linear(build(arch, 2, 2, 32)).in_features == features
    torch.manual_seed(0)
    model = mitigation.Adversarial(build("lenet", 2, 2, 32), sigma=1.0, weight=1.0, seed=0)
    batch = torch.randn(8, 2, 32, 32)
    logits = model.train()(batch)
    assert logits.shape == (8, 2) and model.aux_loss.item() > 0
    model.aux_loss.backward()  # reaches both the adversary and (reversed) the network
    assert model.head[1].weight.grad is not None and model.net.features[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), model.net(batch)) and model.aux_loss == 0.0


class _Reads(nn.Module):
    """A hand-made classifier that looks only at one input channel: logit_1 = mean(|channel|) - threshold."""

    def __init__(self, channel: int, threshold: float):
        super().__init__()
        self.channel, self.threshold = channel, threshold
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * (x[:, self.channel].abs().mean((1, 2)) - self.threshold)
        return torch.stack([-z, z], dim=1)


def test_explanations_tell_an_eps_reader_from_an_image_reader(kaggle_data: Path) -> None:
    data = config.DataConfig(data=str(kaggle_data), image_size=32)
    prep = prepare(data, config.BiasConfig(classes="1,3", p0=0.0, p1=1.0), 0, binary=True, eps=True, ds=load(data))
    m, fig = explain.explain(_Reads(channel=1, threshold=0.1), prep, seed=0)  # predicts y=1 iff eps present
    y1 = float(prep.test.labels.float().mean())
    assert m["saliency_eps_share"] == pytest.approx(1.0)
    assert m["ablation_zero_eps_test_accuracy"] == pytest.approx(1 - y1)  # eps gone: always predicts y=0
    assert m["ablation_shuffle_eps_test_accuracy"] < 1.0
    assert len(fig.data) == 4 * 4  # 4 samples x (2 inputs + 2 saliency maps)
    m, _ = explain.explain(_Reads(channel=0, threshold=0.5), prep, seed=0)  # ignores eps
    assert (
        m["saliency_eps_share"] == 0.0
        and m["ablation_zero_eps_test_accuracy"] == m["ablation_shuffle_eps_test_accuracy"]
    )


def test_bias_eval_with_a_mitigation_logs_model_3_and_explanations(
    kaggle_data: Path, client: mlflow.MlflowClient
) -> None:
    data = config.DataConfig(data=str(kaggle_data), image_size=32)
    train = config.TrainConfig(model="lenet", epochs=1, batch_size=16)
    out = bias_eval.run_bias_eval(
        data,
        train,
        config.BiasConfig(classes="1,3"),
        config.BiasEvalConfig(mitigation="adversarial", bootstrap=50, use_champion=False),
    )
    runs = all_runs(client)
    children = {r.data.tags["role"]: r for r in runs if "role" in r.data.tags}
    assert set(children) == {"model_1", "model_2", "model_3"} and all(r.info.status == "FINISHED" for r in runs)
    names = [set(c.data.metrics) for c in children.values()]
    assert names[0] == names[1] == names[2]
    for key in (
        "ablation_zero_eps_test_accuracy",
        "ablation_shuffle_eps_test_accuracy",
        "saliency_eps_share",
        "decorrelated_test_di",
    ):
        assert key in names[0], key
        assert f"model_3_{key}" in out
    assert children["model_1"].data.metrics["saliency_eps_share"] == 0.0  # no eps channel at all
    assert "adversary" in children["model_3"].data.params["model_description"]
    for c in children.values():
        figures_page(client, c.info.run_id, {"learning_curves", "confusion_matrix", "saliency"})
    assert math.isfinite(out["mitigation_accuracy_gap"])
    parent = next(r for r in runs if "role" not in r.data.tags)
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/conclusion.md")
    assert "## Mitigation: model_3" in text and "saliency" in text
