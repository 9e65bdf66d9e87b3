"""A bounded HTTP/1.1 server: one I/O thread, a fixed pool of workers, nothing per connection.

http.server's ThreadingHTTPServer starts a thread per connection and sets no socket
timeout, so a client that sends half a request and goes quiet holds a thread (and its
memory) for as long as it likes. Here:

* one I/O thread (a selector) accepts connections and reads each request until it has
  arrived whole: its headers and the Content-Length bytes of its body. A slow or idle
  client costs a socket and a buffer, never a thread;
* a request that has not arrived whole `read_timeout_s` after its first byte gets a 408
  and its connection closed; a keep-alive connection idle for `idle_timeout_s` is closed;
* a whole request goes to one of `workers` threads (started with the server, never more),
  which runs the handler (a BaseHTTPRequestHandler: the routing code is http.server's) on
  the buffered bytes and writes the answer; the connection then goes back to the I/O
  thread for its next request (keep-alive, pipelining kept);
* overload sheds at once: past `max_connections` open connections a new one gets a 503,
  and a whole request that finds `max_queued` others already waiting for a worker gets a
  503, both with Retry-After and without touching a worker, so the requests admitted
  keep their latency.

A client that goes away before its answer is written is one INFO line, not a traceback.
With an `ssl_context`, each connection's TLS handshake runs in the I/O thread too.
"""
from __future__ import annotations

import collections
import io
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Optional

__all__ = ["HttpLimits", "BoundedHTTPServer", "PooledHandlerMixin", "DISCONNECTS"]

log = logging.getLogger(__name__)

# What a client that hung up looks like to the side writing its answer.
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

_HEADER_END = b"\r\n\r\n"
_MAX_HEADER_BYTES = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([^\s]*)[ \t\r]*$", re.I | re.M)


@dataclass(frozen=True)
class HttpLimits:
    """How long a client may take and how many the server takes at once."""
    read_timeout_s: float = 30.0     # a request must arrive whole within this
    idle_timeout_s: float = 60.0     # keep-alive connections idle longer are closed
    workers: int = 16                # threads running handlers, fixed
    max_connections: int = 1000      # open connections; past it new ones get a 503
    max_queued: int = 64             # whole requests waiting for a worker; past it 503
    retry_after_s: int = 1           # the Retry-After of those 503s

    def __post_init__(self) -> None:
        if min(self.read_timeout_s, self.idle_timeout_s) <= 0:
            raise ValueError("REST read and idle timeouts must be positive")
        if min(self.workers, self.max_connections) < 1 or self.max_queued < 0:
            raise ValueError("REST workers and max connections must be at least 1, "
                             "max queued at least 0")


