"""The data layer on files made here: both layouts, the decoded-tensor cache, unreadable and odd files, the split,
augmentation. In-process (data.load), no MLflow. Also holds the small file writers test_bad_input/test_submit use.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from bias_lab import data
from bias_lab.config import DataConfig
from bias_lab.errors import UserError

# ----------------------------------------------------------------------------------------------- writers


def picture(label: int, seed: int, size: int = 40) -> Image.Image:
    """An RGB image whose class shows in grayscale: a bright disc (even labels) or bar (odd) on a noisy background."""
    rng = np.random.default_rng(seed)
    a = rng.normal(70, 20, (size, size, 3))
    yy, xx = np.mgrid[:size, :size] - size / 2
    mask = (xx**2 + yy**2 < (size / 4) ** 2) if label % 2 == 0 else (abs(xx) < size / 8)
    a[mask] += 120
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def save_as(img: Image.Image, path: Path, kind: str = "rgb") -> None:
    """Write `img` as one of the odd kinds a dataset may hold (all decodable) or a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "rgb":
        img.save(path, "JPEG", quality=90)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG")
    elif kind == "gray":
        img.convert("L").save(path, "JPEG")
    elif kind in ("rgba", "palette", "la", "bilevel"):
        img.convert({"rgba": "RGBA", "palette": "P", "la": "LA", "bilevel": "1"}[kind]).save(path, "PNG")
    elif kind == "gray16":
        Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(path, "PNG")
    elif kind == "small":
        img.resize((8, 8)).save(path, "JPEG")
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        buf = io.BytesIO()
        img.resize((120, 120)).save(buf, "JPEG", quality=95)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "corrupt":
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        b = buf.getvalue()
        path.write_bytes(
            b[:20] + bytes(np.random.default_rng(0).integers(0, 256, len(b) - 40, dtype=np.uint8)) + b[-20:]
        )
    else:
        raise ValueError(kind)


def write_kaggle(
    root: Path,
    labels: dict[str, int] | None = None,
    per_class: int = 6,
    n_test: int = 4,
    ext_in_csv: bool = False,
    flat: bool = False,
    kinds: dict[str, str] | None = None,
    test_kinds: dict[str, str] | None = None,
    sample: bool = True,
) -> Path:
    """A Kaggle-layout folder: train.csv (id,label), train/train/<id>.jpg (or train/<id>.jpg with flat), test/test/.

    labels: {label value: count}; kinds: {id: kind} for train files written oddly; test_kinds the same for test ids.
    """
    labels = labels or {str(c): per_class for c in (1, 2, 3)}
    img_dir = root / "train" if flat else root / "train" / "train"
    rows, k = [], 0
    for li, (lab, n) in enumerate(labels.items()):
        for _ in range(n):
            k += 1
            i = str(1000 + k)
            save_as(picture(li, k), img_dir / f"{i}.jpg", (kinds or {}).get(i, "rgb"))
            rows.append((f"{i}.jpg" if ext_in_csv else i, lab))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *rows])
    test_ids = [str(5000 + j) for j in range(n_test)]
    for j, i in enumerate(test_ids):
        save_as(
            picture(j % len(labels), 100 + j), root / "test" / "test" / f"{i}.jpg", (test_kinds or {}).get(i, "rgb")
        )
    if sample:
        with open(root / "sample_submission.csv", "w", newline="") as f:
            csv.writer(f).writerows([("id", "label"), *((i, next(iter(labels))) for i in test_ids)])
    return root


def write_imagefolder(root: Path, classes: dict[str, int], n_test: int = 3) -> Path:
    """train/<class>/*.png plus an unlabelled test/ folder."""
    k = 0
    for ci, (name, n) in enumerate(classes.items()):
        for j in range(n):
            k += 1
            save_as(picture(ci, k), root / "train" / name / f"img{j}.png", "rgba")
    for j in range(n_test):
        save_as(picture(j, 200 + j), root / "test" / f"t{j}.jpg")
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(data=str(root), image_size=kw.pop("image_size", 32), **kw)


