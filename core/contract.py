"""The artifact contract: every name two steps (or a step and the server) must agree on.

Class names, feature keys, signature names, step output names and the files inside them.
`components/` and `serving/` import these from here; this module imports nothing of the
orchestrator (no runner, no config loading), so the server and the client can use it on
their own.
"""
from __future__ import annotations

# The seven FER-2013 classes, in label order. Spanish names are the seed notebook's.
CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
CLASS_NAMES_ES: tuple[str, ...] = (
    "Enfado", "Asco", "Miedo", "Felicidad", "Tristeza", "Sorpresa", "Neutral")
NUM_CLASSES = len(CLASS_NAMES)
# FER+ (Microsoft's crowd relabelling of the same faces, ten votes each) adds an eighth class;
# a run with `ingest.ferplus_classes: 8` trains, serves and reviews these eight, in this order.
CLASS_NAMES_FERPLUS: tuple[str, ...] = CLASS_NAMES + ("contempt",)
CLASS_NAMES_FERPLUS_ES: tuple[str, ...] = CLASS_NAMES_ES + ("Desprecio",)
IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE



def class_names_for(num_classes: int) -> tuple[str, ...]:
    """The class names of a model with `num_classes` outputs: the width of the probabilities
    is the one fact every consumer (server, client, review app, pages) can read off a served
    model, so it alone decides between FER-2013's seven classes and FER+'s eight."""
    if num_classes == len(CLASS_NAMES):
        return CLASS_NAMES
    if num_classes == len(CLASS_NAMES_FERPLUS):
        return CLASS_NAMES_FERPLUS
    raise ValueError(f"a FER model has {len(CLASS_NAMES)} or {len(CLASS_NAMES_FERPLUS)} "
                     f"classes, not {num_classes}")


# FER-2013's Usage values and the split each maps to.
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Feature names of the raw tf.Examples written by ExampleGen.
FEATURE_LABEL = "emotion"          # int64, 0..6
FEATURE_PIXELS = "pixels"          # bytes, 2304 raw uint8 values, row-major 48x48
FEATURE_USAGE = "usage"            # bytes, the CSV's Usage value ("" when the CSV has none)
FEATURE_ROW = "row_number"         # int64, 1-based line number in the CSV (header is line 1)
FEATURE_SOURCE_ROW = "source_row"  # int64, row_number of the original an example derives from
FEATURE_AUGMENTATION = "augmentation"  # bytes, "original" or the augmentation applied
# FER+ votes joined to FER-2013 rows by ExampleGen (`--ferplus-labels fer2013new.csv`). The
# vote file's own columns, in its order; the votes are stored in OUR order: the eight classes
# of CLASS_NAMES_FERPLUS, then FER+'s `unknown` and `NF` (not a face).
FERPLUS_COLUMNS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger",
                                    "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_VOTE_ORDER: tuple[str, ...] = CLASS_NAMES_FERPLUS + ("unknown", "not_face")
# The vote file's column of each of our vote slots (FER+ spells four of them differently).
FERPLUS_FILE_COLUMN: dict[str, str] = dict(zip(FERPLUS_VOTE_ORDER, (
    "anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral", "contempt",
    "unknown", "NF")))
FEATURE_FERPLUS_VOTES = "ferplus_votes"        # int64 [10], FERPLUS_VOTE_ORDER
FEATURE_FERPLUS_MAJORITY = "ferplus_majority"  # int64, index into CLASS_NAMES_FERPLUS
FEATURE_FERPLUS_CLEAR = "ferplus_clear"        # int64, 1 when the majority holds > half the votes
# What training uses of the votes, written by ExampleGen into its output ({mode, classes,
# ...}) and by Transform into its own: the trainer reads the class count and mode there.
FERPLUS_FILE = "ferplus.json"
# Transformed feature with FER+ votes: float32 [classes], the vote distribution over the
# classes kept (soft target); the transformed `emotion` is then FER+'s majority.
FEATURE_FERPLUS_TARGET = "ferplus_target"
# Feature names of the transformed examples written by Transform.
FEATURE_IMAGE = "image"            # float32, 2304 normalized values

# Every step writes its TFRecords as <split dir>/examples-SSSSS-of-NNNNN.tfrecord.
SHARD_PREFIX = "examples"
SHARD_SUFFIX = ".tfrecord"
EXAMPLES_PATTERN = f"{SHARD_PREFIX}-*{SHARD_SUFFIX}"

# Files every committed step output holds.
MANIFEST_FILE = "manifest.json"

