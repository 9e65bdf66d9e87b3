"""Why a connection to a model server failed, in one line a user can act on.

gRPC and HTTP libraries report a wrong port or protocol in their own terms (an HTTP
`BadStatusLine` full of binary HTTP/2 bytes, gRPC's "Failed parsing HTTP/2", a reset), so
when a call fails without a server answer, `diagnose` asks the address itself, with at most
three short connections:

1. a plain TCP connect: refused means nothing listens there; no answer means a firewall or
   the wrong host;
2. a TLS handshake: if it completes, the port expects TLS and our plaintext cannot work;
3. an HTTP/1.0 request line: an HTTP/1.x server answers "HTTP/..." (a REST port); an HTTP/2
   server (every gRPC server) answers with its SETTINGS frame whatever it was sent;
   silence means the server accepts but does not answer.
"""
from __future__ import annotations

import socket
import ssl
from typing import Optional

GRPC_PORT, REST_PORT = 8500, 8501
_HTTP2_SETTINGS_FRAME = 0x04   # the frame type at byte 3 of an HTTP/2 server's first frame


def diagnose(host: str, port: int, protocol: str, timeout: float,
             tls: bool = False) -> Optional[str]:
    """What is wrong with talking `protocol` ("grpc" or "rest") to host:port, or None when
    the address answers in that protocol (then the caller's own error says more). With
    `tls` only the TCP connect is asked (serving/tls.py's ClientTLS.diagnose asks the rest)."""
    timeout = max(0.5, min(timeout, 5.0))
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        return f"cannot resolve the host name {host!r} (--host)"
    except ConnectionRefusedError:
        return (f"nothing is listening on {where} (is fer-serve running? gRPC is on "
                f"{GRPC_PORT} and REST on {REST_PORT} by default)")
    except (socket.timeout, TimeoutError):
        return (f"{where} did not accept a connection within {timeout:g} s: a firewall, or "
                "the wrong --host?")
    except OSError as error:
        return f"cannot connect to {where}: {error.strerror or error}"
    if tls:
        return None
    if _speaks_tls(host, port, timeout):
        return (f"{where} expects TLS (https) and this client spoke plaintext: give "
                "fer-client --tls-ca (the CA of the server's certificate), and --tls-cert "
                "and --tls-key where the server verifies its clients")
    reply = _first_bytes(host, port, timeout)
    if reply is None:
        return (f"{where} accepts connections but does not answer within {timeout:g} s: "
                "the server is overloaded, or it is not a model server")
    if not reply:
        return (f"{where} closes the connection without answering: it is not a "
                f"{'gRPC' if protocol == 'grpc' else 'REST'} model server")
    if reply.startswith(b"HTTP/"):
        if protocol == "grpc":
            return (f"{where} speaks HTTP/1.x (a REST port), not gRPC: use --protocol rest, "
                    f"or the gRPC port ({GRPC_PORT} by default) with --port")
        return None
    if len(reply) >= 4 and reply[3] == _HTTP2_SETTINGS_FRAME:
        if protocol == "rest":
            return (f"{where} speaks HTTP/2 (a gRPC port), not REST: use --protocol grpc, "
                    f"or the REST port ({REST_PORT} by default) with --port")
        return None
    shown = reply[:16].decode("ascii", "backslashreplace")
    return f"{where} answers, but not as an HTTP or gRPC server (it sent {shown!r})"


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # only asking whether it speaks TLS at all
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLError as error:
        # An alert is a TLS answer: the server speaks TLS and refused us (no certificate).
        return "ALERT" in (error.reason or "").upper()
    except OSError:
        return False


def _first_bytes(host: str, port: int, timeout: float) -> Optional[bytes]:
    """What the server sends back to an HTTP/1.0 request line (b"" if it just closes)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return connection.recv(64)
    except (socket.timeout, TimeoutError):
        return None
    except OSError:
        return b""
