"""GPU readiness, tested on a CPU: checkpoints that cross device types, the device a run really used,
determinism switches, checkpoint cadence, and the GPU scripts' behaviour where there is no GPU.

No test here needs CUDA. A CUDA checkpoint is simulated by what distinguishes it (its device type and a 16-byte
Philox generator state), written to disk and read back through fit's real resume path.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import mlflow
import pytest
import torch

from bias_lab import checkpoint, device, distributed
from bias_lab.config import BiasConfig, DataConfig, TrainConfig
from bias_lab.device import device_info, resolve_device, seed_everything
from bias_lab.errors import UserError
from bias_lab.train import checkpoint_path

from .conftest import FAST, REPO, all_runs, invoke
from .test_train import Interrupt, numbers, run_fit, same_weights, stop_at


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def default_determinism():
    """Each test starts from, and leaves, the default (reproducible) global torch settings."""
    seed_everything(0)
    yield
    seed_everything(0)


# ------------------------------------------------------------------------------------------ 1. resume across devices


def test_checkpoint_is_read_onto_the_cpu_whatever_the_training_device(tmp_path: Path) -> None:
    """Loaded with map_location=<the CUDA device>, the batch-order generator's state arrived on the GPU and
    set_state raised 'RNG state must be a torch.ByteTensor' (on a CPU-only machine: torch.load itself fails)."""
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(3, checkpoint=ck, on_epoch=stop_at(2), checkpoint_every_s=0)
    state = checkpoint._load_checkpoint(ck)  # what a CUDA run's resume reads too
    tensors = [state["order_gen"], state["aug_gen"], state["torch_rng"], *state["model"].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    torch.Generator().set_state(state["order_gen"])  # a CPU ByteTensor, as set_state needs
    assert state["device_type"] == "cpu"


def test_checkpoint_from_another_device_type_starts_fresh_with_a_warning(tmp_path: Path) -> None:
    """A CUDA checkpoint (16-byte Philox augmentation state, device_type cuda) resumed on a CPU, or the reverse, must
    not hand a generator another generator's state: warned, trained from scratch, same numbers as a fresh run."""
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(4, checkpoint=ck, on_epoch=stop_at(3), checkpoint_every_s=0)
    state = torch.load(ck, weights_only=True)
    state.update(
        device_type="cuda", aug_gen=torch.zeros(16, dtype=torch.uint8), cuda_rng=torch.zeros(16, dtype=torch.uint8)
    )
    torch.save(state, ck)
    ref_model, ref = run_fit(4)
    with pytest.warns(UserWarning, match="written on cuda, and this run trains on cpu.*starts fresh"):
        model, res = run_fit(4, checkpoint=ck, resume=True)
    assert numbers(res) == numbers(ref) and same_weights(model, ref_model)
    assert torch.load(ck, weights_only=True)["device_type"] == "cpu"  # overwritten by this device's


def test_checkpoint_path_separates_device_types_and_keeps_the_cpu_key() -> None:
    args = (DataConfig(data="d"), TrainConfig(device="cpu"), BiasConfig(), "digest")
    cpu = checkpoint_path(*args, "cpu")
    assert cpu == checkpoint_path(*args)  # resolved from device=cpu
    import hashlib
    import json

    from bias_lab.config import TRAIN_ONLY, flat

    key = {k: v for k, v in flat(*args[:3]).items() if k not in (*TRAIN_ONLY, "device", "threads", "cache_dir")}
    legacy = hashlib.sha256(json.dumps({**key, "digest": "digest"}, sort_keys=True).encode()).hexdigest()[:16]
    assert cpu.name == f"lenet-{legacy}.pt"  # CPU checkpoints written before this change still resume
    assert checkpoint_path(*args, "cuda") != cpu
    assert checkpoint_path(DataConfig(data="d"), TrainConfig(device="auto", threads=3), BiasConfig(), "digest") == cpu


# ------------------------------------------------------------------------------------------ 2. the device actually used


def test_device_cuda_without_cuda_is_a_one_line_user_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=r"device=cuda but CUDA is not usable \(.+\): use device=cpu or auto") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"


