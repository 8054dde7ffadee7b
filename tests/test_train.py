"""loop.fit: checkpoint/resume equality, determinism, learning, lr schedules; `bias-lab train` killed mid-run.

In-process tests train LeNet at 32 px on small generated tensors (no files); the subprocess tests run the real
CLI on the `kaggle_data` fixture and read the run states back from the MLflow store.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mlflow
import pytest
import torch

from bias_lab import checkpoint as ckpt
from bias_lab.config import SCHEDULES, TrainConfig
from bias_lab.device import seed_everything
from bias_lab.errors import UserError
from bias_lab.loop import FitResult, Norm, Part, evaluate, fit, lr_factor, predict
from bias_lab.models import build

from .conftest import FAST, all_runs, invoke

NORM = Norm(0.3, 0.25)


def shapes(n: int, size: int = 32, seed: int = 0) -> Part:
    """n uint8 images of 4 classes drawn on noise: a horizontal bar, a vertical bar, a cross, nothing.

    Invariant to the horizontal flip and mostly to the crops of the train augmentation, so learnable in a few epochs.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 110, (n, 1, size, size), generator=g)
    mid, half, w = size // 2, size // 3, max(size // 10, 2)
    bar_h = (slice(mid - w, mid + w), slice(mid - half, mid + half))  # (rows, columns) of the image
    bar_v = (slice(mid - half, mid + half), slice(mid - w, mid + w))
    for k, bars in ((0, [bar_h]), (1, [bar_v]), (2, [bar_h, bar_v])):
        for rows, cols in bars:
            x[(y == k).nonzero().squeeze(1), :, rows, cols] = 220
    return Part(x.to(torch.uint8), y)


