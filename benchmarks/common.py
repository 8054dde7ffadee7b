"""What the benchmarks share: their command-line options, taken from bias_lab.config, and a throw-away place to run.

A benchmark declares only its own knobs (a budget, repeats, --quick). The settings it shares with `bias-lab`
(--model, --epochs, --image-size, --seed, ...) come from the config dataclasses with their name, type, choices and
help, so `--image-size` means to a benchmark what it means to `bias-lab train`; a benchmark may give one of them its
own default (a shorter run) or narrower choices. The dataset is `--data path/to/tiny4`, or the folder named by the
environment variable BIAS_LAB_DATA.

Import this module before torch: it sets what torch and tqdm read when they load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# No progress bars between a benchmark's table rows; idle OpenMP threads sleep (bias_lab's own policy, see
# bias_lab/__init__.py) for every side of a comparison alike. A value the user set wins.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bias_lab import config  # noqa: E402

DATA_ENV = "BIAS_LAB_DATA"
SETTINGS = {
    f.name: f
    for group in (config.DataConfig, config.TrainConfig, config.BiasConfig, config.TuneConfig)
    for f in dataclasses.fields(group)
}
INHERITED = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")  # a caller's run must not adopt ours
_CONFIG = object()  # "as bias_lab.config says"


# ------------------------------------------------------------------------------------------ command line


def boolean(text: str) -> bool:
    """true/false (also 1/0, yes/no), as `bias-lab` reads a boolean setting."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean: use true or false")


def setting(
    ap: argparse.ArgumentParser,
    name: str,
    default: Any = _CONFIG,
    help: str | None = None,
    choices: tuple[str, ...] | list[str] | None = None,
) -> None:
    """`--name` for the config setting `name`: type, choices and help from bias_lab.config; `default`, `help` and
    `choices` where the benchmark's own differ (a shorter run, a narrower choice, what the value means here).
    `data` defaults to $BIAS_LAB_DATA (the config's 'demo' is no benchmark's data): see `need_data`."""
    flag = f"--{name.replace('_', '-')}"
    if name == "data":
        ap.add_argument(
            flag,
            default=os.environ.get(DATA_ENV, "") if default is _CONFIG else default,
            metavar="DIR",
            help=help or f"dataset folder (Kaggle or ImageFolder layout), e.g. path/to/tiny4 (default: ${DATA_ENV})",
        )
        return
    f = SETTINGS[name]
    value = f.default if default is _CONFIG else default
    text = help or f.metadata["help"]
    ap.add_argument(
        flag,
        dest=name,
        type={bool: boolean, int: int, float: float}.get(type(f.default), str),
        default=value,
        choices=choices or f.metadata.get("choices"),
        help=f"{text} (default: {value})".replace("%", "%%"),
    )


def parser(doc: str, *names: str, **defaults: Any) -> argparse.ArgumentParser:
    """The benchmark's parser: its docstring as --help's description, and `--name` for each config setting in
    `names` (`defaults`: the benchmark's own default for some of them). Add the benchmark's own knobs after."""
    unknown = set(defaults) - set(names)
    assert not unknown, f"defaults for settings not offered: {unknown}"
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in names:
        setting(ap, name, defaults.get(name, _CONFIG))
    return ap


def flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The settings `names` of `args` as `bias-lab` options: ["--image-size", "32", ...] (booleans true/false)."""
    out = []
    for name in names:
        value = getattr(args, name)
        out += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def need_data(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """args.data, or a usage error (exit 2) when neither --data nor $BIAS_LAB_DATA names a dataset."""
    if not args.data:
        ap.error(f"--data is required: the dataset folder, e.g. --data path/to/tiny4 (or set {DATA_ENV})")
    return args.data


# ------------------------------------------------------------------------------------------ a throw-away place to run


def scratch_env(workdir: Path, tracking_uri: str = "", cache: bool = True) -> dict[str, str]:
    """The environment for the commands a benchmark starts, also applied to this process: MLflow at `tracking_uri`
    or a throw-away sqlite store in `workdir`, no run inherited from a caller, and (`cache`) the decoded-tensor cache
    in `workdir` (else the user's own, maybe warm from earlier runs)."""
    import mlflow

    for var in INHERITED:
        os.environ.pop(var, None)
    if cache:
        os.environ["BIAS_LAB_CACHE"] = str(workdir / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return dict(os.environ)


def quick_data(workdir: Path, seed: int = 1, n_train: int = 30, n_test: int = 4) -> str:
    """The --quick smoke runs' data: the demo generator, by default at 30 train / 4 test images per class."""
    from bias_lab.demo import write_demo

    return str(write_demo(workdir / "data", seed=seed, n_train=n_train, n_test=n_test))


def write_synthetic(root: Path, per_class: int = 30, seed: int = 0, size: int = 64) -> Path:
    """Kaggle layout (train.csv id,label; train/train/<id>.jpg), 4 classes of noisy size x size images whose mean
    brightness depends on the class (learnable, so accuracies are not all chance)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "train" / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i in range(4 * per_class):
        label = 1 + i % 4
        px = np.clip(rng.normal(40 + 55 * (label - 1), 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "train" / "train" / f"{1000 + i}.jpg")
        rows.append(f"{1000 + i},{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def train_cli(
    data: Path | str,
    model: str,
    epochs: int,
    env: dict[str, str],
    cwd: Path,
    extra: list[str] | tuple[str, ...] = (),
    image_size: int = 64,
    seed: int = 0,
) -> tuple[Any, float]:
    """Run `bias-lab train` on the CPU in a subprocess (`extra`: more train options; a later one wins); its MLflow
    run, read back from env's tracking store, and the process's wall seconds."""
    import mlflow

    cmd = [sys.executable, "-m", "bias_lab.cli", "train", "--data", str(data), "--model", model]
    cmd += ["--epochs", str(epochs), "--image-size", str(image_size), "--seed", str(seed), "--device", "cpu", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    m = re.search(r"run ([0-9a-f]{32})", p.stdout + p.stderr)
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    if m:
        return client.get_run(m.group(1)), wall
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, order_by=["attribute.start_time DESC"], max_results=1)[0], wall
