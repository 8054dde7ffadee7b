"""Every knob of bias_lab, in one place.

Each dataclass below is one group of settings. The CLI builds its options from these fields (`--image-size` for
`image_size`), MLproject declares the same names, and every run logs `asdict()` of the groups it used verbatim,
so what is written here is exactly what a run in the MLflow UI says it did.

After adding or changing a setting: `python -m bias_lab.generate --write` regenerates MLproject and the
parameter tables of docs/parameters.md from this file (`--check` fails when either is stale; the tests run it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bias_lab.errors import UserError, check

MODELS = ("lenet", "alexnet", "resnet18", "resnet34")
SCHEDULES = ("none", "cosine", "step", "onecycle")
PRUNERS = ("median", "hyperband", "none")
MITIGATIONS = ("none", "reweigh", "adversarial", "channel_dropout")
MODEL_1_MODES = ("clean", "decorrelated")
STEMS = ("auto", "small", "imagenet")
WEIGHTS = ("none", "imagenet")
PRETRAINED = ("alexnet", "resnet18", "resnet34")  # the models torchvision has ImageNet-1k weights for
SEED_LIMIT = 2**32  # numpy's and torch's generators both take seeds below it; seed+1 etc. stay in int64


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that also carries its CLI help text (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class Settings:
    """Base of every group: `validate()` rejects a value no run can use with a one-line UserError that names the
    fix. It reads no files and opens no run, so commands call it first and a typo costs nothing. NaN fails every
    comparison below, so it is rejected with the bound it breaks."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            check(choices is None or value in choices, f"{f.name}={value}: choose one of {', '.join(choices or ())}")
        self.check()

    def check(self) -> None:
        """The group's own rules beyond `choices`."""


def parse_numbers(text: str, name: str, low: float, high: float) -> list[float]:
    """Sorted unique floats of a comma-separated list, each within [low, high]; one-line error otherwise."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"{name}='{text}' is not a comma-separated list of numbers: e.g. {name}=0,0.5,1") from None
    check(bool(values), f"{name} is empty: give at least one value, e.g. {name}=0,0.5,1")
    bad = [v for v in values if not (math.isfinite(v) and low <= v <= high)]
    check(not bad, f"{name}: {bad[0] if bad else ''} is outside [{low:g}, {high:g}]: fix the list")
    return values


def check_distinct(text: str, name: str) -> None:
    """No two values of a grid list are one value, or print alike with %g (metric names and row labels use it)."""
    seen: dict[str, str] = {}
    for raw in (v.strip() for v in text.split(",") if v.strip()):
        key = f"{float(raw) + 0.0:g}"  # + 0.0: -0 is 0
        same = f"{name}: {seen.get(key)} and {raw} both print as {key} in metric names and row labels"
        check(key not in seen, f"{same}: drop one, or make them differ in their first 6 significant digits")
        seen[key] = raw


def check_device(value: str) -> None:
    """The device setting's spelling, before anything asks torch whether CUDA is usable."""
    ok = re.fullmatch(r"cpu|auto|cuda(:(0|[1-9][0-9]*))?", value) is not None
    check(ok, f"device={value}: unknown device: use cpu, auto, cuda or cuda:N (N a GPU index, e.g. cuda:0)")


@dataclass
class DataConfig(Settings):
    data: str = knob("demo", "dataset folder (Kaggle or ImageFolder layout), or 'demo' for the built-in synthetic set")
    image_size: int = knob(64, "side of the square grayscale input, px (32-224); 64 is Tiny-ImageNet's native size")
    val_fraction: float = knob(0.15, "share of each class held out for tuning / model selection")
    test_fraction: float = knob(0.15, "share of each class held out for final numbers only")
    strict: bool = knob(
        False,
        "fail on an unreadable image instead of skipping it with a warning; bias_eval: also exit "
        "non-zero when a model did not learn (no verdict)",
    )
    cache_dir: str = knob("", "decoded-tensor cache; default $BIAS_LAB_CACHE or ~/.cache/bias_lab")

    def check(self) -> None:
        check(bool(self.data.strip()), "data is empty: pass data=<folder with train.csv or train/> (or data=demo)")
        check(32 <= self.image_size <= 224, f"image_size={self.image_size} is out of range: use a value in 32..224")
        v, t = self.val_fraction, self.test_fraction
        check(
            0 <= v < 1 and 0 <= t < 1 and v + t < 1,
            f"val_fraction={v} + test_fraction={t} leave no train split: use fractions in [0, 1) that sum to less than 1",
        )


