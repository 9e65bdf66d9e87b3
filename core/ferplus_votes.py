"""FER+ votes: reading Microsoft's `fer2013new.csv` beside a FER-2013 CSV, and what the votes
of one face mean (its majority, whether that majority is clear, the vote distribution).

`fer2013new.csv` holds the same rows in the same order as `fer2013.csv`, with ten crowd
votes per face: `Usage, Image name, neutral, happiness, surprise, sadness, anger, disgust,
fear, contempt, unknown, NF` (Barsoum et al. 2016, arXiv:1608.01041). The two files are
paired row by row (blank lines skipped in both, as ingest skips them); a different number
of rows or a row whose Usage differs means they are not the same faces, so the run stops
with one line naming the first mismatch. Votes are kept in OUR order
(core/contract.FERPLUS_VOTE_ORDER): the classes of CLASS_NAMES_FERPLUS, then unknown and
not-a-face.

Ingest (components/example_gen/ferplus.py), transform and evaluation share these rules,
so they live here, below the components.
"""
from __future__ import annotations

import csv
from typing import Iterator, Optional, Union

import numpy as np
from apache_beam.io.filesystems import FileSystems

from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS, FERPLUS_COLUMNS,
                                        FERPLUS_FILE_COLUMN, FERPLUS_VOTE_ORDER)
from fer_pipeline.core.errors import InputDataError

__all__ = ["FERPLUS_MODES", "FERPLUS_CLASS_COUNTS", "QUARANTINE_CODES", "BAD_VOTES",
           "Judged", "ferplus_metrics", "judge", "read_votes", "to_our_order",
           "vote_distribution", "vote_majority", "votes_by_class"]

FERPLUS_MODES = ("majority", "probability", "crossentropy")
FERPLUS_CLASS_COUNTS = (len(CLASS_NAMES), len(CLASS_NAMES_FERPLUS))
# Rejection reasons of faces whose votes say they should not be trained on: deliberate
# label decisions (like duplicates), not bad input, so they do not count against
# ingest.max_rejected_fraction. A vote row that cannot be read (BAD_VOTES) does.
NOT_A_FACE = "ferplus_not_a_face"
NO_VOTES = "ferplus_no_votes"
BAD_VOTES = "ferplus_bad_votes"
QUARANTINE_CODES = (NOT_A_FACE, NO_VOTES)

# Position of each of our vote slots in the file's vote columns.
_FROM_FILE = [FERPLUS_COLUMNS.index(FERPLUS_FILE_COLUMN[slot]) for slot in FERPLUS_VOTE_ORDER]
assert len(_FROM_FILE) == len(FERPLUS_VOTE_ORDER)
_UNKNOWN, _NOT_FACE = FERPLUS_VOTE_ORDER.index("unknown"), FERPLUS_VOTE_ORDER.index("not_face")

# One face's verdict: (votes in our order, majority index, clear) or a rejection reason.
Judged = Union[tuple[tuple[int, ...], int, bool], str]


def to_our_order(file_votes: list[int]) -> tuple[int, ...]:
    """The ten vote columns in the file's order -> FERPLUS_VOTE_ORDER."""
    return tuple(file_votes[i] for i in _FROM_FILE)


def judge(votes: tuple[int, ...], num_classes: int) -> Judged:
    """(votes, majority, clear) for a face to train on, or the reason it is quarantined.

    A face is quarantined when more than half of all its votes are unknown or not-a-face,
    or when no vote names one of the classes kept (with 7 classes contempt's votes are
    dropped: they count towards the total only). The majority is the class with most votes (the
    first in our order on a tie); it is clear when it holds more than half of the emotion
    votes.
    """
    votes = tuple(votes)
    kept = votes[:num_classes]
    total = sum(votes)
    doubtful = votes[_UNKNOWN] + votes[_NOT_FACE]
    if total and doubtful * 2 > total:
        return (f"{NOT_A_FACE}: {doubtful} of {total} votes are unknown ({votes[_UNKNOWN]}) "
                f"or not a face ({votes[_NOT_FACE]})")
    if sum(kept) == 0:
        dropped = " (contempt's votes are dropped with ferplus_classes 7)" \
            if votes[len(CLASS_NAMES)] else ""
        return f"{NO_VOTES}: no vote for any of the {num_classes} classes{dropped}"
    majority = int(np.argmax(kept))
    return votes, majority, kept[majority] * 2 > sum(kept)


