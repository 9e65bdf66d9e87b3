"""`fer-client`: asks both served models about faces and combines their answers.

Works against our embedded server and the real TF Serving alike (same protocols).

    fer-client --image photo.jpg [--image other.png ...]    # faces found with OpenCV
    fer-client --csv fer2013.csv --rows 5                   # FER-2013 rows (pixels column)
    fer-client --npy faces.npy                              # uint8 [n, 48, 48]
      [--host 127.0.0.1] [--protocol grpc|rest] [--port N] [--models cnn,vgg16]
      [--config my.yaml | --tolerance 0.05] [--timeout 10] [--retries 3] [--table]
      [--review-queue DIR] [--explain DIR]

Prints JSON (or a table with --table): per face, each model's probabilities and the
version that answered, and the ensemble decision from serving.ensemble.combine with the
English and Spanish class names. If the server cannot be reached it says why in one line
(nothing listening, the wrong protocol or port, TLS, no answer in time: serving/connection.py)
and exits 2; a bad input (a missing file, a --usage no row has) exits 3.
With --review-queue the faces that need a person are queued for `fer-review` (with each
model's saliency); --explain writes each model's saliency overlay per face as PNGs.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.config import MODEL_NAMES, EvalConfig, load_config
from pipeline.contract import (CLASS_NAMES, IMAGE_SIZE, INPUT_PIXELS,
                               NUM_PIXELS, OUTPUT_PROBABILITIES, OUTPUT_SALIENCY,
                               SIGNATURE_EXPLAIN)
from pipeline.errors import run_cli
from serving.connection import diagnose

DEFAULT_MODELS = MODEL_NAMES   # every registered model (pipeline/config.py)
# Where flagged faces are queued when --review-queue is not given (unset: nowhere).
REVIEW_QUEUE_ENV = "FER_REVIEW_QUEUE"
EXIT_UNAVAILABLE = 2
EXIT_BAD_INPUT = 3
EXIT_SERVER_ERROR = 4


class ServerUnavailable(Exception):
    """The server could not be reached even after the retries."""


class ServerError(Exception):
    """The server answered with an error (bad request, unknown model...)."""


class ModelNotServed(ServerError):
    """The server does not serve this model (gRPC NOT_FOUND, HTTP 404): for example the
    evaluation gate held it back, so it was never pushed."""


@dataclass
class ModelAnswer:
    model: str
    version: Optional[int]
    probabilities: np.ndarray        # float32 [n, 7]


@dataclass
class Explanation:
    """A model's answer with why: its `explain` signature (components/export.py)."""
    model: str
    version: Optional[int]
    probabilities: np.ndarray        # float32 [n, 7]
    saliency: np.ndarray             # float32 [n, 7, 48, 48], each map scaled to [0, 1]


@dataclass
class ClientConfig:
    host: str = "127.0.0.1"
    protocol: str = "grpc"           # "grpc" (port 8500) or "rest" (port 8501)
    grpc_port: int = 8500
    rest_port: int = 8501
    timeout: float = 10.0            # seconds per attempt
    retries: int = 3                 # extra attempts when the server is unreachable
    backoff_s: float = 0.2           # first wait; doubles each retry
    models: tuple[str, ...] = DEFAULT_MODELS
    tolerance: float = EvalConfig().tie_tolerance


