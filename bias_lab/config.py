"""Every knob of bias_lab, in one place.

Each dataclass below is one group of settings. The CLI builds its options from these fields (`--image-size` for
`image_size`), MLproject declares the same names, and every run logs `asdict()` of the groups it used verbatim,
so what is written here is exactly what a run in the MLflow UI says it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODELS = ("lenet", "alexnet", "resnet18", "resnet34")
SCHEDULES = ("none", "cosine", "step", "onecycle")
PRUNERS = ("median", "hyperband", "none")
MITIGATIONS = ("none", "reweigh", "adversarial", "channel_dropout")
MODEL_1_MODES = ("clean", "decorrelated")


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that also carries its CLI help text (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    data: str = knob("demo", "dataset folder (Kaggle or ImageFolder layout), or 'demo' for the built-in synthetic set")
    image_size: int = knob(64, "side of the square grayscale input, px (32-224); 64 is Tiny-ImageNet's native size")
    val_fraction: float = knob(0.15, "share of each class held out for tuning / model selection")
    test_fraction: float = knob(0.15, "share of each class held out for final numbers only")
    strict: bool = knob(False, "fail on an unreadable image instead of skipping it with a warning; bias_eval: also exit "
                               "non-zero when a model did not learn (no verdict)")
    cache_dir: str = knob("", "decoded-tensor cache; default $BIAS_LAB_CACHE or ~/.cache/bias_lab")


@dataclass
class TrainConfig:
    model: str = knob("lenet", "architecture", MODELS)
    epochs: int = knob(10, "passes over the train split")
    batch_size: int = knob(32, "images per SGD step")
    lr: float = knob(0.05, "peak SGD learning rate")
    momentum: float = knob(0.9, "SGD momentum (0 = plain SGD)")
    weight_decay: float = knob(5e-4, "L2 penalty; 5e-4 is the usual value for small-image CNNs")
    nesterov: bool = knob(False, "Nesterov momentum (needs momentum > 0)")
    schedule: str = knob("cosine", "learning-rate schedule over the epochs", SCHEDULES)
    label_smoothing: float = knob(0.0, "cross-entropy label smoothing in [0, 1)")
    augment: bool = knob(True, "batched random resized crop + horizontal flip on the train split")
    seed: int = knob(0, "seed of splits, init, batches, augmentation and the bias channel")
    device: str = knob("auto", "'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")
    threads: int = knob(0, "CPU threads for torch; 0 keeps torch's default (one per core)")
    deterministic: bool = knob(True, "same seed, same numbers (deterministic kernels); false lets cuDNN pick the fastest "
                                     "kernels (cudnn.benchmark): faster on a GPU, not bit-reproducible")
    resume: bool = knob(False, "continue from the last epoch checkpoint of the same configuration")
    keep_checkpoint: bool = knob(False, "keep the checkpoint when the run finishes (default: deleted, it is only for resuming)")
    checkpoint_every_s: float = knob(60.0, "write the resume checkpoint after the first epoch that ends this many seconds "
                                           "after the last one (0 = every epoch); a kill loses at most about this much")


@dataclass
class BiasConfig:
    bias: bool = knob(False, "append the noise channel eps (train/tune); bias_eval always trains a biased model_2")
    classes: str = knob("", "two labels 'A,B' for the binary task (A is y=0); empty = the first two labels")
    p0: float = knob(0.0, "P(S=1 | y=0): how often eps is present for class A")
    p1: float = knob(1.0, "P(S=1 | y=1): how often eps is present for class B")
    sigma: float = knob(1.0, "std of eps where S=1, in units of the normalised image")


@dataclass
class TuneConfig:
    n_trials: int = knob(20, "trials the study should hold in total (resumed and parallel workers count)")
    timeout: float = knob(0.0, "stop starting new trials after this many seconds; 0 = no limit")
    pruner: str = knob("median", "early stopping of poor trials, judged on their per-epoch val_loss", PRUNERS)
    storage: str = knob("", "Optuna storage: a journal file path or an RDB URL; default optuna.journal by the MLflow db")
    study_name: str = knob("", "default bias-lab-<model>-<data digest>")
    lr_min: float = knob(1e-4, "lower bound of the log-uniform learning-rate search")
    lr_max: float = knob(1.0, "upper bound of the log-uniform learning-rate search")
    momentum_min: float = knob(0.0, "lower bound of the uniform momentum search")
    momentum_max: float = knob(0.99, "upper bound of the uniform momentum search")
    batch_sizes: str = knob("32,64,128,256", "comma-separated batch sizes to choose from")
    registered_model: str = knob("bias-lab", "Model Registry name the best model is registered under")
    final_model: bool = knob(True, "retrain the best configuration, test it once and register it; false for extra parallel workers")


@dataclass
class BiasEvalConfig:
    model_1_mode: str = knob("clean", "model_1 on the plain images, or with eps at p0=p1", MODEL_1_MODES)
    mitigation: str = knob("none", "also train model_3 with this debiasing method", MITIGATIONS)
    seeds: int = knob(1, "repeat the pair with this many seeds and report mean +- std")
    use_champion: bool = knob(True, "take lr/momentum/batch_size from the champion of this dataset if one exists")
    registered_model: str = knob("bias-lab", "Model Registry name whose champion supplies hyperparameters")
    bootstrap: int = knob(1000, "bootstrap resamples for the DI confidence interval")
    adv_weight: float = knob(1.0, "mitigation=adversarial: gradient-reversal weight of the S adversary")
    dropout_rate: float = knob(1.0, "mitigation=channel_dropout: share of each train batch whose eps is re-drawn independently of y")


@dataclass
class SweepConfig:
    classes: str = knob("", "two labels 'A,B' for the binary task (A is y=0); empty = the first two labels")
    gaps: str = knob("0,0.25,0.5,0.75,1", "p1-p0 values of the grid, centred on 1/2: p0=(1-gap)/2, p1=(1+gap)/2")
    sigmas: str = knob("0.01,0.1,1", "eps standard deviations of the grid")
    bootstrap: int = knob(200, "bootstrap resamples for each cell's DI confidence interval")
    log_models: bool = knob(False, "log each cell's model (off: a sweep trains many)")


@dataclass
class SubmitConfig:
    model_uri: str = knob("models:/bias-lab@champion", "any MLflow model URI (alias, version, runs:/...)")
    output: str = knob("submission.csv", "CSV to write (atomically)")
    competition: str = knob("modia-ml-2024", "Kaggle competition slug for the printed submit command")
    batch_size: int = knob(256, "images per forward pass")
    device: str = knob("auto", "'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")


# Settings a command's runs never read (tune searches lr/momentum/batch_size; only train resumes; bias_eval always
# adds eps to model_2): the command does not offer them and its runs do not log them, so no run page shows a
# value the run did not use.
TRAIN_ONLY = ("resume", "keep_checkpoint", "checkpoint_every_s")  # checkpoints: only `train` writes and resumes them
NOT_USED_BY: dict[str, tuple[str, ...]] = {
    "tune": ("lr", "momentum", "batch_size", *TRAIN_ONLY),
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
class ReportConfig:
    output: str = knob("report.html", "HTML file to write; a markdown twin is written next to it (.md)")
    experiment: str = knob("", "experiment to read the latest train / tune / bias_eval runs from; default 'bias-lab', "
                               "else wherever the latest runs are")
    run_ids: str = knob("", "comma-separated run ids to report instead of the latest runs")
