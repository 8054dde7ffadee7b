"""The architectures, for grayscale (1 channel) or grayscale + eps (2 channels) inputs of 32-224 px.

Pure: builds modules, adapts given weights and describes them; no I/O. AlexNet and ResNet are torchvision's own,
with one of two stems (the `stem` setting; `auto` picks imagenet for ResNet, and for AlexNet from 128 px or with
ImageNet weights):

    stem       ResNet                                         AlexNet stem / head
    imagenet   7x7 stride 2 + max-pool (/4), torchvision's    11x11 stride 4, 6x6 pool, 4096-wide head (the original)
    small      3x3 stride 1 + max-pool (/2); no pool < 64 px  5x5 stride 2, 3x3 pool, 1024-wide head
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from bias_lab import markdown as md
from bias_lab.config import MODELS, PRETRAINED
from bias_lab.errors import check


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; an adaptive pool makes it size-agnostic. `width`
    multiplies every layer's channels / units (1: the original 6-16-120-84)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 1):
        super().__init__()
        c1, c2, f1, f2 = 6 * width, 16 * width, 120 * width, 84 * width
        # pool before ReLU: the same function and gradients (max and ReLU commute), ReLU on 4x fewer values
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(5),  # 5x5 at the classic 32 px input; averages larger maps down to it
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 5 * 5, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )
        # He init of the convolutions: torch's default draws them with a third of the variance ReLU needs, and SGD
        # then sat at chance for the first 4-8 epochs on shapes no pixel statistic gives away (demo data, 10 epochs:
        # val 0.53 -> 0.99). On tiny4's photos it changed little: test 0.58 -> 0.59 at 10 epochs, 0.709 -> 0.700 at
        # 60 (mean of three seeds). He init of the linear layers as well cost 2 points on tiny4: they keep the default.
        for conv in (self.features[0], self.features[3]):
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resolve_stem(name: str, stem: str, image_size: int, pretrained: bool = False) -> str:
    """'imagenet' or 'small'. `auto`: imagenet for ResNet at every size (on tiny4 at 64 px and an equal 300 s of
    CPU training it reached 0.59 test accuracy against the small stem's 0.49: 2.8x the images per second for 4x
    fewer MACs); for AlexNet imagenet from 128 px or with ImageNet weights (which need it), else small."""
    if stem != "auto":
        return stem
    return "imagenet" if name.startswith("resnet") or image_size >= 128 or pretrained else "small"


def _alexnet(in_channels: int, num_classes: int, image_size: int, stem: str) -> nn.Module:
    m = tvm.alexnet(weights=None, num_classes=num_classes)
    if stem == "imagenet":
        m.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
        return m
    m.features[0] = nn.Conv2d(in_channels, 64, kernel_size=5, stride=2, padding=2)
    m.avgpool = nn.AdaptiveAvgPool2d(3)
    m.classifier = nn.Sequential(  # 1024 wide: the 4096-wide original would be 90% of the weights at 64 px
        nn.Dropout(0.5),
        nn.Linear(256 * 3 * 3, 1024),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(1024, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )
    return m


def _resnet(depth: int, in_channels: int, num_classes: int, image_size: int, stem: str) -> nn.Module:
    ctor = {18: tvm.resnet18, 34: tvm.resnet34}[depth]
    m = ctor(weights=None, num_classes=num_classes, zero_init_residual=True)  # residual branches start as identity
    if stem == "imagenet":
        m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if image_size < 64:
            m.maxpool = nn.Identity()
    return m


def build(
    name: str, in_channels: int, num_classes: int, image_size: int, stem: str = "auto", width: int = 1
) -> nn.Module:
    """A freshly initialised model (seed torch first for identical weights). `stem`: 'auto', 'small' or 'imagenet'
    (alexnet and resnet; LeNet has one). `width`: LeNet's channel multiplier (torchvision's models have theirs)."""
    check(name in MODELS, f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    check(
        in_channels >= 1 and num_classes >= 2,
        f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}",
    )
    check(32 <= image_size <= 224, f"image_size={image_size} is out of range: use a value in 32..224")
    if name == "lenet":
        return LeNet(in_channels, num_classes, width)
    if name == "alexnet":
        return _alexnet(in_channels, num_classes, image_size, resolve_stem(name, stem, image_size))
    return _resnet(
        int(name.removeprefix("resnet")), in_channels, num_classes, image_size, resolve_stem(name, stem, image_size)
    )


def output_layer(name: str) -> str:
    """The qualified name of the last Linear layer, the one a pretrained model gets anew for its classes."""
    return {"lenet": "classifier.5", "alexnet": "classifier.6"}.get(name, "fc")


def adapt_imagenet(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Load torchvision's ImageNet `state` of `name` into `model` (built with stem='imagenet'): the first
    convolution's RGB filters summed into the grayscale channel (a gray image through them gives what the RGB
    network computed for that image in colour), the filters of any further channel (eps) zero, so that the network
    starts as the pretrained one and learns from eps only what training teaches it. The output layer keeps its
    fresh initialisation (other classes). Returns the names of the parameters taken from `state` (the backbone)."""
    check(name in PRETRAINED, f"weights=imagenet: there are no ImageNet weights for {name}")
    first = "features.0.weight" if name == "alexnet" else "conv1.weight"
    head = output_layer(name)
    own = model.state_dict()
    rgb = state[first]
    conv = torch.zeros_like(own[first])
    conv[:, :1] = rgb.sum(dim=1, keepdim=True)
    loaded = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    loaded[first] = conv
    wrong = [k for k, v in loaded.items() if k not in own or own[k].shape != v.shape]
    check(not wrong, f"weights=imagenet: the {name} weights do not fit this model ({', '.join(wrong[:3])})")
    model.load_state_dict(loaded, strict=False)
    return [k for k, _ in model.named_parameters() if k in loaded]


