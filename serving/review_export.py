"""What `fer-review export` writes: the reviewed faces as training data for the next run.

The faces go out as a FER-2013 CSV (serving/review_queue.py's `export_csv`). An answer
`contempt` (class 7 of a FER+ model) has no place in FER-2013's emotion column, so it goes
out as FER+ votes: a vote file with the header of Microsoft's `fer2013new.csv`
(`Usage, Image name, neutral, ..., contempt, unknown, NF`), one row per CSV row and in the
same order, which ingest joins to the CSV by row (`--ferplus-labels`). A person's answer
fills all ten of a face's votes, so it is a clear majority whatever ingest.ferplus_mode is.
"""
from __future__ import annotations

import csv
import os
import tempfile
from typing import Sequence

from fer_pipeline.core.contract import CLASS_NAMES_FERPLUS, FERPLUS_COLUMNS, FERPLUS_FILE_COLUMN

__all__ = ["VOTES_HEADER", "VOTES_PER_ANSWER", "vote_rows", "write_csv_atomically"]

VOTES_HEADER: tuple[str, ...] = ("Usage", "Image name") + FERPLUS_COLUMNS
VOTES_PER_ANSWER = 10            # FER+ asked ten people about every face


def vote_rows(labels: Sequence[int], usage: str) -> list[tuple]:
    """The vote file's rows (header first) for faces answered `labels` (0-7, our order)."""
    rows: list[tuple] = [VOTES_HEADER]
    for index, label in enumerate(labels):
        votes = [0] * len(FERPLUS_COLUMNS)
        column = FERPLUS_FILE_COLUMN[CLASS_NAMES_FERPLUS[label]]
        votes[FERPLUS_COLUMNS.index(column)] = VOTES_PER_ANSWER
        rows.append((usage, f"reviewed{index + 1:07d}.png", *votes))
    return rows


def write_csv_atomically(out_path: str, rows: Sequence[Sequence]) -> None:
    """Writes `rows` as a CSV that appears whole or not at all."""
    directory = os.path.dirname(os.path.abspath(out_path))
    handle = tempfile.NamedTemporaryFile("w", newline="", dir=directory, delete=False,
                                         prefix=".reviewed.", suffix=".csv.partial")
    try:
        with handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)
        # NamedTemporaryFile creates 0600; the export is an ordinary file for the next
        # pipeline run (perhaps another user's), so it gets the umask's usual mode.
        os.chmod(handle.name, 0o666 & ~_current_umask())
        os.replace(handle.name, out_path)
    except BaseException:
        os.unlink(handle.name)
        raise


def _current_umask() -> int:
    mask = os.umask(0)   # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask
