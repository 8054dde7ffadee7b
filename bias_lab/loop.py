"""Mini-batch SGD on tensors already in memory: the loop every entry point trains with.

The whole split sits on the device as uint8; each step gathers a batch by index, normalises it, augments it
with one batched grid_sample, appends the eps channel when the task has one, optionally blends the batch (mixup /
cutmix), takes an SGD step and, with `ema`, updates a moving average of the weights (then what is evaluated). No
DataLoader, no worker processes, no per-image Python: on 2 CPU cores LeNet @64 px trains ~2x more images per
CPU-second than the textbook torchvision pipeline and ResNet-18 ~1.2x, at 0.9-1.0 of the pure compute bound
(benchmarks/README.md).
Models and batches are channels_last on every device (oneDNN trains 1.05-1.3x more images per CPU-second in
NHWC; cuDNN's tensor-core kernels want it); on CUDA also bf16 autocast. Same seed, same machine, same thread count -> same numbers.
Under torchrun the same loop runs data-parallel (bias_lab.distributed): each rank takes its shard of every
global batch, DDP all-reduces the gradients, and the epoch's metrics are all-reduced sums.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bias_lab import distributed
from bias_lab.config import TrainConfig
from bias_lab.data import atomic_write, augment, normalize
from bias_lab.errors import UserError, check, first_line


@dataclass
class Part:
    """One split, ready for the model: images, labels and, for the biased task, the eps channel."""

    images: torch.Tensor  # uint8, N x 1 x S x S
    labels: torch.Tensor  # int64, N
    eps: torch.Tensor | None = None  # float32, N x 1 x S x S; zero where s is False
    s: torch.Tensor | None = None  # bool, N: the group attribute S (eps present)
    weights: torch.Tensor | None = None  # float32, N: per-sample loss weights (reweighing)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return 1 + (self.eps is not None)

    def to(self, device: torch.device) -> "Part":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Part(
            self.images.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            move(self.eps),
            move(self.s),
            move(self.weights),
        )


@dataclass
class Norm:
    """Pixel normalisation of the image channel (eps is already in normalised units)."""

    mean: float
    std: float


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one dict of metrics per epoch
    best_epoch: int  # 1-based epoch of the best val_accuracy; its weights are loaded at the end
    best_val_accuracy: float  # NaN without a val split (the last epoch's weights are kept)
    train_time_s: float  # wall time of the whole fit, evaluation included
    images_per_s: float  # training throughput (train steps only)
    diverged: bool = False  # loss became NaN/inf; training stopped early
    epochs_run: int = 0
    extra: dict[str, float] = field(default_factory=dict)


EpochHook = Callable[[int, dict[str, float]], None]  # (epoch, metrics) -> None; may raise to stop (pruning)
InputHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]  # (x, batch idx, gen) -> x


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
    is this process's GPU (cuda:LOCAL_RANK). device=cuda[:N] fails fast, in one line, when CUDA is unusable."""
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
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device={name}: {first_line(e, 120)}; use cpu, auto or cuda[:N]") from None
    check(device.type in ("cpu", "cuda"), f"device={name}: use cpu, auto or cuda[:N]")
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


