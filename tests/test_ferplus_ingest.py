"""FER+ votes in ingest: the synthetic vote file, the row-by-row join, quarantine of faces
whose votes say they are none, mismatched and malformed vote files, and the statistics
page's agreement table. No real FER+ file is needed: votes are generated for synthetic CSVs."""
from __future__ import annotations

import csv
import io

import pytest
import tensorflow as tf

from fer_pipeline.components.example_gen import TooManyRejectedRows, run_example_gen, shard_paths
from fer_pipeline.components.statistics.ferplus import ferplus_agreement, ferplus_section
from fer_pipeline.core.config import IngestConfig
from fer_pipeline.core.contract import (CLASS_NAMES_FERPLUS, FEATURE_FERPLUS_CLEAR,
                                        FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_VOTES,
                                        FEATURE_LABEL, FEATURE_ROW, FERPLUS_COLUMNS, SPLITS)
from fer_pipeline.core.errors import ConfigError, InputDataError
from fer_pipeline.core.ferplus_votes import judge, to_our_order, vote_distribution
from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.pipeline.synthetic_ferplus import FERPLUS_HEADER, generate_ferplus_votes

ROWS = 90


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic CSV and its synthetic votes, with two rows edited: line 2 votes only
    contempt, line 3 is mostly not a face."""
    d = tmp_path_factory.mktemp("ferplus")
    csv_path, votes_path = str(d / "fer.csv"), str(d / "votes.csv")
    generate_csv(csv_path, rows=ROWS, seed=5)
    counts = generate_ferplus_votes(csv_path, votes_path, seed=2)
    lines = open(votes_path).read().splitlines()
    lines[1] = _with_votes(lines[1], contempt=9, unknown=1)
    lines[2] = _with_votes(lines[2], NF=5, unknown=2, happiness=3)
    open(votes_path, "w").write("\n".join(lines) + "\n")
    return {"csv": csv_path, "votes": votes_path, "counts": counts, "dir": d}


def _with_votes(line: str, **votes: int) -> str:
    fields = next(csv.reader([line]))
    values = [votes.get(name, 0) for name in FERPLUS_COLUMNS]
    return ",".join(fields[:2] + [str(v) for v in values])


def _file_votes(votes_path: str) -> dict[int, tuple[int, ...]]:
    """CSV line number -> the ten votes in our order, read independently of ingest."""
    rows = list(csv.reader(open(votes_path)))
    return {line: to_our_order([int(v) for v in row[2:]])
            for line, row in enumerate(rows[1:], start=2)}


def _doubtful(votes_path: str) -> set[int]:
    """Lines whose votes are more than half unknown or not-a-face."""
    return {line for line, v in _file_votes(votes_path).items() if (v[8] + v[9]) * 2 > sum(v)}


def _examples(out: str) -> dict[int, dict]:
    found = {}
    for split in SPLITS:
        for record in tf.data.TFRecordDataset(shard_paths(out, split)):
            f = tf.train.Example.FromString(record.numpy()).features.feature
            found[f[FEATURE_ROW].int64_list.value[0]] = {
                "label": f[FEATURE_LABEL].int64_list.value[0],
                "votes": tuple(f[FEATURE_FERPLUS_VOTES].int64_list.value),
                "majority": f[FEATURE_FERPLUS_MAJORITY].int64_list.value[0],
                "clear": f[FEATURE_FERPLUS_CLEAR].int64_list.value[0]}
    return found


@pytest.fixture(scope="module")
def eight(data):
    out = str(data["dir"] / "out8")
    # max_rejected_fraction 0: FER+'s quarantines are label decisions, not bad rows.
    result = run_example_gen(data["csv"], out, IngestConfig(
        ferplus_labels=data["votes"], ferplus_classes=8, max_rejected_fraction=0.0), [])
    return result, out


def test_synthetic_votes_pair_with_every_row_and_copy_its_usage(data):
    faces = list(csv.reader(open(data["csv"])))[1:]
    votes = list(csv.reader(open(data["votes"])))
    assert ",".join(votes[0]) == FERPLUS_HEADER
    assert len(votes) - 1 == len(faces) == data["counts"]["rows"] == ROWS
    assert [v[0] for v in votes[1:]] == [f[2] for f in faces]
    assert all(sum(int(x) for x in v[2:]) == 10 for v in votes[1:])
    again = str(data["dir"] / "again.csv")
    generate_ferplus_votes(data["csv"], again, seed=2)
    assert open(again).read().splitlines()[3:] == open(data["votes"]).read().splitlines()[3:]


def test_every_example_carries_its_votes_majority_and_clarity(data, eight):
    result, out = eight
    examples, expected = _examples(out), _file_votes(data["votes"])
    doubtful = _doubtful(data["votes"])
    assert 3 in doubtful and data["counts"]["not_face"] >= 1
    assert len(examples) == ROWS - len(doubtful) == sum(result.rows_written.values())
    for line, example in examples.items():
        votes = expected[line]
        assert example["votes"] == votes
        assert example["majority"] == max(range(8), key=lambda k: (votes[k], -k))
        emotion_votes = sum(votes[:8])
        assert example["clear"] == int(votes[example["majority"]] * 2 > emotion_votes)
    assert examples[2]["majority"] == CLASS_NAMES_FERPLUS.index("contempt")
    assert result.ferplus["classes"] == 8 and result.ferplus["mode"] == "majority"


def test_a_face_mostly_not_a_face_is_quarantined_with_its_reason(data, eight):
    result, out = eight
    rejected = list(csv.DictReader(open(f"{out}/rejected/rejected_rows.csv")))
    assert {int(r["line_number"]) for r in rejected} == _doubtful(data["votes"])
    assert (rejected[0]["line_number"], rejected[0]["reason"]) == (
        "3", "ferplus_not_a_face: 7 of 10 votes are unknown (2) or not a face (5)")
    assert rejected[0]["raw_line"] == open(data["csv"]).read().splitlines()[2]
    assert all(r["reason"].startswith("ferplus_not_a_face: ") for r in rejected)
    assert result.ferplus["quarantined"] == {"ferplus_not_a_face": len(rejected)}


def test_seven_classes_drop_contempt_votes(data, tmp_path):
    result = run_example_gen(data["csv"], str(tmp_path / "out7"), IngestConfig(
        ferplus_labels=data["votes"], ferplus_classes=7), [])
    examples = _examples(str(tmp_path / "out7"))
    assert 2 not in examples and 3 not in examples
    assert max(e["majority"] for e in examples.values()) < 7
    assert result.rejected_by_reason == {"ferplus_no_votes": 1,
                                         "ferplus_not_a_face": len(_doubtful(data["votes"]))}
    assert "contempt's votes are dropped" in open(
        tmp_path / "out7" / "rejected" / "rejected_rows.csv").read()


def test_judging_votes():
    # angry, disgust, fear, happy, sad, surprise, neutral, contempt, unknown, not_face
    assert judge((0, 0, 0, 6, 0, 0, 4, 0, 0, 0), 8) == ((0, 0, 0, 6, 0, 0, 4, 0, 0, 0), 3, True)
    tie = judge((0, 0, 0, 5, 0, 0, 5, 0, 0, 0), 8)
    assert tie[1:] == (3, False)       # a tie: the first in our order, not clear
    assert judge((0, 0, 0, 5, 0, 0, 0, 0, 3, 2), 8)[1:] == (3, True)   # 5 of 10: not > half
    assert judge((0, 0, 0, 4, 0, 0, 0, 0, 3, 3), 8).startswith("ferplus_not_a_face: 6 of 10")
    assert judge((0, 0, 0, 2, 0, 0, 0, 0, 4, 4), 8).startswith("ferplus_not_a_face: 8 of 10")
    assert judge((0,) * 10, 8).startswith("ferplus_no_votes")
    assert judge((0, 0, 0, 3, 0, 0, 0, 4, 0, 0), 7)[1:] == (3, True)
    distribution = vote_distribution([(0, 0, 0, 6, 0, 0, 2, 2, 5, 5)], 7)
    assert distribution.shape == (1, 7) and distribution[0, 3] == pytest.approx(0.75)


def _rewrite(path, lines, tmp_path, name):
    out = tmp_path / name
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def _ingest(data, votes_path, tmp_path):
    return run_example_gen(data["csv"], str(tmp_path / "out"),
                           IngestConfig(ferplus_labels=votes_path), [])


def test_a_shorter_vote_file_stops_the_run_naming_the_unpaired_line(data, tmp_path):
    lines = open(data["votes"]).read().splitlines()
    short = _rewrite(data["votes"], lines[:-1], tmp_path, "short.csv")
    with pytest.raises(InputDataError) as e:
        _ingest(data, short, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "different numbers of rows" in message
    assert f"{data['csv']} line {ROWS + 1} has no partner" in message
    longer = _rewrite(data["votes"], lines + [lines[-1]], tmp_path, "long.csv")
    with pytest.raises(InputDataError, match=f"long.csv line {ROWS + 2} has no partner"):
        _ingest(data, longer, tmp_path)
    assert not (tmp_path / "out" / "train").exists() or not list(
        (tmp_path / "out" / "train").iterdir())


def test_a_row_whose_usage_differs_stops_the_run_naming_both_lines(data, tmp_path):
    lines = open(data["votes"]).read().splitlines()
    fields = next(csv.reader([lines[40]]))
    fields[0] = "PrivateTest" if fields[0] != "PrivateTest" else "Training"
    lines[40] = ",".join(fields)
    with pytest.raises(InputDataError) as e:
        _ingest(data, _rewrite(data["votes"], lines, tmp_path, "usage.csv"), tmp_path)
    assert "\n" not in str(e.value)
    assert f"usage.csv line 41 (Usage {fields[0]!r}) does not match {data['csv']} line 41" \
        in str(e.value)


def test_a_bad_header_stops_the_run_in_one_line(data, tmp_path):
    lines = open(data["votes"]).read().splitlines()
    lines[0] = lines[0].replace("contempt", "scorn")
    with pytest.raises(InputDataError, match=r"lacks column\(s\) \['contempt'\]") as e:
        _ingest(data, _rewrite(data["votes"], lines, tmp_path, "header.csv"), tmp_path)
    assert "\n" not in str(e.value)


def test_a_non_integer_vote_is_a_bad_row_quarantined_and_counted(data, tmp_path):
    lines = open(data["votes"]).read().splitlines()
    lines[10] = lines[10].rsplit(",", 1)[0] + ",1.5"
    lines[11] = lines[11] + ",3"
    bad = _rewrite(data["votes"], lines, tmp_path, "bad.csv")
    result = run_example_gen(data["csv"], str(tmp_path / "out"), IngestConfig(
        ferplus_labels=bad, max_rejected_fraction=0.05), [])
    rejected = {r["line_number"]: r["reason"] for r in csv.DictReader(
        open(tmp_path / "out" / "rejected" / "rejected_rows.csv"))}
    assert rejected["11"] == "ferplus_bad_votes: NF is '1.5', not a vote count"
    assert rejected["12"] == "ferplus_bad_votes: the vote row has 13 fields, the header 12"
    with pytest.raises(TooManyRejectedRows, match="ferplus_bad_votes"):
        run_example_gen(data["csv"], str(tmp_path / "out2"), IngestConfig(
            ferplus_labels=bad, max_rejected_fraction=0.01), [])
    assert result.rejected_by_reason["ferplus_bad_votes"] == 2


def test_votes_join_one_csv_only(data, tmp_path):
    with pytest.raises(ConfigError, match="ONE FER-2013 CSV"):
        run_example_gen([data["csv"], data["csv"]], str(tmp_path / "out"),
                        IngestConfig(ferplus_labels=data["votes"]), [])
    with pytest.raises(InputDataError, match="no such file"):
        _ingest(data, str(tmp_path / "missing.csv"), tmp_path)


def test_the_statistics_page_shows_agreement_per_class(data, eight):
    _, out = eight
    agreement = ferplus_agreement(out, list(SPLITS))
    examples = _examples(out)
    assert agreement["faces"] == len(examples)
    assert agreement["agree"] == sum(e["label"] == e["majority"] for e in examples.values())
    happy = agreement["per_class"]["happy"]
    assert happy["faces"] == sum(e["label"] == 3 for e in examples.values())
    assert happy["agree"] == sum(e["label"] == 3 == e["majority"] for e in examples.values())
    html = ferplus_section(agreement)
    assert "FER+ agrees" in html and 'data-path="ferplus/per_class/happy/agree"' in html
    assert ferplus_agreement(str(data["dir"]), list(SPLITS)) is None   # no FER+: no section
    assert io.StringIO(html).read().count("<tr>") >= 8


def test_two_worker_processes_join_the_same_votes(data, eight, tmp_path):
    """The votes reach the Beam job as a side input: on DirectRunner's worker processes
    (pickled, as on Flink or Spark) every example gets the same votes as in-process."""
    _, out = eight
    result = run_example_gen(data["csv"], str(tmp_path / "mp"), IngestConfig(
        ferplus_labels=data["votes"], ferplus_classes=8, max_rejected_fraction=0.0),
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert _examples(str(tmp_path / "mp")) == _examples(out)
    assert result.ferplus["quarantined"] == {"ferplus_not_a_face": len(_doubtful(data["votes"]))}
