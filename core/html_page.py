"""Building blocks shared by the two pages a person opens: the statistics page and the
evaluation report.

Both pages are one self-contained HTML file: charts are matplotlib figures and faces are
PNGs, all inlined as data: URIs, and the page loads nothing else, so it opens offline and
nothing leaves the machine. Every chart carries the exact points it plots as inline JSON
(`<script type="application/json" data-chart-data=NAME>`), and every number shown as text
carries where it came from (`data-path`, a '/'-separated path into the page's source JSON),
so tests can check what a person sees against the files it was computed from.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from fer_pipeline.core.contract import CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES, IMAGE_SIZE

# Faces are 48x48; shown at 2x (96 px), nearest neighbour, so pixels stay pixels.
FACE_SCALE = 2
CHART_DPI = 100

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
  max-width:1240px;margin:0 auto;padding:0 16px 48px;line-height:1.4}
h1{margin:16px 0 8px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{margin:20px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
td,th{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{border-radius:8px;padding:12px 16px;margin:12px 0;border:2px solid}
.ok{background:#e9f7ec;border-color:#2e7d32} .bad{background:#fdecea;border-color:#c62828}
.warn{background:#fff8e1;border-color:#f9a825} .info{background:#eef3fb;border-color:#1e63b5}
.banner h2{border:none;margin:0 0 6px;padding:0}
.verdict{font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure.chart{margin:8px 0} figure.chart img{max-width:100%;height:auto}
figure.chart figcaption{font-size:13px;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0 12px}
.face{width:FACE_WIDTHpx;font-size:11px;text-align:center;color:#333}
.face img{image-rendering:pixelated;display:block;border:1px solid #bbb}
.pair{display:flex;gap:2px;border:1px solid #ddd;padding:3px;border-radius:4px}
.muted{color:#666;font-size:13px}
.columns{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:0 24px}
.columns p{margin:10px 0 4px}
.stat{display:inline-block;margin:4px 16px 4px 0} .stat b{font-size:20px}
""".replace("FACE_WIDTH", str(IMAGE_SIZE * FACE_SCALE + 2))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on servers and CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def bilingual(k: int) -> str:
    # FER+'s names extend FER-2013's (class 7 is contempt), so one table serves both.
    return f"{CLASS_NAMES_FERPLUS[k]} / {CLASS_NAMES_FERPLUS_ES[k]}"


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(figure) -> str:
    """A matplotlib figure as a PNG data URI; the figure is closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=CHART_DPI, bbox_inches="tight")
    plt.close(figure)
    return _png_data_uri(buffer.getvalue())


def json_script(data: Any, attribute: str, name: str) -> str:
    # "</" inside a <script> would end it early; "<\/" is the same JSON string.
    text = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    return f'<script type="application/json" {attribute}="{esc(name)}">{text}</script>'


def chart(name: str, figure, data: Any, caption: str = "") -> str:
    """An inline chart image plus the exact data it plots (see the module docstring)."""
    caption_html = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure class="chart" data-chart="{esc(name)}">'
            f'<img alt="{esc(caption or name)}" src="{figure_png(figure)}">{caption_html}'
            f"{json_script(data, 'data-chart-data', name)}</figure>")


def face_png(pixels: np.ndarray, scale: int = FACE_SCALE) -> str:
    """A 48x48 uint8 face as a PNG data URI, upscaled with nearest neighbour."""
    from PIL import Image

    image = np.asarray(pixels, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    if scale > 1:
        image = np.kron(image, np.ones((scale, scale), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


def face(pixels: np.ndarray, caption_lines: Sequence[str], **data: Any) -> str:
    """One face with a short caption; `data` become data-* attributes (for tests)."""
    attributes = "".join(f' data-{esc(k.replace("_", "-"))}="{esc(v)}"' for k, v in data.items())
    caption = "<br>".join(esc(line) for line in caption_lines)
    alt = esc("; ".join(caption_lines))
    return (f'<div class="face"{attributes}><img alt="{alt}" width="{IMAGE_SIZE * FACE_SCALE}" '
            f'height="{IMAGE_SIZE * FACE_SCALE}" src="{face_png(pixels)}">{caption}</div>')


def number(value: Optional[float], path: str, digits: int = 3, percent: bool = False) -> str:
    """A number as text, tagged with the source-JSON path it was read from."""
    if value is None:
        return f'<span data-path="{esc(path)}" data-missing="1">n/a</span>'
    shown = f"{value * 100:.{digits}f} %" if percent else f"{value:.{digits}f}"
    return (f'<span data-path="{esc(path)}" data-digits="{digits}" '
            f'data-scale="{100 if percent else 1}">{shown}</span>')


def count(value: int, path: str) -> str:
    return f'<span data-path="{esc(path)}" data-digits="0" data-scale="1">{int(value)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (cells already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            text = cell if raw and isinstance(cell, str) else esc(_cell(cell))
            css_class = ' class="num"' if numeric else ""
            cells.append(f"<td{css_class}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def document(title: str, sections: Sequence[str], source_json: Any = None) -> str:
    """The whole page; `source_json`, when given, is embedded as the numbers' source."""
    source = json_script(source_json, "data-source", "page") if source_json is not None else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(sections) + f"\n{source}\n</body></html>\n")
