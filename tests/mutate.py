"""A short mutation check: plant known bugs, one at a time, in a copy of the repository and run the tests meant to
catch each. Every mutant must be CAUGHT (its tests fail); a MISSED mutant is a claim no test guards.

    python -m tests.mutate            # all mutants, one at a time (about 15-25 min on a busy 2-core box)
    python -m tests.mutate --list     # what is planted where, and which tests guard it
    python -m tests.mutate -k report  # the mutants whose name contains 'report'
    python -m tests.mutate --jobs 2   # two copies, two mutants at once
    python -m tests.mutate --baseline # first run every selected test file unmutated (a CAUGHT means nothing if
                                      # the tests already fail)

Each mutant is ONE exact string replacement (file, old, new): `old` must occur exactly once in the current code,
else the mutant is STALE (the code moved: update the list). STALE, MISSED, ERROR (the tests could not even be
collected: a renamed test, an import error) and TIMEOUT all exit non-zero.
The copy holds the tracked files plus untracked non-ignored ones (`git ls-files -co --exclude-standard`); it is
imported through PYTHONPATH (the venv's editable install points at the working tree: the check below fails loudly
if `bias_lab` would come from anywhere but the copy). Each run gets its own MLflow store and decoded-tensor cache.
Not collected by pytest (no test_ prefix); tests/test_mutate.py checks the list against the code, cheaply.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per mutant: a hung test run is reported as TIMEOUT (a failure of the check, not a catch)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids / files, relative to the repository root
    bug: str  # what a careless change would have done


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "report_plotly_cdn",
        "bias_lab/report.py",
        "include_plotlyjs=first",
        'include_plotlyjs="cdn" if first else False',
        (
            "tests/test_report.py::test_report_from_tracked_runs",
            "tests/test_bias_e2e.py::test_report_embeds_plotly_once_and_loads_nothing",
        ),
        "the report loads plotly.js from a CDN: blank offline",
    ),
    Mutant(
        "figures_plotly_cdn",
        "bias_lab/tracking.py",
        "include_plotlyjs=i == 0",
        'include_plotlyjs="cdn" if i == 0 else False',
        ("tests/test_core.py::test_train_run_logs_everything",),
        "a run's figures.html loads plotly.js from a CDN",
    ),
    Mutant(
        "decorrelated_test_not_half",
        "bias_lab/pipeline.py",
        "biasmod.draw_decorrelated(\n            ds.labels, split.test,",
        "biasmod.draw(\n            ds.labels, 0.25, 0.75,",
        ("tests/test_claims.py::test_the_decorrelated_test_draws_s_at_one_half_in_each_class",),
        "the decorrelated test drawn at p0=0.25, p1=0.75 (S still depends on y)",
    ),
    Mutant(
        "bootstrap_90_as_95",
        "bias_lab/metrics.py",
        "a = (1 - level) / 2",
        "a = (1 - 0.90) / 2",
        ("tests/test_claims.py::test_the_di_bootstrap_interval_covers_the_truth_95_percent_of_the_time",),
        "a 90% bootstrap interval reported as 95%",
    ),
    Mutant(
        "submission_unsorted",
        "bias_lab/kaggle_submit.py",
        "[(i, pred[i]) for i in sorted(pred, key=natural_key)]",
        "[(i, pred[i]) for i in pred]",
        ("tests/test_submit.py::test_without_sample_submission_rows_are_sorted_by_id_naturally",),
        "the CSV without sample_submission.csv in file order, not sorted by id",
    ),
    Mutant(
        "median_pruner_prunes_nothing",
        "bias_lab/search.py",
        "return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)",
        "return optuna.pruners.NopPruner()",
        ("tests/test_tune.py::test_the_default_pruner_prunes_a_clearly_worse_trial",),
        "pruner=median builds a pruner that prunes nothing",
    ),
    Mutant(
        "test_predictions_argmin",
        "bias_lab/pipeline.py",
        "pred = logits.argmax(1).numpy()",
        "pred = logits.argmin(1).numpy()",
        ("tests/test_claims.py::test_logged_test_accuracy_is_the_logged_models_accuracy_on_the_test_split",),
        "test predictions from argmin instead of argmax",
    ),
    Mutant(
        "di_inverted",
        "bias_lab/metrics.py",
        '"di": ratio(r0, r1),',
        '"di": ratio(r1, r0),',
        ("tests/test_bias.py::test_di_matches_aif360_and_fairlearn",),
        "the logged DI is P(y^=1|S=1)/P(y^=1|S=0), the inverse of AIF360's",
    ),
    Mutant(
        "wilson_90",
        "bias_lab/metrics.py",
        "def wilson(k: int, n: int, z: float = Z95)",
        "def wilson(k: int, n: int, z: float = 1.644854)",
        ("tests/test_claims.py::test_wilson_interval_covers_95_percent",),
        "the accuracy CI is a 90% Wilson interval labelled 95%",
    ),
    Mutant(
        "champion_on_worse",
        "bias_lab/registry.py",
        "val_accuracy > base_acc:",
        "val_accuracy < base_acc:",
        ("tests/test_tune.py::test_champion_moves_only_on_improvement",),
        "the champion alias moves to a worse model and stays on a better one",
    ),
    Mutant(
        "val_leaks_into_train",
        "bias_lab/pipeline.py",
        "train=_part(ds, split.train, ch_train, eps),",
        "train=_part(ds, np.concatenate([split.train, split.val]), ch_train, eps),",
        ("tests/test_bias_e2e.py::test_prepared_train_val_and_test_share_no_image",),
        "the val split is also trained on: best-epoch selection and tuning read training data",
    ),
    Mutant(
        "split_val_leaks_into_train",
        "bias_lab/data.py",
        'parts["train"].append(idx[n_test + n_val :])',
        'parts["train"].append(idx[n_test:])',
        ("tests/test_data.py::test_split_is_stratified_disjoint_covering_and_seeded",),
        "stratified_split puts the val images in train too",
    ),
    Mutant(
        "eps_p0_p1_swapped",
        "bias_lab/bias.py",
        "p = torch.where(labels.cpu() == 1, p1, p0).double()",
        "p = torch.where(labels.cpu() == 1, p0, p1).double()",
        ("tests/test_claims.py::test_the_decorrelated_test_draws_s_at_one_half_in_each_class",),
        "S ~ Bernoulli(p_y) with p0 and p1 swapped",
    ),
    Mutant(
        "label_smoothing_ignored",
        "bias_lab/loop.py",
        "label_smoothing=smoothing)",
        "label_smoothing=0.0)",
        ("tests/test_bias_e2e.py::test_label_smoothing_changes_the_training_loss",),
        "--label-smoothing is accepted and logged but not used",
    ),
    Mutant(
        "model_1_decorrelated_sees_the_bias",
        "bias_lab/bias_eval.py",
        "train_p=(p, p), ds=ds)",
        "train_p=(p0, p1), ds=ds)",
        ("tests/test_bias_e2e.py::test_model_1_decorrelated_ignores_eps_and_model_2_takes_the_shortcut",),
        "model_1_mode=decorrelated trains model_1 on the biased eps channel",
    ),
    Mutant(
        "seeds_summary_first_seed_only",
        "bias_lab/comparison.py",
        'out[f"{role}_{key}"] = nanmean(v)',
        'out[f"{role}_{key}"] = float(v[0])',
        ("tests/test_bias_e2e.py::test_two_seeds_end_to_end_mean_and_std",),
        "seeds>1: the parent reports the first seed, not the mean",
    ),
    Mutant(
        "channel_dropout_not_applied",
        "bias_lab/mitigation.py",
        "input_hook=channel_dropout(bias_cfg.sigma, eval_cfg.dropout_rate),",
        "input_hook=None,",
        ("tests/test_bias_e2e.py::test_mitigations_end_to_end[channel_dropout]",),
        "mitigation=channel_dropout trains model_3 exactly as model_2",
    ),
    Mutant(
        "reweigh_weights_dropped",
        "bias_lab/mitigation.py",
        "dataclasses.replace(prep, train=dataclasses.replace(prep.train, weights=w))",
        "prep",
        ("tests/test_bias_e2e.py::test_mitigations_end_to_end[reweigh]",),
        "mitigation=reweigh computes the weights but trains without them",
    ),
    Mutant(
        "experiment_race_lands_in_default",
        "bias_lab/tracking.py",
        "if client.get_experiment_by_name(experiment) is None:",
        "if False:",
        ("tests/test_scaleout.py::test_workers_racing_to_create_the_experiment_share_it",),
        "workers racing to create the experiment: the losers' runs land in Default",
    ),
    Mutant(
        "stale_trial_runs_left_running",
        "bias_lab/studies.py",
        '_end_runs_of(MlflowClient(), ids, f"trial {trial.number}: its worker stopped beating (killed?)")',
        "pass",
        ("tests/test_scaleout.py::test_a_worker_on_another_host_whose_heartbeat_stopped_is_recovered",),
        "heartbeat recovery fails the trial but leaves its MLflow runs RUNNING",
    ),
    Mutant(
        "stale_trial_not_requeued",
        "bias_lab/studies.py",
        "        self.retry(study, trial)",
        "        pass",
        ("tests/test_scaleout.py::test_a_worker_on_another_host_whose_heartbeat_stopped_is_recovered",),
        "heartbeat recovery does not re-queue the stale trial's params",
    ),
    Mutant(
        "tune_best_is_the_worst",
        "bias_lab/search.py",
        'direction="maximize",',
        'direction="minimize",',
        ("tests/test_choices.py::test_tunes_best_is_the_complete_trial_with_the_highest_val_accuracy",),
        "the study minimizes val accuracy: the worst trial is reported, registered and made champion",
    ),
    Mutant(
        "kept_epoch_is_the_last",
        "bias_lab/loop.py",
        'if v["accuracy"] > state.best[0] or (not len(self.val) and state.epoch == self.cfg.epochs):',
        "if True:",
        ("tests/test_choices.py::test_the_kept_weights_are_those_of_the_best_val_epoch",),
        "fit keeps (and reports as best) the last epoch's weights, not the best val epoch's",
    ),
    Mutant(
        "model_3_selected_on_model_2s_val",
        "bias_lab/mitigation.py",
        "decorrelated_val(prep, bias_cfg.sigma, seed),\n            input_hook=channel_dropout",
        "prep,\n            input_hook=channel_dropout",
        ("tests/test_choices.py::test_model_3_is_selected_on_a_decorrelated_val_not_on_model_2s[channel_dropout]",),
        "channel_dropout selects model_3's epoch on model_2's val, where S is y: the epoch that uses eps most",
    ),
    Mutant(
        "verdict_undefined_skips_did_not_learn",
        "bias_lab/verdict.py",
        '        if not self.learned:\n            return "did not learn"',
        '        if self.rule != "undefined" and not self.learned:\n            return "did not learn"',
        ("tests/test_verdict.py::test_a_model_at_chance_gets_no_verdict_even_when_its_di_is_undefined",),
        "a model at chance whose DI is 0/0 gets 'undefined' instead of no verdict",
    ),
    Mutant(
        "verdict_ignores_the_labels_di",
        "bias_lab/verdict.py",
        '        if self.rule == "biased" and self.mirrors_labels:',
        "        if False:",
        ("tests/test_verdict.py::test_a_model_that_mirrors_the_labels_is_not_called_biased",),
        "a model whose DI is the labels' own (S = y in distribution) is called biased",
    ),
    Mutant(
        "diverged_model_is_tested",
        "bias_lab/pipeline.py",
        "    if test and not trained.finite:",
        "    if False:",
        ("tests/test_verdict.py::test_a_diverged_train_shows_no_test_accuracy_and_fails",),
        "a model with NaN weights is scored on the test split (50 % of one class) and reported",
    ),
    Mutant(
        "sweep_threshold_from_models_at_chance",
        "bias_lab/bias_sweep.py",
        '        if v.inconclusive or v.rule != "biased":',
        '        if v.rule != "biased":',
        ("tests/test_sweep.py::test_models_at_chance_give_no_threshold_and_no_verdict",),
        "bias_sweep reads a threshold off models that never learned their task",
    ),
    Mutant(
        "recorder_skips_the_kept_trials_curves",
        "bias_lab/recorder.py",
        "    if history:\n",
        "    if False:\n",
        ("tests/test_tune.py::test_nested_runs_pruning_summary_and_registry",),
        "tune's final run records its kept trial without the per-epoch curves",
    ),
    Mutant(
        "card_forgets_the_synthetic_warning",
        "bias_lab/card.py",
        "    if card.synthetic:\n        names =",
        "    if False:\n        names =",
        ("tests/test_card.py::test_synthetic_card_warns_first_and_names_every_class",),
        "a demo model's card does not say its numbers say nothing about real photos",
    ),
    Mutant(
        "card_not_on_the_version",
        "bias_lab/tune.py",
        '    registry.describe_version(name, decision["version"], found, parent)\n',
        "",
        ("tests/test_tune.py::test_nested_runs_pruning_summary_and_registry",),
        "tune registers a version without its model card",
    ),
    Mutant(
        "served_model_forgets_tta",
        "bias_lab/inference.py",
        "logits = predict(model, chunk, norm, batch_size, tta=meta.tta)",
        "logits = predict(model, chunk, norm, batch_size)",
        ("tests/test_serving.py::test_pyfunc_on_the_image_files_gives_the_runs_own_test_numbers",),
        "the served model and kaggle_submit predict without the mirror the run's test accuracy was measured with",
    ),
    Mutant(
        "bias_card_calls_a_mirroring_model_fine",
        "bias_lab/facts.py",
        'verdict=judge(found, "", "decorrelated_test_", chance, base["decorrelated"], note).text(),',
        'verdict=judge(found, "", "test_", chance, base["in distribution"], note).text(),',
        ("tests/test_card.py::test_bias_facts_judge_the_decorrelated_test_beside_the_labels_di",),
        "a bias-study model's card states the in-distribution verdict, not the decorrelated one the comparison gives",
    ),
)


def source_files(repo: Path = REPO) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (repo / p).is_file() and not (repo / p).is_symlink()})


def check_mutant(m: Mutant, root: Path = REPO) -> str:
    """'' when `m.old` occurs exactly once in the file at `root`, else why the mutant is stale."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    n = path.read_text().count(m.old)
    return "" if n == 1 else f"{m.old!r} occurs {n} times in {m.file} (must be exactly once)"


