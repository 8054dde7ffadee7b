"""Bad input gets a clear answer: a generated corpus of broken data folders, files and parameters, fed to the
data layer in-process and to the CLI in subprocesses, as a user would meet them.

Every answer must be: exit code 2 (UserError), one visible line `error: <problem>: <fix>`, no traceback, no
partial output (no CSV, no temporary file, no MLflow run left RUNNING). Odd but valid images (CMYK, RGBA,
palette, 16-bit, grayscale, tiny) must train. Subprocesses cost ~5 s of imports each, so the CLI corpus runs
in ONE subprocess that calls the real `bias-lab` entry (click's main, standalone) once per case, plus a few
single-command processes started in parallel for what only a fresh process shows (exit status, entry-point
script, an unreachable tracking server).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from bias_lab import data
from bias_lab.errors import UserError

from .conftest import REPO
from .test_data import ODD, picture, save_as, write_imagefolder, write_kaggle
from .test_submit import only_error_line

# ----------------------------------------------------------------------------------------------- the corpus


def _rewrite_csv(root: Path, rows: list[tuple[str, ...]]) -> Path:
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _kaggle(root: Path, **kw) -> Path:
    return write_kaggle(root, labels=kw.pop("labels", {"1": 6, "2": 6}), n_test=2, **kw)


def make_corpus(base: Path) -> dict[str, Path]:
    """One folder per problem (names are the case ids)."""
    c: dict[str, Path] = {}
    c["missing"] = base / "does-not-exist"
    c["empty"], c["not_a_folder"] = base / "empty", base / "file.txt"
    c["empty"].mkdir()
    c["not_a_folder"].write_text("x")
    c["neither"] = base / "neither"
    (c["neither"] / "stuff").mkdir(parents=True)
    (c["neither"] / "stuff" / "notes.txt").write_text("no images here")
    (c["neither"] / "readme.md").write_text("hello")
    c["only_test"] = base / "only_test"
    save_as(picture(0, 1), c["only_test"] / "test" / "a.jpg")
    c["missing_column"] = _rewrite_csv(_kaggle(base / "missing_column"), [("id", "class"), ("1001", "1")])
    root = _kaggle(base / "duplicate_ids")
    rows = list(csv.reader(open(root / "train.csv")))
    c["duplicate_ids"] = _rewrite_csv(root, [*rows, ("1001.jpg", "2")])  # '1001' and '1001.jpg' are one image
    root = _kaggle(base / "id_without_image")
    (root / "train" / "train" / "1003.jpg").unlink()
    c["id_without_image"] = root
    root = _kaggle(base / "image_without_id")
    save_as(picture(0, 9), root / "train" / "train" / "9999.jpg")
    c["image_without_id"] = root
    root = _kaggle(base / "not_utf8")
    (root / "train.csv").write_bytes("id,label\n1001,caf\xe9\n".encode("latin-1"))
    c["not_utf8"] = root
    c["empty_class_folder"] = write_imagefolder(base / "empty_class_folder", {"cat": 4, "dog": 4})
    (c["empty_class_folder"] / "train" / "emu").mkdir()
    c["one_image_class"] = _kaggle(base / "one_image_class", labels={"1": 6, "2": 6, "3": 1})
    c["no_readable_class"] = _kaggle(
        base / "no_readable_class", labels={"1": 6, "2": 6, "3": 2}, kinds={"1013": "zero", "1014": "text"}
    )
    c["single_class"] = _kaggle(base / "single_class", labels={"1": 6})
    c["bad_files"] = _kaggle(
        base / "bad_files", kinds={"1002": "zero", "1003": "text", "1008": "truncated", "1009": "corrupt"}
    )
    c["odd_modes"] = _kaggle(base / "odd_modes", kinds=ODD)
    c["ok"] = _kaggle(base / "ok")
    return c


# (case, folder, expected error: problem fragment, fix fragment) -- the data layer, in-process
DATA_CASES = [
    ("missing", "does not exist", "set data to"),
    ("empty", "is empty", "copy the competition files"),
    ("not_a_folder", "is not a folder", "set data to"),
    ("neither", "neither the Kaggle layout", "arrange the files"),
    ("only_test", "neither the Kaggle layout", "arrange the files"),
    ("missing_column", "needs columns 'id' and 'label'", "make its first line id,label"),
    ("duplicate_ids", "duplicate ids (1001.jpg)", "keep one row per image"),
    ("id_without_image", "have no image", "add the images or remove those rows"),
    ("image_without_id", "have no row in train.csv (e.g. 9999.jpg)", "label them in train.csv"),
    ("not_utf8", "is not UTF-8 text", "save it as a UTF-8 CSV"),
    ("empty_class_folder", "class folder", "add images or remove the folder"),
    ("no_readable_class", "class 3 has no readable images", "add images"),
    ("single_class", "single class", "two or more"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def check_message(message: str, problem: str, fix: str) -> None:
    assert "\n" not in message and problem in message and fix in message, message
    assert message.index(problem) < message.index(fix), message  # '<problem>: <fix>'


@pytest.mark.parametrize("case,problem,fix", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_layer_rejects(corpus: dict[str, Path], case: str, problem: str, fix: str, recwarn) -> None:
    with pytest.raises(UserError) as err:
        ds = data.load(data.DataConfig(data=str(corpus[case]), image_size=32))
        data.check_classes(ds)
    check_message(str(err.value), problem, fix)


def test_data_layer_class_too_small_for_a_split(corpus: dict[str, Path]) -> None:
    ds = data.load(data.DataConfig(data=str(corpus["one_image_class"]), image_size=32))
    with pytest.raises(UserError) as err:
        data.stratified_split(ds.labels, 0.15, 0.15, 0, classes=ds.classes)
    check_message(str(err.value), "class 3 has only 1 image(s)", "add images to it")


@pytest.mark.parametrize("size", [0, 16, 31, 225, 4096])
def test_data_layer_image_size_range(corpus: dict[str, Path], size: int) -> None:
    with pytest.raises(UserError) as err:
        data.load(data.DataConfig(data=str(corpus["ok"]), image_size=size))
    check_message(str(err.value), f"image_size={size} is out of range", "use a value in 32..224")


# ----------------------------------------------------------------------------------------------- the CLI

# One subprocess runs every case through the real click entry (standalone: its own exit codes and messages),
# capturing each case's stdout/stderr; an exception that escapes the CLI is recorded as a traceback.
DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback, warnings
    import mlflow
    from bias_lab.cli import main
    cases, results = json.load(open(sys.argv[1])), []
    for args in cases:
        out, err, code = io.StringIO(), io.StringIO(), None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                main.main(args, prog_name="bias-lab", standalone_mode=True)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "escaped"
        results.append({"args": args, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                        "left_active": mlflow.active_run() is not None})
        while mlflow.active_run():
            mlflow.end_run("FAILED")
    json.dump(results, open(sys.argv[2], "w"))
    """
)

