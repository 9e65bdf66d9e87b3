"""`fer-serve`: serves a pushed serving root over TF Serving's gRPC and REST protocols.

The real tensorflow_model_server has no pip or Debian package (see docs/serving.md), so this embedded
server speaks the same protocol over the same models.config: one client works against both.
When the binary is on PATH (or with --server tfserving) it execs the real server instead.

    fer-serve --model-config serving_models/models.config [--port 8500] [--rest-port 8501]
              [--host 127.0.0.1] [--poll-seconds 1] [--batching] [--max-batch-size 32]
              [--batch-timeout-ms 2] [--num-batch-threads N] [--max-enqueued-batches 10]
              [--batching-parameters-file batching.pbtxt] [--max-request-bytes 16777216]
              [--tensorflow-intra-op-parallelism 0] [--tensorflow-inter-op-parallelism 0]
              [--request-log-max-file-bytes 67108864] [--request-log-max-file-seconds 600]
              [--request-log-queue-records 4096] [--server auto|embedded|tfserving]
    fer-serve --model-config models.config --upstream HOST | --upstream-grpc HOST:PORT
              [--upstream-rest HOST:PORT]      (the logging proxy: serving/proxy.py)

Request logs (serving/request_log.py) are configured per model by models.config's
logging_config; the three --request-log flags say how the files are written.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

from fer_pipeline.core import fileio, quiet
from fer_pipeline.core.errors import exit_process, is_user_error, run_cli, ConfigError, ResourceError
from fer_pipeline.core.serving_root import read_model_server_config, without_request_log, \
    write_model_server_config

# The serving modules load TensorFlow, so they are imported where they are used: entry_point
# installs core/quiet.py's filters first, as console script and as `python -m`.
if TYPE_CHECKING:
    from fer_pipeline.serving.batching import BatchingConfig
    from fer_pipeline.serving.http_server import HttpLimits
    from fer_pipeline.serving.request_log import RequestLogConfig
    from fer_pipeline.serving.access import AccessConfig

log = logging.getLogger("fer-serve")


def _default_batching_config() -> BatchingConfig:
    from fer_pipeline.serving.batching import BatchingConfig

    return BatchingConfig()


def _default_rest_limits() -> HttpLimits:
    from fer_pipeline.serving.http_server import HttpLimits

    return HttpLimits()


def _default_access_config() -> AccessConfig:
    from fer_pipeline.serving.access import AccessConfig

    return AccessConfig()


def _default_request_log_config() -> RequestLogConfig:
    from fer_pipeline.serving.request_log import RequestLogConfig

    return RequestLogConfig()


@dataclass
class ServerConfig:
    model_config: str
    host: str = "127.0.0.1"         # loopback unless asked: no auth on these endpoints
    port: int = 8500                # gRPC; 0 picks a free port
    rest_port: int = 8501           # REST; 0 picks a free port
    poll_seconds: float = 1.0
    batching: bool = False
    batching_config: BatchingConfig = field(default_factory=_default_batching_config)
    max_request_bytes: int = 16 * 1024 * 1024
    grpc_workers: int = 32
    # RPCs admitted at once (running or waiting for a worker); past it RESOURCE_EXHAUSTED
    # at once. 0: twice grpc_workers.
    grpc_max_concurrent_rpcs: int = 0
    # REST timeouts, worker threads and connection bounds (serving/http_server.py).
    rest_limits: HttpLimits = field(default_factory=_default_rest_limits)
    # TF Serving's --tensorflow_{intra,inter}_op_parallelism; 0 leaves TF's default (one
    # thread per core for each). Only takes effect before this process first runs TF.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # How request logs are written; which models log, and how much, is models.config's
    # logging_config (serving/request_log.py).
    request_log: RequestLogConfig = field(default_factory=_default_request_log_config)
    # TLS and who may reload the config (serving/access.py); default plaintext, reloads
    # under the directory of models.config.
    access: AccessConfig = field(default_factory=_default_access_config)


class FerServer:
    """Model manager + gRPC + REST in one process; `start()` returns once models are loaded."""

    def __init__(self, config: ServerConfig) -> None:
        from fer_pipeline.serving.batching import Batcher
        from fer_pipeline.serving.model_manager import ModelManager, Predictor
        from fer_pipeline.serving.request_log import RequestLogger

        self.config = config
        _set_tf_threads(config.intra_op_threads, config.inter_op_threads)
        self.manager = ModelManager(config.model_config, config.poll_seconds)
        batcher = None
        if config.batching:
            batcher = Batcher(config.batching_config)
        self.request_log = RequestLogger(self.manager.request_log_spec, config.request_log)
        self.predictor = Predictor(self.manager, batcher, self.request_log)
        self.grpc_server = None
        self._grpc_pool = None
        self.rest_server = None
        self.grpc_port = 0
        self.rest_port = 0

    def start(self) -> "FerServer":
        from fer_pipeline.serving.grpc_service import build_grpc_server
        from fer_pipeline.serving.rest import build_rest_server

        host = self.config.host
        # Busy ports are found before minutes of model loading, not after.
        check_ports_free(host, [("gRPC", self.config.port, "--port"),
                                ("REST", self.config.rest_port, "--rest-port")])
        self.manager.start()
        self.request_log.start()
        try:
            self.grpc_server, self.grpc_port, self._grpc_pool = build_grpc_server(
                self.predictor, host, self.config.port, self.config.max_request_bytes,
                self.config.grpc_workers, self.config.grpc_max_concurrent_rpcs,
                self.config.access.grpc_credentials(),
                self.config.access.reload_policy(self.config.model_config))
        except (OSError, RuntimeError) as error:
            self.stop()
            raise ResourceError(bind_failure("gRPC", host, self.config.port, "--port", error)) \
                from None
        self.grpc_server.start()
        try:
            self.rest_server = build_rest_server(self.predictor, host, self.config.rest_port,
                                                 self.config.max_request_bytes,
                                                 self.config.rest_limits,
                                                 ssl_context=self.config.access.rest_context())
        except OSError as error:
            self.stop()
            raise ResourceError(bind_failure("REST", host, self.config.rest_port, "--rest-port",
                                       error)) from None
        self.rest_port = self.rest_server.server_address[1]
        self.rest_server.start()
        return self

    def stop(self) -> None:
        if self.predictor.batcher is not None:
            stats = self.predictor.batcher.stats
            log.info("batching: %d requests in %d model calls, %.1f rows per call on average",
                     stats.requests, stats.batches, stats.mean_batch_rows)
        if self.rest_server is not None:
            self.rest_server.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1).wait()
            self._grpc_pool.shutdown(wait=True)
        self.request_log.stop()   # after the last request: writes what is queued, closes files
        self.manager.stop()


def check_port_free(host: str, port: int) -> None:
    """Binds `host:port` for a moment; OSError when it cannot be bound (checked before gRPC
    tries, which would log its own C++ error line first)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both servers do
        probe.bind((host, port))


