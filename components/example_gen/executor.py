"""ExampleGen: FER-2013-format CSVs and labelled image folders (images.py) in, split and
sharded TFRecords of tf.train.Example out.

The Beam pipeline, top to bottom:

1. read numbered physical lines (Beam's ReadFromText cannot give line numbers): the driver
   scans the file once for newlines and cuts it into chunks of a few MiB, each starting at a
   line boundary with its first line number known; the chunks are Reshuffled and every
   worker streams only its own chunks, so no process holds the raw file in memory;
2. parse every row strictly; a row that fails goes to the rejected rows with its line
   number, a reason and its raw text, never silently dropped;
3. assign a split: FER-2013's Usage column, or a stratified random split keyed on a seeded
   hash of the line number (so the outcome does not depend on runner parallelism);
4. group identical images (sha1 of the pixels) and, when copies landed in different splits,
   keep the copy in the earliest split (train, validation, test) and reject the others;
   (image folders join here: images.py reads, decodes and crops them in the same job, as
   records (row, label, pixels, usage, path) numbered after the CSV lines);
5. write tf.train.Examples per split, plus small JSON-lines reports that the driver turns
   into `rejected/rejected_rows.csv`, `duplicates.json` and the result counts.

Every function Beam pickles is module-level here so multi-process runners can import it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import IngestConfig
from fer_pipeline.core.fer_csv import (JSONL_HEADER, READ_CHUNK_BYTES, REJECTED_TAG, CsvColumns,
                                       ParseRows, ReadChunkLines, plan_chunks, read_header,
                                       read_jsonl, reason_code, rejection, write_rejected_csv)
from fer_pipeline.core.contract import (FEATURE_AUGMENTATION, FEATURE_LABEL, FEATURE_PIXELS,
    FEATURE_ROW, FEATURE_SOURCE, FEATURE_SOURCE_ROW, FEATURE_USAGE, EXAMPLES_PATTERN,
    SHARD_PREFIX, SHARD_SUFFIX, SPLITS, USAGE_TO_SPLIT, REJECTED_DIR, REJECTED_FILE,
    DUPLICATES_FILE, FEATURE_FERPLUS_CLEAR, FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_VOTES)
from fer_pipeline.core.ferplus_votes import QUARANTINE_CODES
from fer_pipeline.core.errors import ConfigError, InputDataError
from fer_pipeline.components.example_gen.images import (ImageTree, image_records, image_rejection,
                                                       is_image_tree, resolve_class_map,
                                                       scan_image_tree)
from fer_pipeline.components.example_gen.inputs import (Inputs, combine_csvs, last_line,
                                                       source_of)
from fer_pipeline.components.example_gen.ferplus import (AttachVotes, ferplus_summary,
                                                        load_verdicts)

__all__ = ["run_example_gen", "ExampleGenResult", "TooManyRejectedRows"]

ORIGINAL = "original"
# Rejections with this prefix are deliberate (leakage control), not bad input, so they do
# not count against max_rejected_fraction.
DUPLICATE_REASON_PREFIX = "duplicate_of_"

_DUPLICATES = "duplicates"
_WITHIN_SPLIT = "within_split_duplicates"
_BEAM_TMP = ".beam_tmp"
_COMBINED_DIR = ".combined_input"   # several CSVs as one, removed when ingest is done


class TooManyRejectedRows(InputDataError):
    """More rows failed to parse than IngestConfig.max_rejected_fraction allows."""


@dataclass
class ExampleGenResult:
    rows_read: int
    rows_written: dict[str, int]
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    cross_split_duplicates: int          # distinct images found in more than one split
    duplicate_rows_removed: int          # rows dropped from later splits because of them
    within_split_duplicate_rows: int     # extra copies inside one split (kept; reported)
    split_mode: str
    num_shards: dict[str, int]
    output_dir: str
    split_dirs: dict[str, str] = field(default_factory=dict)
    rejected_path: str = ""
    duplicates_path: str = ""
    # With several input CSVs: per file, the line range it occupies in the combined input.
    sources: list[dict[str, Any]] = field(default_factory=list)
    # Per image folder given as --data: its root and whether it had split folders.
    image_trees: list[dict[str, Any]] = field(default_factory=list)
    # With FER+ votes (ingest.ferplus_labels): the file, mode, classes and quarantines.
    ferplus: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# Splitting

def split_by_usage(record: tuple[int, int, bytes, str]) -> tuple[str, tuple]:
    return USAGE_TO_SPLIT[record[3]], record


def keyed_by_label(record: tuple[int, int, bytes, str], seed: int) -> tuple[int, tuple]:
    """(label, (seeded hash of the line number, record)): the per-class random order."""
    order = hashlib.sha256(f"{seed}:{record[0]}".encode()).hexdigest()
    return record[1], (order, record)


def split_boundaries(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Row counts ending train and validation within a class of n rows (rest is test)."""
    total = sum(fractions)
    train_end = int(round(n * fractions[0] / total))
    validation_end = int(round(n * (fractions[0] + fractions[1]) / total))
    return train_end, validation_end


