"""The Model Registry contract: what `tune` registers and what `bias_eval` and `kaggle_submit` read back.

A registered version carries tags (DIGEST_TAG, VAL_TAG, the model and the hyperparameters config.SEARCHED); the
`champion` alias points at the best version on a dataset. Every logged model carries a ModelMeta (bias_lab.json):
the preprocessing it needs at prediction time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from bias_lab import card
from bias_lab.config import SEARCHED
from bias_lab.errors import UserError, check

CHAMPION = "champion"  # the alias of the best version on a dataset
DIGEST_TAG = "data_digest"  # the data (and task) a version was tuned on: a champion competes only on its own data
VAL_TAG = "val_accuracy"  # the version's best val accuracy, repr() of a float: what the champion rule compares


@dataclass
class ModelRef:
    """What a model URI points at: the URI actually loaded plus, when it is known, its registry version."""

    uri: str  # as given
    resolved: str  # pinned: models:/name/<version> for an alias, so the run records what was predicted with
    name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the run that logged the model


def resolve(model_uri: str) -> ModelRef:
    """Pin an alias / 'latest' to a version and find the run that logged the model (UserError when unknown)."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    check(bool(model_uri.strip()), "model_uri is empty: pass e.g. models:/bias-lab@champion or runs:/<run_id>/model")
    client = mlflow.MlflowClient()
    try:
        if model_uri.startswith("models:/"):
            found = get_model_name_and_version(client, model_uri)
            if len(found) == 1:  # models:/m-<id>, a logged model outside the registry
                return ModelRef(model_uri, model_uri, run_id=client.get_logged_model(found[0]).source_run_id)
            name, version = found
            mv = client.get_model_version(name, version)
            return ModelRef(model_uri, f"models:/{name}/{version}", name, str(version), mv.run_id)
        if model_uri.startswith("runs:/"):
            run_id, _ = RunsArtifactRepository.parse_runs_uri(model_uri)
            client.get_run(run_id)
            versions = client.search_model_versions(f"run_id='{run_id}'")
            if len(versions) != 1:  # not registered, or more than once: no single version to tag
                return ModelRef(model_uri, model_uri, run_id=run_id)
            return ModelRef(model_uri, model_uri, versions[0].name, str(versions[0].version), run_id)
    except Exception as e:  # RESOURCE_DOES_NOT_EXIST, a malformed URI, a registry without that alias...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"cannot find model '{model_uri}' ({first}): pass models:/<name>@<alias>, models:/<name>/<version> "
            "or runs:/<run_id>/model as listed in the MLflow UI, or run tune to register one"
        ) from e
    return ModelRef(model_uri, model_uri)  # a path or other artifact URI: loaded as is


def register_champion(
    model_uri: str, name: str, digest: str, val_accuracy: float, tags: dict[str, Any]
) -> dict[str, Any]:
    """Register `model_uri` under `name`; move the `champion` alias to it only if its val_accuracy beats the
    baseline: the current champion when it was trained on the same data (digest), else the best earlier
    version on that data. Returns the decision (version, moved, baseline, reason)."""
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    same = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.tags.get(DIGEST_TAG) == digest and VAL_TAG in v.tags
    ]
    baseline: ModelVersion | None
    if champion is not None and champion.tags.get(DIGEST_TAG) == digest and VAL_TAG in champion.tags:
        baseline = champion
    else:
        baseline = max(same, key=lambda v: float(v.tags[VAL_TAG]), default=None)
    mv = mlflow.register_model(
        model_uri,
        name,
        tags={**{k: str(v) for k, v in tags.items()}, DIGEST_TAG: digest, VAL_TAG: repr(float(val_accuracy))},
    )
    base_acc = float(baseline.tags[VAL_TAG]) if baseline is not None else None
    if baseline is None:
        moved = True
        reason = f"first model registered for data {digest}"
        if champion is not None:
            reason += f" (champion was v{champion.version}, trained on other data {champion.tags.get(DIGEST_TAG, '?')})"
    elif base_acc is None or val_accuracy > base_acc:  # (base_acc is set whenever baseline is)
        moved, reason = True, f"val_accuracy {val_accuracy:.4f} > {base_acc:.4f} of v{baseline.version}"
    else:
        moved = False
        reason = f"val_accuracy {val_accuracy:.4f} <= {base_acc:.4f} of v{baseline.version}; champion stays v{champion.version if champion else baseline.version}"
    if moved:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    client.set_model_version_tag(name, mv.version, "champion_decision", reason)
    current = mv.version if moved else (champion.version if champion else None)
    return {
        "version": mv.version,
        "moved": moved,
        "baseline_version": baseline.version if baseline else None,
        "baseline_val_accuracy": base_acc,
        "champion_version": current,
        "reason": reason,
    }


