"""The evaluation report (evaluation/report.html): what a person reads before a push.

Rendering only: components/evaluator/ computes every number and the gate, and hands this
module the evaluation record (the content of evaluation.json) plus the pixels of the faces
the page shows. Sections, top to bottom:

1. the verdict: which models are blessed and why (or why held back), what is in serving
   now and what the push step will publish;
2. the test data and the majority-class baseline every model must beat;
3. per model: training curves from its history.json, per-class precision/recall/F1, the
   confusion matrix, calibration (core/calibration_page.py: temperature, ECE and NLL before
   and after, reliability diagrams), and per true class the most confident mistakes as faces with every
   model's answer;
4. the ensemble: agreement rate, human-review rate, accuracy on the faces it decides alone,
   its confusion matrix and the faces it sends to a person;
5. the thresholds used.

Numbers shown as text carry `data-path` into evaluation.json; charts carry their points
(core/html_page.py), so tests compare the page with the JSON.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.core.calibration_page import calibration_block
from fer_pipeline.core.html_page import (bilingual, chart, count, document, esc, face, number,
    pyplot, table)
from fer_pipeline.core.contract import NUM_CLASSES, class_names_for

HISTORY_METRICS = ("loss", "accuracy")


def faces_shown(evaluation: Mapping[str, Any]) -> set[int]:
    """Test-split indexes of every face the report shows (the evaluator passes their pixels)."""
    ensemble = evaluation["ensemble"]
    indexes = {item["index"] for key in ("review_examples", "closest_calls")
               for item in ensemble.get(key, [])}
    for model in evaluation["models"].values():
        for items in model.get("mistakes", {}).values():
            indexes.update(item["index"] for item in items)
    return indexes


def render_report(evaluation: Mapping[str, Any], faces: Mapping[int, np.ndarray]) -> str:
    """The self-contained HTML report; `faces` maps test-split index -> uint8 48x48 pixels."""
    sections = [
        "<h1>FER-2013 model evaluation</h1>",
        verdict_banner(evaluation),
        data_section(evaluation),
        *(model_section(name, model, evaluation, faces)
          for name, model in evaluation["models"].items()),
        ensemble_section(evaluation["ensemble"], faces, evaluation.get("ensemble_blessed")),
        thresholds_section(evaluation["thresholds"]),
    ]
    return document("FER-2013 model evaluation", sections)


# ----------------------------------------------------------------------------- verdict

def verdict_banner(evaluation: Mapping[str, Any]) -> str:
    models = evaluation["models"]
    blessed = [name for name, m in models.items() if m["blessed"]]
    held = [name for name, m in models.items() if not m["blessed"]]
    css = "ok" if not held else ("warn" if blessed else "bad")
    headline = (f"Blessed: {', '.join(blessed) or 'none'}. "
                f"Held back: {', '.join(held) or 'none'}.")
    # With gate_labels ferplus the column shows the accuracy the gate compared.
    ferplus = evaluation.get("gate_labels") == "ferplus"
    judged = "FER+ majority accuracy" if ferplus else "test accuracy"
    rows = [[f'<span class="verdict" data-model="{esc(name)}" data-blessed="'
             f'{str(m["blessed"]).lower()}">{"BLESSED" if m["blessed"] else "HELD BACK"}'
             f"</span>", esc(name),
             number(m["gate"]["accuracy"], f"models/{name}/gate/accuracy") if ferplus
             else number(m["accuracy"], f"models/{name}/accuracy"),
             esc(m["summary"]), _served_cell(name, m), _push_cell(m)]
            for name, m in models.items()]
    reasons = "".join(
        f"<details><summary>{esc(name)}: every check</summary><ul>"
        + "".join(f"<li>{esc(r)}</li>" for r in m["reasons"]) + "</ul></details>"
        for name, m in models.items())
    return (f'<section class="banner {css}" id="verdict"><h2>Verdict</h2>'
            f"<p class=\"verdict\">{esc(headline)}</p>" + _gate_labels_line(ferplus)
            + table(["verdict", "model", judged, "why", "in serving now",
                     "push step"], rows, raw=True)
            + reasons + "</section>")


def _gate_labels_line(ferplus: bool) -> str:
    """Which labels every check compared with (evaluation.gate_labels)."""
    labels, text = (("ferplus", "FER+'s crowd majority: accuracy, the baseline, per-class "
                     "recall, calibration and the served version's accuracy are all "
                     "measured against it") if ferplus else
                    ("fer2013", "FER-2013's test labels"))
    return (f'<p class="gate-labels" data-gate-labels="{labels}">The gate judged against '
            f"{esc(text)} (evaluation.gate_labels: {labels}).</p>")


def infra_section(infra_blessings: Mapping[str, Mapping[str, Any]]) -> str:
    """The infra-validate step's verdict per model: did the candidate load and answer in a
    sandboxed model server, and what it measured there. The infra-validate step inserts it
    after the verdict banner of its copy of this report (`with_infra_section`)."""
    models = dict(infra_blessings)
    blessed = [name for name, m in models.items() if m["blessed"]]
    validated = [name for name, m in models.items() if m.get("server")]
    held = [name for name in validated if name not in blessed]
    css = "ok" if validated and not held else ("bad" if not blessed else "warn")

    def measured(m: Mapping[str, Any], key: str, scale: float = 1.0, unit: str = "") -> str:
        value = (m.get("measurements") or {}).get(key)
        return "n/a" if value is None else f"{value / scale:.1f}{unit}"

    rows = [[f'<span class="infra-verdict" data-model="{esc(name)}" data-blessed="'
             f'{str(m["blessed"]).lower()}">'
             f'<b>{_infra_label(m)}</b></span>',
             esc(name), esc(m.get("server") or "not served"), esc(m.get("mode", "")),
             measured(m, "load_seconds", unit=" s"), measured(m, "first_call_ms", unit=" ms"),
             measured(m, "p50_ms", unit=" ms"), measured(m, "server_rss_bytes", 2**20, " MiB"),
             esc(m["summary"])]
            for name, m in models.items()]
    return (f'<section class="banner {css}" id="infra-validation"><h2>Infra validation</h2>'
            f"<p>Infra-blessed: {esc(', '.join(blessed) or 'none')}. Only models blessed by "
            "both the gate above and this check are pushed.</p>"
            + table(["verdict", "model", "server", "mode", "load to AVAILABLE", "first call",
                     "p50 call", "server memory", "why"], rows, raw=True)
            + "</section>")


def _infra_label(model: Mapping[str, Any]) -> str:
    if model["blessed"]:
        return "INFRA-BLESSED"
    return "HELD BACK" if model.get("server") else "NOT VALIDATED"


def with_infra_section(report_html: str, infra_blessings: Mapping[str, Mapping[str, Any]]
                       ) -> str:
    """The evaluation report with the infra verdict right after its verdict banner."""
    banner_start = report_html.index('id="verdict"')
    banner_end = report_html.index("</section>", banner_start) + len("</section>")
    return (report_html[:banner_end] + "\n" + infra_section(infra_blessings)
            + report_html[banner_end:])


def with_model_cards_section(report_html: str, cards: Mapping[str, tuple[int, str]]) -> str:
    """The report with a section linking each pushed version's model card
    (model -> (version, href)), after the verdicts; the push step writes this copy."""
    items = "".join(f'<li><a class="model-card" data-model="{esc(name)}" href="{esc(link)}">'
                    f"{esc(name)} version {version}</a></li>"
                    for name, (version, link) in sorted(cards.items()))
    section = ('<section class="banner info" id="model-cards"><h2>Model cards</h2>'
               + (f"<p>Published with this push:</p><ul>{items}</ul>" if items else
                  "<p>Nothing was pushed, so no model card was published.</p>")
               + "</section>")
    anchor = 'id="infra-validation"' if 'id="infra-validation"' in report_html else 'id="verdict"'
    start = report_html.index(anchor)
    end = report_html.index("</section>", start) + len("</section>")
    return report_html[:end] + "\n" + section + report_html[end:]


def _served_cell(name: str, model: Mapping[str, Any]) -> str:
    served = model.get("served")
    if not served:
        return "nothing"
    return (f"version {count(served['version'], f'models/{name}/served/version')}, "
            f"accuracy {number(served['accuracy'], f'models/{name}/served/accuracy')}")


def _push_cell(model: Mapping[str, Any]) -> str:
    if not model["blessed"]:
        return "not pushed" + (" (the served version stays)" if model.get("served") else "")
    # The pusher publishes a blessed model as a new version unless its fingerprint equals
    # the version already served.
    return "pushed as a new version (unless identical to the served one)"


# ----------------------------------------------------------------------------- data

def data_section(evaluation: Mapping[str, Any]) -> str:
    data = evaluation["data"]
    baseline = data["majority_baseline"]
    plt = pyplot()
    classes = list(data["class_distribution"])      # FER-2013's 7, or FER+'s 8 classes
    counts = [data["class_distribution"][c] for c in classes]
    figure, axes = plt.subplots(figsize=(7, 2.8))
    bars = axes.bar(range(len(classes)), counts, color="#1e63b5")
    axes.bar_label(bars, fontsize=8)
    axes.set_xticks(range(len(classes)), [bilingual(k) for k in range(len(classes))],
                    rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("faces")
    axes.set_title("test faces per class")
    return ("<h2>Test data</h2>"
            f"<p>{count(data['test_examples'], 'data/test_examples')} test faces "
            f"(split <code>{esc(data['split'])}</code>). Majority-class baseline: answering "
            f"<b>{esc(baseline['class_name'])}</b> for every face scores "
            f"{number(baseline['accuracy'], 'data/majority_baseline/accuracy')}.</p>"
            + chart("test-distribution", figure, {"classes": classes,
                                                  "counts": counts},
                    "test faces per class"))


# ----------------------------------------------------------------------------- per model

def model_section(name: str, model: Mapping[str, Any], evaluation: Mapping[str, Any],
                  faces: Mapping[int, np.ndarray]) -> str:
    path = f"models/{name}"
    verdict = "BLESSED" if model["blessed"] else "HELD BACK"
    parts = [f'<h2 id="model-{esc(name)}">{esc(name)}: {verdict}</h2>',
             f'<p class="muted">{esc(model["summary"])}</p>',
             f'<div><span class="stat">test accuracy <b>{number(model["accuracy"], path + "/accuracy")}'
             f'</b></span><span class="stat">test loss <b>{number(model["loss"], path + "/loss")}'
             f'</b></span><span class="stat">macro F1 <b>'
             f'{number(model["macro_avg"]["f1"], path + "/macro_avg/f1")}</b></span>'
             f'<span class="stat">initial weights <b>{esc(model.get("vgg_weights") or "-")}</b>'
             "</span></div>",
             ferplus_stats(model.get("ferplus"), path),
             "<h3>Training curves</h3>", history_charts(name, model.get("history")),
             "<h3>Per class</h3>",
             '<div class="row">', per_class_chart(name, model),
             confusion_chart(f"confusion-{name}", model["confusion_matrix"],
                             f"{name}: confusion matrix"), "</div>",
             per_class_table(name, model),
             "<h3>Calibration</h3>",
             calibration_block(name, model.get("calibration"), f"{path}/calibration"),
             "<h3>Most confident mistakes, per true class</h3>",
             mistakes_gallery(name, model.get("mistakes", {}), faces)]
    return "\n".join(parts)


def history_points(history: Optional[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The per-epoch series the curves plot, from history.json's `epochs` records."""
    records = (history or {}).get("epochs") or []
    points: dict[str, list[float]] = {"epoch": [int(r["epoch"]) for r in records]}
    for metric in HISTORY_METRICS:
        for key in (metric, f"val_{metric}"):
            if records and all(key in r for r in records):
                points[key] = [float(r[key]) for r in records]
    return points