# ----------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("ext_in_csv,flat", [(False, False), (True, False), (False, True)])
def test_kaggle_layout(tmp_path: Path, ext_in_csv: bool, flat: bool) -> None:
    """ids with or without extension, images in train/train/ or train/; labels keep their values, sorted numerically."""
    root = write_kaggle(tmp_path / "k", labels={"10": 4, "2": 5, "7": 3}, ext_in_csv=ext_in_csv, flat=flat)
    ds = data.load(cfg(root))
    assert ds.layout == "kaggle" and ds.root == str(root.resolve())
    assert ds.classes == ["2", "7", "10"]  # numeric order, original strings
    assert ds.images.shape == (12, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.ids[:4] == ["1001", "1002", "1003", "1004"]  # never with the extension
    assert [ds.classes[i] for i in ds.labels.tolist()] == ["10"] * 4 + ["2"] * 5 + ["7"] * 3
    assert ds.test_ids == ["5000", "5001", "5002", "5003"] and ds.test_images.shape == (4, 1, 32, 32)
    assert ds.skipped == [] and ds.test_unreadable == []


def test_imagefolder_layout(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "f", {"cat": 3, "dog": 4})
    ds = data.load(cfg(root, image_size=48))
    assert ds.layout == "imagefolder" and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0] * 3 + [1] * 4 and ds.ids[0] == "cat/img0"
    assert ds.images.shape == (7, 1, 48, 48) and ds.test_ids == ["t0", "t1", "t2"]


def test_class_named_test_is_kept(tmp_path: Path) -> None:
    """train/test/ is a class; only <root>/test is the unlabelled folder (and, without train/, <root>/test is left out)."""
    root = write_imagefolder(tmp_path / "f", {"cat": 3, "dog": 3, "test": 3}, n_test=2)
    ds = data.load(cfg(root))
    assert ds.layout == "imagefolder" and ds.classes == ["cat", "dog", "test"] and ds.labels.tolist()[-3:] == [2] * 3
    assert ds.test_ids == ["t0", "t1"]
    flat = tmp_path / "flat"  # classes straight in the data folder: its test/ is the unlabelled folder, not a class
    for name in ("cat", "dog"):
        for j in range(3):
            save_as(picture(j, j), flat / name / f"img{j}.jpg")
    save_as(picture(0, 9), flat / "test" / "u.jpg")
    ds = data.load(cfg(flat))
    assert ds.classes == ["cat", "dog"] and ds.test_ids == ["u"]


def test_one_numeric_label_spelt_two_ways_is_refused(tmp_path: Path) -> None:
    """'1' and '1.0' (or '01') are one label: never two silent classes, a one-line error naming both spellings."""
    root = write_kaggle(tmp_path / "k", labels={"1": 4, "1.0": 2, "2": 4})
    with pytest.raises(UserError, match=r"train.csv spells one label two ways \('1' in 4 rows, '1.0' in 2\).*all '1'"):
        data.load(cfg(root))
    folder = write_imagefolder(tmp_path / "f", {"01": 2, "1": 2, "2": 2})
    with pytest.raises(UserError, match="class folders '01' and '1' are one label.*one folder"):
        data.load(cfg(folder))
    ok = write_kaggle(tmp_path / "ok", labels={"1": 3, "10": 3, "1.5": 3, "a": 3})  # distinct numbers, words: fine
    assert data.load(cfg(ok)).classes == ["1", "1.5", "10", "a"]


def test_hidden_files_are_not_images(tmp_path: Path) -> None:
    """macOS '._x.jpg' resource forks (copied along with a dataset) are neither training images nor orphans."""
    root = write_kaggle(tmp_path / "k", labels={"a": 2, "b": 2})
    (root / "train" / "train" / "._1001.jpg").write_bytes(b"\x00\x05\x16\x07 not a picture")
    (root / "test" / "test" / ".5000.jpg").write_bytes(b"junk")
    ds = data.load(cfg(root))
    assert len(ds.ids) == 4 and ds.skipped == [] and ds.test_ids == ["5000", "5001", "5002", "5003"]
    folder = write_imagefolder(tmp_path / "f", {"cat": 2, "dog": 2})
    (folder / "train" / "cat" / "._img0.png").write_bytes(b"junk")
    assert data.load(cfg(folder)).ids == ["cat/img0", "cat/img1", "dog/img0", "dog/img1"]


def test_pixels_follow_the_picture(tmp_path: Path) -> None:
    """Decoded pixels are the grayscale of the file (not blank, not scrambled): the bright disc is in the middle."""
    root = write_kaggle(tmp_path / "k", labels={"a": 3, "b": 3})
    ds = data.load(cfg(root))
    disc = ds.images[ds.labels == 0].float()
    assert disc[..., 12:20, 12:20].mean() > disc[..., :4, :4].mean() + 60


# ----------------------------------------------------------------------------------------------- cache


def test_second_load_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_kaggle(tmp_path / "k")
    first = data.load(cfg(root))

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although the cache holds these files")

    monkeypatch.setattr(data, "decode", no_decoding)
    second = data.load(cfg(root))
    assert torch.equal(first.images, second.images) and torch.equal(first.test_images, second.test_images)
    assert first.digest == second.digest and first.ids == second.ids
    with pytest.raises(AssertionError, match="decoded although"):  # another size is another cache entry
        data.load(cfg(root, image_size=40))
    (root / "train" / "train" / "1001.jpg").touch()  # a changed file (mtime) invalidates the entry
    with pytest.raises(AssertionError, match="decoded although"):
        data.load(cfg(root))


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = write_kaggle(tmp_path / "k")
    first = data.load(cfg(root))
    [entry] = data.cache_dir(cfg(root)).glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # a disk that filled up mid-write, say
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = data.load(cfg(root))
    assert torch.equal(first.images, again.images)
    assert data.load(cfg(root)).digest == first.digest  # and the rebuilt entry is good again


# ----------------------------------------------------------------------------------------------- odd files


BROKEN = {"1002": "zero", "1003": "text", "1008": "truncated", "1009": "corrupt"}
ODD = {
    "1001": "cmyk",
    "1004": "rgba",
    "1005": "palette",
    "1006": "gray16",
    "1007": "gray",
    "1010": "la",
    "1011": "bilevel",
    "1012": "small",
}


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = write_kaggle(
        tmp_path / "k", labels={"1": 6, "2": 6}, kinds=BROKEN, test_kinds={"5001": "zero", "5002": "truncated"}
    )
    with pytest.warns(UserWarning, match="skipped 4 unreadable images") as rec:
        ds = data.load(cfg(root))
    message = str(rec[0].message)
    assert all(f"{i}.jpg" in message for i in BROKEN)  # each file named
    assert len(ds.skipped) == 4 and len(ds.labels) == 8 and "1002" not in ds.ids
    # test images keep their row: a truncated one is decoded as far as it goes, a zero-byte one stays blank
    assert ds.test_ids == ["5000", "5001", "5002", "5003"]
    assert ds.test_unreadable == ["5001"] and ds.test_partial == ["5002"]
    assert ds.test_images[1].max() == 0 and ds.test_images[2].float().std() > 5
    with pytest.raises(UserError, match="unreadable image .*strict=false"):
        data.load(cfg(root, strict=True))


def test_symlink_loop_is_skipped_as_unreadable(tmp_path: Path) -> None:
    """A looping symlink is an unreadable file: skipped with the warning naming it (strict: an error), not a crash."""
    root = write_imagefolder(tmp_path / "f", {"cat": 3, "dog": 3})
    (root / "train" / "cat" / "loop.jpg").symlink_to("loop.jpg")
    (root / "test" / "a.jpg").symlink_to("b.jpg")
    (root / "test" / "b.jpg").symlink_to("a.jpg")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*cat/loop\.jpg"):
        ds = data.load(cfg(root))
    assert ds.skipped == [str(root.resolve() / "train" / "cat" / "loop.jpg")] and len(ds.labels) == 6
    assert ds.test_unreadable == ["a", "b"]
    with pytest.raises(UserError, match="unreadable image .*loop.jpg"):
        data.load(cfg(root, strict=True))


def test_huge_image_is_skipped_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over MAX_DECODE_PIXELS a PNG is skipped from its header (its pixels never decoded); a JPEG as large still
    decodes, at draft scale. 7000x6000 (42 MP) of a flat colour: a 0.2 MB file."""
    Image.new("L", (7000, 6000), 128).save(tmp_path / "big.png", compress_level=1)
    Image.new("L", (7000, 6000), 128).save(tmp_path / "big.jpg", quality=50)
    assert 7000 * 6000 > data.MAX_DECODE_PIXELS
    out = data.decode(tmp_path / "big.jpg", 32)  # draft: 1/8 scale, 875x750
    assert out is not None and out.shape == (32, 32) and abs(int(out.mean()) - 128) <= 2

    def no_full_decode(self, *_a):
        raise AssertionError(f"decoded a {self.size} image in full")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_full_decode)
    with pytest.warns(UserWarning, match="big.png is 7000x6000 px, over the 40 MP decode limit: skipped; downscale it"):
        assert data.decode(tmp_path / "big.png", 32) is None


def test_large_decodes_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images over _BIG_PIXELS are decoded one at a time, so the thread pool holds one large buffer, not eight."""
    import threading
    import time

    paths = []
    for j in range(6):
        save_as(picture(0, j), tmp_path / f"{j}.png", "rgba")
        paths.append(str(tmp_path / f"{j}.png"))
    active, peak, lock = [0], [0], threading.Lock()
    to_gray = data._to_gray

    def counting(img, size):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return to_gray(img, size)

    monkeypatch.setattr(data, "_to_gray", counting)
    monkeypatch.setattr(data, "_BIG_PIXELS", 40 * 40 - 1)  # every 40x40 picture counts as large
    out, bad = data.decode_all(paths, 32)
    assert bad == [] and out.shape == (6, 32, 32) and peak[0] == 1


