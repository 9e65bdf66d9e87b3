"""How long `fer-pipeline monitor` takes for 100,000 logged requests.

    .venv/bin/python benchmarks/monitor.py [--requests 100000] [--json out.json]

The traffic is what a batch-1 client makes: each face sent once to each of the two served
models, one face per request, so 100,000 requests are 50,000 faces. Faces are synthetic
(pipeline/synthetic.py; a pool of --pool distinct faces, served again in random order to
reach the count, so drawing them does not dominate the set-up), answered by the two real
SavedModels of tests/monitor_fixtures.py, and logged as TF Serving PredictionLogs in files
of 10,000 records (as a rotating server leaves them). The reference is built the same way
the tests build it (a 4,000-face train split, its TFDV statistics, test predictions).

Reported: the whole `run_monitor` wall time and its parts as monitoring.json's
`timings_s` records them: reading and decoding the logs, loading the reference, judging
(image features, TFDV statistics and comparisons, per-window numbers) and writing the
outputs (JSON, anomalies, page). CPU model, flags and the load average are printed beside
the figures: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from fer_pipeline.components.monitor import executor as monitor  # noqa: E402
from fer_pipeline.core.config import load_config  # noqa: E402
from tests import monitor_fixtures as fixtures  # noqa: E402

SCHEMA = "schemas/fer2013/schema.pbtxt"
RECORDS_PER_FILE = 10_000


def write_logs(directory: Path, faces: np.ndarray, answers: dict[str, np.ndarray],
               requests: int, seconds_per_request: float) -> list[str]:
    """`requests` batch-1 PredictionLogs (each face to every model), in rotated files."""
    directory.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).integers(0, len(faces), requests // len(answers))
    paths, writer, written = [], None, 0
    for i, face_index in enumerate(order):
        for name, probs in answers.items():
            if written % RECORDS_PER_FILE == 0:
                if writer:
                    writer.close()
                paths.append(str(directory / f"requests-{len(paths):05d}.tfrecord"))
                writer = tf.io.TFRecordWriter(paths[-1])
            entry = prediction_log_pb2.PredictionLog()
            spec = entry.log_metadata.model_spec
            spec.name, spec.signature_name = name, "serving_uint8"
            spec.version.value = fixtures.MODELS[name]
            entry.log_metadata.timestamp_secs = int(fixtures.START + i * seconds_per_request)
            entry.predict_log.request.inputs["pixels"].CopyFrom(
                tf.make_tensor_proto(faces[face_index:face_index + 1]))
            entry.predict_log.response.outputs["probabilities"].CopyFrom(
                tf.make_tensor_proto(probs[face_index:face_index + 1]))
            writer.write(entry.SerializeToString())
            written += 1
    writer.close()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--pool", type=int, default=2_000, help="distinct faces drawn")
    parser.add_argument("--hours", type=float, default=24.0,
                        help="the requests spread over this many hours (hourly windows)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fer_monitor_bench_"))
    started = time.perf_counter()
    run = fixtures.build_served_run(str(root / "run"))
    faces = fixtures.fresh_stream(args.pool, 303)
    answers = {name: fixtures.predict(path, faces) for name, path in run.models.items()}
    logs = write_logs(root / "logs", faces, answers, args.requests,
                      args.hours * 3600 / (args.requests // len(answers)))
    setup_s = time.perf_counter() - started
    log_mib = sum(os.path.getsize(p) for p in logs) / 2 ** 20

    config = load_config().monitor
    begin = time.perf_counter()
    result = monitor.run_monitor(logs, run.reference, SCHEMA, str(root / "out"), None, config)
    wall = time.perf_counter() - begin
    record = json.loads((root / "out" / "monitoring.json").read_text())
    figures = {
        "cpu": cpu_description(), "load_average_1min": os.getloadavg()[0],
        "requests": record["records"], "faces": record["faces"],
        "log_files": len(logs), "log_mib": round(log_mib, 1),
        "windows": len(record["windows"]), "verdict": result.verdict,
        "setup_s": round(setup_s, 1), "run_monitor_s": round(wall, 2),
        "parts_s": record["timings_s"],
        "requests_per_s": round(record["records"] / wall),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
