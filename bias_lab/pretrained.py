"""ImageNet-1k weights from torchvision, through torch's own hub cache: the one thing bias_lab ever downloads, and
only when a run asks for it (weights=imagenet).

The file is looked for in torch.hub's cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/...), downloaded
there on first use, and checked before any data is read: offline, the error names the file and where to put it; a
file that holds other weights (another architecture's, an empty dict) names the file and how to replace it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torchvision.models import get_model, get_model_weights

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
    return _read(name, _weights(name).url, cached_file(name))


@functools.lru_cache(maxsize=2)
def _read(name: str, url: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except Exception as e:  # offline (URLError), a proxy, a truncated file...
        where = "cannot read it" if path.exists() else "it is not there and the download failed"
        raise UserError(
            f"weights=imagenet needs {path.name} in torch's hub cache {path.parent} ({where}: {first_line(e, 120)}): "
            f"download {url} to {path}, or use weights=none"
        ) from None
    problem = _mismatch(name, state)
    check(
        problem is None,
        f"weights=imagenet: {path} holds no {name} weights ({problem}): delete it so it is downloaded again (or "
        f"download {url} there yourself), or use weights=none",
    )
    return state


def _mismatch(name: str, state: object) -> str | None:
    """How `state` differs from the state_dict of torchvision's `name` (its keys, and the shape of each tensor);
    None when it fits. The model is built on the meta device: shapes only, no weights allocated or initialised."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state_dict"
    with torch.device("meta"):
        want = {k: v.shape for k, v in get_model(name).state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}
    missing, extra = [k for k in want if k not in got], [str(k) for k in got if k not in want]
    shapes = [k for k in want if k in got and getattr(got[k], "shape", None) != want[k]]
    if missing:
        return (
            f"missing {', '.join(missing[:2])}{' ...' if len(missing) > 2 else ''}: {len(missing)} of {len(want)} keys"
        )
    if extra:
        return f"unexpected {', '.join(extra[:2])}{' ...' if len(extra) > 2 else ''}: {len(extra)} keys {name} has not"
    if shapes:
        k = shapes[0]
        return f"{k} is {list(getattr(got[k], 'shape', []))}, {name}'s is {list(want[k])}"
    return None


def ensure(name: str, weights: str) -> None:
    """Before any work: with weights=imagenet, have the file in the cache (downloading it once), readable, and
    holding `name`'s weights (keys and shapes), so a wrong file is named before any data is read or run started."""
    if weights == "imagenet":
        state_dict(name)
