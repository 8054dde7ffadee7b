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

import dataclasses
import math
import sys
import time
import warnings
from typing import Any, Callable

import mlflow
import optuna
import torch
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from bias_lab import config, facts, pipeline, pretrained, recorder, registry, studies, tracking
from bias_lab import markdown as md
from bias_lab.config import NOT_USED_BY, SEARCHED, TRAIN_ONLY, BiasConfig, DataConfig, TrainConfig, TuneConfig
from bias_lab.device import resolve_device, seed_everything
from bias_lab.errors import check, first_line
from bias_lab.markdown import fmt
from bias_lab.search import (
    FINISHED,
    Search,
    count,
    epochs_trained,
    fixed_settings,
    open_study,
    optimize,
    quiet_optuna,
    start_note,
    start_point,
)
from bias_lab.workers import WORKER

# ----------------------------------------------------------------------------------------------- summary


def _figures(study: optuna.Study, seed: int) -> dict[str, Callable[[], Any]]:
    """Optuna's figures, each titled with what it was built from: the parallel coordinates, contour and importances
    read completed trials only, so a region where trials were pruned can look like the best."""
    v = optuna.visualization
    trials = study.get_trials(deepcopy=False)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    only = f"{n_complete} completed trials" + (f"; {n_pruned} pruned trials not shown" if n_pruned else "")
    titled = lambda fig, what: fig.update_layout(title_text=f"{what} ({only})")  # noqa: E731
    return {
        "optimization_history": lambda: titled(v.plot_optimization_history(study), "Best val accuracy by trial"),
        "intermediate_values": lambda: v.plot_intermediate_values(study).update_layout(
            title_text="What the pruner compares: −(lowest val loss so far) per epoch",  # search._Pruning's report
            xaxis_title="epoch",
            yaxis_title="−(lowest val loss so far)",
        ),
        "parallel_coordinate": lambda: titled(v.plot_parallel_coordinate(study), "Settings and val accuracy"),
        "contour_lr_momentum": lambda: titled(
            v.plot_contour(study, params=["lr", "momentum"]), "Val accuracy over lr and momentum"
        ),
        "param_importances": lambda: titled(
            v.plot_param_importances(study, evaluator=_importance_evaluator(seed)), "What mattered"
        ),
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
    cfgs: tuple[DataConfig, TrainConfig, BiasConfig, TuneConfig],
    best: FrozenTrial,
    study_name: str,
    device: torch.device,
    kept: pipeline.Trained | None = None,
    n_complete: int = 0,
) -> dict[str, float]:
    """Test the best configuration once, log and register it in a child run tagged role=final; record test measures
    and the champion decision on the parent. Its weights are `kept`, the best trial's own when this process
    trained it (same settings, same seed: a retrain would give the same numbers); otherwise (another worker's
    trial, or a resumed study) it is retrained (train split, best-val epoch kept)."""
    data_cfg, train_cfg, bias_cfg, tune_cfg = cfgs
    cfg = dataclasses.replace(train_cfg, **best.params)
    tags = {
        "entry_point": "tune",
        "role": "final",
        "optuna_study": study_name,
        "optuna_trial": str(best.number),
        "worker": WORKER,
        "final_weights": f"trial {best.number}'s own, not retrained (same settings, same seed)"
        if kept
        else f"retrained: trial {best.number} was trained by another worker or an earlier run",
    }
    with tracking.run(f"final-{cfg.model}", nested=True, tags=tags, system_metrics=True) as child:
        recorder.setup(prep, data_cfg, cfg, bias_cfg, skip=TRAIN_ONLY)
        if kept is not None:
            trained = pipeline.tested(kept, prep)
        else:
            trained = pipeline.train(prep, cfg, device, on_epoch=recorder.epochs(prep))
        recorder.record(trained, history=kept is not None, model=False)  # the model: on the parent, registered
    check(
        trained.finite,
        f"the best configuration (trial {best.number}) has non-finite weights: nothing was "
        f"registered; {recorder.divergence_cause(cfg)}, or narrow the lr range (lr_max)",
    )
    out = trained.measures
    decision = _register(trained, prep, data_cfg, tune_cfg, best, study_name, child.info.run_id, n_complete)
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
    print(
        f"final model: test_accuracy {out.get('test_accuracy', math.nan):.4f}; registered {tune_cfg.registered_model} "
        f"v{decision['version']}; champion {'moved' if decision['moved'] else 'kept'}: {decision['reason']}",
        file=sys.stderr,
    )
    return {**tested, "final_val_accuracy": out["best_val_accuracy"], "champion_moved": float(decision["moved"])}


