"""MLproject and the README's parameter tables are generated from bias_lab/config.py; this keeps them true.

Regenerate after adding a setting: `python -m bias_lab.config --write`.
"""

from __future__ import annotations

from bias_lab import config


def test_mlproject_and_readme_parameter_tables_are_generated_from_config() -> None:
    stale = [p.name for p, text in config.generated().items() if p.read_text() != text]
    assert not stale, f"{stale} stale: run `python -m bias_lab.config --write`"


def test_check_fails_on_a_stale_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text((config.REPO / "README.md").read_text().replace("| `lr` |", "| `lr_old` |"))
    (tmp_path / "MLproject").write_text(config.render_mlproject())
    monkeypatch.setattr(config, "REPO", tmp_path)
    assert config.main(["--check"]) == 1
    assert config.main(["--write"]) == 0 and config.main(["--check"]) == 0
    assert "| `lr` |" in (tmp_path / "README.md").read_text()


def test_every_table_in_the_readmes_has_the_same_number_of_cells_in_every_row() -> None:
    """A bare `|` inside a cell (the generated help 'P(S=1 | y=0)') splits it in two: GitHub shows a broken row."""
    from .test_quickstart import assert_tables_well_formed

    for name in ("README.md", "benchmarks/README.md"):
        assert assert_tables_well_formed((config.REPO / name).read_text(), name) >= 5


def test_every_mlflow_run_command_in_the_readmes_names_an_entry_point_and_its_parameters() -> None:
    """A README command with a misspelt entry point or -P name fails in the user's terminal, after the install."""
    import re

    checked = 0
    for name in ("README.md", "benchmarks/README.md"):
        for line in (config.REPO / name).read_text().splitlines():
            m = re.search(r"mlflow run \. -e (\w+)(.*)", line)
            if not m:
                continue
            ep = config.ENTRY_POINTS.get(m[1])
            assert ep is not None, f"{name}: no entry point '{m[1]}' in: {line}"
            known = {f.name for f in ep.fields()}
            for key in re.findall(r"-P (\w+)=", m[2].split("#")[0]):
                assert key in known, f"{name}: entry point {m[1]} has no parameter '{key}': {line}"
            checked += 1
    assert checked >= 10
