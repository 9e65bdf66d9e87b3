"""FER+ votes in ingest: `--ferplus-labels fer2013new.csv` (ingest.ferplus_labels).

The driver streams the vote file beside the FER-2013 CSV once (core/ferplus_votes.py:
Usage and length checked there, stopping the run on a mismatch) and keeps one small
verdict per row, ~36k tuples of ten integers. The Beam job joins them to the parsed rows
as a side input keyed by line number, so any engine can run it: a face to train on gets
its votes, majority and clarity appended to its record; a face whose votes say it is not
one (or that no class fits) is quarantined with its reason, like a bad CSV row.
`ferplus.json` in the step's output tells transform and the trainer what to train on.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam

from fer_pipeline.core import fileio
from fer_pipeline.core.config import IngestConfig
from fer_pipeline.core.contract import FERPLUS_FILE
from fer_pipeline.core.errors import ConfigError, InputDataError
from fer_pipeline.core.fer_csv import REJECTED_TAG, CsvColumns, rejection
from fer_pipeline.core.ferplus_votes import Judged, read_votes

__all__ = ["AttachVotes", "ferplus_summary", "load_verdicts"]


def load_verdicts(config: IngestConfig, csv_paths: Sequence[str], trees: Sequence[Any],
                  data_path: str, columns: Optional[CsvColumns]) -> dict[int, Judged]:
    """Every FER-2013 row's verdict by line number ({} without ingest.ferplus_labels)."""
    if not config.ferplus_labels:
        return {}
    if len(csv_paths) != 1 or trees:
        raise ConfigError("--ferplus-labels joins FER+ votes to ONE FER-2013 CSV row by row; "
                          f"this run reads {len(csv_paths)} CSV(s) and {len(trees)} image "
                          "folder(s)")
    if not fileio.exists(config.ferplus_labels):
        raise InputDataError(f"--ferplus-labels {config.ferplus_labels}: no such file "
                             "(FER+'s fer2013new.csv, from github.com/microsoft/FERPlus)")
    return read_votes(config.ferplus_labels, data_path,
                      columns.usage if columns is not None else None, config.ferplus_classes)


class AttachVotes(beam.DoFn):
    """(line, label, pixels, usage) -> (line, label, pixels, usage, "", (votes, majority,
    clear)); a face to quarantine goes to the `rejected` output instead."""

    def process(self, record: tuple, verdicts: dict[int, Judged]) -> Iterator[Any]:
        verdict = verdicts.get(record[0])
        if verdict is None:   # read_votes pairs every non-blank line: a bug if it happens
            raise RuntimeError(f"no FER+ verdict for CSV line {record[0]}")
        if isinstance(verdict, str):
            # raw_line None: the driver fills in the CSV's raw text afterwards.
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, rejection(record[0], verdict, None))
            return
        votes, majority, clear = verdict
        yield (*record[:4], "", (tuple(votes), majority, bool(clear)))


def ferplus_summary(config: IngestConfig, verdicts: dict[int, Judged],
                    by_reason: dict[str, int], output_dir: str) -> dict[str, Any]:
    """Writes `ferplus.json` (what training uses) and returns it; {} without FER+."""
    if not config.ferplus_labels:
        return {}
    summary = {
        "labels_path": fileio.absolute(config.ferplus_labels),
        "mode": config.ferplus_mode, "classes": config.ferplus_classes,
        "rows": len(verdicts),
        "clear_majority": sum(1 for v in verdicts.values()
                              if not isinstance(v, str) and v[2]),
        "quarantined": {code: n for code, n in by_reason.items() if code.startswith("ferplus_")},
    }
    fileio.write_text(fileio.join(output_dir, FERPLUS_FILE), json.dumps(summary, indent=2))
    return summary
