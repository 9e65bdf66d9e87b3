"""All pipeline configuration in one place.

Defaults are the seed notebook's values; the `smoke` profile shrinks the expensive parts
(epochs, image counts) so tests and `make demo` finish in minutes on 2 cores. A YAML file
can override any field: top-level keys are the section names below.

Each field is declared with `setting(default, check=..., help=...)`: its range or
choices and a one-line description sit beside it, in the field's metadata;
core/config_loading.py merges a file into these dataclasses and checks every field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml  # PyYAML ships with apache-beam

from fer_pipeline.core.config_loading import (YamlLoader, at_least, between, check_order,
                                              check_values, fractions, local_directory,
                                              merge, one_of, optional, positive, setting)
from fer_pipeline.core.contract import CLASS_NAMES
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.model_registry import (IMPORTED_MODELS, IMPORTED_NAMES, MODEL_NAMES,
                                             MODEL_REGISTRY, ImportedModel, ModelConfig,
                                             RegisteredModel, registered_model)

__all__ = ["IngestConfig", "ValidationConfig", "AugmentConfig", "TransformConfig",
           "ModelConfig", "RegisteredModel", "MODEL_REGISTRY", "MODEL_NAMES",
           "ImportedModel", "IMPORTED_MODELS", "IMPORTED_NAMES", "ImportConfig",
           "registered_model", "TuneConfig", "TrainConfig", "EvalConfig", "InfraValidationConfig",
           "PushConfig", "InferenceConfig", "MonitorConfig", "MetadataConfig", "PipelineConfig",
           "PROFILES", "ConfigError", "read_config_file", "load_config", "DEFAULT_SCHEMA_PATH",
           "packaged_schema_path", "resolve_schema_path"]


def _registered() -> list[str]:
    # Looked up when checked: tests register extra models.
    return list(MODEL_REGISTRY) + list(IMPORTED_MODELS)


_share = between(0, 1)   # a fraction, or a distance between distributions


@dataclass
class IngestConfig:
    split_mode: str = setting("usage", check=one_of("usage", "random"),
                              help='"usage" (FER-2013\'s column) or "random" (stratified)')
    split_fractions: tuple[float, float, float] = setting(
        (0.8, 0.1, 0.1), check=fractions, help="train, validation, test shares (random)")
    seed: int = setting(42, help="the notebook's random_state")
    max_rejected_fraction: float = setting(0.01, check=between(0, 1),
                                           help="most rows that may fail to parse, a share")
    remove_cross_split_duplicates: bool = setting(
        True, help="faces in two splits: drop from validation/test, keep in train")
    num_shards: int = setting(0, check=at_least(0), help="0: let the runner choose")
    # Image folders given as --data: folder name -> class, over the built-in FER-2013 and
    # RAF-DB names (components/example_gen/images.py); matched without regard to case.
    class_map: dict[str, str] = setting(
        factory=dict, check=one_of(*CLASS_NAMES),
        help="image folder name -> class, added to the built-in FER-2013 and RAF-DB names")
    # FER+ (Microsoft's ten crowd votes per FER-2013 face, fer2013new.csv): joined by row.
    ferplus_labels: str = setting("", help="FER+ vote file (fer2013new.csv) for the CSV; "
                                  "empty: FER-2013's labels")
    ferplus_mode: str = setting("majority", check=one_of("majority", "probability",
                                                         "crossentropy"),
                                help="train on FER+'s majority, a label drawn from the votes "
                                     "each epoch, or the vote distribution as soft target")
    ferplus_classes: int = setting(8, check=one_of(7, 8),
                                   help="8 keeps contempt as a class; 7 drops its votes")


# The schema the pipeline validates against is package data of fer_pipeline.schemas, found
# through importlib.resources: from any working directory, in a checkout or installed from
# the wheel. The configuration names it by this package-relative default, not by an absolute
# path, because a configuration travels (Kubeflow compiles it into the pipeline spec) to
# machines where the package lives elsewhere; resolve_schema_path() turns it into a path.
DEFAULT_SCHEMA_PATH = "schemas/fer2013/schema.pbtxt"


def packaged_schema_path() -> str:
    """The FER-2013 schema shipped in the fer_pipeline.schemas package."""
    return str(resources.files("fer_pipeline.schemas") / "fer2013" / "schema.pbtxt")


def resolve_schema_path(path: str) -> str:
    """`validation.schema_path` as a path to read: the default is the packaged schema; a URI
    or an absolute path is used as given; another relative path is the working directory's."""
    from fer_pipeline.core import fileio
    if path == DEFAULT_SCHEMA_PATH:
        return packaged_schema_path()
    if fileio.is_uri(path) or os.path.isabs(path):
        return path
    return os.path.abspath(path)