FAST = ["--image-size", "32", "--model", "lenet", "--epochs", "1", "--batch-size", "16"]


@dataclass
class Case:
    name: str
    args: list[str]  # after the command's --data
    code: int
    problem: str = ""
    fix: str = ""
    command: str = "train"
    folder: str = "ok"


CLI_CASES = [
    Case("missing_data", [], 2, "does not exist", "set data to", folder="missing"),
    Case("empty_data", [], 2, "is empty", "copy the competition files", folder="empty"),
    Case("neither_layout", [], 2, "neither the Kaggle layout", "arrange the files", folder="neither"),
    Case("csv_missing_column", [], 2, "needs columns 'id' and 'label'", "make its first line", folder="missing_column"),
    Case("csv_duplicate_ids", [], 2, "duplicate ids", "keep one row per image", folder="duplicate_ids"),
    Case("csv_id_without_image", [], 2, "have no image", "add the images", folder="id_without_image"),
    Case("csv_image_without_id", [], 2, "have no row in train.csv", "label them", folder="image_without_id"),
    Case("class_with_one_image", [], 2, "has only 1 image(s)", "add images to it", folder="one_image_class"),
    Case("class_with_no_images", [], 2, "class folder", "add images or remove the folder", folder="empty_class_folder"),
    Case(
        "class_with_no_readable_images",
        [],
        2,
        "class 3 has no readable images",
        "add images",
        folder="no_readable_class",
    ),
    Case("bad_files_strict", ["--strict", "true"], 2, "unreadable image", "strict=false", folder="bad_files"),
    Case("bad_files_skipped", [], 0, folder="bad_files"),
    Case("odd_modes_train", [], 0, folder="odd_modes"),
    Case("p0_above_1", ["--bias", "true", "--p0", "1.5"], 2, "p0=1.5 is not a probability", "use a value in [0, 1]"),
    Case("p1_below_0", ["--bias", "true", "--p1", "-0.1"], 2, "p1=-0.1 is not a probability", "use a value in [0, 1]"),
    Case("sigma_negative", ["--bias", "true", "--sigma", "-1"], 2, "sigma=-1.0", "use"),
    Case("batch_size_zero", ["--batch-size", "0"], 2, "batch_size=0", "use a positive batch size"),
    Case("batch_size_negative", ["--batch-size", "-4"], 2, "batch_size=-4", "use a positive batch size"),
    Case(
        "no_train_split",
        ["--val-fraction", "0.6", "--test-fraction", "0.5"],
        2,
        "leave no train split",
        "sum to less than 1",
    ),
    Case("negative_fraction", ["--val-fraction", "-0.1"], 2, "leave no train split", "use fractions in [0, 1)"),
    Case("image_size_small", ["--image-size", "16"], 2, "image_size=16 is out of range", "use a value in 32..224"),
    Case("image_size_large", ["--image-size", "512"], 2, "image_size=512 is out of range", "use a value in 32..224"),
    Case("unknown_classes", ["--classes", "1,9"], 2, "label '9' is not in the data", "pick two of those"),
    Case(
        "submit_unknown_model",
        ["--model-uri", "models:/nope@champion"],
        2,
        "cannot find model 'models:/nope@champion'",
        "run tune to register one",
        command="kaggle-submit",
    ),
    Case(
        "submit_unknown_run",
        ["--model-uri", "runs:/0123456789abcdef0123456789abcdef/model"],
        2,
        "cannot find model",
        "runs:/<run_id>/model",
        command="kaggle-submit",
    ),
    Case(
        "submit_empty_uri", ["--model-uri", ""], 2, "model_uri is empty", "pass e.g. models:/", command="kaggle-submit"
    ),
    Case(
        "submit_missing_data",
        ["--model-uri", "models:/nope@champion"],
        2,
        "does not exist",
        "set data to",
        command="kaggle-submit",
        folder="missing",
    ),
]
# click's own usage errors (an unknown choice, a non-number) print its usage block: 4 lines, not one yet
USAGE_CASES = [
    Case("unknown_model_name", ["--model", "vgg99"], 2, "'vgg99' is not one of", "lenet"),
    Case("batch_size_not_a_number", ["--batch-size", "abc"], 2, "'abc' is not an integer", "help"),
    Case("epochs_not_integral", ["--epochs", "2.5"], 2, "'2.5' is not an integer", "help"),
]