TRAIN, VAL = shapes(192, seed=0), shapes(64, seed=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast as two, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupt(Exception):
    """Raised by an epoch hook to stop fit mid-run (what a crash or a pruned trial does)."""


def run_fit(
    epochs: int,
    seed: int = 0,
    init_seed: int | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch: Callable | None = None,
    input_hook: Callable | None = None,
    **cfg: object,
) -> tuple[torch.nn.Module, FitResult]:
    seed_everything(seed if init_seed is None else init_seed)
    model = build("lenet", 1, 4, 32)
    config = TrainConfig(
        **{
            "model": "lenet",
            "epochs": epochs,
            "batch_size": 32,
            "lr": 0.05,
            "seed": seed,
            "device": "cpu",
            "resume": resume,
            **cfg,
        }
    )
    return model, fit(model, TRAIN, VAL, config, NORM, on_epoch=on_epoch, input_hook=input_hook, checkpoint=checkpoint)


def numbers(res: FitResult) -> list[dict[str, float]]:
    """The per-epoch metrics that must repeat exactly (wall time does not)."""
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in res.history]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def stop_at(epoch: int) -> Callable[[int, dict], None]:
    def hook(e: int, _metrics: dict) -> None:
        if e == epoch:
            raise Interrupt(f"stopped at epoch {e}")

    return hook


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("recipe", [{}, {"ema": 0.9, "mixup": 0.4, "cutmix": 1.0}], ids=["plain", "ema_mixup_cutmix"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path, recipe: dict) -> None:
    """Also with the moving average (its state is checkpointed) and mixup / cutmix (their draws: torch's generator)."""
    ref_model, ref = run_fit(4, **recipe)
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(4, checkpoint=ck, on_epoch=stop_at(3), **recipe)
    assert torch.load(ck, weights_only=True)["epoch"] == 2  # the hook runs before the checkpoint of its epoch
    model, res = run_fit(4, init_seed=99, checkpoint=ck, resume=True, **recipe)  # weights come from the checkpoint
    assert len(res.history) == 4 and numbers(res) == numbers(ref)
    assert (res.best_epoch, res.best_val_accuracy) == (ref.best_epoch, ref.best_val_accuracy)
    assert same_weights(model, ref_model)


def test_resume_false_ignores_an_existing_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(3, checkpoint=ck, on_epoch=stop_at(2))
    _, ref = run_fit(3)
    _, res = run_fit(3, checkpoint=ck)
    assert numbers(res) == numbers(ref)
    assert torch.load(ck, weights_only=True)["epoch"] == 3  # and overwrote it


def test_hook_exception_leaves_a_valid_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "sub" / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(5, checkpoint=ck, on_epoch=stop_at(3))
    state = torch.load(ck, weights_only=True)  # pickle-free load works: plain tensors and numbers only
    assert state["epoch"] == 2 and len(state["history"]) == 2
    fresh = build("lenet", 1, 4, 32)
    fresh.load_state_dict(state["model"])  # complete and compatible
    assert [p.name for p in ck.parent.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    model_a, a = run_fit(2, seed=3)
    model_b, b = run_fit(2, seed=3)
    _, c = run_fit(2, seed=4)
    assert numbers(a) == numbers(b) and same_weights(model_a, model_b)
    assert numbers(a) != numbers(c)


def test_short_training_beats_chance() -> None:
    model, res = run_fit(6, lr=0.02, batch_size=16)
    assert res.best_val_accuracy > 0.8  # chance is 0.25
    assert evaluate(model, VAL, NORM)["accuracy"] == res.best_val_accuracy  # the best-val weights are kept
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.images_per_s > 0 and res.epochs_run == 6 and not res.diverged


def test_ema_evaluates_and_keeps_the_moving_average() -> None:
    """With a decay close to 1 the average barely leaves the initial weights: those are what fit evaluates and
    returns, not the trained ones."""
    seed_everything(0)
    init = build("lenet", 1, 4, 32).state_dict()
    slow, res = run_fit(2, ema=0.999999)
    trained, _ = run_fit(2)
    drift = lambda m: max(float((m.state_dict()[k] - v).abs().max()) for k, v in init.items())  # noqa: E731
    assert drift(slow) < 1e-3 < drift(trained), (drift(slow), drift(trained))
    assert evaluate(slow, VAL, NORM, tta=True)["accuracy"] == res.best_val_accuracy


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixup_and_cutmix_train_on_blended_batches_and_still_learn(mix: str) -> None:
    _, plain = run_fit(6, lr=0.02, batch_size=16)
    _, mixed = run_fit(6, lr=0.02, batch_size=16, **{mix: 0.4})
    assert numbers(mixed) != numbers(plain)
    assert mixed.history[0]["train_loss"] > plain.history[0]["train_loss"]  # soft targets: a higher loss floor
    assert mixed.best_val_accuracy > 0.6, mixed.best_val_accuracy  # chance is 0.25


def test_without_a_val_split_the_last_epoch_is_kept(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    _, ref = run_fit(3, checkpoint=ck)  # the checkpoint after the last epoch holds that epoch's weights
    last = torch.load(ck, weights_only=True)["model"]
    seed_everything(0)
    model = build("lenet", 1, 4, 32)
    cfg = TrainConfig(model="lenet", epochs=3, batch_size=32, lr=0.05, seed=0, device="cpu")
    res = fit(model, TRAIN, Part(VAL.images[:0], VAL.labels[:0]), cfg, NORM)
    assert (res.best_epoch, res.epochs_run) == (3, 3) and math.isnan(res.best_val_accuracy)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in last.items())


def test_divergence_stops_training() -> None:
    _, res = run_fit(5, lr=1e4, schedule="none")
    assert res.diverged and res.epochs_run < 5 and not math.isfinite(res.history[-1]["train_loss"])


def test_predict_is_batch_independent_and_gradient_free() -> None:
    model, _ = run_fit(1)
    whole = predict(model, VAL, NORM)
    chunked = predict(model, VAL, NORM, batch_size=7)
    assert whole.shape == (len(VAL), 4) and not whole.requires_grad
    assert torch.allclose(whole, chunked, atol=1e-5)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("epochs", 0, "epochs=0"),
        ("batch_size", 0, "batch_size=0"),
        ("lr", 0.0, "lr=0.0"),
        ("momentum", 1.0, "momentum=1.0"),
        ("label_smoothing", 1.0, "label_smoothing=1.0"),
    ],
)
def test_bad_settings_are_user_errors(field: str, value: object, message: str) -> None:
    cfg = {"epochs": 1, field: value}
    with pytest.raises(UserError, match=message):
        run_fit(**cfg)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lr", math.inf, "lr=inf"),
        ("lr", math.nan, "lr=nan"),
        ("weight_decay", math.nan, "weight_decay=nan"),
        ("weight_decay", math.inf, "weight_decay=inf"),
        ("weight_decay", -1.0, "weight_decay=-1"),
        ("seed", -1, "seed=-1"),
        ("seed", 2**65, f"seed={2**65}"),
        ("label_smoothing", math.nan, "label_smoothing=nan"),
        ("threads", -2, "threads=-2"),
    ],
)
def test_validate_rejects_non_finite_and_out_of_range_settings(field: str, value: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value}).validate()
    TrainConfig().validate()  # the defaults are valid