def check_ports_free(host: str, ports: list[tuple[str, int, str]]) -> None:
    """ResourceError naming the first of `ports` ((what, port, flag)) that cannot be bound."""
    for what, port, flag in ports:
        try:
            check_port_free(host, port)
        except OSError as error:
            raise ResourceError(bind_failure(what, host, port, flag, error)) from None


def bind_failure(what: str, host: str, port: int, flag: str, error: BaseException) -> str:
    """One line naming the address that could not be bound, why, and what to do."""
    reasons = {errno.EADDRINUSE: "the port is already in use (another fer-serve or TF "
                                 f"Serving?); stop it or choose another {flag} (0: any "
                                 "free port)",
               errno.EACCES: f"permission denied (ports below 1024 need root); choose "
                             f"another {flag}",
               errno.EADDRNOTAVAIL: "this machine has no such address; check --host"}
    reason = reasons.get(getattr(error, "errno", None))
    if reason is None:
        text = str(error).lower()
        reason = (reasons[errno.EADDRINUSE] if "in use" in text or "bind" in text
                  else str(error))
    return f"cannot listen for {what} on {host}:{port}: {reason}"


def _set_tf_threads(intra_op: int, inter_op: int) -> None:
    import tensorflow as tf
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # TF already ran in this process (tests start several servers)
        if (intra_op and intra_op != tf.config.threading.get_intra_op_parallelism_threads()
                or inter_op and
                inter_op != tf.config.threading.get_inter_op_parallelism_threads()):
            log.warning("TF thread pools already exist in this process; "
                        "intra/inter-op thread settings ignored")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from fer_pipeline.serving.batching import BatchingConfig
    from fer_pipeline.serving.access import access_config, add_access_arguments
    from fer_pipeline.serving.http_server import HttpLimits
    from fer_pipeline.serving.proxy import add_proxy_arguments
    from fer_pipeline.serving.request_log import RequestLogConfig

    parser = argparse.ArgumentParser(prog="fer-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", required=True, help="text-format models.config")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free)")
    parser.add_argument("--rest-port", type=int, default=8501, help="REST port (0: any free)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; 0.0.0.0 exposes an unauthenticated server")
    parser.add_argument("--poll-seconds", type=float, default=1.0,
                        help="how often to re-read models.config and the base paths")
    parser.add_argument("--batching", action="store_true",
                        help="batch concurrent requests into one model call")
    defaults = BatchingConfig()
    # Batching settings default to None so that mixing them with a parameters file is caught.
    parser.add_argument("--max-batch-size", type=int,
                        help=f"rows per model call (default {defaults.max_batch_size})")
    parser.add_argument("--batch-timeout-ms", type=float,
                        help="longest a request waits for others to join its batch "
                             f"(default {defaults.batch_timeout_s * 1000:g})")
    parser.add_argument("--num-batch-threads", type=int,
                        help="batches run at once per model (TF Serving's num_batch_threads; "
                             f"default {defaults.num_batch_threads})")
    parser.add_argument("--max-enqueued-batches", type=int,
                        help="full batches' worth of rows that may wait before requests get "
                             f"UNAVAILABLE (default {defaults.max_enqueued_batches})")
    parser.add_argument("--batching-parameters-file",
                        help="TF Serving's batching parameters file (text BatchingParameters) "
                             "instead of the four flags above; implies --batching")
    parser.add_argument("--batch-policy", choices=("timeout", "fill"), default=defaults.policy,
                        help="timeout: a batch waits up to --batch-timeout-ms for others "
                             "to join; fill: no timeout, a batch runs at once unless another "
                             "one is running, then when that ends or once it is full "
                             "(embedded server only)")
    parser.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0,
                        help="threads one TF op may use (0: TF's default, one per core)")
    parser.add_argument("--tensorflow-inter-op-parallelism", type=int, default=0,
                        help="TF ops run at once (0: TF's default, one per core)")
    parser.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024)
    rest = _default_rest_limits()
    parser.add_argument("--rest-read-timeout-s", type=float, default=rest.read_timeout_s,
                        help="a REST request not received whole in this time gets a 408 "
                             "and its connection closed")
    parser.add_argument("--rest-idle-timeout-s", type=float, default=rest.idle_timeout_s,
                        help="idle REST keep-alive connections are closed after this")
    parser.add_argument("--rest-workers", type=int, default=rest.workers,
                        help="threads answering REST requests (fixed; idle connections "
                             "hold none)")
    parser.add_argument("--rest-max-connections", type=int, default=rest.max_connections,
                        help="open REST connections; past it new ones get a 503")
    parser.add_argument("--rest-max-queued", type=int, default=rest.max_queued,
                        help="REST requests that may wait for a worker; past it a 503 "
                             "with Retry-After at once")
    parser.add_argument("--grpc-max-concurrent-rpcs", type=int, default=0,
                        help="gRPC calls admitted at once; past it RESOURCE_EXHAUSTED at "
                             "once (0: twice the gRPC worker threads)")
    log_defaults = RequestLogConfig()
    parser.add_argument("--request-log-max-file-bytes", type=int,
                        default=log_defaults.max_file_bytes,
                        help="a request log file is closed once it holds this many bytes")
    parser.add_argument("--request-log-max-file-seconds", type=float,
                        default=log_defaults.max_file_seconds,
                        help="... or once it has been open this long")
    parser.add_argument("--request-log-queue-records", type=int,
                        default=log_defaults.queue_records,
                        help="sampled requests that may wait for the log writer; beyond "
                             "that they are dropped (and counted), never delayed")
    parser.add_argument("--request-log-queue-bytes", type=int,
                        default=log_defaults.queue_bytes,
                        help="... and the bytes they may hold, at most")
    parser.add_argument("--request-log-max-total-bytes", type=int,
                        default=log_defaults.max_total_bytes,
                        help="per log directory: past it the oldest closed files are "
                             "deleted (0: no limit)")
    parser.add_argument("--request-log-max-age-s", type=float,
                        default=log_defaults.max_age_s,
                        help="log files older than this are deleted (0: kept)")
    add_access_arguments(parser)
    add_proxy_arguments(parser)   # --upstream...: the logging proxy (serving/proxy.py)
    parser.add_argument("--server", choices=("auto", "embedded", "tfserving"), default="auto",
                        help="auto: the real tensorflow_model_server when it is on PATH, "
                        "else the embedded server")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        args.batching_config = _batching_config(args)
        args.rest_limits = HttpLimits(
            args.rest_read_timeout_s, args.rest_idle_timeout_s, args.rest_workers,
            args.rest_max_connections, args.rest_max_queued)
        args.request_log_config = RequestLogConfig(
            args.request_log_max_file_bytes, args.request_log_max_file_seconds,
            args.request_log_queue_records, args.request_log_queue_bytes,
            args.request_log_max_total_bytes, args.request_log_max_age_s)
        args.access = access_config(args)
    except (OSError, ValueError) as error:
        if not is_user_error(error):
            raise
        parser.error(str(error))
    args.batching = args.batching or bool(args.batching_parameters_file)
    return args


