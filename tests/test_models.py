"""models.build at every supported size and channel count, and models.summarize's layer table."""

from __future__ import annotations

import pytest
import torch

from bias_lab.config import MODELS
from bias_lab.errors import UserError
from bias_lab.models import build, summarize


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_summary(name: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build(name, channels, 3, size)
    model.train()
    summary = summarize(model, channels, size)  # one batch-1 forward
    assert model.training  # summarize restores the mode it found
    with torch.inference_mode():  # batch 2, one forward: AlexNet / ResNet at 128 px are heavy on a CPU
        logits = model.eval()(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    total = sum(p.numel() for p in model.parameters())
    assert summary.total_params == total
    assert sum(layer.params for layer in summary.layers) == total  # every parameter sits in a listed leaf layer
    assert summary.macs > 0
    assert summary.layers[-1].output_shape == "3"  # the head, in execution order
    assert f"**{total:,}**" in summary.markdown()
    assert summary.csv().count("\n") == len(summary.layers)


def test_lenet_macs_match_the_hand_count() -> None:
    """LeNet at 32 px: conv1 6x(5x5x1) over 32x32 (padding 2), pool, conv2 16x(5x5x6) over 12x12, then the FCs."""
    s = summarize(build("lenet", 1, 4, 32), 1, 32)
    assert s.macs == 6 * 25 * 32 * 32 + 16 * 6 * 25 * 12 * 12 + 400 * 120 + 120 * 84 + 84 * 4
    assert [(layer.name, layer.output_shape) for layer in s.layers[:3]] == [
        ("features.0", "6x32x32"),
        ("features.1", "6x16x16"),
        ("features.2", "6x16x16"),
    ]


def test_lenet_width_multiplies_every_layer_and_width_1_is_lenet_5() -> None:
    s1, s2 = (summarize(build("lenet", 1, 4, 32, width=w), 1, 32) for w in (1, 2))
    assert [layer.output_shape for layer in s2.layers if layer.name in ("features.0", "features.3")] == [
        "12x32x32",
        "32x12x12",
    ]
    assert s1.total_params == 61_196  # LeNet-5 with a 4-class head: width 1 is the original
    assert 3.5 < s2.total_params / s1.total_params < 4.1 and 3 < s2.macs / s1.macs < 4.1


def test_same_seed_same_weights_and_second_channel_changes_first_conv() -> None:
    torch.manual_seed(1)
    a = build("resnet18", 1, 4, 64)
    torch.manual_seed(1)
    b = build("resnet18", 1, 4, 64)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert build("resnet18", 2, 4, 64).conv1.weight.shape == (64, 2, 7, 7)  # auto: torchvision's stem at every size
    assert build("resnet18", 2, 4, 64, "small").conv1.weight.shape == (64, 2, 3, 3)
    assert build("alexnet", 1, 4, 64).features[0].kernel_size == (5, 5)  # auto: AlexNet's small stem below 128 px
    assert build("resnet18", 1, 4, 128).conv1.weight.shape == (64, 1, 7, 7)  # the original stem at >= 128 px


@pytest.mark.parametrize(
    "args,message",
    [
        (("vgg", 1, 4, 64), "unknown model 'vgg'"),
        (("lenet", 1, 4, 16), "image_size=16 is out of range"),
        (("lenet", 1, 4, 256), "image_size=256 is out of range"),
        (("lenet", 0, 4, 64), "in_channels >= 1"),
        (("lenet", 1, 1, 64), "num_classes >= 2"),
    ],
)
def test_bad_arguments_are_user_errors(args: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build(*args)
