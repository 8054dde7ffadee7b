"""Time-to-accuracy: bias_lab's `train` against the textbook torchvision loop, at the same wall-clock training budget.

    python benchmarks/bench_accuracy.py --data path/to/tiny4 --budget 300   # 22 min on 2 cores at load 3-4 (lenet + resnet18, both sides)
    python benchmarks/bench_accuracy.py --quick     # generated tiny data, 5 s budget: smoke run (~60 s; 5+ min at load 13)

--data defaults to the folder in the environment variable BIAS_LAB_DATA.

On the same machine, the same images and the same held-out split:
  textbook  written here, self-contained: a map-style dataset over the files (the CSV equivalent of ImageFolder for
            the Kaggle layout) + transforms (Grayscale(1), RandomResizedCrop(64), RandomHorizontalFlip, ToTensor,
            Normalize; Resize/ToTensor/Normalize for eval) + DataLoader(num_workers=2), SGD(lr 0.01, momentum 0.9,
            wd 5e-4), constant lr, batch 32; torchvision resnet18(num_classes=4) with a 1-channel conv1, and a LeNet-5
            (2 conv + 3 fc). Trained epoch by epoch until the budget is spent (it stops after the epoch that crosses
            it, so it gets at least the budget); the per-epoch val pass is not counted in its training seconds.
  bias_lab  `python -m bias_lab.cli train` in a subprocess (its own temporary MLflow sqlite store and cache), driven
            only through the command line. Its cosine schedule needs the epoch count up front, so each recipe is
            first calibrated with a short run (2 epochs for lenet, 1 otherwise) and then run for
            floor((budget - overhead) / seconds per epoch) epochs; train_time_s, test_accuracy and the val_accuracy
            history are read back with MlflowClient.
The split is bias_lab's: its stratified_split algorithm (per class, in natural label order, a numpy seeded
permutation; first 15% to test, next 15% to val) is re-implemented here over the same file order, so both sides
report test accuracy on the same held-out images (identical as long as bias_lab skips no unreadable image).
Runs alternate (textbook, bias_lab, textbook, ...) so that other jobs on the machine slow both sides alike; the load
average is printed at start and end. Writes a plotly figure (val accuracy per epoch and final test accuracy against
training seconds) to an offline HTML file (--out). Prints a markdown table and one `TARGET ... PASS|FAIL|SKIP` line
per target. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when imported or run with runpy
import common  # noqa: E402  (first: sets what torch reads on import)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import models as tvm  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from bias_lab.config import DataConfig  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIZE = 64
VAL_FRACTION, TEST_FRACTION = DataConfig.val_fraction, DataConfig.test_fraction  # what bias_lab's split uses


# ------------------------------------------------------------------------------------------ data and split


def natural_key(value: str) -> tuple:
    return (0, float(value), value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else (1, 0.0, value)


def list_files(root: Path) -> tuple[list[str], list[str]]:
    """(files, labels) of the labelled images, in bias_lab's listing order (train.csv row order for the Kaggle
    layout; class folders by name, then files by name, for the ImageFolder layout)."""
    if (root / "train.csv").is_file():
        import csv

        with open(root / "train.csv", newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        header = [c.strip().lower() for c in rows[0]]
        i_id, i_lab = header.index("id"), header.index("label")
        img_dir = root / "train" / "train" if (root / "train" / "train").is_dir() else root / "train"
        by_stem = {os.path.splitext(n)[0]: n for n in os.listdir(img_dir) if n.lower().endswith(IMAGE_EXTS)}
        names = set(by_stem.values())
        files, labels = [], []
        for r in rows[1:]:
            i = r[i_id].strip()
            name = i if i in names else by_stem[i]
            files.append(str(img_dir / name))
            labels.append(r[i_lab].strip())
        return files, labels
    train_dir = root / "train" if (root / "train").is_dir() else root
    files, labels = [], []
    for d in sorted(
        (
            d
            for d in train_dir.iterdir()
            if d.is_dir() and not d.name.startswith(".") and not (train_dir == root and d.name == "test")
        ),
        key=lambda d: d.name,
    ):
        imgs = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."))
        files += [str(d / n) for n in imgs]
        labels += [d.name] * len(imgs)
    return files, labels


def stratified_split(y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """bias_lab.data.stratified_split, re-implemented (same rng calls in the same order -> same indices)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(int(round(len(idx) * TEST_FRACTION)), 1)
        n_val = max(int(round(len(idx) * VAL_FRACTION)), 1)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


class FilesDataset(Dataset):
    """The textbook map-style dataset: open, decode and transform one file per item."""

    def __init__(self, files: list[str], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.files[i]).convert("RGB")), self.labels[i]


# ------------------------------------------------------------------------------------------ textbook side


