"""Bad settings are refused before anything happens: one line naming the problem and the fix, exit 2, no run in the
tracking store, no file written, no image decoded. Each case here was once accepted, or refused too late (after a
run had started or the data was read) or in words that named neither the problem nor the fix."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torchvision import models as tvm

from bias_lab import config, pipeline, pretrained, search, studies
from bias_lab.config import SweepConfig, TrainConfig
from bias_lab.errors import UserError

from .conftest import FAST, REPO, all_runs, invoke


def refused(code: int, out: str, *fragments: str) -> str:
    """The one line of a refusal (exit 2, `error: ...`, no traceback), checked to hold every fragment."""
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1 and "Traceback" not in out, out
    assert all(f in out for f in fragments), out
    return out.strip()


def nothing_done(workdir: Path) -> None:
    """No run in the store, and nothing beside it: no data decoded (cache), no Optuna storage."""
    assert all_runs(mlflow.MlflowClient()) == []
    assert sorted(p.name for p in workdir.iterdir()) == ["mlflow.db"]


def tables(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}


# ----------------------------------------------------------------------------------------------- Optuna storage


@pytest.mark.parametrize(
    "storage, fragment",
    [
        ("sqlite:///{tmp}/mlflow.db", "is the MLflow tracking store"),  # absolute, as $PWD gives it
        ("sqlite:///mlflow.db", "is the MLflow tracking store"),  # relative to the cwd
        ("{tmp}/mlflow.db", "is the MLflow tracking store"),  # a journal path
        ("sqlite:///{tmp}/copy.db", "holds MLflow's tables"),  # another MLflow store
    ],
)
def test_optuna_storage_in_an_mlflow_store_is_refused(
    kaggle_data: Path, tmp_path: Path, storage: str, fragment: str
) -> None:
    copy = tmp_path / "copy.db"
    shutil.copy(tmp_path / "mlflow.db", copy)
    before = {db: tables(db) for db in (tmp_path / "mlflow.db", copy)}
    code, out = invoke(
        "tune", "--data", str(kaggle_data), "--image-size", "32", "--epochs", "1", "--n-trials", "1",
        "--final-model", "false", "--threads", "1", "--storage", storage.format(tmp=tmp_path),
    )  # fmt: skip
    refused(code, out, fragment, "pass another file, e.g. --storage")
    assert {db: tables(db) for db in before} == before  # no Optuna table written into either
    copy.unlink()
    nothing_done(tmp_path)


def test_optuna_storage_on_the_tracking_database_server_is_refused_before_connecting() -> None:
    """The same PostgreSQL database as the tracking store (another user, a password): refused from the URLs alone."""
    mlflow.set_tracking_uri("postgresql://mlflow@127.0.0.1:9/mlflow")
    with pytest.raises(UserError) as err:
        studies.open_storage("postgresql://optuna:s3cret@127.0.0.1:9/mlflow")
    message = str(err.value)
    assert "is the MLflow tracking store" in message and "s3cret" not in message, message
    with pytest.raises(UserError, match="cannot open the Optuna storage"):  # another database: tried, and refused
        studies.open_storage("postgresql://optuna:s3cret@127.0.0.1:9/optuna")


# ----------------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("device", ["mps", "CPU", "gpu", "cuda:x", "cuda:-1", "cuda:0:1", "cuda:01"])
def test_an_unknown_device_is_named_as_such(kaggle_data: Path, tmp_path: Path, device: str) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), *FAST, "--device", device)
    refused(code, out, f"device={device}", "unknown device", "cpu, auto, cuda or cuda:N")
    nothing_done(tmp_path)


def test_kaggle_submit_refuses_an_unknown_device(kaggle_data: Path, tmp_path: Path) -> None:
    code, out = invoke("kaggle-submit", "--data", str(kaggle_data), "--device", "mps")
    refused(code, out, "device=mps", "unknown device")
    nothing_done(tmp_path)


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:0", "cuda:12"])
def test_device_spellings_that_are_allowed(device: str) -> None:
    TrainConfig(device=device).validate()
    config.SubmitConfig(device=device).validate()


# ----------------------------------------------------------------------------------------------- pretrained file


@pytest.fixture
def hub_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where torch.hub keeps resnet18's weights, in a torch hub cache of the test's own (nothing written yet)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path.parent / f"{tmp_path.name}-torch"))
    path = pretrained.cached_file("resnet18")
    path.parent.mkdir(parents=True)
    return path


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({}, "holds no resnet18 weights (missing conv1.weight"),
        ("resnet34", "(unexpected layer1.2.conv1.weight"),
        ("tensor", "(it holds a Tensor, not a state_dict)"),
    ],
)
def test_a_wrong_pretrained_file_is_named_before_any_work(
    kaggle_data: Path, tmp_path: Path, hub_file: Path, content: object, fragment: str
) -> None:
    if content == "resnet34":
        content = tvm.resnet34().state_dict()
    elif content == "tensor":
        content = torch.zeros(3)
    torch.save(content, hub_file)
    code, out = invoke(
        "train", "--data", str(kaggle_data), *FAST, "--model", "resnet18", "--weights", "imagenet", "--epochs", "1"
    )
    line = refused(code, out, str(hub_file), fragment, "delete it", "downloaded again")
    assert "weights=none" in line
    nothing_done(tmp_path)


# ----------------------------------------------------------------------------------------------- lenet's stem


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_lenet_has_no_stem_to_choose(kaggle_data: Path, tmp_path: Path, stem: str) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), *FAST, "--epochs", "1", "--stem", stem)
    refused(code, out, f"stem={stem}", "lenet", "stem=auto")
    nothing_done(tmp_path)


# ----------------------------------------------------------------------------------------------- bias_eval numbers


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--mitigation", "adversarial", "--adv-weight", "inf"], "adv_weight=inf"),
        (["--mitigation", "none", "--adv-weight", "-1"], "adv_weight=-1.0"),
        (["--mitigation", "none", "--dropout-rate", "inf"], "dropout_rate=inf"),
        (["--mitigation", "none", "--dropout-rate", "-0.5"], "dropout_rate=-0.5"),
    ],
)
def test_bias_eval_refuses_numbers_that_make_no_sense(
    kaggle_data: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    code, out = invoke(
        "bias-eval", "--data", str(kaggle_data), *FAST, "--epochs", "1", "--bootstrap", "0", "--use-champion",
        "false", *args,
    )  # fmt: skip
    refused(code, out, fragment, "use a")
    nothing_done(tmp_path)


# ----------------------------------------------------------------------------------------------- bias_sweep grid


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--gaps", "0,1", "--sigmas", "0.1,0.1000001"], "sigmas: 0.1 and 0.1000001 both print as 0.1"),
        (["--gaps", "0.5,0.5", "--sigmas", "1"], "gaps: 0.5 and 0.5 both print as 0.5"),
        (["--gaps", "0.5,0.50", "--sigmas", "1"], "gaps: 0.5 and 0.50 both print as 0.5"),
    ],
)
def test_sweep_refuses_grid_values_that_print_alike(
    kaggle_data: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    code, out = invoke("bias-sweep", "--data", str(kaggle_data), *FAST, "--epochs", "1", "--bootstrap", "0", *args)
    refused(code, out, fragment, "drop one")
    nothing_done(tmp_path)


def test_sweep_grid_values_are_still_sorted() -> None:
    cfg = SweepConfig(gaps="1,0,0.5", sigmas="1,0.01,0.1")
    assert cfg.gap_values() == [0.0, 0.5, 1.0] and cfg.sigma_values() == [0.01, 0.1, 1.0]


# ----------------------------------------------------------------------------------------------- tune's start point


DEFAULTS = {"lr": TrainConfig.lr, "momentum": TrainConfig.momentum, "batch_size": TrainConfig.batch_size}


def test_defaults_interrupted_in_trial_0_are_tried_by_the_next_run(
    kaggle_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULTS == {"lr": 0.05, "momentum": 0.9, "batch_size": 32}
    args = [
        "tune", "--data", str(kaggle_data), "--image-size", "32", "--epochs", "1", "--threads", "1", "--pruner",
        "none", "--study-name", "s", "--final-model", "false", "--n-trials", "1",
    ]  # fmt: skip
    real = pipeline.train

    def interrupted(*a, **kw):
        raise KeyboardInterrupt()

    monkeypatch.setattr(pipeline, "train", interrupted)
    code, out = invoke(*args)
    assert code == 130, out
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    [trial_0] = optuna.load_study(study_name="s", storage=storage).trials
    assert trial_0.state == TrialState.FAIL and trial_0.params == DEFAULTS

    monkeypatch.setattr(pipeline, "train", real)
    code, out = invoke(*args)
    assert code == 0, out
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [(t.state, t.params) for t in trials] == [(TrialState.FAIL, DEFAULTS), (TrialState.COMPLETE, DEFAULTS)]


def test_the_banner_names_the_trial_that_tries_the_defaults_again(
    kaggle_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*a, **kw):
        raise KeyboardInterrupt()

    monkeypatch.setattr(pipeline, "train", interrupted)  # no trial trains: only the opening lines matter
    args = ["tune", "--data", str(kaggle_data), "--image-size", "32", "--study-name", "b", "--final-model", "false"]
    code, out = invoke(*args)
    assert code == 130 and "trial 0 is the defaults (lr=0.05, momentum=0.9, batch_size=32)" in out, out
    code, out = invoke(*args)
    assert code == 130, out
    assert "trial 1 is the defaults (lr=0.05, momentum=0.9, batch_size=32), queued again: trial 0 did not" in out, out
    assert "trial 0 is the defaults" not in out, out


def test_the_start_point_is_queued_once_and_the_banner_says_where() -> None:
    storage, tune_cfg = optuna.storages.InMemoryStorage(), config.TuneConfig(n_trials=3)
    fixed = {"epochs": 1}
    study = search.open_study(storage, "s", tune_cfg, fixed, 0, DEFAULTS)
    assert search.start_note(study, DEFAULTS) == "; trial 0 is the defaults (lr=0.05, momentum=0.9, batch_size=32)"
    t = study.ask()
    search.suggest(t, TrainConfig(), tune_cfg)
    study.tell(t, state=TrialState.FAIL)  # trial 0, the defaults, did not finish
    for _ in range(2):  # a second open (another worker, another re-run) queues nothing more
        study = search.open_study(storage, "s", tune_cfg, fixed, 0, DEFAULTS)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.number, t.system_attrs["fixed_params"]) for t in waiting] == [(1, DEFAULTS)]
    assert search.start_note(study, DEFAULTS) == (
        "; trial 1 is the defaults (lr=0.05, momentum=0.9, batch_size=32), queued again: trial 0 did not finish"
    )
    t = study.ask()
    search.suggest(t, TrainConfig(), tune_cfg)
    study.tell(t, 0.5)  # the defaults finished: never queued again
    study = search.open_study(storage, "s", tune_cfg, fixed, 0, DEFAULTS)
    assert study.get_trials(states=(TrialState.WAITING,)) == [] and search.start_note(study, DEFAULTS) == ""
    assert search.start_note(study, None) == ""


# ----------------------------------------------------------------------------------------------- mlflow run


def test_a_refusal_under_mlflow_run_ends_its_run_failed_with_the_reason(
    kaggle_data: Path, tmp_path: Path, client: mlflow.MlflowClient
) -> None:
    """`mlflow run` creates the run, then starts the entry point with MLFLOW_RUN_ID: a refusal must say why on that
    run (tag `error`) and end it FAILED, and the process exit 2."""
    run = client.create_run("0")
    env = {
        **os.environ,
        "MLFLOW_RUN_ID": run.info.run_id,
        "MLFLOW_EXPERIMENT_ID": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    p = subprocess.run(
        [sys.executable, str(REPO / "entrypoints" / "train.py"), "--data", str(kaggle_data), "--epochs", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = refused(p.returncode, p.stderr, "epochs=0", "use at least 1")
    [after] = all_runs(client)
    assert after.info.run_id == run.info.run_id and after.info.status == "FAILED"
    assert after.data.tags.get("error") == line.removeprefix("error: ")
    assert not (tmp_path / "cache").exists()


def test_config_refusals_raise_user_error() -> None:
    """The same rules, for callers that build settings themselves (benchmarks, notebooks)."""
    for bad in (TrainConfig(model="lenet", stem="small"), TrainConfig(device="mps")):
        with pytest.raises(UserError):
            bad.validate()


def test_a_read_only_store_is_one_line_before_any_work(kaggle_data: Path, tmp_path: Path) -> None:
    """A store that can be read but not written failed at the run's first write, after the decode, with
    SQLAlchemy's tracebacks: now one line first (root ignores file modes: the test drops that capability)."""
    import stat

    store = tmp_path / "mlflow.db"
    store.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    cmd = [sys.executable, "-m", "bias_lab.cli", "train", "--data", str(kaggle_data), *FAST]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: every file is writable")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "0"})
    finally:
        store.chmod(0o644)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow tracking store {store} cannot be written")
    assert "decode" not in p.stderr  # refused before the first image (the progress bar would say 'decode')