def _batching_config(args: argparse.Namespace) -> BatchingConfig:
    """The batching settings from the parameters file, or from the flags over the defaults."""
    from fer_pipeline.serving.batching import BatchingConfig, read_batching_parameters

    timeout = args.batch_timeout_ms
    flags = {"--max-batch-size": ("max_batch_size", args.max_batch_size),
             "--batch-timeout-ms": ("batch_timeout_s", None if timeout is None else timeout / 1e3),
             "--num-batch-threads": ("num_batch_threads", args.num_batch_threads),
             "--max-enqueued-batches": ("max_enqueued_batches", args.max_enqueued_batches)}
    given = {flag: pair for flag, pair in flags.items() if pair[1] is not None}
    if args.batching_parameters_file:
        if given:
            raise ConfigError(f"{', '.join(given)} and --batching-parameters-file: give the "
                              "batching settings one way, not both")
        return replace(read_batching_parameters(args.batching_parameters_file),
                       policy=args.batch_policy)
    return replace(BatchingConfig(), policy=args.batch_policy, **dict(given.values()))


def tfserving_command(binary: str, args: argparse.Namespace) -> list[str]:
    """The real TF Serving's command line for the same config, ports and settings. With
    batching, the batching settings travel in a parameters file (written from the flags
    when none was given), so both servers batch alike."""
    from fer_pipeline.serving.batching import format_batching_parameters

    command = [binary, f"--port={args.port}", f"--rest_api_port={args.rest_port}",
               f"--model_config_file={_config_without_request_log(args.model_config)}",
               f"--file_system_poll_wait_seconds={max(1, int(args.poll_seconds))}",
               f"--enable_batching={'true' if args.batching else 'false'}",
               f"--tensorflow_intra_op_parallelism={args.tensorflow_intra_op_parallelism}",
               f"--tensorflow_inter_op_parallelism={args.tensorflow_inter_op_parallelism}"]
    if args.ssl_config_file:   # the same file: TF Serving reads it for its gRPC port
        command.append(f"--ssl_config_file={os.path.abspath(args.ssl_config_file)}")
    if args.batching:
        path = args.batching_parameters_file
        if not path:
            # Outlives this process on purpose: the exec'd server reads it after we are gone.
            handle, path = tempfile.mkstemp(prefix="fer-serve-batching-", suffix=".pbtxt")
            with os.fdopen(handle, "w") as out:
                out.write(format_batching_parameters(args.batching_config))
        command.append(f"--batching_parameters_file={os.path.abspath(path)}")
    return command


