"""The `tune` command against a real MLflow sqlite store and real Optuna storage: nesting, pruning, resume
(Ctrl-C and SIGKILL), parallel workers, the champion rule, and that the search never reads the test split."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from bias_lab import config, pipeline, registry, search, studies, tracking, workers
from bias_lab.data import load
from bias_lab.errors import UserError
from bias_lab.models import ModelMeta, build
from bias_lab.tracking import load_model

from .conftest import all_runs, figures_page, invoke


def tiny(data: Path, *extra: str) -> list[str]:
    """A tune command on tiny data: LeNet at 32 px, 1 thread (tests may run 2 at a time on 2 cores)."""
    return ["tune", "--data", str(data), "--image-size", "32", "--model", "lenet", "--threads", "1", *extra]


def study_at(path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def parent_and_children(client: mlflow.MlflowClient) -> tuple[list, dict[str, list]]:
    runs = all_runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    assert sum(map(len, kids.values())) + len(parents) == len(runs)  # no run outside the parent/child tree
    return parents, kids


class OddPruner(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report: a pruner that surely prunes, deterministically."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number % 2 == 1


def test_nested_runs_pruning_summary_and_registry(kaggle_data: Path, client, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(search, "make_pruner", lambda name, epochs: OddPruner())
    # MLflow samples every 10 s by default: this tune lasts a second or two, so sample often and log each sample
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    code, out = invoke(*tiny(kaggle_data, "--epochs", "2", "--n-trials", "3", "--study-name", "s"))
    assert code == 0, out
    [parent], kids = parent_and_children(client)
    children = kids[parent.info.run_id]
    trials = {int(r.data.tags["optuna_trial"]): r for r in children if r.data.tags["role"] == "trial"}
    [final] = [r for r in children if r.data.tags["role"] == "final"]
    assert sorted(trials) == [0, 1, 2] and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in [parent, *children])  # pruned trials are not FAILED runs
    assert [trials[n].data.tags["state"] for n in (0, 1, 2)] == ["complete", "pruned", "complete"]
    steps = lambda r: [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")]  # noqa: E731
    assert steps(trials[0]) == [1, 2] and steps(trials[1]) == [1]  # pruning stopped training after epoch 1

    study = study_at(tmp_path / "optuna.journal", "s")  # default storage: next to the MLflow db
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    d = config.TrainConfig()
    assert study.trials[0].params == {"lr": d.lr, "momentum": d.momentum, "batch_size": d.batch_size}  # the defaults
    assert len({tuple(t.params.values()) for t in study.trials}) == 3 and "trial 0 is the defaults" in out
    assert [t.user_attrs["mlflow_run_id"] for t in study.trials] == [trials[n].info.run_id for n in (0, 1, 2)]
    for t in study.trials:  # each child logs its trial's sampled params
        p = trials[t.number].data.params
        assert (float(p["lr"]), float(p["momentum"]), int(p["batch_size"])) == (
            t.params["lr"],
            t.params["momentum"],
            t.params["batch_size"],
        )

    m, p = parent.data.metrics, parent.data.params
    assert (m["n_trials_complete"], m["n_trials_pruned"], m["n_trials_failed"]) == (2, 1, 0)
    assert m["best_val_accuracy"] == study.best_value and m["epochs_trained"] == 5
    assert (
        float(p["best_lr"]) == study.best_params["lr"] and int(p["best_batch_size"]) == study.best_params["batch_size"]
    )
    assert (
        0 <= m["test_accuracy"] <= 1 and m["total_tuning_time_s"] > 0 and "test_accuracy" not in trials[0].data.metrics
    )
    assert "system/cpu_utilization_percentage" in m and not any(k.startswith("system/") for k in trials[0].data.metrics)
    page = figures_page(
        client,
        parent.info.run_id,
        {"optimization_history", "intermediate_values", "parallel_coordinate", "contour_lr_momentum"},
    )
    contour = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/figures/contour_lr_momentum.json"))
    assert "(2 completed trials; 1 pruned trials not shown)" in contour["layout"]["title"]["text"], page[:0]
    assert not {"lr", "momentum", "batch_size", "resume"} & set(
        p
    )  # searched or unused: the tune run did not use one value
    assert (
        f"best trial {study.best_trial.number}" in parent.data.tags["mlflow.note.content"]
    )  # the run page's Description
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.csv").splitlines()
    assert len(table) == 4 and "params_lr" in table[0] and "PRUNED" in table[2]
    browsable = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.json"))  # mlflow.log_table
    assert len(browsable["data"]) == 3 and "duration_s" in browsable["columns"]  # seconds: JSON has no timedelta
    value, state = browsable["columns"].index("value"), browsable["columns"].index("state")
    assert all((row[value] is None) == (row[state] != "COMPLETE") for row in browsable["data"])  # no loss as accuracy

    mv = client.get_model_version_by_alias("bias-lab", "champion")  # first model on this data: champion
    # the model is logged on the tune run itself: its page lists the registered version
    assert str(mv.version) == "1" and mv.run_id == parent.info.run_id and parent.data.tags["champion_moved"] == "true"
    assert mv.tags["final_run_id"] == final.info.run_id and "bias-lab v1" in parent.data.tags["mlflow.note.content"]
    digest = load(config.DataConfig(data=str(kaggle_data), image_size=32)).digest
    assert (
        mv.tags["data_digest"] == digest and float(mv.tags["val_accuracy"]) == final.data.metrics["best_val_accuracy"]
    )
    assert final.data.metrics["best_val_accuracy"] == study.best_value
    assert "not retrained" in final.data.tags["final_weights"]  # trial 2's own weights and curves
    best = trials[study.best_trial.number].info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(final.info.run_id, "val_loss")] == [
        (m.step, m.value) for m in client.get_metric_history(best, "val_loss")
    ]
    hp, uri = registry.champion_hparams("bias-lab", (digest,), "lenet")  # what bias_eval reads back from the registry
    assert hp == study.best_params and uri == "models:/bias-lab/1"
    # the version and the registered model say what they are: the card, its summary, rounded tags
    assert mv.description.startswith("**bias-lab v1**: LeNet on 4 classes (1=disc, 2=cross")  # names: classes.csv
    assert mv.description.rstrip().endswith(f"`runs:/{parent.info.run_id}/model_card.md`")
    card_md = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/model_card.md")
    assert "## Can I trust this model?" in card_md and f"trial {study.best_trial.number} of Optuna study s" in card_md
    assert "champion" in client.get_registered_model("bias-lab").description
    assert len(mv.tags["test_accuracy"]) <= 6  # rounded for people; the run keeps the exact number


def test_the_final_model_is_the_best_trials_own_and_a_retrain_gives_the_same_weights(
    kaggle_data: Path, client, tmp_path: Path
) -> None:
    """The final run records the best trial's weights instead of training them again; when the trial was trained by
    an earlier run (a re-run of a full study), it retrains, to the same weights (same settings, seed and threads)."""
    args = tiny(kaggle_data, "--epochs", "2", "--n-trials", "1", "--study-name", "again")
    assert invoke(*args)[0] == 0
    assert invoke(*args)[0] == 0  # the study is full: no trial, only the final model, retrained
    finals = sorted(
        (r for r in all_runs(client) if r.data.tags.get("role") == "final"), key=lambda r: r.info.start_time
    )
    assert ["not retrained" in r.data.tags["final_weights"] for r in finals] == [True, False]
    assert "trained by another worker or an earlier run" in finals[1].data.tags["final_weights"]
    (a, _), (b, _) = load_model("models:/bias-lab/1"), load_model("models:/bias-lab/2")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    history = lambda r: [m.value for m in client.get_metric_history(r.info.run_id, "val_loss")]  # noqa: E731
    assert history(finals[0]) == history(finals[1]) and len(history(finals[0])) == 2


def test_diverged_trial_is_pruned_not_a_crash(kaggle_data: Path, client, tmp_path: Path) -> None:
    """lr = 1e30 makes the loss non-finite: the trial ends pruned with the reason, nothing is registered, exit 0."""
    code, out = invoke(
        *tiny(
            kaggle_data,
            "--epochs",
            "2",
            "--n-trials",
            "1",
            "--lr-min",
            "1e30",
            "--lr-max",
            "1e31",
            "--batch-sizes",
            "16",
            "--study-name",
            "d",
        )
    )
    assert code == 0 and "nothing to register" in out, out
    [trial] = study_at(tmp_path / "optuna.journal", "d").trials
    assert trial.state == TrialState.PRUNED
    [parent], kids = parent_and_children(client)
    [child] = kids[parent.info.run_id]
    assert (
        child.info.status == "FINISHED"
        and child.data.tags["state"] == "pruned"
        and "non-finite" in child.data.tags["pruned_reason"]
    )
    assert (
        parent.info.status == "FINISHED"
        and parent.data.metrics["n_trials_pruned"] == 1
        and "best_val_accuracy" not in parent.data.metrics
    )
    assert client.search_registered_models() == []


def test_ctrl_c_keeps_finished_trials_and_rerun_resumes(kaggle_data: Path, client, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C in trial 2: trials 0-1 kept, trial 2 failed, best so far logged; re-run with n_trials=4 completes it.
    This study uses an RDB URL (sqlite) to cover that storage too."""
    args = tiny(
        kaggle_data,
        "--epochs",
        "2",
        "--pruner",
        "none",
        "--storage",
        "sqlite:///optuna.db",
        "--study-name",
        "s",
        "--final-model",
        "false",
    )
    real, calls = pipeline.train, []

    def ctrl_c_in_third_trial(prep, cfg, *args, **kw):
        calls.append(cfg)
        if len(calls) == 3:
            kw["on_epoch"] = lambda epoch, m: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(prep, cfg, *args, **kw)

    monkeypatch.setattr(pipeline, "train", ctrl_c_in_third_trial)
    code, out = invoke(*args, "--n-trials", "3")
    assert code == 130 and "interrupted" in out, out
    study = optuna.load_study(study_name="s", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    before = [(t.number, t.value, t.datetime_complete) for t in study.trials[:2]]
    [parent], kids = parent_and_children(client)
    assert parent.info.status == "KILLED" and parent.data.metrics["n_trials_complete"] == 2
    assert parent.data.metrics["best_val_accuracy"] == study.best_value  # the best so far was logged
    assert sorted(r.info.status for r in kids[parent.info.run_id]) == ["FINISHED", "FINISHED", "KILLED"]

    monkeypatch.setattr(pipeline, "train", real)
    code, out = invoke(*args, "--n-trials", "4")
    assert code == 0, out
    study = optuna.load_study(study_name="s", storage="sqlite:///optuna.db")
    assert [(t.number, t.value, t.datetime_complete) for t in study.trials[:2]] == before  # kept, not redone
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    parents, kids = parent_and_children(client)
    [second] = [p for p in parents if p.info.status == "FINISHED"]
    assert len(kids[second.info.run_id]) == 2 and second.data.metrics["n_trials_complete"] == 4
    assert "RUNNING" not in {r.info.status for r in all_runs(client)}


def test_sigkill_mid_trial_then_rerun(kaggle_data: Path, client, tmp_path: Path) -> None:
    """A worker killed with SIGKILL mid-trial: the re-run keeps the completed trial, fails the interrupted one
    (and retries its params once), and ends the dead worker's MLflow runs KILLED."""
    args = tiny(
        kaggle_data,
        "--epochs",
        "30",
        "--pruner",
        "none",
        "--n-trials",
        "2",
        "--study-name",
        "k",
        "--final-model",
        "false",
    )
    env = {**os.environ, "BIAS_LAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bias_lab.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal, deadline = tmp_path / "optuna.journal", time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                trials = study_at(journal, "k").trials
            except KeyError:  # the study is not created yet
                trials = []
            if trials:
                running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
                if any(t.state == TrialState.COMPLETE for t in trials) and running:
                    break  # mid-training of trial 1, with trial 0 complete
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    study = study_at(journal, "k")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING], "not killed mid-trial"
    completed, killed = study.trials
    status = {r.info.run_id: r.info.status for r in all_runs(client)}
    assert (
        status[killed.user_attrs["mlflow_run_id"]] == status[killed.user_attrs["mlflow_parent_run_id"]] == "RUNNING"
    )  # SIGKILL

    code, out = invoke(*args)
    assert code == 0, out
    study = study_at(journal, "k")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert (study.trials[0].value, study.trials[0].datetime_complete) == (completed.value, completed.datetime_complete)
    retry = study.trials[2]
    assert retry.system_attrs["failed_trial"] == killed.number and retry.params == killed.params  # re-queued once
    statuses = {r.info.run_id: r.info.status for r in all_runs(client)}
    assert "RUNNING" not in statuses.values()
    assert (
        statuses[killed.user_attrs["mlflow_run_id"]] == statuses[killed.user_attrs["mlflow_parent_run_id"]] == "KILLED"
    )


def test_two_workers_share_one_journal(kaggle_data: Path, client, tmp_path: Path) -> None:
    mlflow.set_experiment("bias-lab")  # the store exists before the workers start (as after any first run)
    shared = tmp_path / "shared.journal"
    args = tiny(
        kaggle_data,
        "--epochs",
        "1",
        "--pruner",
        "none",
        "--n-trials",
        "4",
        "--storage",
        str(shared),
        "--study-name",
        "w",
        "--final-model",
        "false",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bias_lab.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trials = study_at(shared, "w").trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len({t.number for t in done}) == 4
    assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE)  # nothing else failed
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4  # workers did not propose the same points
    parents, kids = parent_and_children(client)
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in all_runs(client))
    children = [r for p in parents for r in kids[p.info.run_id]]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(t.number for t in done)


