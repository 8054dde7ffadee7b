"""The logged model through MLflow's own clients: `mlflow.pyfunc.load_model` on image files and bytes gives the
run's own test numbers, `mlflow models serve` labels a posted JPEG, and the model loads without this repository."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from bias_lab import pipeline
from bias_lab.config import BiasConfig, DataConfig
from bias_lab.files import list_files
from bias_lab.loop import predict
from bias_lab.tracking import load_model

from .test_submit import register, train

SIZE = ["--image-size", "32"]  # FAST's: the split and the decode below must use the model's size


def _test_files(data_dir: Path) -> tuple[pipeline.Prepared, list[str]]:
    """The run's test split, prepared as train prepared it, and the image file of each of its images."""
    prep = pipeline.prepare(DataConfig(data=str(data_dir), image_size=32), BiasConfig(), seed=0)
    listing = list_files(data_dir)
    file_of = dict(zip(listing.train_ids, listing.train_files))
    return prep, [file_of[prep.dataset.ids[i]] for i in prep.split.test]


def test_pyfunc_on_the_image_files_gives_the_runs_own_test_numbers(kaggle_data: Path, client) -> None:
    """Paths and JPEG bytes through mlflow.pyfunc give the probabilities the run measured on its cached tensors (the
    training normalisation, TTA), hence its logged test_accuracy, with labels and class names."""
    uri = train(kaggle_data)
    served = mlflow.pyfunc.load_model(uri)
    prep, paths = _test_files(kaggle_data)
    by_path = served.predict(pd.DataFrame({"path": paths}))
    by_bytes = served.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
    pd.testing.assert_frame_equal(by_path, by_bytes)

    model, meta = load_model(uri)
    assert meta.tta  # the default: the path under test includes the mirror
    measured = predict(model, prep.test, prep.norm, tta=True).softmax(1).numpy()
    np.testing.assert_allclose(by_path[[f"p_{c}" for c in meta.classes]].to_numpy(), measured, atol=1e-5)

    truth = [prep.dataset.classes[int(y)] for y in prep.test.labels]
    accuracy = float(np.mean(by_path["label"].to_numpy() == np.array(truth)))
    run = client.get_run(uri.split("/")[1]).data
    assert accuracy == pytest.approx(run.metrics["test_accuracy"], abs=1e-9)
    assert set(by_path["class_name"]) <= {"disc", "cross", "triangle", "square"}
    assert by_path["probability"].between(0, 1).all()
    schema = served.metadata.get_input_schema().input_names()
    assert schema == ["image", "path"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_served_champion_labels_a_posted_jpeg(kaggle_data: Path, tmp_path: Path) -> None:
    """`mlflow models serve -m models:/bias-lab@champion` on 127.0.0.1: a posted JPEG (base64, as MLflow's JSON
    carries bytes) gets the label, class name and probabilities the in-process pyfunc gives; a non-image gets a 400
    that says what to send."""
    uri = train(kaggle_data)
    register(uri)
    jpeg = Path(_test_files(kaggle_data)[1][0]).read_bytes()
    expected = mlflow.pyfunc.load_model("models:/bias-lab@champion").predict(pd.DataFrame({"image": [jpeg]}))

    port = _free_port()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # an activated venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": path}  # uvicorn, as users have it
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/bias-lab@champion",
        "--env-manager",
        "local",
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*cmd, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
        answer = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"][0]
        want = expected.iloc[0]
        assert (got["label"], got["class_name"]) == (want["label"], want["class_name"])
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)

        bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not a jpeg").decode()]]}}
        refused = requests.post(f"{url}/invocations", json=bad, timeout=60)
        assert refused.status_code == 400 and "send JPEG/PNG bytes" in refused.json()["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_model_loads_and_predicts_without_this_repository(kaggle_data: Path, tmp_path: Path) -> None:
    """The package travels with the model: a Python without bias_lab on its path (no site hooks, so no editable
    install) loads the model from the store and imports bias_lab from the model's own copy."""
    uri = train(kaggle_data)
    jpeg = tmp_path / "x.jpg"
    jpeg.write_bytes(Path(_test_files(kaggle_data)[1][0]).read_bytes())
    site = [p for p in sys.path if p.endswith("site-packages")]
    script = f"""
import importlib.util, json, mlflow, pandas as pd
assert importlib.util.find_spec("bias_lab") is None
mlflow.set_tracking_uri({mlflow.get_tracking_uri()!r})
out = mlflow.pyfunc.load_model({uri!r}).predict(pd.DataFrame({{"path": [{str(jpeg)!r}]}}))
import bias_lab
print(json.dumps({{"label": out.label[0], "from": bias_lab.__file__}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site)}
    done = subprocess.run(
        [sys.executable, "-S", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["label"] in {"1", "2", "3", "4"}
    assert f"{os.sep}code{os.sep}bias_lab{os.sep}" in answer["from"]


def test_an_eps_model_takes_s_and_the_noise_moves_its_answer(tmp_path: Path) -> None:
    """A model trained with the eps channel is served with `s` in its signature; s=1 adds the noise (here the model
    reads only the eps channel, so the answer flips), s absent means no noise, as in a photo."""
    from bias_lab import serving
    from bias_lab.models import ModelMeta

    class EpsReader(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            energy = x[:, 1].pow(2).mean(dim=(1, 2)) * self.w  # eps is N(0, sigma^2) where s = 1, zero elsewhere
            return torch.stack([0.5 - energy, energy - 0.5], dim=1) * 10  # eps^2 averages sigma^2 = 1

    meta = ModelMeta("lenet", 2, 16, 0.5, 0.25, ["cat", "dog"], task="binary", eps_channel=True, bias={"sigma": 1.0})
    served = serving.ImageClassifier()
    served.model, served.meta = EpsReader(), meta
    jpeg = serving.example().image[0]
    photo = served.predict(None, pd.DataFrame({"image": [jpeg, jpeg]}))
    with_s = served.predict(None, pd.DataFrame({"image": [jpeg, jpeg], "s": [0, 1]}))
    assert list(photo.label) == ["cat", "cat"] and list(with_s.label) == ["cat", "dog"]
    alone = served.predict(None, pd.DataFrame({"image": [jpeg], "s": [1]}))  # row 0 now: the same answer
    assert alone.p_dog[0] == with_s.p_dog[1]
    assert serving.signature(meta).inputs.input_names() == ["image", "path", "s"]


def test_a_model_logged_with_the_pytorch_flavour_still_loads(tmp_path: Path) -> None:
    """Models logged before the pyfunc (MLflow's PyTorch flavour with weights.pt and bias_lab.json as extra files)
    load with tracking.load_model: kaggle_submit and bias_eval keep working on a store that holds them."""
    from bias_lab.models import ModelMeta, build

    model, meta = build("lenet", 1, 4, 32), ModelMeta("lenet", 1, 32, 0.5, 0.25, list("1234"))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "bias_lab.json").write_text(json.dumps(meta.to_dict()))
    example = np.zeros((2, 1, 32, 32), dtype=np.float32)
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            extra_files=[str(tmp_path / "weights.pt"), str(tmp_path / "bias_lab.json")],
        )
    loaded, got = load_model(f"runs:/{run.info.run_id}/model")
    assert got.classes == list("1234") and got.class_names == []
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