def history_charts(name: str, history: Optional[Mapping[str, Any]]) -> str:
    points = history_points(history)
    if not points["epoch"]:
        return '<p class="bad banner">No per-epoch records in history.json: no curves.</p>'
    plt = pyplot()
    figure, all_axes = plt.subplots(1, len(HISTORY_METRICS), figsize=(10, 3.2))
    for axes, metric in zip(all_axes, HISTORY_METRICS):
        for key, label, style in ((metric, "train", "o-"), (f"val_{metric}", "validation", "s--")):
            if key in points:
                axes.plot(points["epoch"], points[key], style, label=label, markersize=4)
        best = history.get("best_epoch")
        if best:
            axes.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
        axes.set_xlabel("epoch")
        axes.set_title(f"{name}: {metric}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        axes.xaxis.get_major_locator().set_params(integer=True)
    caption = (f"{len(points['epoch'])} epochs; exported weights from epoch "
               f"{history.get('exported_epoch', '?')}")
    return chart(f"history-{name}", figure, points, caption)


def per_class_chart(name: str, model: Mapping[str, Any]) -> str:
    plt = pyplot()
    rows = model["per_class"]
    data = {metric: [r[metric] for r in rows] for metric in ("precision", "recall", "f1")}
    figure, axes = plt.subplots(figsize=(6, 3.6))
    width = 0.27
    positions = np.arange(len(rows))                # the model's classes: 7, or FER+'s 8
    for offset, (metric, values) in zip((-width, 0, width), data.items()):
        axes.bar(positions + offset, values, width, label=metric)
    axes.set_xticks(positions, [bilingual(k) for k in range(len(rows))], rotation=30,
                    ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_title(f"{name}: precision / recall / F1 per class")
    axes.legend(fontsize=8, ncols=3, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    return chart(f"per-class-{name}", figure,
                 {"classes": [r["class_name"] for r in rows], **data})


def confusion_chart(chart_name: str, matrix: list[list[int]], title: str) -> str:
    plt = pyplot()
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(5.6, 4.8))
    image = axes.imshow(counts, cmap="Blues")
    labels = [bilingual(k) for k in range(len(counts))]    # 7 classes, or FER+'s 8
    axes.set_xticks(range(len(counts)), labels, rotation=40, ha="right", fontsize=8)
    axes.set_yticks(range(len(counts)), labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(len(counts)):
        for j in range(len(counts)):
            axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                      color="white" if counts[i, j] > threshold else "black")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return chart(chart_name, figure, {"matrix": counts.tolist()})


def per_class_table(name: str, model: Mapping[str, Any]) -> str:
    path = f"models/{name}"
    rows = [[esc(r["class_name"]), esc(r["class_name_es"]),
             number(r["precision"], f"{path}/per_class/{k}/precision"),
             number(r["recall"], f"{path}/per_class/{k}/recall"),
             number(r["f1"], f"{path}/per_class/{k}/f1"),
             count(r["support"], f"{path}/per_class/{k}/support")]
            for k, r in enumerate(model["per_class"])]
    return table(["class", "clase", "precision", "recall", "F1", "support"], rows, raw=True)


def ferplus_stats(ferplus: Optional[Mapping[str, Any]], path: str) -> str:
    """With FER+ votes: accuracy against the crowd's majority and cross-entropy against
    its vote distribution, beside FER-2013's numbers above."""
    if not ferplus:
        return ""
    return (f'<div><span class="stat">accuracy against FER+ majority <b>'
            f'{number(ferplus["accuracy_majority"], path + "/ferplus/accuracy_majority")}'
            f'</b></span><span class="stat">cross-entropy against FER+ votes <b>'
            f'{number(ferplus["cross_entropy"], path + "/ferplus/cross_entropy")}</b></span>'
            "</div>")


def _vote_lines(item: Mapping[str, Any]) -> list[str]:
    votes = item.get("votes")
    return [f"FER+: {', '.join(f'{c} {n}' for c, n in votes.items())}"] if votes else []


def _answer_lines(answers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [f"{m}: {a['class_name']} {a['confidence']:.2f}" for m, a in answers.items()]


def mistakes_gallery(name: str, mistakes: Mapping[str, list[Mapping[str, Any]]],
                     faces: Mapping[int, np.ndarray]) -> str:
    parts = []
    # One entry per true class: FER-2013's 7, or FER+'s 8 (the evaluator lists them all).
    for k, class_name in enumerate(class_names_for(max(len(mistakes), NUM_CLASSES))):
        items = mistakes.get(class_name, [])
        if not items:
            parts.append(f"<div><p><b>{esc(bilingual(k))}</b>: no mistakes.</p></div>")
            continue
        tiles = "".join(face(faces[item["index"]],
                             [f"row {item['row_number']}", *_answer_lines(item["answers"]),
                              *_vote_lines(item)],
                             index=item["index"], true_class=class_name)
                        for item in items)
        parts.append(f"<div><p><b>truly {esc(bilingual(k))}</b>, {esc(name)} said "
                     f"otherwise (most confident first):</p>"
                     f'<div class="gallery" data-gallery="mistakes-{esc(name)}-{class_name}">'
                     f"{tiles}</div></div>")
    return '<div class="columns">' + "\n".join(parts) + "</div>"


# ----------------------------------------------------------------------------- ensemble

def blessed_only(blessed: Optional[Mapping[str, Any]]) -> str:
    """What the served ensemble will do when held-back models are not served."""
    if not blessed:
        return ""
    return (f'<p class="banner info">Held-back models are not pushed, so the client combines '
            f"the blessed ones only ({esc(', '.join(blessed['models']))}): accuracy "
            f"{number(blessed['accuracy'], 'ensemble_blessed/accuracy')}, sent to review "
            f"{number(blessed['human_review_rate'], 'ensemble_blessed/human_review_rate', 1, True)}"
            ". The numbers below combine every candidate.</p>")


def ensemble_section(ensemble: Mapping[str, Any], faces: Mapping[int, np.ndarray],
                     blessed: Optional[Mapping[str, Any]] = None) -> str:
    review = ensemble.get("review_examples", [])
    shown = (f"<p>The first {len(review)} of {count(ensemble['reviewed'], 'ensemble/reviewed')}"
             f" faces sent to review:</p>{ensemble_gallery('review', review, faces)}"
             if review else "<p>No face was sent to review.</p>")
    closest = ensemble.get("closest_calls", [])
    if closest:
        shown += ("<h3>Closest calls decided without a person</h3><p class=\"muted\">The "
                  "models disagreed and the most confident one won by a gap above the tie "
                  "tolerance; smallest gaps first.</p>"
                  + ensemble_gallery("closest", closest, faces))
    return ("<h2 id=\"ensemble\">Ensemble (the rule the product serves)</h2>"
            + blessed_only(blessed) +
            f"<p>Models {esc(', '.join(ensemble['models']))}; the most confident answer wins; "
            f"disagreeing answers whose confidences are within "
            f"{number(ensemble['tie_tolerance'], 'ensemble/tie_tolerance', 2)} "
            "go to a person.</p><div>"
            f'<span class="stat">agreement <b>'
            f"{number(ensemble['agreement_rate'], 'ensemble/agreement_rate', 1, True)}</b></span>"
            f'<span class="stat">sent to human review <b>'
            f"{number(ensemble['human_review_rate'], 'ensemble/human_review_rate', 1, True)}"
            "</b></span>"
            f'<span class="stat">accuracy on faces decided alone <b>'
            f"{number(ensemble['accuracy_non_reviewed'], 'ensemble/accuracy_non_reviewed', 3)}"
            "</b></span>"
            f'<span class="stat">accuracy on all faces <b>'
            f"{number(ensemble['accuracy'], 'ensemble/accuracy')}</b></span></div>"
            + confusion_chart("confusion-ensemble", ensemble["confusion_matrix"],
                              "ensemble: confusion matrix")
            + "<h3>Calibration of the ensemble's answer</h3>"
            + calibration_block("ensemble", ensemble.get("calibration"), "ensemble/calibration")
            + "<h3>Faces sent to human review</h3>" + shown)


def ensemble_gallery(name: str, items: list[Mapping[str, Any]],
                     faces: Mapping[int, np.ndarray]) -> str:
    tiles = "".join(face(faces[item["index"]],
                         [f"row {item['row_number']}", f"true: {item['true_class']}",
                          *_answer_lines(item["answers"]),
                          f"decision: {item['decision']}" + (
                              f" (gap {item['gap']:.2f})" if item.get("gap") is not None
                              else "")],
                         index=item["index"], true_class=item["true_class"])
                    for item in items)
    return f'<div class="gallery" data-gallery="{esc(name)}">{tiles}</div>'


def thresholds_section(thresholds: Mapping[str, Any]) -> str:
    return ("<h2>Thresholds (EvalConfig)</h2>"
            + table(["setting", "value"], [[k, json.dumps(v)] for k, v in thresholds.items()]))
