"""The Python SDK worker pool of the local clusters, listening on 127.0.0.1 only.

A Flink TaskManager or Spark executor running a Beam job with `--environment_type=EXTERNAL
--environment_config=localhost:PORT` asks this service to start a Python SDK worker for it.
Beam's own `python -m apache_beam.runners.worker.worker_pool_main` binds every interface
(`[::]:PORT`), and whoever reaches that port can make it start processes; on one machine
there is no reason to offer that to the network. This is the same service (Beam's servicer,
one `python` process per worker, found on PATH) bound to loopback.

    python -m tools.worker_pool --port 50000
"""
from __future__ import annotations

import argparse
import logging
import sys
from concurrent import futures
from typing import Optional

import grpc

from fer_pipeline.core import quiet

# Workers hold a control stream open for a job's whole life without sending data: the
# server must not answer their keep-alive pings by closing the connection.
_KEEPALIVE_OPTIONS = [("grpc.http2.max_pings_without_data", 0),
                      ("grpc.http2.max_ping_strikes", 0)]


def serve(port: int, host: str = "127.0.0.1") -> grpc.Server:
    """Starts the worker pool on host:port; returns the running gRPC server."""
    # Imported here: main installs core/quiet.py's filters before Beam loads.
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_KEEPALIVE_OPTIONS)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=True), server)
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:       # grpc's "Failed to bind to address ..."
        raise OSError(f"the worker pool cannot listen on {host}:{port} (in use?)") from error
    server.start()
    return server


def main(argv: Optional[list[str]] = None) -> int:
    quiet.install()  # the SDK workers it starts inherit its TF_CPP_MIN_LOG_LEVEL
    parser = argparse.ArgumentParser(prog="python -m tools.worker_pool",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        server = serve(args.port)
    except OSError as error:
        print(f"[worker-pool] error: {error}", file=sys.stderr)
        return 1
    logging.info("Python SDK worker pool listening on 127.0.0.1:%d", args.port)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