def assign_stratified(element: tuple[int, Iterable[tuple[str, tuple]]],
                      fractions: tuple[float, float, float]) -> Iterator[tuple[str, tuple]]:
    _, keyed = element
    ordered = sorted(keyed, key=lambda item: item[0])
    train_end, validation_end = split_boundaries(len(ordered), fractions)
    for rank, (_, record) in enumerate(ordered):
        split = "train" if rank < train_end else "validation" if rank < validation_end else "test"
        yield split, record


# ---------------------------------------------------------------------------------------
# Cross-split duplicates

def keyed_by_image(split_record: tuple[str, tuple]) -> tuple[str, tuple[str, tuple]]:
    return hashlib.sha1(split_record[1][2]).hexdigest(), split_record


class ResolveDuplicates(beam.DoFn):
    """Keeps one split's copies of an image; reports (and by default rejects) the others."""

    def __init__(self, remove_cross_split: bool):
        self._remove = remove_cross_split

    def process(self, element: tuple[str, Iterable[tuple[str, tuple]]]) -> Iterator[Any]:
        digest, copies = element
        copies = sorted(copies, key=lambda c: (SPLITS.index(c[0]), c[1][0]))
        if len(copies) > 1:
            # Copies inside one split do not leak; they are counted, not removed.
            extra_within = len(copies) - len({c[0] for c in copies})
            if extra_within:
                yield beam.pvalue.TaggedOutput(_WITHIN_SPLIT, extra_within)
        keeper_split, keeper = copies[0][0], copies[0][1]
        if len({split for split, _ in copies}) == 1:
            yield from copies
            return
        removed = []
        for split, record in copies:
            if split != keeper_split and self._remove:
                reason = f"{DUPLICATE_REASON_PREFIX}{keeper_split}_row:{keeper[0]}"
                if image_path(keeper):
                    reason += f" ({image_path(keeper)})"
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, image_rejection(
                    image_path(record), reason) if image_path(record)
                    else rejection(record[0], reason, None))
                removed.append(record[0])
            else:
                yield split, record
        yield beam.pvalue.TaggedOutput(_DUPLICATES, {
            "pixels_sha1": digest,
            "rows": [{"line_number": r[0], "split": s, **({"source": image_path(r)}
                                                          if image_path(r) else {})}
                     for s, r in copies],
            "kept_in": keeper_split if self._remove else "all",
            "removed_line_numbers": removed})


# ---------------------------------------------------------------------------------------
# Output

def image_path(record: tuple) -> str:
    """An image record's file (records from images carry it fifth; CSV rows have four)."""
    return record[4] if len(record) > 4 else ""


def to_example(split_record: tuple[str, tuple], csv_sources: list[dict[str, Any]]) -> bytes:
    """The raw tf.train.Example of docs/architecture.md, serialized."""
    import tensorflow as tf  # imported in the worker; the driver never needs TF here

    _, record = split_record
    line, label, pixels, usage = record[:4]
    source = image_path(record) or source_of(line, csv_sources)
    feature = tf.train.Feature
    votes = {}
    if len(record) > 5:   # FER+ votes joined (components/example_gen/ferplus.py)
        counts, majority, clear = record[5]
        votes = {FEATURE_FERPLUS_VOTES: feature(int64_list=tf.train.Int64List(value=counts)),
                 FEATURE_FERPLUS_MAJORITY: feature(int64_list=tf.train.Int64List(
                     value=[majority])),
                 FEATURE_FERPLUS_CLEAR: feature(int64_list=tf.train.Int64List(
                     value=[int(clear)]))}
    return tf.train.Example(features=tf.train.Features(feature={
        FEATURE_LABEL: feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_PIXELS: feature(bytes_list=tf.train.BytesList(value=[pixels])),
        FEATURE_USAGE: feature(bytes_list=tf.train.BytesList(value=[usage.encode()])),
        FEATURE_ROW: feature(int64_list=tf.train.Int64List(value=[line])),
        FEATURE_SOURCE_ROW: feature(int64_list=tf.train.Int64List(value=[line])),
        FEATURE_AUGMENTATION: feature(bytes_list=tf.train.BytesList(value=[ORIGINAL.encode()])),
        FEATURE_SOURCE: feature(bytes_list=tf.train.BytesList(value=[source.encode()])),
        **votes,
    })).SerializeToString()


