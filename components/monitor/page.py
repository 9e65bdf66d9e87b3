"""The monitoring page (monitoring.html): is the served traffic still what the models know?

Rendering only: components/monitor/executor.py computes every number and hands this module the
content of monitoring.json plus the pixels of the faces the page shows. Sections, top to
bottom:

1. the verdict: drift or not, and the one line that says which thresholds were crossed;
2. every check: the distance TFDV measured against its threshold, alerts first;
3. what the models answered in the window beside what they answered on the test split:
   class mix per model, mean confidence, the ensemble's review rate;
4. per time window: request count, class mix, mean confidence, review rate and each
   distance against its threshold;
5. each time window against the one before it (TFDV's drift comparator);
6. the window's lowest-confidence faces, with every model's answer;
7. where the reference came from (lineage), the records not used and the thresholds.

Numbers shown as text carry `data-path` into monitoring.json; charts carry their points
(core/html_page.py), so tests compare the page with the JSON.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fer_pipeline.core.html_page import (bilingual, chart, count, document, esc, face, number,
    pyplot, table)

TITLE = "FER served traffic: monitoring"


def _scrolling(table_html: str) -> str:
    """A table in a box that scrolls sideways by itself when the table is wider than the
    page, so the page never does: the per-window table has a column per model and per
    check (17 with two models, about 1,760 px wide), wider than a 1,200 px window."""
    return f'<div class="table-box" style="overflow-x:auto">{table_html}</div>'


def render_monitoring_page(record: Mapping[str, Any],
                           faces: Sequence[Mapping[str, Any]] = ()) -> str:
    """The self-contained page. `faces`: dicts with `pixels` (uint8 48x48) and `answers`
    ({model: {class_name, confidence}}), shown as the window's least confident faces."""
    sections = [
        f"<h1>{esc(TITLE)}</h1>",
        verdict_banner(record),
        checks_section(record),
        answers_section(record),
        windows_section(record),
        drift_section(record),
        faces_section(faces),
        reference_section(record),
    ]
    return document(TITLE, sections)


def verdict_banner(record: Mapping[str, Any]) -> str:
    verdict = record["verdict"]
    css = {"ok": "ok", "drift": "bad"}.get(verdict, "warn")
    headline = {"ok": "No drift", "drift": "DRIFT: retrain or investigate"}.get(
        verdict, "Too few requests to judge")
    window = record["window"]
    served = ", ".join(f"{esc(m)} v{count(s['version'], f'served/{m}/version')}"
                       for m, s in record["served"].items())
    return (f'<section class="banner {css}" id="verdict" data-verdict="{esc(verdict)}">'
            f"<h2>{esc(headline)}</h2>"
            f'<p class="verdict">{esc(record["summary"])}</p>'
            f"<p>{count(record['faces'], 'faces')} faces in "
            f"{count(record['records'], 'records')} logged requests, "
            f"{esc(window['first_request'] or '?')} to {esc(window['last_request'] or '?')}"
            f" (window asked: {esc(window['since'] or 'start')} to "
            f"{esc(window['until'] or 'end')}). Served: {served}.</p></section>")


def _status(check: Mapping[str, Any]) -> str:
    state = "ALERT" if check["alert"] else "ok"
    return (f'<span class="verdict" data-check="{esc(check["name"])}" '
            f'data-alert="{str(check["alert"]).lower()}">{state}</span>')


