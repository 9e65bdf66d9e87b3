"""The model card of a pushed version: model_card.json in Model Card Toolkit's schema.

`push` writes one per version it publishes, inside the version's `assets.extra/` (the
directory TF Serving leaves alone), so the card is published with the version, atomically
(components/pusher.py), and core/model_card_page.py renders it as model_card.html.

Everything comes from the files the pipeline's steps committed: the evaluation record (the
test-split metrics, the confusion matrix, the gate's thresholds and verdict), the infra
verdict, the model's training_info.json and history.json, and the manifests of the steps
upstream (ingest: rows read, rejected, split; augment; transform), gathered by the pusher
into `CardFacts`. The card follows schema v0.0.2 (schemas/model_card/, validated here):

- model_details: name, overview, version (number and date), documentation (how the
  model was made: trained with which hyperparameters and where they came from, or imported
  from which file), references and the citation of FER-2013;
- model_parameters: the architecture, the input and output formats, and one dataset
  entry per split plus the source file (rows, rejected rows, augmentation);
- quantitative_analysis.performance_metrics (values are strings in the schema): accuracy and loss on the test split, the
  majority-class baseline, per class precision / recall / F1 / support (slice
  `class=<name>`), every cell of the confusion matrix (slice `true=<a>,predicted=<b>`),
  the gate's thresholds (type `gate: ...`) and infra validation's measurements (type
  `infra: ...`);
- considerations: intended users and uses, out-of-scope uses (as ethical risks with their
  mitigation), known limitations and trade-offs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (BLESSINGS_FILE, CLASS_NAMES, EVALUATION_FILE,
                                        IMAGE_SIZE, INFRA_BLESSINGS_FILE, MANIFEST_FILE,
                                        NUM_CLASSES, TRAINING_INFO_FILE, class_names_for)
from fer_pipeline.core.errors import InputDataError

__all__ = ["CardFacts", "SCHEMA_VERSION", "CARD_DIR", "CARD_JSON", "CARD_HTML", "build_card",
           "card_schema", "content_fingerprint", "metric_index", "read_facts", "validate_card"]

# Inside the version directory: TF Serving reads only the SavedModel and, in assets.extra/,
# its warm-up file, so the card travels with the version without being loaded.
CARD_DIR = "assets.extra"
CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"

SCHEMA_VERSION = "0.0.2"
FER2013_URL = ("https://www.kaggle.com/c/challenges-in-representation-learning-facial-"
               "expression-recognition-challenge")
FER2013_CITATION = ("Goodfellow, I. J. et al. (2013). Challenges in Representation Learning: "
                    "A report on three machine learning contests. ICONIP 2013.")

INTENDED_USES = (
    "Estimating which of seven basic expressions (angry, disgust, fear, happy, sad, "
    "surprise, neutral) a cropped, frontal, 48x48 grey face shows, as a signal aggregated "
    "over many faces (e.g. audience reactions, usability studies, research on expressions).",
    "A first pass that a person reviews: answers the ensemble is unsure of go to the human "
    "review queue (fer-review).",
)
USERS = ("Engineers and analysts who aggregate expression estimates over many faces.",
         "Reviewers who correct the model's answers in fer-review.")
OUT_OF_SCOPE = (
    ("Inferring a person's inner emotional state, intent or truthfulness",
     "An expression is not a feeling; FER-2013 labels what a face looks like to an "
     "annotator. Report expressions, never states of mind."),
    ("Decisions about individuals (hiring, policing, credit, education, health)",
     "Not validated for any individual decision; the test accuracy leaves many faces "
     "wrong. Do not use it where an answer affects a person."),
    ("Identifying or tracking people",
     "The model has no notion of identity and must not be combined with face recognition "
     "to follow individuals."),
    ("Faces unlike the training data: profile views, occlusions, children, very low light",
     "Check the monitoring page (fer-pipeline monitor) for drift before trusting answers "
     "on a new source of faces."),
)
LIMITATIONS = (
    "FER-2013's labels are noisy: they were gathered by web image search and a single "
    "annotation; human accuracy on it is about 65 %, so test accuracy is bounded by label "
    "quality, and disgust has very few examples.",
    "The demographics of FER-2013's faces (age, sex, skin tone, culture) are unknown; the "
    "model's accuracy per group has not been and cannot be measured with this data, and "
    "expressions are not displayed the same way across cultures.",
    f"Input is a {IMAGE_SIZE}x{IMAGE_SIZE} grey crop: the face must already be found, "
    "centred and cropped; colour and context are lost.",
    "The test split is one sample; the per-class numbers on small classes carry wide "
    "uncertainty.",
)
TRADEOFFS = (
    "The gate blesses a model on overall test accuracy against fixed thresholds; a model "
    "can pass while one class (often disgust or fear) stays poor unless "
    "evaluation.min_class_recall is set.",
)


@dataclass
class CardFacts:
    """What the pusher read for one pushed version (all from committed step outputs)."""
    model: str
    version: int
    served_path: str
    date: str                                   # YYYY-MM-DD of the push
    evaluation: dict[str, Any]                  # the model's entry of evaluation.json
    thresholds: dict[str, Any]                  # evaluation.json's thresholds
    test_data: dict[str, Any]                   # evaluation.json's data
    blessing: dict[str, Any]                    # blessings.json[model]
    infra: Optional[dict[str, Any]] = None      # infra_blessings.json[model]
    training_info: Optional[dict[str, Any]] = None
    model_manifest: Optional[dict[str, Any]] = None   # the train/import step's manifest
    ingest: Optional[dict[str, Any]] = None     # ingest's manifest (result, data inputs)
    augment: Optional[dict[str, Any]] = None    # augment's result
    transform: Optional[dict[str, Any]] = None  # transform's result
    previous: Optional[dict[str, Any]] = None   # the version served before: version, accuracy
    report: str = ""                            # the evaluation report this card links to
    extra: dict[str, Any] = field(default_factory=dict)


def read_facts(model: str, version: int, served_path: str, date: str, model_dir: str,
               evaluation_dir: str, infra_validation_dir: Optional[str] = None,
               report: str = "") -> CardFacts:
    """The facts of one pushed version, from the committed outputs the push step was given
    (the model's step output, the evaluation, infra validation) and the manifests they name
    (transform, then ingest and augment)."""
    evaluation = fileio.read_json(fileio.join(evaluation_dir, EVALUATION_FILE))
    entry = evaluation["models"][model]
    infra = (_read(fileio.join(infra_validation_dir, INFRA_BLESSINGS_FILE)) or {}).get(model) \
        if infra_validation_dir else None
    manifest = _read(fileio.join(model_dir, MANIFEST_FILE))
    transform = _upstream_manifest(manifest, "transform")
    served = entry.get("served")
    return CardFacts(
        model=model, version=version, served_path=served_path, date=date, evaluation=entry,
        thresholds=evaluation.get("thresholds") or {}, test_data=evaluation.get("data") or {},
        blessing=(fileio.read_json(fileio.join(evaluation_dir, BLESSINGS_FILE)) or {})
        .get(model, {}),
        infra=infra, training_info=_read(fileio.join(model_dir, TRAINING_INFO_FILE)),
        model_manifest=manifest, ingest=_upstream_manifest(transform, "examples"),
        augment=(_upstream_manifest(transform, "augmented") or {}).get("result"),
        transform=(transform or {}).get("result"),
        previous={"version": served["version"], "accuracy": served["accuracy"]}
        if served else None,
        report=report)


def _read(path: str) -> Optional[dict[str, Any]]:
    return fileio.read_json(path) if fileio.exists(path) else None


def _upstream_manifest(manifest: Optional[dict[str, Any]], name: str
                       ) -> Optional[dict[str, Any]]:
    """The manifest of the step output a manifest names as its input `name`."""
    inputs = ((manifest or {}).get("inputs") or {}).get(name) or []
    return _read(fileio.join(inputs[0]["uri"], MANIFEST_FILE)) if inputs else None


CARD_FILES = (f"{CARD_DIR}/{CARD_JSON}", f"{CARD_DIR}/{CARD_HTML}")


def content_fingerprint(version_dir: str) -> str:
    """sha256 over a version's files but its model card (which the pusher writes), so a
    candidate can be compared with a served version."""
    digest = hashlib.sha256()
    for rel, full in fileio.walk_files(version_dir):
        if rel not in CARD_FILES:
            digest.update(rel.encode() + b"\0" + fileio.read_bytes(full) + b"\0")
    return digest.hexdigest()


def card_schema() -> dict[str, Any]:
    """Model Card Toolkit's v0.0.2 JSON schema, shipped in fer_pipeline.schemas."""
    path = (resources.files("fer_pipeline.schemas") / "model_card" / f"v{SCHEMA_VERSION}"
            / "model_card.schema.json")
    return json.loads(path.read_text())


def validate_card(card: dict[str, Any]) -> None:
    """InputDataError naming the first place where `card` breaks the schema."""
    import jsonschema

    errors = sorted(jsonschema.Draft7Validator(card_schema()).iter_errors(card),
                    key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise InputDataError(f"model card for {card.get('model_details', {}).get('name')} "
                             f"breaks the model card schema v{SCHEMA_VERSION} at {where}: "
                             f"{errors[0].message}")


def metric_index(card: dict[str, Any], type_: str, slice_: Optional[str] = None) -> int:
    """Index in performance_metrics of the metric `type_` (and `slice_`), for data-paths."""
    for i, metric in enumerate(card["quantitative_analysis"]["performance_metrics"]):
        if metric["type"] == type_ and metric.get("slice") == slice_:
            return i
    raise KeyError(f"no metric {type_!r} slice {slice_!r}")


def build_card(facts: CardFacts) -> dict[str, Any]:
    """The card (schema v0.0.2), validated."""
    card = {
        "schema_version": SCHEMA_VERSION,
        "model_details": {
            "name": facts.model,
            "overview": _overview(facts),
            "documentation": "\n\n".join(_documentation(facts)),
            "version": {"name": str(facts.version), "date": facts.date,
                        "diff": _diff(facts)},
            "path": facts.served_path,
            "references": [{"reference": FER2013_URL}],
            "citations": [{"style": "text", "citation": FER2013_CITATION}],
        },
        "model_parameters": {
            "model_architecture": _architecture(facts),
            "data": _datasets(facts),
            "input_format": (f"raw grey pixels 0-255, [batch, {IMAGE_SIZE}, {IMAGE_SIZE}] or "
                             f"[batch, {IMAGE_SIZE * IMAGE_SIZE}] (serving_default int32, "
                             "serving_uint8), or serialized tf.Examples with a `pixels` "
                             "bytes feature (serving_examples)"),
            "output_format": (f"probabilities float32 [batch, {len(_classes(facts))}] in the "
                              f"order {', '.join(_classes(facts))}; class_id int64; "
                              "class_name string; "
                              "`explain` adds per-class saliency maps"),
        },
        "quantitative_analysis": {"performance_metrics": _metrics(facts)},
        "considerations": {
            "users": [{"description": text} for text in USERS],
            "use_cases": [{"description": text} for text in INTENDED_USES],
            "limitations": [{"description": text} for text in LIMITATIONS],
            "tradeoffs": [{"description": text} for text in TRADEOFFS],
            "ethical_considerations": [
                {"name": f"Out of scope: {name}", "mitigation_strategy": mitigation}
                for name, mitigation in OUT_OF_SCOPE],
        },
    }
    validate_card(card)
    return card


# ----------------------------------------------------------------------------- details

def _imported(facts: CardFacts) -> Optional[dict[str, Any]]:
    return (facts.training_info or {}).get("imported")


def _classes(facts: CardFacts) -> tuple[str, ...]:
    """The model's classes, as its evaluation scored them: FER-2013's 7 or FER+'s 8."""
    return class_names_for(len(facts.evaluation.get("per_class") or CLASS_NAMES))


def _overview(facts: CardFacts) -> str:
    accuracy = facts.evaluation.get("accuracy")
    made = ("imported from a Keras file trained outside the pipeline" if _imported(facts)
            else "trained by the pipeline")
    return (f"{facts.model} version {facts.version}: classifies a {IMAGE_SIZE}x{IMAGE_SIZE} "
            f"grey face into the {_expressions(facts)}; {made}; test accuracy "
            f"{accuracy:.3f} on {facts.test_data.get('test_examples')} faces; "
            f"served from {facts.served_path}.")


def _expressions(facts: CardFacts) -> str:
    count = len(_classes(facts))
    return (f"{count} FER-2013 expressions" if count == NUM_CLASSES else
            f"{count} FER+ expressions (FER-2013's seven and contempt)")


def _diff(facts: CardFacts) -> str:
    if not facts.previous:
        return "first version of this model in this serving root"
    return (f"replaces version {facts.previous.get('version')} (test accuracy "
            f"{facts.previous.get('accuracy', float('nan')):.3f} -> "
            f"{facts.evaluation.get('accuracy', float('nan')):.3f} on the same test split)")


def _documentation(facts: CardFacts) -> list[str]:
    """Paragraphs: how it was made, hyperparameters, the gate, infra validation, lineage."""
    return [f"{title}: {text}" for title, text in sections(facts)]


def sections(facts: CardFacts) -> list[tuple[str, str]]:
    """(title, text) of the documentation's parts; model_card.html shows them the same."""
    return [("How it was made", _provenance(facts)),
            ("Hyperparameters", _hyperparameters(facts)),
            ("Evaluation gate", _gate(facts)),
            ("Infra validation", _infra(facts)),
            ("Lineage", _lineage(facts))]


def _provenance(facts: CardFacts) -> str:
    imported = _imported(facts)
    if imported:
        adapted = [what for what, done in (("resized from 48x48", imported.get("resized")),
                                           ("grey repeated to 3 channels",
                                            imported.get("channels_repeated"))) if done]
        return (f"imported from {imported.get('keras_file')} (sha256 {imported.get('sha256')}), "
                f"{imported.get('parameters')} parameters, input "
                f"{'x'.join(map(str, imported.get('input_shape') or []))}"
                + (f" ({', '.join(adapted)})" if adapted else "")
                + f", pixels multiplied by {imported.get('scale'):.6g} as its training did. It "
                "was trained outside this pipeline: its training data and procedure are what "
                "its author says, not recorded here.")
    info = facts.training_info or {}
    history = facts.evaluation.get("history") or {}
    return (f"trained by the pipeline's train step on {info.get('train_examples')} training "
            f"faces (after augmentation) and {info.get('validation_examples')} validation "
            f"faces, {history.get('epochs_run')} epochs (exported the weights of epoch "
            f"{history.get('exported_epoch')}, best validation accuracy "
            f"{_fmt(history.get('best_val_accuracy'))}), strategy {info.get('strategy')} on "
            f"{info.get('num_replicas')} replica(s), precision {info.get('precision_policy')}, "
            f"Keras {((info.get('versions') or {}).get('keras'))} on "
            f"{info.get('keras_backend')}" + _warm_start(info) + ".")


def _warm_start(info: dict[str, Any]) -> str:
    started = info.get("warm_start")
    if not started:
        return ", from freshly initialized weights"
    if isinstance(started, dict):
        described = ", ".join(f"{k} {v}" for k, v in sorted(started.items())
                              if isinstance(v, (str, int, float)))
        return f", warm-started ({described})"
    return f", warm-started from {started}"


def _hyperparameters(facts: CardFacts) -> str:
    if _imported(facts):
        return "not known to the pipeline (the file was trained elsewhere)."
    info = facts.training_info or {}
    section = info.get("model_config") or {}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(section.items())
                      if v not in (None, "", 0) or k in ("learning_rate", "batch_size"))
    return f"{shown}. Found by: {_found_by(info)}."


def _found_by(info: dict[str, Any]) -> str:
    # The train step records where its tunable values came from: {"source": "config" or
    # "tune", "values", "tuning"} (the tune step's search, when it ran).
    record = info.get("hyperparameters") or {}
    if record.get("source") == "tune":
        tuning = record.get("tuning") or {}
        facts = "; ".join(f"{k} {v}" for k, v in sorted(tuning.items())
                          if isinstance(v, (str, int, float, bool)))
        return "the tune step's search" + (f" ({facts})" if facts else "")
    profile = (info.get("config") or {}).get("profile", "default")
    return (f"the values declared for this model in the model registry (core/model_registry.py), "
            f"{profile} profile, with any config file overrides; no search was run")


def _gate(facts: CardFacts) -> str:
    verdict = "blessed" if facts.blessing.get("blessed") else "held back"
    return f"{verdict}: " + "; ".join(facts.blessing.get("reasons", []))


def _infra(facts: CardFacts) -> str:
    if not facts.infra:
        return "not recorded (pushed without the infra-validate step)"
    return (f"{'blessed' if facts.infra.get('blessed') else 'held back'} "
            f"({facts.infra.get('mode')}, {facts.infra.get('server')}): "
            f"{facts.infra.get('summary')}")


def _lineage(facts: CardFacts) -> str:
    parts = []
    manifest = facts.model_manifest or {}
    if manifest:
        parts.append(f"model step {manifest.get('step')} execution {manifest.get('execution')} "
                     f"(code {str(manifest.get('code_fingerprint'))[:19]})")
    for item in (facts.ingest or {}).get("inputs", {}).get("data", []):
        parts.append(f"data {item['uri']} ({item['fingerprint']})")
    parts.append(f"test split {facts.test_data.get('examples_dir')}")
    if facts.report:
        parts.append(f"evaluation report {facts.report}")
    return "; ".join(parts) + (". `fer-pipeline lineage --output RUN --model "
                               f"{facts.model} --version {facts.version}` shows the whole "
                               "chain from ML Metadata.")


def _architecture(facts: CardFacts) -> str:
    imported = _imported(facts)
    if imported:
        return (f"{imported.get('architecture')}: {', '.join(imported.get('layers') or [])} "
                f"({imported.get('parameters')} parameters)")
    return str((facts.training_info or {}).get("model_description")
               or (facts.training_info or {}).get("model_name") or facts.model)


def _datasets(facts: CardFacts) -> list[dict[str, Any]]:
    ingest = (facts.ingest or {}).get("result") or {}
    written = ingest.get("rows_written") or {}
    augment = facts.augment or {}
    transformed = (facts.transform or {}).get("counts") or {}
    rejected = ingest.get("rows_rejected")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted((ingest.get("rejected_by_reason")
                                                        or {}).items()))
    sources = [item["uri"] for item in (facts.ingest or {}).get("inputs", {}).get("data", [])]
    train = (f"FER-2013 format faces, split {ingest.get('split_mode')}: {written.get('train')} "
             "original training faces")
    if augment.get("enabled"):
        train += (f" plus {augment.get('augmented')} augmented copies (rotation, shift, "
                  f"mirror) balancing every class to {augment.get('target_per_class')}, "
                  f"{transformed.get('train')} in all")
    if _imported(facts):
        train = ("not the data this model learnt from (it was trained elsewhere); the "
                 "pipeline's own training split: " + train)
    return [
        {"name": "FER-2013 source", "description": (
            f"{', '.join(sources) or 'unknown'}: {ingest.get('rows_read')} rows read, "
            f"{rejected} rejected" + (f" ({reasons})" if reasons else "")
            + f", {ingest.get('duplicate_rows_removed', 0)} duplicate rows removed, "
            f"{ingest.get('cross_split_duplicates', 0)} faces found in two splits")},
        {"name": "train", "description": train + "."},
        {"name": "validation", "description": f"{written.get('validation')} faces (early "
         "stopping and model selection)."},
        {"name": "test", "description": f"{facts.test_data.get('test_examples')} faces, "
         "never seen in training; the metrics below are on this split."},
    ]