@dataclass
class Layer:
    name: str
    type: str
    output_shape: str
    params: int


@dataclass
class Summary:
    layers: list[Layer]
    total_params: int
    macs: int  # multiply-accumulates per image (conv + linear), the usual "FLOPs/2"

    def markdown(self) -> str:
        rows = [(l.name, l.type, l.output_shape, f"{l.params:,}") for l in self.layers] + [
            ("**total**", "", "", f"**{self.total_params:,}**")
        ]
        return (
            md.table(["layer", "type", "output shape", "parameters"], rows, align=["", "", "", "r"])
            + f"\n\nMACs per image: {self.macs:,}"
        )

    def csv(self) -> str:
        return "\n".join(
            [
                "layer,type,output_shape,params",
                *(f'{l.name},{l.type},"{l.output_shape}",{l.params}' for l in self.layers),
            ]
        )


def summarize(model: nn.Module, in_channels: int, image_size: int) -> Summary:
    """Layer table (leaf modules in execution order) and parameter count from one dummy forward pass; MACs from
    torch's FlopCounterMode in the same pass (conv and matmul FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    layers: list[Layer] = []

    def hook(mod: nn.Module, _inp, out) -> None:
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        layers.append(Layer(names[mod], type(mod).__name__, "x".join(map(str, out.shape[1:])), own))

    names = {m: n for n, m in model.named_modules() if n and not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(torch.zeros(1, in_channels, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Summary(layers, sum(p.numel() for p in model.parameters()), flops.get_total_flops() // 2)


def finite_weights(model: nn.Module) -> bool:
    """Whether every parameter and buffer is finite: a diverged model outputs NaN, and argmax over NaN picks one
    fixed class for every input."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


@dataclass(frozen=True)
class ModelMeta:
    """The preprocessing a logged model needs at prediction time, stored beside its weights."""

    arch: str
    in_channels: int  # 1 (grayscale) + 1 when the eps channel is appended
    image_size: int  # side of the square input, px
    mean: float  # pixel normalisation of the image channel
    std: float
    classes: list[str]  # label strings, in output order
    task: str = "multiclass"  # or "binary" (bias_eval's pair of classes)
    eps_channel: bool = False
    bias: dict[str, Any] | None = None  # the BiasConfig of a binary model
    dataset_digest: str = ""
    grayscale: bool = True
    stem: str = "auto"  # models.build's stem, resolved ('imagenet' or 'small'); 'auto' in models logged before it
    tta: bool = False  # predictions average the image and its mirror, as the model's val/test numbers did
    weights: str = "none"  # 'imagenet': started from ImageNet-1k weights (see pretrained.CAVEAT)
    width: int = 1  # LeNet's channel multiplier (models.build); 1 in models logged before it
    class_names: list[str] = dataclasses.field(default_factory=list)  # classes.csv's names, in output order ("": none)

    def name_of(self, label: str) -> str:
        """A label's class name, "" when the data named none."""
        names = dict(zip(self.classes, self.class_names))
        return names.get(label, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelMeta:
        """From model_meta.json. KeyError naming the missing fields it cannot do without; keys it does not know are
        ignored (a newer version's extras)."""
        missing = [k for k in META_REQUIRED if k not in d] if isinstance(d, dict) else list(META_REQUIRED)
        if missing:
            raise KeyError(", ".join(missing))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


META_REQUIRED = (
    "arch",
    "in_channels",
    "classes",
    "image_size",
    "mean",
    "std",
)  # what rebuilding and preprocessing read