def test_champion_moves_only_on_improvement(client) -> None:
    mlflow.set_experiment("registry")
    with mlflow.start_run():
        info = tracking.log_model(build("lenet", 1, 4, 32), ModelMeta("lenet", 1, 32, 0.5, 0.25, list("abcd")))
    champion = lambda: str(client.get_model_version_by_alias("m", "champion").version)  # noqa: E731

    def register(digest: str, val: float) -> dict:
        return registry.register_champion(info.model_uri, "m", digest, val, {"model": "lenet"})

    assert register("d1", 0.5)["moved"] and champion() == "1"
    d = register("d1", 0.4)
    assert (
        not d["moved"]
        and champion() == "1"
        and d["baseline_val_accuracy"] == 0.5
        and "0.4000 <= 0.5000 of v1" in d["reason"]
    )
    assert not register("d1", 0.5)["moved"] and champion() == "1"  # a tie does not beat
    assert register("d1", 0.6)["moved"] and champion() == "4"
    d = register("d2", 0.1)  # other data: nothing to compare with, so it becomes champion (and says so)
    assert d["moved"] and champion() == "5" and "other data d1" in d["reason"]
    d = register("d1", 0.55)  # compared with d1's best (v4, 0.6), not with the d2 champion
    assert not d["moved"] and str(d["baseline_version"]) == "4" and champion() == "5"
    assert (
        client.get_model_version("m", "6").tags["val_accuracy"] == "0.55"
        and client.get_model_version("m", "6").tags["data_digest"] == "d1"
    )


