"""Where a run trains and in what arithmetic: device probing, precision, memory layout, seeding, determinism.

resolve_device turns the device setting into a torch.device (failing fast, in one line, when CUDA is asked for and
cannot be used) and device_info says what a run really trained on (MLflow params). Models and batches are
channels_last on every device (oneDNN trains 1.05-1.3x more images per CPU-second in NHWC; cuDNN's tensor-core
kernels want it); on CUDA conv / linear also run in bf16 autocast. seed_everything and set_determinism: same seed,
same machine, same thread count -> same numbers.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from bias_lab import distributed
from bias_lab.config import check_device
from bias_lab.errors import check


def cuda_problem() -> str | None:
    """None when CUDA is usable; else why not, in one line. A torch build that does not match the driver makes
    torch.cuda.is_available() return False with only a warning: that warning's text is the reason given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return None
    said = [str(w.message).strip().splitlines()[0][:160] for w in caught if "cuda" in str(w.message).lower()]
    if said:
        return said[0]
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no GPU is visible" + (
        f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (no driver or no device)"
    )


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when usable (said in a warning when a GPU build cannot use it); under torchrun a bare 'cuda'
    is this process's GPU (cuda:LOCAL_RANK). device=cuda[:N] fails fast, in one line, when CUDA is unusable; a name
    that is none of cpu, auto, cuda[:N] (mps, CPU) fails first, as an unknown device."""
    check_device(name)  # also for callers that skip the commands' config.validate
    if name == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if name == "auto":
        if problem is not None and _gpu_present():  # e.g. a torch build newer than the driver: say so, not silently
            warnings.warn(
                f"device=auto: this machine has an NVIDIA GPU but CUDA is not usable ({problem}): training on the CPU"
            )
        return distributed.local_device(torch.device("cpu" if problem else "cuda"))
    check(problem is None, f"device={name} but CUDA is not usable ({problem}): use device=cpu or auto")
    device = torch.device(name)  # cuda or cuda:N, as check_device allows
    check(
        device.index is None or device.index < torch.cuda.device_count(),
        f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0..{torch.cuda.device_count() - 1}",
    )
    return distributed.local_device(device)


def _gpu_present() -> bool:
    """An NVIDIA driver is installed (its device node or nvidia-smi), whether or not torch can use it."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def device_info(device: torch.device) -> dict[str, str]:
    """What a run actually trains on, as strings for MLflow params: the resolved device, the GPU (or CPU) name,
    CUDA runtime / driver / cuDNN versions on CUDA, torch's version and thread count."""
    info = {
        "device_resolved": str(device),
        "torch_version": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            device_name=props.name,
            cuda_version=str(torch.version.cuda),
            cuda_driver=_driver_version(index),
            cudnn_version=str(torch.backends.cudnn.version()),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=f"{props.total_memory / 2**30:.1f}",
        )
    else:
        info["device_name"] = _cpu_name()
    return info


def _driver_version(index: int) -> str:
    """The NVIDIA driver's version (nvidia-smi; torch does not expose it); 'unknown' when it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA; None (fp32) on a CPU.

    Only conv / linear run in bf16 (torch.autocast's policy); weights, optimizer state and the loss stay fp32. On a
    CPU with native bf16 (AVX512-BF16), one thread trains ResNet-18 2.2x faster per core in bf16, but with two
    threads on a shared machine oneDNN's bf16 weight-gradient convolutions ran 2-4x *slower* than fp32 (AlexNet and
    ResNet-18; measured in benchmarks/), so the CPU stays in fp32, the predictable choice.
    """
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device) -> torch.autocast:
    amp = autocast_dtype(device)
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def seed_everything(seed: int, threads: int = 0, deterministic: bool = True) -> None:
    """Seed torch, set its threads, and choose between reproducible and fastest kernels (set_determinism)."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    set_determinism(deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def set_determinism(deterministic: bool) -> None:
    """True: deterministic kernels (same seed, same machine -> same numbers), without torch's fill of uninitialised
    memory (every kernel writes what it reads back, so the results stay deterministic; the fill only costs time).
    warn_only: an op with no deterministic kernel (adaptive_avg_pool2d backward on CUDA) warns instead of failing.
    False: any kernel, and cuDNN benchmarks its algorithms per shape (cudnn.benchmark): faster on a GPU, not
    bit-reproducible. fit applies cfg.deterministic itself, so every entry point gets it."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # a module property
    torch.backends.cudnn.benchmark = not deterministic


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The batch layout fit trains in (the model is converted to match): NHWC on every device."""
    return x.contiguous(memory_format=torch.channels_last)
