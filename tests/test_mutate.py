"""`python -m tests.mutate` itself, cheaply: every mutant still applies to the current code (fails when the code
moves, so the list is kept up to date), names tests that exist, and `--list` works. The mutation run is not part
of the default test run (it takes 15-25 min)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from . import mutate
from .mutate import MUTANTS, REPO, check_mutant


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies_exactly_once_and_changes_the_code(m: mutate.Mutant) -> None:
    assert check_mutant(m) == "", f"{m.name} is STALE: {check_mutant(m)}: update tests/mutate.py"
    assert m.old != m.new


def test_mutant_names_are_unique_and_their_tests_exist() -> None:
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        for node in m.tests:
            path, _, name = node.partition("::")
            assert (REPO / path).is_file(), (m.name, path)
            if name:
                assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), (m.name, node)


def test_list_prints_every_mutant() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.mutate", "--list"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert all(m.name in out.stdout for m in MUTANTS) and "STALE" not in out.stdout


def test_the_copy_is_what_gets_imported(tmp_path) -> None:
    """The mutants are planted in a copy: its bias_lab, not the editable install's, must be the one imported."""
    copy = mutate.make_copy(tmp_path / "repo")
    assert (copy / "bias_lab" / "__init__.py").is_file() and (copy / "tests" / "conftest.py").is_file()
    mutate.verify_import(copy)  # exits with a message otherwise