def test_search_never_reads_the_test_split(kaggle_data: Path, client, tmp_path: Path, monkeypatch) -> None:
    """Poisoning the test split (inverted images, shifted labels) leaves every trial identical, and the test
    measures run once, after the study is complete."""
    common = tiny(kaggle_data, "--epochs", "1", "--pruner", "none", "--n-trials", "2")
    assert invoke(*common, "--study-name", "clean", "--final-model", "false")[0] == 0
    real_prepare, real_measure, measured = pipeline.prepare, pipeline.measure, []

    def poisoned(*a, **k):
        prep = real_prepare(*a, **k)
        t = prep.test
        prep.test = dataclasses.replace(t, images=255 - t.images, labels=(t.labels + 1) % len(prep.dataset.classes))
        return prep

    def spy(*a, **k):
        measured.append([t.state for t in study_at(tmp_path / "optuna.journal", "poisoned").trials])
        return real_measure(*a, **k)

    monkeypatch.setattr(pipeline, "prepare", poisoned)
    monkeypatch.setattr(pipeline, "measure", spy)
    code, out = invoke(*common, "--study-name", "poisoned")
    assert code == 0, out
    clean, dirty = (
        study_at(tmp_path / "optuna.journal", "clean").trials,
        study_at(tmp_path / "optuna.journal", "poisoned").trials,
    )
    assert [(t.params, t.value) for t in clean] == [(t.params, t.value) for t in dirty]
    assert measured == [[TrialState.COMPLETE, TrialState.COMPLETE]]  # once, after the search


