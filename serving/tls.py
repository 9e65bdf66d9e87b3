"""TLS for fer-serve's two ports, configured as TF Serving configures it.

TF Serving's `--ssl_config_file` names a text-format `tensorflow.serving.SSLConfig`
(tensorflow_serving/config/ssl_config.proto) whose fields hold the PEM text itself, not
file names:

    server_key: "-----BEGIN PRIVATE KEY-----\\n...\\n-----END PRIVATE KEY-----\\n"
    server_cert: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----\\n"
    custom_ca: "-----BEGIN CERTIFICATE-----\\n..."     # the CA that signs client certificates
    client_verify: true                                # mutual TLS: clients must present one

tensorflow-serving-api ships no ssl_config_pb2, so the message is declared here, field for
field, and parsed with protobuf's own text-format parser (comments, escapes and adjacent
strings work as in TF Serving). The same file serves gRPC (`grpc.ssl_server_credentials`)
and REST (an `ssl.SSLContext`, handshaking on serving/http_server.py's I/O thread; TF
Serving's REST port has no TLS, ours does). `client_verify: true` refuses, on both ports,
every client without a certificate signed by `custom_ca`.

The client side (`fer-client --tls-ca/--tls-cert/--tls-key`, serving/client.py) builds
its gRPC credentials and its REST context here too.
"""
from __future__ import annotations

import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from fer_pipeline.core.errors import ConfigError

__all__ = ["SSLConfig", "ClientTLS", "read_ssl_config", "parse_ssl_config",
           "grpc_server_credentials", "rest_server_context"]


@dataclass(frozen=True)
class SSLConfig:
    """TF Serving's SSLConfig: PEM texts and whether clients must present a certificate."""
    server_key: str
    server_cert: str
    custom_ca: str = ""
    client_verify: bool = False


def _ssl_config_class() -> Any:
    """The `tensorflow.serving.SSLConfig` message class, declared as ssl_config.proto does."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="fer_pipeline/tensorflow_serving/config/ssl_config.proto",
        package="tensorflow.serving", syntax="proto3")
    message = proto.message_type.add(name="SSLConfig")
    string, boolean = (descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                       descriptor_pb2.FieldDescriptorProto.TYPE_BOOL)
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    for number, (name, kind) in enumerate((("server_key", string), ("server_cert", string),
                                           ("custom_ca", string), ("client_verify", boolean)),
                                          start=1):
        message.field.add(name=name, number=number, type=kind, label=optional)
    pool = descriptor_pool.DescriptorPool()   # our own: never clashes with a real one
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


def parse_ssl_config(text: str, where: str = "--ssl-config-file") -> SSLConfig:
    """An SSLConfig from its text format; ConfigError saying what is wrong with it."""
    message = _ssl_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ConfigError(f"{where}: not a text-format SSLConfig ({error}); it takes "
                          "server_key, server_cert, custom_ca and client_verify") from None
    config = SSLConfig(message.server_key, message.server_cert, message.custom_ca,
                       message.client_verify)
    for name, marker in (("server_key", "PRIVATE KEY-----"),
                         ("server_cert", "-----BEGIN CERTIFICATE-----")):
        value = getattr(config, name)
        if not value:
            raise ConfigError(f"{where}: {name} is missing")
        if marker not in value:
            raise ConfigError(f"{where}: {name} must hold the PEM text itself (as in TF "
                              f"Serving's ssl_config), not a file name; got {value[:40]!r}")
    if config.custom_ca and "-----BEGIN CERTIFICATE-----" not in config.custom_ca:
        raise ConfigError(f"{where}: custom_ca must hold PEM certificate text, not a file name")
    if config.client_verify and not config.custom_ca:
        raise ConfigError(f"{where}: client_verify needs custom_ca, the CA whose certificates "
                          "clients must present")
    # Whether the key, the certificate and the CA are usable at all: one clear line now,
    # not an obscure failure at the first connection.
    rest_server_context(config, where)
    return config


def read_ssl_config(path: str) -> SSLConfig:
    """The SSLConfig in the text-format file `path` (TF Serving's --ssl_config_file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"--ssl-config-file {path}: {error.strerror or error}") from None
    return parse_ssl_config(text, f"--ssl-config-file {path}")


def grpc_server_credentials(config: SSLConfig) -> Any:
    """The gRPC server credentials TF Serving builds from the same SSLConfig."""
    import grpc

    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None,
        require_client_auth=config.client_verify)