def split_index(split_record: tuple[str, tuple], num_partitions: int) -> int:
    return SPLITS.index(split_record[0])


def split_name(split_record: tuple[str, tuple]) -> str:
    return split_record[0]


def count_entry(name: str, count: int) -> str:
    return json.dumps({"name": name, "count": count})


def named_count(pair: tuple[str, int]) -> str:
    return count_entry(pair[0], pair[1])


def build_pipeline(pipeline: beam.Pipeline, inputs: Inputs, output_dir: str, split_mode: str,
                   config: IngestConfig) -> None:
    tmp = fileio.join(output_dir, _BEAM_TMP)
    rows, rejections, read_counts = [], [], []
    if inputs.data_path:
        # Only the small chunk descriptors are shuffled; reading fuses with parsing, so raw
        # lines are never materialized as one collection.
        lines = (pipeline
                 | "Chunks" >> beam.Create(list(inputs.chunks))
                 | "Spread" >> beam.Reshuffle()
                 | "ReadLines" >> beam.ParDo(ReadChunkLines(inputs.data_path)))
        parsed = lines | "Parse" >> beam.ParDo(
            ParseRows(inputs.columns, split_mode == "usage")).with_outputs(REJECTED_TAG,
                                                                          main="rows")
        rows.append(parsed.rows)
        rejections.append(parsed[REJECTED_TAG])
        if inputs.verdicts:
            voted = rows.pop() | "AttachVotes" >> beam.ParDo(
                AttachVotes(), beam.pvalue.AsDict(
                    pipeline | "Verdicts" >> beam.Create(sorted(inputs.verdicts.items())))
            ).with_outputs(REJECTED_TAG, main="rows")
            rows.append(voted.rows)
            rejections.append(voted[REJECTED_TAG])
        read_counts.append(lines | "CountLines" >> beam.combiners.Count.Globally())
    if inputs.trees:
        images = image_records(pipeline, inputs.trees, inputs.first_image_row, config.seed)
        rows.append(images.rows)
        rejections.append(images[REJECTED_TAG])
        read_counts.append(
            (images.rows | "CountImages" >> beam.combiners.Count.Globally(),
             images[REJECTED_TAG] | "CountBadImages" >> beam.combiners.Count.Globally())
            | "ImageCounts" >> beam.Flatten() | "SumImages" >> beam.CombineGlobally(sum))
    all_rows = rows[0] if len(rows) == 1 else tuple(rows) | "AllRows" >> beam.Flatten()

    if split_mode == "usage":
        assigned = all_rows | "ByUsage" >> beam.Map(split_by_usage)
    else:
        assigned = (all_rows
                    | "KeyByLabel" >> beam.Map(keyed_by_label, config.seed)
                    | "GroupByLabel" >> beam.GroupByKey()
                    | "Stratify" >> beam.FlatMap(assign_stratified, tuple(config.split_fractions)))

    resolved = (assigned
                | "KeyByImage" >> beam.Map(keyed_by_image)
                | "GroupByImage" >> beam.GroupByKey()
                | "Deduplicate" >> beam.ParDo(ResolveDuplicates(
                    config.remove_cross_split_duplicates)).with_outputs(
                        REJECTED_TAG, _DUPLICATES, _WITHIN_SPLIT, main="kept"))

    per_split = resolved.kept | "BySplit" >> beam.Partition(split_index, len(SPLITS))
    for index, split in enumerate(SPLITS):
        (per_split[index]
         | f"Serialize_{split}" >> beam.Map(to_example, list(inputs.csv_sources))
         | f"Write_{split}" >> beam.io.WriteToTFRecord(
             fileio.join(output_dir, split, SHARD_PREFIX), file_name_suffix=SHARD_SUFFIX,
             num_shards=config.num_shards, shard_name_template="-SSSSS-of-NNNNN"))

    rejected = (*rejections, resolved[REJECTED_TAG]) | "AllRejected" >> beam.Flatten()
    (rejected | "RejectedJson" >> beam.Map(json.dumps)
     | "WriteRejected" >> beam.io.WriteToText(fileio.join(tmp, "rejected"), ".jsonl",
                                              header=JSONL_HEADER))
    (resolved[_DUPLICATES] | "DuplicatesJson" >> beam.Map(json.dumps)
     | "WriteDuplicates" >> beam.io.WriteToText(fileio.join(tmp, "duplicates"), ".jsonl",
                                                header=JSONL_HEADER))

    # Counts are computed independently of each other so read == written + rejected is a
    # check, not an identity.
    counts = (
        tuple(read_counts) | "AllRead" >> beam.Flatten() | "CountRead" >> beam.CombineGlobally(sum)
        | "ReadEntry" >> beam.Map(_read_entry),
        resolved.kept | "SplitNames" >> beam.Map(split_name)
        | "CountPerSplit" >> beam.combiners.Count.PerElement()
        | "SplitEntries" >> beam.Map(named_count),
        resolved[_WITHIN_SPLIT] | "SumWithin" >> beam.CombineGlobally(sum)
        | "WithinEntry" >> beam.Map(_within_entry),
    ) | "AllCounts" >> beam.Flatten()
    counts | "WriteCounts" >> beam.io.WriteToText(fileio.join(tmp, "counts"), ".jsonl",
                                                  header=JSONL_HEADER)


