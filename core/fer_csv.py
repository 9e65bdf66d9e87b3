"""Reading FER-2013-format CSVs: the header, numbered lines in chunks, strict row parsing,
and the rejected-rows records that ingest (ExampleGen) and bulk inference both write.

Every row that fails to parse becomes a `rejection` with its line number, a reason code
(`reason_code`) and its raw text: bad input is quarantined, never silently dropped. The
chunked reading lets Beam workers stream a large file without any process holding it whole
(see `plan_chunks`). Every function Beam pickles is module-level so multi-process runners
can import it.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import NUM_CLASSES, NUM_PIXELS, USAGE_TO_SPLIT
from fer_pipeline.core.errors import InputDataError

__all__ = ["JSONL_HEADER", "READ_CHUNK_BYTES", "REJECTED_TAG", "CsvColumns", "ReadChunkLines", "RowError",
           "ParseRows", "parse_label", "parse_pixels", "parse_row", "plan_chunks", "read_header",
           "read_jsonl", "reason_code", "rejection", "write_rejected_csv"]

# ParseRows' tagged output for the rows that fail.
REJECTED_TAG = "rejected"
# Every side-output shard starts with this line, so none is empty: Beam's S3 filesystem
# cannot write an empty object (its multipart upload with no parts is refused).
JSONL_HEADER = "# fer-pipeline jsonl"
# Bytes of CSV per read chunk (~500 FER-2013 rows): small enough that a 300 MB file spreads
# over ~70 chunks for parallel workers, large enough that per-chunk overhead (an element, a
# file open and seek) is negligible. Workers stream a chunk line by line, so this does not
# bound their memory; it only sets the granularity of the work.
READ_CHUNK_BYTES = 4 << 20
# How much the driver's newline scan reads at a time; bounds its memory, not the chunk size.
_SCAN_BLOCK_BYTES = 1 << 20
# re.ASCII: without it \d also matches non-ASCII digits, which numpy would not parse.
_FAST_PIXELS = re.compile(r"(?:\d{1,3} ){%d}\d{1,3}" % (NUM_PIXELS - 1), re.ASCII)
_SIGNED_INT = re.compile(r"[+-]?\d+", re.ASCII)


@dataclass(frozen=True)
class CsvColumns:
    """Positions of the columns we use, found by header name (Usage may be absent; so may
    emotion, for bulk inference, where labels are optional)."""
    emotion: Optional[int]
    pixels: int
    usage: Optional[int]
    count: int
    label_required: bool = True        # False: an empty or absent emotion is no label


# ---------------------------------------------------------------------------------------
# Header and columns (driver side, before the pipeline starts)

def read_header(data_path: str, label_required: bool = True) -> CsvColumns:
    """Finds the emotion/pixels/Usage columns in the first line (BOM, CRLF, quotes allowed).

    With `label_required=False` (bulk inference) only `pixels` must be there."""
    with FileSystems.open(data_path) as f:
        first = f.readline()
    text = first.decode("utf-8-sig").rstrip("\r\n")
    names = [name.strip().lower() for name in next(csv.reader([text]), [])]
    required = ("emotion", "pixels") if label_required else ("pixels",)
    missing = [c for c in required if c not in names]
    if missing:
        expected = "emotion,pixels[,Usage]" if label_required else "[emotion,]pixels[,Usage]"
        raise InputDataError(f"{data_path}: header {text[:200]!r} lacks column(s) {missing}; "
                             f"expected a FER-2013 CSV with {expected}")
    emotion = names.index("emotion") if "emotion" in names else None
    usage = names.index("usage") if "usage" in names else None
    return CsvColumns(emotion, names.index("pixels"), usage, len(names), label_required)


# ---------------------------------------------------------------------------------------
# Reading and parsing (Beam workers)

def plan_chunks(data_path: str, chunk_bytes: int = READ_CHUNK_BYTES) -> list[tuple[int, int, int]]:
    """Cuts the data lines (after the header) into (byte offset, byte length, first line number).

    One sequential pass in large blocks that only counts b"\n", far cheaper than parsing.
    Every chunk starts right after a newline, so its first line number is 1 + the newlines
    before it: exactly the numbering of enumerate(file, start=1), blank lines included. The
    BOM is inside the header line, which no chunk covers.
    """
    if CompressionTypes.detect_compression_type(data_path) != CompressionTypes.UNCOMPRESSED:
        # Seeking in a compressed stream decompresses from the start again: one chunk.
        chunk_bytes = sys.maxsize
    chunks = []
    with FileSystems.open(data_path) as f:
        offset = len(f.readline())  # the header
        line = 2
        start, start_line = offset, line
        while True:
            block = f.read(min(chunk_bytes, _SCAN_BLOCK_BYTES))
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()  # finish the line, so blocks end at line boundaries
            offset += len(block)
            line += block.count(b"\n")
            if offset - start >= chunk_bytes:
                chunks.append((start, offset - start, start_line))
                start, start_line = offset, line
    if offset > start:  # the rest, possibly ending in a line without a newline
        chunks.append((start, offset - start, start_line))
    return chunks


class ReadChunkLines(beam.DoFn):
    """Emits (1-based line number, raw bytes) for every non-blank line of one chunk."""

    def __init__(self, data_path: str):
        self._path = data_path

    def process(self, chunk: tuple[int, int, int]) -> Iterator[tuple[int, bytes]]:
        offset, remaining, number = chunk
        with FileSystems.open(self._path) as f:
            f.seek(offset)
            while remaining > 0:
                line = f.readline()
                remaining -= len(line)
                if not line or remaining < 0:
                    # The chunk no longer ends at a line boundary: line numbers would be wrong.
                    raise RuntimeError(f"{self._path} changed while it was being read "
                                       f"(chunk at byte {offset}); rerun the step")
                line = line.rstrip(b"\n").rstrip(b"\r")
                if line.strip():
                    yield number, line
                number += 1


class RowError(ValueError):
    """A row that cannot become an example; `code` is the reason counted in the result."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def parse_label(text: str) -> int:
    text = text.strip()
    if not text:
        raise RowError("missing_field", "emotion is empty")
    if not _SIGNED_INT.fullmatch(text):
        raise RowError("label_not_integer", repr(text[:20]))
    label = int(text)
    if not 0 <= label < NUM_CLASSES:
        raise RowError("label_out_of_range", f"{label} not in 0..{NUM_CLASSES - 1}")
    return label