@dataclass
class TrainConfig(Settings):
    model: str = knob("lenet", "architecture", MODELS)
    epochs: int = knob(10, "passes over the train split")
    batch_size: int = knob(32, "images per SGD step")
    lr: float = knob(0.05, "peak SGD learning rate")
    momentum: float = knob(0.9, "SGD momentum (0 = plain SGD)")
    weight_decay: float = knob(5e-4, "L2 penalty; 5e-4 is the usual value for small-image CNNs")
    nesterov: bool = knob(False, "Nesterov momentum (needs momentum > 0)")
    schedule: str = knob("cosine", "learning-rate schedule over the epochs", SCHEDULES)
    label_smoothing: float = knob(0.0, "cross-entropy label smoothing in [0, 1)")
    # ema / mixup / cutmix measured on tiny4 (benchmarks/README.md, "Weight averaging..."): LeNet 60 epochs, mean test
    # accuracy over three splits 0.700 without; ema 0.99 0.685, mixup 0.2 0.679, cutmix 1.0 0.650 (one split): all off
    ema: float = knob(
        0.0,
        "decay per SGD step of an exponential moving average of the weights, which is then what is evaluated, kept "
        "and logged (e.g. 0.99: a horizon of about 100 steps); 0 = off",
    )
    mixup: float = knob(
        0.0, "alpha of mixup's Beta(alpha, alpha): train on blends of two images and their labels; 0 = off"
    )
    cutmix: float = knob(
        0.0, "alpha of cutmix's Beta(alpha, alpha): paste a box of another image and mix labels by area; 0 = off"
    )
    augment: bool = knob(True, "batched random resized crop + horizontal flip on the train split")
    # measured on tiny4 (benchmarks/README.md, Recipe study): LeNet 60 epochs, test accuracy 0.65 / 0.69 / 0.71 at
    # crop_scale 0.7 / 0.35 / 0.08 without tta, 0.67 / 0.69 / 0.73 with it (tta helped in 11 runs of 11, +1.7 points
    # on average); 0.08 is also torchvision's RandomResizedCrop default
    crop_scale: float = knob(
        0.08, "augment: smallest area of the random resized crop, as a share of the image (0.08-1, as torchvision)"
    )
    tta: bool = knob(
        True, "test-time augmentation: every prediction (val, test, kaggle_submit) averages the image and its mirror"
    )
    stem: str = knob(
        "auto",
        "first layers of alexnet/resnet: 'imagenet' = torchvision's (ResNet 7x7 stride 2 + pool, AlexNet 11x11 "
        "stride 4), 'small' = for small inputs (ResNet 3x3 stride 1, AlexNet 5x5 stride 2); auto = imagenet for "
        "resnet (measured faster to a better accuracy), for alexnet from 128 px",
        STEMS,
    )
    weights: str = knob(
        "none",
        "'imagenet' starts alexnet/resnet from torchvision's ImageNet-1k weights (downloaded once into torch's hub "
        "cache); not comparable with training from scratch: ImageNet-1k holds the competition's classes",
        WEIGHTS,
    )
    # width 2 measured on tiny4: mean test 0.719 vs 0.700 at 60 epochs, 0.746 vs 0.720 at 120 with label smoothing 0.1,
    # for 2x the seconds per epoch: recommended for a submission, not the default (tune's time would double);
    # width 3 + label smoothing 0.1, 100 epochs: 0.751 (0.777 / 0.720 / 0.757), about 3x LeNet-5's seconds per epoch
    width: int = knob(1, "lenet: channel multiplier of every layer (1 = LeNet-5's 6-16-120-84, 2 = 12-32-240-168)")
    freeze_epochs: int = knob(0, "weights=imagenet: train only the new output layer for this many first epochs")
    seed: int = knob(0, "seed of splits, init, batches, augmentation and the bias channel")
    device: str = knob("auto", "'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")
    threads: int = knob(0, "CPU threads for torch; 0 keeps torch's default (one per core)")
    deterministic: bool = knob(
        True,
        "same seed, same numbers (deterministic kernels); false lets cuDNN pick the fastest "
        "kernels (cudnn.benchmark): faster on a GPU, not bit-reproducible",
    )
    resume: bool = knob(False, "continue from the last epoch checkpoint of the same configuration")
    keep_checkpoint: bool = knob(
        False, "keep the checkpoint when the run finishes (default: deleted, it is only for resuming)"
    )
    checkpoint_every_s: float = knob(
        60.0,
        "write the resume checkpoint after the first epoch that ends this many seconds "
        "after the last one (0 = every epoch); a kill loses at most about this much",
    )

    def check(self) -> None:
        check(self.epochs >= 1, f"epochs={self.epochs}: use at least 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: use a positive batch size")
        check(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr}: use a finite positive learning rate (e.g. 0.05)")
        check(0 <= self.momentum < 1, f"momentum={self.momentum}: use a value in [0, 1)")
        check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay={self.weight_decay}: use a finite value >= 0 (5e-4 is usual, 0 turns it off)",
        )
        check(
            not self.nesterov or self.momentum > 0, "nesterov=true needs momentum > 0: set momentum or nesterov=false"
        )
        check(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing}: use a value in [0, 1)")
        check(0 <= self.ema < 1, f"ema={self.ema}: use a decay per step in [0, 1), e.g. 0.99, or 0 for off")
        for name in ("mixup", "cutmix"):
            alpha = getattr(self, name)
            check(math.isfinite(alpha) and alpha >= 0, f"{name}={alpha}: use an alpha >= 0 (e.g. 0.2; 0 turns it off)")
        check(0 < self.crop_scale <= 1, f"crop_scale={self.crop_scale}: use a share of the image in (0, 1], e.g. 0.08")
        check(
            self.weights == "none" or self.model in PRETRAINED,
            f"weights={self.weights}: torchvision has no ImageNet weights for {self.model}; use one of "
            f"{', '.join(PRETRAINED)} or weights=none",
        )
        check(
            self.weights == "none" or self.stem != "small",
            f"weights={self.weights} needs the stem the weights were trained with: use stem=imagenet or auto",
        )
        check(
            0 <= self.freeze_epochs < self.epochs or self.freeze_epochs == 0,
            f"freeze_epochs={self.freeze_epochs}: use 0 or fewer than epochs={self.epochs} (the backbone must train)",
        )
        check(
            self.freeze_epochs == 0 or self.weights != "none",
            f"freeze_epochs={self.freeze_epochs} freezes pretrained layers: set weights=imagenet or freeze_epochs=0",
        )
        check(1 <= self.width <= 8, f"width={self.width}: use a channel multiplier in 1..8")
        check(
            self.width == 1 or self.model == "lenet",
            f"width={self.width} widens lenet only ({self.model} is torchvision's, at its own width): use width=1",
        )
        check(
            self.stem == "auto" or self.model != "lenet",
            f"stem={self.stem} chooses the first layers of alexnet/resnet; lenet has no stem to choose: use stem=auto",
        )
        check_device(self.device)
        check(0 <= self.seed < SEED_LIMIT, f"seed={self.seed}: use an integer in [0, {SEED_LIMIT - 1}]")
        check(self.threads >= 0, f"threads={self.threads}: use 0 (torch's default) or a positive thread count")
        check(
            self.checkpoint_every_s >= 0,
            f"checkpoint_every_s={self.checkpoint_every_s}: use seconds >= 0 (0 = every epoch)",
        )