def _read_entry(count: int) -> str:
    return count_entry("rows_read", count)


def _within_entry(count: int) -> str:
    return count_entry(_WITHIN_SPLIT, count)


# ---------------------------------------------------------------------------------------
# Driver: run, then turn the pipeline's JSON-lines reports into the contract's files

def _fill_raw_lines(data_path: str, rejected: list[dict[str, Any]]) -> None:
    """Duplicates were rejected after parsing; fetch their raw text with one more pass."""
    wanted = {r["line_number"]: r for r in rejected
              if r["raw_line"] is None and r["line_number"] is not None}
    if not wanted:
        return
    with FileSystems.open(data_path) as f:
        for number, line in enumerate(f, start=1):
            if number in wanted:
                raw = line.rstrip(b"\n").rstrip(b"\r")
                wanted[number]["raw_line"] = raw.decode("utf-8", errors="backslashreplace")


def _resolve_split_mode(columns: CsvColumns | None, trees: Sequence[ImageTree],
                        config: IngestConfig) -> str:
    """"usage" only when every input says its split: a CSV's Usage column, an image tree's
    train/validation/test folders; otherwise the stratified random split for all."""
    if config.split_mode not in ("usage", "random"):
        raise ConfigError(f"IngestConfig.split_mode must be 'usage' or 'random', "
                          f"not {config.split_mode!r}")
    usage_known = ((columns is None or columns.usage is not None)
                   and all(tree.has_splits for tree in trees))
    return "usage" if config.split_mode == "usage" and usage_known else "random"


