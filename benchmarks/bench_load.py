"""What the OpenMP wait policy does to `bias-lab train` on an idle and on a busy machine (and `tune` on a busy one).

    python benchmarks/bench_load.py --data path/to/tiny4          # 13.5 min on 2 cores at load avg 8-12
    python benchmarks/bench_load.py --data path/to/tiny4 --tune   # + the README's default `tune` (demo data, 20 trials), busy; killed after --tune-timeout (900 s)
    python benchmarks/bench_load.py --quick                       # generated tiny data, 1 repeat: smoke run (4.5 min at load 2-4: process start-up dominates)

--data defaults to the folder in the environment variable BIAS_LAB_DATA.

bias_lab/__init__.py sets OMP_WAIT_POLICY=PASSIVE unless the user set it. Each measurement is a 1-epoch LeNet
`python -m bias_lab.cli train --device cpu` in a subprocess (its own temporary MLflow sqlite store and a shared,
pre-warmed decode cache), with OMP_WAIT_POLICY=ACTIVE (the old spinning default; it has to be forced now) or unset
(= bias_lab's default, PASSIVE), alternated, `--repeats` times each, (1) on the machine as it is ("idle") and (2) next
to two background processes each looping `a = a @ a; a = a / a.norm()` on a 256x256 tensor with one torch thread
(so two busy cores; started, given 2 s after their import, killed in a finally). images_per_s is read back from the
runs with MlflowClient (it is fit's training throughput: the epoch's train steps, not process start or decode).
Prints the load average, a markdown table and one `TARGET ... PASS|FAIL` line per target. Not a test: nothing asserted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402

HOG = """
import sys, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
print("ready", flush=True)
while True:
    a = a @ a
    a = a / a.norm()
"""


def policy_env(tmp: Path, policy: str | None) -> dict[str, str]:
    """scratch_env(tmp) with OMP_WAIT_POLICY=`policy`, or unset (None: bias_lab's default applies)."""
    env = {k: v for k, v in common.scratch_env(tmp).items() if k != "OMP_WAIT_POLICY"}
    return env if policy is None else {**env, "OMP_WAIT_POLICY": policy}


def train_once(data: Path, tmp: Path, policy: str | None, epochs: int = 1) -> dict[str, float]:
    """One `bias-lab train` subprocess; its metrics (read back from the store) + the process's wall seconds."""
    run, wall = common.train_cli(data, "lenet", epochs, policy_env(tmp, policy), tmp)
    return {**run.data.metrics, "wall_s": wall}


class Hogs:
    """Two background matmul loops (one torch thread each), killed for sure on exit."""

    def __init__(self, n: int = 2):
        self.n, self.procs = n, []

    def __enter__(self) -> "Hogs":
        try:
            for _ in range(self.n):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", HOG],
                        stdout=subprocess.PIPE,
                        text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1"},
                    )
                )
            for p in self.procs:
                p.stdout.readline()  # "ready": torch imported, looping
            time.sleep(2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            try:
                p.kill()
            finally:
                p.wait()
        self.procs = []


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = common.parser(__doc__, "data")
    ap.add_argument("--quick", action="store_true", help="generated tiny data, 1 repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per policy and condition; default 2 (1 with --quick)")
    ap.add_argument("--tune-timeout", type=float, default=900, help="kill the tune run after this many seconds (FAIL)")
    ap.add_argument(
        "--tune", action="store_true", help="also time `python -m bias_lab.cli tune` (defaults) on the busy machine"
    )
    args = ap.parse_args()
    if not args.quick:
        common.need_data(ap, args)
    repeats = args.repeats or (1 if args.quick else 2)
    policies = {"ACTIVE (forced)": "ACTIVE", "unset (bias_lab default: PASSIVE)": None}
    t_start = time.perf_counter()
    user_policy = os.environ.get("OMP_WAIT_POLICY")
    print(
        f"# {os.cpu_count()} CPUs; load average {load()} at start (other jobs share this machine); "
        f"OMP_WAIT_POLICY in this shell: {user_policy or 'unset'} (overridden per run)",
        flush=True,
    )
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    loads: dict[str, str] = {}
    tune_s = None
    with tempfile.TemporaryDirectory(prefix="bias-lab-load-") as tmp_s:
        tmp = Path(tmp_s)
        data = common.write_synthetic(tmp / "synthetic") if args.quick else Path(args.data).expanduser().resolve()
        train_once(data, tmp, None)  # warm-up, not measured: fills the decode cache and creates the store's tables
        print(f"  warm-up done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        for cond in ("idle", "busy"):
            with Hogs(2) if cond == "busy" else _null():
                loads[cond] = load()
                for _ in range(repeats):
                    for label, pol in policies.items():
                        r = train_once(data, tmp, pol)
                        rows.setdefault((cond, label), []).append(r)
                        print(
                            f"  {cond} {label}: {r['images_per_s']:.0f} img/s, train {r['train_time_s']:.1f} s, "
                            f"process {r['wall_s']:.1f} s ({time.perf_counter() - t_start:.0f} s)",
                            flush=True,
                        )
                if cond == "busy" and args.tune:
                    tdir = tmp / "tune"
                    tdir.mkdir()
                    cmd = [sys.executable, "-m", "bias_lab.cli", "tune"]
                    loads["tune"] = load()
                    t0 = time.perf_counter()
                    try:
                        p = subprocess.run(
                            cmd,
                            cwd=tdir,
                            env=policy_env(tdir, user_policy),
                            capture_output=True,
                            text=True,
                            timeout=args.tune_timeout,
                        )
                    except subprocess.TimeoutExpired:
                        p = None
                    tune_s = time.perf_counter() - t0
                    if p is None:
                        print(f"tune stopped after {args.tune_timeout:g} s (--tune-timeout)", file=sys.stderr)
                    elif p.returncode != 0:
                        print(f"tune failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", file=sys.stderr)
                        tune_s = float("nan")
                    print(f"  busy tune: {tune_s:.0f} s ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def mean(cond: str, label: str, key: str = "images_per_s") -> float:
        return statistics.mean(r[key] for r in rows[(cond, label)])

    print(
        "\n| machine | OMP_WAIT_POLICY | images_per_s per run | mean images_per_s | mean train s | mean process wall s | load avg (1/5/15 min) at start |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for cond in ("idle", "busy"):
        what = "idle (as it is)" if cond == "idle" else "busy (+2 matmul loops)"
        for label in policies:
            per = ", ".join(f"{r['images_per_s']:.0f}" for r in rows[(cond, label)])
            print(
                f"| {what} | {label} | {per} | {mean(cond, label):.0f} | {mean(cond, label, 'train_time_s'):.1f} | "
                f"{mean(cond, label, 'wall_s'):.1f} | {loads[cond]} |"
            )
    act, pas = policies
    busy_ratio = mean("busy", pas) / mean("busy", act)
    idle_ratio = mean("idle", pas) / mean("idle", act)
    print()
    print(
        f"TARGET busy PASSIVE >= 2x busy ACTIVE (mean images_per_s): {busy_ratio:.2f}x {'PASS' if busy_ratio >= 2 else 'FAIL'}"
    )
    print(
        f"TARGET idle PASSIVE >= 0.95x idle ACTIVE (mean images_per_s): {idle_ratio:.2f}x {'PASS' if idle_ratio >= 0.95 else 'FAIL'}"
    )
    if tune_s is not None:
        ok = tune_s == tune_s and tune_s <= 120
        print(
            f"TARGET tune_busy_<=120s (`python -m bias_lab.cli tune`, defaults: demo data, LeNet, 20 trials; load avg "
            f"{loads['tune']} at its start): {tune_s:.0f} s {'PASS' if ok else 'FAIL'}"
        )
    print(f"\nload average {load()} at end; (total {time.perf_counter() - t_start:.0f} s)")
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    sys.exit(main())
