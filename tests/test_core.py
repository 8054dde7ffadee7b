"""The `train` command end to end: what a run logs to a real MLflow store, the MLproject contract, the demo data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from bias_lab import config as C
from bias_lab import pipeline
from bias_lab.cli import main
from bias_lab.tracking import load_model

from .conftest import FAST, REPO, all_runs, figures_page, invoke


def test_train_run_logs_everything(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), *FAST)
    assert code == 0, out
    [run] = all_runs(client)
    assert run.info.status == "FINISHED"
    p = run.data.params
    for key in ("model", "image_size", "lr", "momentum", "batch_size", "weight_decay", "val_fraction", "test_fraction",
                "seed", "data", "data_digest", "data_source", "device_resolved", "in_channels", "num_classes"):
        assert key in p, key
    assert (p["model"], p["image_size"], p["in_channels"], p["num_classes"]) == ("lenet", "32", "1", "4")
    m = run.data.metrics
    for key in ("train_time_s", "images_per_s", "test_accuracy", "test_loss", "best_val_accuracy", "total_params", "macs_per_image"):
        assert key in m, key
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["train_time_s"] > 0 and m["n_train"] + m["n_val"] + m["n_test"] == 160
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"):
        assert [h.step for h in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert "test_di" not in m  # multiclass: no bias measures
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_summary.md", "model_summary.csv", "figures.html"} <= artifacts
    figures_page(client, run.info.run_id, {"learning_curves", "confusion_matrix"})
    assert "| **total** |" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_summary.md")
    contexts = sorted(d.tags[0].value for d in run.inputs.dataset_inputs)
    assert contexts == ["test", "train", "val"]
    model, meta = load_model(f"runs:/{run.info.run_id}/model")
    assert meta["classes"] == ["1", "2", "3", "4"] and meta["image_size"] == 32 and meta["in_channels"] == 1
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 4)


def test_binary_biased_run_logs_di(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), *FAST, "--bias", "true", "--classes", "2,4")
    assert code == 0, out
    [run] = all_runs(client)
    m = run.data.metrics
    for key in ("test_di", "test_di_ci_low", "test_di_ci_high", "decorrelated_test_di", "decorrelated_test_accuracy"):
        assert key in m, key
    assert run.data.params["in_channels"] == "2" and run.data.tags["task"] == "binary"
    _, meta = load_model(f"runs:/{run.info.run_id}/model")
    assert meta["classes"] == ["2", "4"] and meta["eps_channel"] is True


def test_failure_ends_run_failed_with_error(kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "measure", broken)
    code, out = invoke("train", "--data", str(kaggle_data), *FAST)
    assert code == 1 and "disk on fire" in out and "Traceback" not in out
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["error"]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]  # kept


def test_resume_continues_the_same_run(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    args = ("train", "--data", str(kaggle_data), *FAST)
    assert invoke(*args)[0] == 0
    first = all_runs(client)[0].data.metrics["test_accuracy"]
    assert invoke(*args, "--resume", "true")[0] == 0
    [run] = all_runs(client)  # no second run: the checkpoint's run was re-opened and finished
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.metrics["test_accuracy"] == first


def test_demo_data_is_learnable(client: mlflow.MlflowClient) -> None:
    """LeNet gets well above chance (0.25) on the synthetic demo data in a few epochs."""
    code, out = invoke("train", "--image-size", "32", "--epochs", "6", "--lr", "0.1", "--batch-size", "32")
    assert code == 0, out
    [run] = all_runs(client)
    assert run.data.metrics["best_val_accuracy"] > 0.5
    assert run.data.tags["synthetic_data"] == "true" and run.data.params["data_source"] == "demo (synthetic)"


@pytest.mark.parametrize("entry,command", [("train", "train"), ("tune", "tune"), ("bias_eval", "bias-eval"), ("kaggle_submit", "kaggle-submit"),
                                           ("bias_sweep", "bias-sweep")])
def test_mlproject_mirrors_cli(entry: str, command: str) -> None:
    """Every MLproject parameter is a CLI option of the same name (dashes), passed through, with the same default."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][entry]
    cmd = main.commands[command]
    opts = {p.name: p for p in cmd.params}
    assert set(spec["parameters"]) == set(opts)
    assert spec["command"].startswith(f"python entrypoints/{entry}.py ")
    for name, p in spec["parameters"].items():
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"], name
        default = opts[name].default
        assert str(p["default"]).lower() == str(default).lower() or float(p["default"]) == float(default), name
    assert (REPO / "entrypoints" / f"{entry}.py").exists()


def test_config_fields_have_help() -> None:
    for cls in (C.DataConfig, C.TrainConfig, C.BiasConfig, C.TuneConfig, C.BiasEvalConfig, C.SubmitConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_mlflow_run_entry_point(kaggle_data: Path, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    """`mlflow run . -e train --env-manager local` (MLflow creates the run and logs -P params itself)."""
    import os
    import subprocess

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(["mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local", "-P", f"data={kaggle_data}",
                           "-P", "image_size=32", "-P", "epochs=1", "-P", "classes=1,3", "-P", "bias=true"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = all_runs(client)
    assert run.info.status == "FINISHED" and run.data.params["classes"] == "1,3" and "test_di" in run.data.metrics


def test_fresh_train_ends_a_run_left_running_by_a_killed_one(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    args = ("train", "--data", str(kaggle_data), *FAST)
    assert invoke(*args)[0] == 0
    [old] = all_runs(client)
    client.update_run(old.info.run_id, status="RUNNING")  # what SIGKILL leaves behind: no handler ran
    assert invoke(*args)[0] == 0  # no resume: a fresh run
    runs = {r.info.run_id: r for r in all_runs(client)}
    assert len(runs) == 2 and runs[old.info.run_id].info.status == "KILLED"
    assert [r.info.status for rid, r in runs.items() if rid != old.info.run_id] == ["FINISHED"]


def test_processes_starting_together_on_a_new_sqlite_store_all_succeed(tmp_path: Path) -> None:
    """MLflow creates and migrates a new sqlite store's tables without a lock: without tracking's file lock, 3
    processes starting at once failed 2 times in 3 ('table params already exists', half-applied migrations)."""
    import os
    import subprocess
    import sys

    db = tmp_path / "new" / "mlflow.db"
    db.parent.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    procs = [subprocess.Popen([sys.executable, "-c", "from bias_lab import tracking; tracking.setup()"], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()].count("bias-lab") == 1
