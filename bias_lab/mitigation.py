"""model_3: the biased data of model_2, trained so that the eps shortcut is not taken.

Each method is a change to what pipeline.train already does (no second training loop):
- `reweigh` (Kamiran & Calders 2012): per-sample loss weights w(s, y) = P(s) P(y) / P(s, y) on the train split
  (Part.weights), so S and y are independent in the weighted training distribution. It cannot create samples
  that do not exist: when a (S, y) cell is empty (p0=0 or p1=1) it changes nothing, and says so in a tag.
- `adversarial` (gradient reversal, Ganin & Lempitsky 2015): a small head predicts S from the network's
  penultimate features and the features are trained to defeat it (`wrap` hook, `model.aux_loss`). The head
  sees the batch with eps re-drawn at P(S=1)=0.5, independently of y: with the real S it would also strip
  the label from the features whenever S and y coincide (p0=0, p1=1), leaving a fair but useless model.
- `channel_dropout`: for a share `dropout_rate` of each train batch the eps channel is re-drawn (zeroed or
  fresh noise, each with probability 1/2) independently of the label (`input_hook`), so eps stops predicting y.
`adversarial` and `channel_dropout` also select their best epoch on a validation split whose eps is re-drawn
the same way (`decorrelated_val`); the test splits, and so every reported measure, are model_2's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bias_lab import bias as biasmod
from bias_lab.config import BiasConfig, BiasEvalConfig
from bias_lab.errors import check
from bias_lab.loop import InputHook
from bias_lab.pipeline import Prepared

HEAD_WIDTH = 64  # hidden units of the adversary: small, it only has to read one bit (eps present) off the features
VAL_SEED_OFFSET = 20_011  # model_3's decorrelated validation draw: a stream of its own (not the test's, not training's)


@dataclass
class Mitigation:
    """What model_3 trains on and with: data (weights), wrap and input hook, for pipeline.train."""

    description: str
    prep: Prepared
    wrap: Callable[[nn.Module], nn.Module] | None = None
    input_hook: InputHook | None = None
    note: str = ""  # why the method may not be able to work on this data (logged as a tag)


# ------------------------------------------------------------------------------------------- reweigh


def reweigh_weights(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Kamiran-Calders weights P(s)P(y)/P(s,y) and a note naming any empty (S, y) cell (then the weights
    cannot make S and y independent). The loss divides by the weights' sum, so only their ratios matter."""
    s, y = s.long().cpu(), y.long().cpu()
    n = len(y)
    w = torch.ones(n)
    empty = []
    for a in (0, 1):
        for b in (0, 1):
            cell = (s == a) & (y == b)
            k = int(cell.sum())
            if k == 0:
                empty.append(f"(S={a}, y={b})")
                continue
            w[cell] = float((s == a).sum()) * float((y == b).sum()) / (n * k)
    note = (
        ""
        if not empty
        else (
            f"reweighing cannot decorrelate S and y here: no training sample has {' or '.join(empty)}, so there is "
            "nothing to up-weight (use mitigation=channel_dropout or adversarial)"
        )
    )
    return w, note


# ------------------------------------------------------------------------------------------- channel dropout


