"""Synthetic FER+ votes for a FER-2013-format CSV: a `fer2013new.csv` look-alike.

Microsoft's real vote file labels the real faces; the synthetic faces (pipeline/synthetic.py)
need votes of their own, so tests, demos and benchmarks never depend on a real file. Ten
votes per row, in FER+'s columns and order: most go to the row's class, the rest to the
class it is most often confused with and a little to the others; a few faces get contempt
as their (plural) majority, a few are mostly unknown or not-a-face, and rarely a face has a
vote of `unknown`. Same CSV and seed, same bytes.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from fer_pipeline.core.contract import CLASS_NAMES, FERPLUS_COLUMNS, FERPLUS_FILE_COLUMN

__all__ = ["FERPLUS_HEADER", "generate_ferplus_votes"]

FERPLUS_HEADER = "Usage,Image name," + ",".join(FERPLUS_COLUMNS)
VOTES_PER_FACE = 10
# The class a face of each class is most often mistaken for (FER+'s confusion pattern).
_NEIGHBOUR = {"angry": "disgust", "disgust": "angry", "fear": "surprise", "happy": "neutral",
              "sad": "neutral", "surprise": "fear", "neutral": "sad"}


def _probabilities(label: int, rng: np.random.Generator, contempt: bool,
                   not_face: bool) -> np.ndarray:
    """A probability over FERPLUS_COLUMNS for one face's ten voters."""
    p = np.full(len(FERPLUS_COLUMNS), 0.01)
    if not_face:
        p[FERPLUS_COLUMNS.index("NF")] = 0.6
        p[FERPLUS_COLUMNS.index("unknown")] = 0.3
        return p / p.sum()
    name = CLASS_NAMES[label]
    agree = rng.uniform(0.55, 0.95)    # how readable the face is to the crowd
    p[FERPLUS_COLUMNS.index(FERPLUS_FILE_COLUMN[name])] += agree
    p[FERPLUS_COLUMNS.index(FERPLUS_FILE_COLUMN[_NEIGHBOUR[name]])] += (1 - agree) * 0.7
    p[FERPLUS_COLUMNS.index("unknown")] += 0.02
    if contempt:
        p[FERPLUS_COLUMNS.index("contempt")] += agree + 0.2
    return p / p.sum()


def generate_ferplus_votes(csv_path: str, out_path: str, seed: int = 0,
                           contempt_fraction: float = 0.03,
                           not_face_fraction: float = 0.01) -> dict[str, int]:
    """Writes votes for every non-blank data row of `csv_path` (same rows, same order, the
    CSV's Usage copied); returns counts: rows, faces pushed towards contempt, mostly-not-a-face rows.

    A row whose emotion cannot be read gets votes as if it were neutral: the vote file must
    still pair with every row, as the real one does."""
    rng = np.random.default_rng([seed, 1608_01041])
    counts = {"rows": 0, "contempt": 0, "not_face": 0}
    lines = [FERPLUS_HEADER]
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = [h.strip().lower() for h in next(csv.reader([f.readline()]))]
        emotion_at = header.index("emotion") if "emotion" in header else None
        usage_at = header.index("usage") if "usage" in header else None
        for raw in f:
            if not raw.strip():
                continue
            fields = next(csv.reader([raw.rstrip("\r\n")]), [])
            text = fields[emotion_at].strip() if emotion_at is not None and \
                emotion_at < len(fields) else ""
            label = int(text) if text.isdigit() and int(text) < len(CLASS_NAMES) else 6
            usage = fields[usage_at].strip() if usage_at is not None and \
                usage_at < len(fields) else "Training"
            draw = rng.random()
            not_face = draw < not_face_fraction
            contempt = not not_face and draw < not_face_fraction + contempt_fraction
            votes = rng.multinomial(VOTES_PER_FACE, _probabilities(label, rng, contempt,
                                                                   not_face))
            counts["rows"] += 1
            counts["not_face"] += int(not_face)
            counts["contempt"] += int(contempt)
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow(
                [usage, f"fer{counts['rows'] - 1:07d}.png", *votes.tolist()])
            lines.append(out.getvalue())
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts
