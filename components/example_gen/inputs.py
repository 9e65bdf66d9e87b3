"""What one ingest reads: several CSVs combined into one file (each row still traceable to
its own file and line), and the inputs the Beam pipeline is built from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from apache_beam.io.filesystems import FileSystems

from fer_pipeline.components.example_gen.images import ImageTree
from fer_pipeline.core import fileio
from fer_pipeline.core.errors import InputDataError

__all__ = ["Inputs", "combine_csvs", "last_line", "source_of"]


@dataclass(frozen=True)
class Inputs:
    """What one ingest reads: a CSV (several are combined into one first) and image trees."""
    data_path: str = ""                      # "" when only image folders were given
    chunks: tuple[tuple[int, int, int], ...] = ()
    columns: Any = None                      # CsvColumns of the CSV
    csv_sources: tuple[dict[str, Any], ...] = ()
    trees: tuple[ImageTree, ...] = ()
    first_image_row: int = 2                 # images are numbered after the CSV's lines
    # FER+ verdicts by CSV line (components/example_gen/ferplus.py); empty without FER+.
    verdicts: Any = None


def combine_csvs(data_paths: Sequence[str], combined_path: str) -> list[dict[str, Any]]:
    """Writes several CSVs with one header as one file; returns where each file's rows went.

    Used when the pipeline trains on the original data plus e.g. reviewed faces. The files
    must have the same header (the same columns in the same order), so their lines are
    copied byte for byte and a rejected row's raw text is exactly what its file holds.
    Returns, per file, {"path", "first_line", "last_line"}: line numbers in the combined
    file, which is what `row_number` and the rejected rows refer to.
    """
    headers = []
    for path in data_paths:
        with FileSystems.open(path) as f:
            headers.append(f.readline().decode("utf-8-sig").strip().lower())
    if len(set(headers)) > 1:
        raise InputDataError("the CSVs given with several --data must share one header; got "
                             + "; ".join(f"{p}: {h[:80]!r}" for p, h in zip(data_paths, headers)))
    sources, line = [], 2        # line 1 of the combined file is the shared header
    fileio.makedirs(fileio.dirname(combined_path))
    with fileio.open_file(combined_path, "wb") as out:
        out.write(headers[0].encode() + b"\n")
        for path in data_paths:
            first = line
            with FileSystems.open(path) as f:
                f.readline()
                for raw in f:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    line += 1
            sources.append({"path": path, "first_line": first, "last_line": line - 1})
    return sources


def source_of(line_number: int, sources: list[dict[str, Any]]) -> str:
    """`path:line` in the original file of a line of the combined file."""
    for source in sources:
        if source["first_line"] <= line_number <= source["last_line"]:
            return f"{source['path']}:{line_number - source['first_line'] + 2}"
    return ""


def last_line(data_path: str, chunks: Sequence[tuple[int, int, int]]) -> int:
    """The CSV's last line number (1: only a header, or no CSV): its last chunk's first line
    plus the newlines inside that chunk."""
    if not chunks:
        return 1
    offset, length, first = chunks[-1]
    with FileSystems.open(data_path) as f:
        f.seek(offset)
        block = f.read(length)
    return first + block.count(b"\n") - (1 if block.endswith(b"\n") else 0)
