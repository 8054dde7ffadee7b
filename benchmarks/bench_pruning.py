"""Does pruning pay? The same `tune` study with and without pruning: best val accuracy and epochs trained.

    python benchmarks/bench_pruning.py --data path/to/tiny4   # ~5-10 min on 2 cores
    python benchmarks/bench_pruning.py --quick                # generated tiny data, 3 trials of 2 epochs: a smoke run

--data defaults to the folder in the environment variable BIAS_LAB_DATA.

Both studies run through bias_lab.tune.run_tune (what `bias-lab tune` does), with the same TPE seed, the
same trial count and the same fixed settings, in a temporary MLflow store and journal (nothing is registered).
Epochs trained = the sum over trials of the epochs each trial actually ran (a pruned trial stops early).
Prints a table and one `TARGET ... PASS|FAIL` line per target:
  - with pruning, best val accuracy within 1 point of the study without pruning;
  - with pruning, >= 2x fewer epochs trained in total.
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402
import optuna  # noqa: E402

from bias_lab import search, studies, tune  # noqa: E402
from bias_lab.config import PRUNERS, BiasConfig, DataConfig, TrainConfig, TuneConfig  # noqa: E402


def study(args: argparse.Namespace, pruner: str, workdir: Path) -> dict[str, float]:
    """One study; returns best val accuracy, epochs trained, trial counts and wall time."""
    data = DataConfig(data=args.data, image_size=args.image_size)
    train = TrainConfig(model=args.model, epochs=args.epochs, seed=args.seed, threads=args.threads)
    tune_cfg = TuneConfig(
        n_trials=args.n_trials,
        pruner=pruner,
        storage=str(workdir / "optuna.journal"),
        study_name=f"bench-pruning-{pruner}",
        final_model=False,
    )
    t0 = time.perf_counter()
    tune.run_tune(data, train, BiasConfig(), tune_cfg)
    wall = time.perf_counter() - t0
    s = optuna.load_study(study_name=tune_cfg.study_name, storage=studies.open_storage(tune_cfg.storage)[0])
    states = [t.state for t in s.trials]
    return {
        "best_val_accuracy": s.best_value,
        "epochs_trained": search.epochs_trained(s),
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "wall_s": wall,
        "best_params": s.best_params,
    }


def main() -> None:
    ap = common.parser(
        __doc__, "data", "model", "image_size", "epochs", "n_trials", "seed", "threads", image_size=32, n_trials=16
    )
    common.setting(ap, "pruner", choices=[p for p in PRUNERS if p != "none"])
    ap.add_argument("--quick", action="store_true", help="generated tiny data, 3 trials of 2 epochs")
    args = ap.parse_args()
    if not args.quick:
        common.need_data(ap, args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        common.scratch_env(workdir, cache=args.quick)  # a throwaway store: benchmarks log nothing lasting
        if args.quick:
            args.data = common.quick_data(workdir)
            args.epochs, args.n_trials = 2, 3
        print(
            f"data={args.data} model={args.model} image_size={args.image_size} epochs={args.epochs} "
            f"n_trials={args.n_trials} seed={args.seed} pruner={args.pruner}",
            file=sys.stderr,
        )
        res = {"none": study(args, "none", workdir), args.pruner: study(args, args.pruner, workdir)}
    print("\n| pruner | best val acc | epochs trained | complete | pruned | wall s | best params |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        bp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items())
        print(
            f"| {name} | {r['best_val_accuracy']:.4f} | {r['epochs_trained']} | {r['complete']} | {r['pruned']} | {r['wall_s']:.0f} | {bp} |"
        )
    base, pr = res["none"], res[args.pruner]
    gap = 100 * (base["best_val_accuracy"] - pr["best_val_accuracy"])
    ratio = base["epochs_trained"] / max(pr["epochs_trained"], 1)
    print(
        f"\nTARGET pruning keeps best val accuracy within 1 point: {pr['best_val_accuracy']:.4f} vs "
        f"{base['best_val_accuracy']:.4f} ({-gap:+.2f} points) {'PASS' if gap <= 1.0 else 'FAIL'}"
    )
    print(
        f"TARGET pruning trains >= 2x fewer epochs: {base['epochs_trained']} / {pr['epochs_trained']} = {ratio:.2f}x "
        f"{'PASS' if ratio >= 2 else 'FAIL'}"
    )
    print(
        f"wall time: {base['wall_s']:.0f} s without pruning, {pr['wall_s']:.0f} s with ({base['wall_s'] / max(pr['wall_s'], 1e-9):.2f}x)"
    )


if __name__ == "__main__":
    main()