@pytest.mark.parametrize(
    "args,message",
    [
        (["--storage", "sqlite:////no-such-dir/optuna.db"], "cannot open the Optuna storage"),
        (["--storage", "/no-such-dir/optuna.journal"], "does not exist"),
        (["--lr-min", "0"], "0 < lr_min <= lr_max"),
        (["--lr-max", "inf"], "use finite 0 < lr_min <= lr_max"),
        (["--lr-max", "nan"], "use finite 0 < lr_min <= lr_max"),
        (["--timeout", "nan"], "timeout=nan"),
        (["--weight-decay", "inf"], "weight_decay=inf"),
        (["--seed", "-1"], "seed=-1"),
        (["--batch-sizes", "32,x"], "batch_sizes='32,x'"),
    ],
)
def test_bad_tune_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = invoke("tune", *args)
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1 and message in out, out
    assert (
        not (tmp_path / "optuna.journal").exists() and not (tmp_path / "cache").exists()
    )  # rejected before storage and data
    assert all_runs(mlflow.MlflowClient()) == []


@pytest.mark.parametrize(
    "content",
    [
        b"garbage\xff\x00\n",
        b"not json\n",
        b'{"op_code": 99}\n',
        b'{"a": 1}\n',
        b"[1, 2]\n",
        b'{"op_code": 0, "worker_id": "x"}\n',
    ],
)
def test_a_file_that_is_no_journal_is_one_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "j.journal").write_bytes(content)
    code, out = invoke("tune", "--storage", str(tmp_path / "j.journal"))
    assert code == 2 and out.count("\n") == 1 and "is not an Optuna journal" in out and "--debug" not in out, out
    assert (tmp_path / "j.journal").read_bytes() == content and all_runs(mlflow.MlflowClient()) == []