def with_retries(call: Callable[[], Any], is_unavailable: Callable[[BaseException], bool],
                 retries: int, backoff_s: float, what: str,
                 diagnose: Callable[[], Optional[str]] = lambda: None,
                 is_hopeless: Callable[[BaseException], bool] = lambda error: False) -> Any:
    """Runs `call`, retrying with exponential backoff while the server is unreachable.

    When it stays unreachable, or answers in a way no retry can fix (`is_hopeless`: the
    wrong protocol, a timeout), ServerUnavailable says why in one line: `diagnose()`'s
    finding about the address (serving/connection.py), else the error's own first line.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            hopeless = is_hopeless(error)
            if not hopeless and not is_unavailable(error):
                raise
            if hopeless or attempt == retries:
                tries = "" if hopeless else f" is not reachable after {attempt + 1} attempt(s)"
                raise ServerUnavailable(f"{what}{tries}: {diagnose() or _short(error)}") \
                    from None
            time.sleep(backoff_s * 2 ** attempt)


def _short(error: BaseException) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    return (text or type(error).__name__).splitlines()[0]


class FerClient:
    """Predicts with each served model over gRPC or REST; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", grpc_port: int = 8500, rest_port: int = 8501,
                 protocol: str = "grpc", timeout: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.2) -> None:
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        self.host, self.protocol = host, protocol
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self._stub = None

    @property
    def port(self) -> int:
        return self.grpc_port if self.protocol == "grpc" else self.rest_port

    @property
    def address(self) -> str:
        return f"{self.protocol} server at {self.host}:{self.port}"

    def _call(self, call: Callable[[], Any]) -> Any:
        """`call` with retries; a connection failure becomes one ServerUnavailable line."""
        def diagnosis() -> Optional[str]:
            return diagnose(self.host, self.port, self.protocol, self.timeout)

        grpc_call = self.protocol == "grpc"
        return with_retries(call, _grpc_unavailable if grpc_call else _rest_unavailable,
                            self.retries, self.backoff_s, self.address, diagnosis,
                            self._hopeless)

    def _hopeless(self, error: BaseException) -> bool:
        """Failures no retry fixes: the wrong protocol, TLS, or no answer in time."""
        if self.protocol == "grpc":
            return _grpc_hopeless(error)
        return isinstance(error, (http.client.BadStatusLine, socket.timeout, TimeoutError)) \
            or isinstance(getattr(error, "reason", None), (socket.timeout, TimeoutError))

    def predict(self, model: str, images: np.ndarray) -> ModelAnswer:
        """Probabilities of `images` (uint8 [n, 48, 48]) from the newest version of `model`."""
        images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if self.protocol == "grpc":
            return self._call(lambda: self._predict_grpc(model, images))
        return self._call(lambda: self._predict_rest(model, images))

    # --- gRPC: uint8 tensors (2.3 KB per face) on the serving_uint8 signature ----------

    def _grpc_stub(self):
        if self._stub is None:
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc
            channel = grpc.insecure_channel(f"{self.host}:{self.grpc_port}")
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return self._stub

    def _predict_grpc(self, model: str, images: np.ndarray) -> ModelAnswer:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_uint8"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(images))
        request.output_filter.append("probabilities")
        try:
            response = self._grpc_stub().Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            if _grpc_unavailable(error) or _grpc_hopeless(error):
                raise
            kind = ModelNotServed if error.code() == grpc.StatusCode.NOT_FOUND else ServerError
            raise kind(f"{model}: {error.code().name}: {error.details()}") from None
        version = response.model_spec.version.value if response.model_spec.HasField(
            "version") else None
        return ModelAnswer(model, version, tf.make_ndarray(response.outputs["probabilities"]))

    # --- REST: JSON ints on the serving_default signature -----------------------------

    def _rest_url(self, path: str) -> str:
        return f"http://{self.host}:{self.rest_port}{path}"

    def _rest_call(self, path: str, body: Optional[dict] = None) -> tuple[dict, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._rest_url(path), data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read()), response.headers
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = error.reason
            kind = ModelNotServed if error.code == 404 else ServerError
            raise kind(f"HTTP {error.code} on {path}: {message}") from None

    def _predict_rest(self, model: str, images: np.ndarray) -> ModelAnswer:
        body = {"signature_name": "serving_default", "instances": images.astype(int).tolist()}
        payload, headers = self._rest_call(f"/v1/models/{model}:predict", body)
        probabilities = np.array([row["probabilities"] for row in payload["predictions"]],
                                 dtype=np.float32)
        version = headers.get("X-Model-Version")
        if version is None:  # the real TF Serving does not say; ask which version is up
            version = self.served_version(model)
        return ModelAnswer(model, int(version) if version is not None else None, probabilities)

    def served_version(self, model: str) -> Optional[int]:
        """The newest AVAILABLE version according to the REST status endpoint."""
        payload, _ = self._rest_call(f"/v1/models/{model}")
        available = [int(s["version"]) for s in payload.get("model_version_status", [])
                     if s.get("state") == "AVAILABLE"]
        return max(available) if available else None

    # --- explanations: the explain signature, over either protocol ---------------------

    def explain(self, model: str, images: np.ndarray) -> Explanation:
        """Probabilities and per-class saliency maps of `images` (uint8 [n, 48, 48])."""
        images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if self.protocol == "grpc":
            return self._call(lambda: self._explain_grpc(model, images))
        return self._call(lambda: self._explain_rest(model, images))

    def _explain_grpc(self, model: str, images: np.ndarray) -> Explanation:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = SIGNATURE_EXPLAIN
        request.inputs[INPUT_PIXELS].CopyFrom(tf.make_tensor_proto(images))
        request.output_filter.extend([OUTPUT_PROBABILITIES, OUTPUT_SALIENCY])
        try:
            response = self._grpc_stub().Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            if _grpc_unavailable(error) or _grpc_hopeless(error):
                raise
            raise ServerError(f"{model}: {error.code().name}: {error.details()}") from None
        version = response.model_spec.version.value if response.model_spec.HasField(
            "version") else None
        return Explanation(model, version,
                           tf.make_ndarray(response.outputs[OUTPUT_PROBABILITIES]),
                           tf.make_ndarray(response.outputs[OUTPUT_SALIENCY]))

    def _explain_rest(self, model: str, images: np.ndarray) -> Explanation:
        body = {"signature_name": SIGNATURE_EXPLAIN, "instances": images.astype(int).tolist()}
        payload, headers = self._rest_call(f"/v1/models/{model}:predict", body)
        rows = payload["predictions"]
        version = headers.get("X-Model-Version")
        if version is None:
            version = self.served_version(model)
        return Explanation(
            model, int(version) if version is not None else None,
            np.array([row[OUTPUT_PROBABILITIES] for row in rows], dtype=np.float32),
            np.array([row[OUTPUT_SALIENCY] for row in rows], dtype=np.float32))


