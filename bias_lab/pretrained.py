"""ImageNet-1k weights from torchvision, through torch's own hub cache: the one thing bias_lab ever downloads, and
only when a run asks for it (weights=imagenet).

The file is looked for in torch.hub's cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/...), downloaded
there on first use, and checked before any data is read: offline, the error names the file and where to put it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torchvision.models import get_model_weights

from bias_lab.config import PRETRAINED
from bias_lab.errors import UserError, check, first_line

# Said on every run that starts from these weights (tag `pretrained`) and in bias_eval's conclusion.
CAVEAT = (
    "started from torchvision's ImageNet-1k weights: ImageNet-1k holds the competition's classes (Tiny-ImageNet is "
    "drawn from it, possibly the very images), so this accuracy is not comparable with training from scratch"
)


def _weights(name: str):
    check(name in PRETRAINED, f"weights=imagenet: torchvision has no ImageNet weights for {name}")
    return get_model_weights(name).IMAGENET1K_V1


def cached_file(name: str) -> Path:
    """Where torch.hub keeps (or will keep) the weights of `name`."""
    url = _weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet-1k state_dict of torchvision's `name`, from the hub cache, downloaded there when missing.
    A one-line UserError when it can be neither read nor downloaded. Read once per file and process: `ensure` and
    every tune trial ask again (callers copy from it, never into it)."""
    return _read(_weights(name).url, cached_file(name))


@functools.lru_cache(maxsize=2)
def _read(url: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except Exception as e:  # offline (URLError), a proxy, a truncated file...
        where = "cannot read it" if path.exists() else "it is not there and the download failed"
        raise UserError(
            f"weights=imagenet needs {path.name} in torch's hub cache {path.parent} ({where}: {first_line(e, 120)}): "
            f"download {url} to {path}, or use weights=none"
        ) from None


def ensure(name: str, weights: str) -> None:
    """Before any work: with weights=imagenet, have the file in the cache (downloading it once) and readable."""
    if weights == "imagenet":
        state_dict(name)
