"""`fer-client`: asks both served models about faces and combines their answers.

Works against our embedded server and the real TF Serving alike (same protocols).

    fer-client --image photo.jpg [--image other.png ...]    # faces found with OpenCV
    fer-client --csv fer2013.csv --rows 5                   # FER-2013 rows (pixels column)
    fer-client --npy faces.npy                              # uint8 [n, 48, 48]
      [--host 127.0.0.1] [--protocol grpc|rest] [--port N] [--models cnn,vgg16]
      [--config my.yaml | --tolerance 0.05] [--timeout 10] [--retries 3] [--table]
      [--review-queue DIR] [--explain DIR] [--tls-ca ca.pem [--tls-cert c.pem --tls-key c.key]]

Prints JSON (or a table with --table): per face, each model's probabilities and the
version that answered, and the ensemble decision from fer_pipeline.core.ensemble.combine with the
English and Spanish class names. If the server cannot be reached it says why in one line
(nothing listening, the wrong protocol or port, TLS, no answer in time: serving/connection.py)
and exits 2; a bad input (a missing file, a --usage no row has) exits 3; a server error, or
models answering different class sets (FER-2013's 7 and FER+'s 8), exits 4.
With --review-queue the faces that need a person are queued for `fer-review` (with each
model's saliency); --explain writes each model's saliency overlay per face as PNGs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, Optional, Sequence

import numpy as np

from fer_pipeline.core import quiet
from fer_pipeline.core.config import EvalConfig, load_config
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE, NUM_PIXELS
from fer_pipeline.core.ensemble import ClassSetMismatch
from fer_pipeline.core.errors import (exit_process, is_user_error, run_cli, ConfigError, InputDataError,
                                      MissingInputError)
from fer_pipeline.serving.client import (DEFAULT_MODELS, FerClient, ServerError, ServerUnavailable,
                            classify)
from fer_pipeline.serving.review_intake import explain_face, queue_flagged
from fer_pipeline.serving.review_queue import ReviewQueue
from fer_pipeline.serving.tls import ClientTLS

# Where flagged faces are queued when --review-queue is not given (unset: nowhere).
REVIEW_QUEUE_ENV = "FER_REVIEW_QUEUE"
EXIT_UNAVAILABLE = 2
EXIT_BAD_INPUT = 3
EXIT_SERVER_ERROR = 4


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
            raise InputDataError(f"{path}: no 'pixels' column (is it a FER-2013 CSV?)")
        for line_number, record in enumerate(reader, start=2):
            if len(found) >= rows:
                break
            if usage and record.get("Usage") != usage:
                continue
            values = np.array(record["pixels"].split(), dtype=np.int64)
            if values.size != NUM_PIXELS or values.min() < 0 or values.max() > 255:
                raise InputDataError(f"{path}:{line_number}: expected {NUM_PIXELS} values 0-255")
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
    from fer_pipeline.serving.faces import faces_in_file
    found = []
    for path in paths:
        if not os.path.isfile(path):   # before OpenCV, which would print its own warning
            raise MissingInputError(f"--image {path}: no such file")
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
        raise InputDataError(f"{path}: expected [n, 48, 48] or [n, 2304], got {list(array.shape)}")
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
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="speak TLS, trusting the server certificate this CA signed "
                             "(fer-serve --ssl-config-file)")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="with --tls-key: this client's certificate, for a server that "
                             "verifies clients (client_verify)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
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
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--backoff", args.backoff)):
        if not value > 0:
            raise ConfigError(f"{flag} must be a positive number of seconds, got {value:g}")


def _load_inputs(args: argparse.Namespace) -> list[InputImage]:
    if args.csv:
        found = images_from_csv(args.csv, args.rows, args.usage)
        if found:
            return found
        if not args.usage:
            raise InputDataError(f"{args.csv}: no data rows")
        raise ConfigError(f"{args.csv}: no row has Usage {args.usage!r}; its Usage values are "
                          f"{', '.join(map(repr, usage_values(args.csv)))}")
    if args.npy:
        return images_from_npy(args.npy)
    return images_from_files(args.image)


def tolerance(args: argparse.Namespace) -> float:
    """--tolerance, else the config's evaluation.tie_tolerance, else the default's."""
    if args.tolerance is not None:
        if not 0 <= args.tolerance <= 1:
            raise ConfigError(f"--tolerance must be between 0 and 1, got {args.tolerance:g}")
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
        tls = (ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
               if args.tls_ca or args.tls_cert or args.tls_key else None)
        if tls is not None:
            tls.ssl_context()   # an unusable key or certificate: one line now
    except (OSError, ValueError) as error:
        if not is_user_error(error):
            raise
        print(f"fer-client: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    port = args.port
    client = FerClient(args.host,
                       grpc_port=port if port and args.protocol == "grpc" else 8500,
                       rest_port=port if port and args.protocol == "rest" else 8501,
                       protocol=args.protocol, timeout=args.timeout, retries=args.retries,
                       backoff_s=args.backoff, tls=tls)
    faces = [item.pixels for item in inputs if item.pixels is not None]
    try:
        results = classify(client, np.stack(faces), models, args.tolerance) if faces else []
    except ServerUnavailable as error:
        print(f"fer-client: server unavailable: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ServerError as error:
        print(f"fer-client: server error: {error}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except ClassSetMismatch as error:    # the server's models cannot be combined
        print(f"fer-client: {error}", file=sys.stderr)
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
        from fer_pipeline.serving.saliency import write_overlays  # OpenCV: only when --explain asks
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
        with ReviewQueue(args.review_queue) as queue:
            summary = queue_flagged(client, queue, [item.pixels for _, item in faced],
                                    [item.source for _, item in faced], results, models)
        for note in summary.notes:
            print(f"fer-client: {note}", file=sys.stderr)
        print(f"fer-client: {summary.flagged} face(s) need human review: {summary.queued} "
              f"queued in {args.review_queue}, {summary.already_queued} already there",
              file=sys.stderr)


def entry_point() -> NoReturn:
    """The `fer-client` console script (fer_pipeline.core.errors.exit_process says why it ends so)."""
    quiet.install()  # before TensorFlow loads (none is imported above)
    exit_process(main())


if __name__ == "__main__":
    entry_point()
