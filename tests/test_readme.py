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
