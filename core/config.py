"""All pipeline configuration in one place.

Defaults are the seed notebook's values; the `smoke` profile shrinks the expensive parts
(epochs, image counts) so tests and `make demo` finish in minutes on 2 cores. A YAML file
can override any field: top-level keys are the section names below.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml  # PyYAML ships with apache-beam

@dataclass
class IngestConfig:
    split_mode: str = "usage"          # "usage" (FER-2013's column) or "random" (stratified)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42                     # the notebook's random_state
    max_rejected_fraction: float = 0.01
    remove_cross_split_duplicates: bool = True  # drop from validation/test, keep in train
    num_shards: int = 0                # 0: let the runner choose


@dataclass
class ValidationConfig:
    schema_path: str = "schemas/fer2013/schema.pbtxt"
    allow_anomalies: bool = False
    # L-infinity distance between splits' label distributions above which we call it drift.
    label_linf_threshold: float = 0.05


@dataclass
class AugmentConfig:
    enabled: bool = True
    target_per_class: int = 0          # 0: top every class up to the largest class
    max_rotation_degrees: float = 15.0
    max_shift_pixels: int = 3
    horizontal_flip: bool = True
    seed: int = 42


@dataclass
class TransformConfig:
    normalization: str = "zscore"      # full-pass mean/std over all training pixels


@dataclass
class ModelConfig:
    batch_size: int
    epochs: int
    learning_rate: float
    early_stopping_patience: int = 0   # 0: no early stopping
    max_train_examples: int = 0        # 0: all (smoke profile caps it)
    # Used instead of learning_rate when a transfer model has no pretrained weights and
    # trains from random init (VGG16 with weights=none): 5e-4 diverged there, 1e-4 learnt.
    scratch_learning_rate: Optional[float] = None
    # Transfer models only: "none" (random init), "imagenet" (downloads), or a local .h5.
    weights: str = ""
    train_base: str = "auto"           # "auto": frozen with pretrained weights, trained without


@dataclass(frozen=True)
class RegisteredModel:
    """One trainable model: everything the pipeline needs to know about it, in one entry.

    `builder` is "module:function"; the function takes (ModelConfig, jit_compile=...) and
    returns a compiled Keras 3 model whose input is the Transform step's `image` feature.
    It is named, not imported, so reading the configuration never imports Keras.
    """
    builder: str
    defaults: ModelConfig
    min_accuracy: float                # the evaluation gate's threshold (default profile)
    smoke: dict = field(default_factory=dict)          # smoke-profile ModelConfig overrides
    smoke_min_accuracy: Optional[float] = None         # smoke-profile threshold
    description: str = ""


# The models the pipeline trains, evaluates and pushes. Adding a model is one entry here
# (plus its builder function); steps, CLI choices, gates and the KFP pipeline follow.
MODEL_REGISTRY: dict[str, RegisteredModel] = {
    "cnn": RegisteredModel(
        builder="fer_pipeline.components.trainer.models:build_cnn",
        defaults=ModelConfig(batch_size=70, epochs=115, learning_rate=2e-4,
                             early_stopping_patience=40),
        min_accuracy=0.5,
        # The notebook CNN (no batch norm, dropout 0.5) sits at chance for ~150 steps
        # before it learns; small batches buy the most steps for the CPU time.
        smoke={"epochs": 5, "batch_size": 32, "learning_rate": 1e-3,
               "early_stopping_patience": 3, "max_train_examples": 3000},
        smoke_min_accuracy=0.3,
        description="the notebook's CNN: 4 x (conv 3x3, max-pool), dense 256-128"),
    "vgg16": RegisteredModel(
        builder="fer_pipeline.components.trainer.models:build_vgg16",
        defaults=ModelConfig(batch_size=65, epochs=25, learning_rate=5e-4,
                             scratch_learning_rate=1e-4, weights="none"),
        min_accuracy=0.3,
        # From random init (the offline default) VGG16 stays at chance for far longer than
        # any smoke budget on CPU (measured: 2 epochs of 640 faces, 2 min 48 s on a 2-core
        # AVX2 machine, still at chance), so no smoke budget buys it accuracy: the smoke
        # profile trains it the least that still runs every step (train, export, evaluate,
        # gate), one batch. The smoke gate still demands it beat the majority-class baseline.
        smoke={"epochs": 1, "batch_size": 32, "max_train_examples": 32},
        smoke_min_accuracy=0.0,
        description="the notebook's VGG16 transfer model (1x1 conv to RGB, VGG16 base, "
                    "dense 4096-4096)"),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_REGISTRY)


def registered_model(name: str) -> RegisteredModel:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {list(MODEL_NAMES)}")
    return MODEL_REGISTRY[name]


@dataclass
class TrainConfig:
    models: dict[str, ModelConfig] = field(default_factory=lambda: {
        name: dataclasses.replace(entry.defaults) for name, entry in MODEL_REGISTRY.items()})
    mixed_precision: bool = False
    xla: bool = False
    shuffle_buffer: int = 20000
    seed: int = 42


@dataclass
class EvalConfig:
    min_accuracy: dict[str, float] = field(default_factory=lambda: {
        name: entry.min_accuracy for name, entry in MODEL_REGISTRY.items()})
    min_class_recall: Optional[float] = None
    max_regression: float = 0.01       # allowed accuracy drop vs the version now in serving
    tie_tolerance: float = 0.05        # |conf_a - conf_b| <= this with disagreement: human review
    # Every model must also reach the test split's majority-class baseline (always answering
    # its most frequent class) plus this margin, in every profile: a min_accuracy below the
    # baseline would otherwise bless a model that gives one answer to every face.
    baseline_margin: float = 0.05


@dataclass
class InfraValidationConfig:
    """The infra-validate step: each blessed candidate served by a sandboxed model server
    (components/infra_validator.py) before the pusher may publish it."""
    mode: str = "load_and_query"       # or "load_only": the version must only become AVAILABLE
    server: str = "auto"               # fer-serve --server: auto | embedded | tfserving
    load_timeout_s: float = 180.0      # server start to AVAILABLE (includes the warm-up)
    request_timeout_s: float = 60.0    # each canary request
    canary_examples: int = 4           # test-split faces per canary request
    explain_examples: int = 1          # of which `explain` gets this many (it is costly)
    latency_requests: int = 10         # serving_uint8 calls whose median is the p50 latency
    max_difference: float = 1e-5       # served vs in-process SavedModel, per float output
    probability_sum_tolerance: float = 1e-4
    warmup: bool = True                # write the canaries as the pushed version's warm-up


@dataclass
class PushConfig:
    serving_root: str = ""             # "": <output>/serving_models
    keep_versions: int = 3
    # Request logs: when set, models.config tells fer-serve to log a sampling_rate share of
    # each model's requests under <request_log_dir>/<model>/ (serving/request_log.py).
    request_log_dir: str = ""
    request_log_sampling_rate: float = 1.0


@dataclass
class InferenceConfig:
    """Bulk inference (`fer-pipeline infer`). The ensemble's tolerance is evaluation's
    `tie_tolerance`, so the rule measured on the test split is the rule applied here."""
    # RunInference batches faces adaptively between these sizes (Beam's BatchElements).
    min_batch_size: int = 16
    max_batch_size: int = 256
    num_shards: int = 0                # PredictionLog files per model; 0: the runner chooses
    # Saliency maps for faces sent to review (the models' `explain` signature); each costs
    # a few model calls, so they are computed only for the faces that are queued.
    explain_flagged: bool = True


@dataclass
class MonitorConfig:
    """`fer-pipeline monitor`: what counts as drift of the served traffic.

    Each image feature and each model answer is compared with TFDV's comparators against
    the training run of the served version: approximate Jensen-Shannon divergence (0: the
    same histogram, 1: disjoint) for numbers, L-infinity (the largest change of one
    category's share) for classes and the review flag. A distance above its threshold is
    an alert. The defaults were chosen by measurement (tests/test_monitor.py, README
    "Monitoring"): fresh faces drawn like the test split stay below every threshold, and
    each kind of shift the tests inject crosses the one threshold it should.
    """
    # Image features of the served faces against the training split's (skew).
    brightness_js: float = 0.1         # mean pixel value of a face
    contrast_js: float = 0.1           # standard deviation of a face's pixels
    sharpness_js: float = 0.1          # variance of the Laplacian / the face's: low = blurred
    # Exposure: the share of faces with more than clipped_share of their pixels near black
    # (<= dark_level) or near white (>= bright_level), compared by L-infinity.
    dark_share_linf: float = 0.25
    bright_share_linf: float = 0.25
    dark_level: int = 16
    bright_level: int = 239
    clipped_share: float = 0.05
    pixels_js: float = 0.15            # TFDV's histogram of every pixel value (coarse)
    # Model answers against the same models' answers on the test split (evaluation).
    class_mix_linf: float = 0.08       # predicted-class shares, per model
    confidence_js: float = 0.1         # the winning class's probability, per model
    review_rate_linf: float = 0.1      # share of faces the ensemble sends to a person
    # Fewer faces than this in the window: distances are too noisy to alert on.
    min_requests: int = 500
    # --review-queue: the lowest-confidence faces queued besides the ties.
    review_lowest_confidence: int = 20
    # The page's per-window table splits the requested range into windows this long.
    window_minutes: float = 60.0


@dataclass
class MetadataConfig:
    """Where ML Metadata (lineage, and the record the step cache trusts) is kept.

    Default: SQLite at <run_root>/metadata.sqlite for a local run root; for a run root on
    an object store (SQLite cannot live there) a local file named after the run root
    under ~/.cache/fer-pipeline/metadata/. Set `mysql_host` to share one store across a
    cluster; the password is read from the environment variable `mysql_password_env`,
    never from this file.
    """
    sqlite_path: str = ""
    mysql_host: str = ""
    mysql_port: int = 3306
    mysql_database: str = "fer_metadata"
    mysql_user: str = "root"
    mysql_password_env: str = "FER_METADATA_MYSQL_PASSWORD"
    pipeline_name: str = "fer-pipeline"


@dataclass
class PipelineConfig:
    profile: str = "default"
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    infra_validation: InfraValidationConfig = field(default_factory=InfraValidationConfig)
    push: PushConfig = field(default_factory=PushConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _smoke_overrides() -> dict[str, Any]:
    """Small enough for tests and `make demo` on 2 CPU cores (per model: the registry)."""
    return {
        "train": {"models": {name: entry.smoke for name, entry in MODEL_REGISTRY.items()},
                  "shuffle_buffer": 4000},
        "evaluation": {"min_accuracy": {
            name: entry.smoke_min_accuracy for name, entry in MODEL_REGISTRY.items()
            if entry.smoke_min_accuracy is not None}},
    }


PROFILES = {"default": dict, "smoke": _smoke_overrides}


# ----------------------------------------------------------------------------- validation
#
# A config file is checked whole before any step runs: every key must name a field of the
# dataclasses above (or a registered model), every value must have the field's type, and
# the values below must lie in their range. All problems are reported at once, each with
# its dotted key, in one ConfigError naming the file.

class ConfigError(ValueError):
    """Everything wrong with a configuration, one problem per line."""


def _between(low: float, high: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


def _at_least(low: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def _positive(v: float) -> Optional[str]:
    return None if v > 0 else "must be greater than 0"


def _one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _fractions(v: tuple) -> Optional[str]:
    if any(f < 0 or f > 1 for f in v) or abs(sum(v) - 1.0) > 1e-6:
        return "must be three fractions (train, validation, test) that add up to 1"
    return None


def _weights(v: str) -> Optional[str]:
    if v in ("", "none", "imagenet") or v.endswith(".h5"):
        return None
    return "must be 'none', 'imagenet' or the path of a .h5 weights file"


def _local_directory(v: str) -> Optional[str]:
    # fer-serve writes request logs with plain file I/O on the serving machine.
    if "://" in v:
        return "must be a local directory of the serving machine, not a URI"
    return None


def _optional(check: Callable[[Any], Optional[str]]) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v is None else check(v)


# Ranges and choices by dotted key; "*" stands for any registered model name or, inside
# a part, any text ("monitor.*_js": every Jensen-Shannon threshold).
RULES: dict[str, Callable[[Any], Optional[str]]] = {
    "profile": _one_of("default", "smoke"),
    "ingest.split_mode": _one_of("usage", "random"),
    "ingest.split_fractions": _fractions,
    "ingest.max_rejected_fraction": _between(0, 1),
    "ingest.num_shards": _at_least(0),
    "validation.label_linf_threshold": _between(0, 1),
    "augment.target_per_class": _at_least(0),
    "augment.max_rotation_degrees": _between(0, 180),
    "augment.max_shift_pixels": _between(0, 47),
    "transform.normalization": _one_of("zscore", "minmax", "scale255"),
    "train.models.*.batch_size": _at_least(1),
    "train.models.*.epochs": _at_least(1),
    "train.models.*.learning_rate": _positive,
    "train.models.*.early_stopping_patience": _at_least(0),
    "train.models.*.max_train_examples": _at_least(0),
    "train.models.*.scratch_learning_rate": _optional(_positive),
    "train.models.*.weights": _weights,
    "train.models.*.train_base": _one_of("auto", "true", "false"),
    "train.shuffle_buffer": _at_least(1),
    "evaluation.min_accuracy.*": _between(0, 1),
    "evaluation.min_class_recall": _optional(_between(0, 1)),
    "evaluation.max_regression": _between(0, 1),
    "evaluation.tie_tolerance": _between(0, 1),
    # Negative only on purpose: it lets a model below the majority-class baseline through
    # (the cluster tests push untrained models to compare where they ran).
    "evaluation.baseline_margin": _between(-1, 1),
    "infra_validation.mode": _one_of("load_and_query", "load_only"),
    "infra_validation.server": _one_of("auto", "embedded", "tfserving"),
    "infra_validation.load_timeout_s": _positive,
    "infra_validation.request_timeout_s": _positive,
    "infra_validation.canary_examples": _between(1, 1000),  # TF Serving reads <= 1,000 warm-ups
    "infra_validation.explain_examples": _at_least(1),
    "infra_validation.latency_requests": _at_least(0),
    "infra_validation.max_difference": _at_least(0),
    "infra_validation.probability_sum_tolerance": _at_least(0),
    "push.keep_versions": _at_least(1),
    "push.request_log_dir": _local_directory,
    "push.request_log_sampling_rate": _between(0, 1),
    "inference.min_batch_size": _at_least(1),
    "inference.max_batch_size": _at_least(1),
    "inference.num_shards": _at_least(0),
    "monitor.*_js": _between(0, 1),
    "monitor.*_linf": _between(0, 1),
    "monitor.dark_level": _between(0, 255),
    "monitor.bright_level": _between(0, 255),
    "monitor.clipped_share": _between(0, 1),
    "monitor.min_requests": _at_least(1),
    "metadata.mysql_port": _between(1, 65535),
}


def _rule(key: str) -> Optional[Callable[[Any], Optional[str]]]:
    if key in RULES:
        return RULES[key]
    parts = key.split(".")
    for pattern, rule in RULES.items():
        wanted = pattern.split(".")
        if len(wanted) == len(parts) and all(fnmatch.fnmatchcase(p, w)
                                             for w, p in zip(wanted, parts)):
            return rule
    return None


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _checked(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """`value` as the type `hint` says (ints are numbers too), or a problem recorded."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _checked(key, value, hint, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}: expected {_type_name(hint)}, got {value!r}")
            return value
        return tuple(_checked(f"{key}[{i}]", v, a, problems) for i, (v, a) in
                     enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        return {k: _checked(f"{key}.{k}", v, args[1], problems) for k, v in value.items()}
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(hint, True)
    if not ok:
        hint_text = ""
        if hint in (int, float) and isinstance(value, str):
            hint_text = " (write a number without quotes)"
        problems.append(f"{key}: expected {_type_name(hint)}, got {value!r}{hint_text}")
        return value
    return float(value) if hint is float else value


def _merge(obj: Any, overrides: Any, problems: list[str], prefix: str = "") -> Any:
    """A copy of dataclass `obj` with nested `overrides` applied; what is wrong with them
    (unknown keys, wrong types, values out of range) goes to `problems`."""
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(overrides, dict):
        problems.append(f"{section}: expected a mapping of "
                        f"{', '.join(f.name for f in dataclasses.fields(obj))}; "
                        f"got {overrides!r}")
        return obj
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in known:
            problems.append(f"{path}: unknown key; {section} has {', '.join(sorted(known))}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, problems, f"{path}.")
        elif _is_dataclass_dict(current):
            changes[key] = _merge_sections(path, current, value, problems)
        else:
            checked = _checked(path, value, hints[key], problems)
            if isinstance(current, dict) and isinstance(checked, dict):
                checked = {**current, **checked}
            changes[key] = checked
    return dataclasses.replace(obj, **changes)


def _is_dataclass_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        dataclasses.is_dataclass(v) for v in value.values())


def _merge_sections(key: str, current: dict[str, Any], overrides: Any,
                    problems: list[str]) -> dict[str, Any]:
    """Per-name sections (train.models.<name>): names must exist, fields merge."""
    if not isinstance(overrides, dict):
        problems.append(f"{key}: expected a mapping of {', '.join(current)}; got {overrides!r}")
        return current
    for name in sorted(set(overrides) - set(current)):
        problems.append(f"{key}.{name}: not a registered model; registered: "
                        f"{', '.join(current)}")
    return {name: _merge(section, overrides.get(name) or {}, problems, f"{key}.{name}.")
            for name, section in current.items()}


def _check_values(obj: Any, problems: list[str], prefix: str = "") -> None:
    """Ranges and choices (RULES) over a merged config, and model names against the
    registry wherever a mapping is keyed by model."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_values(value, problems, f"{key}.")
        elif _is_dataclass_dict(value):
            for name, section in value.items():
                _check_values(section, problems, f"{key}.{name}.")
        elif isinstance(value, dict):
            for name, item in value.items():
                if key == "evaluation.min_accuracy" and name not in MODEL_REGISTRY:
                    problems.append(f"{key}.{name}: not a registered model; registered: "
                                    f"{', '.join(MODEL_NAMES)}")
                _apply_rule(f"{key}.{name}", item, problems)
        else:
            _apply_rule(key, value, problems)


# Pairs of keys whose first value must not exceed the second.
ORDERED_PAIRS = (("inference.min_batch_size", "inference.max_batch_size"),
                 ("monitor.dark_level", "monitor.bright_level"))


def _check_pairs(config: PipelineConfig, problems: list[str]) -> None:
    def value(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(config, section), name)

    for low, high in ORDERED_PAIRS:
        smaller, larger = value(low), value(high)
        try:
            if smaller > larger:
                problems.append(f"{low} ({smaller!r}) must not exceed {high} ({larger!r})")
        except TypeError:   # a value of the wrong type, already reported by _checked
            pass


def _apply_rule(key: str, value: Any, problems: list[str]) -> None:
    rule = _rule(key)
    if rule is None:
        return
    try:
        problem = rule(value)
    except TypeError:   # a value of the wrong type, already reported by _checked
        return
    if problem:
        problems.append(f"{key}: {problem}, got {value!r}")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-4` (no dot) is a string; YAML 1.2 and every user
    read it as a number, so this loader does too."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML (.yaml/.yml) or JSON file; ConfigError naming the file and the
    place for anything that is not one."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory")
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            data = yaml.load(text, Loader=_YamlLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") \
                from None
    else:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"config file {path} is not valid JSON: {error} (YAML files "
                              "must end in .yaml or .yml)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(PipelineConfig))}), "
                          f"got {type(data).__name__} {data!r:.60}")
    return data


def load_config(path: Optional[str] = None, profile: str = "default",
                overrides: Optional[dict[str, Any]] = None) -> PipelineConfig:
    """Defaults, then the profile, then the YAML/JSON file at `path`, then `overrides`
    (the command line's flags); ConfigError listing every problem, before anything runs."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    problems: list[str] = []
    config = _merge(PipelineConfig(profile=profile), PROFILES[profile](), problems)
    if problems:   # our own profile is wrong: a bug, not the user's mistake
        raise RuntimeError(f"profile {profile!r}: " + "; ".join(problems))
    for source, data in ((path, read_config_file(path) if path else None),
                         ("the command line", overrides)):
        if not data:
            continue
        config = _merge(config, data, problems)
        _check_values(config, problems)
        _check_pairs(config, problems)
        if problems:
            where = f"config file {source}" if source != "the command line" else source
            if len(problems) == 1:
                raise ConfigError(f"{where}: {problems[0]}")
            raise ConfigError(f"{where}: {len(problems)} problems:\n"
                              + "\n".join(f"  {p}" for p in problems))
    return config
