"""First request after a version swap, with and without warm-up requests.

For each pushed model of a serving root (DIR/models.config), this copies its newest
version into a scratch serving root as version 1, starts fer-serve on it, then pushes
(atomic rename, as the pusher does) new versions of the same SavedModel, alternately
without and with `assets.extra/tf_serving_warmup_requests` (the infra validator's canary
requests: one per signature, 4 faces, `explain` 1 face). After each swap it waits until the
new version is the one answering, then times the first call of each signature
(serving_default, serving_uint8, serving_examples with 1 face, explain with 1 face) and a
second serving_default call (the steady state). It also records how long each version took
from its rename to AVAILABLE (warm-up moves the tracing cost there, before any client).

    .venv/bin/python benchmarks/warmup.py [--serving-root demo_run/serving_models]
        [--models cnn,vgg16] [--swaps 3] [--out bench_runs/warmup/warmup.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.serving import ServerProcess, machine_facts, resolve_models  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-root", default="demo_run/serving_models")
    parser.add_argument("--models", default="", help="comma-separated (default: all)")
    parser.add_argument("--swaps", type=int, default=3, help="swaps per kind (with/without)")
    parser.add_argument("--out", default="bench_runs/warmup/warmup.json")
    return parser.parse_args(argv)


def faces(count: int) -> list[bytes]:
    from tests.serving_fixtures import example_bytes, random_images
    return [example_bytes(image) for image in random_images(count, seed=5)]


def push(base: str, version: int, template: str, warmup: list) -> float:
    """Copies `template` to base/<version> via a hidden directory and one rename; returns
    the rename's time (perf_counter)."""
    from fer_pipeline.serving.warmup import write_warmup_requests
    staging = os.path.join(base, f".tmp-{version}")
    shutil.copytree(template, staging)
    if warmup:
        write_warmup_requests(staging, warmup)
    renamed = time.perf_counter()
    os.rename(staging, os.path.join(base, str(version)))
    return renamed


def wait_served(stub, model: str, version: int, renamed: float, timeout_s: float = 600) -> float:
    """Seconds from the rename until `version` is AVAILABLE (GetModelStatus)."""
    from tensorflow_serving.apis import get_model_status_pb2
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    request.model_spec.version.value = version
    while time.perf_counter() - renamed < timeout_s:
        try:
            states = stub.GetModelStatus(request, timeout=5).model_version_status
            if any(s.state == 30 for s in states):   # AVAILABLE
                return time.perf_counter() - renamed
        except Exception:   # not loaded yet: NOT_FOUND
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{model} version {version} not AVAILABLE within {timeout_s} s")


def first_calls(stub, model: str, version: int, examples: list[bytes]) -> dict[str, float]:
    """Milliseconds of the first call of each signature on `version`, then a second call."""
    from fer_pipeline.serving.warmup import CONTRACT_SIGNATURES, canary_requests
    timings = {}
    requests = canary_requests(model, examples[:1], CONTRACT_SIGNATURES, explain_examples=1)
    for request in requests + requests[:1]:
        request.model_spec.version.value = version
        started = time.perf_counter()
        stub.Predict(request, timeout=600)
        key = request.model_spec.signature_name
        timings[key if key not in timings else f"{key} (second call)"] = \
            (time.perf_counter() - started) * 1000
    return timings


def bench_model(model: dict[str, Any], args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
    from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
    from fer_pipeline.serving.warmup import CONTRACT_SIGNATURES, canary_requests

    name = model["name"]
    root = os.path.join(scratch, name)
    base = os.path.join(root, name)
    os.makedirs(base)
    template = os.path.join(root, "template")
    shutil.copytree(model["path"], template, ignore=shutil.ignore_patterns("assets.extra"))
    shutil.copytree(template, os.path.join(base, "1"))
    config = write_model_server_config(os.path.join(root, "models.config"),
                                       [ModelSpec(name=name, base_path=base)])
    examples = faces(4)
    warmup = canary_requests(name, examples, CONTRACT_SIGNATURES, explain_examples=1)
    server = ServerProcess(config, os.path.join(root, "server.log"), ["--poll-seconds", "0.2"])
    runs: dict[str, list[dict[str, float]]] = {"without warm-up": [], "with warm-up": []}
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        status = model_service_pb2_grpc.ModelServiceStub(channel)
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        version = 1
        for _ in range(args.swaps):
            for kind in runs:
                version += 1
                renamed = push(base, version, template, warmup if kind == "with warm-up" else [])
                available_s = wait_served(status, name, version, renamed)
                timings = first_calls(predict, name, version, examples)
                runs[kind].append({"rename_to_available_s": available_s, **timings})
                print(f"{name} v{version} {kind}: AVAILABLE after {available_s:.2f} s; "
                      + ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items()), flush=True)
        channel.close()
    finally:
        server.stop()
    return {"model": name, "saved_model_mb": model["saved_model_mb"], "swaps": args.swaps,
            "runs": runs,
            "median": {kind: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                       for kind, rows in runs.items()}}


def markdown(report: dict[str, Any]) -> str:
    lines = []
    for result in report["models"]:
        med = result["median"]
        keys = list(med["without warm-up"])
        lines.append(f"| {result['model']} | " + " | ".join(keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for kind in ("without warm-up", "with warm-up"):
            cells = [f"{med[kind][k]:.2f} s" if k.endswith("_s") else f"{med[kind][k]:.0f} ms"
                     for k in keys]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    models = resolve_models(args.serving_root, [m for m in args.models.split(",") if m])
    report = {"machine": machine_facts(), "models": []}
    with tempfile.TemporaryDirectory(prefix="fer-warmup-bench-") as scratch:
        for model in models:
            report["models"].append(bench_model(model, args, scratch))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
