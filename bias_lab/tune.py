"""`tune`: an Optuna search of lr, momentum and batch size on the val split, every trial tracked in MLflow.

One parent run per invocation (the run `mlflow run` created, or a new one) and one nested child run per trial,
tagged with its trial number and state (complete / pruned / failed). The study lives in Optuna storage: a
journal file next to the MLflow store by default, an RDB URL for several machines; re-running the same command
resumes it and several workers share it, `n_trials` counting every trial of the study. Once the study holds
its trials, the best trial's model (its own weights when this process trained it, else retrained) is tested
once (the only time the test split is read), registered in the Model Registry, and becomes `champion` only if it
beats the current champion's val accuracy on the same data.

Recovery: a worker that died (SIGKILL, power loss) leaves its trial RUNNING and its MLflow runs RUNNING. On
start and before every trial, RUNNING trials of dead workers on this machine (pid gone) are failed, their
params re-queued once, and their MLflow runs ended KILLED; on an RDB storage the heartbeat does the same for
workers on other machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
import warnings
from typing import Any, Callable

import mlflow
import optuna
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from bias_lab import config, pipeline, pretrained, registry, studies, tracking
from bias_lab import markdown as md
from bias_lab.config import NOT_USED_BY, TRAIN_ONLY, BiasConfig, DataConfig, TrainConfig, TuneConfig, flat
from bias_lab.errors import check, first_line
from bias_lab.loop import FitResult
from bias_lab.markdown import fmt
from bias_lab.models import finite_weights
from bias_lab.workers import WORKER

SEARCHED = ("lr", "momentum", "batch_size")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts: failed trials are redone
# the settings a study's values depend on: resuming with other values would mix incomparable trials
_NOT_FIXED = {"cache_dir", "strict", "lr", "momentum", "batch_size", "device", "threads", *TRAIN_ONLY}


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


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed here instead
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietFailedTrials) for f in log.filters):
        log.addFilter(_QuietFailedTrials())


class Surplus(Exception):
    """Another worker filled n_trials between this worker's check and its trial: the trial is not run."""


def epochs_trained(study: optuna.Study) -> int:
    return int(sum(t.user_attrs.get("epochs_run", 0) for t in study.get_trials(deepcopy=False)))