def checks_section(record: Mapping[str, Any]) -> str:
    checks = list(enumerate(record["checks"]))
    ordered = sorted(checks, key=lambda item: (not item[1]["alert"], item[0]))
    rows = [[_status(c), esc(c["name"]), esc(c["description"]), esc(c["measure"]),
             number(c["distance"], f"checks/{i}/distance"),
             number(c["threshold"], f"checks/{i}/threshold")]
            for i, c in ordered]
    plt = pyplot()
    names = [c["name"] for _, c in checks]
    ratios = [(c["distance"] or 0.0) / c["threshold"] if c["threshold"] else
              float(bool(c["distance"])) * 2 for _, c in checks]
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(names) + 1))
    axes.barh(range(len(names)), ratios,
              color=["#c62828" if c["alert"] else "#2e7d32" for _, c in checks])
    axes.axvline(1.0, color="black", linestyle="--", label="threshold")
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("distance / threshold (above 1: alert)")
    axes.legend(fontsize=8)
    return ("<h2>Checks</h2><p>Each distance is TFDV's: the served faces against the training "
            "split (image features, every pixel's histogram), the answers against the same "
            "models' answers on the test split.</p>"
            + _scrolling(table(["status", "check", "what", "measure", "distance", "threshold"],
                              rows, raw=True))
            + chart("checks", figure, {"checks": names, "ratio": ratios},
                    "each check's distance as a multiple of its threshold"))


def answers_section(record: Mapping[str, Any]) -> str:
    served, expected = record["traffic"], record["expected"]
    parts = ["<h2>Answers: this window and the test split</h2>"]
    for model in served["class_mix"]:
        if model not in expected["class_mix"]:
            continue
        names = list(served["class_mix"][model])      # the model's: 7, or FER+'s 8
        window = [served["class_mix"][model][c] for c in names]
        test = [expected["class_mix"][model].get(c) for c in names]
        rows = [[esc(bilingual(k)),
                 number(window[k], f"traffic/class_mix/{model}/{name}", 1, percent=True),
                 number(test[k], f"expected/class_mix/{model}/{name}", 1, percent=True)]
                for k, name in enumerate(names)]
        plt = pyplot()
        figure, axes = plt.subplots(figsize=(7, 2.8))
        positions = np.arange(len(names))
        axes.bar(positions - 0.2, window, 0.4, label="this window")
        axes.bar(positions + 0.2, test, 0.4, label="test split")
        axes.set_xticks(positions, [bilingual(k) for k in range(len(names))], rotation=25,
                        ha="right", fontsize=8)
        axes.set_ylabel("share of answers")
        axes.set_title(f"{model}: predicted classes")
        axes.legend(fontsize=8)
        parts += [f"<h3>{esc(model)}</h3>",
                  f'<div><span class="stat">mean confidence <b>'
                  f'{number(served["mean_confidence"][model], f"traffic/mean_confidence/{model}")}'
                  f'</b> (test split '
                  f'{number(expected["mean_confidence"][model], f"expected/mean_confidence/{model}")}'
                  f")</span></div>",
                  '<div class="row">',
                  table(["class", "this window", "test split"], rows, raw=True),
                  chart(f"class-mix-{model}", figure,
                        {"classes": names, "window": window, "test": test}),
                  "</div>"]
    parts.append(
        f'<p><span class="stat">human-review rate <b>'
        f'{number(served["review_rate"], "traffic/review_rate", 1, percent=True)}</b> '
        f'(test split {number(expected["review_rate"], "expected/review_rate", 1, percent=True)})'
        "</span> faces every served model answered whose answers disagree within "
        f"the tie tolerance ({record['tie_tolerance']:.2f}) go to a person.</p>")
    return "\n".join(parts)


def windows_section(record: Mapping[str, Any]) -> str:
    windows = record["windows"]
    if not windows:
        return "<h2>Per window</h2><p>No request carried a timestamp.</p>"
    thresholds = {c["name"]: c["threshold"] for c in record["checks"]}
    names = [n for n in thresholds if any(n in w["distances"] for w in windows)]
    models = list(record["served"])
    headers = ["window (UTC)", "faces",
               *[f"{m}: top class" for m in models], *[f"{m}: mean confidence" for m in models],
               "review rate", *[f"{n} (max {thresholds[n]:.2f})" for n in names]]
    rows = []
    for i, w in enumerate(windows):
        path = f"windows/{i}"
        cells = [esc(f"{w['start']} - {w['end'][11:]}"), count(w["faces"], f"{path}/faces")]
        for m in models:
            mix = w["class_mix"].get(m)
            top = max(mix, key=mix.get) if mix else None
            cells.append(f"{esc(top)} " + number(mix[top], f"{path}/class_mix/{m}/{top}", 0,
                                                 percent=True) if top else "-")
        for m in models:
            cells.append(number(w["mean_confidence"].get(m), f"{path}/mean_confidence/{m}"))
        cells.append(number(w["review_rate"], f"{path}/review_rate", 1, percent=True))
        for n in names:
            alert = n in w["alerts"]
            cell = number(w["distances"].get(n), f"{path}/distances/{n}")
            cells.append(f'<b class="bad">{cell}</b>' if alert else cell)
        rows.append(cells)
    return (f"<h2>Per window</h2><p>Windows of {record['thresholds']['window_minutes']:g} "
            "minutes; distances in bold red crossed their threshold (windows with fewer than "
            f"{record['thresholds']['min_requests']} faces never alert). The per-window "
            "distances leave out the pixel histogram.</p>"
            + _scrolling(table(headers, rows, raw=True)))