def rest_server_context(config: SSLConfig, where: str = "--ssl-config-file") -> ssl.SSLContext:
    """A server-side SSLContext with the config's key and certificate (and CA, verifying
    clients when client_verify)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: the PEM texts go to a private temporary directory
    # (mode 0700) for the moment it takes, and are removed at once.
    with tempfile.TemporaryDirectory(prefix="fer-serve-tls-") as directory:
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, text in ((cert, config.server_cert), (key, config.server_key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
                out.write(text)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as error:
            raise ConfigError(f"{where}: server_key and server_cert are not a usable key "
                              f"and certificate pair ({error.reason or error})") from None
    if config.custom_ca:
        try:
            context.load_verify_locations(cadata=config.custom_ca)
        except ssl.SSLError as error:
            raise ConfigError(f"{where}: custom_ca is not a usable certificate "
                              f"({error.reason or error})") from None
    context.verify_mode = ssl.CERT_REQUIRED if config.client_verify else ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class ClientTLS:
    """The client's TLS files (`fer-client --tls-ca/--tls-cert/--tls-key`)."""
    ca_file: Optional[str] = None      # None: the system's trusted CAs
    cert_file: Optional[str] = None    # with key_file: our certificate, for mutual TLS
    key_file: Optional[str] = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("--tls-cert and --tls-key go together (the client's "
                              "certificate and its private key)")
        for flag, path in (("--tls-ca", self.ca_file), ("--tls-cert", self.cert_file),
                           ("--tls-key", self.key_file)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{flag} {path}: no such file")

    def _read(self, path: Optional[str]) -> Optional[bytes]:
        if not path:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    def grpc_credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca_file),
                                            private_key=self._read(self.key_file),
                                            certificate_chain=self._read(self.cert_file))

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as error:
                raise ConfigError(f"--tls-cert {self.cert_file} and --tls-key "
                                  f"{self.key_file} are not a usable key and certificate "
                                  f"pair ({error.reason or error})") from None
        return context

    def diagnose(self, host: str, port: int, timeout: float) -> Optional[str]:
        """Why a TLS connection to host:port fails, in one line (None: it does not)."""
        refused = (f"{host}:{port} refused our TLS connection: it requires a client "
                   "certificate signed by its CA (--tls-cert and --tls-key)")
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                with self.ssl_context().wrap_socket(raw, server_hostname=host) as tls:
                    # With TLS 1.3 a refused client certificate shows after the handshake:
                    # the server closes (or alerts) at once, where an accepting server
                    # waits for our request or greets us (HTTP/2's SETTINGS).
                    tls.settimeout(min(timeout, 1.0))
                    try:
                        if tls.recv(1) == b"":
                            return refused
                    except (socket.timeout, TimeoutError):
                        pass
        except ssl.SSLCertVerificationError as error:
            return (f"{host}:{port}'s certificate is not trusted "
                    f"({error.verify_message}): give the CA that signed it with --tls-ca")
        except ssl.SSLError as error:
            reason = (error.reason or str(error)).upper()
            if "ALERT" in reason:
                return refused + f" ({error.reason})"
            if "WRONG_VERSION" in reason or "RECORD" in reason:
                return f"{host}:{port} does not speak TLS: leave out the --tls-* flags"
            return f"TLS with {host}:{port} failed: {error.reason or error}"
        except OSError:
            return None   # the plain diagnosis (serving/connection.py) says more
        return None