class LeNet5(nn.Module):
    def __init__(self, n_classes: int = 4, size: int = SIZE):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        s = ((size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * s * s, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def textbook_model(name: str, n_classes: int) -> nn.Module:
    if name == "lenet":
        return LeNet5(n_classes)
    m = tvm.resnet18(num_classes=n_classes)
    m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    correct = n = 0
    for x, y in DataLoader(ds, batch_size=128, num_workers=2):
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train()
    return correct / max(n, 1)


@dataclass
class Result:
    side: str  # textbook | bias_lab
    model: str
    epochs: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0  # the whole run: decode, eval, (bias_lab) process start, MLflow logging
    test_acc: float = float("nan")
    best_val: float = float("nan")
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training seconds so far, val accuracy)
    note: str = ""


def run_textbook(
    name: str, files: list[str], y: np.ndarray, split: dict, budget: float, seed: int, lr: float
) -> Result:
    t_wall = time.perf_counter()
    norm = T.Normalize([0.5], [0.25])
    train_tf = T.Compose([T.Grayscale(1), T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Grayscale(1), T.Resize(SIZE), T.ToTensor(), norm])
    pick = lambda part, tf: FilesDataset([files[i] for i in split[part]], [int(y[i]) for i in split[part]], tf)  # noqa: E731
    train_ds, val_ds, test_ds = pick("train", train_tf), pick("val", eval_tf), pick("test", eval_tf)
    torch.manual_seed(seed)
    model = textbook_model(name, int(y.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(train_ds, batch_size=32, shuffle=True, num_workers=2)
    res = Result("textbook", name, note=f"SGD lr {lr}, constant")
    while res.train_s < budget:
        t0 = time.perf_counter()
        model.train()
        for x, t in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
        res.train_s += time.perf_counter() - t0
        res.epochs += 1
        val = evaluate(model, val_ds)
        res.curve.append((res.train_s, val))
        res.best_val = max(val, 0.0 if math.isnan(res.best_val) else res.best_val)
    res.test_acc = evaluate(model, test_ds)
    res.wall_s = time.perf_counter() - t_wall
    return res


# ------------------------------------------------------------------------------------------ bias_lab side (CLI only)


def run_bias_lab(name: str, data: Path, epochs: int, seed: int, tmp: Path, extra: list[str]) -> Result:
    import mlflow

    env = common.scratch_env(tmp)
    run, wall = common.train_cli(data, name, epochs, env, tmp, extra, SIZE, seed)
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    met = run.data.metrics
    vals = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "val_accuracy"))
    times = dict(sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "epoch_time_s")))
    cum, curve = 0.0, []
    for step, v in vals:
        cum += times.get(step, met["train_time_s"] / max(len(vals), 1))
        curve.append((cum, v))
    return Result(
        "bias_lab",
        " ".join([name, *extra]),
        epochs=int(met.get("epochs_run", epochs)),
        train_s=met["train_time_s"],
        wall_s=wall,
        test_acc=met["test_accuracy"],
        best_val=met["best_val_accuracy"],
        curve=curve,
        note=f"{met.get('images_per_s', float('nan')):.0f} img/s; " + (" ".join(extra) or "CLI defaults"),
    )


def epochs_for(calib: Result, budget: float) -> int:
    """Epochs that fit the budget, from a calibration run: steady epoch time = the fastest epoch (the first pays
    warm-up); the rest of train_time_s (not per epoch) is overhead."""
    steps = [b[0] - a[0] for a, b in zip([(0.0, 0.0), *calib.curve], calib.curve)]
    per_epoch = min(steps) if steps else calib.train_s / max(calib.epochs, 1)
    overhead = max(calib.train_s - sum(steps), 0.0)
    return max(1, int((budget - overhead) / per_epoch))


# ------------------------------------------------------------------------------------------ report


def write_figure(results: list[Result], out: Path, budget: float) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        label = f"{r.side} {r.model}"
        dash = "dot" if r.side == "textbook" else "solid"
        fig.add_trace(
            go.Scatter(
                x=[t for t, _ in r.curve],
                y=[v for _, v in r.curve],
                mode="lines+markers",
                name=f"{label}: val accuracy",
                line={"dash": dash},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[r.train_s],
                y=[r.test_acc],
                mode="markers",
                marker={"symbol": "star", "size": 14},
                name=f"{label}: test accuracy {r.test_acc:.3f}",
            )
        )
    fig.add_vline(x=budget, line_dash="dash", annotation_text=f"budget {budget:g} s")
    fig.update_layout(
        title="Accuracy vs training seconds (same machine, same held-out split)",
        xaxis_title="training seconds",
        yaxis_title="accuracy",
        template="plotly_white",
    )
    fig.write_html(str(out), include_plotlyjs=True, full_html=True)


