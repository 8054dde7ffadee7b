"""The files generated from bias_lab/config.py: MLproject and the parameter tables of docs/parameters.md.

After adding or changing a setting: `python -m bias_lab.generate --write` regenerates both (`--check` exits 1
when either is stale; tests/test_readme.py runs it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from bias_lab.config import (
    ENTRY_POINTS,
    REPO,
    BiasConfig,
    BiasEvalConfig,
    DataConfig,
    ReportConfig,
    SubmitConfig,
    SweepConfig,
    TrainConfig,
    TuneConfig,
)

COMMAND = "python -m bias_lab.generate --write"
PARAMETERS = Path("docs") / "parameters.md"  # relative to REPO: the page whose tables are generated


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return "''" if v == "" else v if re.fullmatch(r"[A-Za-z0-9_.-]+", v) else json.dumps(v)
    return repr(v)


def render_mlproject() -> str:
    """MLproject: every setting of every command as a parameter (MLflow has no int or bool type: integers are
    `float`, booleans `string`), passed through to entrypoints/<name>.py."""
    out = [
        "name: bias_lab",
        "",
        f"# GENERATED from bias_lab/config.py by `{COMMAND}`: edit config.py, not this file.",
        "# Runs in the current environment: `mlflow run . -e <entry> --env-manager local` after `pip install -e .`;",
        "# without --env-manager local, MLflow builds conda.yaml. Parameters mirror `bias-lab <command> --help`.",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    for name, ep in ENTRY_POINTS.items():
        out += [f"  {name}:", "    parameters:"]
        for f in ep.fields():
            kind = "string" if isinstance(f.default, (bool, str)) else "float"
            out.append(f"      {f.name}: {{type: {kind}, default: {_yaml_value(ep.default(f))}}}")
        args = " ".join(f"--{f.name.replace('_', '-')} {{{f.name}}}" for f in ep.fields())
        out.append(f'    command: "python entrypoints/{name}.py {args}"')
    return "\n".join(out) + "\n"


TABLES_BEGIN, TABLES_END = "<!-- PARAMS:BEGIN", "<!-- PARAMS:END -->"
_GROUPS = (
    (DataConfig, "Data (every entry point)"),
    (
        TrainConfig,
        "Training (train; tune and bias_eval too, less what `config.NOT_USED_BY` lists: tune searches lr / "
        "momentum / batch_size, only train has resume / keep_checkpoint / checkpoint_every_s)",
    ),
    (BiasConfig, "Bias channel (train, tune, bias_eval; bias_eval always adds eps to model_2, so it has no `bias`)"),
    (TuneConfig, "tune"),
    (BiasEvalConfig, "bias_eval"),
    (SweepConfig, "bias_sweep"),
    (SubmitConfig, "kaggle_submit"),
    (ReportConfig, "report"),
)


def render_tables() -> str:
    """One markdown table per settings group: name, default, help (and allowed values)."""
    out = []
    for cls, title in _GROUPS:
        out += [f"**{title}**", "", "| parameter | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            d = f.default
            d = "''" if d == "" else str(d).lower() if isinstance(d, bool) else d
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"].replace("|", "\\|")  # a bare | would end the cell: P(S=1 | y=0)
            out.append(f"| `{f.name}` | `{d}` | {meaning}{' (' + ' / '.join(choices) + ')' if choices else ''} |")
        out.append("")
    return "\n".join(out).strip()


def _with_tables(text: str) -> str:
    start = text.index("\n", text.index(TABLES_BEGIN)) + 1
    return text[:start] + "\n" + render_tables() + "\n\n" + text[text.index(TABLES_END) :]


def generated() -> dict[Path, str]:
    """The files this module generates, as they should read now."""
    page = REPO / PARAMETERS
    return {REPO / "MLproject": render_mlproject(), page: _with_tables(page.read_text())}


def main(argv: list[str]) -> int:
    stale = [p for p, text in generated().items() if p.read_text() != text]
    if "--write" in argv:
        for p in stale:
            p.write_text(generated()[p])
            print(f"wrote {p.relative_to(REPO)}")
        return 0
    for p in stale:
        print(f"{p.relative_to(REPO)} is stale: run `{COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
