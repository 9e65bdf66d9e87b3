"""ExampleGen: chunked reading, strict parsing with quarantine, splits, cross-split duplicates,
runner parity."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components.example_gen import executor as example_gen
from fer_pipeline.components.example_gen import (
    ReadChunkLines, TooManyRejectedRows, plan_chunks, run_example_gen, shard_paths,
    split_boundaries)
from fer_pipeline.pipeline.synthetic import draw_faces, encode_pixel_strings, generate_csv
from fer_pipeline.core.config import IngestConfig
from fer_pipeline.core.contract import (FEATURE_AUGMENTATION, FEATURE_LABEL, FEATURE_PIXELS,
    FEATURE_ROW, FEATURE_SOURCE_ROW, FEATURE_USAGE, NUM_PIXELS, SPLITS)

# Bad rows, each with the reason code the rejected file must give it.
BAD_ROWS: list[tuple[bytes, str]] = [
    (b"3,PIXELS_SHORT,Training", "wrong_pixel_count"),
    (b"3,PIXELS_LETTER,Training", "pixel_not_integer"),
    (b"3,PIXELS_256,Training", "pixel_out_of_range"),
    (b"3,PIXELS_NEGATIVE,Training", "pixel_out_of_range"),
    (b"7,PIXELS_OK,Training", "label_out_of_range"),
    (b"-1,PIXELS_OK,Training", "label_out_of_range"),
    (b"x,PIXELS_OK,Training", "label_not_integer"),
    (b"2.0,PIXELS_OK,Training", "label_not_integer"),
    (b",PIXELS_OK,Training", "missing_field"),
    (b"3,PIXELS_OK", "wrong_field_count"),
    (b"\xff\xfe\x00garbage\x9c,,", "undecodable_bytes"),
    (b"3,PIXELS_OK,Holdout", "unknown_usage"),
]


def pixel_text(values) -> str:
    return " ".join(str(v) for v in values)


def substitute(row: bytes, ok_pixels: str) -> bytes:
    base = ok_pixels.split(" ")
    variants = {
        b"PIXELS_SHORT": " ".join(base[:-1]),
        b"PIXELS_LETTER": " ".join(base[:10] + ["12a"] + base[11:]),
        b"PIXELS_256": " ".join(base[:5] + ["256"] + base[6:]),
        b"PIXELS_NEGATIVE": " ".join(base[:5] + ["-1"] + base[6:]),
        b"PIXELS_OK": ok_pixels,
    }
    for marker, text in variants.items():
        row = row.replace(marker, text.encode())
    return row


@pytest.fixture(scope="module")
def messy_csv(tmp_path_factory):
    """BOM + CRLF + quoted fields, 40 good rows, every kind of bad row, one leaked image."""
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 7
    images = draw_faces(labels, rng)
    pixels = [p.decode() for p in encode_pixel_strings(images)]
    usages = ["Training"] * 30 + ["PublicTest"] * 5 + ["PrivateTest"] * 5
    lines = [b'"emotion","pixels","Usage"']
    good = {}
    for i in range(40):
        quoted = f'"{pixels[i]}"' if i % 2 else pixels[i]
        lines.append(f"{labels[i]},{quoted},{usages[i]}".encode())
        good[len(lines)] = (int(labels[i]), images[i].tobytes(), usages[i])
    bad = {}
    for raw, reason in BAD_ROWS:
        lines.append(substitute(raw, pixels[0]))
        bad[len(lines)] = reason
    # The image of line 2 (Training) reappears in the private test set: a leak.
    lines.append(f"{labels[0]},{pixels[0]},PrivateTest".encode())
    leaked_line = len(lines)
    path = tmp_path_factory.mktemp("messy") / "messy.csv"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    return {"path": str(path), "good": good, "bad": bad, "leaked_line": leaked_line,
            "raw_lines": {n + 1: line for n, line in enumerate(lines)}}


@pytest.fixture(scope="module")
def messy_run(messy_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_out") / "examples"
    config = IngestConfig(max_rejected_fraction=1.0)
    return run_example_gen(messy_csv["path"], str(out), config, []), str(out)


def read_examples(examples_dir: str, split: str) -> list[dict]:
    rows = []
    for path in shard_paths(examples_dir, split):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = tf.train.Example.FromString(record).features.feature
            rows.append({
                "label": f[FEATURE_LABEL].int64_list.value[0],
                "pixels": f[FEATURE_PIXELS].bytes_list.value[0],
                "usage": f[FEATURE_USAGE].bytes_list.value[0].decode(),
                "row": f[FEATURE_ROW].int64_list.value[0],
                "source_row": f[FEATURE_SOURCE_ROW].int64_list.value[0],
                "augmentation": f[FEATURE_AUGMENTATION].bytes_list.value[0].decode()})
    return sorted(rows, key=lambda r: r["row"])


def read_rejected(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_bad_row_is_quarantined_with_line_and_reason(messy_csv, messy_run):
    result, _ = messy_run
    rejected = read_rejected(result.rejected_path)
    parse_failures = {int(r["line_number"]): r["reason"].split(":")[0] for r in rejected
                      if not r["reason"].startswith("duplicate_of_")}
    assert parse_failures == messy_csv["bad"]
    for r in rejected:  # raw text kept (non-UTF-8 bytes as \x escapes)
        raw = messy_csv["raw_lines"][int(r["line_number"])]
        assert r["raw_line"] == raw.decode("utf-8", errors="backslashreplace")
    expected = Counter(messy_csv["bad"].values())
    expected["duplicate_of_train_row"] = 1
    assert result.rejected_by_reason == dict(expected)


def test_rows_read_equals_written_plus_rejected(messy_csv, messy_run):
    result, _ = messy_run
    assert result.rows_read == 40 + len(BAD_ROWS) + 1
    assert result.rows_read == sum(result.rows_written.values()) + result.rows_rejected
    assert result.rows_written == {"train": 30, "validation": 5, "test": 5}


def test_bom_crlf_and_quoted_rows_become_exact_examples(messy_csv, messy_run):
    result, out = messy_run
    usage_split = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
    seen = {}
    for split in SPLITS:
        for ex in read_examples(out, split):
            assert usage_split[ex["usage"]] == split
            assert ex["source_row"] == ex["row"] and ex["augmentation"] == "original"
            assert len(ex["pixels"]) == NUM_PIXELS
            seen[ex["row"]] = (ex["label"], ex["pixels"], ex["usage"])
    assert seen == messy_csv["good"]
    assert result.split_mode == "usage"
    assert all(n >= 1 for n in result.num_shards.values())


def test_duplicate_image_across_splits_is_removed_from_test_and_reported(messy_csv, messy_run):
    result, out = messy_run
    leaked = messy_csv["leaked_line"]
    assert leaked not in {ex["row"] for ex in read_examples(out, "test")}
    assert 2 in {ex["row"] for ex in read_examples(out, "train")}
    rejected = {int(r["line_number"]): r["reason"] for r in read_rejected(result.rejected_path)}
    assert rejected[leaked] == "duplicate_of_train_row:2"
    report = json.loads(open(result.duplicates_path).read())
    assert result.cross_split_duplicates == report["cross_split_duplicate_images"] == 1
    (entry,) = report["duplicates"]
    assert entry["removed_line_numbers"] == [leaked]
    assert {(r["line_number"], r["split"]) for r in entry["rows"]} == {(2, "train"), (leaked, "test")}
    assert entry["pixels_sha1"] == hashlib.sha1(messy_csv["good"][2][1]).hexdigest()


def test_too_many_rejected_rows_raises_after_writing_the_rejected_file(messy_csv, tmp_path):
    out = tmp_path / "examples"
    with pytest.raises(TooManyRejectedRows) as error:
        run_example_gen(messy_csv["path"], str(out), IngestConfig(max_rejected_fraction=0.01), [])
    rejected_path = out / "rejected" / "rejected_rows.csv"
    assert str(rejected_path) in str(error.value)
    assert f"{len(BAD_ROWS)} of {40 + len(BAD_ROWS) + 1} rows" in str(error.value)
    assert len(read_rejected(str(rejected_path))) == len(BAD_ROWS) + 1


@pytest.fixture(scope="module")
def no_usage_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("random") / "no_usage.csv"
    generate_csv(str(path), rows=400, seed=5, include_usage=False)
    return str(path)


@pytest.fixture(scope="module")
def random_run(no_usage_csv, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("random_out") / "examples")
    return run_example_gen(no_usage_csv, out, IngestConfig(num_shards=2), []), out


def test_random_split_is_stratified_and_follows_the_seeded_rule(no_usage_csv, random_run):
    result, out = random_run
    assert result.split_mode == "random" and result.rows_rejected == 0
    with open(no_usage_csv) as f:
        labels = {n: int(line.split(",")[0]) for n, line in enumerate(f, start=1) if n > 1}
    class_sizes = Counter(labels.values())
    config = IngestConfig()
    by_split = {split: read_examples(out, split) for split in SPLITS}
    for label, size in class_sizes.items():
        train_end, validation_end = split_boundaries(size, config.split_fractions)
        counts = {s: sum(ex["label"] == label for ex in by_split[s]) for s in SPLITS}
        assert counts == {"train": train_end, "validation": validation_end - train_end,
                          "test": size - validation_end}
        # Rank inside the class by sha256("<seed>:<line>") decides the split.
        rows = sorted((n for n, row_label in labels.items() if row_label == label),
                      key=lambda n: hashlib.sha256(f"{config.seed}:{n}".encode()).hexdigest())
        assert {ex["row"] for ex in by_split["train"] if ex["label"] == label} == set(rows[:train_end])
    assert result.num_shards == {s: 2 for s in SPLITS}
    assert all(ex["usage"] == "" for s in SPLITS for ex in by_split[s])


def test_multi_process_runner_writes_the_same_examples(no_usage_csv, random_run, tmp_path,
                                                       monkeypatch):
    _, in_process_out = random_run  # read as one chunk
    # ~30 chunks of ~12 rows, read by two worker processes.
    monkeypatch.setattr(example_gen, "READ_CHUNK_BYTES", 100_000)
    assert len(plan_chunks(no_usage_csv, 100_000)) > 20
    out = str(tmp_path / "examples")
    result = run_example_gen(no_usage_csv, out, IngestConfig(num_shards=2), [
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert result.rows_read == 400
    for split in SPLITS:
        assert read_examples(out, split) == read_examples(in_process_out, split)


# ---------------------------------------------------------------------------------------
# Chunked reading: any chunking must number and return lines exactly as one sequential pass


def sequential_lines(data: bytes) -> list[tuple[int, bytes]]:
    """The reference: the pre-chunking reader (enumerate the file, skip header and blanks)."""
    out = []
    for number, line in enumerate(io.BytesIO(data), start=1):  # splits on b"\n" only
        line = line.rstrip(b"\n").rstrip(b"\r")
        if number > 1 and line.strip():
            out.append((number, line))
    return out


def chunked_lines(path: str, chunk_bytes: int) -> list[tuple[int, bytes]]:
    chunks = plan_chunks(path, chunk_bytes)
    ends = [offset + length for offset, length, _ in chunks]
    assert [offset for offset, _, _ in chunks[1:]] == ends[:-1]  # contiguous, no overlap
    return lines_of_chunks(path, chunks)


def lines_of_chunks(path: str, chunks) -> list[tuple[int, bytes]]:
    reader = ReadChunkLines(path)
    return [pair for chunk in chunks for pair in reader.process(chunk)]


EDGE_FILES = {
    # Blank and whitespace-only lines, a quoted newline (two physical lines), a lone \r.
    "bom_crlf_blank_lines_no_final_newline": (b'\xef\xbb\xbf"emotion","pixels"\r\n1,"2 3"\r\n'
                                              b'\r\n   \r\n4,5 6\r\n\n\n7,"8\n9"\r\n1,\r2\r\n3,4'),
    "final_newline": b"emotion,pixels\n1,2\n3,4\n",
    "header_only": b"emotion,pixels\n",
    "header_only_no_newline": b"emotion,pixels",
    "blank_lines_only": b"emotion,pixels\n\n\n\r\n",
    "long_lines": b"emotion,pixels\n" + b"\n".join(b"%d,%s" % (i % 7, b"1 " * (300 + i))
                                                    for i in range(60)),
}


@pytest.mark.parametrize("name", sorted(EDGE_FILES))
@pytest.mark.parametrize("chunk_bytes", [1, 5, 64, 1000, 10**9])
def test_chunks_number_lines_exactly_like_one_sequential_pass(tmp_path, name, chunk_bytes):
    path = tmp_path / "data.csv"
    path.write_bytes(EDGE_FILES[name])
    assert chunked_lines(str(path), chunk_bytes) == sequential_lines(EDGE_FILES[name])


def test_compressed_input_is_one_chunk_read_as_a_stream(tmp_path):
    data = EDGE_FILES["long_lines"]
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(data))
    assert len(plan_chunks(str(path), 64)) == 1
    assert chunked_lines(str(path), 64) == sequential_lines(data)


def test_reading_a_file_that_changed_after_planning_fails_loudly(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"emotion,pixels\n1,2\n3,4\n")
    chunks = plan_chunks(str(path), 1)
    path.write_bytes(b"emotion,pixels\n1,22\n3,4\n")
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        lines_of_chunks(str(path), chunks)


def test_one_chunk_per_line_gives_the_same_outputs(messy_csv, messy_run, tmp_path, monkeypatch):
    """Every line its own chunk (BOM, CRLF, quoted, bad rows, the leak): identical outputs."""
    result, out = messy_run
    monkeypatch.setattr(example_gen, "READ_CHUNK_BYTES", 1)
    tiny_out = str(tmp_path / "examples")
    tiny = run_example_gen(messy_csv["path"], tiny_out,
                           IngestConfig(max_rejected_fraction=1.0), [])
    assert len(plan_chunks(messy_csv["path"], 1)) == len(messy_csv["raw_lines"]) - 1
    for field_name in ("rows_read", "rows_written", "rows_rejected", "rejected_by_reason",
                       "cross_split_duplicates", "duplicate_rows_removed",
                       "within_split_duplicate_rows", "split_mode"):
        assert getattr(tiny, field_name) == getattr(result, field_name), field_name
    for name in ("rejected/rejected_rows.csv", "duplicates.json"):
        assert open(f"{tiny_out}/{name}", "rb").read() == open(f"{out}/{name}", "rb").read()
    for split in SPLITS:
        assert serialized_examples(tiny_out, split) == serialized_examples(out, split)


def serialized_examples(examples_dir: str, split: str) -> list[bytes]:
    return sorted(record for path in shard_paths(examples_dir, split)
                  for record in tf.data.TFRecordDataset(path).as_numpy_iterator())


def test_several_csvs_are_ingested_as_one_and_rejects_name_their_file(tmp_path):
    """The original data plus reviewed faces: a reviewed face already in the test split
    goes to train and leaves test; a bad row in the second file is quarantined with that
    file's own line number."""
    rng = np.random.default_rng(5)
    labels = np.arange(14) % 7
    pixels = [p.decode() for p in encode_pixel_strings(draw_faces(labels, rng))]
    usages = ["Training"] * 8 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    original = tmp_path / "fer.csv"
    original.write_text("emotion,pixels,Usage\n" + "".join(
        f"{labels[i]},{pixels[i]},{usages[i]}\n" for i in range(14)))
    reviewed = tmp_path / "reviewed.csv"
    # Line 2: the face of the original's line 15 (PrivateTest), now labelled by a person.
    reviewed.write_text(f"emotion,pixels,Usage\n{labels[13]},{pixels[13]},Training\n"
                        f"3,1 2 3,Training\n")
    out = tmp_path / "examples"
    result = run_example_gen([str(original), str(reviewed)], str(out),
                             IngestConfig(max_rejected_fraction=1.0), [])
    assert result.rows_read == 16
    assert result.rows_written == {"train": 9, "validation": 3, "test": 2}
    assert [s["path"] for s in result.sources] == [str(original), str(reviewed)]
    rejected = read_rejected(result.rejected_path)
    by_source = {r["source"]: r["reason"].split(":")[0] for r in rejected}
    assert by_source == {f"{reviewed}:3": "wrong_pixel_count",
                         f"{original}:15": "duplicate_of_train_row"}
    assert not (out / ".combined_input").exists()
    with pytest.raises(ValueError, match="share one header"):
        other = tmp_path / "other.csv"
        other.write_text("pixels,emotion\n")
        run_example_gen([str(original), str(other)], str(tmp_path / "x"), IngestConfig(), [])
