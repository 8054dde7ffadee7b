"""Checkpoints of a fit: what one holds (the weights, FitState, the optimizer and the random streams), when fit
writes it (_Saver) and how it is read back, so that a resumed run reaches the same weights as an uninterrupted one.

A checkpoint loads with weights_only (no pickled code), is written atomically and read onto the CPU whatever device
wrote it; one written on another device type (its augmentation generator is another kind) is not continued:
training starts fresh, with a warning.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
import warnings
from dataclasses import dataclass, field
from errno import EINVAL
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from bias_lab.data import atomic_write
from bias_lab.errors import UserError, check, first_line


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


def check_checkpoint(path: Path) -> None:
    """resume=true: a checkpoint that cannot be continued from is refused in one line (_load_checkpoint's) before
    the run it belongs to is re-opened, not once training starts (the interrupted run then relabelled FAILED).
    Memory-mapped: its tensors are not read, only its index and keys (a truncated file has no index)."""
    _load_checkpoint(path, mmap=True)


def _load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The checkpoint's state, every tensor on the CPU (map_location: generator states must be CPU ByteTensors
    whatever device wrote them; fit moves weights and optimizer state to its device), or a one-line UserError
    when it is damaged (truncated, not ours, or holding pickled code that weights_only refuses): never a
    traceback, nor torch's advice to unpickle it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        missing = {"model", "optimizer", "scheduler", "order_gen", "aug_gen", "torch_rng", *_fields(FitState())} - set(
            ck
        )
        check(not missing, f"it lacks {sorted(missing)}")
        return ck
    except Exception as e:
        # torch's weights_only refusal is paragraphs advising to unpickle untrusted code: name the problem instead
        # and a truncated file's errors say nothing of truncation (a zip reader's, an empty file's, mmap's EINVAL)
        damaged = isinstance(e, (pickle.UnpicklingError, EOFError)) or (isinstance(e, OSError) and e.errno == EINVAL)
        why = (
            "truncated or damaged, or not a bias_lab checkpoint"
            if damaged or any(s in str(e) for s in ("eights only", "zip archive", "zipfile"))
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
