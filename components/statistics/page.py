"""The statistics page (statistics/statistics.html): what the data looks like, for a person.

Rendering only: components/statistics/executor.py gathers every number (from TFDV's statistics,
ExampleGen's files and manifest, and the validate step's checks) into one JSON-able dict,
which is embedded in the page as its source, and the faces as uint8 arrays. Sections, top
to bottom: the validation verdict; ingest counts; per split the label distribution, the
pixel-intensity histogram, the mean face of each class and sample faces per class; rejected
rows by reason; cross-split duplicates with their faces; the augmented training split
(counts before/after, originals beside their copies). Everything is inline (offline).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.core.html_page import (bilingual, chart, count, document, esc, face, number,
    pyplot, table)
from fer_pipeline.core.contract import CLASS_NAMES, NUM_CLASSES
from fer_pipeline.components.statistics.ferplus import ferplus_section

SPLIT_COLORS = {"train": "#1e63b5", "validation": "#f28e2b", "test": "#59a14f"}


def render_statistics_page(data: Mapping[str, Any], faces: Mapping[str, np.ndarray]) -> str:
    """The self-contained page; `faces` maps the keys statistics.py assigns to 48x48 uint8."""
    sections = ["<h1>FER-2013 data statistics</h1>",
                verdict_section(data["validation"]),
                ingest_section(data.get("ingest"), data["splits"]),
                label_overview(data["splits"]),
                *(split_section(split, split_data, faces, data["limits"])
                  for split, split_data in data["splits"].items()),
                rejected_section(data["rejected"]),
                ferplus_section(data.get("ferplus")),
                duplicates_section(data.get("duplicates"), faces),
                augmented_section(data.get("augmented"), faces)]
    return document("FER-2013 data statistics", sections, source_json=data)


# ----------------------------------------------------------------------------- verdict

def verdict_section(verdict: Mapping[str, Any]) -> str:
    if not verdict.get("checked"):
        return (f'<section class="banner warn" id="verdict"><h2>Validation</h2>'
                f"<p class=\"verdict\">{esc(verdict['summary'])}</p></section>")
    css = "bad" if verdict["problems"] else "ok"
    anomalies = [[esc(split), esc(feature), esc(text)]
                 for split, found in verdict["anomalies"].items()
                 for feature, text in found.items()]
    drift = [[esc(split), number(d["linf"], f"validation/drift/{split}/linf", 4),
              esc(f"{verdict['threshold']}"), "DRIFT" if d["drifted"] else "ok"]
             for split, d in verdict["drift"].items()]
    parts = [f'<section class="banner {css}" id="verdict"><h2>Validation</h2>',
             f"<p class=\"verdict\">{esc(verdict['summary'])}</p>",
             f"<p class=\"muted\">The validate step's checks: schema "
             f"<code>{esc(verdict['schema'])}</code>; label drift is the L-infinity distance "
             f"between a split's label distribution and {esc(verdict['baseline'])}'s.</p>"]
    parts.append(table(["split", "feature", "schema anomaly"], anomalies, raw=True)
                 if anomalies else "<p>Schema: no anomalies in any split.</p>")
    if drift:
        parts.append(table(["split", f"label drift vs {verdict['baseline']} (L-inf)",
                            "threshold", "verdict"], drift, raw=True))
    return "".join(parts) + "</section>"


# ----------------------------------------------------------------------------- overview

def ingest_section(ingest: Optional[Mapping[str, Any]], splits: Mapping[str, Any]) -> str:
    per_split = ", ".join(
        f"{esc(split)} {count(d['num_examples'], f'splits/{split}/num_examples')}"
        for split, d in splits.items())
    text = f"<p>Examples per split (TFDV): {per_split}.</p>"
    if ingest and "rows_read" in ingest:
        text += (f"<p>Ingest read {count(ingest['rows_read'], 'ingest/rows_read')} CSV rows "
                 f"and rejected {count(ingest.get('rows_rejected', 0), 'ingest/rows_rejected')}"
                 f" (split mode: {esc(ingest.get('split_mode', '?'))}).</p>")
    return "<h2>Data</h2>" + text


def label_overview(splits: Mapping[str, Any]) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(10, 3.4))
    names = list(splits)
    width = 0.8 / max(len(names), 1)
    positions = np.arange(NUM_CLASSES)
    shares = {}
    for i, split in enumerate(names):
        counts = np.array([splits[split]["labels"][c] for c in CLASS_NAMES], dtype=float)
        shares[split] = (counts / counts.sum() * 100).round(2).tolist() if counts.sum() else \
            [0.0] * NUM_CLASSES
        axes.bar(positions + (i - (len(names) - 1) / 2) * width, shares[split], width,
                 label=split, color=SPLIT_COLORS.get(split))
    axes.set_xticks(positions, [bilingual(k) for k in range(NUM_CLASSES)], rotation=20,
                    ha="right", fontsize=9)
    axes.set_ylabel("% of the split")
    axes.set_title("label distribution per split (share of each split's faces)")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    rows = [[esc(bilingual(k))] + [count(splits[s]["labels"][c], f"splits/{s}/labels/{c}")
                                   for s in names]
            for k, c in enumerate(CLASS_NAMES)]
    return ("<h2>Labels</h2>" + chart("labels-all", figure,
                                      {"splits": names, "percent": shares},
                                      "share of each class per split")
            + table(["class"] + names, rows, raw=True))


# ----------------------------------------------------------------------------- per split

def split_section(split: str, data: Mapping[str, Any], faces: Mapping[str, np.ndarray],
                  limits: Mapping[str, Any]) -> str:
    path = f"splits/{split}"
    pixels = data["pixels"]
    return "\n".join([
        f'<h2 id="split-{esc(split)}">{esc(split)}: '
        f"{count(data['num_examples'], path + '/num_examples')} faces</h2>",
        '<div class="row">', labels_chart(split, data["labels"]),
        histogram_chart(split, pixels["histogram"]), "</div>",
        f"<p>Pixel intensity: mean {number(pixels['mean'], path + '/pixels/mean', 1)}, "
        f"standard deviation {number(pixels['std_dev'], path + '/pixels/std_dev', 1)} "
        "(TFDV, all faces of the split).</p>",
        mean_faces(split, data, faces, limits),
        sample_grid(split, data, faces),
        feature_table(split, data["features"]),
    ])


def labels_chart(split: str, labels: Mapping[str, int]) -> str:
    plt = pyplot()
    counts = [labels[c] for c in CLASS_NAMES]
    figure, axes = plt.subplots(figsize=(5.6, 3.2))
    bars = axes.bar(range(NUM_CLASSES), counts, color=SPLIT_COLORS.get(split, "#1e63b5"))
    axes.bar_label(bars, fontsize=8)
    axes.set_xticks(range(NUM_CLASSES), [bilingual(k) for k in range(NUM_CLASSES)],
                    rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("faces")
    axes.set_title(f"{split}: faces per class")
    return chart(f"labels-{split}", figure, {"classes": list(CLASS_NAMES), "counts": counts})


def histogram_chart(split: str, buckets: list[Mapping[str, float]]) -> str:
    if not buckets:
        return '<p class="banner bad">TFDV has no pixel histogram for this split.</p>'
    plt = pyplot()
    lows = [b["low"] for b in buckets]
    widths = [b["high"] - b["low"] for b in buckets]
    counts = [b["count"] for b in buckets]
    figure, axes = plt.subplots(figsize=(5.6, 3.2))
    axes.bar(lows, counts, width=widths, align="edge", color="#777", edgecolor="white")
    axes.set_xlabel("pixel intensity (0 black .. 255 white)")
    axes.set_ylabel("pixels")
    axes.set_title(f"{split}: pixel intensity histogram")
    return chart(f"pixels-{split}", figure, {"buckets": [dict(b) for b in buckets]})


def mean_faces(split: str, data: Mapping[str, Any], faces: Mapping[str, np.ndarray],
               limits: Mapping[str, Any]) -> str:
    tiles = "".join(
        face(faces[f"mean/{split}/{k}"],
             [bilingual(k), f"mean of {data['mean_face_counts'][c]}"], class_name=c)
        for k, c in enumerate(CLASS_NAMES) if f"mean/{split}/{k}" in faces)
    bound = (f"over all {data['scanned']} faces" if data["scanned"] >= data["num_examples"]
             else f"over the first {data['scanned']} faces of the split in file order "
                  f"(the page reads at most {limits['max_scanned_examples']} per split)")
    return (f"<h3>Mean face per class</h3><p class=\"muted\">Pixel-wise mean, {esc(bound)}."
            f"</p><div class=\"gallery\" data-gallery=\"mean-{esc(split)}\">{tiles}</div>")


def sample_grid(split: str, data: Mapping[str, Any], faces: Mapping[str, np.ndarray]) -> str:
    rows = []
    for k, c in enumerate(CLASS_NAMES):
        tiles = "".join(face(faces[f"sample/{split}/{k}/{i}"], [f"row {row}"],
                             class_name=c, row=row)
                        for i, row in enumerate(data["sample_rows"][c]))
        rows.append(f"<tr><th>{esc(bilingual(k))}</th><td><div class=\"gallery\" "
                    f"data-gallery=\"samples-{esc(split)}-{c}\">{tiles or 'none'}</div></td></tr>")
    return ("<h3>Sample faces per class</h3><p class=\"muted\">The first faces of each class "
            "in file order; row is the CSV line.</p><table>" + "".join(rows) + "</table>")


def feature_table(split: str, features: list[Mapping[str, Any]]) -> str:
    rows = [[f["feature"], f["type"], f["present"], f["missing"], f["values_per_example"],
             f["min"], f["max"], f["unique"]] for f in features]
    return (f"<details><summary>{esc(split)}: every feature (TFDV)</summary>"
            + table(["feature", "type", "present", "missing", "values per example", "min",
                     "max", "unique"], rows) + "</details>")


# ----------------------------------------------------------------------------- ingest problems

def rejected_section(rejected: Mapping[str, Any]) -> str:
    if not rejected["total"]:
        return "<h2>Rejected rows</h2><p>Ingest rejected no row.</p>"
    reasons = [[esc(reason), count(n, f"rejected/by_reason/{reason}")]
               for reason, n in rejected["by_reason"].items()]
    shown = [[r["line_number"], r["reason"], r["raw_line"]] for r in rejected["shown"]]
    return ("<h2>Rejected rows</h2>"
            f"<p>{count(rejected['total'], 'rejected/total')} rows did not become examples "
            "(<code>examples/rejected/rejected_rows.csv</code>). By reason:</p>"
            + table(["reason", "rows"], reasons, raw=True)
            + f"<p class=\"muted\">The first {len(shown)}:</p>"
            + table(["CSV line or image file", "reason", "raw line (shortened)"], shown))


def duplicates_section(duplicates: Optional[Mapping[str, Any]],
                       faces: Mapping[str, np.ndarray]) -> str:
    if duplicates is None:
        return "<h2>Cross-split duplicates</h2><p>No duplicates.json in the examples.</p>"
    if not duplicates["images"]:
        return "<h2>Cross-split duplicates</h2><p>No image appears in more than one split.</p>"
    tiles = []
    for i, entry in enumerate(duplicates["shown"]):
        lines = [f"line {r['line_number']} {r['split']}"
                 + (" (removed)" if r["line_number"] in entry["removed_line_numbers"] else "")
                 for r in entry["rows"]]
        if entry["face"]:
            tiles.append(face(faces[f"duplicate/{i}"], lines, duplicate=i))
        else:
            tiles.append(f'<div class="face">{"<br>".join(esc(x) for x in lines)}</div>')
    return ("<h2>Cross-split duplicates</h2>"
            f"<p>{count(duplicates['images'], 'duplicates/images')} images appear in more "
            f"than one split; {count(duplicates['rows_removed'], 'duplicates/rows_removed')} "
            f"rows were removed. Policy: {esc(duplicates['policy'])}.</p>"
            f'<div class="gallery" data-gallery="duplicates">{"".join(tiles)}</div>')


# ----------------------------------------------------------------------------- augmented

def augmented_section(augmented: Optional[Mapping[str, Any]],
                      faces: Mapping[str, np.ndarray]) -> str:
    if augmented is None:
        return ("<h2>Augmented training split</h2><p>Not part of this statistics run "
                "(no augmented split given).</p>")
    before, after = augmented["labels_before"], augmented["labels_after"]
    rows = [[esc(bilingual(k)),
             count(before[c], f"augmented/labels_before/{c}") if before else "-",
             count(after[c], f"augmented/labels_after/{c}")]
            for k, c in enumerate(CLASS_NAMES)]
    pairs = "".join(
        f'<div class="pair" data-pair="{i}">'
        + face(faces[f"augmented/{i}/original"], [f"original row {p['source_row']}",
                                                  p["class_name"]])
        + face(faces[f"augmented/{i}/copy"], augmentation_steps(p["augmentation"]))
        + "</div>" for i, p in enumerate(augmented["pairs"]))
    return ("<h2>Augmented training split</h2>"
            f"<p>{count(augmented['num_examples'], 'augmented/num_examples')} training faces "
            "after augmentation (originals + copies; validation and test are never "
            "augmented).</p>"
            + before_after_chart(before, after)
            + table(["class", "before (train)", "after (augmented)"], rows, raw=True)
            + "<h3>Originals beside their augmented copies</h3>"
            + f'<div class="gallery" data-gallery="augmented">{pairs}</div>')


def augmentation_steps(tag: str) -> list[str]:
    """"copy:1,flip,shift:(-3,2)" -> ["copy:1", "flip", "shift:(-3,2)"] (commas inside
    parentheses belong to the step)."""
    return re.split(r",(?![^(]*\))", tag)


def before_after_chart(before: Optional[Mapping[str, int]], after: Mapping[str, int]) -> str:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 3.2))
    positions = np.arange(NUM_CLASSES)
    series = {"after": [after[c] for c in CLASS_NAMES]}
    if before:
        series = {"before": [before[c] for c in CLASS_NAMES], **series}
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        bars = axes.bar(positions + (i - (len(series) - 1) / 2) * width, values, width,
                        label=label, color="#bbb" if label == "before" else "#1e63b5")
        axes.bar_label(bars, fontsize=7)
    axes.set_xticks(positions, [bilingual(k) for k in range(NUM_CLASSES)], rotation=20,
                    ha="right", fontsize=8)
    axes.set_ylabel("training faces")
    axes.set_title("training faces per class, before and after augmentation")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return chart("augmented-counts", figure, series)
