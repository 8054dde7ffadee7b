"""Listed image files (bias_lab.files) -> cached uint8 tensors -> stratified splits -> normalised, augmented batches.

Each image is decoded once (JPEG draft mode decodes straight to grayscale at reduced scale), resized to
image_size x image_size and stored in one uint8 tensor cached on disk under a fingerprint of the files and
the preprocessing settings; every later run and every Optuna trial loads that tensor (~100x faster than
decoding). Augmentation runs batched on tensors (on the GPU when there is one), never per image in Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from bias_lab.config import DataConfig, TrainConfig
from bias_lab.errors import UserError, check, first_line
from bias_lab.files import Listing, file_stem, list_files, natural_key

CACHE_VERSION = 4  # bump when decoding or the cache's format changes, so stale caches are not reused
# Decode memory. PNG, TIFF, WebP... decode at full size (only JPEG has draft scaling): a 13000 px square PNG takes
# ~1 GB, and decode_all runs 8 decodes at once. Above MAX_DECODE_PIXELS an image is skipped like an unreadable one;
# above _BIG_PIXELS decodes take turns, so at most one large buffer (~5 bytes a pixel) is alive at a time.
MAX_DECODE_PIXELS = 40_000_000
_BIG_PIXELS = 4_000_000
_BIG_DECODE = threading.Lock()


@dataclass
class Dataset:
    """A decoded, labelled image set plus the unlabelled competition test images."""

    images: torch.Tensor  # uint8, N x 1 x S x S
    labels: torch.Tensor  # int64 class index into `classes`, N
    ids: list[str]
    classes: list[str]  # original label values, as written in train.csv / folder names
    test_images: torch.Tensor  # uint8, M x 1 x S x S (unlabelled; for submission only)
    test_ids: list[str]
    digest: str  # sha256 of pixels + labels: same digest <=> same data at the same image_size
    source: str
    layout: str  # "kaggle" | "imagefolder" | "demo"
    skipped: list[str] = field(default_factory=list)  # unreadable train files, left out
    test_unreadable: list[str] = field(default_factory=list)  # test ids kept as blank images
    test_partial: list[str] = field(default_factory=list)  # test ids decoded from a truncated file (what could be read)
    root: str = ""  # the folder the files came from (the generated folder for demo)


@dataclass
class Split:
    """Index sets of a stratified train / val / test split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# ----------------------------------------------------------------------------------------------- decoding


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit / 32-bit / float grayscale image as 8-bit, keeping its brightness where its range is known."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0  # 16-bit: 65535 -> 255
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0  # float in [0, 1]
    elif lo < 0 or hi > 255:  # an unknown range: stretch it
        a = (a - lo) * (255.0 / max(hi - lo, 1e-6))
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def decode(path: str | Path | IO[bytes], size: int, partial: bool = False) -> np.ndarray | None:
    """One image file (a path or an open binary file) -> size x size uint8 grayscale array, or None when it cannot be read.

    Converts odd modes (CMYK, RGBA, palette, 1-bit, 16-bit, float) rather than rejecting them; smaller images
    are upscaled. `partial=True` also accepts a truncated file (the missing part is filled by the decoder);
    it flips a PIL global, so call it from one thread only. Images over MAX_DECODE_PIXELS (after JPEG draft
    scaling) are not decoded: None, with a warning naming the file.
    """
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = partial
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("L", (size, size))  # decode at 1/2, 1/4 or 1/8 scale, straight to luma
            pixels = img.width * img.height  # from the header: nothing is decoded yet
            if pixels > MAX_DECODE_PIXELS:
                warnings.warn(
                    f"{path} is {img.width}x{img.height} px, over the {MAX_DECODE_PIXELS // 10**6} MP "
                    "decode limit: skipped; downscale it (e.g. to 4096 px a side) to use it",
                    stacklevel=2,
                )
                return None
            with _BIG_DECODE if pixels > _BIG_PIXELS else contextlib.nullcontext():
                return _to_gray(img, size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_gray(img: Image.Image, size: int) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    elif img.mode == "RGB":
        img = img.convert("L")  # directly: convert("RGB") of an RGB image is a full copy, the biggest buffer here
    elif img.mode != "L":
        img = img.convert("RGB").convert("L")  # via RGB: CMYK, palette, alpha and 1-bit all convert there
    img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def decode_all(paths: list[str], size: int, desc: str = "decode") -> tuple[np.ndarray, list[int]]:
    """Decode in threads (PIL releases the GIL while decoding). Returns (N x S x S array, indices that failed)."""
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    bad: list[int] = []
    if not paths:
        return out, bad
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(
            tqdm(pool.map(lambda p: decode(p, size), paths), total=len(paths), desc=desc, leave=False, unit="img")
        ):
            if arr is None:
                bad.append(i)
            else:
                out[i] = arr
    return out, bad


# ----------------------------------------------------------------------------------------------- cache


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("BIAS_LAB_CACHE") or Path.home() / ".cache" / "bias_lab").expanduser()


