"""Every logged bias_lab model as MLflow's own clients use it: images in; label, class name and probabilities out.

`mlflow.pyfunc.load_model("models:/bias-lab@champion")`, `mlflow models serve` and `mlflow models predict` run
`ImageClassifier`. Each row gives an image as `image` (JPEG/PNG/... bytes, base64 in JSON) or `path` (a file the
server can read); any size or colour mode. It is decoded as the training cache decoded its files, normalised with
the training statistics and predicted with the model's TTA setting: inference.probabilities, kaggle_submit's path.
A model trained with the eps channel takes `s` (1: eps present; default 0, as in a photo).

The model is logged as code (MLflow runs this file at load: no pickle); its weights are a state_dict read with
weights_only, and the bias_lab package travels with it (code_paths), so a server needs torch, not this repo.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema
from torch import nn

from bias_lab import inference
from bias_lab.models import ModelMeta

PACKAGE = Path(__file__).parent


class ImageClassifier(PythonModel):
    """The pyfunc: weights and preprocessing from the model's artifacts, rows of images -> a table of predictions."""

    model: nn.Module
    meta: ModelMeta

    def load_context(self, context: Any) -> None:
        art = context.artifacts
        self.model, self.meta = inference.rebuild(Path(art["meta"]), Path(art["weights"]), "the served model")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images, failed = inference.decode_images(_items(model_input), self.meta.image_size)
        if failed:
            raise MlflowException(
                f"rows {failed[:10]} are not images this model can read (truncated, not an image, or over the decode "
                "limit): send JPEG/PNG bytes as 'image' (base64 in JSON) or a readable file as 'path'",
                INVALID_PARAMETER_VALUE,
            )
        s = None
        if "s" in model_input.columns and self.meta.eps_channel:
            s = torch.tensor(model_input["s"].fillna(0).astype("int64").to_numpy())
        return table(inference.probabilities(self.model, self.meta, images, s), self.meta)


def _items(frame: pd.DataFrame) -> list[bytes | str]:
    """Each row's image: its bytes, else its path; a row with neither is the caller's mistake, said in one line."""
    if not len(frame):
        return []
    image = frame["image"] if "image" in frame.columns else pd.Series([None] * len(frame))
    path = frame["path"] if "path" in frame.columns else pd.Series([None] * len(frame))
    items: list[bytes | str] = []
    empty: list[int] = []
    for i, (b, p) in enumerate(zip(image.tolist(), path.tolist())):
        if isinstance(b, (bytes, bytearray)) and b:
            items.append(bytes(b))
        elif isinstance(p, str) and p:
            items.append(p)
        else:
            empty.append(i)
    if empty:
        raise MlflowException(
            f"rows {empty[:10]} have no image: give each row 'image' (the file's bytes, base64 in JSON) or 'path'",
            INVALID_PARAMETER_VALUE,
        )
    return items


def table(probs: torch.Tensor, meta: ModelMeta) -> pd.DataFrame:
    """label (train.csv's value), class_name, its probability, then one p_<label> column per class."""
    best = probs.argmax(1).tolist() if len(probs) else []
    out = pd.DataFrame(
        {
            "label": [meta.classes[i] for i in best],
            "class_name": [meta.name_of(meta.classes[i]) for i in best],
            "probability": [float(probs[r, i]) for r, i in enumerate(best)],
        }
    )
    for j, c in enumerate(meta.classes):
        out[f"p_{c}"] = probs[:, j].double().numpy() if len(probs) else np.zeros(0)
    return out


def signature(meta: ModelMeta) -> ModelSignature:
    """What the registry shows: image bytes or a path in (plus `s` for an eps model), the table of `table` out."""
    inputs = [ColSpec(DataType.binary, "image", required=False), ColSpec(DataType.string, "path", required=False)]
    if meta.eps_channel:
        inputs.append(ColSpec(DataType.long, "s", required=False))
    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.string, "class_name")]
    outputs += [ColSpec(DataType.double, n) for n in ["probability", *(f"p_{c}" for c in meta.classes)]]
    return ModelSignature(Schema(inputs), Schema(outputs))  # type: ignore[arg-type]


def example() -> pd.DataFrame:
    """An input example: one JPEG of another size and mode than the model's input (a 96 x 80 RGB gradient), as a
    photo would be."""
    from PIL import Image

    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return pd.DataFrame({"image": [buf.getvalue()]})


def package_copy(folder: Path) -> Path:
    """The bias_lab package's sources (no caches) copied into `folder`, for code_paths."""
    dest = folder / "bias_lab"
    dest.mkdir(parents=True)
    for f in PACKAGE.glob("*.py"):
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def log(model: nn.Module, meta: ModelMeta, requirements: list[str], name: str = "model") -> Any:
    """Log `model` as this file's pyfunc, with its state_dict and preprocessing as artifacts."""
    import json

    cpu_model = model.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta_file = Path(tmp) / inference.WEIGHTS_FILE, Path(tmp) / inference.META_FILE
        torch.save(cpu_model.state_dict(), weights)
        meta_file.write_text(json.dumps(meta.to_dict(), indent=2))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=__file__,
            artifacts={"weights": str(weights), "meta": str(meta_file)},
            code_paths=[str(package_copy(Path(tmp) / "code"))],
            signature=signature(meta),
            input_example=example(),
            metadata={"bias_lab": meta.to_dict()},
            pip_requirements=requirements,
        )


if __name__ != "bias_lab.serving":  # MLflow runs this file under a name of its own to load a model: hand it one
    mlflow.models.set_model(ImageClassifier())
