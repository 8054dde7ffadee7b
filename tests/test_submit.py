"""`kaggle-submit` end to end on generated data with real (tiny) trained models and a real MLflow registry:
CSV shape and order, label values, unreadable test images, the run and model-version links, failures that
write nothing, and the scorer.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from bias_lab import data, kaggle_submit
from bias_lab.errors import UserError
from bias_lab.files import image_id, natural_key
from bias_lab.tracking import load_model

from .conftest import FAST, all_runs, invoke
from .test_data import write_kaggle


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def train(data_dir: Path, *extra: str) -> str:
    """Train a tiny model with the real CLI; returns its runs:/ model URI."""
    code, out = invoke("train", "--data", str(data_dir), *FAST, *extra)
    assert code == 0, out
    run_id = re.search(r"run ([0-9a-f]{32})", out).group(1)
    return f"runs:/{run_id}/model"


def register(uri: str, name: str = "bias-lab", alias: str = "champion") -> str:
    mv = mlflow.register_model(uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def expected_labels(model_uri: str, data_dir: Path) -> dict[str, str]:
    """Each test id's label computed here, independently of kaggle_submit.py: model logits -> meta classes."""
    model, meta = load_model(model_uri)
    ds = data.load(data.DataConfig(data=str(data_dir), image_size=meta.image_size))
    with torch.no_grad():
        x = data.normalize(ds.test_images, meta.mean, meta.std)
        p = model(x).softmax(1) + (model(x.flip(-1)).softmax(1) if meta.tta else 0)  # tta: with the mirror
        pred = p.argmax(1).tolist()
    return {i: meta.classes[p] for i, p in zip(ds.test_ids, pred)}


