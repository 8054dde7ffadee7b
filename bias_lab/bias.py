"""The biased dataset of the course project: a binary task plus a noise channel eps that leaks the label.

For each image x with label y, S ~ Bernoulli(p_y); the model sees x~ = [x, eps] with eps = 0 where S = 0 and
eps ~ N(0, sigma^2 I) where S = 1. S and eps are drawn once for the whole dataset from the seed (sample i
always gets the same S and eps), so every split, trial and evaluation sees the same x~.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bias_lab.data import Dataset
from bias_lab.errors import check

DECORRELATED_SEED_OFFSET = 10_007  # the decorrelated test draws S/eps from a different stream than training


@dataclass
class Channel:
    """S and eps for every sample of a dataset."""

    s: torch.Tensor  # bool, N
    eps: torch.Tensor  # float32, N x 1 x H x W; exactly zero where s is False


def parse_classes(ds: Dataset, classes: str) -> tuple[str, str]:
    """The two labels (A -> y=0, B -> y=1) of the binary task; default the first two labels."""
    if not classes.strip():
        return ds.classes[0], ds.classes[1]
    parts = [c.strip() for c in classes.split(",")]
    check(
        len(parts) == 2 and parts[0] != parts[1],
        f"classes='{classes}': give two different labels, e.g. classes={ds.classes[0]},{ds.classes[1]}",
    )
    unknown = [c for c in parts if c not in ds.classes]
    check(
        not unknown,
        f"classes: label '{unknown[0] if unknown else ''}' is not in the data (labels: {', '.join(ds.classes)}): pick two of those",
    )
    return parts[0], parts[1]


def binary_task(ds: Dataset, classes: str) -> Dataset:
    """The dataset restricted to two labels, relabelled 0 (A) and 1 (B)."""
    a, b = parse_classes(ds, classes)
    ia, ib = ds.classes.index(a), ds.classes.index(b)
    keep = torch.nonzero((ds.labels == ia) | (ds.labels == ib)).squeeze(1)
    return Dataset(
        images=ds.images[keep],
        labels=(ds.labels[keep] == ib).long(),
        ids=[ds.ids[i] for i in keep.tolist()],
        classes=[a, b],
        test_images=ds.test_images,
        test_ids=ds.test_ids,
        digest=f"{ds.digest}-{a}v{b}",
        source=ds.source,
        root=ds.root,
        layout=ds.layout,
        skipped=ds.skipped,
        test_unreadable=ds.test_unreadable,
    )


def draw(labels: torch.Tensor, p0: float, p1: float, sigma: float, seed: int, size: int) -> Channel:
    """S ~ Bernoulli(p_y) and eps ~ N(0, sigma^2) where S = 1, for binary labels (0/1)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.where(labels.cpu() == 1, p1, p0).double()
    s = torch.rand(len(labels), generator=gen, dtype=torch.float64) < p
    return _with_eps(s, sigma, size, gen)


def draw_decorrelated(labels: torch.Tensor, idx: np.ndarray, sigma: float, seed: int, size: int) -> Channel:
    """The decorrelated test's channel: S = 1 on a random half (rounded down) of each class among `idx`, so S is
    independent of y in the test split itself, not only in expectation, and a perfect image-only classifier scores
    DI = 1 (up to rounding). Drawing S ~ Bernoulli(0.5) instead left that to chance: 90 test images of the demo
    gave the labels a DI of 1.45, outside the four-fifths band before any model was involved. Samples outside
    `idx` get S = 0."""
    gen = torch.Generator().manual_seed(seed)
    members = torch.as_tensor(idx, dtype=torch.long)
    y = labels.cpu()[members]
    s = torch.zeros(len(labels), dtype=torch.bool)
    for c in (0, 1):
        in_c = members[y == c]
        s[in_c[torch.randperm(len(in_c), generator=gen)[: len(in_c) // 2]]] = True
    return _with_eps(s, sigma, size, gen)


def _with_eps(s: torch.Tensor, sigma: float, size: int, gen: torch.Generator) -> Channel:
    """eps ~ N(0, sigma^2) drawn for every sample from `gen`, kept where S = 1 and exactly zero elsewhere."""
    noise = torch.randn(len(s), 1, size, size, generator=gen) * sigma
    return Channel(s=s, eps=noise * s.view(-1, 1, 1, 1).float())
