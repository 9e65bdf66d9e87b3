"""`fer-review`: a person decides the faces the ensemble could not, in a browser.

    fer-review [serve] --queue DIR [--host 127.0.0.1] [--port 8502]
    fer-review status  --queue DIR
    fer-review export  --queue DIR --out reviewed.csv [--ferplus-votes votes.csv]

`serve` shows the oldest pending face of the review queue (serving/review_queue.py) large,
each model's saliency overlay for its own top class, both models' top-3 answers as bars
(English and Spanish names) and the ensemble's reason; the reviewer picks a class (click
or keys 0-6; 0-7 when the face's models are FER+'s, with contempt), "not a face" (n) or
"skip" (s), and can undo their last decision (u or Backspace). `export` writes the
labelled faces as FER-2013 training rows for the next
`fer-pipeline run --data original.csv --data reviewed.csv`; answers `contempt` need
`--ferplus-votes votes.csv` too (serving/review_export.py). DIR defaults to
$FER_REVIEW_QUEUE.

Safe by default: binds 127.0.0.1 and, on a loopback address, answers only requests whose
Host header names it (a page on another site cannot reach the app through DNS rebinding);
every POST needs the session cookie and the session's token in the X-CSRF-Token header
with a JSON body; items are addressed by integer id and model name checked against the
queue, never by a path; a bad request gets a 4xx JSON error and the server keeps serving.
The page, its script and its style are package data (serving/review_page/: index.html,
review.css, review.js), filled in by serving/review_render.py and served by this module
(no build step, nothing loaded from elsewhere).
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import threading
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn, Optional

from fer_pipeline.core import quiet
from fer_pipeline.core.contract import REVIEW_QUEUE_FILE
from fer_pipeline.core.errors import exit_process, run_cli, MissingInputError
from fer_pipeline.serving.review_queue import (STATUS_LABELED, STATUS_NOT_FACE, STATUS_PENDING,
                                               STATUS_SKIPPED, ReviewError, ReviewItem,
                                               ReviewQueue)
from fer_pipeline.serving.review_render import (STATIC, classes_json, item_json, page_html,
                                                state_json)
from fer_pipeline.serving.saliency import face_png, overlay_png

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "FACE_SCALE", "MAX_BODY_BYTES", "MAX_SESSIONS",
           "OVERLAY_SCALE", "QUEUE_ENV", "SESSION_COOKIE", "TOKEN_HEADER", "HttpError",
           "ReviewHandler", "ReviewServer", "classes_json", "entry_point", "item_json", "main",
           "open_queue", "parse_args", "serve", "state_json", "status_line"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8502                 # beside fer-serve's 8500 (gRPC) and 8501 (REST)
QUEUE_ENV = "FER_REVIEW_QUEUE"
FACE_SCALE = 8                      # 48 px -> 384 px
OVERLAY_SCALE = 5                   # 48 px -> 240 px
MAX_BODY_BYTES = 4096               # a decision is a few dozen bytes of JSON
SESSION_COOKIE = "fer_review_session"
# Every page load without a cookie starts a session; the oldest are forgotten beyond this
# (their pages then get 403 on the next decision and a reload starts afresh).
MAX_SESSIONS = 1000
TOKEN_HEADER = "X-CSRF-Token"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ERROR_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409}

_ROUTES = [
    ("GET", re.compile(r"^/$"), "page"),
    ("GET", re.compile(r"^/static/(?P<name>review\.(?:js|css))$"), "static"),
    ("GET", re.compile(r"^/api/next$"), "next"),
    ("GET", re.compile(r"^/api/items/(?P<id>\d{1,12})/face\.png$"), "face"),
    ("GET", re.compile(r"^/api/items/(?P<id>\d{1,12})/saliency/(?P<model>[A-Za-z0-9_-]{1,64})"
                       r"/(?P<class_id>\d)\.png$"), "overlay"),
    ("POST", re.compile(r"^/api/items/(?P<id>\d{1,12})/decision$"), "decide"),
    ("POST", re.compile(r"^/api/undo$"), "undo"),
]


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the server --------------------------------------------------------------------------

class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], queue: ReviewQueue) -> None:
        super().__init__(address, ReviewHandler)
        self.queue = queue
        self.sessions: dict[str, str] = {}           # session id -> CSRF token
        self.sessions_lock = threading.Lock()
        port = self.server_address[1]
        # On loopback, only our own names are acceptable Host headers (DNS rebinding);
        # bound elsewhere on purpose, the operator chose who may connect.
        self.allowed_hosts: Optional[set[str]] = None
        if address[0] in _LOOPBACK:
            self.allowed_hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost")}
            self.allowed_hosts.add(f"[::1]:{port}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def new_session(self) -> tuple[str, str]:
        session, token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        with self.sessions_lock:
            self.sessions[session] = token
            while len(self.sessions) > MAX_SESSIONS:
                del self.sessions[next(iter(self.sessions))]   # dicts keep insertion order
        return session, token

    def token_for(self, session: Optional[str]) -> Optional[str]:
        if not session:
            return None
        with self.sessions_lock:
            return self.sessions.get(session)


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"
    server_version = "fer-review"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib's signature
        log.debug("%s " + format, self.address_string(), *args)

    # --- plumbing ------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self'; frame-ancestors 'none'; "
                         "form-action 'none'; base-uri 'none'")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _dispatch(self) -> None:
        self._body_read = False   # one handler object serves every request of a connection
        try:
            self._check_host()
            path = self.path.split("?", 1)[0]
            for method, pattern, action in _ROUTES:
                match = pattern.match(path)
                if match and method == self.command:
                    getattr(self, f"_{action}")(**match.groupdict())
                    return
                if match:
                    raise HttpError(405, f"{self.command} is not allowed on {path}")
            raise HttpError(404, f"no such page: {path}")
        except HttpError as error:
            self._discard_unread_body()
            self._json(error.status, {"error": error.message})
        except ReviewError as error:
            self._json(_ERROR_STATUS.get(error.kind, 400), {"error": str(error)})
        except sqlite3.Error as error:   # e.g. the disk is full: say so, keep serving
            log.error("review queue error: %s", error)
            self._json(503, {"error": f"review queue unavailable: {error}"})
        except Exception as error:  # a bug must cost one 500, not the server
            log.exception("%s %s failed", self.command, self.path)
            self._json(500, {"error": f"{type(error).__name__}: {error}"})

    do_GET = do_POST = _dispatch

    def do_PUT(self) -> None:
        self._body_read = False
        self._discard_unread_body()
        self._json(405, {"error": "method not allowed"})

    do_DELETE = do_PATCH = do_PUT

    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and self.headers.get("Host", "") not in allowed:
            raise HttpError(421, "this review app only answers requests for "
                                 f"{sorted(allowed)[0]}")

    def _discard_unread_body(self) -> None:
        # Keep-alive: an unread request body would be parsed as the next request.
        if self._body_read or self.command not in ("POST", "PUT", "PATCH"):
            return
        self.close_connection = True

    def _session(self) -> Optional[str]:
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return None
        morsel = cookie.get(SESSION_COOKIE)
        return morsel.value if morsel else None

    def _authorized_session(self) -> str:
        """The session of a state-changing request, after checking its CSRF token."""
        session = self._session()
        expected = self.server.token_for(session)
        given = self.headers.get(TOKEN_HEADER, "")
        if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
            raise HttpError(403, "missing or wrong session token; reload the page")
        return session

    def _json_body(self) -> dict[str, Any]:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise HttpError(415, "the body must be application/json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length header")
        if length < 0 or length > MAX_BODY_BYTES:
            raise HttpError(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    def _item(self, item_id: str) -> ReviewItem:
        return self.server.queue.get(int(item_id))

    # --- pages and images ----------------------------------------------------------

    def _page(self) -> None:
        session = self._session()
        token = self.server.token_for(session)
        headers = {}
        if token is None:
            session, token = self.server.new_session()
            headers["Set-Cookie"] = (f"{SESSION_COOKIE}={session}; HttpOnly; "
                                     "SameSite=Strict; Path=/")
        page = page_html(token, os.path.dirname(self.server.queue.path))
        self._send(200, page.encode(), "text/html; charset=utf-8", headers)

    def _static(self, name: str) -> None:
        body, content_type = STATIC[name]
        self._send(200, body.encode(), content_type)

    def _next(self) -> None:
        self._json(200, state_json(self.server.queue, self._session() or ""))

    def _face(self, id: str) -> None:  # noqa: A002 - the route's group name
        self._send(200, face_png(self._item(id).pixels, FACE_SCALE), "image/png")

    def _overlay(self, id: str, model: str, class_id: str) -> None:  # noqa: A002
        item = self._item(id)
        prediction = item.models.get(model)
        if prediction is None:
            raise HttpError(404, f"review item {item.id} has no model {model!r}")
        if prediction.saliency is None:
            raise HttpError(404, f"model {model!r} gave no saliency for item {item.id}")
        class_index = int(class_id)
        if class_index >= len(prediction.saliency):     # 7 maps, or a FER+ model's 8
            raise HttpError(404, f"no class {class_index}")
        self._send(200, overlay_png(item.pixels, prediction.saliency[class_index],
                                    OVERLAY_SCALE), "image/png")

    # --- decisions -----------------------------------------------------------------

    def _decide(self, id: str) -> None:  # noqa: A002
        session = self._authorized_session()
        body = self._json_body()
        action = body.get("action")
        label = body.get("class_id") if action == "label" else None
        self.server.queue.decide(int(id), action, label, session=session)
        self._json(200, state_json(self.server.queue, session))

    def _undo(self) -> None:
        session = self._authorized_session()
        self._json_body()
        undone = self.server.queue.undo(session)
        item = self.server.queue.get(undone) if undone is not None else None
        payload = state_json(self.server.queue, session, item)
        payload["undone"] = undone
        self._json(200, payload)


# --- command line --------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fer-review", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="{serve,status,export}")
    default_queue = os.environ.get(QUEUE_ENV) or None

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--queue", metavar="DIR", default=default_queue,
                         required=default_queue is None,
                         help=f"the review queue directory (default: ${QUEUE_ENV})")
        return sub

    serve = add("serve", "serve the review page (the default command)")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help="address to bind; anything but loopback exposes the queue")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    add("status", "print how many faces wait for review")
    export = add("export", "write the labelled faces as a FER-2013 CSV (Usage=Training)")
    export.add_argument("--out", required=True, help="CSV file to write")
    export.add_argument("--ferplus-votes", metavar="FILE",
                        help="also write FER+ votes (fer2013new.csv's columns), row for row "
                             "with --out: needed when a face was answered contempt; train "
                             "with --ferplus-labels FILE and ingest.ferplus_classes 8")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "status", "export", "-h", "--help"):
        argv.insert(0, "serve")
    return parser.parse_args(argv)


def open_queue(directory: str) -> ReviewQueue:
    """The existing queue in `directory`; a missing one is an error, not a new empty queue
    (a mistyped directory must not look like "nothing to review")."""
    if not os.path.isfile(os.path.join(directory, REVIEW_QUEUE_FILE)):
        raise MissingInputError(f"no review queue in {directory} (fer-client --review-queue "
                                f"{directory} creates it)")
    return ReviewQueue(directory)


def status_line(queue: ReviewQueue, directory: str) -> str:
    counts = queue.counts()
    return (f"{counts[STATUS_PENDING]} face(s) waiting for review in {directory} "
            f"(labelled {counts[STATUS_LABELED]}, not a face {counts[STATUS_NOT_FACE]}, "
            f"skipped {counts[STATUS_SKIPPED]})")


def serve(queue: ReviewQueue, host: str, port: int) -> ReviewServer:
    """A started-later server for `queue` (tests use port 0 and serve_forever in a thread)."""
    return ReviewServer((host, port), queue)


def main(argv: Optional[list[str]] = None) -> int:
    """`fer-review`: a mistake in one line, a bug in one line with where its traceback is."""
    return run_cli("fer-review", _main, argv)


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        queue = open_queue(args.queue)
    except (OSError, sqlite3.Error, RuntimeError) as error:
        print(f"fer-review: {error}", file=sys.stderr)
        return 2
    with queue:
        if args.command == "status":
            print(f"fer-review: {status_line(queue, args.queue)}")
            return 0
        if args.command == "export":
            try:
                count = queue.export_csv(args.out, args.ferplus_votes)
            except OSError as error:
                print(f"fer-review: cannot write {args.out}: {error}", file=sys.stderr)
                return 2
            except ReviewError as error:
                print(f"fer-review: {error}", file=sys.stderr)
                return 2
            votes = f" and their FER+ votes to {args.ferplus_votes}" if args.ferplus_votes else ""
            print(f"fer-review: {count} reviewed face(s) written to {args.out} "
                  f"(emotion,pixels,Usage; Usage=Training){votes}")
            return 0
        try:
            server = serve(queue, args.host, args.port)
        except OSError as error:
            print(f"fer-review: cannot listen on {args.host}:{args.port}: {error}",
                  file=sys.stderr)
            return 2
        if args.host not in _LOOPBACK:
            print(f"fer-review: listening on {args.host}: anyone who can reach this address "
                  "can label faces", file=sys.stderr)
        print(f"fer-review: {status_line(queue, args.queue)}")
        print(f"fer-review: open {server.url} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def entry_point() -> NoReturn:
    """The `fer-review` console script (fer_pipeline.core.errors.exit_process says why it ends so)."""
    quiet.install()  # before TensorFlow loads (none is imported above)
    exit_process(main())


if __name__ == "__main__":
    entry_point()
