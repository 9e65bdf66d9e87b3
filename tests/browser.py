"""Opening our HTML pages in a real browser, for tests (and the README's screenshots).

Uses Debian's `chromium` package through Playwright (never `playwright install`, which
downloads a browser). Tests call `chromium_or_skip()` first: without /usr/bin/chromium
they skip with one line saying what to install. `open_page` records every request the
page makes, so a test can assert that nothing leaves the machine.

    python -m tests.browser PAGE.html OUT.png [WIDTH]    # a full-page screenshot
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

CHROMIUM = "/usr/bin/chromium"
# No sandbox: CI runs as root in a container. The rest stops Chromium's own traffic
# (component updates, sync, field trials) so the request log holds the page's only.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL_SCHEMES = ("data:", "file:")
VIEWPORT = {"width": 1366, "height": 900}   # a laptop screen


def chromium_or_skip() -> None:
    """Skips the calling test (one line) unless Chromium and Playwright are available."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package "
                    "(apt-get install chromium) to run the browser tests")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@dataclass
class OpenedPage:
    page: object                          # playwright.sync_api.Page
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def remote_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]


@contextlib.contextmanager
def open_page(path: str | os.PathLike, viewport: dict | None = None) -> Iterator[OpenedPage]:
    """Loads a local HTML file in headless Chromium; yields the page and its requests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            opened = OpenedPage(page)
            page.on("request", lambda request: opened.requests.append(request.url))
            page.on("console", lambda message: opened.console_errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield opened
        finally:
            browser.close()


def image_states(page) -> list[dict]:
    """src, decoded size and completeness of every <img> on the page, as the browser sees it."""
    return page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.currentSrc || e.src, complete: e.complete,"
               " width: e.naturalWidth, height: e.naturalHeight,"
               " chart: e.closest('figure.chart')?.dataset.chart || null}))")


def decode_data_uri_png(uri: str) -> np.ndarray:
    """The pixels of a data:image/png;base64 URI as a uint8 array (H, W[, C])."""
    from PIL import Image

    prefix = "data:image/png;base64,"
    if not uri.startswith(prefix):
        raise ValueError(f"not an inline PNG: {uri[:40]}")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):]))))


def is_blank(pixels: np.ndarray) -> bool:
    """True when every pixel has the same value (an empty or failed image)."""
    return pixels.size == 0 or float(pixels.astype(np.float64).std()) == 0.0


def shown_numbers(page) -> list[dict]:
    """Every number the page shows with a source path (components/html_page.number)."""
    return page.eval_on_selector_all(
        "[data-path]", "els => els.map(e => ({path: e.dataset.path, text: e.textContent,"
                       " digits: e.dataset.digits, scale: e.dataset.scale,"
                       " divisor: e.dataset.divisor || null, unit: e.dataset.unit || null,"
                       " missing: e.dataset.missing || null,"
                       " visible: !!(e.offsetWidth || e.offsetHeight)}))")


def chart_data(page) -> dict[str, object]:
    """chart name -> the JSON points embedded beside its image."""
    import json

    pairs = page.eval_on_selector_all(
        "script[data-chart-data]", "els => els.map(e => [e.dataset.chartData, e.textContent])")
    return {name: json.loads(text) for name, text in pairs}


def screenshot(html_path: str, png_path: str, width: int = 1280) -> None:
    """A full-page screenshot of `html_path` (the README's pictures), 256-colour PNG."""
    with open_page(html_path, {"width": width, "height": 900}) as opened:
        remote = opened.remote_requests()
        if remote:
            raise RuntimeError(f"{html_path} made requests off the machine: {remote}")
        png = opened.page.screenshot(full_page=True)
    # 256 colours are plenty for charts and grey faces and keep the README's images small.
    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(png_path, optimize=True)


# `make docs-images`: the run whose pages the docs show, and where their pictures go.
DOCS_RUN_ENV, DOCS_IMAGES_ENV = "FER_DOCS_RUN", "FER_DOCS_IMAGES"
DOCS_IMAGE_WIDTH = 960        # pixels of the saved picture (the site's text column)
DOCS_IMAGE_MAX_BYTES = 160_000


def docs_run_or_skip() -> tuple[Path, Path]:
    """(the demo run, docs/images) when `make docs-images` runs the test, else a skip."""
    import pytest

    run, images = os.environ.get(DOCS_RUN_ENV), os.environ.get(DOCS_IMAGES_ENV)
    if not (run and images):
        pytest.skip(f"make docs-images sets {DOCS_RUN_ENV} and {DOCS_IMAGES_ENV}")
    return Path(run), Path(images)


def save_docs_image(png: bytes, out_path: str | os.PathLike, height: int = 1400) -> int:
    """A screenshot as the docs show it: the top `height` pixels (the verdict and the first
    charts: a page's full length is thousands of pixels of faces), scaled to the docs'
    width, 128 colours. Returns the file's size."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, height)))
    scale = DOCS_IMAGE_WIDTH / image.width
    image = image.resize((DOCS_IMAGE_WIDTH, round(image.height * scale)), Image.LANCZOS)
    image.quantize(128).save(out_path, optimize=True)
    return os.path.getsize(out_path)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    screenshot(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
