"""`kaggle-submit`: a Kaggle CSV from any logged model, validated before it exists, written atomically.

The model URI alone says how to preprocess (its meta: image size, normalisation, label values), so nothing is
repeated on the command line; the images go through inference.probabilities, the served model's own path. Rows follow sample_submission.csv when the data has one
(its column names, its id order), else `id,label` sorted by id; labels are train.csv's own values. The file
appears only after every check passed and the MLflow run holding it as an artifact was logged, so a failure
leaves neither a partial file nor a replaced earlier one. `score` compares a submission with a solution.csv:

    python -m bias_lab.kaggle_submit score submission.csv path/to/solution.csv
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from torch import nn

from bias_lab import config, inference, registry, tracking
from bias_lab.config import DataConfig, SubmitConfig
from bias_lab.data import Dataset, check_cache_dir, load
from bias_lab.device import resolve_device
from bias_lab.errors import UserError, check, first_line
from bias_lab.files import image_id, list_files, natural_key, read_csv
from bias_lab.models import ModelMeta, finite_weights

SAMPLE_FILE = "sample_submission.csv"


# ----------------------------------------------------------------------------------------------- model


def check_model(meta: ModelMeta, uri: str) -> None:
    """A model can label the competition's test set only if it takes plain images and knows every class."""
    check(
        not meta.eps_channel,
        f"model '{uri}' was trained with the eps noise channel, an input the competition "
        "test images do not have: submit a model trained with bias=false",
    )
    check(
        meta.task != "binary",
        f"model '{uri}' is a binary model of labels {', '.join(meta.classes)} only: "
        "submit a model trained on all classes (train/tune without classes=)",
    )


def check_finite(model: nn.Module, uri: str) -> None:
    """NaN/inf weights make every output NaN, and argmax over NaN picks one fixed class: a CSV that passes every
    other check yet labels all images alike. Cheap to see before any data is decoded."""
    check(finite_weights(model), inference.diverged(uri))


def check_training_data(ref: registry.ModelRef, data: str, allow: bool) -> None:
    """A model trained on the synthetic demo shapes (its run's synthetic_data tag) labels real images at random, yet
    would give a CSV that passes every other check: refused for any data but the demo, unless `allow`."""
    if allow or data == "demo" or not ref.run_id:
        return
    try:
        run = mlflow.MlflowClient().get_run(ref.run_id).data
    except Exception:  # resolve found the run: a store that went away now fails where the model is loaded
        return
    check(
        run.tags.get("synthetic_data") != "true" and run.params.get("data") != "demo",
        f"model {ref.uri} was trained on the synthetic demo data, not on {data}: its predictions mean nothing "
        f"there; train on {data} first, or set allow_other_data=true to submit it anyway",
    )


def check_labels(meta: ModelMeta, ds: Dataset, uri: str) -> None:
    """The model's labels must be train.csv's (and, ideally, its training data this data)."""
    unknown = sorted(set(meta.classes) - set(ds.classes), key=natural_key)
    check(
        not unknown,
        f"model '{uri}' predicts labels {', '.join(unknown)} that {ds.source}/train.csv does not have: "
        "submit a model trained on this data",
    )
    if meta.dataset_digest and meta.dataset_digest != ds.digest:
        warnings.warn(
            f"model '{uri}' was trained on other data (digest {meta.dataset_digest}, this data {ds.digest})",
            stacklevel=2,
        )


def check_unique_ids(names: list[str], where: str) -> None:
    """1.jpg and 1.png are one id: both would be predicted and the row keep whichever came last, a label nobody
    chose. Refuse and name them (names: test file paths, or ids)."""
    files: dict[str, list[str]] = {}
    for name in names:
        files.setdefault(image_id(name), []).append(os.path.basename(name))
    dupes = sorted((i for i, fs in files.items() if len(fs) > 1), key=natural_key)
    examples = "; ".join(" and ".join(files[i]) if files[i][0] != i else i for i in dupes[:3])
    check(
        not dupes,
        f"{where} has more than one image for {len(dupes)} test ids ({examples}{'; ...' if len(dupes) > 3 else ''}): "
        "each id gets one row, so keep one image per id (delete or rename the others)",
    )


