"""MLproject and docs/parameters.md's tables are generated from bias_lab/config.py; this keeps them true, and keeps
the README's links, the tables and the `mlflow run` commands of every markdown page the project ships sound.

Regenerate after adding a setting: `python -m bias_lab.generate --write`.
"""

from __future__ import annotations

import re
from pathlib import Path

from bias_lab import config, generate

PAGES = ("README.md", "benchmarks/README.md", *sorted(f"docs/{p.name}" for p in (config.REPO / "docs").glob("*.md")))


def test_mlproject_and_the_parameter_tables_are_generated_from_config() -> None:
    stale = [str(p.relative_to(generate.REPO)) for p, text in generate.generated().items() if p.read_text() != text]
    assert not stale, f"{stale} stale: run `python -m bias_lab.generate --write`"


def test_check_fails_on_a_stale_file(tmp_path: Path, monkeypatch) -> None:
    page = config.REPO / generate.PARAMETERS
    (tmp_path / "docs").mkdir()
    (tmp_path / generate.PARAMETERS).write_text(page.read_text().replace("| `lr` |", "| `lr_old` |"))
    (tmp_path / "MLproject").write_text(generate.render_mlproject())
    monkeypatch.setattr(generate, "REPO", tmp_path)
    assert generate.main(["--check"]) == 1
    assert generate.main(["--write"]) == 0 and generate.main(["--check"]) == 0
    assert "| `lr` |" in (tmp_path / generate.PARAMETERS).read_text()


def test_the_parameter_page_lists_every_setting_of_every_entry_point() -> None:
    text = (config.REPO / generate.PARAMETERS).read_text()
    missing = {f"{name}.{f.name}" for name, ep in config.ENTRY_POINTS.items() for f in ep.fields()}
    missing = {m for m in missing if f"| `{m.split('.', 1)[1]}` |" not in text}
    assert not missing, f"not in {generate.PARAMETERS}: {sorted(missing)}"


def test_every_table_in_the_docs_has_the_same_number_of_cells_in_every_row() -> None:
    """A bare `|` inside a cell (the generated help 'P(S=1 | y=0)') splits it in two: GitHub shows a broken row."""
    from .test_quickstart import assert_tables_well_formed

    found = {name: assert_tables_well_formed((config.REPO / name).read_text(), name) for name in PAGES}
    assert found["README.md"] >= 2 and found["benchmarks/README.md"] >= 5, found
    assert found[str(generate.PARAMETERS)] >= 8, found  # one generated table per settings group
    assert sum(found.values()) >= 25, found


def test_every_mlflow_run_command_in_the_docs_names_an_entry_point_and_its_parameters() -> None:
    """A documented command with a misspelt entry point or -P name fails in the user's terminal, after the install."""
    checked = {name: 0 for name in PAGES}
    for name in PAGES:
        for line in (config.REPO / name).read_text().splitlines():
            m = re.search(r"mlflow run \. -e (\w+)(.*)", line)
            if not m:
                continue
            ep = config.ENTRY_POINTS.get(m[1])
            assert ep is not None, f"{name}: no entry point '{m[1]}' in: {line}"
            known = {f.name for f in ep.fields()}
            for key in re.findall(r"-P (\w+)=", m[2].split("#")[0]):
                assert key in known, f"{name}: entry point {m[1]} has no parameter '{key}': {line}"
            checked[name] += 1
    assert checked["README.md"] >= 7 and sum(checked.values()) >= 15, checked


def test_the_readme_is_a_first_read_whose_links_resolve() -> None:
    """The README stays short (the reference lives in docs/), and every relative link of every page points at a
    file that exists, and at a heading of it when it names one."""
    readme = (config.REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for name in PAGES:
        here = (config.REPO / name).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", (config.REPO / name).read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            file = (here / path).resolve() if path else config.REPO / name
            assert file.exists(), f"{name}: link to a missing file: {target}"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file.read_text()), f"{name}: no heading '#{anchor}' in {path or name}"


def test_the_docs_speak_of_the_project_only() -> None:
    """No work round, issue number, '§' or path of the machine a page was written on: they mean nothing to a reader."""
    bad = re.compile(r"\bsession \d|\bround \d|\bissue \d|§|/work/|/tmp/|/home/")
    for name in PAGES:
        for i, line in enumerate((config.REPO / name).read_text().splitlines(), 1):
            assert not bad.search(line), f"{name}:{i}: {line}"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