@dataclass
class BiasConfig(Settings):
    bias: bool = knob(False, "append the noise channel eps (train/tune); bias_eval always trains a biased model_2")
    classes: str = knob("", "two labels 'A,B' for the binary task (A is y=0); empty = the first two labels")
    p0: float = knob(0.0, "P(S=1 | y=0): how often eps is present for class A")
    p1: float = knob(1.0, "P(S=1 | y=1): how often eps is present for class B")
    sigma: float = knob(1.0, "std of eps where S=1, in units of the normalised image")

    def check(self) -> None:  # `classes` is checked against the data's labels, once they are read
        check(0.0 <= self.p0 <= 1.0, f"p0={self.p0} is not a probability: use a value in [0, 1]")
        check(0.0 <= self.p1 <= 1.0, f"p1={self.p1} is not a probability: use a value in [0, 1]")
        check(
            math.isfinite(self.sigma) and self.sigma >= 0.0,
            f"sigma={self.sigma} is not a finite standard deviation >= 0: use e.g. sigma=1",
        )


@dataclass
class TuneConfig(Settings):
    n_trials: int = knob(20, "trials the study should hold in total (resumed and parallel workers count)")
    timeout: float = knob(0.0, "stop starting new trials after this many seconds; 0 = no limit")
    pruner: str = knob("median", "early stopping of poor trials, judged on their per-epoch val_loss", PRUNERS)
    storage: str = knob(
        "", "Optuna storage: a journal file path or an RDB URL; default optuna.journal by the MLflow db"
    )
    study_name: str = knob("", "default bias-lab-<model>-<data digest>")
    lr_min: float = knob(1e-4, "lower bound of the log-uniform learning-rate search")
    lr_max: float = knob(1.0, "upper bound of the log-uniform learning-rate search")
    momentum_min: float = knob(0.0, "lower bound of the uniform momentum search")
    momentum_max: float = knob(0.99, "upper bound of the uniform momentum search")
    batch_sizes: str = knob("32,64,128,256", "comma-separated batch sizes to choose from")
    registered_model: str = knob("bias-lab", "Model Registry name the best model is registered under")
    final_model: bool = knob(
        True,
        "test the best trial's model once and register it (retrained when another worker trained it); false for "
        "extra parallel workers",
    )

    def batch_size_choices(self) -> list[int]:
        """The batch sizes to search, sorted and unique; one-line error when the list is not positive integers."""
        try:
            sizes = [int(s) for s in str(self.batch_sizes).split(",") if s.strip()]
        except ValueError:
            sizes = []
        check(
            bool(sizes) and all(s > 0 for s in sizes),
            f"batch_sizes='{self.batch_sizes}': give positive integers separated by commas, e.g. 32,64,128",
        )
        return sorted(set(sizes))

    def check(self) -> None:
        check(self.n_trials >= 1, f"n_trials={self.n_trials}: use at least 1")
        check(self.timeout >= 0, f"timeout={self.timeout}: use seconds >= 0 (0 = no limit)")
        check(
            0 < self.lr_min <= self.lr_max < math.inf,
            f"lr range [{self.lr_min}, {self.lr_max}]: use finite 0 < lr_min <= lr_max, e.g. 1e-4 and 1",
        )
        check(
            0 <= self.momentum_min <= self.momentum_max < 1,
            f"momentum range [{self.momentum_min}, {self.momentum_max}]: use 0 <= momentum_min <= momentum_max < 1",
        )
        check(
            bool(self.registered_model.strip()), "registered_model is empty: give a Model Registry name, e.g. bias-lab"
        )
        self.batch_size_choices()