def _grpc_unavailable(error: BaseException) -> bool:
    import grpc
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _grpc_hopeless(error: BaseException) -> bool:
    """A deadline that passed, or an address that answered in another protocol than gRPC's
    HTTP/2 (a REST port): retrying cannot help."""
    import grpc
    if not isinstance(error, grpc.RpcError):
        return False
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        error.code() == grpc.StatusCode.UNAVAILABLE and "HTTP/2" in (error.details() or ""))


def _rest_unavailable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code == 503
    return isinstance(error, (urllib.error.URLError, ConnectionError, socket.timeout,
                              TimeoutError, http.client.HTTPException))


# --- combining the models ---------------------------------------------------------------

def classify(client: FerClient, images: np.ndarray, models: Sequence[str],
             tolerance: float) -> list[dict[str, Any]]:
    """Each model's answer for every image, and the ensemble decision, as JSON-ready dicts.

    A model the server does not serve is listed under "not_served" (model -> the server's
    message) and the decision is made with the models that are; ModelNotServed is raised
    only when none of them is served.
    """
    from serving.ensemble import combine
    answers, not_served = [], {}
    for model in models:
        try:
            answers.append(client.predict(model, images))
        except ModelNotServed as error:
            not_served[model] = str(error)
    if not answers:
        raise ModelNotServed(f"none of {', '.join(models)} is served: "
                             + "; ".join(not_served.values()))
    results = []
    for row in range(len(images)):
        probabilities = {a.model: a.probabilities[row].tolist() for a in answers}
        decision = combine(probabilities, tolerance)
        results.append({
            "models": {a.model: {"version": a.version,
                                 "probabilities": dict(zip(CLASS_NAMES, probabilities[a.model])),
                                 "class_name": CLASS_NAMES[int(np.argmax(a.probabilities[row]))]}
                       for a in answers},
            "decision": asdict(decision),
            "not_served": not_served,
        })
    return results


# --- inputs -------------------------------------------------------------------------------

@dataclass
class InputImage:
    source: str                     # where it came from, for the report
    pixels: Optional[np.ndarray]    # uint8 [48, 48]; None when no face was found
    note: str = ""
    true_label: Optional[int] = None  # the CSV's emotion, when the input has one


def images_from_csv(path: str, rows: int, usage: Optional[str] = None) -> list[InputImage]:
    """The first `rows` rows of a FER-2013 CSV (its `pixels` column), optionally only those
    whose Usage is `usage` (e.g. PrivateTest, the held-out test split)."""
    found = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "pixels" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'pixels' column (is it a FER-2013 CSV?)")
        for line_number, record in enumerate(reader, start=2):
            if len(found) >= rows:
                break
            if usage and record.get("Usage") != usage:
                continue
            values = np.array(record["pixels"].split(), dtype=np.int64)
            if values.size != NUM_PIXELS or values.min() < 0 or values.max() > 255:
                raise ValueError(f"{path}:{line_number}: expected {NUM_PIXELS} values 0-255")
            label = record.get("emotion", "")
            found.append(InputImage(f"{path}:{line_number}",
                                    values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE),
                                    true_label=int(label) if label.isdigit() else None))
    return found


