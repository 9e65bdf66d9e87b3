"""`fer-review`: a person decides the faces the ensemble could not, in a browser.

    fer-review [serve] --queue DIR [--host 127.0.0.1] [--port 8502]
    fer-review status  --queue DIR
    fer-review export  --queue DIR --out reviewed.csv

`serve` shows the oldest pending face of the review queue (serving/review_queue.py) large,
each model's saliency overlay for its own top class, both models' top-3 answers as bars
(English and Spanish names) and the ensemble's reason; the reviewer picks a class (click
or keys 0-6), "not a face" (n) or "skip" (s), and can undo their last decision (u or
Backspace). `export` writes the labelled faces as FER-2013 training rows for the next
`fer-pipeline run --data original.csv --data reviewed.csv`. DIR defaults to
$FER_REVIEW_QUEUE.

Safe by default: binds 127.0.0.1 and, on a loopback address, answers only requests whose
Host header names it (a page on another site cannot reach the app through DNS rebinding);
every POST needs the session cookie and the session's token in the X-CSRF-Token header
with a JSON body; items are addressed by integer id and model name checked against the
queue, never by a path; a bad request gets a 4xx JSON error and the server keeps serving.
The page, its script and its style are served from this module (no build step, nothing
loaded from elsewhere).
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

from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES, REVIEW_QUEUE_FILE
from fer_pipeline.core.errors import exit_process, run_cli
from fer_pipeline.serving.review_queue import (STATUS_LABELED, STATUS_NOT_FACE, STATUS_PENDING,
                                  STATUS_SKIPPED, ReviewError, ReviewItem, ReviewQueue)
from fer_pipeline.serving.saliency import face_png, overlay_png, top_classes

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


# --- what the page shows -----------------------------------------------------------------

def classes_json() -> list[dict[str, Any]]:
    return [{"id": i, "en": en, "es": es}
            for i, (en, es) in enumerate(zip(CLASS_NAMES, CLASS_NAMES_ES))]


def item_json(item: ReviewItem) -> dict[str, Any]:
    """One face as the page needs it: image URLs, each model's top 3, the ensemble's view."""
    models = []
    for name, prediction in item.models.items():
        top3 = top_classes(prediction.probabilities, 3)
        models.append({
            "name": name,
            "version": prediction.version,
            "top3": [{"class_id": c, "en": CLASS_NAMES[c], "es": CLASS_NAMES_ES[c],
                      "probability": round(p, 4)} for c, p in top3],
            "saliency_url": (f"/api/items/{item.id}/saliency/{name}/{top3[0][0]}.png"
                             if prediction.saliency is not None else None),
        })
    decision = item.decision
    return {
        "id": item.id,
        "source": item.source,
        "created_at": item.created_at,
        "status": item.status,
        "face_url": f"/api/items/{item.id}/face.png",
        "models": models,
        "ensemble": {key: decision.get(key) for key in
                     ("class_name", "class_name_es", "confidence", "winner", "reason")},
    }


def state_json(queue: ReviewQueue, session: str,
               item: Optional[ReviewItem] = None) -> dict[str, Any]:
    """What the page renders: the face to decide now (or null), the counts, undo or not."""
    item = item if item is not None else queue.next_pending()
    counts = queue.counts()
    return {"item": item_json(item) if item else None, "counts": counts,
            "left": counts[STATUS_PENDING], "can_undo": queue.can_undo(session)}


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
        page = _PAGE.replace("{{TOKEN}}", token).replace("{{QUEUE}}", _html_escape(
            os.path.dirname(self.server.queue.path)))
        self._send(200, page.encode(), "text/html; charset=utf-8", headers)

    def _static(self, name: str) -> None:
        body, content_type = _STATIC[name]
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
        if class_index >= len(CLASS_NAMES):
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


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


# --- the page ------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{{TOKEN}}">
<title>FER review</title>
<link rel="stylesheet" href="/static/review.css">
<script src="/static/review.js" defer></script>
</head>
<body>
<header>
  <h1>FER review <span class="sub">revisi&oacute;n humana</span></h1>
  <div id="counts" aria-live="polite"></div>
</header>
<main id="work" hidden>
  <section class="face">
    <img id="face" alt="the face to decide" width="384" height="384">
    <p id="source"></p>
    <p id="reason"></p>
  </section>
  <section id="models" class="models"></section>
</main>
<section id="done" hidden>
  <h2>Nothing left to review.</h2>
  <p>Write the decided faces as training data:</p>
  <pre>fer-review export --queue {{QUEUE}} --out reviewed.csv</pre>
</section>
<nav id="actions">
  <div id="classes" class="classes"></div>
  <div class="other">
    <button id="not_face" data-action="not_face"><kbd>n</kbd> not a face</button>
    <button id="skip" data-action="skip"><kbd>s</kbd> skip</button>
    <button id="undo"><kbd>u</kbd> undo</button>
  </div>
  <p id="message" role="status"></p>
</nav>
</body>
</html>
"""

_CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d232b; --muted: #66707c; --accent: #2f6fde;
        --bar: #c9d8f5; --line: #dde1e6; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       background: var(--bg); color: var(--ink); }
header { display: flex; align-items: baseline; justify-content: space-between;
         padding: 12px 24px; background: var(--card); border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0; }
h1 .sub { color: var(--muted); font-weight: normal; font-size: 15px; margin-left: 8px; }
#counts { color: var(--muted); }
#counts b { color: var(--ink); font-size: 18px; }
main { display: flex; gap: 24px; padding: 20px 24px 8px; align-items: flex-start;
       flex-wrap: wrap; }
.face { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 12px; width: 410px; }
.face img { width: 384px; height: 384px; image-rendering: pixelated; display: block;
            border-radius: 4px; background: #000; }
#source { font-family: ui-monospace, monospace; font-size: 12px; color: var(--muted);
          word-break: break-all; margin: 8px 0 2px; }
#reason { font-size: 13px; margin: 4px 0 0; }
.models { display: flex; gap: 16px; flex-wrap: wrap; }
.model { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
         padding: 12px; width: 266px; }
.model h2 { font-size: 16px; margin: 0 0 8px; }
.model h2 .version { color: var(--muted); font-weight: normal; font-size: 13px; }
.model img, .model .nomap { width: 240px; height: 240px; image-rendering: pixelated;
                            display: block; border-radius: 4px; }