def test_torch_build_not_matching_the_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.is_available() is False with only a warning when the torch build needs a newer driver: device=cuda
    says why in its one line, and device=auto on a machine with an NVIDIA driver warns instead of falling back silently."""
    said = "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). Please update"

    def broken() -> bool:
        warnings.warn(said)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    with pytest.raises(UserError, match="driver on your system is too old") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(device, "_gpu_present", lambda: True)
    with pytest.warns(UserWarning, match="NVIDIA GPU but CUDA is not usable .*too old.*training on the CPU"):
        assert resolve_device("auto").type == "cpu"


def test_device_info_names_what_trains() -> None:
    info = device_info(torch.device("cpu"))
    assert info["device_resolved"] == "cpu" and info["torch_version"] == torch.__version__
    assert info["torch_threads"] == str(torch.get_num_threads()) and info["device_name"]
    assert all(isinstance(v, str) for v in info.values())


def test_train_logs_the_device_it_used(kaggle_data: Path) -> None:
    code, out = invoke("train", "--data", str(kaggle_data), *FAST, "--device", "auto")
    assert code == 0, out
    [run] = all_runs(mlflow.MlflowClient())
    params = run.data.params
    assert params["device"] == "auto" and params["device_resolved"] == (
        "cuda:0" if torch.cuda.is_available() else "cpu"
    )
    assert params["torch_version"] == torch.__version__ and params["device_name"] and "torch_threads" in params


# ------------------------------------------------------------------------------------------ 3. determinism


def test_deterministic_false_trains_with_the_fast_settings_and_the_default_restores_them() -> None:
    _, res = run_fit(2, deterministic=False)
    assert res.epochs_run == 2 and all(h["train_loss"] < 10 for h in res.history)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    _, res = run_fit(1)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark
    assert not torch.utils.deterministic.fill_uninitialized_memory  # results stay deterministic without the fill
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    seed_everything(0)  # the old two-argument calls keep the reproducible default
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


# ------------------------------------------------------------------------------------------ 4. checkpoint cadence


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    epochs: list[int] = []
    real = checkpoint.atomic_write

    def counting(path: Path, write: Callable) -> None:
        real(path, write)
        epochs.append(int(torch.load(path, weights_only=True)["epoch"]))

    monkeypatch.setattr(checkpoint, "atomic_write", counting)
    return epochs


@pytest.mark.parametrize(("every_s", "written"), [(0.0, [1, 2, 3, 4]), (3600.0, [4])])
def test_checkpoint_written_every_so_many_seconds_and_after_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_s: float, written: list[int]
) -> None:
    epochs = count_writes(monkeypatch)
    run_fit(4, checkpoint=tmp_path / "ck.pt", checkpoint_every_s=every_s)
    assert epochs == written


def test_checkpoint_time_is_measured_from_the_last_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = count_writes(monkeypatch)
    now = [0.0]
    monkeypatch.setattr(checkpoint._Saver, "clock", staticmethod(lambda: now[0]))

    def advance(epoch: int, _m: dict) -> None:  # epochs 1 and 3 take 4 s, epoch 2 takes 7 s
        now[0] += 7.0 if epoch == 2 else 4.0

    run_fit(5, checkpoint=tmp_path / "ck.pt", checkpoint_every_s=10.0, on_epoch=advance)
    assert epochs == [2, 5]  # at 4 s: < 10; 11 s: written; 15 and 19 s: 4 and 8 s since then; 5 is the last


def test_exception_mid_epoch_keeps_the_last_completed_epoch_and_resume_is_exact(tmp_path: Path) -> None:
    """With a long checkpoint interval nothing is on disk when training stops in epoch 3 (Ctrl-C, SIGTERM, an
    error): the held copy of epoch 2 is written then, and the resumed run re-trains epoch 3 bit-exactly."""
    calls = []

    def crash_in_epoch_3(x: torch.Tensor, _idx: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2 * 6 + 3:  # 192 images / 32 = 6 steps per epoch: the 3rd step of epoch 3
            raise KeyboardInterrupt
        return x

    passthrough = lambda x, _i, _g: x  # noqa: E731
    ref_model, ref = run_fit(4, input_hook=passthrough)
    ck = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run_fit(4, checkpoint=ck, checkpoint_every_s=3600, input_hook=crash_in_epoch_3)
    assert torch.load(ck, weights_only=True)["epoch"] == 2
    model, res = run_fit(4, init_seed=99, checkpoint=ck, resume=True, checkpoint_every_s=3600, input_hook=passthrough)
    assert numbers(res) == numbers(ref) and same_weights(model, ref_model)


def test_hook_exception_with_a_long_interval_keeps_the_epoch_before(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    with pytest.raises(Interrupt):
        run_fit(5, checkpoint=ck, on_epoch=stop_at(3), checkpoint_every_s=3600)
    assert torch.load(ck, weights_only=True)["epoch"] == 2  # the hook of epoch 3 failed: resume re-runs epoch 3


# ------------------------------------------------------------------------------------------ 5. scripts without a GPU


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        pytest.skip("this machine has 2 GPUs")
    with pytest.raises(UserError, match=f"needs its own GPU \\(cuda:1\\) but {gpus} GPU\\(s\\) are visible"):
        distributed.local_device(torch.device("cuda"))
    assert distributed.local_device(torch.device("cpu")).type == "cpu"


def test_bench_ddp_refuses_more_processes_than_gpus() -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_ddp.py"), "--device", "cuda", "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 1 and "needs 2 GPUs" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_3() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("gpu_check: no CUDA") and done.stdout.count("\n") == 1 and not done.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_gpu_section_runs_on_a_cpu(tmp_path: Path) -> None:
    """The GPU section's code (fit vs compute bound, same seed, resume, K concurrent trials) as a CPU smoke run."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_epoch.py"),
            "--device",
            "cpu",
            "--gpu-section",
            "--quick",
            "--check",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    checks = [line for line in done.stdout.splitlines() if line.startswith("CHECK ")]
    assert len(checks) == 5, done.stdout + done.stderr[-3000:]
    names = " ".join(checks)
    assert "cpu really used" in names and "same seed same numbers" in names and "resume equals uninterrupted" in names
    for (
        line
    ) in checks:  # fit vs compute bound and trials per device are timings: only their correctness checks must pass
        if "really used" in line or "same seed" in line or "resume" in line:
            assert line.endswith(")") and ": PASS" in line, line


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_checkpoint_every_s_must_be_seconds(value: float) -> None:
    with pytest.raises(UserError, match="checkpoint_every_s="):
        TrainConfig(checkpoint_every_s=value).validate()
