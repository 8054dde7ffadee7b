"""The built-in demo dataset: SYNTHETIC images in the competition's Kaggle layout, so every entry point runs
without downloads.

Four procedurally drawn classes (1 disc, 2 cross, 3 triangle, 4 square) of random colour, size, position and
rotation on noisy random backgrounds, RGB JPEGs of 40-120 px. Deterministic from its seed; written once to the
cache folder (about 1 s). Shapes differ in form, not brightness, so the grayscale task is learnable but not trivial.

As in photos, the images carry their label imperfectly. Most show their shape clearly: strong luma contrast,
filling most of the image as the object does in the competition's photos, so a random crop still shows part of
its outline. The rest hide it (P_HIDDEN: 35% of discs and crosses, 10% of triangles and squares): the shape small,
faint (under the background's noise) and anywhere in the frame, as a subject far off or in poor light. Those are
guessed, which puts a ceiling of about 80% on model_1 of `bias-lab bias-eval` (disc vs cross), while model_2's eps
shortcut still scores ~100% in distribution and falls to chance on the decorrelated test: the course's lesson
(photos: model_1 ~76%, model_2 ~99%). Version 4 showed every shape clearly: both models scored 100% in distribution
and the conclusion read "the shortcut buys nothing (+0.0 points)". The bias pair carries more hidden images than
the other two classes so that the 4-class task keeps its signal for the README's tune: hidden images slow LeNet's
start within its 10 epochs. Tried and dropped: the same hidden share in every class (30%, a little less
faint: model_1 88%, 4-class val 0.74), a prominent shape of the other class in the hidden images (4-class val
0.55-0.73 with 20% of the pair only), clutter shapes of other classes, occlusion of the clear shapes and sensor
noise (4-class val 0.64; occlusion alone, 15% of the clear images: 0.71-0.77 against 0.83).

Measured on an AMD EPYC (2 cores), defaults, fresh cache and store:
  bias-lab bias-eval  model_1 80.0% in distribution and decorrelated; model_2 98.9% in distribution, 54.4%
                      decorrelated (biased); 16 s. Seeds 1 and 2: model_1 80.0%, 81.1%; model_2 100%, 100% and
                      50.0%, 50.0%. Version 4: 100%, 100% and 100%, 50.0%, 14 s.
  bias-lab tune       best val 0.733 (trial 0, the defaults), test 0.756, 5 complete, 15 pruned, 35 s; seed 1:
                      val 0.867, test 0.839. Version 4: val 0.978, test 0.961, 5 complete, 15 pruned, 37 s.
  bias-lab train --image-size 32 --epochs 8 (tests/test_core's check): best val 0.71 (version 4: > 0.8).

`write_demo(..., p_hidden={})` writes version 4's images exactly (every shape clear), for tests that need the pair
learned fast at 32 px. Version 3 drew the shape at a third of the side, off-centre, and the default crop cut it out
so often that 10 epochs of LeNet stayed at chance (LeNet's old init was the other half of it, see models.LeNet).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_VERSION = 5
# disc vs cross first: the default binary task of bias_eval (the first two labels) must be learnable by LeNet
CLASSES = {1: "disc", 2: "cross", 3: "triangle", 4: "square"}
N_TRAIN_PER_CLASS = 300
N_TEST_PER_CLASS = 40


# Share of each class's images that hide their shape: small (0.14-0.22 of the side as radius, against 0.30-0.40),
# faint (0-20 grey levels per channel from the background, whose noise has sd 25) and anywhere in the frame.
# Heavier for the bias study's pair (1, 2): a ceiling of about 80% on model_1 (those images are guessed), while the
# 4-class task keeps enough signal for the README's tune (see the module docstring).
P_HIDDEN = {1: 0.35, 2: 0.35, 3: 0.1, 4: 0.1}


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill: tuple) -> None:
    def poly(k: int, radius: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(angle + 2 * math.pi * i / k), cy + radius * math.sin(angle + 2 * math.pi * i / k))
            for i in range(k)
        ]

    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.polygon(poly(4, r * 1.2), fill=fill)
    elif shape == "triangle":
        d.polygon(poly(3, r * 1.3), fill=fill)
    else:
        w = r * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            d.polygon(
                [
                    (cx + dx * r * 1.2 - dy * w, cy + dy * r * 1.2 + dx * w),
                    (cx + dx * r * 1.2 + dy * w, cy + dy * r * 1.2 - dx * w),
                    (cx - dx * r * 1.2 + dy * w, cy - dy * r * 1.2 - dx * w),
                    (cx - dx * r * 1.2 - dy * w, cy - dy * r * 1.2 + dx * w),
                ],
                fill=fill,
            )


def _draw(label: int, rng: np.random.Generator, p_hidden: float) -> Image.Image:
    size = int(rng.integers(40, 121))
    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (size, size, 3))
    base = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB").filter(ImageFilter.GaussianBlur(1))
    hidden = p_hidden > 0 and rng.random() < p_hidden  # no draw at 0: p_hidden 0 draws version 4's images exactly
    # brighter on a dark background, darker on a light one
    sign = 1 if bg.mean() < 128 else -1
    if hidden:  # faint (0-20 grey levels per channel, under the background's noise), small, anywhere
        fg = tuple(int(v) for v in np.clip(bg + sign * rng.uniform(0, 20, 3), 0, 255))
        r = size * rng.uniform(0.14, 0.22)
        cx, cy = (size * rng.uniform(0.25, 0.75) for _ in range(2))
    else:  # strong luma contrast, so the shape survives the grayscale conversion; it fills most of the image
        fg = tuple(int(v) for v in np.clip(bg + sign * rng.integers(90, 160, 3), 0, 255))
        r = size * rng.uniform(0.30, 0.40)  # radius: the shape spans 60-100% of the side
        cx, cy = (size * rng.uniform(0.44, 0.56) for _ in range(2))
    _shape(ImageDraw.Draw(img), CLASSES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), fg)
    return img


def write_demo(
    root: Path,
    seed: int = 0,
    n_train: int = N_TRAIN_PER_CLASS,
    n_test: int = N_TEST_PER_CLASS,
    p_hidden: dict[int, float] | None = None,
) -> Path:
    """Write the demo set in the Kaggle layout under `root` (atomically: a half-written folder is never seen).

    p_hidden: share of each label's images that hide their shape (default P_HIDDEN; a label left out: none, so
    `{}` writes version 4's images exactly, every shape clear)."""
    hide = P_HIDDEN if p_hidden is None else p_hidden
    rng = np.random.default_rng(seed)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train" / "train").mkdir(parents=True)
    (tmp / "test" / "test").mkdir(parents=True)
    ids = rng.permutation(np.arange(100000, 1000000))[: (n_train + n_test) * len(CLASSES)]
    rows: dict[str, list[tuple[int, int]]] = {"train": [], "test": []}
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for _ in range(n):
            for label in CLASSES:
                i = int(ids[k])
                k += 1
                _draw(label, rng, hide.get(label, 0.0)).save(
                    tmp / split / split / f"{i}.jpg", quality=int(rng.integers(70, 96))
                )
                rows[split].append((i, label))
    order = rng.permutation(len(rows["train"]))
    with open(tmp / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *(rows["train"][j] for j in order)])
    with open(tmp / "solution.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *rows["test"]])
    with open(tmp / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *((i, 1) for i, _ in rows["test"])])
    with open(tmp / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([("label", "name"), *CLASSES.items()])
    (tmp / "README.txt").write_text("SYNTHETIC demo data generated by bias_lab.demo: not ImageNet.\n")
    if root.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, root)
    return root


def ensure_demo(cache: Path, seed: int = 0) -> Path:
    """The demo folder in `cache`, generated on first use."""
    root = cache / f"demo-v{DEMO_VERSION}-seed{seed}"
    if not (root / "train.csv").exists():
        cache.mkdir(parents=True, exist_ok=True)
        write_demo(root, seed)
    return root
