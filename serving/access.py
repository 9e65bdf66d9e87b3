"""Who may talk to fer-serve and who may change what it serves: its TLS and reload flags.

    --ssl-config-file FILE   TF Serving's text-format SSLConfig (serving/tls.py): TLS on the
                             gRPC and the REST port; `client_verify: true` makes it mutual
    --allowed-root DIR       (repeatable) where HandleReloadConfigRequest may point base
                             paths and request-log prefixes (serving/reload_policy.py);
                             default: the directory of --model-config
    --no-reload-config       HandleReloadConfigRequest answers UNIMPLEMENTED
"""
from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from typing import Any, Optional

from fer_pipeline.serving.reload_policy import ReloadPolicy
from fer_pipeline.serving.tls import (SSLConfig, grpc_server_credentials, read_ssl_config,
                                      rest_server_context)

__all__ = ["AccessConfig", "add_access_arguments", "access_config"]


@dataclass(frozen=True)
class AccessConfig:
    """TLS (None: plaintext, as TF Serving by default) and the reload policy's settings."""
    ssl: Optional[SSLConfig] = None
    allowed_roots: tuple[str, ...] = ()    # empty: the directory of models.config
    reload_config: bool = True

    def reload_policy(self, model_config: str) -> ReloadPolicy:
        return ReloadPolicy.for_server(model_config, self.allowed_roots, self.reload_config)

    def grpc_credentials(self) -> Any:
        """grpc.ServerCredentials, or None for plaintext."""
        return grpc_server_credentials(self.ssl) if self.ssl is not None else None

    def rest_context(self) -> Optional[ssl.SSLContext]:
        return rest_server_context(self.ssl) if self.ssl is not None else None


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ssl-config-file", "--ssl_config_file", dest="ssl_config_file",
                        metavar="FILE",
                        help="TF Serving's text-format SSLConfig (server_key, server_cert, "
                             "custom_ca, client_verify): TLS on both ports")
    parser.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                        help="a directory under which HandleReloadConfigRequest may point "
                             "base paths and request logs (repeatable; default: the "
                             "directory of --model-config)")
    parser.add_argument("--no-reload-config", dest="reload_config", action="store_false",
                        help="refuse HandleReloadConfigRequest (UNIMPLEMENTED)")


def access_config(args: argparse.Namespace) -> AccessConfig:
    """The AccessConfig of parsed flags; ConfigError when the SSL config is unusable."""
    ssl_config = read_ssl_config(args.ssl_config_file) if args.ssl_config_file else None
    return AccessConfig(ssl_config, tuple(args.allowed_root), args.reload_config)
