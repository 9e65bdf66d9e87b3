"""CPU per request log record, on the request path and on the writer thread.

The end-to-end cost of request logs is measured by `benchmarks/serving.py
--request-log-rates 1.0,0.1` (latency and throughput beside logging off). On a shared
2-core machine those wall-clock figures move by more than the cost being measured, so this
measures the CPU the logger itself spends per record, which load barely changes:

* the request path: `RequestLogger.log_grpc` (a gRPC Predict: the protos are kept as they
  are) and `log_arrays` (a REST predict: arrays), at sampling rate 1.0, with the writer
  stopped so that only the handler's share (sample, enqueue) is counted;
* the writer: the same records built, serialized, appended to TFRecord files and flushed,
  after the writer is started on the full queue.

Records hold one 48x48 int32 face and the three outputs, as the serving benchmark sends.

    .venv/bin/python benchmarks/request_log_writer.py [--records 5000] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fer_pipeline.core import quiet  # noqa: E402

quiet.install()  # core/quiet.py's filters, before TensorFlow loads
from benchmarks.machine import cpu_description  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sample_request() -> tuple[Any, Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A gRPC PredictRequest/PredictResponse pair and the same request as arrays."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    pixels = np.random.default_rng(0).integers(0, 256, (1, 48, 48)).astype(np.int32)
    outputs = {"probabilities": np.full((1, 7), 1 / 7, np.float32),
               "class_id": np.array([3]), "class_name": np.array([b"happy"], dtype=object)}
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "cnn", "serving_default"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    response.model_spec.version.value = 1
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request, response, {"pixels": pixels}, outputs


def measure(name: str, log_one: Callable[[Any], None], records: int,
            directory: str) -> dict[str, Any]:
    from fer_pipeline.core.serving_root import RequestLogSpec
    from fer_pipeline.serving.request_log import RequestLogConfig, RequestLogger, log_files

    spec = RequestLogSpec(str(Path(directory) / name / "requests"), 1.0)
    logger = RequestLogger(lambda model: spec, RequestLogConfig(queue_records=records))
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(records):
        log_one(logger)
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    logger.start().stop()           # writes the full queue, closes the files
    cpu2, wall2 = cpu_seconds(), time.perf_counter()
    written = logger.counts()["cnn"].written
    size = sum(Path(f).stat().st_size for f in log_files(str(Path(directory) / name)))
    return {"records": written, "bytes_per_record": size / written,
            "request_path_cpu_us": (cpu1 - cpu0) * 1e6 / records,
            "request_path_wall_us": (wall1 - wall0) * 1e6 / records,
            "writer_cpu_us": (cpu2 - cpu1) * 1e6 / written,
            "writer_wall_us": (wall2 - wall1) * 1e6 / written}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    request, response, inputs, outputs = sample_request()
    kinds = {
        "gRPC Predict": lambda logger: logger.log_grpc("predict", request, response),
        "REST predict": lambda logger: logger.log_arrays("cnn", 1, "serving_default",
                                                         inputs, outputs)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="request-log-bench-") as tmp:
        measure("warm-up", kinds["gRPC Predict"], 200, tmp)   # imports, first-call costs
        for index, (name, log_one) in enumerate(kinds.items()):
            results[name] = measure(f"run-{index}", log_one, args.records, tmp)
    cpu = cpu_description()
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{cpu}, load average {load}; {args.records} records each, sampling rate 1.0\n")
    print("| record | request path CPU us | writer CPU us | bytes/record |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['request_path_cpu_us']:.1f} | "
              f"{result['writer_cpu_us']:.1f} | {result['bytes_per_record']:,.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu, "load_average": load,
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