def test_unwritable_checkpoint_warns_once_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def read_only(path: Path, _write: Callable) -> None:
        calls.append(path)
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(ckpt, "atomic_write", read_only)
    _, ref = run_fit(3)
    with pytest.warns(UserWarning, match="cannot write the checkpoint .*Read-only file system.*goes on") as caught:
        _, res = run_fit(3, checkpoint=tmp_path / "ck.pt")
    assert len(calls) == 1 and len([w for w in caught if "checkpoint" in str(w.message)]) == 1  # no retry each epoch
    assert numbers(res) == numbers(ref)


@pytest.mark.parametrize("damage", ["truncated", "pickled_code", "missing_keys"])
def test_corrupt_checkpoint_is_a_one_line_user_error(tmp_path: Path, damage: str) -> None:
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(3, checkpoint=ck, on_epoch=stop_at(2))
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:2000])
    elif damage == "pickled_code":
        torch.save({"model": Interrupt("not a tensor")}, ck)
    else:
        torch.save({"model": {}}, ck)
    with pytest.raises(UserError, match="cannot be read") as err:
        run_fit(3, checkpoint=ck, resume=True)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value) and "resume=false" in str(err.value)


# ------------------------------------------------------------------------------------------ lr schedules


def test_lr_factor_shapes() -> None:
    total = 1000
    assert all(lr_factor("none", s, total) == 1.0 for s in range(0, total, 37))
    assert [lr_factor("step", s, total) for s in (0, 499, 500, 749, 750, 999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    cos = [lr_factor("cosine", s, total) for s in range(total + 1)]
    assert cos[0] == pytest.approx(0.04) and max(cos) == pytest.approx(1.0) and cos.index(max(cos)) == 50  # 5% warm-up
    assert all(x >= y for x, y in zip(cos[50:], cos[51:])) and cos[-1] == pytest.approx(0.0, abs=1e-9)
    one = [lr_factor("onecycle", s, total) for s in range(total + 1)]
    assert one.index(max(one)) == 300 and all(x <= y for x, y in zip(one[:300], one[1:301]))  # 30% ramp up


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fit_follows_the_schedule(schedule: str) -> None:
    """The lr fit reports after epoch e is the peak lr times lr_factor at that epoch's last step."""
    _, res = run_fit(3, schedule=schedule, augment=False)
    steps = math.ceil(len(TRAIN) / 32)
    assert [h["scheduled_lr"] for h in res.history] == pytest.approx(
        [0.05 * lr_factor(schedule, e * steps, 3 * steps) for e in (1, 2, 3)]
    )


# ------------------------------------------------------------------------------------------ killed `bias-lab train`


def train_args(data: Path, epochs: int) -> list[str]:
    args = list(FAST)
    args[args.index("--epochs") + 1] = str(epochs)
    return ["train", "--data", str(data), *args, "--threads", "1", "--checkpoint-every-s", "0"]


def start(args: list[str]) -> subprocess.Popen:
    """`bias-lab ARGS` in a subprocess with one torch thread from the start, as in this test process: the float
    rounding of the data preparation (pixel mean/std) depends on the thread count, and training amplifies it."""
    return subprocess.Popen(
        [sys.executable, "-m", "bias_lab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def checkpoint_epoch(cache: Path) -> int:
    """The epoch of the (single) train checkpoint in `cache`, 0 before the first one (it is replaced atomically)."""
    found = list((cache / "checkpoints").glob("*.pt"))
    return int(torch.load(found[0], weights_only=True)["epoch"]) if found else 0


def wait_for_epoch(proc: subprocess.Popen, cache: Path, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint_epoch(cache) < epoch:
        assert proc.poll() is None, f"train ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "train did not reach the epoch in time"
        time.sleep(0.05)


def val_history(client: mlflow.MlflowClient, run_id: str) -> dict[int, float]:
    """step -> val_accuracy (an epoch re-logged after a resume has the same value; it counts once)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(kaggle_data: Path, client: mlflow.MlflowClient, isolated: Path) -> None:
    proc = start(train_args(kaggle_data, 500))  # far more epochs than it will live
    try:
        wait_for_epoch(proc, isolated / "cache", 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM (Ctrl-C gives 130: the test below)
    assert "interrupted" in err and "Traceback" not in err
    [run] = all_runs(client)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert "interrupted" in run.data.tags["error"]
    assert len(val_history(client, run.info.run_id)) >= 1  # metrics logged before the signal stay


@pytest.mark.slow
def test_repeated_ctrl_c_ends_the_parent_and_its_children_killed(
    kaggle_data: Path, client: mlflow.MlflowClient
) -> None:
    """Four SIGINTs 30 ms apart into `bias-eval` (a parent run with child runs), this test reading the store
    meanwhile: the first ends every run KILLED, the later ones (landing in the store's code or while runs are being
    ended) neither abort that nor kill the process. A child may end FINISHED only if it had finished: all epochs
    and its test measures logged. (SIGTERM takes the same path: the test above.)"""
    epochs = 15
    proc = start(
        ["bias-eval", "--data", str(kaggle_data), "--image-size", "32", "--epochs", str(epochs), "--bootstrap", "50"]
        + ["--threads", "1"]
    )
    try:
        deadline = time.monotonic() + 120
        while not any(val_history(client, r.info.run_id) for r in all_runs(client) if r.data.tags.get("role")):
            assert proc.poll() is None, (
                f"bias-eval ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
            )
            assert time.monotonic() < deadline, "no child run reached an epoch in time"
            time.sleep(0.05)
        for _ in range(4):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.03)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    runs = all_runs(client)
    [parent] = [r for r in runs if not r.data.tags.get("role")]
    children = [r for r in runs if r.data.tags.get("role")]
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags["error"]
    assert any(c.info.status == "KILLED" for c in children)
    for run in runs:
        assert run.info.status in ("KILLED", "FINISHED") and run.info.end_time is not None, run.info
        if run.info.status == "FINISHED":  # only a child that had finished before the signals
            assert len(val_history(client, run.info.run_id)) == epochs and "test_accuracy" in run.data.metrics


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_uninterrupted_result(
    kaggle_data: Path, client: mlflow.MlflowClient, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL leaves the run RUNNING (no handler can run); `--resume true` re-opens that run and finishes it with
    exactly the numbers of an uninterrupted run. The two complete runs run in-process (same code, one thread)."""
    args = train_args(kaggle_data, 30)
    monkeypatch.setenv("BIAS_LAB_CACHE", str(isolated / "ref-cache"))  # own cache: own checkpoint
    code, out = invoke(*args)
    assert code == 0, out
    [ref_run] = all_runs(client)
    monkeypatch.setenv("BIAS_LAB_CACHE", str(isolated / "cache"))

    proc = start(args)
    try:
        wait_for_epoch(proc, isolated / "cache", 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    [killed] = [r for r in all_runs(client) if r.info.run_id != ref_run.info.run_id]
    assert killed.info.status == "RUNNING" and 2 <= len(val_history(client, killed.info.run_id)) < 30

    code, out = invoke(*args, "--resume", "true")
    assert code == 0, out
    assert len(all_runs(client)) == 2  # the killed run was continued, not a third one started
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    for key in ("best_val_accuracy", "best_epoch", "test_accuracy", "test_loss", "epochs_run"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key
    assert val_history(client, run.info.run_id) == val_history(client, ref_run.info.run_id)  # every epoch, no gap


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_openmp_threads_sleep_by_default_and_a_user_setting_wins(preset: str | None) -> None:
    """Spinning OpenMP threads made training up to 9x slower next to other torch jobs. The policy is read when
    torch loads its OpenMP runtime, so importing bias_lab (the entry points' first import) must set it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": preset} if preset else {}
    )
    code = "import bias_lab, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [preset or "PASSIVE", "False"]
