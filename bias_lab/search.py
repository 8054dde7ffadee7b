"""The Optuna search behind `tune`: the search space of config.SEARCHED, a sampler whose draws depend only on
(seed, trial number), the pruner, and the objective (`Search`: one nested MLflow run and one training per trial).

Trial 0 is `train`'s defaults when they lie inside the space, so a study never ends worse than the defaults it
was meant to beat; when that trial did not finish (interrupted, failed), the next run of the study queues the
defaults again. `n_trials` counts every finished trial of the study, whichever worker or resume ran it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
import warnings
from typing import Any

import mlflow
import optuna
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from bias_lab import pipeline, recorder, studies, tracking
from bias_lab.config import SEARCHED, TRAIN_ONLY, BiasConfig, DataConfig, TrainConfig, TuneConfig, flat
from bias_lab.errors import check, first_line
from bias_lab.workers import WORKER

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts: failed trials are redone
# the settings a study's values depend on: resuming with other values would mix incomparable trials
_NOT_FIXED = {"cache_dir", "strict", *SEARCHED, "device", "threads", *TRAIN_ONLY}


# ----------------------------------------------------------------------------------------------- search space


def suggest(trial: optuna.Trial, base: TrainConfig, tune_cfg: TuneConfig) -> TrainConfig:
    """The trial's training settings: `base` with lr, momentum and batch_size drawn from the search space."""
    return dataclasses.replace(
        base,
        lr=trial.suggest_float("lr", tune_cfg.lr_min, tune_cfg.lr_max, log=True),
        momentum=trial.suggest_float("momentum", tune_cfg.momentum_min, tune_cfg.momentum_max),
        batch_size=trial.suggest_categorical("batch_size", tune_cfg.batch_size_choices()),
    )