@dataclass
class BiasEvalConfig(Settings):
    model_1_mode: str = knob("clean", "model_1 on the plain images, or with eps at p0=p1", MODEL_1_MODES)
    mitigation: str = knob("none", "also train model_3 with this debiasing method", MITIGATIONS)
    seeds: int = knob(1, "repeat the pair with this many seeds and report mean +- std")
    use_champion: bool = knob(True, "take lr/momentum/batch_size from the champion of this dataset if one exists")
    registered_model: str = knob("bias-lab", "Model Registry name whose champion supplies hyperparameters")
    bootstrap: int = knob(1000, "bootstrap resamples for the DI confidence interval")
    adv_weight: float = knob(1.0, "mitigation=adversarial: gradient-reversal weight of the S adversary")
    dropout_rate: float = knob(
        1.0, "mitigation=channel_dropout: share of each train batch whose eps is re-drawn independently of y"
    )

    def check(self) -> None:
        check(self.seeds >= 1, f"seeds={self.seeds}: use at least 1")
        check(self.bootstrap >= 0, f"bootstrap={self.bootstrap}: use 0 (no CI) or more resamples, e.g. 1000")
        w, rate = self.adv_weight, self.dropout_rate  # whatever the mitigation: every run logs them
        check(
            math.isfinite(w) and (w > 0 if self.mitigation == "adversarial" else w >= 0),
            f"adv_weight={w}: use a finite gradient-reversal weight > 0, e.g. 1",
        )
        ok = 0 < rate if self.mitigation == "channel_dropout" else 0 <= rate
        check(ok and rate <= 1, f"dropout_rate={rate}: use a share in (0, 1]")


