"""Smoke run of the benchmark scripts on tiny generated data, so they do not rot. Nothing here is timed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

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
