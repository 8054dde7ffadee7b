"""`train` under torchrun: 2 processes on CPU (gloo) write one MLflow run whose metrics are those of the all-reduced
evaluation and, for a model without BatchNorm, those of the same command in one process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from bias_lab import data
from bias_lab import distributed as D
from bias_lab.config import BiasConfig, DataConfig
from bias_lab.loop import evaluate
from bias_lab.pipeline import prepare
from bias_lab.tracking import load_model

from .conftest import all_runs, invoke

ARGS = ["--image-size", "32", "--model", "lenet", "--epochs", "2", "--batch-size", "30", "--lr", "0.05"]
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize(("n", "batch", "ranks"), [(112, 30, 2), (91, 30, 2), (61, 30, 3), (7, 32, 3), (100, 25, 4)])
def test_shards_cover_every_sample_once_per_epoch(n: int, batch: int, ranks: int) -> None:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    seen = []
    for start, end in D.batch_bounds(n, batch, ranks):
        shares = [D.shard(perm[start:end], of=(r, ranks)) for r in range(ranks)]
        assert all(len(s) > 0 for s in shares)  # no rank idles (DDP's all-reduce would wait for it)
        seen += [int(i) for s in shares for i in s]
    assert sorted(seen) == list(range(n))


def test_batch_bounds_refuses_more_ranks_than_samples() -> None:
    with pytest.raises(Exception, match="cannot be shared by 4 processes"):
        D.batch_bounds(3, 32, 4)


def test_a_rank_gets_the_crops_one_process_would_give_its_rows() -> None:
    x = torch.rand(10, 1, 16, 16)
    whole = data.augment(x, torch.Generator().manual_seed(3))
    for r in range(3):
        part = data.augment(x[r::3], torch.Generator().manual_seed(3), batch=10, rows=slice(r, None, 3))
        torch.testing.assert_close(part, whole[r::3])


def test_other_commands_refuse_torchrun(kaggle_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out = invoke("tune", "--data", str(kaggle_data), *ARGS)
    assert code == 2 and "only train runs under torchrun" in out and "Traceback" not in out
    assert not all_runs(mlflow.MlflowClient())


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bias_lab.cli",
        *args,
    ]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_ranks_sum_and_must_agree(tmp_path: Path) -> None:
    """all_sum adds over the 2 processes; agree() fails on every rank when they disagree (a checkpoint seen by one)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch\n"
        "from bias_lab import distributed as D\n"
        "with D.session(torch.device('cpu')):\n"
        "    total = D.all_sum(torch.tensor(D.rank() + 1.0), torch.tensor(2))\n"
        "    print(f'rank {D.rank()} sums {[float(t) for t in total]}', flush=True)\n"
        "    assert D.agree(True, 'x') and not D.agree(False, 'x')\n"
        "    try:\n"
        "        D.agree(D.rank() == 0, 'the checkpoint')\n"
        "    except Exception as e:\n"
        "        print(f'rank {D.rank()} refused: {e}', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for r in (0, 1):
        assert f"rank {r} sums [3.0, 4.0]" in done.stdout
        assert f"rank {r} refused: the checkpoint on 1 of 2 processes" in done.stdout, done.stdout


def test_torchrun_bad_input_stops_every_process_with_one_line_each(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    done = _torchrun("train", "--data", str(tmp_path / "missing"), *ARGS)
    lines = done.stderr.splitlines()
    assert done.returncode != 0
    assert any(e.startswith("error: data folder") and "does not exist" in e for e in lines), done.stderr[
        -2000:
    ]  # rank 0
    # rank 1, waiting at the barrier: it sees its peer gone (one line), unless torchrun's SIGTERM reaches it first
    assert any(
        e.startswith(("error: process 1 of 2: another process of this torchrun stopped", "interrupted:")) for e in lines
    ), done.stderr[-2000:]
    assert not all_runs(client)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_log_one_run_of_all_reduced_metrics(
    kaggle_data: Path, client: mlflow.MlflowClient
) -> None:
    ema = ("--ema", "0.9")  # the moving average too: every rank averages the same all-reduced steps
    done = _torchrun("train", "--data", str(kaggle_data), *ARGS, *ema)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = all_runs(client)  # rank 1 wrote nothing
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.data.metrics["test_accuracy"] >= 0 and run.data.metrics["epochs_run"] == 2

    # the logged val metrics are the whole val split's (all-reduced over the 2 shards), not rank 0's half
    model, meta = load_model(f"runs:/{run.info.run_id}/model")
    prep = prepare(DataConfig(data=str(kaggle_data), image_size=32), BiasConfig(), seed=0)
    v = evaluate(model, prep.val, prep.norm, tta=meta.tta)
    best = int(run.data.metrics["best_epoch"])
    assert v["accuracy"] == pytest.approx(_history(client, run.info.run_id, "val_accuracy")[best - 1], abs=1e-9)
    assert v["loss"] == pytest.approx(_history(client, run.info.run_id, "val_loss")[best - 1], rel=1e-5)
    assert meta.dataset_digest == run.data.params["data_digest"]

    # the same command in one process takes the same SGD steps (LeNet has no BatchNorm): the same curves
    single = subprocess.run(
        [sys.executable, "-m", "bias_lab.cli", "train", "--data", str(kaggle_data), *ARGS, *ema, "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    [one] = [r for r in all_runs(client) if r.info.run_id != run.info.run_id]
    assert one.data.params["world_size"] == "1"
    for key in CURVES:
        a, b = _history(client, run.info.run_id, key), _history(client, one.info.run_id, key)
        assert len(a) == len(b) == 2 and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b)), (
            key,
            a,
            b,
        )
    assert run.data.metrics["test_accuracy"] == one.data.metrics["test_accuracy"]
