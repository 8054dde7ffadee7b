"""Do more tune workers finish a study sooner? The same trial budget with 1 worker and with K workers on one storage.

    python benchmarks/bench_workers.py --data DIR            # default /work/shared/data/tiny4, 12 trials, 1 vs 3 workers
    python benchmarks/bench_workers.py --quick               # generated tiny data, 6 trials of 2 epochs: a smoke run
    python benchmarks/bench_workers.py --threads 1 --repeats 3   # on a shared machine: same threads, alternated, medians
    python benchmarks/bench_workers.py --storage postgresql://user@host/optuna --tracking-uri http://host:5000

Each worker is the command users run (`python -m bias_lab.cli tune ... --storage S --study-name N`), started
together; the study with K workers is a different study name in the same storage, with the same seed and fixed
settings. Default storage: a JournalFileBackend file (one machine); default tracking: a throw-away sqlite store.
The decoded-tensor cache is filled once before both studies, so neither pays the JPEG decode.

Two times per study: wall (first worker started -> last worker exited: what a user waits, imports included) and
search (first trial started -> last trial finished, from Optuna's timestamps). Threads: `auto` gives each worker
cpu_count // K torch threads (at least 1), so 1 worker gets the whole machine and K workers share it; on a machine
with fewer cores than workers the speed-up is bounded by the cores, not by K. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from scratch import quick_data, scratch_env  # noqa: E402  (benchmarks/, this script's folder)

from bias_lab import studies, tracking, tune  # noqa: E402
from bias_lab.config import DataConfig  # noqa: E402
from bias_lab.data import load  # noqa: E402

DEFAULT_DATA = "/work/shared/data/tiny4"


def threads_for(args: argparse.Namespace, workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers) if args.threads == "auto" else int(args.threads)


def study(args: argparse.Namespace, workers: int, env: dict[str, str], rep: int) -> dict:
    """Run one study with `workers` concurrent tune processes; returns times, counts and the best value."""
    name = f"bench-workers-{workers}-{args.tag}-{rep}"
    cmd = [
        sys.executable,
        "-m",
        "bias_lab.cli",
        "tune",
        "--data",
        args.data,
        "--image-size",
        str(args.image_size),
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--n-trials",
        str(args.n_trials),
        "--pruner",
        args.pruner,
        "--seed",
        str(args.seed),
        "--threads",
        str(threads_for(args, workers)),
        "--storage",
        args.storage,
        "--study-name",
        name,
        "--final-model",
        "false",
    ]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        sys.exit(f"a worker failed ({[p.returncode for p in procs]}):\n" + "\n".join(e[-2000:] for e in errs))
    s = optuna.load_study(study_name=name, storage=studies.open_storage(args.storage)[0])
    done = [t for t in s.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    search = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "workers": workers,
        "rep": rep,
        "load": os.getloadavg()[0],
        "threads": threads_for(args, workers),
        "wall_s": wall,
        "search_s": search,
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "surplus": sum(bool(t.user_attrs.get("surplus")) for t in s.trials),
        "best": s.best_value,
        "epochs": tune.epochs_trained(s),
        "per_worker": sorted(collections.Counter(t.user_attrs.get("worker") for t in done).values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=3, help="K, compared with 1 worker")
    ap.add_argument(
        "--pruner",
        default="none",
        choices=("none", "median", "hyperband"),
        help="none (default): every trial costs the same whatever the order, a clean throughput comparison",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="auto", help="torch threads per worker, or auto = cpu_count // workers")
    ap.add_argument(
        "--storage", default="", help="Optuna storage shared by the workers; default a journal file in a temp dir"
    )
    ap.add_argument("--tracking-uri", default="", help="MLflow tracking URI; default a throw-away sqlite store")
    ap.add_argument(
        "--repeats", type=int, default=1, help="alternate 1 and K workers this many times; medians are compared"
    )
    ap.add_argument("--quick", action="store_true", help="generated tiny data, 6 trials of 2 epochs")
    args = ap.parse_args()
    args.tag = time.strftime("%Y%m%d-%H%M%S")  # fresh study names on a reused storage
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = scratch_env(workdir, args.tracking_uri)
        if args.quick:
            args.data = quick_data(workdir)
            args.epochs, args.n_trials = 2, 6
        args.storage = args.storage or str(workdir / "optuna.journal")
        load(DataConfig(data=args.data, image_size=args.image_size))  # fill the tensor cache once, for both studies
        tracking.setup()  # the experiment exists before K workers start (they would race to create it)
        load1 = os.getloadavg()[0]
        print(
            f"data={args.data} model={args.model} image_size={args.image_size} epochs={args.epochs} n_trials={args.n_trials} "
            f"pruner={args.pruner} storage={studies._redact(args.storage)} cpus={os.cpu_count()} load={load1:.1f}",
            file=sys.stderr,
        )
        # alternating 1, K, 1, K...: drift in the machine's other load hits both sides alike
        res = [study(args, w, env, rep) for rep in range(args.repeats) for w in (1, args.workers)]
    print(
        "\n| workers | rep | threads each | wall s | search s | complete | pruned | surplus | epochs | trials per worker | best val acc | load after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        print(
            f"| {r['workers']} | {r['rep']} | {r['threads']} | {r['wall_s']:.1f} | {r['search_s']:.1f} | {r['complete']} | {r['pruned']} | "
            f"{r['surplus']} | {r['epochs']} | {'/'.join(map(str, r['per_worker']))} | {r['best']:.4f} | {r['load']:.1f} |"
        )
    med = {
        w: {k: statistics.median(r[k] for r in res if r["workers"] == w) for k in ("wall_s", "search_s")}
        for w in (1, args.workers)
    }
    one, k = med[1], med[args.workers]
    print(
        f"\n1 -> {args.workers} workers (median of {args.repeats}): wall {one['wall_s']:.1f} -> {k['wall_s']:.1f} s "
        f"({one['wall_s'] / k['wall_s']:.2f}x), search {one['search_s']:.1f} -> {k['search_s']:.1f} s "
        f"({one['search_s'] / k['search_s']:.2f}x) on {os.cpu_count()} cores; load average {load1:.1f} before, {os.getloadavg()[0]:.1f} after"
    )


if __name__ == "__main__":
    main()