@dataclasses.dataclass
class Search:
    """The objective: one nested MLflow run and one training per trial."""

    prep: pipeline.Prepared
    train_cfg: TrainConfig
    tune_cfg: TuneConfig
    study_name: str
    parent_run_id: str
    full: bool = False  # set when another worker filled the study first
    kept: tuple[int, pipeline.Trained] | None = None  # (trial number, fit) of this process's best trial

    def __call__(self, trial: optuna.Trial) -> float:
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            if t.number < trial.number
        ]
        if len(earlier) >= self.tune_cfg.n_trials:
            trial.set_user_attr("surplus", True)
            self.full = True
            raise Surplus(f"trial {trial.number}: the study already holds n_trials={self.tune_cfg.n_trials}")
        cfg = suggest(trial, self.train_cfg, self.tune_cfg)
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        tags = {
            "entry_point": "tune",
            "role": "trial",
            "optuna_study": self.study_name,
            "optuna_trial": str(trial.number),
            "worker": WORKER,
            "state": "running",
        }
        best, lowest_loss, epochs = -math.inf, math.inf, 0
        history: list[dict[str, float]] = []

        def report(epoch: int, m: dict[str, float]) -> None:
            """Report -(lowest val_loss so far) and prune on it. The objective is val accuracy, but accuracy sits at
            chance level for the first epochs of many good configurations (it only moves once an argmax flips),
            while the loss already separates them: pruning on accuracy there prunes at random."""
            nonlocal best, lowest_loss, epochs
            best, epochs = max(best, m["val_accuracy"]), epoch
            history.append(m)
            if math.isfinite(m["val_loss"]):
                lowest_loss = min(lowest_loss, m["val_loss"])
                trial.report(-lowest_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {epoch}: lowest val_loss {lowest_loss:.4f} is worse than the pruner's bar"
                )

        t0 = time.perf_counter()
        with tracking.run(f"trial-{trial.number}", nested=True, tags=tags) as child:
            trial.set_user_attr("mlflow_run_id", child.info.run_id)
            tracking.log_params(
                {**flat(cfg, skip=TRAIN_ONLY), "trial_number": trial.number, "data_digest": self.prep.dataset.digest}
            )
            state, why = "complete", ""
            try:
                net, out = pipeline.train_model(
                    self.prep, cfg, pipeline.Outputs(test=False, model=False), on_epoch=report
                )
                epochs = int(out["epochs_run"])
                if out["diverged"]:
                    state, why = "pruned", f"loss became non-finite at epoch {epochs}: {pipeline.divergence_cause(cfg)}"
                elif self.kept is None or out["best_val_accuracy"] > self.kept[1].result.best_val_accuracy:
                    self.keep(trial.number, net, out, history)
            except optuna.TrialPruned as e:
                state, why = "pruned", str(e)
                tracking.log_metrics(
                    {
                        "train_time_s": time.perf_counter() - t0,
                        "epochs_run": epochs,
                        "best_val_accuracy": max(best, 0.0),
                    }
                )
            except BaseException as e:
                mlflow.set_tag("state", "failed")
                trial.set_user_attr("epochs_run", epochs)
                print(
                    f"trial {trial.number} failed after {epochs} epochs: {type(e).__name__}: {first_line(e)}",
                    file=sys.stderr,
                )
                raise
            mlflow.set_tag("state", state)
            if why:
                mlflow.set_tag("pruned_reason", why)
            value = out["best_val_accuracy"] if state == "complete" else max(best, 0.0)
            trial.set_user_attr("best_val_accuracy", value)  # a pruned trial's Optuna value is its last report (-loss)
            trial.set_user_attr("epochs_run", epochs)
            trial.set_user_attr("train_time_s", round(time.perf_counter() - t0, 3))
        done = [
            float(t.value)
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != trial.number and t.value is not None
        ]
        so_far = max([*done, *([value] if state == "complete" else [])], default=None)
        if so_far is not None:
            with contextlib.suppress(MlflowException):  # the parent's live view of the search (step = trial number)
                MlflowClient().log_metric(self.parent_run_id, "best_val_accuracy_so_far", so_far, step=trial.number)
        print(
            f"trial {trial.number} {state}: best val_accuracy {value:.4f} after {epochs} epochs, lr={cfg.lr:.3g} "
            f"momentum={cfg.momentum:.3f} batch_size={cfg.batch_size} ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        if state == "pruned":
            raise optuna.TrialPruned(why)
        return value

    def keep(self, number: int, net: torch.nn.Module, out: dict[str, float], history: list[dict[str, float]]) -> None:
        """Hold this trial's kept weights, so that the final run records them rather than training them again."""
        result = FitResult(
            history=history,
            best_epoch=int(out["best_epoch"]),
            best_val_accuracy=out["best_val_accuracy"],
            train_time_s=out["train_time_s"],
            images_per_s=out["images_per_s"],
            epochs_run=int(out["epochs_run"]),
        )
        state = {k: t.detach().to("cpu", copy=True) for k, t in net.state_dict().items()}
        self.kept = (number, pipeline.Trained(state, result))


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
    return study


# ----------------------------------------------------------------------------------------------- summary


def _figures(study: optuna.Study, seed: int) -> dict[str, Callable[[], Any]]:
    v = optuna.visualization
    return {
        "optimization_history": lambda: v.plot_optimization_history(study),
        "intermediate_values": lambda: v.plot_intermediate_values(study).update_layout(
            title_text="What the pruner compares: −(lowest val loss so far) per epoch",  # Search.__call__'s report()
            xaxis_title="epoch",
            yaxis_title="−(lowest val loss so far)",
        ),
        "parallel_coordinate": lambda: v.plot_parallel_coordinate(study),
        "contour_lr_momentum": lambda: v.plot_contour(study, params=["lr", "momentum"]),
        "param_importances": lambda: v.plot_param_importances(study, evaluator=_importance_evaluator(seed)),
    }


def _importance_evaluator(seed: int) -> optuna.importance.BaseImportanceEvaluator:
    """Optuna's default fANOVA (seeded) needs scikit-learn, which bias_lab does not require: PED-ANOVA without it."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator()
    return optuna.importance.FanovaImportanceEvaluator(seed=seed)


def log_summary(study: optuna.Study, t_start: float, seed: int) -> dict[str, float]:
    """Counts, best trial, trials table and Optuna's figures on the active (parent) run; returns the metrics."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out = {
        "n_trials_complete": float(len(complete)),
        "n_trials_pruned": float(sum(t.state == TrialState.PRUNED for t in trials)),
        "n_trials_failed": float(sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials)),
        "epochs_trained": float(epochs_trained(study)),
        "total_tuning_time_s": time.perf_counter() - t_start,
    }
    if complete:
        best = study.best_trial
        out.update(best_val_accuracy=float(best.value or 0.0), best_trial_number=float(best.number))
        tracking.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.set_tag("best_trial_run_id", best.user_attrs.get("mlflow_run_id", ""))
    else:
        mlflow.set_tag("best_trial", "none: no trial completed (all pruned or failed); re-run to add trials")
    tracking.log_metrics(out)
    if trials:
        table = study.trials_dataframe()
        # Optuna gives a pruned trial its last intermediate value, here a negative val_loss: not an accuracy
        table["value"] = table["value"].where(table["state"] == "COMPLETE")
        tracking.log_table(table, "trials")
    need = {"optimization_history": 1, "parallel_coordinate": 2, "contour_lr_momentum": 2, "param_importances": 2}
    for name, make in _figures(study, seed).items():
        if name == "intermediate_values" and not any(t.intermediate_values for t in trials):
            continue
        if len(complete) < need.get(name, 0):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracking.log_figure(make(), name)
        except Exception as e:  # a figure Optuna cannot draw for this study must not lose the study's results
            mlflow.set_tag(f"figure_{name}_skipped", first_line(e))
    return out


