"""Image files -> cached uint8 tensors -> stratified splits -> normalised, augmented batches.

Each image is decoded once (JPEG draft mode decodes straight to grayscale at reduced scale), resized to
image_size x image_size and stored in one uint8 tensor cached on disk under a fingerprint of the files and
the preprocessing settings; every later run and every Optuna trial loads that tensor (~100x faster than
decoding). Augmentation runs batched on tensors (on the GPU when there is one), never per image in Python.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import math
import os
import re
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from bias_lab.config import DataConfig, TrainConfig
from bias_lab.errors import UserError, check

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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


# ----------------------------------------------------------------------------------------------- layouts


@dataclass
class _Listing:
    """The image files of a dataset and their (size, mtime) as listed. A cached load does nothing but list and
    fingerprint, so paths are str (a Path costs ~2 us to build) and each file's stat comes with the listing."""

    layout: str
    train_files: list[str]
    train_labels: list[str]
    train_ids: list[str]
    test_files: list[str]
    stats: dict[str, tuple[int, int]]  # path -> (st_size, st_mtime_ns) of every file above, taken by _scan


def _scan(folder: Path, stats: dict[str, tuple[int, int]]) -> list[str]:
    """Names of the image files in `folder`, sorted; records each one's (size, mtime) in `stats` by path.

    scandir gives the file type with the listing and DirEntry.stat() stats relative to the open directory: the
    cheapest way to see every file. Hidden files (macOS '._x.jpg' forks) are not images."""
    base = f"{folder}{os.sep}"
    names = []
    with os.scandir(folder) as entries:
        for e in entries:
            if _is_image_name(e.name) and (st := _file_stat(e)) is not None:
                stats[base + e.name] = (st.st_size, st.st_mtime_ns)
                names.append(e.name)
    return sorted(names)


