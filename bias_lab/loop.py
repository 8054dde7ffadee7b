"""Mini-batch SGD on tensors already in memory: the loop every entry point trains with.

The whole split sits on the device as uint8; each step gathers a batch by index, normalises it, augments it
with one batched grid_sample, appends the eps channel when the task has one, optionally blends the batch (mixup /
cutmix), takes an SGD step and, with `ema`, updates a moving average of the weights (then what is evaluated). No
DataLoader, no worker processes, no per-image Python: on 2 CPU cores LeNet @64 px trains ~2x more images per
CPU-second than the textbook torchvision pipeline and ResNet-18 ~1.2x, at 0.9-1.0 of the pure compute bound
(benchmarks/README.md).
Models and batches are channels_last on every device; on CUDA also bf16 autocast (bias_lab.device). Same seed, same
machine, same thread count -> same numbers, also for a fit resumed from its checkpoint (bias_lab.checkpoint).
Under torchrun the same loop runs data-parallel (bias_lab.distributed): each rank takes its shard of every
global batch, DDP all-reduces the gradients, and the epoch's metrics are all-reduced sums.
Read top to bottom: fit -> _Epochs.run (one epoch) -> _Epochs.train_epoch -> _Epochs.step (one SGD step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bias_lab import distributed
from bias_lab.checkpoint import FitState, _Optim, _restore, _Saver
from bias_lab.config import TrainConfig
from bias_lab.data import augment, normalize
from bias_lab.device import autocast, channels_last, set_determinism
from bias_lab.errors import check


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
    # unsharded: no collective (rank 0 alone may call it)
    loss_sum, correct, count = distributed.all_sum(*sums) if sharded else sums
    n = float(count)
    return (
        {"loss": float(loss_sum) / n, "accuracy": float(correct) / n} if n else {"loss": math.nan, "accuracy": math.nan}
    )


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
    _check_fit(cfg, input_hook, frozen)
    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last)
    train, val = train.to(device), val.to(device)
    batches = distributed.batch_bounds(len(train), cfg.batch_size, distributed.world())  # the same on every rank
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
    # the ranks hold the same state: one writer
    saver = _Saver(checkpoint if distributed.is_main() else None, cfg.checkpoint_every_s, device)
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
    saver: _Saver
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
        train_loss, train_accuracy = self.train_epoch(epoch)
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

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass of SGD steps over the train split in a fresh random order; returns (mean train loss, train
        accuracy)."""
        self.model.train()
        device = self.train.images.device
        if distributed.world() > 1:
            # dropout masks: each rank its own stream, a function of (seed, epoch, rank), so resume-safe
            torch.manual_seed(hash((self.cfg.seed, epoch, distributed.rank())) & 0xFFFF_FFFF)
        n = len(self.train)
        perm = torch.randperm(n, generator=self.optim.order_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start, end in self.batches:
            batch = perm[start:end]
            loss, hits = self.step(batch)
            loss_sum += loss * (len(batch) / distributed.world())  # summed over ranks: batch mean x batch size
            correct += hits
        # one device sync (and collective) per epoch, not per step
        loss_sum, correct = distributed.all_sum(loss_sum, correct)
        return float(loss_sum) / n, float(correct) / n

    def step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the global batch `batch` (rows of the train split; under torchrun this rank takes its
        shard): the input (augmented, hooked, mixed), the loss, the update, the EMA. Returns the loss (detached) and
        this shard's number of correct predictions, both on the device."""
        model, optim, train, cfg = self.model, self.optim, self.train, self.cfg
        idx = distributed.shard(batch)  # all of it without torchrun
        x = batch_inputs(train, idx, self.norm, optim.aug_gen if cfg.augment else None, len(batch), cfg.crop_scale)
        if self.input_hook is not None:
            x = self.input_hook(x, idx, optim.aug_gen)
        y = train.labels[idx]
        target: torch.Tensor = y
        if optim.mix is not None:
            x, target = optim.mix(x, y)  # soft targets: the two labels weighed by their share of the image
        total = len(batch) if train.weights is None else train.weights[batch].sum()  # a tensor: no sync per step
        with autocast(train.images.device):
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
        return loss.detach(), (logits.argmax(1) == y).sum()


def _loss(
    logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, smoothing: float, total: float | torch.Tensor
) -> torch.Tensor:
    """Mean loss over the global batch, whose size (or weight sum) is `total`. Times the number of ranks, because
    DistributedDataParallel averages the ranks' gradients: the sum over shards / total, as one process computes."""
    per = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
    return (per.sum() if w is None else (per * w).sum()) * (distributed.world() / total)


def _check_fit(cfg: TrainConfig, input_hook: InputHook | None, frozen: list[nn.Parameter] | None) -> None:
    """What fit refuses, each in one line: cfg validated again (tune and bias_eval reach fit without the train
    command), and what does not run under torchrun."""
    cfg.validate()
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