def _exact(client: MlflowClient, tags: dict[str, str]) -> dict[str, str]:
    """The searched settings as the final run logged them: version tags are rounded for people."""
    try:
        final = client.get_run(tags["final_run_id"]) if "final_run_id" in tags else None
    except MlflowException:  # the final run was deleted: the rounded tags are what is left
        return {}
    return {k: final.data.params[k] for k in SEARCHED if final is not None and k in final.data.params}


def champion_hparams(name: str, digests: tuple[str, ...], arch: str) -> tuple[dict[str, Any], str] | None:
    """lr / momentum / batch_size of the registered version of `name` trained on this data with this arch.

    A version matches when its tags or its source run's params say data_digest in `digests` (the binary
    task's: a model tuned on another task is no evidence for this one) and model == arch (tune tags its versions with data_digest,
    model, lr, momentum, batch_size, val_accuracy). Among matches: the `champion` alias wins, then the better
    digest, then val_accuracy. Returns (params, model URI) or None.
    """
    client = MlflowClient()
    try:
        versions = list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:  # no registry in this store, or no such model
        return None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        champion = None
    best, best_key = None, None
    for v in versions:
        try:
            run = client.get_run(v.run_id) if v.run_id else None
        except MlflowException:  # source run deleted
            run = None
        params = {**(run.data.params if run else {}), **(v.tags or {}), **_exact(client, v.tags or {})}
        digest = params.get(DIGEST_TAG, params.get("dataset_digest"))
        if digest not in digests or params.get("model", arch) != arch or not all(k in params for k in SEARCHED):
            continue
        val = float(params.get(VAL_TAG, run.data.metrics.get("best_val_accuracy", -1.0) if run else -1.0))
        key = (v.version == champion, -digests.index(digest), val, int(v.version))
        if best_key is None or key > best_key:
            best, best_key = (params, v.version), key
    if best is None:
        return None
    params, version = best
    return {k: kind(float(params[k])) for k, kind in SEARCHED.items()}, f"models:/{name}/{version}"


CARD_FILE = "model_card.md"  # the full model card, an artifact of the run that logged the version's model
MODEL_DESCRIPTION = (
    "Image classifiers (LeNet / AlexNet / ResNet) for the competition's classes, one version per `tune` run: "
    "the model retrained with the Optuna study's best hyperparameters. The `champion` alias points at the version "
    "with the best val accuracy on the same data (tag data_digest; a version trained on other data never "
    "competes with it); tag champion_decision says why it moved or stayed. Each version's description "
    "summarises its model card; the full card (data, training, test accuracy with its CI, per-class accuracy, "
    f"what was not tested) is `{CARD_FILE}` in the artifacts of the run it links to."
)


def describe_version(name: str, version: str | int, facts: card.Card, run_id: str) -> str:
    """Log the model card of `facts` as artifact model_card.md on run `run_id` (the run that logged the version's
    model) and set the version's description to its summary, which points at that artifact; returns its URI."""
    client, uri = MlflowClient(), card_uri(run_id)
    client.log_text(run_id, card.render(facts), CARD_FILE)
    client.update_model_version(name, str(version), description=card.summary(facts, uri))
    return uri


def card_uri(run_id: str) -> str:
    """Where describe_version puts a version's full model card."""
    return f"runs:/{run_id}/{CARD_FILE}"


def describe_registered_model(name: str, text: str = MODEL_DESCRIPTION) -> None:
    """Set the registered model's description: what its versions are, what `champion` means, where the cards are.
    Cut to card.SUMMARY_LIMIT characters (the SQL stores hold 5,000)."""
    if len(text) > card.SUMMARY_LIMIT:
        text = text[: card.SUMMARY_LIMIT - 1] + "…"
    MlflowClient().update_registered_model(name, description=text)


def rounded(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as a person reads them: floats to 4 significant digits (0.9277777777777778 -> '0.9278'), anything
    else as str(), cut to MLflow's run tag limit (MAX_TAG_VAL_LENGTH, 8,000 characters; a version tag holds
    more). Not for VAL_TAG, which the champion rule compares exactly."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    text = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in tags.items()}
    return {k: v if len(v) <= MAX_TAG_VAL_LENGTH else v[: MAX_TAG_VAL_LENGTH - 1] + "…" for k, v in text.items()}