.model .nomap { display: flex; align-items: center; justify-content: center;
                background: #eceef1; color: var(--muted); font-size: 13px; }
.caption { font-size: 12px; color: var(--muted); margin: 4px 0 8px; }
.bar { position: relative; height: 24px; margin: 4px 0; background: #eef1f5;
       border-radius: 4px; overflow: hidden; }
.bar .fill { position: absolute; inset: 0 auto 0 0; background: var(--bar); }
.bar .label { position: relative; padding: 0 8px; line-height: 24px; font-size: 13px;
              display: flex; justify-content: space-between; }
.bar.top .fill { background: #9dbcf0; }
nav { padding: 8px 24px 24px; }
.classes { display: grid; grid-template-columns: repeat(7, minmax(0, 1fr)); gap: 8px; }
.other { display: flex; gap: 8px; margin-top: 8px; }
button { font: inherit; padding: 10px 8px; border: 1px solid var(--line); border-radius: 6px;
         background: var(--card); color: var(--ink); cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--accent); }
button:disabled { opacity: .45; cursor: default; }
.classes button { display: flex; flex-direction: column; align-items: center; }
.classes button .es { color: var(--muted); font-size: 12px; }
kbd { font-family: ui-monospace, monospace; font-size: 12px; border: 1px solid var(--line);
      border-radius: 3px; padding: 0 4px; margin-right: 4px; background: #f7f8fa; }
#message { min-height: 20px; color: #b3261e; margin: 8px 0 0; }
#done { padding: 40px 24px; }
#done pre { background: var(--card); border: 1px solid var(--line); padding: 12px;
            display: inline-block; }
"""

_JS = r"""
"use strict";
const CLASSES = %CLASSES%;
const token = document.querySelector('meta[name="csrf-token"]').content;
let current = null;
let busy = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function percent(p) { return (100 * p).toFixed(0) + " %"; }

function modelCard(model) {
  const card = el("article", {class: "model", "data-model": model.name});
  card.append(el("h2", {}, model.name + " ", el("span", {class: "version"},
                 model.version === null ? "" : "v" + model.version)));
  const top = model.top3[0];
  if (model.saliency_url) {
    card.append(el("img", {src: model.saliency_url, width: 240, height: 240,
                           alt: model.name + " saliency for " + top.en}));
    card.append(el("p", {class: "caption"}, "where " + model.name + " saw " + top.en +
                   " / " + top.es));
  } else {
    card.append(el("div", {class: "nomap"}, "no saliency from this model"));
    card.append(el("p", {class: "caption"}, ""));
  }
  model.top3.forEach((entry, rank) => {
    const bar = el("div", {class: rank === 0 ? "bar top" : "bar",
                           title: entry.en + " / " + entry.es});
    const fill = el("div", {class: "fill"});
    fill.style.width = (100 * entry.probability).toFixed(1) + "%";
    bar.append(fill, el("div", {class: "label"},
               el("span", {}, entry.class_id + " " + entry.en + " / " + entry.es),
               el("span", {}, percent(entry.probability))));
    card.append(bar);
  });
  return card;
}

function render(state) {
  current = state.item;
  const c = state.counts;
  const counts = document.getElementById("counts");
  counts.replaceChildren(el("b", {id: "left"}, state.left), " left \u00b7 " + c.labeled +
      " labelled \u00b7 " + c.not_face + " not a face \u00b7 " + c.skipped + " skipped");
  document.getElementById("work").hidden = !current;
  document.getElementById("done").hidden = !!current;
  document.querySelectorAll("#classes button, #not_face, #skip").forEach(
      b => { b.disabled = !current; });
  document.getElementById("undo").disabled = !state.can_undo;
  if (!current) return;
  document.getElementById("face").src = current.face_url;
  document.getElementById("face").dataset.item = current.id;
  document.getElementById("source").textContent = "#" + current.id + " \u00b7 " +
      current.source + " \u00b7 " + current.created_at;
  document.getElementById("reason").textContent = current.ensemble.reason || "";
  document.getElementById("models").replaceChildren(...current.models.map(modelCard));
}

async function call(method, url, body) {
  if (busy) return;
  busy = true;
  document.getElementById("message").textContent = "";
  try {
    const options = {method, headers: {}, credentials: "same-origin"};
    if (method === "POST") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = token;
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(url, options);
    const payload = await response.json();
    if (!response.ok) {
      document.getElementById("message").textContent = payload.error || response.statusText;
      if (response.status === 409 || response.status === 404) {
        busy = false;
        return call("GET", "/api/next");   // the page was stale: show what is pending now
      }
      return;
    }
    render(payload);
  } catch (error) {
    document.getElementById("message").textContent = "cannot reach fer-review: " + error;
  } finally {
    busy = false;
  }
}

function decide(action, classId) {
  if (!current) return;
  const body = {action};
  if (action === "label") body.class_id = classId;
  call("POST", "/api/items/" + current.id + "/decision", body);
}

function undo() { call("POST", "/api/undo", {}); }

function buildButtons() {
  const box = document.getElementById("classes");
  for (const c of CLASSES) {
    const button = el("button", {"data-class": c.id, title: "key " + c.id},
                      el("span", {}, el("kbd", {}, c.id), c.en), el("span", {class: "es"}, c.es));
    button.addEventListener("click", () => decide("label", c.id));
    box.append(button);
  }
  document.getElementById("not_face").addEventListener("click", () => decide("not_face"));
  document.getElementById("skip").addEventListener("click", () => decide("skip"));
  document.getElementById("undo").addEventListener("click", undo);
}

document.addEventListener("keydown", event => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (/^[0-6]$/.test(event.key)) { decide("label", Number(event.key)); }
  else if (event.key === "n") { decide("not_face"); }
  else if (event.key === "s") { decide("skip"); }
  else if (event.key === "u" || event.key === "Backspace") { undo(); }
  else return;
  event.preventDefault();
});

buildButtons();
call("GET", "/api/next");
""".replace("%CLASSES%", json.dumps(classes_json()))

_STATIC = {"review.js": (_JS, "text/javascript; charset=utf-8"),
           "review.css": (_CSS, "text/css; charset=utf-8")}


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "status", "export", "-h", "--help"):
        argv.insert(0, "serve")
    return parser.parse_args(argv)


def open_queue(directory: str) -> ReviewQueue:
    """The existing queue in `directory`; a missing one is an error, not a new empty queue
    (a mistyped directory must not look like "nothing to review")."""
    if not os.path.isfile(os.path.join(directory, REVIEW_QUEUE_FILE)):
        raise FileNotFoundError(f"no review queue in {directory} (fer-client --review-queue "
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
                count = queue.export_csv(args.out)
            except OSError as error:
                print(f"fer-review: cannot write {args.out}: {error}", file=sys.stderr)
                return 2
            print(f"fer-review: {count} reviewed face(s) written to {args.out} "
                  "(emotion,pixels,Usage; Usage=Training)")
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
    exit_process(main())


if __name__ == "__main__":
    entry_point()