def vote_distribution(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [n, num_classes]: each face's emotion votes over the classes kept, summing to 1
    (unknown, not-a-face and, with 7 classes, contempt left out). Rows with no such vote
    are all zero."""
    kept = np.asarray(votes, np.float32).reshape(-1, len(FERPLUS_VOTE_ORDER))[:, :num_classes]
    sums = kept.sum(axis=1, keepdims=True)
    return np.divide(kept, sums, out=np.zeros_like(kept), where=sums > 0)


def _data_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line after the header."""
    with FileSystems.open(path) as f:
        f.readline()
        for number, raw in enumerate(f, start=2):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if text.strip():
                yield number, text


def _fields(text: str) -> list[str]:
    # A FER-2013 line is ~7 KB of pixels: a plain split when nothing is quoted is several
    # times faster than the csv module, and gives the same fields.
    return text.split(",") if '"' not in text else next(csv.reader([text]), [])


def _vote_header(votes_path: str) -> tuple[int, list[int], int]:
    """(Usage position, vote column positions in FERPLUS_COLUMNS order, field count)."""
    with FileSystems.open(votes_path) as f:
        text = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
    names = [n.strip().lower() for n in next(csv.reader([text]), [])]
    wanted = ["usage"] + [c.lower() for c in FERPLUS_COLUMNS]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputDataError(
            f"{votes_path}: header {text[:120]!r} lacks column(s) {missing}; expected FER+'s "
            f"fer2013new.csv (Usage,Image name,{','.join(FERPLUS_COLUMNS)})")
    return names.index("usage"), [names.index(c.lower()) for c in FERPLUS_COLUMNS], len(names)


def _parse_votes(fields: list[str], columns: list[int], count: int) -> tuple[int, ...] | str:
    if len(fields) != count:
        return f"{BAD_VOTES}: the vote row has {len(fields)} fields, the header {count}"
    values = []
    for name, position in zip(FERPLUS_COLUMNS, columns):
        text = fields[position].strip()
        if not text.isdigit():   # counts: no sign, no fraction
            return f"{BAD_VOTES}: {name} is {text[:20]!r}, not a vote count"
        values.append(int(text))
    return to_our_order(values)


def read_votes(votes_path: str, csv_path: str, usage_column: Optional[int],
               num_classes: int) -> dict[int, Judged]:
    """The verdict of every face of `csv_path`, keyed by its line number there.

    Streams both files once, row against row. Raises InputDataError (one line) on a bad
    vote-file header, a row whose Usage differs (when the CSV has a Usage column), or files
    with different numbers of rows, naming the first mismatch with both line numbers.
    """
    usage_at, columns, count = _vote_header(votes_path)
    verdicts: dict[int, Judged] = {}
    faces, votes = _data_lines(csv_path), _data_lines(votes_path)
    while True:
        face, vote = next(faces, None), next(votes, None)
        if face is None or vote is None:
            break
        fields = _fields(vote[1])
        if usage_column is not None:
            face_fields = _fields(face[1])
            usage = face_fields[usage_column].strip() if usage_column < len(face_fields) else ""
            theirs = fields[usage_at].strip() if usage_at < len(fields) else ""
            if usage != theirs:
                raise InputDataError(
                    f"{votes_path} line {vote[0]} (Usage {theirs[:20]!r}) does not match "
                    f"{csv_path} line {face[0]} (Usage {usage[:20]!r}): the vote file must "
                    "hold the same rows in the same order as the FER-2013 CSV")
        parsed = _parse_votes(fields, columns, count)
        verdicts[face[0]] = parsed if isinstance(parsed, str) else judge(parsed, num_classes)
    if face is not None or vote is not None:
        longer, line = (csv_path, face[0]) if face is not None else (votes_path, vote[0])
        raise InputDataError(
            f"{votes_path} and {csv_path} have different numbers of rows: {longer} line "
            f"{line} has no partner in the other file (after "
            f"{len(verdicts)} paired rows)")
    return verdicts


# ---------------------------------------------------------------------------------------
# Evaluation against the votes (components/evaluator/)

def ferplus_metrics(votes: np.ndarray, probs: np.ndarray) -> dict[str, float | int]:
    """A model's answers against the crowd: accuracy against FER+'s majority (over the
    model's classes, the first in our order on a tie, as ingest chose it) and the mean
    cross-entropy of its probabilities against the vote distribution."""
    width = probs.shape[1]
    distribution = vote_distribution(votes, width)
    majority = vote_majority(votes, width)
    picked = np.clip(probs, 1e-7, 1.0)
    return {"examples": int(len(votes)), "classes": int(width),
            "accuracy_majority": float((probs.argmax(axis=1) == majority).mean()),
            "cross_entropy": float(-(distribution * np.log(picked)).sum(axis=1).mean())}


def vote_majority(votes: np.ndarray, width: int) -> np.ndarray:
    """FER+'s majority of [n, 10] votes over the first `width` classes (the first in our
    order on a tie, as ingest chose it)."""
    return votes[:, :width].argmax(axis=1)


def votes_by_class(votes: np.ndarray) -> dict[str, int]:
    """One face's votes by name (FERPLUS_VOTE_ORDER), only the classes that got any."""
    return {name: int(n) for name, n in zip(FERPLUS_VOTE_ORDER, votes) if n}