def _file_stat(e: os.DirEntry) -> os.stat_result | None:
    """The stat of a file to list, None for anything else.

    A symlink loop (ELOOP) is listed by its link's own stat, as a file that cannot be read: decoding it fails, so
    it is skipped with the unreadable-files warning that names it (an error with strict), like any unreadable
    file, instead of an OSError out of the listing."""
    try:
        return e.stat() if e.is_file() else None
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        return e.stat(follow_symlinks=False)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _images_in(folder: Path, stats: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Paths of the image files in `folder`, sorted by name."""
    return [f"{folder}{os.sep}{n}" for n in _scan(folder, {} if stats is None else stats)]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def natural_key(value: str) -> tuple:
    """Sort '2' before '10' when labels or ids are numbers, alphabetically otherwise."""
    return (0, float(value), value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else (1, 0.0, value)


def image_id(name: str) -> str:
    """The id of an image file name: '123.jpg' and '123' are the same image (Kaggle CSVs use either)."""
    stem, ext = os.path.splitext(os.path.basename(name) if os.sep in name else name)  # called per row: no Path
    return stem if ext.lower() in IMAGE_EXTS else name


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV, header stripped; tolerates a UTF-8 BOM and blank lines, not other encodings."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as a UTF-8 CSV") from e
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV ({e}): save it as a plain comma-separated file") from e
    if not table:
        return [], []
    return [c.strip() for c in table[0]], [[c.strip() for c in row] for row in table[1:]]


def _list_kaggle(root: Path) -> _Listing:
    header, table = read_csv(root / "train.csv")
    lower = [c.lower() for c in header]
    check(
        "id" in lower and "label" in lower,
        f"{root / 'train.csv'} needs columns 'id' and 'label' (found {header}): make its first line id,label",
    )
    i_id, i_label = lower.index("id"), lower.index("label")
    cell = lambda row, i: row[i] if i < len(row) else ""  # noqa: E731  (a short row has no label)
    rows = [(cell(r, i_id), cell(r, i_label)) for r in table]
    check(len(rows) > 0, f"{root / 'train.csv'} has no rows: add one 'id,label' line per training image")
    no_id = [n + 2 for n, (i, _) in enumerate(rows) if not i]  # +2: 1-based, after the header line
    check(
        not no_id,
        f"train.csv has rows without an id (line {', '.join(map(str, no_id[:3]))}): fill in the image id or delete the row",
    )
    ids = [image_id(i) for i, _ in rows]
    seen: set[str] = set()
    dupes = [raw for (raw, _), i in zip(rows, ids) if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    check(not dupes, f"train.csv has duplicate ids ({', '.join(dupes[:3])}): keep one row per image")
    blank = [i for i, lab in rows if not lab]
    check(not blank, f"train.csv has rows without a label ({', '.join(blank[:3])}): fill in their label")

    img_dir = _first_dir(root / "train" / "train", root / "train")
    check(img_dir is not None, f"{root} has train.csv but no train/train/ or train/ image folder: put the images there")
    assert img_dir is not None  # for the type checker: check() raised otherwise
    stats: dict[str, tuple[int, int]] = {}
    by_stem = {os.path.splitext(n)[0]: n for n in _scan(img_dir, stats)}
    by_name = set(by_stem.values())
    names, missing = [], []
    for i, _ in rows:
        n = i if i in by_name else by_stem.get(i)
        names.append(n)
        if n is None:
            missing.append(i)
    check(
        not missing,
        f"{len(missing)} ids in train.csv have no image in {img_dir} (e.g. {', '.join(missing[:3])}): "
        "add the images or remove those rows",
    )
    orphans = sorted(by_name - set(names))
    check(
        not orphans,
        f"{len(orphans)} images in {img_dir} have no row in train.csv (e.g. {', '.join(orphans[:3])}): "
        "label them in train.csv or move them out",
    )
    test_dir = _first_dir(root / "test" / "test", root / "test")
    return _Listing(
        "kaggle",
        [f"{img_dir}{os.sep}{n}" for n in names],
        [lab for _, lab in rows],
        ids,
        _images_in(test_dir, stats) if test_dir else [],
        stats,
    )


def _class_dirs(root: Path) -> list[Path]:
    """ImageFolder class folders: the sub-folders of root/train (or of root itself when it has no train/), hidden
    ones aside. The unlabelled test folder is root/test: it is left out only when the classes sit in root itself,
    where it is root's sub-folder too; under root/train a folder named test is a class like any other."""
    train_dir = _train_dir(root)
    return sorted(
        (
            d
            for d in train_dir.iterdir()
            if d.is_dir() and not d.name.startswith(".") and not (train_dir == root and d.name == "test")
        ),
        key=lambda d: d.name,
    )


def _train_dir(root: Path) -> Path:
    return root / "train" if (root / "train").is_dir() else root


def _list_imagefolder(root: Path) -> _Listing:
    train_dir = _train_dir(root)
    class_dirs = _class_dirs(root)
    files: list[str] = []
    labels: list[str] = []
    stats: dict[str, tuple[int, int]] = {}
    for d in class_dirs:
        imgs = _images_in(d, stats)
        check(bool(imgs), f"class folder {d} has no images: add images or remove the folder")
        files += imgs
        labels += [d.name] * len(imgs)
    test_dir = (
        _first_dir(root / "test" / "test", root / "test") if train_dir != root or (root / "test").is_dir() else None
    )
    test_files = []
    if test_dir:
        test_files = _images_in(test_dir, stats) or [
            p for d in sorted(test_dir.iterdir()) if d.is_dir() for p in _images_in(d, stats)
        ]
    return _Listing(
        "imagefolder", files, labels, [f"{lab}/{_stem(p)}" for p, lab in zip(files, labels)], test_files, stats
    )


def list_files(root: Path) -> _Listing:
    """Detect the layout of `root` and list its labelled and test images."""
    check(
        root.exists(),
        f"data folder {root} does not exist: set data to the folder holding train.csv or train/ (or data=demo)",
    )
    check(root.is_dir(), f"data path {root} is not a folder: set data to the folder that holds train.csv or train/")
    try:
        if (root / "train.csv").is_file():
            return _check_label_spellings(_list_kaggle(root))
        if any(_is_image_name(n) for d in _class_dirs(root) for n in os.listdir(d)):
            return _check_label_spellings(_list_imagefolder(root))
        empty = not any(root.iterdir())
    except PermissionError as e:
        raise UserError(f"cannot read {e.filename} (permission denied): make the data folder readable") from e
    if empty:
        raise UserError(f"data folder {root} is empty: copy the competition files into it (train.csv, train/, test/)")
    raise UserError(
        f"{root} is neither the Kaggle layout (train.csv + train/train/<id>.jpg) nor an ImageFolder "
        "(train/<class>/*.jpg): arrange the files in one of those layouts"
    )


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_label_spellings(listing: _Listing) -> _Listing:
    """Refuse one numeric label spelt two ways ('1' and '1.0', '01'): as strings they would be two classes.

    Refused rather than normalised: labels are written back verbatim into the submission, and which spelling the
    grader expects cannot be known here, while writing every label one way is a one-line edit for the user."""
    spellings: dict[Decimal, dict[str, int]] = {}
    for lab, n in Counter(listing.train_labels).items():  # the regex per distinct label: this runs on every load
        if _NUMBER.fullmatch(lab):
            spellings.setdefault(Decimal(lab).normalize(), {})[lab] = n  # exact: 17-digit ids stay apart
    for forms in spellings.values():
        if len(forms) > 1:
            (a, na), (b, nb) = sorted(forms.items(), key=lambda kv: -kv[1])[:2]
            if listing.layout == "kaggle":
                raise UserError(
                    f"train.csv spells one label two ways ('{a}' in {na} rows, '{b}' in {nb}), which would "
                    f"make two classes: write every such label the same way (e.g. all '{a}')"
                )
            raise UserError(
                f"class folders '{a}' and '{b}' are one label spelt two ways, which would make two classes: "
                "move their images into one folder"
            )
    return listing


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


def decode(path: str | Path, size: int, partial: bool = False) -> np.ndarray | None:
    """One image file -> size x size uint8 grayscale array, or None when it cannot be read.

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
    return Path(cfg.cache_dir or os.environ.get("BIAS_LAB_CACHE") or Path.home() / ".cache" / "bias_lab")


def _fingerprint(listing: _Listing, root: Path, size: int) -> str:
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


def _cached(listing: _Listing, root: Path, size: int, path: Path) -> dict:
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
    if cfg.data == "demo":
        from bias_lab.demo import ensure_demo

        root, layout = ensure_demo(cache_dir(cfg)), "demo"
    else:
        root, layout = Path(cfg.data).expanduser().resolve(), ""
    listing = list_files(root)
    layout = layout or listing.layout
    key = _fingerprint(listing, root, cfg.image_size)
    blob = _cached(listing, root, cfg.image_size, cache_dir(cfg) / f"{key}.pt")
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


def _build(listing: _Listing, root: Path, size: int) -> dict:
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
        "test_ids": _join([_stem(p) for p in listing.test_files]),
        "test_unreadable": [_stem(listing.test_files[i]) for i in bad_test if i not in partial],
        "test_partial": [_stem(listing.test_files[i]) for i in partial],
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
