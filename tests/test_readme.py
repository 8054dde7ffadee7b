"""The README's parameter tables are generated from bias_lab/config.py; this keeps them true.

Regenerate after adding a setting: `python tests/test_readme.py --write`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- PARAMS:BEGIN", "<!-- PARAMS:END -->"


def render() -> str:
    from bias_lab import config

    groups = [(c, t) for c, t in ((getattr(config, n, None), t) for n, t in (
        ("DataConfig", "Data (every entry point)"), ("TrainConfig", "Training (train; tune and bias_eval too, less what `config.NOT_USED_BY` lists: tune searches "
                        "lr / momentum / batch_size, only train has resume / keep_checkpoint / checkpoint_every_s)"),
        ("BiasConfig", "Bias channel (train, tune, bias_eval; bias_eval always adds eps to model_2, so it has no `bias`)"), ("TuneConfig", "tune"), ("BiasEvalConfig", "bias_eval"),
        ("SweepConfig", "bias_sweep"), ("SubmitConfig", "kaggle_submit"), ("ReportConfig", "report"))) if c is not None]
    out = []
    for cls, title in groups:
        out += [f"**{title}**", "", "| parameter | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            d = f.default
            d = "''" if d == "" else str(d).lower() if isinstance(d, bool) else d
            choices = f.metadata.get("choices")
            out.append(f"| `{f.name}` | `{d}` | {f.metadata['help']}{' (' + ' / '.join(choices) + ')' if choices else ''} |")
        out.append("")
    return "\n".join(out)


def current() -> str:
    text = README.read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)].strip()


def test_readme_parameter_tables_match_config() -> None:
    assert current() == render().strip(), "README parameter tables are stale: run `python tests/test_readme.py --write`"


if __name__ == "__main__" and "--write" in sys.argv:
    text = README.read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    README.write_text(text[:start] + "\n" + render() + "\n" + text[text.index(END):])
