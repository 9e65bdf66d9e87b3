"""model_card.html: the model card (core/model_card.py) as one self-contained page.

Rendered from model_card.json alone, with the building blocks of the other pages
(core/html_page.py): every number shown carries its `data-path` into the card, the
confusion matrix chart carries its points, and the card itself is embedded, so a test can
compare what a person sees with the JSON. Nothing is loaded from elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import CLASS_NAMES, EVALUATION_FILE, REPORT_HTML
from fer_pipeline.core.html_page import count, document, esc, number, table
from fer_pipeline.core.model_card import (CARD_DIR, CARD_HTML, CARD_JSON, CardFacts, build_card,
                                          metric_index, read_facts)
from fer_pipeline.core.report_page import confusion_chart, with_model_cards_section

__all__ = ["card_classes", "card_files", "card_writer", "confusion_matrix", "href", "render_card",
           "write_report_with_cards"]

log = logging.getLogger(__name__)

METRICS_PATH = "quantitative_analysis/performance_metrics"


def card_files(facts: CardFacts) -> dict[str, bytes]:
    """The version's card files, by path relative to the version directory; the page
    links to the report the push step writes (`facts.report`)."""
    card = build_card(facts)
    page = render_card(card, href(fileio.join(facts.served_path, CARD_DIR), facts.report)
                       if facts.report else "")
    return {f"{CARD_DIR}/{CARD_JSON}": (json.dumps(card, indent=2, sort_keys=True)
                                        + "\n").encode(),
            f"{CARD_DIR}/{CARD_HTML}": page.encode()}


def card_writer(name: str, model_dir: str, evaluation_dir: str,
                infra_validation_dir: Optional[str], output_dir: str
                ) -> Optional[Callable[[int, str], dict[str, bytes]]]:
    """For the pusher: (version, its final path) -> the card files of `name`, or None when
    the evaluation left no evaluation.json to make a card from (a hand-made blessing)."""
    if not fileio.exists(fileio.join(evaluation_dir, EVALUATION_FILE)):
        log.warning("no %s in %s: %s is pushed without a model card", EVALUATION_FILE,
                    evaluation_dir, name)
        return None
    return lambda version, final: card_files(
        read_facts(name, version, final, time.strftime("%Y-%m-%d", time.gmtime()), model_dir,
                   evaluation_dir, infra_validation_dir, fileio.join(output_dir, REPORT_HTML)))


def write_report_with_cards(step_dirs: Sequence[str], output_dir: str,
                            cards: Mapping[str, tuple[int, str]]) -> Optional[str]:
    """output_dir/report.html: the first report found in `step_dirs` (infra validation's
    copy, then the evaluation's) with links to the cards (model -> (version, card path))."""
    source = next((fileio.join(d, REPORT_HTML) for d in step_dirs
                   if fileio.exists(fileio.join(d, REPORT_HTML))), None)
    if source is None:
        return None
    target = fileio.join(output_dir, REPORT_HTML)
    links = {name: (version, href(output_dir, path)) for name, (version, path) in cards.items()}
    fileio.write_text(target, with_model_cards_section(fileio.read_text(source), links))
    return target


def href(from_dir: str, target: str) -> str:
    """A link from a page in `from_dir` to `target`: relative when both are local files."""
    if fileio.is_uri(from_dir) or fileio.is_uri(target):
        return target
    return os.path.relpath(target, from_dir)


def card_classes(card: Mapping[str, Any]) -> list[str]:
    """The model's classes in order, as its per-class metrics name them (FER-2013's 7, or
    FER+'s 8 with contempt)."""
    slices = [m.get("slice", "") for m in card["quantitative_analysis"]["performance_metrics"]
              if m["type"] == "precision"]
    return [s.split("=", 1)[1] for s in slices if s.startswith("class=")] or list(CLASS_NAMES)


def confusion_matrix(card: Mapping[str, Any]) -> list[list[int]]:
    """The confusion matrix the card's `confusion count` metrics hold (rows: true class)."""
    names = card_classes(card)
    return [[int(_metric(card, "confusion count", f"true={a},predicted={b}")["value"])
             for b in names] for a in names]


def render_card(card: Mapping[str, Any], report_href: str = "") -> str:
    details = card["model_details"]
    title = f"Model card: {details['name']} version {details['version']['name']}"
    sections = [f"<h1>{esc(title)}</h1>",
                f'<p class="muted">{esc(details["overview"])}</p>',
                _verdicts(card, report_href),
                _uses(card["considerations"]),
                _data(card["model_parameters"]),
                _performance(card),
                _documentation(details["documentation"]),
                _limitations(card["considerations"]),
                _formats(card),
                f'<p class="muted">Model Card Toolkit schema v{esc(card["schema_version"])}; '
                f'version {esc(details["version"]["name"])} published '
                f'{esc(details["version"]["date"])}: {esc(details["version"]["diff"])}.</p>']
    return document(title, sections, source_json=card)


def _metric(card: Mapping[str, Any], type_: str, slice_: Any = None) -> dict[str, Any]:
    return card["quantitative_analysis"]["performance_metrics"][
        metric_index(dict(card), type_, slice_)]


def _shown(card: Mapping[str, Any], type_: str, slice_: Any = None, digits: int = 3) -> str:
    try:
        index = metric_index(dict(card), type_, slice_)
    except KeyError:
        return "n/a"
    value = card["quantitative_analysis"]["performance_metrics"][index]["value"]
    path = f"{METRICS_PATH}/{index}/value"
    # The schema keeps metric values as strings; the page shows them as numbers.
    whole = digits == 0 or value.lstrip("-").isdigit()
    return count(int(value), path) if whole else number(float(value), path, digits)


def _verdicts(card: Mapping[str, Any], report_href: str) -> str:
    paragraphs = dict(_paragraphs(card["model_details"]["documentation"]))
    gate, infra = paragraphs.get("Evaluation gate", ""), paragraphs.get("Infra validation", "")
    css = "ok" if gate.startswith("blessed") and infra.startswith("blessed") else "warn"
    thresholds = [[esc(m["type"][len("gate: "):]), _shown(card, m["type"])]
                  for m in card["quantitative_analysis"]["performance_metrics"]
                  if m["type"].startswith("gate: ")]
    link = (f'<p><a id="report-link" href="{esc(report_href)}">The evaluation report</a> '
            "this version was blessed by.</p>" if report_href else "")
    return (f'<section class="banner {css}" id="verdict"><h2>Why it is served</h2>'
            f"<p><b>Test accuracy {_shown(card, 'accuracy', 'test')}</b> on the test split "
            f"(majority-class baseline "
            f"{_shown(card, 'majority-class baseline accuracy', 'test')}).</p>"
            f"<p><b>Evaluation gate</b>: {esc(gate)}</p>"
            + table(["threshold", "value"], thresholds, raw=True)
            + f"<p><b>Infra validation</b>: {esc(infra)}</p>" + _infra_table(card)
            + link + "</section>")


# Infra measurements the card keeps in raw units that a person reads better scaled:
# key -> (label on the page, divisor, unit). The JSON keeps the raw number.
SCALED_INFRA = {"server_rss_bytes": ("server memory (resident, RSS)", 2**20, "MiB")}


def _infra_table(card: Mapping[str, Any]) -> str:
    rows = [_infra_row(card, m["type"])
            for m in card["quantitative_analysis"]["performance_metrics"]
            if m["type"].startswith("infra: ")]
    return table(["measured in the sandboxed server", "value"], rows, raw=True) if rows else ""


def _infra_row(card: Mapping[str, Any], type_: str) -> list[str]:
    key = type_[len("infra: "):]
    if key not in SCALED_INFRA:
        return [esc(key), _shown(card, type_)]
    label, divisor, unit = SCALED_INFRA[key]
    index = metric_index(dict(card), type_, None)
    value = float(card["quantitative_analysis"]["performance_metrics"][index]["value"])
    # data-divisor and data-unit let a test read the raw number back from what is shown.
    return [esc(label),
            f'<span data-path="{METRICS_PATH}/{index}/value" data-digits="0" '
            f'data-divisor="{divisor}" data-unit="{unit}">'
            f"{value / divisor:,.0f} {unit}</span>"]


def _uses(considerations: Mapping[str, Any]) -> str:
    intended = "".join(f"<li>{esc(u['description'])}</li>" for u in considerations["use_cases"])
    users = "".join(f"<li>{esc(u['description'])}</li>" for u in considerations["users"])
    out = "".join(f"<li><b>{esc(r['name'])}</b>. {esc(r['mitigation_strategy'])}</li>"
                  for r in considerations["ethical_considerations"])
    return (_section("intended-use", "Intended use",
                     f"<ul>{intended}</ul><h3>Users</h3><ul>{users}</ul>")
            + _section("out-of-scope", "Out-of-scope uses", f"<ul>{out}</ul>"))


def _section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}"><h2>{esc(title)}</h2>{body}</section>'