# ----------------------------------------------------------------------------- metrics

def _metrics(facts: CardFacts) -> list[dict[str, Any]]:
    """Metric values are strings in the schema: integers as such, floats in full (repr)."""
    return [{**m, "value": _text(m["value"])} for m in _numbers(facts)]


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else repr(float(value))


def _numbers(facts: CardFacts) -> list[dict[str, Any]]:
    model, thresholds = facts.evaluation, facts.thresholds
    metrics = [{"type": "accuracy", "value": model["accuracy"], "slice": "test"},
               {"type": "loss", "value": model["loss"], "slice": "test"},
               {"type": "macro F1", "value": model["macro_avg"]["f1"], "slice": "test"},
               {"type": "majority-class baseline accuracy",
                "value": facts.test_data["majority_baseline"]["accuracy"], "slice": "test"}]
    for row in model["per_class"]:
        for key in ("precision", "recall", "f1", "support"):
            metrics.append({"type": key, "value": row[key],
                            "slice": f"class={row['class_name']}"})
    names = _classes(facts)
    for i, row in enumerate(model["confusion_matrix"]):
        for j, value in enumerate(row):
            metrics.append({"type": "confusion count", "value": value,
                            "slice": f"true={names[i]},predicted={names[j]}"})
    gate = {"min_accuracy": (thresholds.get("min_accuracy") or {}).get(facts.model),
            "baseline_margin": thresholds.get("baseline_margin"),
            "max_regression": thresholds.get("max_regression"),
            "min_class_recall": thresholds.get("min_class_recall")}
    metrics += [{"type": f"gate: {key}", "value": value} for key, value in gate.items()
                if value is not None]
    for key, value in sorted(((facts.infra or {}).get("measurements") or {}).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.append({"type": f"infra: {key}", "value": value})
    return metrics


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