def usage_values(path: str) -> list[str]:
    """The distinct Usage values of a FER-2013 CSV, sorted."""
    with open(path, newline="") as handle:
        return sorted({record.get("Usage") or "" for record in csv.DictReader(handle)})


def images_from_files(paths: Sequence[str]) -> list[InputImage]:
    """Every face found in each image file; a file without a face is reported as such."""
    from serving.faces import faces_in_file
    found = []
    for path in paths:
        if not os.path.isfile(path):   # before OpenCV, which would print its own warning
            raise FileNotFoundError(f"--image {path}: no such file")
        faces = faces_in_file(path)
        if not faces:
            found.append(InputImage(path, None, "no face found"))
        for index, face in enumerate(faces):
            found.append(InputImage(f"{path}#face{index}@{list(face.box)}", face.pixels))
    return found


def images_from_npy(path: str) -> list[InputImage]:
    array = np.load(path)
    if array.ndim == 2:
        array = array[None]
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) and array.shape[1:] != (NUM_PIXELS,):
        raise ValueError(f"{path}: expected [n, 48, 48] or [n, 2304], got {list(array.shape)}")
    array = array.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return [InputImage(f"{path}[{i}]", np.clip(a, 0, 255).astype(np.uint8))
            for i, a in enumerate(array)]


# --- output -------------------------------------------------------------------------------