# ----------------------------------------------------------------------------------------------- rows


@dataclass
class Submission:
    id_column: str
    label_column: str
    rows: list[tuple[str, str]]  # (id as the file writes it, label)


def arrange(test_ids: list[str], labels: list[str], sample: Path | None) -> Submission:
    """Rows in sample_submission.csv's columns and id order (its ids verbatim), else id,label sorted by id."""
    pred = dict(zip(test_ids, labels))
    if sample is None or not sample.is_file():
        return Submission("id", "label", [(i, pred[i]) for i in sorted(pred, key=natural_key)])
    header, table = read_csv(sample)
    check(
        len(header) >= 1 and header[0] != "",
        f"{sample} has no header line: restore it from the competition's data page",
    )
    ids = [row[0] for row in table if row]
    dupes = sorted({i for i, n in Counter(map(image_id, ids)).items() if n > 1})
    check(
        not dupes,
        f"{sample} lists id {dupes[0] if dupes else ''} more than once: restore it from the competition's data page",
    )
    no_image = [i for i in ids if image_id(i) not in pred]
    check(
        not no_image,
        f"{len(no_image)} ids of {sample.name} have no image in the test folder (e.g. {', '.join(no_image[:3])}): "
        "use the test folder and sample_submission.csv of the same competition",
    )
    listed = set(map(image_id, ids))
    extra = sorted((i for i in pred if i not in listed), key=natural_key)
    check(
        not extra,
        f"{len(extra)} test images are not in {sample.name} (e.g. {', '.join(extra[:3])}): Kaggle rejects rows it "
        "does not expect; remove those images or use the matching sample_submission.csv",
    )
    return Submission(
        header[0], header[1] if len(header) > 1 and header[1] else "label", [(i, pred[image_id(i)]) for i in ids]
    )


def validate(sub: Submission, test_ids: list[str], allowed: list[str]) -> None:
    """What Kaggle checks, before anything is written: one row per test image, no duplicates, known labels."""
    check(
        sub.id_column != sub.label_column,
        f"id and label columns are both named '{sub.id_column}': fix sample_submission.csv's header",
    )
    ids = [image_id(i) for i, _ in sub.rows]
    dupes = sorted((i for i, n in Counter(ids).items() if n > 1), key=natural_key)
    check(
        not dupes,
        f"the submission would list id {dupes[0] if dupes else ''} twice (two test files share that name): "
        "keep one image per id in the test folder",
    )
    missing = sorted(set(test_ids) - set(ids), key=natural_key)
    check(
        not missing and len(ids) == len(set(test_ids)),
        f"the submission would miss test ids {', '.join(missing[:3])}: this is a bug, "
        "re-run with --debug and report it",
    )
    bad = sorted({lab for _, lab in sub.rows if lab not in allowed}, key=natural_key)
    check(
        not bad,
        f"the submission would contain labels {', '.join(bad)} not in train.csv ({', '.join(allowed)}): "
        "submit a model trained on this data",
    )


def check_output(out: Path) -> None:
    """The CSV's folder must exist (a file on its path is named as one, not as a missing folder) and be writable;
    the output must not be a folder."""
    blocker = next((p for p in out.parents if p.exists()), None)  # a path below a file does not exist
    check(
        blocker is None or blocker.is_dir(),
        f"output {out}: {blocker} is a file, not a folder: pass an output path in a folder, "
        f"e.g. {blocker.parent / out.name if blocker else out.name}",
    )
    check(out.parent.is_dir(), f"output folder {out.parent} does not exist: create it or pass another output path")
    check(not out.is_dir(), f"output {out} is a folder: pass a file name such as {out / 'submission.csv'}")
    check_writable(out.parent)


