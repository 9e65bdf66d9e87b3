"""fer-review: the HTTP API and its defences, the CLI, the export re-ingesting cleanly, and
the page driven end to end in headless Chromium (labels by click and key, undo, export)."""
from __future__ import annotations

import csv
import http.client
import json
import os
import re
import threading

import cv2
import numpy as np
import pytest

from fer_pipeline.pipeline.synthetic import draw_faces
from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES, IMAGE_SIZE, NUM_CLASSES
from fer_pipeline.serving import review_app
from fer_pipeline.serving.review_queue import (STATUS_LABELED, STATUS_PENDING, ModelPrediction,
                                  ReviewQueue)
from tests.browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip


def blob_maps(seed: int) -> np.ndarray:
    """Per-class maps in [0, 1]: one Gaussian spot per class at a seeded place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    maps = []
    for _ in range(NUM_CLASSES):
        cy, cx = rng.uniform(10, 38, 2)
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0))
    return np.array(maps, np.float32)


def faces(count: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return draw_faces(np.arange(count) % NUM_CLASSES, rng)


def fill_queue(directory: str, count: int) -> ReviewQueue:
    """A queue of `count` drawn faces on which 'cnn' and 'vgg16' disagree narrowly."""
    queue = ReviewQueue(directory)
    rng = np.random.default_rng(0)
    for index, pixels in enumerate(faces(count)):
        models = {}
        for offset, (name, version) in enumerate((("cnn", 3), ("vgg16", 7))):
            probs = rng.dirichlet(np.ones(NUM_CLASSES) * 0.5)
            models[name] = ModelPrediction(version, probs, blob_maps(10 * index + offset))
        queue.record(pixels, f"fer2013.csv:{index + 2}", models,
                     {"class_id": 3, "class_name": "happy", "class_name_es": "Felicidad",
                      "confidence": 0.41, "winner": "cnn", "needs_human_review": True,
                      "reason": "models disagree (cnn: happy 0.410, vgg16: sad 0.400); "
                                "gap 0.010 <= tolerance 0.050: human review"})
    return queue


class Running:
    """A ReviewServer on a free loopback port, served from a thread."""

    def __init__(self, queue: ReviewQueue) -> None:
        self.queue = queue
        self.server = review_app.serve(queue, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.queue.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def session(self) -> tuple[str, str]:
        """(cookie header, CSRF token) as the browser gets them from the page."""
        status, headers, body = self.request("GET", "/")
        assert status == 200
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        token = re.search(rb'name="csrf-token" content="([^"]+)"', body).group(1).decode()
        return cookie, token

    def post(self, path: str, payload, cookie: str = "", token: str = "",
             content_type: str = "application/json") -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": content_type}
        if cookie:
            headers["Cookie"] = cookie
        if token:
            headers["X-CSRF-Token"] = token
        status, _, reply = self.request("POST", path, body, headers)
        return status, json.loads(reply)


@pytest.fixture
def app(tmp_path):
    running = Running(fill_queue(str(tmp_path / "queue"), 4))
    yield running
    running.stop()


# --- the HTTP API ---------------------------------------------------------------------------

def test_page_sets_a_session_and_the_api_describes_the_next_face(app):
    status, headers, body = app.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b'name="csrf-token"' in body

    status, _, body = app.request("GET", "/api/next")
    state = json.loads(body)
    assert status == 200 and state["left"] == 4 and state["can_undo"] is False
    item = state["item"]
    assert item["id"] == 1 and item["source"] == "fer2013.csv:2"
    assert [m["name"] for m in item["models"]] == ["cnn", "vgg16"]
    stored = app.queue.get(1).models
    for model in item["models"]:
        probs = stored[model["name"]].probabilities
        assert [e["class_id"] for e in model["top3"]] == list(np.argsort(-probs)[:3])
        assert all(e["en"] == CLASS_NAMES[e["class_id"]] and
                   e["es"] == CLASS_NAMES_ES[e["class_id"]] for e in model["top3"])
        top = model["top3"][0]["class_id"]
        assert model["saliency_url"] == f"/api/items/1/saliency/{model['name']}/{top}.png"


def test_images_are_served_by_item_id_as_png(app):
    status, headers, body = app.request("GET", "/api/items/2/face.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    scale = review_app.FACE_SCALE
    # Nearest-neighbour: every original pixel is a scale x scale square.
    np.testing.assert_array_equal(image, np.kron(app.queue.get(2).pixels,
                                                 np.ones((scale, scale), np.uint8)))
    status, _, body = app.request("GET", "/api/items/2/saliency/vgg16/4.png")
    overlay = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and overlay.shape == (240, 240, 3)
    status, _, other = app.request("GET", "/api/items/2/saliency/vgg16/5.png")
    assert status == 200 and other != body      # each class has its own map


@pytest.mark.parametrize("path,status", [
    ("/api/items/999/face.png", 404),
    ("/api/items/abc/face.png", 404),
    ("/api/items/1/saliency/resnet/3.png", 404),
    ("/api/items/1/saliency/cnn/9.png", 404),
    ("/api/items/1/../../../../etc/passwd", 404),
    ("/static/../review_app.py", 404),
    ("/static/%2e%2e/review_app.py", 404),
    ("/api/items/99999999999999999999/face.png", 404),
    ("/api/undo", 405),
])
def test_bad_reads_get_a_4xx_json_error(app, path, status):
    got, headers, body = app.request("GET", path)
    assert got == status and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]
    assert app.request("GET", "/api/next")[0] == 200   # still serving


def test_posts_need_the_session_token(app):
    cookie, token = app.session()
    assert app.post("/api/items/1/decision", {"action": "skip"})[0] == 403
    assert app.post("/api/items/1/decision", {"action": "skip"}, cookie=cookie)[0] == 403
    assert app.post("/api/items/1/decision", {"action": "skip"}, cookie=cookie,
                    token="forged")[0] == 403
    _, other_token = app.session()   # another session's token does not fit this cookie
    assert app.post("/api/items/1/decision", {"action": "skip"}, cookie=cookie,
                    token=other_token)[0] == 403
    assert app.queue.get(1).status == STATUS_PENDING
    status, state = app.post("/api/items/1/decision", {"action": "label", "class_id": 2},
                             cookie=cookie, token=token)
    assert status == 200 and state["item"]["id"] == 2 and state["can_undo"] is True
    assert app.queue.get(1).label == 2


@pytest.mark.parametrize("payload,content_type,status", [
    ({"action": "label", "class_id": 7}, "application/json", 400),
    ({"action": "label", "class_id": "3"}, "application/json", 400),
    ({"action": "label"}, "application/json", 400),
    ({"action": "delete"}, "application/json", 400),
    (b"{not json", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b"action=skip", "application/x-www-form-urlencoded", 415),
    (b"x" * (review_app.MAX_BODY_BYTES + 1), "application/json", 413),
])
def test_bad_decisions_get_a_4xx_and_change_nothing(app, payload, content_type, status):
    cookie, token = app.session()
    got, body = app.post("/api/items/1/decision", payload, cookie, token, content_type)
    assert got == status and body["error"]
    assert app.queue.counts()[STATUS_PENDING] == 4
    assert app.request("GET", "/api/next")[0] == 200


def test_sessions_are_bounded_and_the_oldest_is_forgotten(app, monkeypatch):
    monkeypatch.setattr(review_app, "MAX_SESSIONS", 3)
    first_cookie, first_token = app.session()
    for _ in range(3):
        app.session()
    assert len(app.server.sessions) == 3
    assert app.post("/api/items/1/decision", {"action": "skip"}, first_cookie,
                    first_token)[0] == 403


def test_unknown_items_stale_pages_and_foreign_hosts_are_refused(app):
    cookie, token = app.session()
    assert app.post("/api/items/77/decision", {"action": "skip"}, cookie, token)[0] == 404
    assert app.post("/api/items/1/decision", {"action": "skip"}, cookie, token)[0] == 200
    status, body = app.post("/api/items/1/decision", {"action": "skip"}, cookie, token)
    assert status == 409 and "already skipped" in body["error"]
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host.
    status, _, _ = app.request("GET", "/api/next", headers={"Host": f"evil.example:{app.port}"})
    assert status == 421
    assert app.request("GET", "/api/next", headers={"Host": f"localhost:{app.port}"})[0] == 200


def test_undo_returns_the_face_it_put_back(app):
    cookie, token = app.session()
    app.post("/api/items/1/decision", {"action": "label", "class_id": 0}, cookie, token)
    app.post("/api/items/2/decision", {"action": "not_face"}, cookie, token)
    status, state = app.post("/api/undo", {}, cookie, token)
    assert status == 200 and state["undone"] == 2 and state["item"]["id"] == 2
    assert state["left"] == 3
    # Another session has nothing of its own to undo.
    other_cookie, other_token = app.session()
    status, state = app.post("/api/undo", {}, other_cookie, other_token)
    assert status == 200 and state["undone"] is None
    assert app.queue.get(1).status == STATUS_LABELED


# --- the command line and the way back into the pipeline ------------------------------------

def test_status_and_export_commands(tmp_path, capsys):
    queue_dir = str(tmp_path / "queue")
    with fill_queue(queue_dir, 3) as queue:
        queue.decide(2, "label", 4)
    assert review_app.main(["status", "--queue", queue_dir]) == 0
    assert "2 face(s) waiting for review" in capsys.readouterr().out
    out = tmp_path / "reviewed.csv"
    assert review_app.main(["export", "--queue", queue_dir, "--out", str(out)]) == 0
    assert "1 reviewed face(s) written" in capsys.readouterr().out
    assert out.read_text().splitlines()[0] == "emotion,pixels,Usage"
    # A mistyped directory is an error, not an empty queue.
    assert review_app.main(["status", "--queue", str(tmp_path / "nope")]) == 2
    assert "no review queue in" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nope")


def test_exported_csv_re_ingests_with_zero_rejected_rows(tmp_path):
    from fer_pipeline.components.example_gen import run_example_gen
    from fer_pipeline.core.config import IngestConfig

    queue_dir = str(tmp_path / "queue")
    with fill_queue(queue_dir, 9) as queue:
        for item_id in range(1, 10):
            if item_id == 5:
                queue.decide(item_id, "not_face")
            else:
                queue.decide(item_id, "label", item_id % NUM_CLASSES)
        assert queue.export_csv(str(tmp_path / "reviewed.csv")) == 8
    result = run_example_gen(str(tmp_path / "reviewed.csv"), str(tmp_path / "examples"),
                             IngestConfig(), [])
    assert result.rows_rejected == 0
    assert result.rows_read == 8
    assert result.rows_written == {"train": 8, "validation": 0, "test": 0}


def test_reviewed_faces_join_the_original_data_and_leave_its_test_split(tmp_path):
    """The loop: held-out faces reviewed, exported and ingested with the original CSV train
    from then on, and the duplicate guard takes them out of the test split."""
    from fer_pipeline.components.example_gen import run_example_gen
    from fer_pipeline.pipeline.synthetic import generate_csv
    from fer_pipeline.core.config import IngestConfig
    from fer_pipeline.serving.client_cli import images_from_csv

    original = str(tmp_path / "fer2013.csv")
    generate_csv(original, rows=200, seed=3)
    held_out = images_from_csv(original, 3, usage="PrivateTest")
    with ReviewQueue(str(tmp_path / "queue")) as queue:
        for item in held_out:
            recorded = queue.record(item.pixels, item.source, {
                "cnn": ModelPrediction(1, np.full(NUM_CLASSES, 1 / NUM_CLASSES))}, {})
            queue.decide(recorded.item_id, "label", item.true_label)
    reviewed = str(tmp_path / "reviewed.csv")
    assert review_app.main(["export", "--queue", str(tmp_path / "queue"), "--out",
                            reviewed]) == 0

    alone = run_example_gen(original, str(tmp_path / "alone"), IngestConfig(), [])
    both = run_example_gen([original, reviewed], str(tmp_path / "both"), IngestConfig(), [])
    assert both.rows_read == alone.rows_read + 3
    assert both.rows_written["train"] == alone.rows_written["train"] + 3
    assert both.rows_written["test"] == alone.rows_written["test"] - 3
    assert both.rows_written["validation"] == alone.rows_written["validation"]
    # Every reviewed row parsed: the only extra rows not written are the 3 test copies.
    extra = {reason: count - alone.rejected_by_reason.get(reason, 0)
             for reason, count in both.rejected_by_reason.items()}
    assert {r: n for r, n in extra.items() if n} == {"duplicate_of_train_row": 3}
    assert both.duplicate_rows_removed - alone.duplicate_rows_removed == 3


# --- the page in a real browser -------------------------------------------------------------

@pytest.fixture
def browser():
    chromium_or_skip()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _left(page) -> int:
    return int(page.locator("#left").inner_text())


def _wait_item(page, item_id: int) -> None:
    page.wait_for_selector(f'#face[data-item="{item_id}"]', timeout=10_000)


def test_review_page_end_to_end_in_chromium(app, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app.base + "/")
    _wait_item(page, 1)
    assert _left(page) == 4
    assert page.locator("#models .model").count() == 2
    assert "Felicidad" in page.locator("#classes").inner_text()
    # Every face and overlay image actually loaded.
    page.wait_for_function("Array.from(document.images).every(i => i.complete && "
                           "i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "review.png"))
    if os.environ.get("FER_REVIEW_SCREENSHOT"):
        page.screenshot(path=os.environ["FER_REVIEW_SCREENSHOT"])

    page.click('#classes button[data-class="3"]')        # face 1: happy, by click
    _wait_item(page, 2)
    page.keyboard.press("0")                              # face 2: angry, by key
    _wait_item(page, 3)
    page.keyboard.press("6")                              # face 3: neutral, by key
    _wait_item(page, 4)
    assert _left(page) == 1
    page.keyboard.press("u")                              # undo face 3
    _wait_item(page, 3)
    assert _left(page) == 2
    page.click('#classes button[data-class="2"]')        # face 3 again: fear, by click
    _wait_item(page, 4)
    page.keyboard.press("n")                              # face 4: not a face
    page.wait_for_selector("#done:not([hidden])", timeout=10_000)
    assert _left(page) == 0
    assert "Nothing left to review" in page.inner_text("body")
    assert errors == []
    assert requests and all(url.startswith(app.base + "/") for url in requests), requests

    # Exported by the command a reviewer runs, while the app still has the queue open.
    out = tmp_path / "reviewed.csv"
    queue_dir = os.path.dirname(app.queue.path)
    assert review_app.main(["export", "--queue", queue_dir, "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["emotion"]) for r in rows] == [3, 0, 2]
    assert {r["Usage"] for r in rows} == {"Training"}
    drawn = faces(4)
    for row, index in zip(rows, (0, 1, 2)):
        np.testing.assert_array_equal(
            np.array(row["pixels"].split(), dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE),
            drawn[index])


def screenshot(queue_dir: str, png_path: str) -> None:
    """The review page on an existing queue, as docs/images/review.png shows it."""
    from playwright.sync_api import sync_playwright

    running = Running(review_app.open_queue(queue_dir))
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = launched.new_page(viewport={"width": 1280, "height": 800})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(running.base + "/")
            page.wait_for_selector("#face[data-item]")
            page.wait_for_function("Array.from(document.images).every(i => i.complete && "
                                   "i.naturalWidth > 0)")
            if not all(url.startswith(running.base + "/") for url in requests):
                raise RuntimeError(f"the page made requests off the machine: {requests}")
            page.screenshot(path=png_path)
            launched.close()
    finally:
        running.stop()


def test_docs_image_of_the_demo_review_queue(tmp_path):
    """`make docs-images`: the review page on the demo run's queue (nothing fetched from
    elsewhere, every image decoded), saved as docs/images/review.png."""
    from tests import browser

    chromium_or_skip()
    run, images = browser.docs_run_or_skip()
    # The demo's gate holds VGG16 back, so its client may flag no face: then a queue filled
    # by `fer-client --review-queue` with both models served is named instead.
    queue = os.environ.get("FER_DOCS_REVIEW_QUEUE") or str(run / "review_queue")
    if review_app.open_queue(queue).counts()[STATUS_PENDING] == 0:
        pytest.skip(f"no face waits in {queue}: set FER_DOCS_REVIEW_QUEUE to a queue that "
                    "fer-client --review-queue filled with both models served")
    shot = tmp_path / "review.png"
    screenshot(queue, str(shot))
    size = browser.save_docs_image(shot.read_bytes(), images / "review.png")
    assert 0 < size <= browser.DOCS_IMAGE_MAX_BYTES, size


if __name__ == "__main__":
    # python -m tests.test_review_app QUEUE_DIR OUT.png
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.test_review_app QUEUE_DIR OUT.png")
    screenshot(sys.argv[1], sys.argv[2])
