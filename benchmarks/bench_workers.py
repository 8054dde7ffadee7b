"""Do more tune workers finish a study sooner? The same trial budget with 1 worker and with K workers on one storage.

    python benchmarks/bench_workers.py --data path/to/tiny4   # 12 trials, 1 vs 3 workers: about a minute on 2 cores
    python benchmarks/bench_workers.py --quick                # generated tiny data, 6 trials of 2 epochs: a smoke run
    python benchmarks/bench_workers.py --data path/to/tiny4 --threads 1 --repeats 3   # on a shared machine: medians
    python benchmarks/bench_workers.py --data path/to/tiny4 --storage postgresql://user@host/optuna --tracking-uri http://host:5000

--data defaults to the folder in the environment variable BIAS_LAB_DATA.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from bias_lab import search, studies, tracking  # noqa: E402
from bias_lab.config import DataConfig  # noqa: E402
from bias_lab.data import load  # noqa: E402

SETTINGS = ("data", "model", "image_size", "epochs", "n_trials", "pruner", "seed")  # passed to `bias-lab tune`


def threads_for(args: argparse.Namespace, workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers) if args.threads == "auto" else int(args.threads)


def study(args: argparse.Namespace, workers: int, env: dict[str, str], rep: int) -> dict:
    """Run one study with `workers` concurrent tune processes; returns times, counts and the best value."""
    name = f"bench-workers-{workers}-{args.tag}-{rep}"
    cmd = [sys.executable, "-m", "bias_lab.cli", "tune", *common.flags(args, *SETTINGS)]
    cmd += ["--threads", str(threads_for(args, workers)), "--storage", args.storage, "--study-name", name]
    cmd += ["--final-model", "false"]
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
    search_s = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "workers": workers,
        "rep": rep,
        "load": os.getloadavg()[0],
        "threads": threads_for(args, workers),
        "wall_s": wall,
        "search_s": search_s,
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "surplus": sum(bool(t.user_attrs.get("surplus")) for t in s.trials),
        "best": s.best_value,
        "epochs": search.epochs_trained(s),
        "per_worker": sorted(collections.Counter(t.user_attrs.get("worker") for t in done).values()),
    }


def main() -> None:
    ap = common.parser(
        __doc__, "data", "model", "image_size", "epochs", "n_trials", "seed", image_size=32, epochs=5, n_trials=12
    )
    common.setting(
        ap, "pruner", "none", "none: every trial costs the same whatever the order, a clean throughput comparison"
    )
    common.setting(ap, "storage", help="Optuna storage shared by the workers; default a journal file in a temp dir")
    ap.add_argument("--threads", default="auto", help="torch threads per worker, or auto = cpu_count // workers")
    ap.add_argument("--workers", type=int, default=3, help="K, compared with 1 worker")
    ap.add_argument("--tracking-uri", default="", help="MLflow tracking URI; default a throw-away sqlite store")
    ap.add_argument(
        "--repeats", type=int, default=1, help="alternate 1 and K workers this many times; medians are compared"
    )
    ap.add_argument("--quick", action="store_true", help="generated tiny data, 6 trials of 2 epochs")
    args = ap.parse_args()
    if not args.quick:
        common.need_data(ap, args)
    args.tag = time.strftime("%Y%m%d-%H%M%S")  # fresh study names on a reused storage
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = common.scratch_env(workdir, args.tracking_uri)
        if args.quick:
            args.data = common.quick_data(workdir)
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
