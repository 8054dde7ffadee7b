"""Bad input refused in one line before any run is created or image decoded: a demo model submitted for other
data, an output or cache folder that is a file, a damaged checkpoint on resume; and train's ownership of a
configuration (the stale error of a resumed run, two trains started at the same instant).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from bias_lab import data, pipeline, shutdown
from bias_lab.config import DataConfig, SubmitConfig
from bias_lab.kaggle_submit import run_submit

from .conftest import FAST, all_runs, invoke


def one_line_error(code: int, out: str) -> str:
    """The refusal a user sees: exit 2, `error: ...` on one line, no traceback."""
    assert code == 2, out
    lines = [line for line in out.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("an image was decoded before the input was checked")

    monkeypatch.setattr(data, "decode_all", refuse)


def train_id(*args: str) -> str:
    code, out = invoke("train", *FAST, *args)
    assert code == 0, out
    found = re.search(r"run ([0-9a-f]{32})", out)
    assert found, out
    return found.group(1)


# ------------------------------------------------------------------------------------------ kaggle-submit


def test_a_demo_model_is_refused_for_other_data(
    kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained on the synthetic demo, its predictions for real data mean nothing: refused before the data is
    decoded or a run created, unless allow_other_data=true; the demo itself is still fine."""
    uri = f"runs:/{train_id('--data', 'demo')}/model"
    with monkeypatch.context() as m:
        no_decoding(m)
        line = one_line_error(*invoke("kaggle-submit", "--data", str(kaggle_data), "--model-uri", uri))
    assert f"model {uri} was trained on the synthetic demo data, not on {kaggle_data}" in line, line
    assert "allow_other_data=true" in line and f"train on {kaggle_data} first" in line, line
    assert len(all_runs(client)) == 1 and not Path("submission.csv").exists()

    code, out = invoke("kaggle-submit", "--data", "demo", "--model-uri", uri, "--output", "demo.csv")
    assert code == 0 and Path("demo.csv").exists(), out
    with pytest.warns(UserWarning, match="trained on other data"):
        out_path = run_submit(
            DataConfig(data=str(kaggle_data)), SubmitConfig(model_uri=uri, output="real.csv", allow_other_data=True)
        )
    assert out_path.exists() and len(all_runs(client)) == 3


def test_an_output_folder_that_is_a_file_is_named_a_file(kaggle_data: Path) -> None:
    Path("taken").write_text("a file, not a folder\n")
    for output in ("taken/sub.csv", "taken/deeper/sub.csv"):
        line = one_line_error(*invoke("kaggle-submit", "--data", str(kaggle_data), "--output", output))
        assert f"{Path('taken').resolve()} is a file, not a folder" in line and "does not exist" not in line, line


# ------------------------------------------------------------------------------------------ train


@pytest.mark.parametrize("where", ["file", "below_a_file"])
@pytest.mark.parametrize("dataset", ["demo", "kaggle"])
def test_a_cache_dir_that_is_a_file_is_one_line(
    where: str, dataset: str, kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("blocker").write_text("a file, not a folder\n")
    cache = "blocker" if where == "file" else "blocker/cache"
    no_decoding(monkeypatch)
    source = "demo" if dataset == "demo" else str(kaggle_data)
    line = one_line_error(*invoke("train", "--data", source, *FAST, "--cache-dir", cache))
    assert f"cache_dir {cache}" in line and f"{Path('blocker').resolve()} is a file" in line, line
    assert "cache_dir=" in line, line  # the fix
    assert all_runs(client) == []


def interrupted_run(
    kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> mlflow.entities.Run:
    """A train stopped by SIGTERM after its last checkpoint: KILLED, its checkpoint kept for a resume."""
    with monkeypatch.context() as m:
        m.setattr(
            pipeline, "measure", lambda *a, **k: (_ for _ in ()).throw(shutdown.Terminated("terminated by signal 15"))
        )
        code, out = invoke("train", "--data", str(kaggle_data), *FAST)
    assert code == 143, out  # 128 + SIGTERM
    [run] = all_runs(client)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted: terminated by signal 15"
    return run


def test_a_damaged_checkpoint_is_refused_before_the_killed_run_is_reopened(
    kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = interrupted_run(kaggle_data, client, monkeypatch)
    [ck] = (Path("cache") / "checkpoints").glob("*.pt")
    ck.write_bytes(ck.read_bytes()[:1000])  # truncated
    no_decoding(monkeypatch)
    line = one_line_error(*invoke("train", "--data", str(kaggle_data), *FAST, "--resume", "true"))
    assert f"the checkpoint {ck.resolve()} cannot be read" in line and "delete it" in line and "resume=false" in line
    [run] = all_runs(client)  # left as it was: not reopened, not relabelled FAILED, no new run
    assert run.info.status == "KILLED" and run.info.end_time == killed.info.end_time
    assert run.data.tags == killed.data.tags


def test_a_resumed_run_that_finishes_keeps_no_error(
    kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = interrupted_run(kaggle_data, client, monkeypatch)
    code, out = invoke("train", "--data", str(kaggle_data), *FAST, "--resume", "true")
    assert code == 0, out
    [run] = all_runs(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "error" not in run.data.tags and run.data.tags["resumed"] == "true"
    assert run.data.tags["resumed_after"] == "interrupted: terminated by signal 15"


# `bias-lab train` with a barrier before its checkpoint is located: the processes given the same barrier folder take
# ownership of the configuration within a millisecond of each other, however long each took to import and load.
_TOGETHER = """
import os, sys, time
from pathlib import Path
from bias_lab import train
from bias_lab.cli import main

barrier, locate = Path(sys.argv[1]), train.checkpoint_path

def together(*args, **kwargs):
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    return locate(*args, **kwargs)

train.checkpoint_path = together
main(sys.argv[2:], prog_name="bias-lab")
"""


@pytest.mark.slow
def test_two_trains_of_one_configuration_started_together_one_proceeds(
    kaggle_data: Path, client: mlflow.MlflowClient, isolated: Path
) -> None:
    """Reading the owner and then writing it let both trains through; taking ownership is atomic now."""
    args = ["train", "--data", str(kaggle_data), *FAST, "--epochs", "1", "--threads", "1"]
    for attempt in range(1):  # the barrier lines both up at the ownership step: one round shows the race
        barrier = isolated / f"barrier-{attempt}"
        barrier.mkdir()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _TOGETHER, str(barrier), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for _ in range(2)
        ]
        results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
        assert sorted(code for _, code in results) == [0, 2], (attempt, results)
        [refusal] = [err for err, code in results if code == 2]
        line = one_line_error(2, refusal)
        assert "another train of this configuration is running (pid" in line, line
    runs = all_runs(client)
    assert len(runs) == 1 and {r.info.status for r in runs} == {"FINISHED"}
    assert not list((Path("cache") / "checkpoints").glob("*.run")), "a finished run leaves no owner"