def make_copy(dest: Path) -> Path:
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    return dest


def env_for(copy: Path, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_"))}
    scratch.mkdir(parents=True, exist_ok=True)
    env.update(
        PYTHONPATH=os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH", "")])]),
        MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}",
        BIAS_LAB_CACHE=str(scratch / "cache"),
        TQDM_DISABLE="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def verify_import(copy: Path) -> None:
    """Fail loudly unless `import bias_lab` in the copy's environment loads the copy's code."""
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run(
            [sys.executable, "-c", "import bias_lab; print(bias_lab.__file__)"],
            cwd=copy,
            check=False,
            env=env_for(copy, Path(scratch)),
            capture_output=True,
            text=True,
        )
    where = Path(out.stdout.strip() or "?").resolve()
    if out.returncode != 0 or not where.is_relative_to(copy.resolve()):
        sys.exit(
            f"mutate: bias_lab is imported from {where}, not from the copy {copy} "
            f"(exit {out.returncode}: {out.stderr.strip()[-500:]}): a mutant planted there would never run"
        )


def run_tests(copy: Path, tests: tuple[str, ...], scratch: Path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=copy, env=env_for(copy, scratch), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s", time.monotonic() - t0


def mutate_one(m: Mutant, copy: Path, scratch: Path) -> tuple[str, float, str]:
    """(result, seconds, output tail) with `m` planted in `copy`, which is restored afterwards."""
    stale = check_mutant(m, copy)
    if stale:
        return "STALE", 0.0, stale
    path = copy / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    try:
        code, out, secs = run_tests(copy, m.tests, scratch)
    finally:
        path.write_text(original)
    if code == -1:
        return "TIMEOUT", secs, out
    if code in (2, 3, 4, 5):  # interrupted by a collection error, internal/usage error, nothing collected
        return (
            "ERROR",
            secs,
            "pytest could not run the tests (unknown test id, or an import error in the copy): " + out[-1500:],
        )
    return ("CAUGHT" if code != 0 else "MISSED"), secs, out[-3000:]


def table(rows: list[tuple[Mutant, str, float]]) -> str:
    lines = ["| mutant | file | tests | result | seconds |", "|---|---|---|---|---|"]
    for m, result, secs in rows:
        tests = "<br>".join(t.removeprefix("tests/") for t in m.tests)
        lines.append(f"| {m.name} | {m.file} | {tests} | {result} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument(
        "-k",
        dest="substring",
        action="append",
        default=[],
        help="only the mutants whose name contains this (repeat: any of them)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (each in its own copy)")
    ap.add_argument("--baseline", action="store_true", help="first run the selected tests unmutated: they must pass")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the test output of every mutant")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.substring or any(k in m.name for k in args.substring)]
    if args.list:
        for m in chosen:
            stale = check_mutant(m)
            print(
                f"{m.name}{'  [STALE: ' + stale + ']' if stale else ''}\n  {m.file}: {m.old!r} -> {m.new!r}\n"
                f"  bug: {m.bug}\n  tests: {' '.join(m.tests)}"
            )
        return 0
    if not chosen:
        print(f"no mutant name contains any of {args.substring}", file=sys.stderr)
        return 2
    jobs = max(1, min(args.jobs, len(chosen)))
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bias-lab-mutate-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for j in range(jobs):
            copy = make_copy(Path(tmp) / f"copy{j}" / "repo")
            verify_import(copy)
            copies.put(copy)
        print(
            f"{len(chosen)} mutant(s), {jobs} job(s), copies of {len(source_files())} files under {tmp}",
            file=sys.stderr,
        )
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, out, secs = run_tests(copies.queue[0], tests, Path(tmp) / "baseline")
            print(f"baseline: {len(tests)} test selection(s) unmutated: exit {code} in {secs:.0f} s", file=sys.stderr)
            if code != 0:
                print(out[-4000:], file=sys.stderr)
                print("mutate: the tests fail without any mutant: fix them first", file=sys.stderr)
                return 1
        counter = iter(range(10**6))

        def job(m: Mutant) -> tuple[Mutant, str, float]:
            copy = copies.get()
            try:
                result, secs, out = mutate_one(m, copy, Path(tmp) / "scratch" / f"{m.name}-{next(counter)}")
            finally:
                copies.put(copy)
            print(f"{m.name}: {result} ({secs:.0f} s)", file=sys.stderr)
            if args.verbose or result != "CAUGHT":
                print("    " + out.strip().replace("\n", "\n    ")[-2000:], file=sys.stderr)
            return m, result, secs

        with cf.ThreadPoolExecutor(jobs) as pool:
            rows = list(pool.map(job, chosen))
    print(table(rows))
    bad = [m.name for m, r, _ in rows if r != "CAUGHT"]
    print(
        f"\n{len(rows) - len(bad)}/{len(rows)} caught in {time.monotonic() - t_start:.0f} s"
        + (f"; not caught: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