def redraw_eps(
    n: int, size: int, sigma: float, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """S' ~ Bernoulli(0.5) independent of everything, and eps' = N(0, sigma^2) where S'=1, 0 elsewhere."""
    s = torch.rand(n, generator=gen, device=gen.device) < 0.5
    eps = torch.randn(n, 1, size, size, generator=gen, device=gen.device) * sigma * s.view(-1, 1, 1, 1)
    return s.to(device), eps.to(device)


def channel_dropout(sigma: float, rate: float) -> InputHook:
    """An input hook re-drawing the eps channel of a share `rate` of each train batch, independently of y."""

    def hook(x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x.shape[1] < 2:
            return x
        redo = (torch.rand(x.shape[0], generator=gen, device=gen.device) < rate).to(x.device)
        _, eps = redraw_eps(x.shape[0], x.shape[-1], sigma, gen, x.device)
        x = x.clone()
        x[:, 1:] = torch.where(redo.view(-1, 1, 1, 1), eps.to(x.dtype), x[:, 1:])
        return x

    return hook


# ------------------------------------------------------------------------------------------- adversarial


class GradReverse(torch.autograd.Function):
    """Identity forward; gradient multiplied by -weight backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def last_linear(net: nn.Module) -> nn.Linear:
    """The classifier's output layer: its input is the penultimate feature vector (LeNet, AlexNet, ResNet)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    check(bool(layers), f"{type(net).__name__} has no Linear output layer: the adversarial mitigation needs one")
    return layers[-1]


class Adversarial(nn.Module):
    """`net` plus an S-adversary on its penultimate features; sets `aux_loss` during training forwards.

    Train forward: one pass over [x, x with eps re-drawn at P(S')=0.5]; the logits of x are returned, the
    adversary's cross-entropy on S' (through gradient reversal) becomes aux_loss. Eval forward: `net(x)`.
    """

    def __init__(self, net: nn.Module, sigma: float, weight: float, seed: int):
        super().__init__()
        self.net, self.sigma, self.weight, self.seed = net, sigma, weight, seed
        self.out_layer = last_linear(net)
        d = self.out_layer.in_features
        # BatchNorm (no affine) first: the reversed gradient cannot defeat the adversary by inflating every feature
        # (the usual GRL blow-up: without it training diverged on tiny4 at weight >= 1), while per-sample
        # differences, where eps shows, stay visible (a LayerNorm would hide eps's extra energy from the head)
        self.head = nn.Sequential(
            nn.BatchNorm1d(d, affine=False), nn.Linear(d, HEAD_WIDTH), nn.ReLU(), nn.Linear(HEAD_WIDTH, 2)
        )
        self.aux_loss: torch.Tensor | float = 0.0
        self._gen: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[1] < 2 or x.shape[0] < 2:  # BatchNorm needs 2 samples (a last batch of 1)
            self.aux_loss = 0.0
            return self.net(x)
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed + 2)
        n = x.shape[0]
        s_cf, eps_cf = redraw_eps(n, x.shape[-1], self.sigma, self._gen, x.device)
        x_cf = torch.cat([x[:, :1], eps_cf.to(x.dtype)], dim=1)
        feats: dict[str, torch.Tensor] = {}
        handle = self.out_layer.register_forward_pre_hook(lambda _m, inp: feats.__setitem__("f", inp[0]))
        try:
            logits = self.net(torch.cat([x, x_cf]))
        finally:
            handle.remove()
        adv_logits = self.head(GradReverse.apply(feats["f"][n:], self.weight))
        self.aux_loss = F.cross_entropy(adv_logits.float(), s_cf.long())
        return logits[:n]


# ------------------------------------------------------------------------------------------- the factory


def decorrelated_val(prep: Prepared, sigma: float, seed: int) -> Prepared:
    """`prep` with the val split's S and eps re-drawn as the decorrelated test's are (S = 1 on a random half of each
    class; same images, labels and test splits).

    fit keeps the best-val epoch; on model_2's val split, where eps predicts y, that is the epoch that uses the
    shortcut most, the one a mitigation fights. The methods that know eps is suspect select on this instead."""
    n, size = len(prep.val.labels), int(prep.val.images.shape[-1])
    ch = biasmod.draw_decorrelated(prep.val.labels, np.arange(n), sigma, seed + VAL_SEED_OFFSET, size)
    return dataclasses.replace(prep, val=dataclasses.replace(prep.val, eps=ch.eps, s=ch.s))


def build(method: str, prep: Prepared, bias_cfg: BiasConfig, eval_cfg: BiasEvalConfig, seed: int) -> Mitigation:
    """model_3's training setup for `method`, on model_2's data `prep` (which is not modified)."""
    check(prep.eps, "a mitigation needs the eps channel in the input: pass model_2's prepared data")
    if method == "reweigh":
        assert prep.train.s is not None  # binary task: every split carries S
        w, note = reweigh_weights(prep.train.s, prep.train.labels)
        return Mitigation(
            "model_2's data, Kamiran-Calders reweighing",
            dataclasses.replace(prep, train=dataclasses.replace(prep.train, weights=w)),
            note=note,
        )
    if method == "adversarial":
        note = "" if bias_cfg.sigma > 0 else "sigma=0: eps is always zero, there is nothing for the adversary to remove"
        return Mitigation(
            f"model_2's data, adversary on S (gradient reversal, weight {eval_cfg.adv_weight:g})",
            decorrelated_val(prep, bias_cfg.sigma, seed),
            wrap=lambda net: Adversarial(net, bias_cfg.sigma, eval_cfg.adv_weight, seed),
            note=note,
        )
    if method == "channel_dropout":
        return Mitigation(
            f"model_2's data, eps re-drawn for {eval_cfg.dropout_rate:.0%} of each batch",
            decorrelated_val(prep, bias_cfg.sigma, seed),
            input_hook=channel_dropout(bias_cfg.sigma, eval_cfg.dropout_rate),
        )
    raise ValueError(f"unknown mitigation {method}")  # config.validate rejected it before any work
