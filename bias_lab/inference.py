"""A logged model's one predict path: weights and preprocessing back from files, images in, probabilities out.

kaggle_submit's CSV, the served model (bias_lab.serving) and the test accuracy a run records all score images the
same way: decoded by data.decode (as the training cache was), normalised with the training statistics, through
loop.predict with the model's own TTA setting. Pure: no MLflow here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bias_lab.data import decode
from bias_lab.errors import UserError, check, first_line
from bias_lab.loop import Norm, Part, predict
from bias_lab.models import ModelMeta, build

META_FILE = "bias_lab.json"
WEIGHTS_FILE = "weights.pt"
EPS_SEED = 0  # the served eps noise: one fixed draw, so an image and its s always get one answer


def rebuild(meta_file: Path, weights_file: Path, uri: str) -> tuple[nn.Module, ModelMeta]:
    """The model from its `bias_lab.json` and state_dict (weights_only: no code from the file runs), in eval mode.
    A truncated upload or a hand-edited file is a UserError naming it, not a JSONDecodeError/KeyError traceback."""
    redo = "pass another model/version, or train/tune again to log a fresh one"
    try:
        try:
            meta = ModelMeta.from_dict(json.loads(meta_file.read_text(encoding="utf-8")))
        except KeyError as e:
            raise UserError(
                f"the {META_FILE} of '{uri}' lacks {e.args[0]}: it is not a bias_lab model this version can read; {redo}"
            ) from None
        model = build(meta.arch, meta.in_channels, len(meta.classes), meta.image_size, meta.stem, int(meta.width))
    except (OSError, ValueError, TypeError) as e:  # broken JSON, not UTF-8, a value of the wrong type
        raise UserError(
            f"the {META_FILE} of '{uri}' is corrupt ({first_line(e)}): it is not a readable bias_lab model; {redo}"
        ) from e
    try:
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    except Exception:
        # Never show torch's own message: for a file weights_only refuses it advises loading it with
        # weights_only=False, which would run whatever code the file holds. Our words, and no chained traceback.
        raise UserError(
            f"the weights of '{uri}' ({WEIGHTS_FILE}) are corrupt or not a bias_lab {meta.arch} state_dict: {redo}"
        ) from None
    return model.eval(), meta


def decode_images(items: Sequence[bytes | str | Path], size: int) -> tuple[torch.Tensor, list[int]]:
    """Image bytes (JPEG, PNG, any size or mode) or file paths -> N x 1 x size x size uint8, as the training
    cache decoded its files; the positions that could not be decoded are returned (their rows are zeros)."""
    out = np.zeros((len(items), 1, size, size), dtype=np.uint8)
    failed = []
    for i, item in enumerate(items):
        pixels = decode(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item, size)
        if pixels is None:
            failed.append(i)
        else:
            out[i, 0] = pixels
    return torch.from_numpy(out), failed


def diverged(uri: str) -> str:
    """The message for a model whose outputs are not numbers: its own fault, not the data's."""
    return (
        f"model '{uri}' outputs NaN/inf (its training diverged, e.g. a too high learning rate): pick another model "
        "or version, or train again with a lower lr"
    )


@torch.no_grad()
def probabilities(
    model: nn.Module,
    meta: ModelMeta,
    images: torch.Tensor,
    s: torch.Tensor | None = None,
    batch_size: int = 256,
    uri: str = "",
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities (N x classes, float32, CPU) of uint8 images N x 1 x S x S, in chunks (a progress-bar tick
    each). A model with the eps channel gets eps ~ N(0, sigma^2) where `s` is 1 (default: nowhere, as in a photo).
    Finite weights can still overflow to inf or NaN outputs: those have no meaningful argmax, so they stop it."""
    from tqdm.auto import tqdm

    eps = None
    if meta.eps_channel:  # one draw for every row, so an answer does not depend on the row's place in the batch
        present = torch.zeros(len(images), dtype=torch.bool) if s is None else s.bool()
        sigma = float((meta.bias or {}).get("sigma", 1.0))
        side = meta.image_size
        noise = torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(EPS_SEED)) * sigma
        eps = noise * present.view(-1, 1, 1, 1).float()
    norm, out = Norm(meta.mean, meta.std), []
    with tqdm(total=len(images), desc="predict", unit="img", leave=False, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            rows = slice(start, start + batch_size)
            part = images[rows]
            chunk = Part(part, torch.zeros(len(part), dtype=torch.long), None if eps is None else eps[rows])
            logits = predict(model, chunk, norm, batch_size, tta=meta.tta)
            check(bool(logits.isfinite().all()), diverged(uri))
            out.append(logits.softmax(1))
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, len(meta.classes))


def labels(probs: torch.Tensor, meta: ModelMeta) -> list[str]:
    """The original label strings (train.csv's values) of the most probable classes."""
    return [meta.classes[i] for i in probs.argmax(1).tolist()]
