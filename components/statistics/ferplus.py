"""The statistics page's FER+ section: how often FER-2013's label and FER+'s majority agree.

Only when ingest joined FER+ votes (its output holds `ferplus.json`). Every example of
every split is read, but only its two label features, so the 35,887 faces of FER-2013
cost about a second. Per FER-2013 class: faces, how many FER+'s majority gives the same
class, how many of them have a clear majority, and where the others went.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS, EXAMPLES_PATTERN,
                                        FEATURE_FERPLUS_CLEAR, FEATURE_FERPLUS_MAJORITY,
                                        FEATURE_LABEL, FERPLUS_FILE)
from fer_pipeline.core.html_page import count, esc, table

__all__ = ["ferplus_agreement", "ferplus_section"]


def _labels(pattern: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import tensorflow as tf   # the page's other readers import it the same way

    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            FEATURE_FERPLUS_MAJORITY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            FEATURE_FERPLUS_CLEAR: tf.io.FixedLenFeature([], tf.int64, default_value=0)}
    files = fileio.glob(pattern)
    parts: list[tuple[np.ndarray, ...]] = []
    if files:
        for batch in tf.data.TFRecordDataset(files).batch(4096).map(
                lambda s: tf.io.parse_example(s, spec)).as_numpy_iterator():
            parts.append((batch[FEATURE_LABEL], batch[FEATURE_FERPLUS_MAJORITY],
                          batch[FEATURE_FERPLUS_CLEAR]))
    if not parts:
        return (np.zeros(0, np.int64),) * 3
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore


def ferplus_agreement(examples_dir: str, splits: list[str]) -> Optional[dict[str, Any]]:
    """Per FER-2013 class over all `splits`: faces, FER+ agreeing, clear, FER+'s choices."""
    summary_path = fileio.join(examples_dir, FERPLUS_FILE)
    if not fileio.exists(summary_path):
        return None
    label, majority, clear = (np.concatenate(arrays) for arrays in zip(
        *(_labels(fileio.join(examples_dir, split, EXAMPLES_PATTERN)) for split in splits)))
    voted = majority >= 0
    label, majority, clear = label[voted], majority[voted], clear[voted]
    per_class = {}
    for k, name in enumerate(CLASS_NAMES):
        mine = label == k
        chosen = np.bincount(majority[mine], minlength=len(CLASS_NAMES_FERPLUS))
        per_class[name] = {
            "faces": int(mine.sum()), "agree": int((majority[mine] == k).sum()),
            "clear": int(clear[mine].sum()),
            "ferplus_majority": {CLASS_NAMES_FERPLUS[j]: int(n) for j, n in enumerate(chosen)
                                 if n}}
    return {"summary": fileio.read_json(summary_path), "faces": int(voted.sum()),
            "agree": int((label == majority).sum()), "per_class": per_class}


def ferplus_section(agreement: Optional[Mapping[str, Any]]) -> str:
    if agreement is None:
        return ""
    rows = []
    for name, c in agreement["per_class"].items():
        share = f"{c['agree'] / c['faces']:.1%}" if c["faces"] else "–"
        others = ", ".join(f"{other} {n}" for other, n in sorted(
            c["ferplus_majority"].items(), key=lambda item: -item[1]) if other != name)
        rows.append([esc(name), count(c["faces"], f"ferplus/per_class/{name}/faces"),
                     count(c["agree"], f"ferplus/per_class/{name}/agree"), share,
                     count(c["clear"], f"ferplus/per_class/{name}/clear"), esc(others)])
    summary = agreement["summary"]
    quarantined = sum(summary.get("quarantined", {}).values())
    return ("<h2 id=\"ferplus\">FER-2013 labels against FER+ votes</h2>"
            f"<p>FER+'s majority agrees with FER-2013's label on "
            f"{count(agreement['agree'], 'ferplus/agree')} of "
            f"{count(agreement['faces'], 'ferplus/faces')} faces; training uses "
            f"<code>{esc(summary.get('mode'))}</code> targets over "
            f"{esc(summary.get('classes'))} classes; {quarantined} faces were quarantined "
            "for their votes (see the rejected rows).</p>"
            + table(["FER-2013 class", "faces", "FER+ agrees", "share", "clear majority",
                     "FER+'s majority otherwise"], rows, raw=True))