@dataclass
class ValidationConfig:
    # A path or URI; the default names the packaged schema (resolve_schema_path).
    schema_path: str = setting(
        DEFAULT_SCHEMA_PATH, help="the TFDV schema the data must match")
    allow_anomalies: bool = setting(False, help="schema anomalies do not fail the step")
    # L-infinity distance between splits' label distributions above which we call it drift.
    label_linf_threshold: float = setting(0.05, check=between(0, 1),
                                          help="label drift between splits above this")


@dataclass
class AugmentConfig:
    enabled: bool = setting(True, help="augment the training split")
    target_per_class: int = setting(0, check=at_least(0),
                                    help="0: top every class up to the largest class")
    max_rotation_degrees: float = setting(15.0, check=between(0, 180),
                                          help="largest random rotation, degrees")
    max_shift_pixels: int = setting(3, check=between(0, 47),
                                    help="largest random shift, pixels")
    horizontal_flip: bool = setting(True, help="mirror faces at random")
    seed: int = setting(42, help="seed of the augmentation")


@dataclass
class TransformConfig:
    normalization: str = setting(
        "zscore", check=one_of("zscore", "minmax", "scale255"),
        help="zscore: full-pass mean/std over all training pixels; minmax; scale255")


@dataclass
class ImportConfig:
    """One imported Keras file (`fer-pipeline import-model`; section imports.<name>)."""
    keras_file: str = setting("", help="the .h5 or .keras file (import-model --keras)")
    input_shape: Optional[tuple[int, int, int]] = setting(
        None, help="height, width, channels, where the file leaves them open")
    scale: float = setting(1 / 255, check=positive,
                           help="what the model's training multiplied 0-255 pixels by")


@dataclass
class TrainConfig:
    models: dict[str, ModelConfig] = setting(factory=lambda: {
        name: dataclasses.replace(entry.defaults) for name, entry in MODEL_REGISTRY.items()},
        help="per registered model: its training settings")
    mixed_precision: bool = setting(False, help="train in mixed float16 precision")
    xla: bool = setting(False, help="compile training with XLA")
    shuffle_buffer: int = setting(20000, check=at_least(1),
                                  help="faces in the training shuffle buffer")
    seed: int = setting(42, help="seed of the training")
    warm_start: bool = setting(
        False, help="start each model from the weights of its version in serving (when "
        "its architecture and contract match)")


@dataclass
class TuneConfig:
    """The tune step (components/tuner/): a KerasTuner search over each model's registered
    search space, whose best values `train` then uses."""
    enabled: bool = setting(False, help="`fer-pipeline run` tunes before training "
                            "(also `run --tune`); `fer-pipeline tune` always does")
    tuner: str = setting("random", check=one_of("hyperband", "bayesian", "random"),
                         help="KerasTuner's search: hyperband | bayesian | random")
    max_trials: int = setting(10, check=at_least(1),
                              help="most trials (hyperband: ignored, its brackets decide)")
    epochs_per_trial: int = setting(5, check=at_least(1),
                                    help="epochs of each trial (hyperband: the most)")
    hyperband_factor: int = setting(3, check=at_least(2), help="hyperband's reduction factor")
    max_train_examples: int = setting(
        0, check=at_least(0), help="faces per trial epoch; 0: the model's own cap")
    workers: int = setting(0, check=at_least(0),
                           help="0: trials in this process; N: a chief and N worker processes")
    seed: int = setting(42, help="seed of the search and of every trial")


@dataclass
class EvalConfig:
    min_accuracy: dict[str, float] = setting(factory=lambda: {
        name: entry.min_accuracy for name, entry in [*MODEL_REGISTRY.items(),
                                                     *IMPORTED_MODELS.items()]},
        check=between(0, 1), keys=_registered,
        help="per registered model: the test accuracy the gate requires")
    min_class_recall: Optional[float] = setting(
        None, check=optional(between(0, 1)), help="set: every class's recall must reach it")
    max_regression: float = setting(
        0.01, check=between(0, 1), help="allowed accuracy drop vs the version now in serving")
    # Expected calibration error (15 bins) of the served, temperature-scaled probabilities on
    # the test split (core/calibration.py). Off by default: a smoke run's test split is too
    # small for a stable ECE.
    max_ece: Optional[float] = setting(
        None, check=optional(between(0, 1)),
        help="set: a model whose calibrated test ECE is above it is not blessed")
    tie_tolerance: float = setting(
        0.05, check=between(0, 1),
        help="|conf_a - conf_b| <= this with disagreement: human review")
    # Every model must also reach the test split's majority-class baseline (always answering
    # its most frequent class) plus this margin, in every profile: a min_accuracy below the
    # baseline would otherwise bless a model that gives one answer to every face.
    # Negative only on purpose: it lets a model below the majority-class baseline through
    # (the cluster tests push untrained models to compare where they ran).
    baseline_margin: float = setting(0.05, check=between(-1, 1),
                                     help="margin over the majority-class baseline")
    # The labels every check above compares with: FER-2013's, or (for a run trained on FER+
    # votes, ingest.ferplus_labels) FER+'s crowd majority, the labels that run learned.
    gate_labels: str = setting(
        "fer2013", check=one_of("fer2013", "ferplus"),
        help='or "ferplus": the gate judges against FER+\'s majority (needs the votes)')