def _register(
    trained: pipeline.Trained,
    prep: pipeline.Prepared,
    data_cfg: DataConfig,
    tune_cfg: TuneConfig,
    best: FrozenTrial,
    study_name: str,
    final_run_id: str,
    n_complete: int,
) -> dict[str, Any]:
    """Log the final model on the tune run (so its page in the MLflow UI lists the registered version), register
    it, move `champion` if it beats the current one on this data, write the version's model card and the registered
    model's description; tag both runs with the decision."""
    cfg, parent, name = trained.cfg, tracking.active_run_id(), tune_cfg.registered_model
    info = tracking.log_model(trained.model, trained.meta)
    decision = registry.register_champion(
        info.model_uri,
        name,
        trained.meta.dataset_digest,
        trained.measures["best_val_accuracy"],
        registry.rounded(
            {
                "model": cfg.model,
                **{k: getattr(cfg, k) for k in SEARCHED},
                "image_size": data_cfg.image_size,
                "seed": cfg.seed,
                "optuna_study": study_name,
                "optuna_trial": best.number,
                "tune_run_id": parent,
                "final_run_id": final_run_id,
                "test_accuracy": trained.measures.get("test_accuracy", math.nan),
                "weights": cfg.weights,
                **({"pretrained": pretrained.CAVEAT} if cfg.weights != "none" else {}),
            }
        ),
    )
    found = facts.of_trained(trained, prep, name, decision["version"], study_name, best.number, n_complete)
    registry.describe_version(name, decision["version"], found, parent)
    registry.describe_registered_model(name)
    MlflowClient().set_tag(
        final_run_id,
        "registered_version",
        f"{tune_cfg.registered_model} v{decision['version']} (model logged on the tune run)",
    )
    mlflow.set_tags(
        {
            "final_run_id": final_run_id,
            "registered_model": tune_cfg.registered_model,
            "registered_version": decision["version"],
            "champion_version": str(decision["champion_version"]),
            "champion_moved": str(decision["moved"]).lower(),
            "champion_decision": decision["reason"],
        }
    )
    return decision


# ----------------------------------------------------------------------------------------------- the command


def run_tune(
    data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, tune_cfg: TuneConfig
) -> dict[str, float]:
    """The `tune` command; returns the parent run's metrics (best_val_accuracy, counts, test_accuracy...)."""
    t_start = time.perf_counter()
    quiet_optuna()
    config.validate("tune", data_cfg, train_cfg, bias_cfg, tune_cfg)  # before the storage, the data or a run
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    device = resolve_device(train_cfg.device)  # device=cuda without a usable GPU: one line, before any work
    storage, storage_desc = studies.open_storage(tune_cfg.storage)
    tracking.setup()
    seed_everything(train_cfg.seed, train_cfg.threads, train_cfg.deterministic)  # `threads` shapes prepare's sums
    prep = pipeline.prepare(data_cfg, bias_cfg, train_cfg.seed)
    name = tune_cfg.study_name.strip() or f"bias-lab-{train_cfg.model}-{prep.dataset.digest}"
    first = start_point(train_cfg, tune_cfg)
    study = open_study(storage, name, tune_cfg, fixed_settings(data_cfg, train_cfg, bias_cfg), train_cfg.seed, first)
    resumed = count(study, FINISHED)
    tags = {"entry_point": "tune", "optuna_study": name, "optuna_storage": storage_desc, "worker": WORKER}
    with tracking.run(f"tune-{train_cfg.model}", tags=tags, system_metrics=True) as parent:
        # the storage as described (password redacted): a URL's password must not become a run param
        recorder.setup(
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
            + start_note(study, first),
            file=sys.stderr,
        )
        search = Search(prep, train_cfg, tune_cfg, name, parent.info.run_id, device)
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
            kept = search.kept[1] if search.kept and search.kept[0] == best.number else None
            cfgs = (data_cfg, train_cfg, bias_cfg, tune_cfg)
            out.update(final_model(prep, cfgs, best, name, device, kept, complete))
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
    test = out.get("test_accuracy", math.nan)
    ci = (out.get("test_accuracy_ci_low", math.nan), out.get("test_accuracy_ci_high", math.nan))
    headline = f"**Best val accuracy {fmt(out['best_val_accuracy'], True)}** (trial {best.number})" + (
        f"; test accuracy **{fmt(test, True)}** [95% CI {fmt(ci[0], True)}, {fmt(ci[1], True)}]"
        if not math.isnan(test)
        else ""
    )
    if "registered_version" in tags:
        headline += f"; registered {tags['registered_model']} v{tags['registered_version']}" + (
            " (champion)" if tags.get("champion_moved") == "true" else ""
        )
    lines = [headline + ".", "", *lines]
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