def start_point(base: TrainConfig, tune_cfg: TuneConfig) -> dict[str, Any] | None:
    """`train`'s defaults as a point of the search space, or None when they lie outside it."""
    inside = (
        tune_cfg.lr_min <= base.lr <= tune_cfg.lr_max
        and tune_cfg.momentum_min <= base.momentum <= tune_cfg.momentum_max
        and base.batch_size in tune_cfg.batch_size_choices()
    )
    return {k: getattr(base, k) for k in SEARCHED} if inside else None


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose random draws for trial k depend only on (seed, k), and whose trial 0 is `first` when given.

    A plain seeded sampler restarts its random stream in every process: a resumed study would re-draw the
    points it already tried, and parallel workers would all propose the same ones. Re-seeding per trial
    number keeps a study reproducible from its seed and its history, and makes every trial's draw distinct.

    `first` (train's defaults): the search starts from a known point, and its best trial is never one that did
    worse on val than the defaults. Tied to the trial number, which the storage hands out once, so several workers
    opening a new study together try it once (Optuna's enqueue_trial checks and adds in two steps: they raced).
    """

    def __init__(self, seed: int, n_startup_trials: int, first: dict[str, Any] | None = None) -> None:
        # constant_liar: a trial still running elsewhere counts as a poor result, so parallel workers spread out
        # instead of all proposing the point next to the current best
        super().__init__(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
        self._base_seed = seed
        self._first = first or {}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        if trial.number == 0 and param_name in self._first:
            return self._first[param_name]
        return super().sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        s = (self._base_seed * 1_000_003 + trial.number) % 2**32
        self._random_sampler._rng.rng.seed(s)  # the startup trials' random draws
        super().before_trial(study, trial)


def make_sampler(seed: int, n_trials: int, first: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    # Optuna's 10 random startup trials would be most of a 12-trial study: use a third of it, 3..10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return TrialSeededTPE(seed, n_startup_trials=min(10, max(3, n_trials // 3)), first=first)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Pruning on the best val_accuracy so far, reported after every epoch."""
    if name == "median":
        # prune a trial below the median of earlier trials at the same epoch, once 3 trials have finished
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------------------------- the study


def count(study: optuna.Study, states: tuple[TrialState, ...] = FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


class _QuietFailedTrials(logging.Filter):
    """Optuna logs a failed trial with its traceback; the CLI prints one line per failure instead (see --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return " failed with " not in record.getMessage()


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed here instead
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietFailedTrials) for f in log.filters):
        log.addFilter(_QuietFailedTrials())


class Surplus(Exception):
    """Another worker filled n_trials between this worker's check and its trial: the trial is not run."""


def epochs_trained(study: optuna.Study) -> int:
    return int(sum(t.user_attrs.get("epochs_run", 0) for t in study.get_trials(deepcopy=False)))


class _Pruning:
    """The trial's epoch hook: reports -(lowest val_loss so far) to Optuna and prunes on it. The objective is val
    accuracy, but accuracy sits at chance level for the first epochs of many good configurations (it only moves
    once an argmax flips), while the loss already separates them: pruning on accuracy there prunes at random."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.best, self.lowest_loss, self.epochs = trial, -math.inf, math.inf, 0

    def __call__(self, epoch: int, m: dict[str, float]) -> None:
        self.best, self.epochs = max(self.best, m["val_accuracy"]), epoch
        if math.isfinite(m["val_loss"]):
            self.lowest_loss = min(self.lowest_loss, m["val_loss"])
            self.trial.report(-self.lowest_loss, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {epoch}: lowest val_loss {self.lowest_loss:.4f} is worse than the pruner's bar"
            )


@dataclasses.dataclass
class Search:
    """The objective: one nested MLflow run and one training per trial."""

    prep: pipeline.Prepared
    train_cfg: TrainConfig
    tune_cfg: TuneConfig
    study_name: str
    parent_run_id: str
    device: torch.device
    full: bool = False  # set when another worker filled the study first
    kept: tuple[int, pipeline.Trained] | None = None  # (trial number, trained model) of this process's best trial

    def __call__(self, trial: optuna.Trial) -> float:
        # first: a re-queued trial carries the dead worker's attrs until this one writes its own (studies.recover)
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("worker_of", trial.number)
        self._refuse_surplus(trial)
        cfg = suggest(trial, self.train_cfg, self.tune_cfg)
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        tags = {
            "entry_point": "tune",
            "role": "trial",
            "optuna_study": self.study_name,
            "optuna_trial": str(trial.number),
            "worker": WORKER,
            "state": "running",
        }
        pruning, t0 = _Pruning(trial), time.perf_counter()
        with tracking.run(f"trial-{trial.number}", nested=True, tags=tags) as child:
            trial.set_user_attr("mlflow_run_id", child.info.run_id)
            tracking.log_params(
                {**flat(cfg, skip=TRAIN_ONLY), "trial_number": trial.number, "data_digest": self.prep.dataset.digest}
            )
            state, why, epochs = "complete", "", 0
            try:
                trained = pipeline.train(
                    self.prep, cfg, self.device, test=False, on_epoch=recorder.epochs(self.prep, pruning)
                )
                recorder.record(trained, model=False)
                epochs = trained.fit.epochs_run
                if trained.fit.diverged:
                    state, why = "pruned", f"loss became non-finite at epoch {epochs}: {recorder.divergence_cause(cfg)}"
                elif self.kept is None or trained.fit.best_val_accuracy > self.kept[1].fit.best_val_accuracy:
                    self.kept = (trial.number, trained)  # the final run records it rather than training it again
            except optuna.TrialPruned as e:
                state, why, epochs = "pruned", str(e), pruning.epochs
                tracking.log_metrics(
                    {
                        "train_time_s": time.perf_counter() - t0,
                        "epochs_run": epochs,
                        "best_val_accuracy": max(pruning.best, 0.0),
                    }
                )
            except BaseException as e:
                mlflow.set_tag("state", "failed")
                trial.set_user_attr("epochs_run", pruning.epochs)
                print(
                    f"trial {trial.number} failed after {pruning.epochs} epochs: {type(e).__name__}: {first_line(e)}",
                    file=sys.stderr,
                )
                raise
            mlflow.set_tag("state", state)
            if why:
                mlflow.set_tag("pruned_reason", why)
            value = trained.fit.best_val_accuracy if state == "complete" else max(pruning.best, 0.0)
            trial.set_user_attr("best_val_accuracy", value)  # a pruned trial's Optuna value is its last report (-loss)
            trial.set_user_attr("epochs_run", epochs)
            trial.set_user_attr("train_time_s", round(time.perf_counter() - t0, 3))
        self._report(trial, state, value)
        print(
            f"trial {trial.number} {state}: best val_accuracy {value:.4f} after {epochs} epochs, lr={cfg.lr:.3g} "
            f"momentum={cfg.momentum:.3f} batch_size={cfg.batch_size} ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        if state == "pruned":
            raise optuna.TrialPruned(why)
        return value

    def _refuse_surplus(self, trial: optuna.Trial) -> None:
        """Another worker filled the study while this one waited: this trial would be one too many."""
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            if t.number < trial.number
        ]
        if len(earlier) >= self.tune_cfg.n_trials:
            trial.set_user_attr("surplus", True)
            self.full = True
            raise Surplus(f"trial {trial.number}: the study already holds n_trials={self.tune_cfg.n_trials}")

    def _report(self, trial: optuna.Trial, state: str, value: float) -> None:
        """The parent's live view of the search: the best val accuracy so far (step = trial number)."""
        done = [
            float(t.value)
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != trial.number and t.value is not None
        ]
        so_far = max([*done, *([value] if state == "complete" else [])], default=None)
        if so_far is not None:
            with contextlib.suppress(MlflowException):
                MlflowClient().log_metric(self.parent_run_id, "best_val_accuracy_so_far", so_far, step=trial.number)


def optimize(study: optuna.Study, search: Search, tune_cfg: TuneConfig) -> None:
    """Run trials until the study holds n_trials finished ones (all workers and resumes counted) or timeout."""
    deadline = time.monotonic() + tune_cfg.timeout if tune_cfg.timeout > 0 else math.inf
    while time.monotonic() < deadline:
        studies.recover(study, search.study_name)
        # in-flight trials of live workers count too, so that several workers stop at n_trials, not beyond
        if count(study, (*FINISHED, TrialState.RUNNING)) >= tune_cfg.n_trials:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # out of memory is a property of the configuration (batch size): fail that trial, keep searching
            study.optimize(search, n_trials=1, catch=(torch.OutOfMemoryError, Surplus), gc_after_trial=False)
        if search.full:
            break


def fixed_settings(data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig) -> dict[str, Any]:
    return {k: v for k, v in flat(data_cfg, train_cfg, bias_cfg).items() if k not in _NOT_FIXED}


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    tune_cfg: TuneConfig,
    fixed: dict[str, Any],
    seed: int,
    first: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create or resume the study; refuse to resume one run with other fixed settings (its values would not compare)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            load_if_exists=True,
            sampler=make_sampler(seed, tune_cfg.n_trials, first),
            pruner=make_pruner(tune_cfg.pruner, int(fixed["epochs"])),
        )
    before = study.user_attrs.get("fixed_settings")
    if before is None:
        study.set_user_attr("fixed_settings", fixed)
    else:
        diff = [f"{k}={before.get(k)!r} (now {v!r})" for k, v in fixed.items() if before.get(k) != v]
        check(
            not diff,
            f"study '{name}' was run with {', '.join(diff[:4])}: use the same settings to resume it, "
            "or pass a new --study-name",
        )
    if first is not None:
        _queue_start_point(study, first, tune_cfg.n_trials)
    return study


def _carries(t: FrozenTrial, point: dict[str, Any]) -> bool:
    """Trial `t` tries `point`: its params, or the params it was queued with; a running trial 0 that has not drawn
    its params yet draws the start point (TrialSeededTPE)."""
    unset = t.number == 0 and t.state == TrialState.RUNNING and not t.params
    return unset or t.params == point or t.system_attrs.get("fixed_params") == point


def _queue_start_point(study: optuna.Study, first: dict[str, Any], n_trials: int) -> None:
    """A resumed study whose start point never finished (trial 0 interrupted or failed) queues it again, once: no
    finished, running or queued trial carries it. A new study needs none (TrialSeededTPE makes trial 0 the start
    point), a full one runs no more trials. Two workers resuming at the same moment may both queue it (Optuna's
    enqueue checks and adds in two steps): the defaults are then tried twice, never not at all."""
    trials = study.get_trials(deepcopy=False)
    if not trials or count(study) >= n_trials:
        return
    live = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
    if not any(_carries(t, first) for t in trials if t.state in live):
        study.enqueue_trial(first, user_attrs={"start_point": True})


def start_note(study: optuna.Study, first: dict[str, Any] | None) -> str:
    """What tune's opening line says of the start point: which trial tries it; '' once it was tried, when no trial
    will (the study is full), or when the defaults lie outside the search space."""
    if first is None:
        return ""
    point = f"the defaults ({', '.join(f'{k}={v}' for k, v in first.items())})"
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return f"; trial 0 is {point}"
    if any(t.state in FINISHED and _carries(t, first) for t in trials):
        return ""
    pending = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING) and _carries(t, first)]
    failed = [t.number for t in trials if t.state == TrialState.FAIL and _carries(t, first)]
    if not pending:
        return ""
    return f"; trial {pending[0]} is {point}" + (f", queued again: trial {failed[-1]} did not finish" if failed else "")