def parse_pixels(text: str) -> bytes:
    """2304 integers 0-255 separated by whitespace -> 2304 raw bytes, or RowError."""
    text = text.strip()
    if not text:
        raise RowError("missing_field", "pixels is empty")
    if _FAST_PIXELS.fullmatch(text):  # the common, well-formed case: one regex, one C parse
        values = np.fromstring(text, dtype=np.int64, sep=" ")
    else:
        values = _parse_pixels_slowly(text)
    if values.max() > 255:
        raise RowError("pixel_out_of_range", f"{int(values.max())} > 255")
    return values.astype(np.uint8).tobytes()


def _parse_pixels_slowly(text: str) -> np.ndarray:
    """Token by token, to name exactly what is wrong with an irregular pixel field."""
    tokens = text.split()
    if len(tokens) != NUM_PIXELS:
        raise RowError("wrong_pixel_count", f"got {len(tokens)}, want {NUM_PIXELS}")
    for position, token in enumerate(tokens):
        if not _SIGNED_INT.fullmatch(token):
            raise RowError("pixel_not_integer", f"pixel {position} is {token[:20]!r}")
        if not 0 <= int(token) <= 255:
            raise RowError("pixel_out_of_range", f"pixel {position} is {token}")
    return np.array([int(t) for t in tokens], dtype=np.int64)


def parse_row(raw: bytes, columns: CsvColumns) -> tuple[Optional[int], bytes, str]:
    """(label, 2304 pixel bytes, usage) from one raw CSV line; raises RowError.

    The label is None only when `columns.label_required` is False and the row has none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("undecodable_bytes", str(e)) from None
    try:
        fields = next(csv.reader([text], strict=True))
    except csv.Error as e:
        raise RowError("malformed_csv", str(e)) from None
    if len(fields) != columns.count:
        raise RowError("wrong_field_count", f"got {len(fields)}, want {columns.count}")
    label = None
    if columns.emotion is not None and (columns.label_required
                                        or fields[columns.emotion].strip()):
        label = parse_label(fields[columns.emotion])
    pixels = parse_pixels(fields[columns.pixels])
    usage = fields[columns.usage].strip() if columns.usage is not None else ""
    return label, pixels, usage


class ParseRows(beam.DoFn):
    """Main output: (line, label, pixels, usage). Tagged `rejected`: rejection records."""

    def __init__(self, columns: CsvColumns, split_by_usage: bool):
        self._columns = columns
        self._split_by_usage = split_by_usage

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        line, raw = element
        try:
            label, pixels, usage = parse_row(raw, self._columns)
            if self._split_by_usage and usage not in USAGE_TO_SPLIT:
                raise RowError("unknown_usage", f"{usage[:30]!r} not in {sorted(USAGE_TO_SPLIT)}")
        except RowError as e:
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, rejection(line, str(e), raw))
            return
        yield line, label, pixels, usage


def rejection(line: int, reason: str, raw: Optional[bytes]) -> dict[str, Any]:
    # Raw bytes that are not UTF-8 are kept visible as \x.. escapes rather than lost.
    raw_text = raw.decode("utf-8", errors="backslashreplace") if raw is not None else None
    return {"line_number": line, "reason": reason, "raw_line": raw_text}


# ---------------------------------------------------------------------------------------
# Rejected-rows records (the driver side)

def read_jsonl(pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in fileio.glob(pattern):
        records.extend(json.loads(line) for line in fileio.read_text(path).splitlines()
                       if line.strip() and line != JSONL_HEADER)
    return records


def write_rejected_csv(path: str, rejected: list[dict[str, Any]]) -> None:
    # Built in memory (rejections are bounded by max_rejected_fraction), written in one go.
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    # `source` (file:line) is filled in when several CSVs were ingested as one.
    writer.writerow(["line_number", "reason", "raw_line", "source"])
    for r in rejected:
        writer.writerow([r["line_number"], r["reason"], r["raw_line"], r.get("source", "")])
    fileio.write_text(path, buffer.getvalue())


def reason_code(reason: str) -> str:
    """`wrong_pixel_count: got 3, want 2304` -> `wrong_pixel_count`."""
    return reason.split(":", 1)[0]