def check_cache_dir(cfg: DataConfig) -> Path:
    """The cache folder, refused in one line when it can never be one: it, or a folder above it, is a file (mkdir's
    raw FileExistsError otherwise, or every write warned). Reads no image. An unwritable folder is not refused: for
    real data it only costs speed and the resume (warned where they are written); the demo says so in `load`."""
    path = cache_dir(cfg)
    blocker = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        what = "cache_dir" if cfg.cache_dir else "$BIAS_LAB_CACHE" if os.environ.get("BIAS_LAB_CACHE") else "the cache"
        broken = not blocker.exists()  # a link to nothing
        raise UserError(
            f"{what} {path} cannot be a folder: {blocker if broken else blocker.resolve()} is "
            f"{'a broken link' if broken else 'a file'}; set cache_dir=<a folder> (or move that file away)"
        )
    return path


def _fingerprint(listing: Listing, root: Path, size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{listing.layout}|{size}".encode())
    skip = len(str(root)) + 1  # str slicing == relative_to(root) for paths listed under root, without pathlib's cost
    files = [*listing.train_files, *listing.test_files]
    labels = [*listing.train_labels, *["?"] * len(listing.test_files)]
    stats = [listing.stats[p] for p in files]  # taken while listing: no second stat per file
    h.update(
        "\n".join(f"{p[skip:]}|{lab}|{size}|{mtime}" for p, lab, (size, mtime) in zip(files, labels, stats)).encode()
    )
    return h.hexdigest()[:24]


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `path`: readers never see a partial file, a failure leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(listing: Listing, root: Path, size: int, path: Path) -> dict:
    """The decoded blob from the cache file, else decoded now and cached. A damaged cache file is rebuilt; an
    unwritable cache folder only costs speed (warned), never the run."""
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # truncated by a full disk, written by another torch: decode again
            warnings.warn(f"ignoring the unreadable cache file {path}; decoding again", stacklevel=3)
    blob = _build(listing, root, size)
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except OSError as e:
        warnings.warn(
            f"cannot write the decoded-image cache {path} ({e.strerror}): set cache_dir to a writable folder "
            "to make later runs start faster",
            stacklevel=3,
        )
    return blob


def load(cfg: DataConfig) -> Dataset:
    """Load `cfg.data` as decoded tensors, from the cache when the files and settings are unchanged."""
    cfg.validate()  # also for callers that skip the commands' config.validate (benchmarks, notebooks)
    cache = check_cache_dir(cfg)
    if cfg.data == "demo":
        from bias_lab.demo import ensure_demo

        try:
            root, layout = ensure_demo(cache), "demo"
        except OSError as e:  # the demo is generated into the cache on first use: it must be writable then
            raise UserError(
                f"cannot write the demo data into the cache folder {cache} ({e.strerror or first_line(e)}): "
                "set cache_dir to a writable folder"
            ) from None
    else:
        root, layout = Path(cfg.data).expanduser().resolve(), ""
    listing = list_files(root)
    layout = layout or listing.layout
    key = _fingerprint(listing, root, cfg.image_size)
    blob = _cached(listing, root, cfg.image_size, cache / f"{key}.pt")
    skipped = [str(root / p) for p in blob["skipped"]]
    bad_test = blob["test_unreadable"] + blob["test_partial"]
    if cfg.strict and (skipped or bad_test):
        first = skipped[0] if skipped else f"test image {bad_test[0]}"
        raise UserError(
            f"unreadable image {first} (and {len(skipped) + len(bad_test) - 1} more): fix or remove it, or set strict=false to skip it"
        )
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable images: {', '.join(skipped)}", stacklevel=2)
    return Dataset(
        images=blob["images"],
        labels=blob["labels"],
        ids=_split(blob["ids"]),
        classes=blob["classes"],
        test_images=blob["test_images"],
        test_ids=_split(blob["test_ids"]),
        digest=blob["digest"],
        source="demo (synthetic)" if layout == "demo" else str(root),
        layout=layout,
        skipped=skipped,
        test_unreadable=blob["test_unreadable"],
        test_partial=blob["test_partial"],
        root=str(root),
    )


def _build(listing: Listing, root: Path, size: int) -> dict:
    train, bad = decode_all(listing.train_files, size, "decode train")
    test, bad_test = decode_all(listing.test_files, size, "decode test")
    # A submission needs a row for every test image: a truncated one is predicted from what can be read,
    # one with nothing readable stays an all-zero image (and is listed, for the submission to handle).
    partial = []
    for i in bad_test:
        arr = decode(listing.test_files[i], size, partial=True)
        if arr is not None:
            test[i] = arr
            partial.append(i)
    keep = np.setdiff1d(np.arange(len(train)), bad)
    classes = sorted(set(listing.train_labels), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[listing.train_labels[i]] for i in keep], dtype=np.int64)
    images = train[keep]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + "|".join(classes).encode()).hexdigest()[:16]
    return {
        "images": torch.from_numpy(images).unsqueeze(1),
        "labels": torch.from_numpy(labels),
        "ids": _join([listing.train_ids[i] for i in keep]),
        "classes": classes,
        "test_images": torch.from_numpy(test).unsqueeze(1),
        "test_ids": _join([file_stem(p) for p in listing.test_files]),
        "test_unreadable": [file_stem(listing.test_files[i]) for i in bad_test if i not in partial],
        "test_partial": [file_stem(listing.test_files[i]) for i in partial],
        "digest": digest,
        "skipped": [os.path.relpath(listing.train_files[i], root) for i in bad],
    }