# ExampleGen's output.
REJECTED_DIR = "rejected"
REJECTED_FILE = "rejected_rows.csv"
DUPLICATES_FILE = "duplicates.json"
# Statistics and validation outputs.
STATISTICS_FILE = "stats.tfrecord"
STATISTICS_HTML = "statistics.html"
DRIFT_FILE = "drift.json"
VALIDATION_REPORT = "report.txt"
# Inside the Transform step's output: the TFT output and the transformed splits.
TRANSFORM_GRAPH_DIR = "transform_graph"
TRANSFORMED_DIR = "transformed"
# Inside a trained model's output.
SERVING_MODEL_DIR = "serving_model"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
HISTORY_FILE = "history.json"
TRAINING_INFO_FILE = "training_info.json"
# Inside a tune step's output (components/tuner/): the values train uses, and KerasTuner's
# own trial records (oracle.json, trial_*/trial.json) under trials/.
BEST_HYPERPARAMETERS_FILE = "best_hyperparameters.json"
TRIALS_DIR = "trials"
# Evaluation and push outputs.
EVALUATION_FILE = "evaluation.json"
BLESSINGS_FILE = "blessings.json"
REPORT_HTML = "report.html"
PUSH_FILE = "push.json"
# The model's probabilities on the test split (npz, one [n, classes] array per model: 7
# columns for FER-2013, 8 for FER+), what `fer-pipeline monitor` compares the served
# answers with.
TEST_PREDICTIONS_FILE = "test_predictions.npz"
# `fer-pipeline monitor`'s outputs.
MONITORING_FILE = "monitoring.json"
MONITORING_HTML = "monitoring.html"
# The infra-validate step's output: per-model verdicts, and per model its server's own log
# and the validated copy of the candidate (with warm-up requests) that push publishes.
INFRA_BLESSINGS_FILE = "infra_blessings.json"
SERVER_LOG_FILE = "server.log"
# The serving root, as TF Serving reads it.
MODELS_CONFIG = "models.config"
DOCKER_MODELS_CONFIG = "models.docker.config"

# SavedModel signatures and tensor names (what the server and the client speak).
SIGNATURE_DEFAULT = "serving_default"
SIGNATURE_UINT8 = "serving_uint8"
SIGNATURE_EXAMPLES = "serving_examples"
SIGNATURE_EXPLAIN = "explain"      # uint8 pixels -> the outputs below + OUTPUT_SALIENCY
INPUT_PIXELS = FEATURE_PIXELS
INPUT_EXAMPLES = "examples"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_ID = "class_id"
OUTPUT_CLASS_NAME = "class_name"
OUTPUT_LOGITS = "logits"           # float32 [batch, classes], before temperature scaling
OUTPUT_SALIENCY = "saliency"       # float32 [batch, classes, 48, 48], each map scaled to [0, 1]

# The human review queue (serving/review_queue.py): one SQLite file in a queue directory.
REVIEW_QUEUE_FILE = "review_queue.sqlite3"

# Bulk inference's execution directory (components/bulk_inferrer/, `fer-pipeline infer`;
# COMMIT.json beside it names it). The records are Beam shards: predictions.csv is written
# as predictions/predictions-SSSSS-of-NNNNN.csv, rejected.csv as rejected/rejected-...csv.
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_LOGS_DIR = "prediction_logs"       # <model>/prediction_logs-SSSSS-of-NNNNN.tfrecord
INFERENCE_REJECTED_FILE = "rejected.csv"     # the columns of ingest's rejected_rows.csv
INFERENCE_RESULT_FILE = "inference.json"     # the driver's summary, written after the job
# Where a face came from: a feature of ExampleGen's raw examples ("path:line" of a CSV
# row, or an image file's path), and the extra feature of the tf.Examples bulk inference
# sends to `serving_examples` (the models read only `pixels`), so each PredictionLog names it.
FEATURE_SOURCE = "source"          # bytes, "path:line" (CSV), "path" (image), "path#face<i>" (photo)

# The served signatures, declared as data: signature -> (what it is for, inputs, outputs),
# each tensor (name, dtype, shape). The trainer's export builds these,
# tests/test_export.py checks a real export against this table, and the documentation's
# signature reference is generated from it. CLASSES_DIM stands for the model's class count,
# which the export reads off the model's width (class_names_for): 7 for FER-2013, 8 for FER+.
PIXELS_SHAPE = f"[batch, {IMAGE_SIZE}, {IMAGE_SIZE}] or [batch, {NUM_PIXELS}]"
CLASSES_DIM = "classes"
_ANSWERS = ((OUTPUT_PROBABILITIES, "float32", f"[batch, {CLASSES_DIM}]"),
            (OUTPUT_CLASS_ID, "int64", "[batch]"),
            (OUTPUT_CLASS_NAME, "string", "[batch]"),
            # The calibrated probabilities above are softmax(logits / T) (core/calibration.py).
            (OUTPUT_LOGITS, "float32", f"[batch, {CLASSES_DIM}]"))
SERVED_SIGNATURES: dict[str, tuple[str, tuple, tuple]] = {
    SIGNATURE_DEFAULT: ("raw pixels 0-255; the transform graph runs inside. `classes` is the "
                        "model's class count: 7 (FER-2013), or 8 for a FER+ model (contempt "
                        "added)",
                        ((INPUT_PIXELS, "int32", PIXELS_SHAPE),), _ANSWERS),
    SIGNATURE_UINT8: ("the same with uint8 pixels: a quarter of the gRPC payload",
                      ((INPUT_PIXELS, "uint8", PIXELS_SHAPE),), _ANSWERS),
    SIGNATURE_EXAMPLES: ("serialized raw tf.Examples, the TFX convention (only `pixels` "
                         "is read)", ((INPUT_EXAMPLES, "string", "[batch]"),), _ANSWERS),
    SIGNATURE_EXPLAIN: ("the answers plus one integrated-gradients saliency map per class, "
                        "each scaled to [0, 1]",
                        ((INPUT_PIXELS, "uint8", PIXELS_SHAPE),),
                        _ANSWERS + ((OUTPUT_SALIENCY, "float32",
                                     f"[batch, {CLASSES_DIM}, {IMAGE_SIZE}, {IMAGE_SIZE}]"),)),
}