def drift_section(record: Mapping[str, Any]) -> str:
    """Each window's drift from the window before it, per check, against its threshold."""
    windows = [(i, w) for i, w in enumerate(record["windows"]) if w.get("drift")]
    intro = ("<h2 id=\"drift\">Drift: each window against the one before</h2><p>TFDV's drift "
             "comparator, with the thresholds of the checks above; distances in bold red "
             "crossed theirs (only between windows that both have at least "
             f"{record['thresholds']['min_requests']} faces).</p>")
    if not windows:
        return intro + "<p>Fewer than two windows with faces: nothing to compare.</p>"
    thresholds = {c["name"]: c["threshold"] for c in record["checks"]}
    names = [n for n in thresholds if any(n in w["drift"] for _, w in windows)]
    rows = []
    for i, w in windows:
        cells = [esc(f"{record['windows'][i - 1]['start']} -> {w['start']}")]
        for n in names:
            cell = number(w["drift"].get(n), f"windows/{i}/drift/{n}")
            cells.append(f'<b class="bad">{cell}</b>' if n in w["drift_alerts"] else cell)
        rows.append(cells)
    return intro + _scrolling(table(
        ["windows (UTC)", *[f"{n} (max {thresholds[n]:.2f})" for n in names]], rows, raw=True))


def faces_section(faces: Sequence[Mapping[str, Any]]) -> str:
    if not faces:
        return ""
    items = [face(f["pixels"], [f"{m}: {a['class_name']} {a['confidence']:.2f}"
                                for m, a in f["answers"].items()], row=f.get("row", ""))
             for f in faces]
    return ("<h2>The least confident faces of the window</h2>"
            f'<div class="gallery">{"".join(items)}</div>')


def reference_section(record: Mapping[str, Any]) -> str:
    reference = record["reference"]
    rows = [["training examples (train split)", esc(reference["examples_dir"])],
            ["training statistics", esc(reference["statistics_dir"])],
            *[[f"evaluation of {esc(m)} v{esc(reference['versions'].get(m, '?'))}", esc(d)]
              for m, d in reference["evaluations"].items()],
            ["train faces", count(reference["train_faces"], "reference/train_faces")],
            ["test faces", count(reference["test_faces"], "reference/test_faces")],
            ["request log files", esc(len(record["log_files"]))],
            ["records not monitored", esc(", ".join(f"{k}: {v}" for k, v in
                                                    record["skipped"].items()) or "none")],
            ["records that cannot be decoded or break the serving schema",
             esc(", ".join(f"{k}: {v}" for k, v in
                           record.get("bad_records", {}).items()) or "none")]]
    if record.get("ignored_models"):
        rows.append(["models without lineage (ignored)",
                     esc(", ".join(record["ignored_models"]))])
    if record.get("review_queue"):
        queue = record["review_queue"]
        rows.append(["sent to review", f"{count(queue['queued'], 'review_queue/queued')} "
                     f"queued in {esc(queue['dir'])}, {esc(queue['already_queued'])} "
                     "already there"])
    return ("<h2>Reference (found through lineage)</h2>"
            + _scrolling(table(["what", "where"], rows, raw=True)))
