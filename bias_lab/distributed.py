"""Data-parallel training under `torchrun`: process group, data shards, all-reduced sums. Nothing else.

`torchrun --nproc_per_node=K -m bias_lab.cli train ...` starts K copies of the same command; each finds
RANK / WORLD_SIZE / LOCAL_RANK in its environment, joins one process group (gloo on CPU, nccl on CUDA), and
`loop.fit` wraps the model in DistributedDataParallel. Every rank holds every split in memory (the data is
small; the cache is built once, by rank 0) and walks the same global batch order; rank r trains on rows
r, r+K, r+2K... of each global batch, so an epoch covers each sample exactly once and a K-process run takes
the same SGD steps, with the same batch size and learning rate, as the command without torchrun. Only rank 0
talks to MLflow. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bias_lab.errors import UserError, check, first_line

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a slow rank (data decode on rank 0)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (gloo on a CPU, nccl on CUDA); no-op without torchrun."""
    if not launched() or dist.is_initialized():
        yield
        return
    check(
        "RANK" in os.environ and "MASTER_ADDR" in os.environ,
        "WORLD_SIZE > 1 but no RANK/MASTER_ADDR: start distributed training with torchrun --nproc_per_node=K",
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    except RuntimeError as e:  # a peer died (its own error is printed already): say so in one line, not gloo's
        if not isinstance(e, dist.DistError) and not any(
            w in str(e) for w in ("closed by peer", "reset by peer", "timed out")
        ):
            raise
        raise UserError(
            f"process {rank()} of {world()}: another process of this torchrun stopped, see its error "
            f"above ({first_line(e, 120)})"
        ) from e
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives its own GPU: cuda:LOCAL_RANK (a bare 'cuda' means that one)."""
    if device.type != "cuda" or not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    check(
        device.index in (None, local),
        f"device={device} under torchrun: each process uses its own GPU "
        "(cuda:LOCAL_RANK); pass device=cuda or auto, and CUDA_VISIBLE_DEVICES to choose the GPUs",
    )
    gpus = torch.cuda.device_count()
    check(
        local < gpus,
        f"torchrun process {local} needs its own GPU (cuda:{local}) but {gpus} GPU(s) are visible: "
        f"use --nproc_per_node={max(gpus, 1)} or less (NCCL cannot put two processes on one GPU); to fill one GPU, "
        "run several tune workers on it instead",
    )
    return torch.device("cuda", local)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. decodes the images into the shared cache), then the others."""
    if not is_main():
        dist.barrier()
    yield
    if is_main() and world() > 1:
        dist.barrier()


def batch_bounds(n: int, batch_size: int, ranks: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each global batch of an epoch. With several ranks a last batch too small to give every rank
    a sample joins the one before, so every step has work for every rank."""
    check(n >= ranks, f"{n} training samples cannot be shared by {ranks} processes: use fewer processes")
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < ranks:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def shard(rows: torch.Tensor, of: tuple[int, int] | None = None) -> torch.Tensor:
    """A rank's share of `rows`: every world-th element from its rank. The shares are disjoint and cover `rows`.
    `of`: (rank, world), default this process's."""
    r, w = of or (rank(), world())
    return rows[r::w]


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over ranks (one collective for all of them); unchanged without torchrun."""
    if world() == 1:
        return list(values)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.stack([v.detach().to(on, torch.float64).reshape(()) for v in values])  # nccl reduces GPU tensors only
    dist.all_reduce(flat)
    return list(flat.cpu().unbind())


def agree(flag: bool, what: str) -> bool:
    """`flag`, checked to be the same on every rank (e.g. 'a checkpoint exists here'): ranks that disagree would
    train different models in lock-step."""
    if world() > 1:
        n = int(all_sum(torch.tensor(float(flag)))[0])
        check(n in (0, world()), f"{what} on {n} of {world()} processes: give all nodes the same (shared) cache_dir")
    return flag


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel that syncs buffers once at start, not before every forward (see sync_buffers)."""
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    no_forward_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )  # older torch: broadcast_buffers
    return ddp(model, **no_forward_sync)


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank: each rank's own batches moved them apart,
    and evaluation and the saved weights must be one model."""
    if world() > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)