def _data(parameters: Mapping[str, Any]) -> str:
    rows = [[esc(d["name"]), esc(d["description"])] for d in parameters["data"]]
    return _section("data", "Data", table(["dataset", "what"], rows, raw=True)
                    + f"<p><b>Architecture</b>: {esc(parameters['model_architecture'])}</p>")


def _performance(card: Mapping[str, Any]) -> str:
    rows = [[esc(name), *(_shown(card, key, f"class={name}", 0 if key == "support" else 3)
                          for key in ("precision", "recall", "f1", "support"))]
            for name in card_classes(card)]
    body = (f"<p>accuracy {_shown(card, 'accuracy', 'test')}, loss "
            f"{_shown(card, 'loss', 'test')}, macro F1 {_shown(card, 'macro F1', 'test')}</p>"
            + table(["class", "precision", "recall", "F1", "support"], rows, raw=True)
            + confusion_chart("confusion", confusion_matrix(card),
                              f"{card['model_details']['name']}: confusion matrix (test)"))
    return _section("performance", "Performance on the test split", body)


def _paragraphs(documentation: str) -> list[tuple[str, str]]:
    parts = []
    for paragraph in documentation.split("\n\n"):
        title, _, text = paragraph.partition(": ")
        parts.append((title, text))
    return parts


def _documentation(documentation: str) -> str:
    ids = {"How it was made": "provenance", "Hyperparameters": "hyperparameters",
           "Lineage": "lineage"}
    return "".join(_section(ids[title], title, f"<p>{esc(text)}</p>")
                   for title, text in _paragraphs(documentation) if title in ids)


def _limitations(considerations: Mapping[str, Any]) -> str:
    items = "".join(f"<li>{esc(x['description'])}</li>" for x in considerations["limitations"])
    trade = "".join(f"<li>{esc(x['description'])}</li>" for x in considerations["tradeoffs"])
    return _section("limitations", "Known limitations",
                    f"<ul>{items}</ul><h3>Trade-offs</h3><ul>{trade}</ul>")


def _formats(card: Mapping[str, Any]) -> str:
    parameters = card["model_parameters"]
    return _section("formats", "Inputs and outputs",
                    f"<p><b>Input</b>: {esc(parameters['input_format'])}</p>"
                    f"<p><b>Output</b>: {esc(parameters['output_format'])}</p>")
