"""Where a dataset's image files are: list_files detects the layout of a data folder and lists its labelled
images (with their labels and ids) and its unlabelled test images.

Two layouts: Kaggle (train.csv with id,label + train/train/<id>.jpg or train/<id>.jpg, test images in test/test/
or test/) and ImageFolder (train/<class>/*.jpg or <class>/*.jpg, test images in test/). A folder that fits neither,
a train.csv that disagrees with its images, or one label spelt two ways is refused with a UserError that says how
to fix it. Listing the files is all that a cached load does before it reads its tensors (bias_lab.data), so it is
kept cheap: one scandir per folder, paths as str, each file's (size, mtime) taken with the listing for the cache's
fingerprint.
"""

from __future__ import annotations

import csv
import errno
import os
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from bias_lab.errors import UserError, check

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Listing:
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


def file_stem(path: str) -> str:
    """The file name without its folder and extension: the id of a test image, of a class folder's image."""
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


def class_names(root: Path) -> dict[str, str]:
    """label -> class name from the optional classes.csv next to train.csv (columns label and name, e.g. the
    competition's `label,wnid,name`); {} when the file is absent, unreadable or has no such columns."""
    try:
        header, rows = read_csv(root / "classes.csv")
    except (OSError, UserError):
        return {}
    lower = [c.lower() for c in header]
    if "label" not in lower or "name" not in lower:
        return {}
    i, j = lower.index("label"), lower.index("name")
    return {r[i]: r[j] for r in rows if max(i, j) < len(r) and r[i] and r[j]}


def _list_kaggle(root: Path) -> Listing:
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
    return Listing(
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


def _list_imagefolder(root: Path) -> Listing:
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
    return Listing(
        "imagefolder", files, labels, [f"{lab}/{file_stem(p)}" for p, lab in zip(files, labels)], test_files, stats
    )


def list_files(root: Path) -> Listing:
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


def _check_label_spellings(listing: Listing) -> Listing:
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
