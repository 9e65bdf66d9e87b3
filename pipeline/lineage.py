"""`fer-pipeline lineage`: which data, code and evaluation produced a served model version.

Everything comes from ML Metadata (`pipeline/metadata.py`), walking events backwards from
the pushed version: push <- evaluation + infra validation + training run <- transform <-
augmented/examples + anomalies <- statistics <- ingest <- the CSV file(s).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from fer_pipeline.core.config import MetadataConfig
from fer_pipeline.core.errors import UserError
from fer_pipeline.pipeline.metadata import DERIVED, MetadataStore, sqlite_path


class LineageError(UserError, ValueError):
    pass


def _input(execution: dict[str, Any], name: str) -> dict[str, Any]:
    artifacts = execution["inputs"].get(name)
    if not artifacts:
        raise LineageError(f"execution {execution['id']} ({execution['step']}) has no input "
                           f"{name!r}")
    return artifacts[0]


def _upstream(store: MetadataStore, execution: dict[str, Any], name: str) -> dict[str, Any]:
    producer = store.producer(_input(execution, name)["id"])
    if producer is None:
        raise LineageError(f"no recorded producer for input {name!r} of {execution['step']}")
    return producer


def _facts(execution: dict[str, Any]) -> dict[str, Any]:
    props = execution["properties"]
    return {"execution_id": execution["id"], "step": execution["step"],
            "execution_dir": props.get("execution_dir"),
            "code_fingerprint": props.get("code_fingerprint"),
            "parameters": json.loads(props.get("parameters") or "null"),
            "result": json.loads(props.get("result") or "null")}


def version_lineage(store: MetadataStore, pushed: dict[str, Any]) -> dict[str, Any]:
    """The chain of executions behind one pushed model version."""
    model = pushed["model"]
    push = store.producer(pushed["id"])
    if push is None:
        raise LineageError(f"no push execution recorded for {model} v{pushed['version']}")
    train = _upstream(store, push, f"model_{model}")
    evaluate = _upstream(store, push, "evaluation")
    transform = _upstream(store, train, "transform")
    validate = _upstream(store, transform, "anomalies")
    statistics = _upstream(store, validate, "statistics")
    augment = _upstream(store, transform, "augmented")
    ingest = _upstream(store, transform, "examples")
    blessing = next((a["properties"] for a in evaluate["outputs"].get(DERIVED, [])
                     if a["properties"].get("model") == model), None)
    # Pushes recorded before the infra-validate step existed have no such input.
    infra = (_upstream(store, push, "infra_validation")
             if push["inputs"].get("infra_validation") else None)
    infra_blessing = next((a["properties"] for a in infra["outputs"].get(DERIVED, [])
                           if a["properties"].get("model") == model), None) if infra else None
    # An imported model's step (import-<model>) read a Keras file: which one, and its sha256.
    keras_file = (train["inputs"].get("keras_file") or [None])[0]
    # A warm-started run began from a served version; a tuned one took a tune step's values.
    base = (train["inputs"].get("base_model") or [None])[0]
    tuning = _upstream(store, train, "tuning") if train["inputs"].get("tuning") else None
    ingest_facts = _facts(ingest)
    evaluation = _facts(evaluate)
    result = evaluation["result"] or {}
    return {
        "model": model, "version": pushed["version"], "served_path": pushed["uri"],
        "fingerprint": next((a["fingerprint"] for a in push["outputs"].get(DERIVED, [])
                             if a["id"] == pushed["id"]), None),
        "data": [{"uri": a["uri"], "fingerprint": a["fingerprint"]}
                 for a in ingest["inputs"].get("data", [])],
        "rows_rejected": (ingest_facts["result"] or {}).get("rows_rejected"),
        "ingest": ingest_facts,
        "statistics": _facts(statistics),
        "validation": _facts(validate),
        "schema": _input(validate, "schema"),
        "augment": _facts(augment),
        "transform": _facts(transform),
        "training": _facts(train),
        "warm_start": ({"uri": base["uri"], "version": base["properties"].get("version"),
                        "fingerprint": base["fingerprint"]} if base else None),
        "tuning": _facts(tuning) if tuning else None,
        "imported": ({"uri": keras_file["uri"],
                      "sha256": keras_file["properties"].get("sha256"),
                      "fingerprint": keras_file["fingerprint"]} if keras_file else None),
        "evaluation": evaluation,
        "metrics": {"accuracy": (result.get("accuracy") or {}).get(model),
                    "ensemble_accuracy": result.get("ensemble_accuracy"),
                    "test_examples": result.get("test_examples")},
        "blessing": blessing,
        "infra_validation": _facts(infra) if infra else None,
        "infra_blessing": infra_blessing,
        "push": _facts(push),
    }


def model_lineage(run_root: str, config: MetadataConfig, model: Optional[str] = None,
                  version: Optional[int] = None) -> list[dict[str, Any]]:
    """Lineage of `model` at `version` (default: the latest pushed version of each model)."""
    if not config.mysql_host:
        database = sqlite_path(config, run_root)
        if not os.path.exists(database):   # opening it would create an empty store
            raise LineageError(f"no ML Metadata store at {database}: is {run_root} the run "
                               "root of a pipeline run? (check --output, or give the run's "
                               "--metadata-db)")
    store = MetadataStore(config, run_root)
    pushed = store.pushed_versions(model)
    if not pushed:
        raise LineageError(f"no pushed model{' ' + model if model else ''} is recorded in "
                           f"{store.location}: run the pipeline through `push` first")
    if version is not None:
        chosen = [p for p in pushed if p["version"] == version]
        if not chosen:
            raise LineageError(f"{model or 'no model'} has no pushed version {version}; "
                               f"recorded: {sorted({p['version'] for p in pushed})}")
    else:
        latest: dict[str, dict[str, Any]] = {}
        for p in pushed:   # oldest first, so the last one wins
            latest[p["model"]] = p
        chosen = [latest[m] for m in sorted(latest)]
    return [version_lineage(store, p) for p in chosen]


def format_lineage(lineages: list[dict[str, Any]]) -> str:
    lines = []
    for item in lineages:
        training = item["training"]["result"] or {}
        validation = item["validation"]["result"] or {}
        blessing = item["blessing"] or {}
        metrics = item["metrics"]
        lines += [
            f"{item['model']} version {item['version']}  ({item['served_path']})",
            f"  model fingerprint   {item['fingerprint']}",
            *[f"  data                {d['uri']}\n"
              f"                      {d['fingerprint']}" for d in item["data"]],
            f"  ingest              {item['rows_rejected']} rows rejected; "
            f"{_counts((item['ingest']['result'] or {}).get('rows_written'))} "
            f"[execution {item['ingest']['execution_id']}]",
            f"  statistics          {item['statistics']['execution_dir']} "
            f"[execution {item['statistics']['execution_id']}]",
            f"  validation          "
            f"{'BLOCKING' if validation.get('blocking') else 'passed'}: "
            f"{_first_line(validation.get('summary'))} (schema {item['schema']['uri']})",
            f"  transform           {item['transform']['execution_dir']} "
            f"(code {item['transform']['code_fingerprint'][:19]}) "
            f"[execution {item['transform']['execution_id']}]",
            _training_line(item, training),
            f"  hyperparameters     {_tuning_line(item)}",
            f"  started from        {_start_line(item)}",
            f"  evaluation          test accuracy {_num(metrics['accuracy'])} on "
            f"{metrics['test_examples']} faces; ensemble {_num(metrics['ensemble_accuracy'])} "
            f"[execution {item['evaluation']['execution_id']}]",
            f"  blessing            {'blessed' if blessing.get('blessed') else 'NOT blessed'}: "
            f"{'; '.join(blessing.get('reasons', []))}",
            f"  infra blessing      {_infra_line(item)}",
            f"  push                [execution {item['push']['execution_id']}]",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _training_line(item: dict[str, Any], training: dict[str, Any]) -> str:
    imported = item.get("imported")
    if imported:
        return (f"  imported            {imported['uri']}\n"
                f"                      sha256 {imported['sha256']} "
                f"[execution {item['training']['execution_id']}]")
    return (f"  training            {training.get('epochs_run')} epochs, best val accuracy "
            f"{_num(training.get('best_val_accuracy'))}, {training.get('train_examples')} "
            f"train examples (code {item['training']['code_fingerprint'][:19]}) "
            f"[execution {item['training']['execution_id']}]")


def _tuning_line(item: dict[str, Any]) -> str:
    tuning = item.get("tuning")
    if not tuning:
        return "the config's (no tune step)"
    result = tuning["result"] or {}
    return (f"{result.get('source', '?')} of a {result.get('tuner')} search, "
            f"{result.get('trials')} trials: {_first_line(result.get('summary'))} "
            f"[execution {tuning['execution_id']}]")


def _start_line(item: dict[str, Any]) -> str:
    base = item.get("warm_start")
    if not base:
        return "random initial weights"
    return f"served version {base['version']} (warm start, {base['uri']})"


def _infra_line(item: dict[str, Any]) -> str:
    infra = item.get("infra_blessing")
    if not infra:
        return "none recorded (pushed before the infra-validate step existed)"
    return (f"{'blessed' if infra.get('blessed') else 'NOT blessed'} ({infra.get('mode')}, "
            f"{infra.get('server')}): {infra.get('summary')} "
            f"[execution {item['infra_validation']['execution_id']}]")


def _counts(counts: Any) -> str:
    if not isinstance(counts, dict):
        return ""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _first_line(text: Any) -> str:
    return str(text or "").strip().splitlines()[0] if text else ""