def check_writable(folder: Path) -> None:
    """Create and delete a file in `folder`, so an unwritable output fails now rather than after the predictions.
    Trying is the one test that holds for ACLs, read-only mounts and root alike (os.access guesses)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".bias_lab-write-test-")
    except OSError as e:
        raise UserError(
            f"cannot write to output folder {folder} ({e.strerror or first_line(e)}): make it writable "
            "or pass an output path in a folder you can write to"
        ) from e
    os.close(fd)
    os.unlink(probe)


def write_csv(sub: Submission, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([sub.id_column, sub.label_column])
        w.writerows(sub.rows)


# ----------------------------------------------------------------------------------------------- command


def run_submit(data_cfg: DataConfig, cfg: SubmitConfig) -> Path:
    """The `kaggle-submit` command; returns the path of the CSV it wrote."""
    config.validate("kaggle_submit", data_cfg, cfg)
    out = Path(cfg.output).expanduser().resolve()
    check_output(out)
    check_cache_dir(data_cfg)
    if (
        data_cfg.data.strip() and data_cfg.data != "demo"
    ):  # local mistakes first, before the registry and a model download
        listing = list_files(Path(data_cfg.data).expanduser().resolve())
        if listing.test_files:
            check_unique_ids(listing.test_files, os.path.commonpath([os.path.dirname(f) for f in listing.test_files]))
    tracking.setup()
    device = resolve_device(cfg.device)
    ref = registry.resolve(cfg.model_uri)
    check_training_data(ref, data_cfg.data, cfg.allow_other_data)  # before the download
    model, meta = tracking.load_model(ref.resolved, device)
    check_model(meta, cfg.model_uri)
    check_finite(model, cfg.model_uri)
    ds = load(
        dataclasses.replace(data_cfg, image_size=int(meta.image_size))
    )  # the model's preprocessing, not the CLI's
    check(
        len(ds.test_ids) > 0,
        f"{ds.source} has no test images (test/test/*.jpg or test/*.jpg): add the competition's test folder",
    )
    check_unique_ids(ds.test_ids, f"the test folder of {ds.source}")  # the demo data is not listed above
    check_labels(meta, ds, cfg.model_uri)
    print(
        f"model {ref.resolved} ({meta.arch}, {meta.image_size} px) on {len(ds.test_ids)} test images, device {device}",
        file=sys.stderr,
    )

    with tracking.run("kaggle-submit", tags={"entry_point": "kaggle_submit"}) as active:
        run_id = active.info.run_id
        tracking.log_params(
            {
                "model_uri": cfg.model_uri,
                "model_uri_resolved": ref.resolved,
                "model_name": ref.name,
                "model_version": ref.version,
                "model_run_id": ref.run_id,
                "arch": meta.arch,
                "image_size": meta.image_size,
                "data": data_cfg.data,
                "data_source": ds.source,
                "data_digest": ds.digest,
                "competition": cfg.competition,
                "allow_other_data": cfg.allow_other_data,
                "output": str(out),
                "batch_size": cfg.batch_size,
                "device_resolved": str(device),
            }
        )
        sub = _submission(model, meta, ds, cfg)
        _record_submission(sub, ds, ref)
        _publish(sub, out, run_id)  # the file appears only once it is also in the run
        if ref.name and ref.version:
            mlflow.MlflowClient().set_model_version_tag(ref.name, ref.version, "kaggle_submit_run_id", run_id)

    what = f"{ref.name} v{ref.version}" if ref.version else ref.resolved
    message = re.sub(r'["`$\\]', "'", f"{meta.arch} {what} (bias-lab run {run_id[:8]})")
    print(tracking.ui_hint(active), file=sys.stderr)
    print(f"wrote {out} ({len(sub.rows)} rows). Upload it with:", file=sys.stderr)
    print(f'kaggle competitions submit -c {shlex.quote(cfg.competition)} -f {shlex.quote(str(out))} -m "{message}"')
    return out


def _submission(model: nn.Module, meta: ModelMeta, ds: Dataset, cfg: SubmitConfig) -> Submission:
    """The predicted label of every test image, in the sample file's order; an unreadable image gets the most
    frequent training label (said once, see _report_unreadable)."""
    probs = inference.probabilities(model, meta, ds.test_images, None, cfg.batch_size, cfg.model_uri, progress=True)
    labels = inference.labels(probs, meta)
    fallback = ds.classes[int(torch.bincount(ds.labels, minlength=len(ds.classes)).argmax())]
    unreadable = set(ds.test_unreadable)
    labels = [fallback if i in unreadable else lab for i, lab in zip(ds.test_ids, labels)]
    _report_unreadable(ds, fallback)
    sub = arrange(ds.test_ids, labels, Path(ds.root) / SAMPLE_FILE if ds.root else None)
    validate(sub, ds.test_ids, ds.classes)
    return sub


def _record_submission(sub: Submission, ds: Dataset, ref: registry.ModelRef) -> None:
    """Row and label counts, and the model the submission came from, on the active run."""
    counts = Counter(lab for _, lab in sub.rows)
    tracking.log_metrics(
        {
            "n_rows": len(sub.rows),
            "n_unreadable_test": len(ds.test_unreadable),
            "n_partial_test": len(ds.test_partial),
            **{f"label_count_{_metric_safe(k)}": counts.get(k, 0) for k in ds.classes},
        }
    )
    mlflow.log_dict({k: counts.get(k, 0) for k in ds.classes}, "label_counts.json")
    mlflow.set_tags(
        {
            k: v
            for k, v in {
                "model_uri": ref.uri,
                "model_name": ref.name,
                "model_version": ref.version,
                "model_run_id": ref.run_id,
            }.items()
            if v
        }
    )


def _report_unreadable(ds: Dataset, fallback: str) -> None:
    """Warn about, and log to the active run, test images predicted from a part or not at all."""
    if ds.test_unreadable:
        warnings.warn(
            f"{len(ds.test_unreadable)} test images could not be read; their rows get the most frequent "
            f"training label {fallback}: {', '.join(ds.test_unreadable)}",
            stacklevel=2,
        )
        mlflow.log_text("\n".join(ds.test_unreadable) + "\n", "unreadable_test_images.txt")
    if ds.test_partial:
        warnings.warn(
            f"{len(ds.test_partial)} test images are truncated and were predicted from their readable part: "
            f"{', '.join(ds.test_partial)}",
            stacklevel=2,
        )
        mlflow.log_text("\n".join(ds.test_partial) + "\n", "partial_test_images.txt")


def _metric_safe(label: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", label)


def _publish(sub: Submission, out: Path, run_id: str) -> None:
    """Write next to `out` (same filesystem, so the final rename is atomic), log it, then rename into place."""
    staging = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_csv(sub, staging / out.name)
        mlflow.log_artifact(str(staging / out.name))
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- scoring


def score(submission_csv: str | Path, solution_csv: str | Path) -> float:
    """Accuracy of a submission against a solution file (first column id, second label; ids with or without
    extension). Every solution id must have exactly one row, as on Kaggle."""

    def table(path: Path) -> dict[str, str]:
        check(path.is_file(), f"{path} does not exist: pass an existing CSV")
        header, rows = read_csv(path)
        check(len(header) >= 2, f"{path} needs an id and a label column: pass a submission or solution CSV")
        ids = [image_id(r[0]) for r in rows if r]
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        check(not dupes, f"{path} lists id {dupes[0] if dupes else ''} more than once: keep one row per id")
        return {image_id(r[0]): (r[1] if len(r) > 1 else "") for r in rows if r}

    sub, sol = table(Path(submission_csv)), table(Path(solution_csv))
    missing = [i for i in sol if i not in sub]
    check(
        not missing,
        f"{submission_csv} has no row for {len(missing)} solution ids (e.g. {', '.join(missing[:3])}): "
        "predict every test image",
    )
    check(len(sol) > 0, f"{solution_csv} has no rows: pass the competition's solution.csv")
    return sum(sub[i] == lab for i, lab in sol.items()) / len(sol)


def main(argv: list[str] | None = None) -> None:
    """`python -m bias_lab.kaggle_submit score SUBMISSION SOLUTION`: print the accuracy."""
    import click

    @click.group()
    def cli() -> None:
        """Helpers around Kaggle submissions."""

    @cli.command("score")
    @click.argument("submission", type=click.Path(dir_okay=False))
    @click.argument("solution", type=click.Path(dir_okay=False))
    def score_cmd(submission: str, solution: str) -> None:
        """Accuracy of SUBMISSION against SOLUTION (e.g. tiny4's solution.csv)."""
        try:
            acc = score(submission, solution)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"accuracy={acc:.4f}")

    cli.main(argv, prog_name="python -m bias_lab.kaggle_submit")


if __name__ == "__main__":
    main()
