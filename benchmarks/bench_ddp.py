"""Does `train` under torchrun go faster? The same training run in 1 process and in K DistributedDataParallel ones.

    python benchmarks/bench_ddp.py --data path/to/tiny4 --model alexnet   # K=2, CPU (gloo): a few minutes on 2 cores
    python benchmarks/bench_ddp.py --data path/to/tiny4 --device cuda --nproc 4 --model resnet18 --epochs 5   # 1 vs 4 GPUs (nccl)
    python benchmarks/bench_ddp.py --quick                                 # generated tiny data, LeNet, 1 epoch: a smoke run

--data defaults to the folder in the environment variable BIAS_LAB_DATA. On CUDA, K processes need K GPUs (one per
process, NCCL); with fewer the script refuses before starting.

Both sides are the command users run (`python -m bias_lab.cli train ...`, and the same under
`torch.distributed.run --standalone --nproc_per_node=K`), alternated `--repeats` times so that drift in the machine's
other load hits both alike; medians are compared. On a CPU the total threads are the same on both sides (1 process
x K threads vs K processes x 1 thread): the comparison is data parallelism against intra-op threads on the same
cores. On CUDA it is 1 GPU against K. Each run's own `images_per_s` (train steps only, all ranks' images) and
`train_time_s` are read back from its MLflow run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402
import mlflow  # noqa: E402

from bias_lab.config import DataConfig  # noqa: E402
from bias_lab.data import load  # noqa: E402

SHOWN = ("images_per_s", "train_time_s", "best_val_accuracy", "test_accuracy")
SETTINGS = ("data", "model", "image_size", "epochs", "batch_size", "lr", "device")  # passed to `bias-lab train`


def run(args: argparse.Namespace, nproc: int, env: dict[str, str]) -> dict[str, float]:
    """One `train` run with `nproc` processes; its logged metrics."""
    train = ["-m", "bias_lab.cli", "train", *common.flags(args, *SETTINGS)]
    if nproc == 1:
        threads = args.nproc * args.threads if args.device == "cpu" else args.threads
        cmd = [sys.executable, *train, "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]
        cmd += ["--threads", str(args.threads)]
    before = {r.info.run_id for r in _runs()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    [new] = [r for r in _runs() if r.info.run_id not in before]
    return {"nproc": nproc, **{k: new.data.metrics[k] for k in SHOWN}, "world_size": int(new.data.params["world_size"])}


def _runs() -> list:
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def main() -> None:
    defaults = {"model": "alexnet", "epochs": 2, "batch_size": 64, "lr": 0.02}
    ap = common.parser(__doc__, "data", "model", "image_size", "epochs", "batch_size", "lr", **defaults)
    common.setting(ap, "device", "cpu", "cpu (gloo) or cuda (nccl, one GPU per process)")
    common.setting(
        ap, "threads", 1, "torch threads per process under torchrun (the single process gets K times as many on a CPU)"
    )
    ap.add_argument("--nproc", type=int, default=2, help="K, compared with 1 process")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="generated tiny data, LeNet @32 px, 1 epoch, 1 repeat")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if gpus < args.nproc:  # torchrun would die at set_device(cuda:K-1); NCCL refuses two ranks on one GPU
            sys.exit(
                f"--device cuda --nproc {args.nproc} needs {args.nproc} GPUs, {gpus} visible: DDP runs one process per "
                f"GPU. Use --nproc {max(gpus, 1)}; to measure several trials sharing one GPU, run "
                "benchmarks/bench_epoch.py --device cuda (its 'trials per GPU' section)"
            )
    if not args.quick:
        common.need_data(ap, args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = common.scratch_env(workdir)
        if args.quick:
            args.data = common.quick_data(workdir)
            args.model, args.image_size, args.epochs, args.batch_size, args.lr = "lenet", 32, 1, 32, 0.05
            args.repeats = 1
        load(DataConfig(data=args.data, image_size=args.image_size))  # decode once: neither side pays it
        load1 = os.getloadavg()[0]
        print(
            f"data={args.data} model={args.model} image_size={args.image_size} epochs={args.epochs} batch_size={args.batch_size} "
            f"device={args.device} nproc={args.nproc} threads={args.threads} cpus={os.cpu_count()} load={load1:.1f}",
            file=sys.stderr,
        )
        res = [run(args, n, env) for _ in range(args.repeats) for n in (1, args.nproc)]
    print("\n| processes | world_size logged | images/s | train_time_s | best val acc | test acc |")
    print("|---|---|---|---|---|---|")
    for r in res:
        print(
            f"| {r['nproc']} | {r['world_size']} | {r['images_per_s']:,.1f} | {r['train_time_s']:.1f} | {r['best_val_accuracy']:.4f} | "
            f"{r['test_accuracy']:.4f} |"
        )
    med = {n: statistics.median(r["images_per_s"] for r in res if r["nproc"] == n) for n in (1, args.nproc)}
    print(
        f"\n1 -> {args.nproc} processes (median of {args.repeats}, {args.device}): {med[1]:,.1f} -> {med[args.nproc]:,.1f} images/s "
        f"({med[args.nproc] / med[1]:.2f}x); load average {load1:.1f} before, {os.getloadavg()[0]:.1f} after"
    )


if __name__ == "__main__":
    main()