def _argv(case: Case, corpus: dict[str, Path]) -> list[str]:
    extra = FAST if case.command == "train" else []
    # later options win in click: the case's own values override FAST
    return [case.command, "--data", str(corpus[case.folder]), *extra, *case.args]


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "BIAS_LAB_CACHE": str(workdir / "cache"),
        "TQDM_DISABLE": "1",
    }


@pytest.fixture(scope="module")
def cli_results(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the whole CLI corpus: one batched subprocess + single-command ones, all started at once."""
    work = tmp_path_factory.mktemp("cli")
    env = _env(work)
    (work / "cases.json").write_text(json.dumps([_argv(c, corpus) for c in CLI_CASES + USAGE_CASES]))
    (work / "driver.py").write_text(DRIVER)
    batch = subprocess.Popen(
        [sys.executable, str(work / "driver.py"), str(work / "cases.json"), str(work / "results.json")],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    singles = {
        # the MLproject entry-point script, as `mlflow run -e kaggle_submit` starts it
        "entrypoint": [
            sys.executable,
            str(REPO / "entrypoints" / "kaggle_submit.py"),
            "--data",
            str(corpus["ok"]),
            "--model-uri",
            "models:/bias-lab@champion",
        ],
        "module": [sys.executable, "-m", "bias_lab.cli", "train", "--data", str(corpus["neither"])],
        "unreachable_tracking": [sys.executable, "-m", "bias_lab.cli", "train", "--data", str(corpus["ok"]), *FAST],
    }
    procs = {}
    for name, argv in singles.items():
        # each its own store: MLflow's first-use migration of one fresh sqlite file by several processes at once
        # fails ("duplicate column name"); the unreachable server is on loopback only
        uri = "http://127.0.0.1:9" if name == "unreachable_tracking" else f"sqlite:///{work / name}.db"
        e = {**env, "MLFLOW_TRACKING_URI": uri}
        cwd = work / name
        cwd.mkdir()
        procs[name] = (
            subprocess.Popen(argv, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            time.perf_counter(),
        )
    out = {}
    for name, (p, t0) in procs.items():
        try:
            # generous: a loaded 2-core CI box needs ~30 s just to import torch + mlflow in 4 processes at once
            limit = 60 if name == "unreachable_tracking" else 240  # MLflow's own retries would take ~4 min
            stdout, stderr = p.communicate(timeout=max(5.0, limit - (time.perf_counter() - t0)))
            out[name] = {"code": p.returncode, "out": stdout, "err": stderr, "seconds": time.perf_counter() - t0}
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out[name] = {"code": None, "out": "", "err": "timed out", "seconds": time.perf_counter() - t0}
    b_out, b_err = batch.communicate(timeout=300)
    assert batch.returncode == 0, b_err[-3000:]
    cases = {c.name: r for c, r in zip(CLI_CASES + USAGE_CASES, json.loads((work / "results.json").read_text()))}
    return {"work": work, "cases": cases, "singles": out, "driver_stderr": b_err}


@pytest.mark.parametrize("case", [c for c in CLI_CASES if c.code == 2], ids=lambda c: c.name)
def test_cli_rejects(cli_results: dict, case: Case) -> None:
    r = cli_results["cases"][case.name]
    assert r["code"] == 2 and not r["left_active"], r
    check_message(only_error_line(r["out"] + r["err"]), case.problem, case.fix)


@pytest.mark.parametrize("case", USAGE_CASES, ids=lambda c: c.name)
def test_cli_usage_errors_one_line(cli_results: dict, case: Case) -> None:
    r = cli_results["cases"][case.name]
    assert r["code"] == 2 and "Traceback" not in r["err"]
    assert case.problem in r["err"] and case.fix in r["err"]  # already true: the problem and the allowed values
    check_message(only_error_line(r["out"] + r["err"]), case.problem, case.fix)


def test_cli_leaves_no_partial_output(cli_results: dict) -> None:
    """No CSV from a failed kaggle-submit, no temporary files anywhere, no run left RUNNING."""
    work: Path = cli_results["work"]
    assert not list(work.rglob("submission.csv"))
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert runs and all(r.info.status in ("FINISHED", "FAILED") for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]


def test_cli_skips_unreadable_files_with_a_warning(cli_results: dict) -> None:
    r = cli_results["cases"]["bad_files_skipped"]
    assert r["code"] == 0, r["err"][-2000:]
    warning = [line for line in r["err"].splitlines() if line.startswith("warning: skipped 4 unreadable images")]
    assert warning and all(f"{i}.jpg" in warning[0] for i in ("1002", "1003", "1008", "1009"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cli_results['work'] / 'mlflow.db'}")
    [run] = [
        x
        for x in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if x.data.params.get("data", "").endswith("bad_files") and x.info.status == "FINISHED"
    ]
    assert (
        run.data.metrics["n_skipped_files"] == 4
        and run.data.metrics["n_train"] + run.data.metrics["n_val"] + run.data.metrics["n_test"] == 8
    )


def test_cli_trains_on_odd_image_modes(cli_results: dict) -> None:
    """CMYK, RGBA, palette, 16-bit, grayscale, LA, 1-bit and 8x8 images are converted and trained on, none skipped."""
    r = cli_results["cases"]["odd_modes_train"]
    assert r["code"] == 0 and "skipped" not in r["err"], r["err"][-2000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cli_results['work'] / 'mlflow.db'}")
    [run] = [
        x
        for x in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if x.data.params.get("data", "").endswith("odd_modes")
    ]
    assert run.info.status == "FINISHED" and run.data.metrics["n_skipped_files"] == 0
    assert run.data.metrics["n_train"] + run.data.metrics["n_val"] + run.data.metrics["n_test"] == 12
    assert 0 <= run.data.metrics["test_accuracy"] <= 1


@pytest.mark.parametrize(
    "name,problem,fix",
    [
        ("entrypoint", "cannot find model 'models:/bias-lab@champion'", "run tune to register one"),
        ("module", "neither the Kaggle layout", "arrange the files"),
    ],
)
def test_cli_single_process(cli_results: dict, name: str, problem: str, fix: str) -> None:
    """A fresh process: exit status 2 from the OS's point of view, one line on stderr, nothing on stdout."""
    r = cli_results["singles"][name]
    assert r["code"] == 2 and r["out"] == "", r
    check_message(only_error_line(r["err"]), problem, fix)
    assert not list((cli_results["work"] / name).iterdir())  # no submission.csv, no mlflow.db/mlruns in its cwd


def test_cli_unreachable_tracking_fails_fast(cli_results: dict) -> None:
    r = cli_results["singles"]["unreachable_tracking"]
    # "(ConnectionError)" is the up-front /health probe answering; MLflow's own client would first retry for
    # ~4 min and then fail with a different message (no timing here: this box may be loaded)
    assert r["code"] == 2, r
    check_message(
        only_error_line(r["err"]),
        "cannot use the MLflow tracking store http://127.0.0.1:9 (ConnectionError)",
        "start the server",
    )


def test_images_checked_in_the_corpus_are_what_they_claim(corpus: dict[str, Path]) -> None:
    """Guard for the corpus itself: the odd files are really in those modes, the broken ones really unreadable."""
    from PIL import Image

    modes = {}
    for i, kind in ODD.items():
        with Image.open(corpus["odd_modes"] / "train" / "train" / f"{i}.jpg") as img:
            modes[kind] = (img.mode, img.size)
    assert modes["cmyk"][0] == "CMYK" and modes["rgba"][0] == "RGBA" and modes["palette"][0] == "P"
    assert modes["gray16"][0].startswith("I") and modes["gray"][0] == "L" and modes["small"][1] == (8, 8)
    for i in ("1002", "1003", "1008", "1009"):
        assert data.decode(corpus["bad_files"] / "train" / "train" / f"{i}.jpg", 32) is None, i
    assert torch.is_tensor(data.load(data.DataConfig(data=str(corpus["ok"]), image_size=32)).images)


def test_integer_settings_accept_integral_floats() -> None:
    """MLproject declares integer parameters `float` (MLflow has no int), so `mlflow run -P epochs=10.0` reaches the
    command as '10.0': it must mean 10, while 10.5 stays an error."""
    import click

    from bias_lab.cli import Integral

    assert [Integral().convert(v, None, None) for v in ("10", "10.0", "1e1", 7)] == [10, 10, 10, 7]
    for bad in ("10.5", "abc", "nan", "inf"):
        with pytest.raises(click.BadParameter):
            Integral().convert(bad, None, None)