def batch_inputs(
    part: Part,
    idx: torch.Tensor,
    norm: Norm,
    train_gen: torch.Generator | None = None,
    batch: int | None = None,
    crop_scale: float = TrainConfig.crop_scale,
) -> torch.Tensor:
    """The model input for samples `idx`: normalised image (augmented when train_gen is given) [+ eps].

    `batch`: under torchrun, `idx` is this rank's shard of a global batch of that many samples (see augment)."""
    x = normalize(part.images[idx], norm.mean, norm.std)
    if train_gen is not None:
        x = augment(
            x,
            train_gen,
            (crop_scale, 1.0),
            batch=batch,
            rows=slice(distributed.rank(), None, distributed.world()) if batch else slice(None),
        )
    if part.eps is not None:
        x = torch.cat([x, part.eps[idx]], dim=1)
    return x


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` of `total`."""
    t = step / max(total, 1)
    warm = 0.05  # 5% linear warm-up: keeps the large lrs Optuna tries from blowing up the first steps
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    if schedule == "onecycle":
        warm = 0.3
    if t < warm:
        return 0.04 + 0.96 * t / warm
    return 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))


def _loss(
    logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, smoothing: float, total: float | torch.Tensor
) -> torch.Tensor:
    """Mean loss over the global batch, whose size (or weight sum) is `total`. Times the number of ranks, because
    DistributedDataParallel averages the ranks' gradients: the sum over shards / total, as one process computes."""
    per = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
    return (per.sum() if w is None else (per * w).sum()) * (distributed.world() / total)


@torch.inference_mode()
def predict(
    model: nn.Module,
    part: Part,
    norm: Norm,
    batch_size: int = 512,
    rows: torch.Tensor | None = None,
    tta: bool = False,
) -> torch.Tensor:
    """Logits (float32, on the CPU) for the samples `rows` of `part` (default all), in order. `tta`: the log of the
    mean of the softmax over the image and its mirror (the whole input flipped, eps too: its law is symmetric)."""
    model.eval()
    device = next(model.parameters()).device
    rows = torch.arange(len(part)) if rows is None else rows.cpu()
    out = []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size].to(part.images.device)
        x = channels_last(batch_inputs(part, idx, norm).to(device, non_blocking=True))
        with autocast(device):
            logits = model(x).float()
            if tta:
                both = torch.stack([logits.log_softmax(1), model(x.flip(-1)).float().log_softmax(1)])
                logits = both.logsumexp(0) - math.log(2)
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(
    model: nn.Module, part: Part, norm: Norm, batch_size: int = 512, sharded: bool = False, tta: bool = False
) -> dict[str, float]:
    """loss and accuracy of `model` on `part`. `sharded`: under torchrun each rank scores its share and the sums
    are all-reduced, so every rank returns the numbers of the whole split."""
    rows = torch.arange(len(part))
    rows = distributed.shard(rows) if sharded else rows
    y = part.labels.cpu()[rows]
    logits = predict(model, part, norm, batch_size, rows, tta) if len(rows) else torch.zeros(0, 1)
    sums = (
        F.cross_entropy(logits, y, reduction="sum") if len(rows) else torch.zeros(()),
        (logits.argmax(1) == y).sum(),
        torch.tensor(len(rows)),
    )
    loss_sum, correct, count = (
        distributed.all_sum(*sums) if sharded else sums
    )  # unsharded: no collective (rank 0 alone may call it)
    n = float(count)
    return (
        {"loss": float(loss_sum) / n, "accuracy": float(correct) / n} if n else {"loss": math.nan, "accuracy": math.nan}
    )


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The batch layout fit trains in (the model is converted to match): NHWC on every device."""
    return x.contiguous(memory_format=torch.channels_last)


@dataclass
class FitState:
    """What fit carries from epoch to epoch; a checkpoint stores it verbatim (these names are its keys)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch
    best: tuple[float, int] = (-1.0, 0)  # (best val_accuracy, its 1-based epoch)
    best_state: dict[str, torch.Tensor] | None = None  # the weights of that epoch (a copy)
    train_s: float = 0.0  # seconds in train steps (the throughput's denominator)
    wall_s: float = 0.0  # seconds of the whole fit so far, evaluation included


@dataclass
class _Optim:
    """The SGD machinery of one fit: what a checkpoint must restore besides the weights and FitState."""

    step_model: nn.Module  # the model, or its DDP wrapper under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    order_gen: torch.Generator  # batch order, on the CPU: identical across devices
    aug_gen: torch.Generator  # augmentation draws, on the data's device
    ema: AveragedModel | None = None  # cfg.ema > 0: the weights' moving average, what is evaluated and kept
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # mixup / cutmix


def fit(
    model: nn.Module,
    train: Part,
    val: Part,
    cfg: TrainConfig,
    norm: Norm,
    on_epoch: EpochHook | None = None,
    input_hook: InputHook | None = None,
    checkpoint: Path | None = None,
    frozen: list[nn.Parameter] | None = None,
) -> FitResult:
    """Train `model` with SGD on `train`, evaluating on `val` after every epoch; keeps the best-val weights.

    `on_epoch` sees each epoch's metrics (MLflow logging, Optuna pruning). `input_hook` may rewrite a train
    batch (e.g. channel dropout). A model may set `model.aux_loss` during forward (e.g. an adversary) and it
    is added to the loss. With `checkpoint`, state is saved after an epoch every cfg.checkpoint_every_s seconds (0: every
    epoch), after the last epoch, and when an exception stops training (the last completed epoch); when cfg.resume is
    set, training continues from it, reaching the same weights as an uninterrupted run. `frozen` parameters (a
    pretrained backbone) do not train in the first cfg.freeze_epochs epochs.
    """
    cfg.validate()  # again: tune and bias_eval reach fit without the train command
    check(
        distributed.world() == 1 or input_hook is None,
        "a train-batch hook (channel dropout) does not run under torchrun: start without it",
    )
    check(
        cfg.batch_size >= distributed.world(),
        f"batch_size={cfg.batch_size} is smaller than the {distributed.world()} torchrun processes: "
        "use batch_size >= nproc_per_node",
    )
    check(
        distributed.world() == 1 or not (frozen and cfg.freeze_epochs),
        "freeze_epochs does not run under torchrun (DDP fixes the trained parameters at the start): use freeze_epochs=0",
    )
    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last)
    train, val = train.to(device), val.to(device)
    batches = distributed.batch_bounds(
        len(train), cfg.batch_size, distributed.world()
    )  # the same global batches on every rank
    set_determinism(cfg.deterministic)  # here, so every entry point (train, tune, bias_eval) gets the setting
    optim = _optim(model, cfg, device, len(batches) * cfg.epochs, int(train.labels.max()) + 1 if len(train) else 1)
    state = FitState()
    if distributed.agree(
        checkpoint is not None and cfg.resume and checkpoint.exists(), "resume=true found the checkpoint"
    ):
        assert checkpoint is not None  # agreed on True only with one
        state = _restore(checkpoint, device, model, optim)

    from tqdm.auto import tqdm

    t_start = time.perf_counter() - state.wall_s
    diverged = False
    saver = _Saver(
        checkpoint if distributed.is_main() else None, cfg.checkpoint_every_s, device
    )  # the ranks hold the same state: one writer
    bar = tqdm(
        range(state.epoch, cfg.epochs),
        desc=f"{cfg.model}",
        unit="epoch",
        leave=False,
        initial=state.epoch,
        total=cfg.epochs,
        **({} if distributed.is_main() else {"disable": True}),
    )  # one bar, rank 0's; TQDM_DISABLE still works
    epochs = _Epochs(
        model, optim, train, val, batches, cfg, norm, input_hook, on_epoch, saver, bar, t_start, frozen or []
    )
    try:
        for epoch in bar:
            if epochs.run(epoch, state):
                diverged = True
                break
    except BaseException:  # a hook's exception (pruning, a failed log), Ctrl-C, SIGTERM: keep the last whole epoch
        saver.flush()
        raise
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    warm = epochs.train_s[1:] or epochs.train_s
    return FitResult(
        history=state.history,
        best_epoch=state.best[1],
        best_val_accuracy=max(state.best[0], 0.0) if len(val) else math.nan,
        train_time_s=time.perf_counter() - t_start,
        images_per_s=len(train) * len(state.history) / max(state.train_s, 1e-9),
        diverged=diverged,
        epochs_run=len(state.history),
        extra={"images_per_s_warm": len(train) * len(warm) / max(sum(warm), 1e-9)},  # first epoch left out when >1 ran
    )


@dataclass
class _Epochs:
    """One fit's fixed inputs and machinery: what every epoch reads. FitState is what epochs change."""

    model: nn.Module
    optim: _Optim
    train: Part
    val: Part
    batches: list[tuple[int, int]]
    cfg: TrainConfig
    norm: Norm
    input_hook: InputHook | None
    on_epoch: EpochHook | None
    saver: "_Saver"
    bar: Any  # tqdm
    t_start: float  # perf_counter at the start of the (un-resumed) fit
    frozen: list[nn.Parameter]  # trained from epoch cfg.freeze_epochs on (a function of the epoch: resume-safe)
    train_s: list[float] = field(default_factory=list)  # this process's epochs: the first pays the warm-up

    def run(self, epoch: int, state: FitState) -> bool:
        """Train, evaluate, report and (maybe) checkpoint epoch `epoch`; True when the loss diverged."""
        model, optim = self.model, self.optim
        for p in self.frozen:  # SGD skips a parameter without a gradient: no decay, no momentum while frozen
            p.requires_grad_(epoch >= self.cfg.freeze_epochs)
        t0 = time.perf_counter()
        train_loss, train_accuracy = _train_epoch(
            model, optim, self.train, self.batches, self.cfg, self.norm, epoch, self.input_hook
        )
        self.train_s.append(time.perf_counter() - t0)
        state.train_s += self.train_s[-1]
        distributed.sync_buffers(model)
        judged = model if optim.ema is None else optim.ema.module  # the weights that are kept are those evaluated
        if optim.ema is not None:
            distributed.sync_buffers(judged)
        v = evaluate(judged, self.val, self.norm, sharded=True, tta=self.cfg.tta)
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": v["loss"],
            "val_accuracy": v["accuracy"],
            "scheduled_lr": optim.opt.param_groups[0]["lr"],  # not "lr": that name is the run's param (the peak)
            "epoch_time_s": time.perf_counter() - t0,
        }
        state.history.append(metrics)
        state.epoch = epoch + 1
        if not math.isfinite(train_loss):
            self.bar.close()
            return True
        if v["accuracy"] > state.best[0] or (not len(self.val) and state.epoch == self.cfg.epochs):
            state.best = (v["accuracy"], epoch + 1)  # no val split: the last epoch
            state.best_state = {k: t.detach().clone() for k, t in judged.state_dict().items()}
        state.wall_s = time.perf_counter() - self.t_start
        self.bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{v['accuracy']:.3f}")
        if self.on_epoch is not None:  # before the checkpoint: a resumed run re-logs an epoch at worst, never skips
            self.on_epoch(epoch + 1, metrics)
        self.saver.epoch_done(model, optim, state, last=state.epoch == self.cfg.epochs)
        return False


class _Saver:
    """When fit writes its checkpoint: after an epoch once `every_s` seconds have passed since the last write (or
    since the start; 0 = every epoch), after the last epoch, and, when training stops early by an exception, the
    last completed epoch (flush). Between writes that epoch is held as a copy (on the device: a clone of weights
    and optimizer state, cheap next to writing ~90 MB of ResNet-18 to disk every epoch). A SIGKILL loses at most
    about `every_s` seconds; the resumed run re-trains the epochs after the checkpoint, bit-exactly."""

    clock = staticmethod(time.monotonic)

    def __init__(self, path: Path | None, every_s: float, device: torch.device):
        self.path, self.every_s, self.device = path, every_s, device
        self.last_write = self.clock()
        self.pending: dict | None = None  # the newest completed epoch not on disk yet

    def epoch_done(self, model: nn.Module, optim: _Optim, state: FitState, last: bool) -> None:
        if self.path is None:
            return
        if last or self.every_s <= 0 or self.clock() - self.last_write >= self.every_s:
            self.pending = None
            self._write(_checkpoint_blob(model, optim, state, self.device, copy=False))
        else:
            self.pending = _checkpoint_blob(model, optim, state, self.device, copy=True)

    def flush(self) -> None:
        if self.path is not None and self.pending is not None:
            blob, self.pending = self.pending, None
            try:
                self._write(blob)
            except Exception as e:  # never hide the exception that stopped training
                warnings.warn(f"cannot write the checkpoint {self.path} ({first_line(e, 120)})")

    def _write(self, blob: dict) -> None:
        if self.path is None:
            return
        if not _save_checkpoint(self.path, blob):
            self.path = None  # warned once: an unwritable cache costs the resume, never the run
        self.last_write = self.clock()


def _optim(model: nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int, num_classes: int) -> _Optim:
    """SGD with the schedule over `total_steps`, and the seeded generators of batch order and augmentation.
    Under torchrun each rank steps its shard of every batch and DDP all-reduces the gradients; rank 0's buffers
    (BatchNorm statistics) are sent to the others before each evaluation rather than before each step."""
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )
    return _Optim(
        step_model=model if distributed.world() == 1 else distributed.wrap(model),
        opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, total_steps)),
        order_gen=torch.Generator().manual_seed(cfg.seed),
        aug_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1),
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None,
        mix=_mixer(cfg, num_classes),
    )


def _mixer(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """torchvision's batch MixUp / CutMix (each batch one of them when both are on): (x, y) -> (x mixed with the
    batch rolled by one, soft targets). Their draws use torch's global generator: seeded with the run (seed_everything)
    and saved in every checkpoint, so a resumed run draws what the uninterrupted one did."""
    from torchvision.transforms import v2

    mixers = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    return None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _train_epoch(
    model: nn.Module,
    optim: _Optim,
    train: Part,
    batches: list[tuple[int, int]],
    cfg: TrainConfig,
    norm: Norm,
    epoch: int,
    input_hook: InputHook | None,
) -> tuple[float, float]:
    """One pass of SGD steps over `train` in a fresh random order; returns (mean train loss, train accuracy)."""
    model.train()
    device = train.images.device
    if (
        distributed.world() > 1
    ):  # dropout masks: each rank its own stream, a function of (seed, epoch, rank), so resume-safe
        torch.manual_seed(hash((cfg.seed, epoch, distributed.rank())) & 0xFFFF_FFFF)
    n = len(train)
    perm = torch.randperm(n, generator=optim.order_gen).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start, end in batches:
        batch = perm[start:end]
        idx = distributed.shard(batch)  # all of it without torchrun
        x = batch_inputs(train, idx, norm, optim.aug_gen if cfg.augment else None, len(batch), cfg.crop_scale)
        if input_hook is not None:
            x = input_hook(x, idx, optim.aug_gen)
        y = train.labels[idx]
        target: torch.Tensor = y
        if optim.mix is not None:
            x, target = optim.mix(x, y)  # soft targets: the two labels weighed by their share of the image
        total = len(batch) if train.weights is None else train.weights[batch].sum()  # a tensor: no sync per step
        with autocast(device):
            logits = optim.step_model(channels_last(x))
            loss = _loss(
                logits, target, None if train.weights is None else train.weights[idx], cfg.label_smoothing, total
            )
            loss = loss + getattr(model, "aux_loss", 0.0)  # set by the forward just run (mitigation's adversary)
        optim.opt.zero_grad(set_to_none=True)
        loss.backward()
        optim.opt.step()
        optim.sched.step()
        if optim.ema is not None:
            optim.ema.update_parameters(model)
        loss_sum += loss.detach() * (len(batch) / distributed.world())  # summed over ranks: batch mean x batch size
        correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = distributed.all_sum(
        loss_sum, correct
    )  # one device sync (and collective) per epoch, not per step
    return float(loss_sum) / n, float(correct) / n


def _fields(state: FitState) -> dict[str, object]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _restore(path: Path, device: torch.device, model: nn.Module, optim: _Optim) -> FitState:
    """Load a checkpoint into the model and `optim`; returns the FitState it was saved with. A checkpoint written
    on another kind of device (its augmentation generator's state is another generator's: a CPU Mersenne Twister vs
    a CUDA Philox) cannot continue this run bit-exactly: warned, and training starts fresh (FitState())."""
    ck = _load_checkpoint(path)
    saved_on = str(ck.get("device_type", "cpu"))  # checkpoints from before the key were written on a CPU
    if saved_on != device.type or ck["aug_gen"].numel() != optim.aug_gen.get_state().numel():
        warnings.warn(
            f"resume=true but the checkpoint {path} was written on {saved_on}, and this run trains on "
            f"{device.type}: its random streams cannot continue here, so training starts fresh (the "
            "checkpoint is overwritten); resume on the device type it was written on to continue it"
        )
        return FitState()
    model.load_state_dict(ck["model"])  # copies the CPU tensors onto the model's device
    optim.opt.load_state_dict(ck["optimizer"])  # moves the state to the parameters' device
    optim.sched.load_state_dict(ck["scheduler"])
    optim.order_gen.set_state(ck["order_gen"])
    optim.aug_gen.set_state(ck["aug_gen"])
    if optim.ema is not None:  # the checkpoint's file name is a digest of the settings, ema included
        optim.ema.load_state_dict(ck["ema"])
    torch.set_rng_state(ck["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in ck:  # dropout masks (AlexNet) on the GPU
        torch.cuda.set_rng_state(ck["cuda_rng"], device)
    state = FitState(**{k: ck[k] for k in _fields(FitState())})
    state.best = (float(state.best[0]), int(state.best[1]))  # a tuple in FitState, whatever the file gives back
    if state.best_state is not None:
        state.best_state = {k: t.to(device) for k, t in state.best_state.items()}
    return state


def _load_checkpoint(path: Path, device: torch.device | None = None) -> dict:
    """The checkpoint's state, every tensor on the CPU (map_location: generator states must be CPU ByteTensors
    whatever device wrote them; fit moves weights and optimizer state to its device), or a one-line UserError
    when it is damaged (truncated, not ours, or holding pickled code that weights_only refuses): never a
    traceback, nor torch's advice to unpickle it. `device` is accepted for callers of the older signature."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "scheduler", "order_gen", "aug_gen", "torch_rng", *_fields(FitState())} - set(
            ck
        )
        check(not missing, f"it lacks {sorted(missing)}")
        return ck
    except Exception as e:
        # torch's weights_only refusal is paragraphs advising to unpickle untrusted code: name the problem instead
        why = (
            "damaged, or not a bias_lab checkpoint"
            if isinstance(e, pickle.UnpicklingError) or "eights only" in str(e)
            else first_line(e, 120)
        )
        raise UserError(
            f"resume=true but the checkpoint {path} cannot be read ({why}): delete it, "
            "or run with resume=false to start over"
        ) from None


def _checkpoint_blob(model: nn.Module, optim: _Optim, state: FitState, device: torch.device, copy: bool) -> dict:
    """Everything needed to continue bit-exactly (weights_only-loadable: no pickled code). `copy`: detached from
    the live training state (clones on the device), to be written later."""
    clone = (lambda t: t.detach().clone()) if copy else (lambda t: t)  # noqa: E731
    blob = {
        "model": {k: clone(t) for k, t in model.state_dict().items()},
        "optimizer": _clone_tree(optim.opt.state_dict()) if copy else optim.opt.state_dict(),
        "scheduler": optim.sched.state_dict(),
        "order_gen": optim.order_gen.get_state(),  # get_state returns a new CPU ByteTensor: already a copy
        "aug_gen": optim.aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "device_type": device.type,
        **_fields(state),  # not dataclasses.asdict: that deep-copies best_state's tensors every epoch
    }
    if device.type == "cuda":
        blob["cuda_rng"] = torch.cuda.get_rng_state(device)
    if optim.ema is not None:
        blob["ema"] = {k: clone(t) for k, t in optim.ema.state_dict().items()}
    if copy:
        blob["history"] = list(state.history)  # appended to later; best_state is replaced, never changed in place
    return blob


def _clone_tree(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    return obj


def _save_checkpoint(path: Path, blob: dict) -> bool:
    """Write a checkpoint blob atomically. False (with one warning) when it cannot be written: a read-only or full
    cache folder costs the resume only."""
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        warnings.warn(
            f"cannot write the checkpoint {path} ({first_line(e, 120)}): training goes on without "
            "checkpoints, so it cannot be resumed; free space or point cache_dir at a writable folder"
        )
        return False
    return True
