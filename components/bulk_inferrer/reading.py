"""Faces in (Beam workers): the rows of a FER-2013 CSV, or the faces in a directory of photos.

A CSV is read exactly as ingest reads it (`core/fer_csv.py`: the same line-aligned chunks,
the same strict row parser, so the same rows are rejected with the same reasons), except
that the label is optional and any Usage is accepted. A directory's files are matched and
read inside the job (Beam's `MatchFiles` and `ReadMatches`, local or object store): the
driver never lists them, so the job graph does not grow with their number. Each is cut into
48x48 faces by `serving/faces.py`, as `fer-client --image` does. A row that does not
parse, a file that is not an image and an image without a face go to the rejected records
with a reason, never silently dropped. Each stage counts what it hands on (counts.py).

Every function Beam pickles is module-level here so multi-process and portable runners can
import it.
"""
from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio as beam_fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fer_pipeline.components.bulk_inferrer.counts import (FACES_FOUND, INPUTS_READ,
                                                          INPUTS_WITH_FACES, count)
from fer_pipeline.components.bulk_inferrer.records import Face
from fer_pipeline.core import fileio
from fer_pipeline.core.fer_csv import (READ_CHUNK_BYTES, CsvColumns, ReadChunkLines, RowError,
                                       parse_row, plan_chunks, read_header, rejection)
from fer_pipeline.serving.faces import FaceDetectionConfig, decode_grayscale, faces_in_image

__all__ = ["REJECTED", "FindFaces", "ParseCsvFaces", "has_files", "read_csv_faces",
           "read_image_faces", "visible_file"]

REJECTED = "rejected"   # the tagged output of the rejected rows and files


class ParseCsvFaces(beam.DoFn):
    """(line, raw bytes) -> a Face; tagged `rejected`: the row with ingest's reason."""

    def __init__(self, data_path: str, columns: CsvColumns):
        self._path = data_path
        self._columns = columns

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        line, raw = element
        count(INPUTS_READ)
        try:
            label, pixels, usage = parse_row(raw, self._columns)
        except RowError as error:
            yield beam.pvalue.TaggedOutput(REJECTED, {**rejection(line, str(error), raw),
                                                      "source": self._path})
            return
        count(INPUTS_WITH_FACES)
        count(FACES_FOUND)
        yield Face(f"{self._path}:{line}", self._path, line, None, None, label, usage, pixels)


class FindFaces(beam.DoFn):
    """A matched file -> one Face per face found; tagged `rejected`: the file with why it
    gave none (not an image, no face found)."""

    def __init__(self, detection: FaceDetectionConfig):
        self._detection = detection

    def process(self, readable: beam_fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        try:
            with readable.open() as handle:
                data = handle.read()
            faces = faces_in_image(decode_grayscale(data, path), self._detection)
        except (OSError, ValueError) as error:
            yield beam.pvalue.TaggedOutput(REJECTED, _file_rejection(
                path, f"unreadable_image: {_first_line(error)}"))
            return
        if not faces:
            yield beam.pvalue.TaggedOutput(REJECTED, _file_rejection(
                path, "no_face_found: the face detector found no frontal face"))
            return
        count(INPUTS_WITH_FACES)
        count(FACES_FOUND, len(faces))
        for index, found in enumerate(faces):
            yield Face(f"{path}#face{index}", path, None, index, list(found.box), None, "",
                       np.ascontiguousarray(found.pixels, np.uint8).tobytes())


def _file_rejection(path: str, reason: str) -> dict[str, Any]:
    return {"line_number": None, "reason": reason, "raw_line": None, "source": path}


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


def visible_file(metadata: Any, directory: str) -> bool:
    """Every file under the directory is tried as an image (one that is not is rejected
    with its reason, not skipped by its name) but hidden ones (`.DS_Store`, `.git/`) and
    an object store's folder markers (keys ending in /). Counts the files it lets through."""
    relative = metadata.path[len(directory):].lstrip("/")
    if metadata.path.endswith("/") or any(part.startswith(".")
                                          for part in relative.split("/")):
        return False
    count(INPUTS_READ)
    return True


def has_files(directory: str) -> bool:
    """Whether anything is under `directory`: one match, not a listing."""
    [found] = FileSystems.match([fileio.join(directory, "**")], limits=[1])
    return bool(found.metadata_list)


def read_csv_faces(pipeline: beam.Pipeline, data_path: str) -> Any:
    """The CSV's faces and rejected rows, read as ingest reads them. The driver plans the
    chunks (one pass counting newlines; a few bytes per 4 MiB of CSV), the workers read
    them."""
    columns = read_header(data_path, label_required=False)
    return (pipeline
            | "Chunks" >> beam.Create(plan_chunks(data_path, READ_CHUNK_BYTES))
            | "Spread" >> beam.Reshuffle()
            | "ReadLines" >> beam.ParDo(ReadChunkLines(data_path))
            | "Parse" >> beam.ParDo(ParseCsvFaces(data_path, columns)).with_outputs(
                REJECTED, main="faces"))


def read_image_faces(pipeline: beam.Pipeline, directory: str) -> Any:
    """The faces found in each file under `directory` (recursively) and the files that
    gave none, matched and read by the workers."""
    directory = directory.rstrip("/")
    return (pipeline
            | "MatchFiles" >> beam_fileio.MatchFiles(
                fileio.join(directory, "**"),
                empty_match_treatment=beam_fileio.EmptyMatchTreatment.ALLOW)
            | "NotHidden" >> beam.Filter(visible_file, directory)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadMatches" >> beam_fileio.ReadMatches(
                compression=CompressionTypes.UNCOMPRESSED)   # a photo.gz is not unpacked
            | "FindFaces" >> beam.ParDo(FindFaces(FaceDetectionConfig())).with_outputs(
                REJECTED, main="faces"))