def test_submit_champion_alias(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    """Default model URI (models:/bias-lab@champion) and output; sample_submission order; run and version linked."""
    uri = train(kaggle_data)
    version = register(uri)
    code, out = invoke("kaggle-submit", "--data", str(kaggle_data))
    assert code == 0, out
    csv_path = Path("submission.csv").resolve()
    table = rows(csv_path)
    sample = rows(kaggle_data / "sample_submission.csv")
    assert table[0] == ["id", "label"] and [r[0] for r in table[1:]] == [r[0] for r in sample[1:]]  # its order
    want = expected_labels(uri, kaggle_data)
    assert [r[1] for r in table[1:]] == [want[r[0]] for r in table[1:]]
    assert {r[1] for r in table[1:]} <= {"1", "2", "3", "4"}

    [sub_run] = [r for r in all_runs(client) if r.data.tags.get("entry_point") == "kaggle_submit"]
    run_id = sub_run.info.run_id
    cmd = f'kaggle competitions submit -c modia-ml-2024 -f {csv_path} -m "lenet bias-lab v{version} (bias-lab run {run_id[:8]})"'
    assert cmd in out
    assert sub_run.info.status == "FINISHED"
    p, m, t = sub_run.data.params, sub_run.data.metrics, sub_run.data.tags
    assert p["model_uri"] == "models:/bias-lab@champion" and p["model_uri_resolved"] == f"models:/bias-lab/{version}"
    assert p["model_version"] == version and p["model_run_id"] == uri.split("/")[1] and t["model_version"] == version
    assert m["n_rows"] == 20 and sum(v for k, v in m.items() if k.startswith("label_count_")) == 20
    assert m["label_count_1"] == sum(r[1] == "1" for r in table[1:])
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/submission.csv") == csv_path.read_text()
    assert client.get_model_version("bias-lab", version).tags["kaggle_submit_run_id"] == run_id


def test_sample_columns_label_values_and_unreadable_images(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    """Unusual sample_submission (column names, ids with .jpg, shuffled); labels 1, 3, 7 written as such; a zero-byte
    test image still gets a row with the most frequent training label, a truncated one is predicted."""
    root = write_kaggle(
        tmp_path / "d",
        labels={"1": 14, "3": 14, "7": 17},
        n_test=6,
        test_kinds={"5002": "zero", "5004": "truncated"},
        sample=False,
    )
    ids = [f"{5000 + j}.jpg" for j in range(6)]
    random.Random(0).shuffle(ids)
    with open(root / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("ImageId", "Category"), *((i, "0") for i in ids)])
    uri = train(root)
    with pytest.warns(UserWarning, match=r"1 test images could not be read.*label 7: 5002"):
        code, out = invoke("kaggle-submit", "--data", str(root), "--model-uri", uri, "--output", "sub.csv")
    assert code == 0, out
    table = rows(Path("sub.csv"))
    assert table[0] == ["ImageId", "Category"] and [r[0] for r in table[1:]] == ids  # verbatim, in its order
    want = {**expected_labels(uri, root), "5002": "7"}
    assert [r[1] for r in table[1:]] == [want[image_id(r[0])] for r in table[1:]]
    assert {r[1] for r in table[1:]} <= {"1", "3", "7"}
    [run] = [r for r in all_runs(client) if r.data.tags.get("entry_point") == "kaggle_submit"]
    assert run.data.metrics["n_unreadable_test"] == 1 and run.data.metrics["n_partial_test"] == 1
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/unreadable_test_images.txt").split() == ["5002"]
    assert run.data.params["model_version"] == ""  # a runs:/ URI that was never registered

    # without a sample_submission: id,label sorted by id, ids without extension
    (root / "sample_submission.csv").unlink()
    with pytest.warns(UserWarning):
        code, out = invoke("kaggle-submit", "--data", str(root), "--model-uri", uri, "--output", "plain.csv")
    assert code == 0, out
    plain = rows(Path("plain.csv"))
    assert plain[0] == ["id", "label"] and [r[0] for r in plain[1:]] == [str(5000 + j) for j in range(6)]


BAR = re.compile(r"\d+%\|")  # a tqdm progress bar (MLflow's artifact download has one)


def only_error_line(out: str) -> str:
    """The one line a user reads: what a terminal shows once \\r-overwritten text and progress bars are gone
    (warnings, which name skipped files, are allowed above it)."""
    shown = [line.split("\r")[-1].strip() for line in out.split("\n")]
    lines = [line for line in shown if line and not BAR.search(line) and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out, out
    return lines[0]


def test_failures_write_nothing_and_keep_a_good_file(
    kaggle_data: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = train(kaggle_data)
    register(uri)
    assert invoke("kaggle-submit", "--data", str(kaggle_data), "--output", "sub.csv")[0] == 0
    good = Path("sub.csv").read_bytes()
    n_runs = len(all_runs(client))
    cases = {
        ("--model-uri", "models:/nope@champion"): "cannot find model 'models:/nope@champion'",
        ("--model-uri", "models:/bias-lab@nope"): "alias nope not found",
        ("--model-uri", "models:/bias-lab/9"): "version=9",
        ("--model-uri", "runs:/0123456789abcdef0123456789abcdef/model"): "cannot find model",
        ("--data", str(kaggle_data / "missing")): "does not exist",
        ("--output", "no/such/dir/sub.csv"): "output folder",
        ("--batch-size", "0"): "batch_size=0",
    }
    for args, problem in cases.items():
        full = ["kaggle-submit", "--data", str(kaggle_data), "--output", "sub.csv", *args]
        code, out = invoke(*full)
        assert code == 2, (args, out)
        assert problem in only_error_line(out), (args, out)
        assert Path("sub.csv").read_bytes() == good, args

    # a failure while writing: the run ends FAILED, the old file stays, no temporary file is left behind
    def disk_full(sub, path: Path) -> None:
        path.write_text("id,label\n12")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kaggle_submit, "write_csv", disk_full)
    code, out = invoke("kaggle-submit", "--data", str(kaggle_data), "--output", "sub.csv")
    assert code == 1 and "No space left" in out and "Traceback" not in out
    assert Path("sub.csv").read_bytes() == good and sorted(p.name for p in Path(".").iterdir() if "sub" in p.name) == [
        "sub.csv"
    ]
    runs = all_runs(client)
    assert len(runs) == n_runs + 1 and runs[0].info.status == "FAILED" and "No space left" in runs[0].data.tags["error"]

    # a model trained with the eps channel expects an input the competition does not have
    eps_uri = train(kaggle_data, "--bias", "true", "--classes", "1,3")
    code, out = invoke("kaggle-submit", "--data", str(kaggle_data), "--model-uri", eps_uri, "--output", "sub.csv")
    assert code == 2 and "eps noise channel" in only_error_line(out) and "bias=false" in out
    assert Path("sub.csv").read_bytes() == good


def test_score(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sol = tmp_path / "solution.csv"
    sol.write_text("id,label,Usage\n1,3,Public\n2,7,Public\n3,1,Private\n4,7,Private\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageId,Category\n4.jpg,7\n3.jpg,1\n2.jpg,1\n1.jpg,3\n")  # other order, ids with extension
    assert kaggle_submit.score(sub, sol) == 0.75
    with pytest.raises(SystemExit) as done:
        kaggle_submit.main(["score", str(sub), str(sol)])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "accuracy=0.7500"
    sub.write_text("id,label\n1,3\n2,7\n3,1\n")
    with pytest.raises(UserError, match="no row for 1 solution ids .e.g. 4"):
        kaggle_submit.score(sub, sol)
    sub.write_text("id,label\n1,3\n1,3\n2,7\n3,1\n4,7\n")
    with pytest.raises(UserError, match="more than once"):
        kaggle_submit.score(sub, sol)


def test_score_matches_a_perfect_and_a_constant_submission(kaggle_data: Path, tmp_path: Path) -> None:
    sol = kaggle_data / "solution.csv"
    shutil.copy(sol, tmp_path / "perfect.csv")
    assert kaggle_submit.score(tmp_path / "perfect.csv", sol) == 1.0
    assert kaggle_submit.score(kaggle_data / "sample_submission.csv", sol) == 0.25  # all '1', 5 of 20 are 1


def model_file(name: str) -> Path:
    """The logged model's bias_lab file in this test's local artifact store (the only model logged here)."""
    [path] = Path(".").rglob(name)
    return path


def no_run_left_finished_or_running(client: mlflow.MlflowClient) -> None:
    runs = [r for r in all_runs(client) if r.data.tags.get("entry_point") == "kaggle_submit"]
    assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]


def test_duplicate_test_ids_refused_before_any_work(
    kaggle_data: Path, tmp_path: Path, client: mlflow.MlflowClient
) -> None:
    """X.jpg and X.png in the test folder are one id: refused (naming both) before the model is even resolved,
    rather than one row from whichever was predicted last."""
    uri = train(kaggle_data)
    root = shutil.copytree(kaggle_data, tmp_path / "dup")
    test_dir = root / "test" / "test"
    a, b = sorted((p.stem for p in test_dir.glob("*.jpg")), key=natural_key)[:2]
    shutil.copy(test_dir / f"{a}.jpg", test_dir / f"{a}.png")  # same bytes: the decoder reads it by content
    shutil.copy(test_dir / f"{b}.jpg", test_dir / f"{b}.PNG")
    code, out = invoke("kaggle-submit", "--data", str(root), "--model-uri", uri, "--output", "sub.csv")
    line = only_error_line(out)
    assert code == 2 and f"2 test ids ({a}.jpg and {a}.png; {b}.PNG and {b}.jpg)" in line, out
    assert "keep one image per id" in line and not Path("sub.csv").exists()
    assert not [r for r in all_runs(client) if r.data.tags.get("entry_point") == "kaggle_submit"]
    with pytest.raises(UserError, match=r"for 1 test ids \(7\)"):  # the check on loaded ids (demo data is not listed)
        kaggle_submit.check_unique_ids(["7", "8", "7"], "the test folder")


def test_diverged_model_refused(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    """NaN weights (or finite ones whose outputs overflow to inf) would make every row one label: refused, nothing
    written, no run left FINISHED."""
    uri = train(kaggle_data)
    weights = model_file("weights.pt")
    state = torch.load(weights, weights_only=True)
    for name, broken in {"nan": lambda t: torch.full_like(t, float("nan")), "overflow": lambda t: t * 1e38}.items():
        torch.save({k: broken(t) if t.is_floating_point() else t for k, t in state.items()}, weights)
        code, out = invoke("kaggle-submit", "--data", str(kaggle_data), "--model-uri", uri, "--output", "sub.csv")
        line = only_error_line(
            re.sub(r"^model .* test images, device .*\n", "", out, flags=re.M)
        )  # overflow: seen predicting
        assert code == 2 and "outputs NaN/inf" in line and "diverged" in line and "another model" in line, (name, out)
        assert not Path("sub.csv").exists(), name
        no_run_left_finished_or_running(client)


def test_unwritable_output_folder_refused_before_any_work(
    tmp_path: Path, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--output in a folder that cannot be written: refused before the model, data or a run (not after predicting)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the probe meet what a user without the permission meets

        def denied(*args, dir=None, **kw):
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(kaggle_submit.tempfile, "mkstemp", denied)
    try:
        code, out = invoke(
            "kaggle-submit",
            "--data",
            str(tmp_path / "no-data"),
            "--model-uri",
            "models:/nope@champion",
            "--output",
            str(locked / "sub.csv"),
        )
    finally:
        locked.chmod(0o755)
    line = only_error_line(out)
    assert code == 2 and f"cannot write to output folder {locked} (Permission denied)" in line, out
    assert list(locked.iterdir()) == [] and all_runs(client) == []


def test_corrupt_model_files(kaggle_data: Path) -> None:
    """A damaged weights.pt / bias_lab.json: one line naming the file and what to do; never torch's advice to
    load with weights_only=False (that would run the file's code)."""
    import json

    uri = train(kaggle_data)
    weights, meta = model_file("weights.pt"), model_file("bias_lab.json")
    good_weights, good_meta = weights.read_bytes(), meta.read_text()
    without_classes = {k: v for k, v in json.loads(good_meta).items() if k != "classes"}
    damages = {
        "truncated weights": lambda: weights.write_bytes(good_weights[:200]),
        "garbage weights": lambda: weights.write_bytes(b"\x00garbage" * 10),
        "pickled code": lambda: torch.save({"x": Path("x")}, weights),  # weights_only refuses it, with that advice
        "broken json": lambda: meta.write_text(good_meta[:-20]),
        "missing key": lambda: meta.write_text(json.dumps(without_classes)),
        "not an object": lambda: meta.write_text("[1, 2]"),
    }
    for damage, write in damages.items():
        weights.write_bytes(good_weights)
        meta.write_text(good_meta)
        write()
        which = (
            "weights.pt" if "json" not in damage and "key" not in damage and "object" not in damage else "bias_lab.json"
        )
        code, out = invoke("kaggle-submit", "--data", str(kaggle_data), "--model-uri", uri, "--output", "sub.csv")
        line = only_error_line(out)
        assert code == 2 and which in line and "another model/version" in line, (damage, out)
        assert "lacks classes" in line if damage == "missing key" else "corrupt" in line or "lacks" in line, (
            damage,
            out,
        )
        assert "weights_only" not in out.lower().replace(" ", "_") and not Path("sub.csv").exists(), (damage, out)
        with pytest.raises(UserError) as raised:
            load_model(uri)
        assert "weights_only" not in repr(raised.value.__cause__), damage


def test_without_sample_submission_rows_are_sorted_by_id_naturally() -> None:
    """ids of different lengths: 9 before 10 before 100 (file order and string order would both be wrong)."""
    from bias_lab.kaggle_submit import arrange

    sub = arrange(["100", "9", "1000", "10"], ["a", "b", "c", "d"], None)
    assert [i for i, _ in sub.rows] == ["9", "10", "100", "1000"]
    assert dict(sub.rows) == {"100": "a", "9": "b", "1000": "c", "10": "d"}