def test_the_default_pruner_prunes_a_clearly_worse_trial() -> None:
    """The real median pruner (no stand-in): after 3 good trials, one reporting a far worse value is pruned at once."""
    study = optuna.create_study(
        direction="maximize", pruner=search.make_pruner("median", 6), sampler=optuna.samplers.RandomSampler(0)
    )
    for _ in range(3):
        t = study.ask()
        for epoch in range(1, 7):
            t.report(-0.5 + 0.01 * epoch, epoch)
        study.tell(t, 0.9)
    bad = study.ask()
    pruned_at = None
    for epoch in range(1, 7):
        bad.report(-5.0, epoch)
        if bad.should_prune():
            pruned_at = epoch
            break
    assert pruned_at is not None and pruned_at <= 3, pruned_at
    assert not search.make_pruner("none", 6).prune(study, study.trials[-1])


def test_resume_refuses_other_fixed_settings(kaggle_data: Path, monkeypatch) -> None:
    storage, _ = studies.open_storage("")
    study = search.open_study(storage, "f", config.TuneConfig(), {"epochs": 2, "image_size": 32}, 0)
    assert study.user_attrs["fixed_settings"] == {"epochs": 2, "image_size": 32}
    search.open_study(
        storage, "f", config.TuneConfig(n_trials=50), {"epochs": 2, "image_size": 32}, 0
    )  # more trials: fine
    with pytest.raises(UserError, match=r"epochs=2 \(now 3\).*new --study-name"):
        search.open_study(storage, "f", config.TuneConfig(), {"epochs": 3, "image_size": 32}, 0)