def final_model(
    prep: pipeline.Prepared,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    bias_cfg: BiasConfig,
    tune_cfg: TuneConfig,
    best: FrozenTrial,
    study_name: str,
    reuse: pipeline.Trained | None = None,
) -> dict[str, float]:
    """Test the best configuration once, log and register it in a child run tagged role=final; record test measures
    and the champion decision on the parent. Its weights are `reuse`, the best trial's own when this process
    trained it (same settings, same seed: a retrain would give the same numbers); otherwise (another worker's
    trial, or a resumed study) it is retrained (train split, best-val epoch kept)."""
    cfg = dataclasses.replace(train_cfg, **best.params)
    parent = tracking.active_run_id()
    digest = prep.dataset.digest
    tags = {
        "entry_point": "tune",
        "role": "final",
        "optuna_study": study_name,
        "optuna_trial": str(best.number),
        "worker": WORKER,
        "final_weights": f"trial {best.number}'s own, not retrained (same settings, same seed)"
        if reuse
        else f"retrained: trial {best.number} was trained by another worker or an earlier run",
    }
    with tracking.run(f"final-{cfg.model}", nested=True, tags=tags, system_metrics=True) as child:
        pipeline.log_setup(prep, data_cfg, cfg, bias_cfg, skip=TRAIN_ONLY)
        net, out = pipeline.train_model(prep, cfg, pipeline.Outputs(model=False), reuse=reuse)  # model: on the parent
    check(
        finite_weights(net),
        f"the best configuration (trial {best.number}) has non-finite weights: nothing was "
        f"registered; {pipeline.divergence_cause(cfg)}, or narrow the lr range (lr_max)",
    )
    # the model is logged on the tune run itself, so its page in the MLflow UI lists the registered version
    info = tracking.log_model(net, prep.meta(cfg))
    decision = registry.register_champion(
        info.model_uri,
        tune_cfg.registered_model,
        digest,
        out["best_val_accuracy"],
        {
            "model": cfg.model,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "batch_size": cfg.batch_size,
            "image_size": data_cfg.image_size,
            "seed": cfg.seed,
            "optuna_study": study_name,
            "optuna_trial": best.number,
            "tune_run_id": parent,
            "final_run_id": child.info.run_id,
            "test_accuracy": out.get("test_accuracy", math.nan),
            "weights": cfg.weights,
            **({"pretrained": pretrained.CAVEAT} if cfg.weights != "none" else {}),
        },
    )
    MlflowClient().set_tag(
        child.info.run_id,
        "registered_version",
        f"{tune_cfg.registered_model} v{decision['version']} (model logged on the tune run)",
    )
    tested = {k: v for k, v in out.items() if k.startswith(("test_", "decorrelated_test_"))}
    tracking.log_metrics(
        {
            **tested,
            "final_val_accuracy": out["best_val_accuracy"],
            "champion_moved": float(decision["moved"]),
            **(
                {"champion_previous_val_accuracy": decision["baseline_val_accuracy"]}
                if decision["baseline_val_accuracy"] is not None
                else {}
            ),
        }
    )
    mlflow.set_tags(
        {
            "final_run_id": child.info.run_id,
            "registered_model": tune_cfg.registered_model,
            "registered_version": decision["version"],
            "champion_version": str(decision["champion_version"]),
            "champion_moved": str(decision["moved"]).lower(),
            "champion_decision": decision["reason"],
        }
    )
    print(
        f"final model: test_accuracy {out.get('test_accuracy', math.nan):.4f}; registered {tune_cfg.registered_model} "
        f"v{decision['version']}; champion {'moved' if decision['moved'] else 'kept'}: {decision['reason']}",
        file=sys.stderr,
    )
    return {**tested, "final_val_accuracy": out["best_val_accuracy"], "champion_moved": float(decision["moved"])}


# ----------------------------------------------------------------------------------------------- the command