def main() -> int:
    ap = common.parser(__doc__, "data", "seed")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per recipe")
    ap.add_argument("--quick", action="store_true", help="generated tiny data, 5 s budget, lenet only (smoke run)")
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=["lenet", "resnet18"],
        help="bias_lab recipes: an architecture, optionally followed by train options in one quoted argument "
        "(e.g. 'resnet18 --stem imagenet --tta true'); the textbook loop runs once per lenet/resnet18 architecture",
    )
    ap.add_argument("--textbook-lr", type=float, default=0.01)
    ap.add_argument("--out", default="bench_accuracy.html", help="offline HTML figure (plotly.js inlined)")
    args = ap.parse_args()
    if not args.quick:
        common.need_data(ap, args)
    budget = 5.0 if args.quick and args.budget == 300.0 else args.budget
    recipes = ["lenet"] if args.quick and args.recipes == ["lenet", "resnet18"] else args.recipes
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bias-lab-acc-") as tmp_s:
        tmp = Path(tmp_s)
        root = common.write_synthetic(tmp / "synthetic") if args.quick else Path(args.data).expanduser().resolve()
        files, label_names = list_files(root)
        classes = sorted(set(label_names), key=natural_key)
        y = np.array([classes.index(lab) for lab in label_names], dtype=np.int64)
        split = stratified_split(y, args.seed)
        print(
            f"# {len(files)} labelled images from {root}: {len(split['train'])} train / {len(split['val'])} val / "
            f"{len(split['test'])} test (bias_lab's split, seed {args.seed}); budget {budget:g} training s per recipe; "
            f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
            f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start (other jobs share this machine)",
            flush=True,
        )
        textbook_done: set[str] = set()
        for recipe in recipes:
            name, *extra = shlex.split(recipe)
            calib_epochs = 2 if name == "lenet" else 1
            calib = run_bias_lab(name, root, calib_epochs, args.seed, tmp, extra)
            n_ep = epochs_for(calib, budget)
            print(
                f"  bias_lab {name} calibration: {calib_epochs} epoch(s) in {calib.train_s:.1f} s -> {n_ep} epochs "
                f"({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
            if name in ("lenet", "resnet18") and name not in textbook_done:
                textbook_done.add(name)
                r = run_textbook(name, files, y, split, budget, args.seed, args.textbook_lr)
                results.append(r)
                print(
                    f"  textbook {name}: {r.epochs} epochs, {r.train_s:.0f} s, test {r.test_acc:.3f} "
                    f"({time.perf_counter() - t_start:.0f} s)",
                    flush=True,
                )
            # --quick: the calibration run is the result (a smoke run: its numbers mean nothing, its code is the same)
            again = n_ep != calib_epochs and not args.quick
            r = run_bias_lab(name, root, n_ep, args.seed, tmp, extra) if again else calib
            results.append(r)
            print(
                f"  bias_lab {recipe}: {r.epochs} epochs, {r.train_s:.0f} s, test {r.test_acc:.3f} "
                f"({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
    out = Path(args.out).resolve()
    write_figure(results, out, budget)
    load1 = os.getloadavg()

    print(
        "\n| recipe | epochs | train s | test accuracy | best val accuracy | run wall s | notes |\n|---|---:|---:|---:|---:|---:|---|"
    )
    for r in results:
        print(
            f"| {r.side} {r.model} | {r.epochs} | {r.train_s:.0f} | {r.test_acc:.3f} | {r.best_val:.3f} | {r.wall_s:.0f} | {r.note} |"
        )
    print("\nval accuracy per epoch (training s: accuracy):")
    for r in results:
        pts = ", ".join(f"{t:.{0 if budget >= 100 else 1}f}:{v:.2f}" for t, v in r.curve)
        print(f"- {r.side} {r.model}: {pts}")

    ours = [r for r in results if r.side == "bias_lab"]
    theirs = [r for r in results if r.side == "textbook"]
    print()
    if ours and theirs:
        b, t = max(ours, key=lambda r: r.test_acc), max(theirs, key=lambda r: r.test_acc)
        gap = (b.test_acc - t.test_acc) * 100
        print(
            f"TARGET bias_lab_best - textbook_best >= +5 pts test accuracy @{budget:g}s: bias_lab {b.model} {b.test_acc:.3f} "
            f"({b.train_s:.0f} s) vs textbook {t.model} {t.test_acc:.3f} ({t.train_s:.0f} s) = {gap:+.1f} pts "
            f"{'PASS' if gap >= 5 else 'FAIL'}"
        )
    else:
        print("TARGET bias_lab_best - textbook_best >= +5 pts test accuracy: SKIP (needs a lenet or resnet18 recipe)")
    hit = [r for r in ours if r.train_s <= 600 and r.test_acc >= 0.75]
    best = max((r for r in ours if r.train_s <= 600), key=lambda r: r.test_acc, default=None)
    shown = f"{best.model} {best.test_acc:.3f} in {best.train_s:.0f} s" if best else "no bias_lab run within 600 s"
    verdict = "PASS" if hit else "FAIL" if budget >= 600 else "SKIP (not reached at this budget; run --budget 600)"
    print(f"TARGET bias_lab >= 0.75 test accuracy within 600 training s: {shown} {verdict}")
    print(
        f"\nfigure: {out}\nload average {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end; "
        f"(total {time.perf_counter() - t_start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