def test_odd_modes_are_converted(tmp_path: Path) -> None:
    """CMYK, RGBA, palette, 16-bit, grayscale, LA, 1-bit and tiny images all decode, looking like their RGB source."""
    root = write_kaggle(tmp_path / "k", labels={"1": 6, "2": 6}, kinds=ODD)
    plain = data.load(cfg(write_kaggle(tmp_path / "plain", labels={"1": 6, "2": 6})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped" warning
        ds = data.load(cfg(root))
    assert len(ds.labels) == 12 and ds.skipped == []
    for i, kind in ODD.items():
        n = ds.ids.index(i)
        diff = (ds.images[n].float() - plain.images[n].float()).abs().mean()
        assert diff < (60 if kind in ("bilevel", "small") else 12), (kind, float(diff))  # 16-bit keeps its brightness


def test_decode_upscales_small_images(tmp_path: Path) -> None:
    save_as(picture(0, 1), tmp_path / "s.jpg", "small")
    assert data.decode(tmp_path / "s.jpg", 64).shape == (64, 64)


def test_16_bit_keeps_its_brightness(tmp_path: Path) -> None:
    """A dark 16-bit scan stays dark (value / 257), it is not contrast-stretched to 0..255."""
    a = np.random.default_rng(0).integers(1000, 1300, (40, 40)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "dark.png")
    out = data.decode(tmp_path / "dark.png", 32)
    assert out is not None and 3 <= out.min() and out.max() <= 6


# ----------------------------------------------------------------------------------------------- split


def test_split_is_stratified_disjoint_covering_and_seeded() -> None:
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 60)
    s = data.stratified_split(labels, 0.15, 0.25, seed=3)
    parts = [s.train, s.val, s.test]
    assert sum(map(len, parts)) == 120 and len(np.unique(np.concatenate(parts))) == 120  # covering, disjoint
    for c, n in ((0, 40), (1, 20), (2, 60)):
        got = [int((labels[torch.from_numpy(p)] == c).sum()) for p in parts]
        assert got == [n - round(n * 0.15) - round(n * 0.25), round(n * 0.15), round(n * 0.25)], c
    again = data.stratified_split(labels, 0.15, 0.25, seed=3)
    other = data.stratified_split(labels, 0.15, 0.25, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.train, again.val, again.test]))
    assert not np.array_equal(s.test, other.test)


def test_split_names_a_class_too_small() -> None:
    with pytest.raises(UserError, match="class 7 has only 2 image.*add images"):
        data.stratified_split(torch.tensor([0] * 10 + [1] * 2), 0.15, 0.15, 0, classes=["3", "7"])
    s = data.stratified_split(torch.tensor([0] * 10 + [1] * 2), 0.0, 0.0, 0)  # no val/test asked: fine
    assert len(s.train) == 12 and len(s.val) == len(s.test) == 0


# ----------------------------------------------------------------------------------------------- augmentation


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.rand(16, 1, 32, 32)
    a = data.augment(x, torch.Generator().manual_seed(0))
    b = data.augment(x, torch.Generator().manual_seed(0))
    c = data.augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.min() >= x.min() - 1e-5 and a.max() <= x.max() + 1e-5  # a crop/flip, not new intensities


def test_normalize_and_stats() -> None:
    imgs = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    mean, std = data.pixel_stats(imgs)
    z = data.normalize(imgs, mean, std)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-2


# ----------------------------------------------------------------------------------------------- the demo generator


def test_demo_is_deterministic_and_hides_shapes_as_asked(tmp_path: Path) -> None:
    """The same seed writes the same files; `p_hidden` decides which images hide their shape. A clear shape spans
    most of the image at 90-160 grey levels from the background, a hidden one is small and within the noise: the
    grayscale spread of an image tells them apart. `{}` hides none (version 4's images), the default some."""
    from bias_lab.demo import P_HIDDEN, write_demo

    kw = {"seed": 5, "n_train": 12, "n_test": 1}
    a, b = write_demo(tmp_path / "a", **kw), write_demo(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 13 + 5 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    def spreads(root: Path) -> np.ndarray:
        return np.array([np.asarray(Image.open(p).convert("L"), float).std() for p in sorted(root.rglob("*.jpg"))])

    clear = spreads(write_demo(tmp_path / "clear", **kw, p_hidden={}))
    hidden = spreads(write_demo(tmp_path / "hidden", **kw, p_hidden=dict.fromkeys(range(1, 5), 1.0)))
    cut = (clear.min() + hidden.max()) / 2
    assert hidden.max() < clear.min(), (hidden.max(), clear.min())  # the spread separates them in these 104 images
    share = np.mean(spreads(a) < cut)  # the default: 35% of the pair, 10% of the others, over 52 images
    assert 0.05 <= share <= 0.45 and P_HIDDEN[1] > P_HIDDEN[3], share