def run_tune(
    data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, tune_cfg: TuneConfig
) -> dict[str, float]:
    """The `tune` command; returns the parent run's metrics (best_val_accuracy, counts, test_accuracy...)."""
    t_start = time.perf_counter()
    _quiet_optuna()
    config.validate("tune", data_cfg, train_cfg, bias_cfg, tune_cfg)  # before the storage, the data or a run
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    storage, storage_desc = studies.open_storage(tune_cfg.storage)
    tracking.setup()
    prep = pipeline.prepare(data_cfg, bias_cfg, train_cfg.seed)
    name = tune_cfg.study_name.strip() or f"bias-lab-{train_cfg.model}-{prep.dataset.digest}"
    first = start_point(train_cfg, tune_cfg)
    study = open_study(storage, name, tune_cfg, fixed_settings(data_cfg, train_cfg, bias_cfg), train_cfg.seed, first)
    resumed = count(study, FINISHED)
    tags = {"entry_point": "tune", "optuna_study": name, "optuna_storage": storage_desc, "worker": WORKER}
    with tracking.run(f"tune-{train_cfg.model}", tags=tags, system_metrics=True) as parent:
        # the storage as described (password redacted): a URL's password must not become a run param
        pipeline.log_setup(
            prep,
            data_cfg,
            train_cfg,
            bias_cfg,
            dataclasses.replace(tune_cfg, storage=storage_desc),
            skip=NOT_USED_BY["tune"],
        )
        mlflow.set_tags({"searched_params": ",".join(SEARCHED), "resumed_trials": str(resumed)})
        print(
            f"study '{name}' in {storage_desc}: {resumed} finished trials, running up to n_trials={tune_cfg.n_trials}"
            + (
                f"; trial 0 is the defaults ({', '.join(f'{k}={v}' for k, v in first.items())})"
                if first and resumed == 0
                else ""
            ),
            file=sys.stderr,
        )
        search = Search(prep, train_cfg, tune_cfg, name, parent.info.run_id)
        t_search = time.perf_counter()
        try:
            optimize(study, search, tune_cfg)
        except KeyboardInterrupt:  # keep what finished: the summary of the best so far, then end KILLED
            log_summary(study, t_start, train_cfg.seed)
            raise
        out = log_summary(study, t_start, train_cfg.seed)
        out["search_time_s"] = time.perf_counter() - t_search
        tracking.log_metrics({"search_time_s": out["search_time_s"]})
        complete = count(study, (TrialState.COMPLETE,))
        if complete and tune_cfg.final_model:
            best = study.best_trial
            reuse = search.kept[1] if search.kept and search.kept[0] == best.number else None
            out.update(final_model(prep, data_cfg, train_cfg, bias_cfg, tune_cfg, best, name, reuse))
        elif not complete:
            print(
                "no trial completed (all pruned or failed): nothing to register; re-run to add trials", file=sys.stderr
            )
        out["total_tuning_time_s"] = time.perf_counter() - t_start
        tracking.log_metrics({"total_tuning_time_s": out["total_tuning_time_s"]})
        tracking.set_description(
            describe(study, name, out, MlflowClient().get_run(parent.info.run_id).data.tags), "trials.csv"
        )
        if complete:
            print(
                f"best val_accuracy {out['best_val_accuracy']:.4f} (trial {int(out['best_trial_number'])}: "
                f"{_hparams(study.best_params)}), {int(out['n_trials_complete'])} complete, "
                f"{int(out['n_trials_pruned'])} pruned, {out['total_tuning_time_s']:.0f} s",
                file=sys.stderr,
            )
        print(tracking.ui_hint(parent), file=sys.stderr)
    return out


def _hparams(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def describe(study: optuna.Study, name: str, out: dict[str, float], tags: dict[str, str]) -> str:
    """The tune run's Description in the MLflow UI (markdown): the best configuration, the registered model,
    the trial counts and where the figures are."""
    lines = [
        f"**Optuna study** `{name}`: {int(out['n_trials_complete'])} complete, {int(out['n_trials_pruned'])} pruned, "
        f"{int(out['n_trials_failed'])} failed trials (nested runs below), objective: best val accuracy.",
        "",
    ]
    if "best_trial_number" not in out:
        return "\n".join([*lines, "No trial completed: nothing was registered. Re-run the same command to add trials."])
    best = study.best_trial
    lines += [
        md.table(
            ["", "lr", "momentum", "batch size", "val accuracy", "test accuracy"],
            [
                [
                    f"best trial {best.number}",
                    best.params["lr"],
                    best.params["momentum"],
                    best.params["batch_size"],
                    fmt(out["best_val_accuracy"], True),
                    fmt(out.get("test_accuracy", math.nan), True),
                ]
            ],
        ),
        "",
    ]
    if "registered_version" in tags:
        lines.append(
            f"Retrained once and tested: registered as **{tags['registered_model']} v{tags['registered_version']}** "
            f"(logged on this run); champion {'moved to it' if tags.get('champion_moved') == 'true' else 'kept'}: "
            f"{tags.get('champion_decision', '')}."
        )
    lines.append("Figures (optimisation history, parallel coordinates, importances...): Artifacts → `figures.html`.")
    return "\n".join(lines)
