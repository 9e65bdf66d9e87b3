"""Free TCP ports on the loopback interface, for a server that is started next.

The operating system picks each port (bind to port 0). The port is free when it is picked,
not reserved: the caller's server binds it next, as the infra validator's sandbox does.
"""
from __future__ import annotations

import contextlib
import socket

__all__ = ["free_port", "free_ports"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now on 127.0.0.1 (the sockets are held
    together while the ports are picked, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                   for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