def _join(ids: list[str]) -> str:
    """Ids stored as one NUL-separated string: unpickling 2,000 small strings took 8 of torch.load's 10 ms."""
    return "\0".join(ids)


def _split(ids: str) -> list[str]:
    return ids.split("\0") if ids else []


# ----------------------------------------------------------------------------------------------- splits


def stratified_split(
    labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int, classes: list[str] | None = None
) -> Split:
    """Per-class seeded shuffle, then the first round(n*test) to test, next round(n*val) to val, rest to train.

    Every non-empty fraction gets at least one image of each class. `classes` only names labels in errors.
    """
    y = labels.numpy()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        if test_fraction > 0:
            n_test = max(n_test, 1)
        if val_fraction > 0:
            n_val = max(n_val, 1)
        check(
            len(idx) - n_test - n_val >= 1,
            f"class {classes[c] if classes else f'index {c}'} has only {len(idx)} image(s), too few for a stratified "
            f"train/val/test split (it needs {n_test + n_val + 1}): add images to it or set val_fraction/test_fraction to 0",
        )
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return Split(**{k: np.sort(np.concatenate(v)) for k, v in parts.items()})


def check_classes(ds: Dataset) -> None:
    """Every class must have images; training needs at least two classes."""
    counts = torch.bincount(ds.labels, minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts.tolist()) if n == 0]
    if empty:
        raise UserError(f"class {empty[0]} has no readable images: add images for it or remove its label")
    check(len(ds.classes) >= 2, f"{ds.source} has a single class ({ds.classes[0]}): a classifier needs two or more")


# ----------------------------------------------------------------------------------------------- batches


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the pixels in [0, 1], computed on the train split only.

    From sums of integers in float64, which are exact in any order: a float32 mean depends on how many threads
    reduced it, and training amplifies that last bit into different metrics for the same seed.
    """
    x = images.double()
    n = max(x.numel(), 2)
    s1, s2 = float(x.sum()), float((x * x).sum())
    var = max(s2 - s1 * s1 / n, 0.0) / (n - 1)
    return s1 / n / 255, max(math.sqrt(var) / 255, 1e-3)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 with zero mean, unit std."""
    return images.float().sub_(mean * 255.0).div_(std * 255.0)


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (TrainConfig.crop_scale, 1.0),
    *,
    batch: int | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Random resized crop (area `scale`, aspect 3/4..4/3) + horizontal flip, the whole batch in one grid_sample.

    Under data parallelism `x` is `rows` of a global batch of `batch` samples: the crops are drawn for the whole
    batch, so every rank's generator stays in step and each sample gets the crop a single process would give it.
    """
    n = x.shape[0] if batch is None else batch
    u = torch.rand(n, 4, generator=gen, device=gen.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * np.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (u[:, 2] * 2 - 1) * (1 - sx)  # crop centre, kept inside the image
    ty = (u[:, 3] * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
    sx, sy, tx, ty, flip = sx[rows], sy[rows], tx[rows], ty[rows], flip[rows]
    # The grid F.affine_grid would build from this diagonal theta, without its batched matmul (which cost ~5x the
    # grid_sample on a CPU): x depends on the column only, y on the row only. Pixel centres, align_corners=False.
    h, w = x.shape[-2:]
    cols = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device, dtype=x.dtype)
    lines = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device, dtype=x.dtype)
    gx = (sx * flip).to(x.dtype)[:, None, None] * cols + tx.to(x.dtype)[:, None, None]  # N x 1 x W
    gy = sy.to(x.dtype)[:, None, None] * lines[:, None] + ty.to(x.dtype)[:, None, None]  # N x H x 1
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # N x H x W x 2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