def test_worker_liveness() -> None:
    assert not workers.worker_dead(workers.WORKER)  # this process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = workers.WORKER.split(":")[0]
    assert workers.worker_dead(f"{host}:{dead.pid}:1")
    assert not workers.worker_dead(f"other-host:{dead.pid}:1") and not workers.worker_dead("")


@pytest.mark.slow
def test_pruning_benchmark_runs(capsys) -> None:
    """benchmarks/bench_pruning.py --quick (generated data, 3 trials of 2 epochs) prints both target lines."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pruning.py"
    argv = sys.argv
    sys.argv = [str(script), "--quick", "--threads", "1"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "| none |" in out and "| median |" in out
    assert (
        "TARGET pruning keeps best val accuracy within 1 point" in out
        and "TARGET pruning trains >= 2x fewer epochs" in out
    )


def test_trial_0_is_the_defaults_and_only_inside_the_search_space() -> None:
    base, space = config.TrainConfig(lr=0.05, momentum=0.9, batch_size=32), config.TuneConfig()
    first = search.start_point(base, space)
    assert first == {"lr": 0.05, "momentum": 0.9, "batch_size": 32}
    study = optuna.create_study(direction="maximize", sampler=search.make_sampler(0, 20, first))
    points = []
    for _ in range(3):
        t = study.ask()
        search.suggest(t, base, space)
        points.append(t.params)
        study.tell(t, 0.5)
    assert points[0] == first and first not in points[1:]
    for outside in (dict(lr_max=0.01), dict(momentum_max=0.5), dict(batch_sizes="64,128")):
        assert search.start_point(base, dataclasses.replace(space, **outside)) is None


def test_a_resumed_study_draws_what_an_uninterrupted_one_would() -> None:
    """TrialSeededTPE re-seeds Optuna's private RNGs (TPESampler._rng, its random sampler's _rng) per trial number.
    Guards that access against the Optuna versions pyproject allows: if those attributes move, a new process on an
    existing study would restart the random stream and re-propose trial 0's point as trial 3's."""

    def draws(study: optuna.Study, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = study.ask()
            out.append(t.suggest_float("x", 0.0, 1.0))
            study.tell(t, out[-1])
        return out

    whole = draws(optuna.create_study(sampler=search.make_sampler(7, 12)), 5)
    storage = optuna.storages.InMemoryStorage()
    first = draws(optuna.create_study(storage=storage, study_name="s", sampler=search.make_sampler(7, 12)), 3)
    resumed = draws(optuna.load_study(storage=storage, study_name="s", sampler=search.make_sampler(7, 12)), 2)
    assert first + resumed == whole
    assert len(set(whole)) == 5
    assert draws(optuna.create_study(sampler=search.make_sampler(8, 12)), 5) != whole


def test_a_requeued_trial_taken_by_a_live_worker_is_not_failed_as_the_dead_workers(tmp_path: Path) -> None:
    """Optuna's retry copies the failed trial's user attrs into the re-queued one: until its new worker writes its
    own, it names the dead worker. A second recovery in that window failed the live worker's trial ('Cannot tell a
    FAIL trial', seen once in the two-worker PostgreSQL test)."""
    import socket

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    dead = f"{socket.gethostname()}:4194000:1.00"  # this host, a pid that does not run
    first = study.ask()
    first.set_user_attr("worker", dead)
    first.set_user_attr("worker_of", first.number)
    assert studies.recover(study, "s") == [first.number]  # failed, its params re-queued
    taken = study.ask()  # a live worker takes the copy; its objective has not written its attrs yet
    assert taken.number != first.number and study.trials[taken.number].user_attrs["worker"] == dead
    studies.recover(study, "s")
    assert study.trials[taken.number].state == TrialState.RUNNING