def tfserving_binary(choice: str) -> Optional[str]:
    """The real server `fer-serve --server CHOICE` runs instead of the embedded one: the
    tensorflow_model_server on PATH for "auto" and "tfserving", None for "embedded" or
    when there is none (then "tfserving" is refused when fer-serve starts)."""
    if choice == "embedded":
        return None
    return shutil.which("tensorflow_model_server")


def _config_without_request_log(path: str) -> str:
    """`path`, or when it configures request logs a copy without them: the released
    tensorflow_model_server refuses to start with a logging_config (it has no request
    logger). The copy outlives this process on purpose, like the batching file."""
    if not fileio.exists(path):
        return os.path.abspath(path)   # the real server reports that
    try:
        specs = read_model_server_config(path)
    except (OSError, ValueError):
        return os.path.abspath(path)   # the real server reports what is wrong with it
    if not any(spec.request_log for spec in specs):
        return os.path.abspath(path)
    log.warning("tensorflow_model_server cannot write request logs; serving %s without "
                "its logging_config", path)
    handle, copy = tempfile.mkstemp(prefix="fer-serve-models-", suffix=".config")
    os.close(handle)
    return write_model_server_config(copy, [without_request_log(s) for s in specs])


def _exec_tfserving(args: argparse.Namespace) -> None:
    """Replaces this process with the real TF Serving over the same config and ports."""
    binary = tfserving_binary(args.server)
    if binary is None:
        if args.server == "tfserving":
            raise SystemExit("fer-serve: --server tfserving, but tensorflow_model_server "
                             "is not on PATH")
        return
    command = tfserving_command(binary, args)
    log.info("exec %s", " ".join(command))
    os.execv(binary, command)


