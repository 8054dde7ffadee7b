"""The `bias-lab` command. Options are generated from bias_lab.config, so `--image-size` here, `image_size` in
MLproject and the logged param `image_size` are one setting. Bad input: one line on stderr, exit 2, no
traceback (`--debug` shows it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from typing import Any, Callable

import click

from bias_lab import config
from bias_lab.errors import UserError


class Integral(click.ParamType):
    """An integer that may be written as an integral float: MLproject declares integer parameters `float` (MLflow
    has no int type), so `mlflow run -P epochs=10.0` passes MLflow's check and must pass ours too."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
        try:
            f = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if not f.is_integer():
            self.fail(f"{value!r} is not an integer", param, ctx)
        return int(f)


def options(ep: config.EntryPoint) -> Callable:
    """Click options for every setting of the command `ep` (config.ENTRY_POINTS: MLproject is generated from the
    same entry, so an option and its MLflow parameter share name and default)."""

    def deco(f: Callable) -> Callable:
        for fld in reversed(ep.fields()):
            choices = fld.metadata.get("choices")
            kind = (
                click.Choice(choices)
                if choices
                else {bool: click.BOOL, int: Integral(), float: float}.get(type(fld.default), str)
            )
            f = click.option(
                f"--{fld.name.replace('_', '-')}",
                fld.name,
                type=kind,
                default=ep.default(fld),
                show_default=True,
                help=fld.metadata["help"],
            )(f)
        return f

    return deco


def make(cls: type, kwargs: dict[str, Any]) -> Any:
    """Pop the fields of `cls` out of the click kwargs (a field the command does not offer keeps its default)."""
    return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


class App(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        debug = ctx.params.get("debug") or os.environ.get("BIAS_LAB_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail_mlflow_run(str(e))
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:
            if debug:
                raise
            from bias_lab.shutdown import Terminated

            resumable = ctx.invoked_subcommand in ("train", "tune")  # a checkpoint / the Optuna study carry on
            click.echo(
                "interrupted: runs were ended as KILLED"
                + ("; re-run the same command to resume" if resumable else "; re-run the command to start again"),
                err=True,
            )
            ctx.exit(143 if isinstance(e, Terminated) else 130)  # 128 + the signal, as a shell reports it
        except click.UsageError as e:  # a bad option value: one line, not click's usage block
            _fail_mlflow_run(e.format_message())
            if debug:
                raise
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug, not bad input: still one line, with the way to see more
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            _fail_mlflow_run(f"{type(e).__name__}: {first}")
            if debug:
                raise
            click.echo(f"error: {type(e).__name__}: {first} (re-run with --debug for the traceback)", err=True)
            ctx.exit(1)


def _fail_mlflow_run(message: str) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID set) MLflow created the run before this process started: a command that
    stops before opening it (bad input, refused before any work) tags it `error` with its one-line message and ends
    it FAILED, so the run says why. A run that already ended (a failure inside it, recorded by tracking.run) is left
    as it is; a store that cannot be reached leaves the message on stderr only."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server: seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", message[:5000])
            client.set_terminated(run_id, "FAILED")
    except Exception:  # the store is what failed (its own one-line error says so)
        pass


def _quiet_libraries() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its bars would bury our one-line errors
    for name in ("alembic", "mlflow", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compare CNNs on an ImageNet subset, tune them, and measure how a shortcut channel biases them."""
    from bias_lab.distributed import launched
    from bias_lab.shutdown import install_signal_handlers

    _quiet_libraries()
    install_signal_handlers()
    if launched() and ctx.invoked_subcommand != "train":
        raise UserError(
            f"only train runs under torchrun; start `{ctx.invoked_subcommand}` without it "
            "(for tune, start several workers on one --storage: docs/scaling.md)"
        )


@main.command()
@options(config.ENTRY_POINTS["train"])
def train(**kw: Any) -> None:
    """Train one model; log params, curves, test accuracy (and DI on a binary task) and the model.

    Data-parallel on K GPUs or CPU processes: torchrun --nproc_per_node=K -m bias_lab.cli train ...
    """
    from bias_lab.train import run_train

    run_train(make(config.DataConfig, kw), make(config.TrainConfig, kw), make(config.BiasConfig, kw))


@main.command()
@options(config.ENTRY_POINTS["tune"])
def tune(**kw: Any) -> None:
    """Optuna search of lr, momentum and batch size on the val split; registers the champion."""
    from bias_lab.tune import run_tune

    run_tune(
        make(config.DataConfig, kw),
        make(config.TrainConfig, kw),
        make(config.BiasConfig, kw),
        make(config.TuneConfig, kw),
    )


@main.command("bias-eval")
@options(config.ENTRY_POINTS["bias_eval"])
def bias_eval(**kw: Any) -> None:
    """Train model_1 (clean) and model_2 (biased eps channel); compare accuracy and DI side by side."""
    from bias_lab.bias_eval import run_bias_eval

    run_bias_eval(
        make(config.DataConfig, kw),
        make(config.TrainConfig, kw),
        make(config.BiasConfig, kw),
        make(config.BiasEvalConfig, kw),
    )


@main.command("kaggle-submit")
@options(config.ENTRY_POINTS["kaggle_submit"])
def kaggle_submit(**kw: Any) -> None:
    """Predict the unlabelled test folder with a registered model and write a validated Kaggle CSV."""
    from bias_lab.kaggle_submit import run_submit

    run_submit(make(config.DataConfig, kw), make(config.SubmitConfig, kw))


@main.command("bias-sweep")
@options(config.ENTRY_POINTS["bias_sweep"])
def bias_sweep(**kw: Any) -> None:
    """DI and accuracy of model_2 over a grid of p1-p0 and sigma: how strong must a shortcut be to be taken?"""
    from bias_lab.bias_sweep import run_sweep

    run_sweep(make(config.DataConfig, kw), make(config.TrainConfig, kw), make(config.SweepConfig, kw))


@main.command()
@options(config.EntryPoint("report", (config.ReportConfig,)))
def report(**kw: Any) -> None:
    """Write one self-contained HTML (+ markdown) report of the tracked train, tune and bias_eval runs."""
    from bias_lab.report import run_report

    run_report(make(config.ReportConfig, kw))


def entrypoint(command: str) -> None:
    """`python entrypoints/<name>.py ...` == `bias-lab <command> ...` (what MLproject runs)."""
    sys.exit(main.main([command, *sys.argv[1:]], prog_name=f"bias-lab {command}", standalone_mode=True))


if __name__ == "__main__":
    main()