@dataclass
class SweepConfig(Settings):
    classes: str = knob("", "two labels 'A,B' for the binary task (A is y=0); empty = the first two labels")
    gaps: str = knob("0,0.25,0.5,0.75,1", "p1-p0 values of the grid, centred on 1/2: p0=(1-gap)/2, p1=(1+gap)/2")
    sigmas: str = knob("0.01,0.1,1", "eps standard deviations of the grid")
    bootstrap: int = knob(200, "bootstrap resamples for each cell's DI confidence interval")
    log_models: bool = knob(False, "log each cell's model (off: a sweep trains many)")

    def gap_values(self) -> list[float]:
        return parse_numbers(self.gaps, "gaps", 0.0, 1.0)

    def sigma_values(self) -> list[float]:
        return parse_numbers(self.sigmas, "sigmas", 0.0, math.inf)

    def check(self) -> None:
        self.gap_values(), self.sigma_values()
        for name in ("gaps", "sigmas"):
            check_distinct(getattr(self, name), name)
        check(self.bootstrap >= 0, f"bootstrap={self.bootstrap}: use 0 (no CI) or more resamples, e.g. 200")


@dataclass
class SubmitConfig(Settings):
    model_uri: str = knob("models:/bias-lab@champion", "any MLflow model URI (alias, version, runs:/...)")
    output: str = knob("submission.csv", "CSV to write (atomically)")
    competition: str = knob("modia-ml-2024", "Kaggle competition slug for the printed submit command")
    batch_size: int = knob(256, "images per forward pass")
    device: str = knob("auto", "'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")
    allow_other_data: bool = knob(False, "submit a model trained on the synthetic demo for other data anyway")

    def check(self) -> None:  # the output folder is checked by kaggle_submit: it touches the file system
        check(
            bool(self.model_uri.strip()), "model_uri is empty: pass e.g. models:/bias-lab@champion or runs:/<id>/model"
        )
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: use a positive batch size")
        check_device(self.device)
        check(
            Path(self.output).suffix.lower() == ".csv",
            f"output={self.output} is not a .csv file name: pass e.g. output=submission.csv",
        )


