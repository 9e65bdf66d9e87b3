"""What the logging proxy adds: batch-1 p50 direct to fer-serve vs through `fer-serve --upstream`.

One run starts an upstream fer-serve (a tiny contract model, or --serving-root's models)
and a logging proxy in front of it that logs every request (sampling rate 1.0), each in
its own process on free 127.0.0.1 ports. Then, --rounds times, one client sends
--requests batch-1 requests (serving_default, int32 [1, 48, 48]) over one persistent gRPC
channel and one keep-alive REST connection, direct and through the proxy in turn; each
round gives a p50 per path, and the overhead is the median over rounds of (proxy p50 -
direct p50), against the goal of less than 1 ms.

    .venv/bin/python benchmarks/proxy.py [--serving-root DIR --model cnn] [--rounds 5]
        [--requests 400] [--out bench_runs/proxy.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_description  # noqa: E402

P50_TARGET_MS = 1.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-root", help="a pushed serving root (default: a tiny "
                                               "contract model made here)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="per path and round")
    parser.add_argument("--out", help="JSON results file")
    return parser.parse_args(argv)


def _start(args: list[str], log) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "fer_pipeline.serving.server", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    line = process.stdout.readline()   # printed once it serves
    if "fer-serve:" not in line:
        process.kill()
        log.seek(0)
        raise SystemExit(f"fer-serve did not start: {line}\n{log.read()[-3000:]}")
    return process


def _p50_ms(call: Callable[[], None], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from fer_pipeline.core.net import free_ports
    from fer_pipeline.core.serving_root import (RequestLogSpec, read_model_server_config,
                                                write_model_server_config)

    work = tempfile.mkdtemp(prefix="proxy-bench-")
    if args.serving_root:
        config = os.path.join(args.serving_root, "models.config")
    else:
        from fer_pipeline.core.serving_root import ModelSpec
        from tests.serving_fixtures import push_version, save_tiny_model
        base = os.path.join(work, args.model)
        push_version(base, 1, save_tiny_model(os.path.join(work, "template")))
        config = write_model_server_config(os.path.join(work, "models.config"),
                                           [ModelSpec(args.model, base)])
    specs = read_model_server_config(config)
    upstream_config = write_model_server_config(
        os.path.join(work, "upstream.config"), [replace(s, request_log=None) for s in specs])
    proxy_config = write_model_server_config(os.path.join(work, "proxy.config"), [
        replace(s, request_log=RequestLogSpec(os.path.join(work, "logs", s.name, "requests"),
                                              1.0)) for s in specs])
    up_grpc, up_rest, px_grpc, px_rest = free_ports(4)
    log = open(os.path.join(work, "servers.log"), "w+")
    upstream = _start(["--model-config", upstream_config, "--server", "embedded",
                       "--port", str(up_grpc), "--rest-port", str(up_rest)], log)
    proxy = _start(["--model-config", proxy_config, "--port", str(px_grpc),
                    "--rest-port", str(px_rest), "--upstream-grpc", f"127.0.0.1:{up_grpc}",
                    "--upstream-rest", f"127.0.0.1:{up_rest}"], log)
    image = np.random.default_rng(0).integers(0, 256, (1, 48, 48)).astype(np.int32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = args.model
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(image))
    body = json.dumps({"instances": image.tolist()}).encode()
    paths: dict[str, Callable[[], None]] = {}
    channels, connections = [], []
    for side, grpc_port, rest_port in (("direct", up_grpc, up_rest),
                                       ("proxy", px_grpc, px_rest)):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                      request_serializer=lambda m: m.SerializeToString())
        connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=30)
        channels.append(channel)
        connections.append(connection)

        def rest(connection=connection) -> None:
            connection.request("POST", f"/v1/models/{args.model}:predict", body=body)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
        paths[f"grpc {side}"] = lambda predict=predict: predict(request, timeout=30)
        paths[f"rest {side}"] = rest
    try:
        for call in paths.values():   # warm-up: connections, traced signatures
            for _ in range(50):
                call()
        rounds = []
        for _ in range(args.rounds):
            rounds.append({name: _p50_ms(call, args.requests) for name, call in paths.items()})
    finally:
        for channel in channels:
            channel.close()
        for process in (proxy, upstream):
            process.terminate()
            process.wait(timeout=60)
    result = {"cpu": cpu_description(), "rounds": rounds, "requests_per_round": args.requests}
    print(f"CPU: {result['cpu']}; {args.rounds} rounds of {args.requests} batch-1 requests "
          "per path; the proxy logs every request")
    for protocol in ("grpc", "rest"):
        direct = statistics.median(r[f"{protocol} direct"] for r in rounds)
        proxied = statistics.median(r[f"{protocol} proxy"] for r in rounds)
        overhead = statistics.median(r[f"{protocol} proxy"] - r[f"{protocol} direct"]
                                     for r in rounds)
        result[protocol] = {"direct_p50_ms": direct, "proxy_p50_ms": proxied,
                            "overhead_p50_ms": overhead}
        verdict = "ok" if overhead < P50_TARGET_MS else "over the goal"
        print(f"{protocol:4s} p50 direct {direct:.3f} ms, through the proxy {proxied:.3f} ms: "
              f"+{overhead:.3f} ms (goal < {P50_TARGET_MS:g} ms: {verdict})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