def main(argv: Optional[list[str]] = None) -> int:
    """`fer-serve`: a mistake in one line, a bug in one line with where its traceback is."""
    return run_cli("fer-serve", _main, argv)


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not fileio.is_uri(args.model_config) and not os.path.isfile(args.model_config):
        print(f"fer-serve: --model-config {args.model_config}: no such file (the push step "
              "writes <serving root>/models.config)", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fer_pipeline.serving.proxy import proxy_requested, run_proxy

    if proxy_requested(args):   # forwards to an upstream server; loads no model
        return run_proxy(args)
    if args.server != "embedded":
        _exec_tfserving(args)
    config = ServerConfig(
        model_config=args.model_config, host=args.host, port=args.port,
        rest_port=args.rest_port, poll_seconds=args.poll_seconds, batching=args.batching,
        batching_config=args.batching_config, max_request_bytes=args.max_request_bytes,
        intra_op_threads=args.tensorflow_intra_op_parallelism,
        inter_op_threads=args.tensorflow_inter_op_parallelism,
        request_log=args.request_log_config, rest_limits=args.rest_limits,
        grpc_max_concurrent_rpcs=args.grpc_max_concurrent_rpcs, access=args.access)
    try:
        server = FerServer(config).start()
    except (OSError, ValueError) as error:
        if not is_user_error(error):
            raise
        print(f"fer-serve: {error}", file=sys.stderr)
        return 1
    print(f"fer-serve: gRPC on {args.host}:{server.grpc_port}, REST on "
          f"http://{args.host}:{server.rest_port}, models {server.manager.model_names()}",
          flush=True)
    for name, reason in sorted(server.manager.unservable().items()):
        print(f"fer-serve: warning: model {name} has no version to serve: {reason}; it "
              "answers NOT_FOUND until one appears", file=sys.stderr, flush=True)
    return serve_until_signalled(server.stop)


def serve_until_signalled(stop: Callable[[], None]) -> int:
    """Wait for SIGINT or SIGTERM, then `stop()`: how fer-serve ends, in either mode."""
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    stop()
    return 0


def entry_point() -> NoReturn:
    """The `fer-serve` console script (fer_pipeline.core.errors.exit_process says why it ends so)."""
    quiet.install()  # before TensorFlow loads (none of the modules imported above loads it)
    exit_process(main())


if __name__ == "__main__":
    entry_point()