# Settings a command's runs never read (tune searches lr/momentum/batch_size; only train resumes; bias_eval always
# adds eps to model_2): the command does not offer them and its runs do not log them, so no run page shows a
# value the run did not use.
TRAIN_ONLY = ("resume", "keep_checkpoint", "checkpoint_every_s")  # checkpoints: only `train` writes and resumes them
# What tune searches, by name and type: the one list that tune's suggest and start point, the registered version's
# tags, the champion's settings bias_eval reuses and every description read.
SEARCHED: dict[str, type] = {"lr": float, "momentum": float, "batch_size": int}
NOT_USED_BY: dict[str, tuple[str, ...]] = {
    "tune": (*SEARCHED, *TRAIN_ONLY),
    "bias_eval": ("bias", *TRAIN_ONLY),
    "bias_sweep": TRAIN_ONLY,
}


def flat(*configs: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One flat dict of all fields (less `skip`), as logged to MLflow params."""
    out: dict[str, Any] = {}
    for c in configs:
        out.update(dataclasses.asdict(c))
    return {k: v for k, v in out.items() if k not in skip}


@dataclass
class ReportConfig(Settings):
    output: str = knob("report.html", "HTML file to write; a markdown twin is written next to it (.md)")
    experiment: str = knob(
        "",
        "experiment to read the latest train / tune / bias_eval runs from; default 'bias-lab', "
        "else wherever the latest runs are",
    )
    run_ids: str = knob("", "comma-separated run ids to report instead of the latest runs")


@dataclass(frozen=True)
class EntryPoint:
    """One command: its MLflow entry point name, `bias-lab` subcommand, settings and per-command defaults."""

    command: str  # bias-lab <command>
    groups: tuple[type, ...]
    defaults: tuple[tuple[str, Any], ...] = ()  # this command's own defaults (a sweep trains many short runs)
    skip: tuple[str, ...] = ()  # settings it never reads

    def fields(self) -> list[dataclasses.Field]:
        return [f for g in self.groups for f in dataclasses.fields(g) if f.name not in self.skip]

    def default(self, f: dataclasses.Field) -> Any:
        return dict(self.defaults).get(f.name, f.default)


ENTRY_POINTS: dict[str, EntryPoint] = {  # MLproject's entry points, in its order
    "train": EntryPoint("train", (DataConfig, TrainConfig, BiasConfig)),
    "tune": EntryPoint("tune", (DataConfig, TrainConfig, BiasConfig, TuneConfig), skip=NOT_USED_BY["tune"]),
    "bias_eval": EntryPoint(
        "bias-eval", (DataConfig, TrainConfig, BiasConfig, BiasEvalConfig), skip=NOT_USED_BY["bias_eval"]
    ),
    "bias_sweep": EntryPoint(
        "bias-sweep", (DataConfig, TrainConfig, SweepConfig), (("epochs", 4),), NOT_USED_BY["bias_sweep"]
    ),
    "kaggle_submit": EntryPoint("kaggle-submit", (DataConfig, SubmitConfig)),
}
REPO = Path(__file__).resolve().parents[1]
S = TypeVar("S", bound=Settings)


def _group(groups: tuple[Settings, ...], cls: type[S]) -> S | None:
    return next((g for g in groups if isinstance(g, cls)), None)


def validate(command: str, *groups: Settings) -> None:
    """Every setting `command` was given, then the rules across groups: the first thing each command does, before
    it reads data, opens a storage or starts a run. `command` is an ENTRY_POINTS key."""
    for g in groups:
        g.validate()
    data, train, evaluate = _group(groups, DataConfig), _group(groups, TrainConfig), _group(groups, BiasEvalConfig)
    if command in ("bias_eval", "bias_sweep") and data is not None:
        check(
            data.test_fraction > 0,
            f"test_fraction={data.test_fraction}: {command} measures on the test split; use a share > 0, e.g. 0.15",
        )
    if command == "tune" and data is not None:
        check(
            data.val_fraction > 0,
            f"val_fraction={data.val_fraction}: tune scores every trial on the val split; use a share > 0, e.g. 0.15",
        )
    if train is not None and evaluate is not None:
        check(
            train.seed + evaluate.seeds <= SEED_LIMIT,
            f"seed={train.seed} with seeds={evaluate.seeds}: the last seed, seed + seeds - 1, must stay below {SEED_LIMIT}",
        )
