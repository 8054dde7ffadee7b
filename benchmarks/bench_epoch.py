"""Epoch throughput of bias_lab against the textbook torchvision pipeline and the pure compute bound.

    python benchmarks/bench_epoch.py --data path/to/tiny4   # 2-4 min on 2 cores
    python benchmarks/bench_epoch.py --quick                # generated tiny data, a few steps: a smoke run (~15-30 s)
    python benchmarks/bench_epoch.py --device cuda          # the GPU section instead (synthetic data, a few minutes)
    python benchmarks/bench_epoch.py --device cuda --check  # its PASS/FAIL checks only (what gpu_check.sh runs)

--data (the CPU comparison only) defaults to the folder in the environment variable BIAS_LAB_DATA.

GPU section (--device cuda; --device cpu --gpu-section --quick runs the same code on a CPU as a smoke test): fit vs
the compute bound in the same precision (bf16 autocast, channels_last) at a large and at tune's usual batch, with
the first (warm-up) epoch left out of fit's images/s; deterministic=false (cudnn.benchmark); host milliseconds and
kernels per step; trials per hour with 1 vs K trial processes sharing the GPU. CHECK lines: the device really
used, fit >= 0.8 of the compute bound for ResNet-18 @64, same seed same numbers, resume equals an uninterrupted
run (AlexNet: dropout), K trials per GPU >= 1.5x one.

Side by side in one process, on the same images, same model (same init), same batch size, same torch threads:
  naive         torchvision dataset (ImageFolder, or the CSV equivalent for the Kaggle layout) + transforms
                (Grayscale, RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize) + DataLoader(num_workers=2),
                the textbook loop (fp32, NCHW, loss.item() every step);
  bias_lab      data.load (decoded once, cached uint8 tensors) + loop.fit (batched augmentation, its own step);
  compute       the same model's forward + backward + SGD step on pre-made normalised tensors already in memory,
                in fit's layout and precision: no data work at all, the physical limit of this machine;
  compute_fp32  the same, in the textbook's fp32 NCHW: separates what the data path gains from what the layout does.
Also: the first decode of the folder vs the cached re-load, and the MLflow logging overhead of
pipeline.train + bias_lab.recorder (a short run with vs without logging, in a temporary sqlite store).

Each variant is warmed up (steps excluded), then measured a few times round-robin and the best is kept: other
processes on a shared machine only ever make a measurement slower. Two numbers per measurement: images per second
of wall-clock time (what the targets are about) and images per CPU-second of this process and its DataLoader
workers (the work per image; unlike wall time it hardly moves when other jobs share the cores).
Prints markdown tables and one `TARGET ... PASS|FAIL` line per target. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# common sets OMP_WAIT_POLICY=PASSIVE before torch loads: two torch threads plus the DataLoader's two workers (plus
# anything else running) oversubscribe 2 cores, and spinning OpenMP threads then burn the time slices the others
# need: steps ran up to 10x slower under load with the default policy. Applies to every variant alike.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from bias_lab import data, pipeline, recorder, tracking  # noqa: E402
from bias_lab.config import BiasConfig, DataConfig, TrainConfig  # noqa: E402
from bias_lab.device import autocast, autocast_dtype, channels_last, seed_everything  # noqa: E402
from bias_lab.files import list_files  # noqa: E402
from bias_lab.loop import FitResult, Norm, Part, fit  # noqa: E402
from bias_lab.models import build  # noqa: E402

CPU = torch.device("cpu")


@dataclass
class Workload:
    """How one model is measured."""

    batch_size: int
    steps: int | None  # measured steps per repeat; None = one full epoch over all images
    warmup: int  # steps run first and not measured (allocator, oneDNN primitive caches)
    repeats: int  # round-robin repeats; the best of each variant is kept


@dataclass
class Plan:
    image_size: int
    lenet: Workload
    resnet: Workload
    mlflow_epochs: int
    mlflow_repeats: int


# ResNet-18 @64 px does ~1.7 GMAC per image forward + backward: a few images/s on 2 cores, so a few batches only.
FULL = Plan(64, lenet=Workload(64, None, 3, 4), resnet=Workload(32, 3, 1, 4), mlflow_epochs=2, mlflow_repeats=2)
QUICK = Plan(64, lenet=Workload(8, None, 1, 1), resnet=Workload(2, 1, 0, 1), mlflow_epochs=1, mlflow_repeats=1)


# ------------------------------------------------------------------------------------------ the variants


class FilesDataset(torch.utils.data.Dataset):
    """The textbook map-style dataset for a CSV-labelled folder: open, decode and transform one file per item."""

    def __init__(self, files: list[str], labels: list[int], transform: Callable):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.open(self.files[i]).convert("RGB")
        return self.transform(img), self.labels[i]


def naive_dataset(root: Path, size: int, norm: Norm, classes: list[str]) -> torch.utils.data.Dataset:
    tf = T.Compose(
        [
            T.Grayscale(),
            T.RandomResizedCrop(size, scale=(TrainConfig.crop_scale, 1.0)),  # the same crop area range as data.augment
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([norm.mean], [norm.std]),
        ]
    )
    listing = list_files(root)
    if listing.layout == "imagefolder":
        return datasets.ImageFolder(str(root / "train" if (root / "train").is_dir() else root), transform=tf)
    index = {c: i for i, c in enumerate(classes)}
    return FilesDataset(listing.train_files, [index[lab] for lab in listing.train_labels], tf)


def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def cpu_s() -> float:
    """CPU seconds used so far by this process (all threads; process_time, not os.times' 10 ms ticks, so a step of a
    few ms does not read as 0 s) and its reaped children (the DataLoader's workers)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


@dataclass
class Speed:
    wall: float  # images per second of wall-clock time: what the targets are about
    cpu: float  # images per CPU-second: the work per image, insensitive to other jobs on the machine


def naive_steps(
    model: nn.Module, opt: torch.optim.Optimizer, ds: torch.utils.data.Dataset, batch_size: int, steps: int
) -> Speed:
    """`steps` steps (or one epoch) of the textbook loop, DataLoader start-up and shutdown included."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2)
    model.train()
    seen, running = 0, 0.0
    t0, c0 = time.perf_counter(), cpu_s()
    batches = iter(loader)
    for step, (x, y) in enumerate(batches):
        if step == steps:
            break
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        running += loss.item()
        seen += len(y)
    del batches  # joins the workers, so their CPU time is counted
    return Speed(seen / (time.perf_counter() - t0), seen / (cpu_s() - c0))


def bias_lab_steps(model: nn.Module, part: Part, val: Part, cfg: TrainConfig, norm: Norm) -> Speed:
    """One loop.fit epoch over `part`. Wall: fit's own images_per_s (train steps, not its val pass); CPU: the
    whole call, val pass included (`val` is kept tiny)."""
    c0 = cpu_s()
    res = fit(model, part, val, cfg, norm)
    return Speed(res.images_per_s, len(part) / (cpu_s() - c0))


def compute_steps(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int, tuned: bool
) -> Speed:
    """Forward + backward + SGD on ready batches (slices of one in-memory tensor).

    tuned: in fit's layout and precision (channels_last, device.autocast); else the textbook fp32 NCHW.
    """
    model.train()
    shape = channels_last if tuned else (lambda t: t)
    batches = [(shape(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    t0, c0 = time.perf_counter(), cpu_s()
    for xb, yb in batches:
        with autocast(CPU) if tuned else contextlib.nullcontext():
            loss = F.cross_entropy(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Speed(len(y) / (time.perf_counter() - t0), len(y) / (cpu_s() - c0))


VARIANTS = ("naive", "bias_lab", "compute", "compute_fp32")


def compare(
    name: str, ds: data.Dataset, files: torch.utils.data.Dataset, norm: Norm, size: int, w: Workload, seed: int
) -> dict[str, Speed]:
    """Best speed of each variant on the same images (w.steps batches, or all of them)."""
    bs = w.batch_size
    n = len(ds.labels) if w.steps is None else min(len(ds.labels), w.steps * bs)
    idx = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(seed))[:n]
    warm = idx[: min(n, w.warmup * bs)]
    cfg = TrainConfig(model=name, epochs=1, batch_size=bs, lr=0.01, device="cpu", seed=seed)
    models = {}
    for v in VARIANTS:
        torch.manual_seed(seed)  # identical initial weights for all
        models[v] = build(name, 1, len(ds.classes), size)
    models["compute"].to(memory_format=torch.channels_last)  # the layout fit trains in
    opts = {v: sgd(m, cfg) for v, m in models.items() if v != "bias_lab"}
    val = Part(ds.images[idx[:2]], ds.labels[idx[:2]])  # fit evaluates after the epoch: kept tiny
    x = data.normalize(ds.images[idx], norm.mean, norm.std)  # compute bound: no augmentation, no gather
    y = ds.labels[idx]

    def run(v: str, sel: torch.Tensor) -> Speed:
        if v == "naive":
            return naive_steps(models[v], opts[v], Subset(files, sel.tolist()), bs, math.ceil(len(sel) / bs))
        if v == "bias_lab":
            return bias_lab_steps(models[v], Part(ds.images[sel], ds.labels[sel]), val, cfg, norm)
        return compute_steps(models[v], opts[v], x[: len(sel)], y[: len(sel)], bs, tuned=v == "compute")

    if len(warm):
        for v in VARIANTS:
            run(v, warm)
    best = {v: Speed(0.0, 0.0) for v in VARIANTS}
    for _ in range(w.repeats):
        for v in VARIANTS:
            r = run(v, idx)
            best[v] = Speed(max(best[v].wall, r.wall), max(best[v].cpu, r.cpu))
    return best


# ------------------------------------------------------------------------------------------ decode and MLflow


def decode_vs_cache(root: Path, size: int, cache: Path, repeats: int) -> tuple[float, float, int]:
    """(first-decode images/s, cached re-load images/s, images) of data.load, train and test images counted."""
    cfg = DataConfig(data=str(root), image_size=size, cache_dir=str(cache))
    t0 = time.perf_counter()
    ds = data.load(cfg)
    first = time.perf_counter() - t0
    n = len(ds.labels) + len(ds.test_ids)
    cached = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.load(cfg)
        cached = min(cached, time.perf_counter() - t0)
    return n / first, n / cached, n


def mlflow_overhead(root: Path, plan: Plan, cache: Path, store: Path, seed: int) -> dict[str, float]:
    """A short LeNet pipeline.train run with vs without MLflow logging (recorder.epochs live, then recorder.record
    without the weights, as a tune trial), best of repeats, interleaved.

    fit_s: fit's wall time (train + per-epoch val pass + per-epoch logging); wall_s: train and record together,
    whose logging adds the one-off model summary, device and final metrics; log_ms: one per-epoch
    tracking.log_metrics call timed directly (the part that scales with epochs).
    """
    prep = pipeline.prepare(
        DataConfig(data=str(root), image_size=plan.image_size, cache_dir=str(cache)), BiasConfig(), seed
    )
    cfg = TrainConfig(
        model="lenet", epochs=plan.mlflow_epochs, batch_size=plan.lenet.batch_size, lr=0.01, device="cpu", seed=seed
    )
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    tracking.setup("bias-lab-benchmark")
    best = {k: math.inf for k in ("fit_s_off", "fit_s_on", "wall_s_off", "wall_s_on", "log_ms")}
    for _ in range(plan.mlflow_repeats):
        for on in (False, True):
            with tracking.run("benchmark-logging" if on else "benchmark-no-logging"):
                t0 = time.perf_counter()
                seed_everything(cfg.seed, cfg.threads, cfg.deterministic)
                trained = pipeline.train(prep, cfg, CPU, test=False, on_epoch=recorder.epochs(prep) if on else None)
                if on:
                    recorder.record(trained, model=False)
                wall = time.perf_counter() - t0
                out = trained.measures
                if on:
                    metrics = {
                        "train_loss": 1.0,
                        "train_accuracy": 0.5,
                        "val_loss": 1.0,
                        "val_accuracy": 0.5,
                        "lr": 0.01,
                        "epoch_time_s": 1.0,
                    }  # the keys fit reports each epoch
                    t0 = time.perf_counter()
                    for step in range(10):
                        tracking.log_metrics(metrics, step=100 + step)
                    best["log_ms"] = min(best["log_ms"], (time.perf_counter() - t0) / 10 * 1e3)
            key = "on" if on else "off"
            best[f"fit_s_{key}"] = min(best[f"fit_s_{key}"], out["train_time_s"])
            best[f"wall_s_{key}"] = min(best[f"wall_s_{key}"], wall)
    return best


# ------------------------------------------------------------------------------------------ GPU section (--device cuda)


@dataclass
class GpuPlan:
    image_size: int
    model: str  # the fit-vs-compute and trials model (ResNet-18 @64 on a GPU)
    resume_model: str  # has dropout: resume must restore the device's RNG too (AlexNet)
    images: int  # training images of the synthetic split
    batch: int  # the batch fit is compared with the compute bound at
    small_batch: int  # tune's usual batch: host-bound on a GPU
    epochs: int  # fit epochs; the first (warm-up) is left out of images_per_s
    trial_images: int  # images of one concurrent trial
    trial_epochs: int
    k: int  # concurrent trials per GPU


GPU_FULL = GpuPlan(64, "resnet18", "alexnet", 8192, 256, 32, 3, 4096, 2, 4)
GPU_QUICK = GpuPlan(32, "lenet", "lenet", 96, 32, 16, 2, 64, 1, 2)  # a smoke run of the same code, on any device


def synthetic(n: int, size: int, seed: int) -> Part:
    """n random uint8 images of 4 classes: the GPU numbers need no dataset on the GPU machine."""
    g = torch.Generator().manual_seed(seed)
    return Part(torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_run(
    device: torch.device, model_name: str, size: int, part: Part, batch: int, epochs: int, seed: int = 0, **cfg: object
) -> tuple[nn.Module, FitResult]:
    torch.manual_seed(seed)
    model = build(model_name, 1, 4, size).to(device)
    val = Part(part.images[:64], part.labels[:64])
    config = TrainConfig(
        model=model_name, epochs=epochs, batch_size=batch, lr=0.01, device=str(device), seed=seed, **cfg
    )
    return model, fit(model, part, val, config, NORM_GPU)


NORM_GPU = Norm(127.0, 64.0)


def compute_bound(device: torch.device, model_name: str, size: int, part: Part, batch: int, repeats: int = 2) -> float:
    """Images/s of forward + backward + SGD on ready batches on `device`, in fit's layout and precision (channels_last,
    bf16 autocast on CUDA): no data work. Best of `repeats` passes after one warm-up pass."""
    torch.manual_seed(0)
    model = build(model_name, 1, 4, size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = data.normalize(part.images.to(device), NORM_GPU.mean, NORM_GPU.std)
    y = part.labels.to(device)
    batches = [(channels_last(x[i : i + batch]), y[i : i + batch]) for i in range(0, len(y), batch)]
    best = 0.0
    for rep in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for xb, yb in batches:
            with autocast(device):
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        if rep:  # the first pass is the warm-up (cuDNN autotuning, allocator)
            best = max(best, len(y) / (time.perf_counter() - t0))
    return best


def step_costs(device: torch.device, model_name: str, size: int, steps: int = 20) -> tuple[float, str]:
    """(ms per step at batch 2, kernels per step). At batch 2 the GPU's work is negligible, so the step time is the
    host's: Python + torch dispatch + kernel launches, the floor of every step whatever the batch."""
    torch.manual_seed(0)
    model = build(model_name, 1, 4, size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xb = channels_last(torch.randn(2, 1, size, size, device=device))
    yb = torch.zeros(2, dtype=torch.long, device=device)

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    kernels = "n/a (CPU)"
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            sync(device)
        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = f"{n / 5:.0f}"
    return ms, kernels


def trial_worker(args: argparse.Namespace) -> int:
    """One 'trial' for the trials-per-GPU measurement: warm up, say ready, wait for go, fit, print its times."""
    plan = GPU_QUICK if args.quick else GPU_FULL
    device = torch.device(args.device)
    part = synthetic(plan.trial_images, plan.image_size, 1)
    fit_run(
        device,
        plan.model,
        plan.image_size,
        Part(part.images[: plan.small_batch * 2], part.labels[: plan.small_batch * 2]),
        plan.small_batch,
        1,
    )  # warm-up: CUDA context, cuDNN, allocator
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    fit_run(device, plan.model, plan.image_size, part, plan.small_batch, plan.trial_epochs)
    sync(device)
    print(f"times {t0} {time.time()}", flush=True)
    return 0


def trials_per_hour(device: torch.device, k: int, quick: bool) -> float:
    """Trials per hour with k trial processes sharing `device`, started together once all are warm."""
    import subprocess

    cmd = [sys.executable, __file__, "--trial-worker", "--device", str(device), *(["--quick"] if quick else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"trial worker did not start (exit {p.wait()}): {line!r}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        spans = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode:
                raise RuntimeError(f"trial worker failed (exit {p.returncode})")
            _, a, b = out.split()[-3:]
            spans.append((float(a), float(b)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = max(b for _, b in spans) - min(a for a, _ in spans)
    return k * 3600 / wall


def same_numbers(a: FitResult, b: FitResult, ma: nn.Module, mb: nn.Module) -> bool:
    strip = lambda r: [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]  # noqa: E731
    return strip(a) == strip(b) and all(
        torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values())
    )


class _Stop(Exception):
    pass


def resume_check(device: torch.device, model_name: str, size: int, part: Part, batch: int, epochs: int) -> bool:
    """Interrupted after epoch 1 by a hook, resumed from the checkpoint: the same numbers and weights as one run."""
    ref_model, ref = fit_run(device, model_name, size, part, batch, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ck.pt"

        def stop(epoch: int, _m: dict) -> None:
            if epoch == 2:
                raise _Stop

        torch.manual_seed(0)
        model = build(model_name, 1, 4, size).to(device)
        val = Part(part.images[:64], part.labels[:64])
        cfg = TrainConfig(
            model=model_name,
            epochs=epochs,
            batch_size=batch,
            lr=0.01,
            device=str(device),
            seed=0,
            checkpoint_every_s=3600.0,
        )  # the exception path writes it (epoch 1)
        with contextlib.suppress(_Stop):
            fit(model, part, val, cfg, NORM_GPU, on_epoch=stop, checkpoint=ck)
        torch.manual_seed(123)  # other init: the weights must come from the checkpoint
        model = build(model_name, 1, 4, size).to(device)
        res = fit(model, part, val, dataclasses.replace(cfg, resume=True), NORM_GPU, checkpoint=ck)
    return same_numbers(ref, res, ref_model, model)


def gpu_report(device: torch.device, quick: bool, check_only: bool) -> int:
    """The GPU section (works on any device; --quick is a smoke run). Prints tables and CHECK lines; 1 if a check failed."""
    from bias_lab.device import device_info

    plan = GPU_QUICK if quick else GPU_FULL
    size = plan.image_size
    info = device_info(device)
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    checks: list[tuple[str, bool, str]] = []
    part = synthetic(plan.images, size, 0)

    model, res = fit_run(device, plan.model, size, part, plan.batch, plan.epochs)
    used = next(model.parameters()).device.type == device.type and info["device_resolved"].startswith(device.type)
    checks.append((f"{device.type} really used (device_info, the model's parameters)", used, info["device_resolved"]))
    fit_big = res.extra["images_per_s_warm"]
    compute_big = compute_bound(device, plan.model, size, part, plan.batch)
    ratio = fit_big / compute_big
    checks.append(
        (
            f"fit >= 0.8 of the compute bound, {plan.model}@{size} batch {plan.batch}",
            ratio >= 0.8,
            f"{fit_big:,.0f} / {compute_big:,.0f} img/s = {ratio:.2f}",
        )
    )

    model_b, res_b = fit_run(device, plan.model, size, part, plan.batch, 2)
    model_c, res_c = fit_run(device, plan.model, size, part, plan.batch, 2)
    checks.append(
        (
            f"same seed same numbers, {plan.model}@{size}",
            same_numbers(res_b, res_c, model_b, model_c),
            "2 epochs, twice",
        )
    )
    ok = resume_check(device, plan.resume_model, size, synthetic(min(plan.images, 2048), size, 2), plan.small_batch, 3)
    dropout = " (dropout: the device's RNG restored too)" if plan.resume_model == "alexnet" else ""
    checks.append(
        (f"resume equals uninterrupted, {plan.resume_model}@{size}{dropout}", ok, "stopped after epoch 1, resumed")
    )

    one = trials_per_hour(device, 1, quick)
    many = trials_per_hour(device, plan.k, quick)
    checks.append(
        (
            f"{plan.k} trials per {device.type} >= 1.5x one",
            many >= 1.5 * one,
            f"{one:,.0f} -> {many:,.0f} trials/h ({many / one:.2f}x), {plan.model}@{size} batch {plan.small_batch}",
        )
    )

    if not check_only:
        _, res_small = fit_run(device, plan.model, size, part, plan.small_batch, plan.epochs)
        compute_small = compute_bound(device, plan.model, size, part, plan.small_batch)
        _, res_fast = fit_run(device, plan.model, size, part, plan.batch, plan.epochs, deterministic=False)
        ms, kernels = step_costs(device, plan.model, size)
        print(f"\n| {device.type}: {plan.model}@{size}, {plan.images} synthetic images | value |\n|---|---:|")
        rows = [
            (f"fit, batch {plan.batch}, img/s (first epoch left out)", f"{fit_big:,.0f}"),
            (f"compute bound, batch {plan.batch}, same precision, img/s", f"{compute_big:,.0f}"),
            (f"fit, batch {plan.small_batch}, img/s", f"{res_small.extra['images_per_s_warm']:,.0f}"),
            (f"compute bound, batch {plan.small_batch}, img/s", f"{compute_small:,.0f}"),
            (
                f"fit, batch {plan.batch}, deterministic=false (cudnn.benchmark), img/s",
                f"{res_fast.extra['images_per_s_warm']:,.0f}",
            ),
            ("host ms per step (batch 2: the GPU's share is negligible)", f"{ms:.2f}"),
            ("kernels per step", kernels),
            ("trials per hour, 1 per device", f"{one:,.0f}"),
            (f"trials per hour, {plan.k} concurrent per device", f"{many:,.0f}"),
        ]
        for what, value in rows:
            print(f"| {what} | {value} |")
    print()
    for name, passed, detail in checks:
        print(f"CHECK {name}: {'PASS' if passed else 'FAIL'} ({detail})", flush=True)
    return 0 if all(passed for _, passed, _ in checks) else 1


# ------------------------------------------------------------------------------------------ report


def main() -> int:
    ap = common.parser(__doc__, "data", "threads", "seed")
    common.setting(ap, "device", "cpu", "cpu: the CPU comparison below; cuda[:N]: the GPU section instead")
    ap.add_argument("--quick", action="store_true", help="generated tiny data and a few steps (smoke run)")
    ap.add_argument(
        "--gpu-section", action="store_true", help="the GPU section on --device (on a CPU: a smoke run of it)"
    )
    ap.add_argument(
        "--check", action="store_true", help="the GPU section's PASS/FAIL checks only (benchmarks/gpu_check.sh)"
    )
    ap.add_argument("--trial-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial_worker:
        return trial_worker(args)
    if args.device != "cpu" or args.gpu_section or args.check:
        from bias_lab.device import resolve_device

        seed_everything(args.seed, args.threads)
        return gpu_report(resolve_device(args.device), args.quick, args.check)
    if not args.quick:
        common.need_data(ap, args)
    plan = QUICK if args.quick else FULL
    size = plan.image_size
    seed_everything(args.seed, args.threads)  # the global torch settings `train` uses, for every variant
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bias-lab-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.quick:
            root = Path(common.quick_data(tmp, seed=args.seed, n_train=12, n_test=2))
        else:
            root = Path(args.data).expanduser().resolve()
        first, cached, n_dec = decode_vs_cache(root, size, tmp / "cache", repeats=3)
        ds = data.load(DataConfig(data=str(root), image_size=size, cache_dir=str(tmp / "cache")))
        if ds.skipped:
            print(
                f"error: {len(ds.skipped)} unreadable images; the naive loader would fail on them: remove them",
                file=sys.stderr,
            )
            return 2
        norm = Norm(*data.pixel_stats(ds.images))
        files = naive_dataset(root, size, norm, ds.classes)
        amp = autocast_dtype(CPU)
        print(
            f"# {len(ds.labels)} images @{size}px from {root}; {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__}; bias_lab computes in "
            f"channels_last + {'bf16 autocast' if amp else 'fp32'} here",
            flush=True,
        )
        lenet = compare("lenet", ds, files, norm, size, plan.lenet, args.seed)
        print(f"  lenet done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        resnet = compare("resnet18", ds, files, norm, size, plan.resnet, args.seed)
        print(f"  resnet18 done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        ml = mlflow_overhead(root, plan, tmp / "cache", tmp / "mlflow.db", args.seed)
    res_n = min(len(ds.labels), (plan.resnet.steps or 0) * plan.resnet.batch_size)
    per_epoch = ml["log_ms"] / 1e3 * plan.mlflow_epochs / ml["fit_s_off"]
    labels = {
        "naive": "naive: torchvision dataset + transforms + DataLoader(2 workers), fp32 NCHW",
        "bias_lab": "bias_lab: cached tensors + loop.fit",
        "compute": "compute bound, bias_lab's layout/precision",
        "compute_fp32": "compute bound, textbook fp32 NCHW",
    }
    lenet_what = f"LeNet@{size} epoch, batch {plan.lenet.batch_size}"
    res_what = f"ResNet-18@{size}, {res_n} images, batch {plan.resnet.batch_size}"
    print("\n| measurement | variant | img/s (wall) | img per CPU-s |\n|---|---|---:|---:|")
    for what, speeds in ((lenet_what, lenet), (res_what, resnet)):
        for v in VARIANTS:
            print(f"| {what} | {labels[v]} | {speeds[v].wall:,.1f} | {speeds[v].cpu:,.1f} |")
    print(f"| data.load, {n_dec} images | first decode (+ cache write) | {first:,.0f} | |")
    print(f"| data.load, {n_dec} images | cached re-load | {cached:,.0f} | |")
    epochs = f"MLflow, LeNet {plan.mlflow_epochs} epochs"
    print("\n| measurement | variant | value |\n|---|---|---:|")
    for variant, value in (
        ("fit without logging", f"{ml['fit_s_off']:.2f} s"),
        ("fit with per-epoch logging", f"{ml['fit_s_on']:.2f} s"),
        ("one per-epoch log_metrics call", f"{ml['log_ms']:.1f} ms"),
        ("train + record without logging", f"{ml['wall_s_off']:.2f} s"),
        ("train + record with all logging (+ summary, final metrics)", f"{ml['wall_s_on']:.2f} s"),
    ):
        print(f"| {epochs} | {variant} | {value} |")

    def ratio(a: Speed, b: Speed) -> tuple[float, float]:
        return a.wall / b.wall, a.cpu / b.cpu

    print(
        f"\nnot targets: naive / compute fp32 (how well the textbook loader hides under compute), wall: LeNet "
        f"{lenet['naive'].wall / lenet['compute_fp32'].wall:.2f}, ResNet-18 {resnet['naive'].wall / resnet['compute_fp32'].wall:.2f}; "
        f"bias_lab / compute bound LeNet {lenet['bias_lab'].wall / lenet['compute'].wall:.2f}; MLflow A/B (two noisy timings): "
        f"fit {ml['fit_s_on'] / ml['fit_s_off'] - 1:+.1%}, train + record {ml['wall_s_on'] / ml['wall_s_off'] - 1:+.1%}"
    )
    targets = [  # (name, wall-clock value, CPU-time value or None, op, bound, unit)
        (f"bias_lab/naive LeNet@{size}", *ratio(lenet["bias_lab"], lenet["naive"]), ">=", 3.0, "x"),
        (f"bias_lab/naive ResNet-18@{size}", *ratio(resnet["bias_lab"], resnet["naive"]), ">=", 1.2, "x"),
        (f"bias_lab/compute-bound ResNet-18@{size}", *ratio(resnet["bias_lab"], resnet["compute"]), ">=", 0.85, ""),
        ("cached reload / first decode", cached / first, None, ">=", 50.0, "x"),
        ("MLflow per-epoch logging overhead", per_epoch * 100, None, "<=", 2.0, "%"),
    ]
    print()
    for name, value, cpu, op, bound, unit in targets:
        ok = value >= bound if op == ">=" else value <= bound
        extra = f" (per CPU-second: {cpu:.2f}{unit})" if cpu is not None else ""
        print(f"TARGET {name} {op} {bound:g}{unit}: {value:.2f}{unit} {'PASS' if ok else 'FAIL'}{extra}")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