@dataclass
class InfraValidationConfig:
    """The infra-validate step: each blessed candidate served by a sandboxed model server
    (components/infra_validator.py) before the pusher may publish it."""
    mode: str = setting(
        "load_and_query", check=one_of("load_and_query", "load_only"),
        help='or "load_only": the version must only become AVAILABLE')
    server: str = setting("auto", check=one_of("auto", "embedded", "tfserving"),
                          help="fer-serve --server: auto | embedded | tfserving")
    load_timeout_s: float = setting(
        180.0, check=positive, help="server start to AVAILABLE (includes the warm-up)")
    request_timeout_s: float = setting(60.0, check=positive, help="each canary request")
    canary_examples: int = setting(     # TF Serving reads <= 1,000 warm-ups
        4, check=between(1, 1000), help="test-split faces per canary request")
    explain_examples: int = setting(
        1, check=at_least(1), help="of which `explain` gets this many (it is costly)")
    latency_requests: int = setting(
        10, check=at_least(0), help="serving_uint8 calls whose median is the p50 latency")
    max_difference: float = setting(
        1e-5, check=at_least(0), help="served vs in-process SavedModel, per float output")
    probability_sum_tolerance: float = setting(
        1e-4, check=at_least(0), help="how far from 1 an answer's probabilities may sum")
    warmup: bool = setting(True, help="write the canaries as the pushed version's warm-up")


@dataclass
class PushConfig:
    serving_root: str = setting("", help='"": <output>/serving_models')
    keep_versions: int = setting(3, check=at_least(1), help="versions kept per model")
    # Request logs: when set, models.config tells fer-serve to log a sampling_rate share of
    # each model's requests under <request_log_dir>/<model>/ (serving/request_log.py).
    request_log_dir: str = setting("", check=local_directory,
                                   help="set: fer-serve logs requests under it")
    request_log_sampling_rate: float = setting(1.0, check=between(0, 1),
                                               help="share of requests logged")


@dataclass
class InferenceConfig:
    """Bulk inference (`fer-pipeline infer`)."""
    # RunInference batches faces adaptively between these sizes (Beam's BatchElements).
    min_batch_size: int = setting(16, check=at_least(1), at_most="max_batch_size",
                                  help="smallest RunInference batch")
    max_batch_size: int = setting(256, check=at_least(1), help="largest RunInference batch")
    num_shards: int = setting(
        0, check=at_least(0), help="PredictionLog files per model; 0: the runner chooses")
    # Saliency maps for faces sent to review (the models' `explain` signature); each costs
    # a few model calls, so they are computed only for the faces that are queued.
    explain_flagged: bool = setting(True, help="saliency maps for the faces queued")
    tie_tolerance: Optional[float] = setting(
        None, check=optional(between(0, 1)),
        help="the ensemble's tie rule; unset: evaluation.tie_tolerance, the rule the gate measured")


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
    tie_tolerance: Optional[float] = setting(
        None, check=optional(between(0, 1)),
        help="the ensemble's tie rule for the review rate; unset: evaluation.tie_tolerance")
    # Image features of the served faces against the training split's (skew).
    brightness_js: float = setting(0.1, check=_share, help="mean pixel value of a face")
    contrast_js: float = setting(0.1, check=_share,
                                 help="standard deviation of a face's pixels")
    sharpness_js: float = setting(
        0.1, check=_share, help="variance of the Laplacian / the face's: low = blurred")
    # Exposure: the share of faces with more than clipped_share of their pixels near black
    # (<= dark_level) or near white (>= bright_level), compared by L-infinity.
    dark_share_linf: float = setting(0.25, check=_share, help="share of dark faces")
    bright_share_linf: float = setting(0.25, check=_share, help="share of bright faces")
    dark_level: int = setting(16, check=between(0, 255), at_most="bright_level",
                              help="pixels <= this are near black")
    bright_level: int = setting(239, check=between(0, 255),
                                help="pixels >= this are near white")
    clipped_share: float = setting(0.05, check=_share,
                                   help="share of near-black/white pixels of a clipped face")
    pixels_js: float = setting(
        0.15, check=_share, help="TFDV's histogram of every pixel value (coarse)")
    # Model answers against the same models' answers on the test split (evaluation).
    class_mix_linf: float = setting(0.08, check=_share,
                                    help="predicted-class shares, per model")
    confidence_js: float = setting(0.1, check=_share,
                                   help="the winning class's probability, per model")
    review_rate_linf: float = setting(0.1, check=_share,
                                      help="share of faces the ensemble sends to a person")
    # Fewer faces than this in the window: distances are too noisy to alert on.
    min_requests: int = setting(500, check=at_least(1), help="fewest faces to alert on")
    # Records that cannot be decoded or break the SERVING schema (not one 48x48 face in
    # 0..255, answers that do not match the faces): above this share of the window's
    # records, an alert of its own, however few faces the window has.
    max_bad_share: float = setting(0.01, check=_share,
                                   help="share of undecodable or off-schema records to alert on")
    # --review-queue: the lowest-confidence faces queued besides the ties.
    review_lowest_confidence: int = setting(20, help="lowest-confidence faces queued")
    # The page's per-window table splits the requested range into windows this long.
    window_minutes: float = setting(60.0, help="length of one window of the page's table")


