"""Does a model look at the image or at eps? Ablations and input-gradient saliency (recorded on each child run).

- ablation: test accuracy (in distribution) with the eps channel zeroed, and with eps shuffled across the test
  samples (so it keeps its distribution but no longer belongs to its image). A model that ignores eps loses
  nothing; one that reads the label off eps falls towards chance.
- saliency (Simonyan et al. 2014): |d logit(predicted class) / d input| per pixel; `saliency_eps_share` is the
  share of the total that falls on the eps channel (0 for a model without one).
A model without the eps channel (model_1 clean) gets the same metrics (ablation = its test accuracy, share 0),
so every child carries identical metric names.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from bias_lab import metrics, plots
from bias_lab.loop import Norm, Part, batch_inputs, predict
from bias_lab.pipeline import Prepared

N_FIGURE = 4  # test images shown in the saliency figure: 2 per class
SALIENCY_BATCH = 128


def ablate(part: Part, mode: str, seed: int) -> Part:
    """`part` with its eps channel zeroed ('zero') or permuted across samples ('shuffle'); S is left as is."""
    if part.eps is None:
        return part
    if mode == "zero":
        return dataclasses.replace(part, eps=torch.zeros_like(part.eps))
    perm = torch.randperm(len(part), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(part, eps=part.eps[perm.to(part.eps.device)])


def accuracy(model: nn.Module, part: Part, norm: Norm, tta: bool = False) -> float:
    """Share of `part` predicted right, computed as the run's test_accuracy is (a float32 mean differs in the last bits)."""
    if len(part) == 0:
        return float("nan")
    return metrics.accuracy(part.labels.cpu().numpy(), predict(model, part, norm, tta=tta).argmax(1).numpy())


def saliency(model: nn.Module, part: Part, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, |gradient| of the predicted class's logit w.r.t. them), both N x C x H x W on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    xs, gs = [], []
    for start in range(0, len(part), SALIENCY_BATCH):
        idx = torch.arange(start, min(start + SALIENCY_BATCH, len(part)), device=part.images.device)
        x = batch_inputs(part, idx, norm).to(device).requires_grad_(True)
        logits = model(x).float()
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        xs.append(x.detach().cpu())
        assert x.grad is not None  # x requires grad and took part in the loss
        gs.append(x.grad.abs().cpu())
    model.zero_grad(set_to_none=True)
    if not xs:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(xs), torch.cat(gs)


def figure_samples(part: Part, seed: int, k: int = N_FIGURE) -> list[int]:
    """k test indices, half per class, preferring samples where eps is present (S=1) so both channels show."""
    rng = np.random.default_rng(seed)
    y = part.labels.cpu().numpy()
    s = part.s.cpu().numpy() if part.s is not None else np.zeros_like(y)
    out: list[int] = []
    for c in (0, 1):
        pool = np.flatnonzero(y == c)
        pool = np.concatenate([rng.permutation(pool[s[pool] == 1]), rng.permutation(pool[s[pool] == 0])])
        out += pool[: k // 2].tolist()
    return out


def explain(model: nn.Module, prep: Prepared, seed: int, tta: bool = False) -> tuple[dict[str, float], object]:
    """The explanation metrics of one model on the in-distribution test split, and its saliency figure. `tta`: predict
    as the model's test_accuracy was measured, so an ablation's accuracy compares with it."""
    test = prep.test
    x, g = saliency(model, test, prep.norm)
    total = float(g.sum()) if g.numel() else 0.0
    share = float(g[:, 1:].sum()) / total if total > 0 and g.shape[1] > 1 else 0.0
    metrics = {
        "ablation_zero_eps_test_accuracy": accuracy(model, ablate(test, "zero", seed), prep.norm, tta),
        "ablation_shuffle_eps_test_accuracy": accuracy(model, ablate(test, "shuffle", seed), prep.norm, tta),
        "saliency_eps_share": share,
    }
    pick = figure_samples(test, seed) if len(test) else []
    with torch.no_grad():
        pred = predict(model, test, prep.norm, tta=tta).argmax(1) if pick else torch.zeros(0, dtype=torch.long)
    classes = prep.dataset.classes
    samples = [
        {
            "input": x[i].numpy(),
            "saliency": g[i].numpy(),
            "title": f"y={classes[int(test.labels[i])]}, pred={classes[int(pred[i])]}, S={int(test.s[i]) if test.s is not None else '-'}",
        }
        for i in pick
    ]
    return metrics, plots.saliency_maps(samples, share)
