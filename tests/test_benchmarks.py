"""Smoke run of the benchmark scripts on tiny generated data, so they do not rot, and the rules they share: their
options are bias_lab's settings (benchmarks/common.py), their data comes from --data or $BIAS_LAB_DATA. Nothing here
is timed."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bias_lab import cli, config

from .conftest import REPO

BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
TARGETS = (
    "bias_lab/naive LeNet@64",
    "bias_lab/naive ResNet-18@64",
    "bias_lab/compute-bound ResNet-18@64",
    "cached reload / first decode",
    "MLflow per-epoch logging overhead",
)


@pytest.mark.slow
def test_bench_epoch_quick_prints_every_target() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_epoch.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| measurement | variant | img/s (wall) | img per CPU-s |" in out
    for variant in (
        "naive:",
        "bias_lab:",
        "compute bound, bias_lab's",
        "compute bound, textbook",
        "first decode",
        "cached re-load",
    ):
        assert variant in out, variant
    for target in TARGETS:
        assert re.search(
            rf"^TARGET {re.escape(target)} [<>]= [\d.]+x?%?: -?[\d.]+x?%? (PASS|FAIL)( \(per CPU-second: [\d.]+x?\))?$",
            out,
            re.M,
        ), target


@pytest.mark.slow
def test_bench_ddp_quick_compares_one_and_two_processes() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_ddp.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d) \| (\d) \| [\d,.]+ \|", proc.stdout, re.M)
    assert rows == [("1", "1"), ("2", "2")], proc.stdout  # the torchrun side really ran 2 ranks (world_size logged)
    assert re.search(
        r"^1 -> 2 processes \(median of 1, cpu\): [\d,.]+ -> [\d,.]+ images/s \([\d.]+x\)", proc.stdout, re.M
    )


def test_bench_recipes_prints_one_line_per_recipe(kaggle_data: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_recipes.py"),
            "--data",
            str(kaggle_data),
            "lenet 1",
            "lenet 1 --tta false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["recipe"] for r in lines] == ["lenet 1", "lenet 1 --tta false"]
    assert 0 <= lines[0]["test_no_tta"] <= 1 and lines[1]["test_no_tta"] != lines[1]["test_no_tta"]  # NaN: no tta


def load_common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_options_are_bias_labs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name, type, choices and help from bias_lab.config, a benchmark's own default where it gives one; what the
    options parse to is what `bias-lab train` parses from the same flags."""
    common = load_common()
    monkeypatch.delenv("BIAS_LAB_DATA", raising=False)
    ap = common.parser("doc", "data", "model", "epochs", "lr", "augment", "seed", epochs=3)
    args = ap.parse_args([])
    assert (args.data, args.model, args.epochs, args.lr, args.augment) == ("", "lenet", 3, config.TrainConfig.lr, True)
    args = ap.parse_args(["--model", "resnet18", "--epochs", "5", "--lr", "0.1", "--augment", "false", "--seed", "7"])
    assert (args.model, args.epochs, args.lr, args.augment, args.seed) == ("resnet18", 5, 0.1, False, 7)
    ctx = cli.train.make_context("train", common.flags(args, "model", "epochs", "lr", "augment", "seed"))
    assert {k: ctx.params[k] for k in ("model", "epochs", "lr", "augment", "seed")} == {
        "model": "resnet18",
        "epochs": 5,
        "lr": 0.1,
        "augment": False,
        "seed": 7,
    }
    for bad in (["--model", "vgg"], ["--epochs", "many"], ["--augment", "maybe"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)
    text = ap.format_help()
    assert "architecture (default: lenet)" in text and "passes over the train split (default: 3)" in text


def test_data_comes_from_the_flag_or_bias_lab_data(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    common = load_common()
    monkeypatch.setenv("BIAS_LAB_DATA", "from/env")
    ap = common.parser("doc", "data")
    assert common.need_data(ap, ap.parse_args([])) == "from/env"
    assert common.need_data(ap, ap.parse_args(["--data", "from/flag"])) == "from/flag"
    monkeypatch.delenv("BIAS_LAB_DATA")
    ap = common.parser("doc", "data")
    with pytest.raises(SystemExit) as exit_:
        common.need_data(ap, ap.parse_args([]))
    assert exit_.value.code == 2 and "--data is required" in capsys.readouterr().err


def test_a_benchmark_without_data_says_how_to_give_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "BIAS_LAB_DATA"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_recipes.py"), "lenet 1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].endswith("e.g. --data path/to/tiny4 (or set BIAS_LAB_DATA)"), proc.stderr


def test_no_benchmark_redeclares_a_setting() -> None:
    """A config setting reaches a benchmark's command line only through common.parser / common.setting."""
    own = {("bench_workers.py", "threads")}  # torch threads per worker, or 'auto': not train's `threads`
    settings = set(load_common().SETTINGS)
    found = []
    for path in BENCHMARKS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
                flag = node.args[0]
                if isinstance(flag, ast.Constant) and str(flag.value).startswith("--"):
                    name = str(flag.value)[2:].replace("-", "_")
                    if name in settings and (path.name, name) not in own:
                        found.append(f"{path.name}: {flag.value}")
    assert not found, f"declare these with common.parser/common.setting: {found}"


def test_benchmarks_name_no_machine_path_or_work_item() -> None:
    """The benchmarks speak of the project: no path of one machine, no issue or section number, no work round."""
    pattern = re.compile(r"/work/|/home/|\bissue \d|§|\bsession\b|\bround \d", re.I)
    found = [
        f"{path.name}:{i}: {line.strip()}"
        for path in [*BENCHMARKS, REPO / "tests" / "test_bench_accuracy.py"]
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