def run_example_gen(data_path: str | Sequence[str], output_dir: str, config: IngestConfig,
                    beam_args: list[str]) -> ExampleGenResult:
    """Parses the CSV at `data_path` into split TFRecords under `output_dir` (see module doc).

    `data_path` may be a list of CSVs with the same header: they are ingested as one
    (see `combine_csvs`), and each rejected row names its own file and line. Any of them
    may instead be a labelled image folder (images.py), read in the same job.
    Raises TooManyRejectedRows (after writing the rejected-rows file) when more than
    config.max_rejected_fraction of the rows could not be parsed.
    """
    started = time.time()
    # The driver reads the CSV with FileSystems.open outside any pipeline: give it Beam's
    # flags (e.g. --s3_endpoint_url) the way a pipeline would.
    fileio.configure_beam_filesystems(beam_args)
    sources: list[dict[str, Any]] = []
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    class_map = resolve_class_map(config.class_map)
    trees = [scan_image_tree(p, class_map, config.split_fractions)
             for p in paths if is_image_tree(p)]
    csvs = [p for p in paths if not is_image_tree(p)]
    data_path = csvs[0] if len(csvs) == 1 else ""
    if len(csvs) > 1:
        data_path = fileio.join(output_dir, _COMBINED_DIR, "combined.csv")
        sources = combine_csvs(csvs, data_path)
    columns = read_header(data_path) if data_path else None
    split_mode = _resolve_split_mode(columns, trees, config)
    tmp = fileio.join(output_dir, _BEAM_TMP)
    fileio.rmtree(tmp)
    for split in SPLITS:
        # An empty split still gets its directory (locally; object stores need none).
        fileio.makedirs(fileio.join(output_dir, split))

    chunks = plan_chunks(data_path, READ_CHUNK_BYTES) if data_path else []
    csv_sources = sources or ([{"path": data_path, "first_line": 2, "last_line": 1 << 62}]
                              if data_path else [])
    verdicts = load_verdicts(config, csvs, trees, data_path, columns)
    inputs = Inputs(data_path, tuple(chunks), columns, tuple(csv_sources), tuple(trees),
                    last_line(data_path, chunks) + 1, verdicts)
    with beam_pipeline(beam_args, "ingest") as pipeline:
        build_pipeline(pipeline, inputs, output_dir, split_mode, config)

    counts = {c["name"]: c["count"] for c in read_jsonl(fileio.join(tmp, "counts*"))}
    # CSV rows by line, then images (no line number) by path.
    rejected = sorted(read_jsonl(fileio.join(tmp, "rejected*")),
                      key=lambda r: (r["line_number"] is None, r["line_number"] or 0,
                                     r.get("source", "")))
    duplicates = sorted(read_jsonl(fileio.join(tmp, "duplicates*")),
                        key=lambda d: d["rows"][0]["line_number"])
    fileio.rmtree(tmp)
    _fill_raw_lines(data_path, rejected)
    if sources:
        for r in rejected:
            if r["line_number"] is not None:
                r["source"] = source_of(r["line_number"], sources)
        fileio.rmtree(fileio.join(output_dir, _COMBINED_DIR))

    rejected_path = fileio.join(output_dir, REJECTED_DIR, REJECTED_FILE)
    write_rejected_csv(rejected_path, rejected)
    duplicates_path = fileio.join(output_dir, DUPLICATES_FILE)
    removed = sum(len(d["removed_line_numbers"]) for d in duplicates)
    fileio.write_text(duplicates_path, json.dumps({
        "cross_split_duplicate_images": len(duplicates), "rows_removed": removed,
        "policy": ("keep the copy in the earliest split (train, validation, test), "
                   "reject the others") if config.remove_cross_split_duplicates
        else "report only", "duplicates": duplicates}, indent=2))

    by_reason: dict[str, int] = {}
    for r in rejected:
        code = reason_code(r["reason"])
        by_reason[code] = by_reason.get(code, 0) + 1
    result = ExampleGenResult(
        rows_read=counts.get("rows_read", 0),
        rows_written={split: counts.get(split, 0) for split in SPLITS},
        rows_rejected=len(rejected),
        rejected_by_reason=dict(sorted(by_reason.items())),
        cross_split_duplicates=len(duplicates),
        duplicate_rows_removed=removed,
        within_split_duplicate_rows=counts.get(_WITHIN_SPLIT, 0),
        split_mode=split_mode,
        num_shards={split: len(shard_paths(output_dir, split)) for split in SPLITS},
        output_dir=output_dir,
        split_dirs={split: fileio.join(output_dir, split) for split in SPLITS},
        rejected_path=rejected_path,
        duplicates_path=duplicates_path,
        sources=sources,
        image_trees=[{"root": t.root, "split_folders": t.has_splits,
                      "class_folders": len(t.folders)} for t in trees],
        ferplus=ferplus_summary(config, verdicts, by_reason, output_dir),
        seconds=round(time.time() - started, 3))
    _check_rejected_fraction(result, config.max_rejected_fraction)
    return result


def shard_paths(examples_dir: str, split: str) -> list[str]:
    """The TFRecord shards of one split, sorted."""
    return fileio.glob(fileio.join(examples_dir, split, EXAMPLES_PATTERN))


def _check_rejected_fraction(result: ExampleGenResult, limit: float) -> None:
    bad = sum(n for code, n in result.rejected_by_reason.items()
              if not code.startswith(DUPLICATE_REASON_PREFIX) and code not in QUARANTINE_CODES)
    if result.rows_read == 0:
        raise TooManyRejectedRows(f"no data rows in the input; see {result.output_dir}")
    if bad / result.rows_read > limit:
        raise TooManyRejectedRows(
            f"{bad} of {result.rows_read} rows ({bad / result.rows_read:.2%}) could not be "
            f"parsed, more than max_rejected_fraction={limit:.2%}; by reason: "
            f"{result.rejected_by_reason}; rows and reasons in {result.rejected_path}")