def report(inputs: list[InputImage], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per input, in order; inputs without a face carry only their note."""
    answers = iter(results)
    entries = []
    for item in inputs:
        entry: dict[str, Any] = {"source": item.source}
        if item.true_label is not None:
            entry["true_class"] = CLASS_NAMES[item.true_label]
        if item.pixels is None:
            entry["note"] = item.note
        else:
            entry.update(next(answers))
        entries.append(entry)
    return entries


def format_table(entries: list[dict[str, Any]], models: Sequence[str]) -> str:
    header = (["source", "truth"] + [f"{m} (v)" for m in models]
              + ["decision", "es", "conf", "review"])
    lines = [header]
    for entry in entries:
        truth = entry.get("true_class", "")
        if "decision" not in entry:
            lines.append([entry["source"], truth] + ["-"] * len(models)
                         + [entry["note"], "", "", ""])
            continue
        cells = [entry["source"], truth]
        for model in models:
            if model not in entry["models"]:
                cells.append("not served")
                continue
            answer = entry["models"][model]
            cells.append(f"{answer['class_name']} {max(answer['probabilities'].values()):.2f} "
                         f"(v{answer['version']})")
        decision = entry["decision"]
        cells += [decision["class_name"], decision["class_name_es"],
                  f"{decision['confidence']:.2f}", "yes" if decision["needs_human_review"] else "no"]
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fer-client", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", action="append", help="image file (PNG, JPEG, ...)")
    source.add_argument("--csv", help="FER-2013 CSV file")
    source.add_argument("--npy", help=".npy array of uint8 [n, 48, 48] faces")
    parser.add_argument("--rows", type=int, default=5, help="CSV rows to send")
    parser.add_argument("--usage", help="only CSV rows with this Usage, e.g. PrivateTest")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc")
    parser.add_argument("--port", type=int, help="default 8500 for gRPC, 8501 for REST")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model names to query and combine")
    parser.add_argument("--config", help="the pipeline's YAML/JSON config: --tolerance defaults "
                        "to its evaluation.tie_tolerance (the value the gate evaluated with)")
    parser.add_argument("--tolerance", type=float,
                        help="confidence gap under which disagreeing models need human review "
                             f"(default: the config's evaluation.tie_tolerance, else "
                             f"{EvalConfig().tie_tolerance})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=0.2, help="first retry wait, seconds")
    parser.add_argument("--table", action="store_true", help="readable table instead of JSON")
    parser.add_argument("--review-queue", metavar="DIR",
                        default=os.environ.get(REVIEW_QUEUE_ENV) or None,
                        help="record the faces that need human review in the review queue "
                             f"in DIR (default: ${REVIEW_QUEUE_ENV}; see fer-review)")
    parser.add_argument("--explain", metavar="DIR",
                        help="write each model's saliency overlay per face as PNGs into DIR")
    return parser.parse_args(argv)


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--rows", args.rows, 1), ("--retries", args.retries, 0)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--backoff", args.backoff)):
        if not value > 0:
            raise ValueError(f"{flag} must be a positive number of seconds, got {value:g}")


def _load_inputs(args: argparse.Namespace) -> list[InputImage]:
    if args.csv:
        found = images_from_csv(args.csv, args.rows, args.usage)
        if found:
            return found
        if not args.usage:
            raise ValueError(f"{args.csv}: no data rows")
        raise ValueError(f"{args.csv}: no row has Usage {args.usage!r}; its Usage values are "
                         f"{', '.join(map(repr, usage_values(args.csv)))}")
    if args.npy:
        return images_from_npy(args.npy)
    return images_from_files(args.image)


def tolerance(args: argparse.Namespace) -> float:
    """--tolerance, else the config's evaluation.tie_tolerance, else the default's."""
    if args.tolerance is not None:
        if not 0 <= args.tolerance <= 1:
            raise ValueError(f"--tolerance must be between 0 and 1, got {args.tolerance:g}")
        return args.tolerance
    return load_config(args.config).evaluation.tie_tolerance


def main(argv: Optional[list[str]] = None) -> int:
    """`fer-client`: a mistake in one line, a bug in one line with where its traceback is."""
    return run_cli("fer-client", _main, argv)


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    try:
        _check_numbers(args)
        args.tolerance = tolerance(args)
        inputs = _load_inputs(args)
    except (OSError, ValueError) as error:
        print(f"fer-client: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    port = args.port
    client = FerClient(args.host,
                       grpc_port=port if port and args.protocol == "grpc" else 8500,
                       rest_port=port if port and args.protocol == "rest" else 8501,
                       protocol=args.protocol, timeout=args.timeout, retries=args.retries,
                       backoff_s=args.backoff)
    faces = [item.pixels for item in inputs if item.pixels is not None]
    try:
        results = classify(client, np.stack(faces), models, args.tolerance) if faces else []
    except ServerUnavailable as error:
        print(f"fer-client: server unavailable: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ServerError as error:
        print(f"fer-client: server error: {error}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    entries = report(inputs, results)
    print(format_table(entries, models) if args.table else json.dumps(entries, indent=2))
    not_served = results[0]["not_served"] if results else {}
    if not_served:
        print(f"fer-client: not served: {', '.join(not_served)}; decided with "
              f"{', '.join(m for m in models if m not in not_served)}", file=sys.stderr)
        models = tuple(m for m in models if m not in not_served)
    try:
        _explain_and_queue(args, client, inputs, results, models)
    except ServerUnavailable as error:
        print(f"fer-client: server unavailable: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (OSError, sqlite3.Error) as error:
        print(f"fer-client: cannot write {args.explain or args.review_queue}: {error}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _explain_and_queue(args: argparse.Namespace, client: FerClient, inputs: list[InputImage],
                       results: list[dict[str, Any]], models: Sequence[str]) -> None:
    """--explain: overlay PNGs for every face; --review-queue: queue the flagged faces.
    Both report on stderr, so stdout stays the JSON or table above."""
    faced = [(index, item) for index, item in enumerate(inputs) if item.pixels is not None]
    if args.explain:
        from serving.review_intake import explain_face
        from serving.saliency import write_overlays
        notes: list[str] = []
        written = []
        for index, item in faced:
            explained = explain_face(client, models, item.pixels, notes)
            written += write_overlays(args.explain, index, item.pixels, {
                model: (e.probabilities[0], e.saliency[0])
                for model, e in explained.items() if e is not None})
        for note in notes:
            print(f"fer-client: {note}", file=sys.stderr)
        print(f"fer-client: {len(written)} saliency overlay(s) written to {args.explain}",
              file=sys.stderr)
    if args.review_queue:
        from serving.review_intake import queue_flagged
        from serving.review_queue import ReviewQueue
        with ReviewQueue(args.review_queue) as queue:
            summary = queue_flagged(client, queue, [item.pixels for _, item in faced],
                                    [item.source for _, item in faced], results, models)
        for note in summary.notes:
            print(f"fer-client: {note}", file=sys.stderr)
        print(f"fer-client: {summary.flagged} face(s) need human review: {summary.queued} "
              f"queued in {args.review_queue}, {summary.already_queued} already there",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
