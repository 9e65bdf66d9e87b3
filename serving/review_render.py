"""What the `fer-review` page shows: its JSON state and the page, script and style.

The page's HTML, CSS and JS are package data in serving/review_page/ (index.html, review.css,
review.js; pyproject.toml's package-data), read once with importlib.resources. The page's
{{TOKEN}} (the session's CSRF token) and {{QUEUE}} (the queue directory, HTML-escaped) are
filled per request by page_html; the script's %CLASSES% (FER-2013's class names, the buttons
before any face is shown) once, here. Each face brings its own `classes`, its models'
(FER+'s eight with contempt when they were trained so): the page's buttons follow them.
serving/review_app.py serves them.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Optional

from fer_pipeline.core.contract import NUM_CLASSES, class_names_for
from fer_pipeline.core.ensemble import class_names_es_for
from fer_pipeline.serving.review_queue import STATUS_PENDING, ReviewItem, ReviewQueue
from fer_pipeline.serving.saliency import top_classes

__all__ = ["STATIC", "classes_json", "item_json", "page_html", "state_json"]


# --- what the page shows -----------------------------------------------------------------

def classes_json(num_classes: int = NUM_CLASSES) -> list[dict[str, Any]]:
    """The buttons of a face whose models have `num_classes` classes (7, or FER+'s 8)."""
    return [{"id": i, "en": en, "es": es} for i, (en, es) in
            enumerate(zip(class_names_for(num_classes), class_names_es_for(num_classes)))]


def item_json(item: ReviewItem) -> dict[str, Any]:
    """One face as the page needs it: image URLs, each model's top 3, the ensemble's view."""
    models = []
    classes = classes_json(item.num_classes)
    for name, prediction in item.models.items():
        top3 = top_classes(prediction.probabilities, 3)
        models.append({
            "name": name,
            "version": prediction.version,
            "top3": [{"class_id": c, "en": classes[c]["en"], "es": classes[c]["es"],
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
        "classes": classes,
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


# --- the page ------------------------------------------------------------------------------

def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _page_file(name: str) -> str:
    return (resources.files("fer_pipeline.serving") / "review_page" / name).read_text(
        encoding="utf-8")


_PAGE = _page_file("index.html")
_CSS = _page_file("review.css")
_JS = _page_file("review.js").replace("%CLASSES%", json.dumps(classes_json()))

STATIC = {"review.js": (_JS, "text/javascript; charset=utf-8"),
          "review.css": (_CSS, "text/css; charset=utf-8")}


def page_html(token: str, queue_dir: str) -> str:
    """The page for one session: its CSRF token and the queue directory filled in."""
    return _PAGE.replace("{{TOKEN}}", token).replace("{{QUEUE}}", _html_escape(queue_dir))