def _simple_response(status: int, reason: str, message: str,
                     headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = ('{"error": "%s"}' % message).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection:
    __slots__ = ("sock", "address", "buffer", "started", "last_active", "handshaking")

    def __init__(self, sock: socket.socket, address, handshaking: bool) -> None:
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.started: Optional[float] = None   # when the request being read began
        self.last_active = time.monotonic()
        self.handshaking = handshaking

    def whole_request(self, body_limit: int) -> bool:
        """True when the buffer holds a request's headers and its whole body (or headers
        the handler must refuse: a bad or too-large Content-Length is its to answer)."""
        end = self.buffer.find(_HEADER_END)
        if end < 0:
            return False
        found = _CONTENT_LENGTH.search(bytes(self.buffer[:end + 2]))
        if found is None:
            return True
        try:
            length = int(found.group(1))
        except ValueError:
            return True
        return length < 0 or length > body_limit or len(self.buffer) >= end + 4 + length


class _RequestReader:
    """The handler's rfile: the request the I/O thread buffered. Only a handler that reads
    a body past it (draining one it refused for its size) reads the socket itself."""

    def __init__(self, buffered: bytearray, sock: socket.socket) -> None:
        self._bytes = io.BytesIO(buffered)
        self._sock = sock

    def readline(self, limit: int = -1) -> bytes:
        return self._bytes.readline(limit)

    def read(self, size: int = -1) -> bytes:
        data = self._bytes.read(size)
        if size is None or size < 0 or len(data) == size:
            return data
        try:
            return data + self._sock.recv(size - len(data))
        except (socket.timeout, ssl.SSLError):
            return data

    def leftover(self) -> bytes:
        """What the handler did not read: a request the client pipelined behind it."""
        return self._bytes.read()

    def close(self) -> None:
        pass


class _SocketWriter:
    """The handler's wfile: every write sent whole (a socket's send may send part)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class PooledHandlerMixin:
    """Put before BaseHTTPRequestHandler: one request per call, on the buffered bytes; the
    connection stays open for the server to reuse."""

    def setup(self) -> None:
        self.connection = self.request
        self.reader = _RequestReader(self.server.pending_bytes, self.request)
        self.rfile = self.reader
        self.wfile = _SocketWriter(self.request)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        pass

    def read_body(self) -> "bytes | None":
        """The request's body, or None once a 400 (bad Content-Length) or a 413 (over
        the server's max_request_bytes) has been answered through the handler's `_error`.
        Both close the connection: what follows on it cannot be trusted."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._error(400, "bad Content-Length header")
            return None
        if length > self.server.max_request_bytes:
            self._discard_body(length)
            self.close_connection = True
            self._error(413, f"request of {length} bytes exceeds the limit of "
                             f"{self.server.max_request_bytes} bytes")
            return None
        return self.rfile.read(length)

    def send_whole(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """The status line, `headers`, Content-Length and `body` in one write: one system
        call instead of two, and the answer leaves whole (a client that hung up after the
        headers broke the second write)."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.extend((b"\r\n", body))
        self.flush_headers()

    def _discard_body(self, length: int) -> None:
        """Reads (and drops) a too-large body, up to a bound, so the client that is still
        sending it sees our 413 instead of a broken pipe; beyond the bound we just close."""
        remaining = min(length, 2 * self.server.max_request_bytes)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)


class BoundedHTTPServer:
    """Serves `handler_class` (PooledHandlerMixin + BaseHTTPRequestHandler) on `address`."""

    def __init__(self, address: tuple[str, int], handler_class: type, limits: HttpLimits,
                 max_body_bytes: int, reuse_port: bool = False,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.limits = limits
        self.handler_class = handler_class
        self.ssl_context = ssl_context
        self.max_request_bytes = max_body_bytes
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.socket.bind(address)
            self.socket.listen(512)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._connections: dict[int, _Connection] = {}   # fd -> connection, I/O thread's
        self._open = 0                                    # incl. those with a worker
        self._in_flight = 0                               # requests queued or running
        self._open_lock = threading.Lock()
        self._returned: collections.deque = collections.deque()
        self._work: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._selector.register(self.socket, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._threads = [threading.Thread(target=self._worker, name=f"rest-worker-{i}",
                                          daemon=True) for i in range(self.limits.workers)]
        self._threads.append(threading.Thread(target=self._io_loop, name="rest-io",
                                              daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        for _ in range(self.limits.workers):
            self._work.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        for connection in list(self._connections.values()) + list(self._returned):
            connection.sock.close()
        self.socket.close()
        self._wake_read.close()
        self._wake_write.close()
        self._selector.close()

    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    # --- the I/O thread --------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass

    def _io_loop(self) -> None:
        tick = min(0.5, self.limits.read_timeout_s / 4, self.limits.idle_timeout_s / 4)
        next_sweep = time.monotonic() + tick
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=tick):
                if key.fileobj is self.socket:
                    self._accept()
                elif key.fileobj is self._wake_read:
                    try:
                        while self._wake_read.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._readable(key.data)
            while self._returned:
                self._resume(self._returned.popleft())
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + tick

    def _accept(self) -> None:
        for _ in range(64):   # a burst of connections, without starving the others
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:   # e.g. out of file descriptors: say so, keep serving
                log.warning("REST accept failed: %s", error)
                return
            with self._open_lock:
                full = self._open >= self.limits.max_connections
                if not full:
                    self._open += 1
            if full:
                self._shed(sock, "too many connections")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            handshaking = False
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
                handshaking = True
            connection = _Connection(sock, address, handshaking)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _shed(self, sock: socket.socket, why: str) -> None:
        """A 503 with Retry-After, written without blocking, and the connection closed."""
        try:
            sock.setblocking(False)
            sock.send(_simple_response(503, "Service Unavailable",
                                       f"server overloaded ({why}); retry later",
                                       (("Retry-After", str(self.limits.retry_after_s)),)))
        except OSError:
            pass
        log.debug("REST shed a request: %s", why)
        self._close_socket(sock)

    def _close_socket(self, sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass

    def _readable(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            if connection.handshaking:
                sock.do_handshake()
                connection.handshaking = False
            chunks = [sock.recv(65536)]
            while chunks[-1] and isinstance(sock, ssl.SSLSocket) and sock.pending():
                chunks.append(sock.recv(65536))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except (OSError, ssl.SSLError) as error:
            log.debug("REST connection from %s failed: %s", connection.address, error)
            self._drop(connection)
            return
        data = b"".join(chunks)
        if not data:   # the client closed its side
            self._drop(connection)
            return
        now = time.monotonic()
        connection.last_active = now
        if connection.started is None:
            connection.started = now
        connection.buffer += data
        self._maybe_dispatch(connection)

    def _maybe_dispatch(self, connection: _Connection) -> None:
        if connection.whole_request(self.max_request_bytes):
            self._dispatch(connection)
        elif len(connection.buffer) > _MAX_HEADER_BYTES and \
                connection.buffer.find(_HEADER_END) < 0:
            self._answer_and_drop(connection, _simple_response(
                431, "Request Header Fields Too Large",
                f"request headers exceed {_MAX_HEADER_BYTES} bytes"))

    def _dispatch(self, connection: _Connection) -> None:
        self._selector.unregister(connection.sock)
        del self._connections[connection.sock.fileno()]
        with self._open_lock:
            full = self._in_flight >= self.limits.workers + self.limits.max_queued
            if full:
                self._open -= 1
            else:
                self._in_flight += 1
        if full:
            self._shed(connection.sock, "all workers busy")
            return
        self._work.put(connection)

    def _resume(self, connection: _Connection) -> None:
        """A connection back from a worker, its answer written: wait for its next request
        (already whole when the client pipelined it)."""
        if self._stopping.is_set():
            self._drop(connection, registered=False)
            return
        connection.started = time.monotonic() if connection.buffer else None
        connection.last_active = time.monotonic()
        self._connections[connection.sock.fileno()] = connection
        self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        self._maybe_dispatch(connection)

    def _sweep(self, now: float) -> None:
        """408 for requests not whole in time; idle keep-alive connections closed."""
        for connection in list(self._connections.values()):
            if connection.started is not None:
                if now - connection.started > self.limits.read_timeout_s:
                    log.info("REST client %s sent no whole request in %gs: 408",
                             connection.address[0], self.limits.read_timeout_s)
                    self._answer_and_drop(connection, _simple_response(
                        408, "Request Timeout", "request not received within "
                        f"{self.limits.read_timeout_s:g} s"))
            elif now - connection.last_active > self.limits.idle_timeout_s:
                self._drop(connection)

    def _answer_and_drop(self, connection: _Connection, response: bytes) -> None:
        try:
            if not connection.handshaking:
                connection.sock.send(response)
        except (OSError, ssl.SSLError):
            pass
        self._drop(connection)

    def _drop(self, connection: _Connection, registered: bool = True) -> None:
        if registered:
            self._selector.unregister(connection.sock)
            del self._connections[connection.sock.fileno()]
        self._close_socket(connection.sock)
        with self._open_lock:
            self._open -= 1

    # --- the workers -----------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            connection = self._work.get()
            if connection is None:
                return
            keep = self._serve(connection)
            with self._open_lock:
                self._in_flight -= 1
                if not keep:
                    self._open -= 1
            if keep:
                self._returned.append(connection)
                self._wake()
            else:
                self._close_socket(connection.sock)

    def _serve(self, connection: _Connection) -> bool:
        """Runs the handler on one buffered request; True when the connection stays open."""
        sock = connection.sock
        sock.settimeout(self.limits.read_timeout_s)   # bounds writes (and any drain)
        handler_request = _HandlerRequest(self, connection)
        try:
            handler = self.handler_class(sock, connection.address, handler_request)
        except DISCONNECTS as error:
            log.info("REST client %s went away before its answer was sent (%s)",
                     connection.address[0], type(error).__name__)
            return False
        except (socket.timeout, ssl.SSLError, OSError) as error:
            log.info("REST connection from %s ended: %s", connection.address[0], error)
            return False
        except Exception:   # a bug in a handler costs its connection, never the server
            log.exception("REST request from %s failed", connection.address[0])
            return False
        if handler.close_connection:
            return False
        connection.buffer = bytearray(handler.reader.leftover())
        sock.setblocking(False)
        return True


class _HandlerRequest:
    """What a handler sees as `self.server`: the server's attributes plus the bytes of the
    request it is to serve."""

    def __init__(self, server: BoundedHTTPServer, connection: _Connection) -> None:
        self._server = server
        self.pending_bytes = connection.buffer

    def __getattr__(self, name: str):
        return getattr(self._server, name)