@dataclass
class MetadataConfig:
    """Where ML Metadata (lineage, and the record the step cache trusts) is kept.

    Default: SQLite at <run_root>/metadata.sqlite for a local run root; for a run root on
    an object store (SQLite cannot live there) a local file named after the run root
    under ~/.cache/fer-pipeline/metadata/. Set `mysql_host` to share one store across a
    cluster; the password is read from the environment variable `mysql_password_env`,
    never from this file.
    """
    sqlite_path: str = setting("", help='"": the default SQLite file above')
    mysql_host: str = setting("", help="set: one MySQL store shared across a cluster")
    mysql_port: int = setting(3306, check=between(1, 65535), help="MySQL port")
    mysql_database: str = setting("fer_metadata", help="MySQL database")
    mysql_user: str = setting("root", help="MySQL user")
    mysql_password_env: str = setting("FER_METADATA_MYSQL_PASSWORD",
                                      help="environment variable with the MySQL password")
    pipeline_name: str = setting("fer-pipeline", help="the pipeline's name in ML Metadata")


@dataclass
class PipelineConfig:
    profile: str = setting("default", check=one_of("default", "smoke"),
                           help="default, or smoke: small, for tests and the demo")
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    imports: dict[str, ImportConfig] = setting(
        factory=lambda: {name: ImportConfig() for name in IMPORTED_MODELS},
        help="per imported model name: its Keras file and preprocessing")
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    infra_validation: InfraValidationConfig = field(default_factory=InfraValidationConfig)
    push: PushConfig = field(default_factory=PushConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)


def _smoke_overrides() -> dict[str, Any]:
    """Small enough for tests and `make demo` on 2 CPU cores (per model: the registry)."""
    return {
        "train": {"models": {name: entry.smoke for name, entry in MODEL_REGISTRY.items()},
                  "shuffle_buffer": 4000},
        "tune": {"max_trials": 3, "epochs_per_trial": 2},
        "evaluation": {"min_accuracy": {
            name: entry.smoke_min_accuracy for name, entry in MODEL_REGISTRY.items()
            if entry.smoke_min_accuracy is not None}},
    }


PROFILES = {"default": dict, "smoke": _smoke_overrides}


# ----------------------------------------------------------------------------- loading
#
# A config file is checked whole before any step runs: every key must name a field of the
# dataclasses above (or a registered model), every value must have the field's type and
# pass its field's check (setting(check=...); core/config_loading.py does the work). All
# problems are reported at once, each with its dotted key, in one ConfigError naming
# the file.

# ConfigError (core/errors.py: a UserError and a ValueError) is raised here, and imported
# from here by the code that reads configs.


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
            data = yaml.load(text, Loader=YamlLoader)
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
    config = merge(PipelineConfig(profile=profile), PROFILES[profile](), problems)
    if problems:   # our own profile is wrong: a bug, not the user's mistake
        raise RuntimeError(f"profile {profile!r}: " + "; ".join(problems))
    for source, data in ((path, read_config_file(path) if path else None),
                         ("the command line", overrides)):
        if not data:
            continue
        config = merge(config, data, problems)
        check_values(config, problems)
        check_order(config, problems)
        if problems:
            where = f"config file {source}" if source != "the command line" else source
            if len(problems) == 1:
                raise ConfigError(f"{where}: {problems[0]}")
            raise ConfigError(f"{where}: {len(problems)} problems:\n"
                              + "\n".join(f"  {p}" for p in problems))
    return _with_one_tie_rule(config)


def _with_one_tie_rule(config: PipelineConfig) -> PipelineConfig:
    """Bulk inference and the monitor apply the tie rule the evaluation measured on the test
    split, unless their own section sets another."""
    tolerance = config.evaluation.tie_tolerance
    for section in ("inference", "monitor"):
        current = getattr(config, section)
        if current.tie_tolerance is None:
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(current, tie_tolerance=tolerance)})
    return config
