"""The review queue: records, deduplication, concurrent writer processes, crash safety,
decisions with undo, and the FER-2013 CSV export."""
from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import sqlite3
import time

import numpy as np
import pytest

from fer_pipeline.core.contract import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS, REVIEW_QUEUE_FILE
from fer_pipeline.serving.review_queue import (STATUS_LABELED, STATUS_NOT_FACE, STATUS_PENDING,
                                  STATUS_SKIPPED, ModelPrediction, ReviewError, ReviewQueue,
                                  content_hash, record_if_flagged)

# spawn, not fork: the pytest process may already run TensorFlow threads.
SPAWN = multiprocessing.get_context("spawn")


def face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE),
                                                dtype=np.uint8)


def predictions(seed: int, with_saliency: bool = False) -> dict[str, ModelPrediction]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, version in (("cnn", 3), ("vgg16", 7)):
        probs = rng.dirichlet(np.ones(NUM_CLASSES))
        maps = rng.random((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE)) if with_saliency else None
        out[name] = ModelPrediction(version, probs, maps)
    return out


DECISION = {"class_id": 3, "class_name": "happy", "confidence": 0.41,
            "needs_human_review": True, "reason": "models disagree"}


def test_record_round_trips_and_the_same_face_is_queued_once(tmp_path):
    with ReviewQueue(str(tmp_path)) as queue:
        preds = predictions(1, with_saliency=True)
        first = queue.record(face(1), "a.csv:2", preds, DECISION)
        again = queue.record(face(1), "b.csv:9", predictions(2), DECISION)
        other = queue.record(face(2), "a.csv:3", predictions(3), DECISION)
        assert first.inserted and not again.inserted and other.inserted
        assert again.item_id == first.item_id != other.item_id
        assert queue.counts() == {STATUS_PENDING: 2, STATUS_LABELED: 0, STATUS_NOT_FACE: 0,
                                  STATUS_SKIPPED: 0}

        item = queue.get(first.item_id)
        np.testing.assert_array_equal(item.pixels, face(1))
        assert item.content_hash == content_hash(face(1)) and len(item.content_hash) == 64
        assert item.source == "a.csv:2" and item.decision == DECISION
        assert item.created_at.endswith("+00:00")
        assert list(item.models) == ["cnn", "vgg16"]
        for name, stored in item.models.items():
            assert stored.version == preds[name].version
            np.testing.assert_allclose(stored.probabilities, preds[name].probabilities,
                                       atol=1e-6)
            # Saliency is kept at 8 bits: within half a step of 1/255.
            np.testing.assert_allclose(stored.saliency, preds[name].saliency, atol=0.5 / 255 + 1e-7)
        assert queue.get(other.item_id).models["cnn"].saliency is None
    assert os.path.exists(tmp_path / REVIEW_QUEUE_FILE)


def test_database_is_in_wal_mode_with_a_unique_content_hash(tmp_path):
    ReviewQueue(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / REVIEW_QUEUE_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("INSERT INTO items (content_hash, pixels, source, created_at, decision) "
               "VALUES ('h', zeroblob(2304), 's', 't', '{}')")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO items (content_hash, pixels, source, created_at, decision) "
                   "VALUES ('h', zeroblob(2304), 's2', 't', '{}')")


def test_bad_records_are_refused_before_anything_is_written(tmp_path):
    with ReviewQueue(str(tmp_path)) as queue:
        with pytest.raises(ValueError, match="2304"):
            queue.record(np.zeros(100, np.uint8), "x", predictions(0), DECISION)
        with pytest.raises(ValueError, match="7 or 8 probabilities"):
            queue.record(face(0), "x", {"cnn": ModelPrediction(1, np.ones(3) / 3)}, DECISION)
        with pytest.raises(ValueError, match="saliency"):
            queue.record(face(0), "x", {"cnn": ModelPrediction(1, np.ones(7) / 7,
                                                               np.zeros((48, 48)))}, DECISION)
        assert sum(queue.counts().values()) == 0


def test_only_flagged_decisions_are_queued(tmp_path):
    with ReviewQueue(str(tmp_path)) as queue:
        assert record_if_flagged(queue, face(0), "x", predictions(0),
                                 {**DECISION, "needs_human_review": False}) is None
        assert record_if_flagged(queue, face(0), "x", predictions(0), DECISION).inserted
        assert queue.counts()[STATUS_PENDING] == 1


# --- concurrency and crashes -------------------------------------------------------------

WRITERS, OWN_FACES, SHARED_FACES = 4, 25, 15


def _writer(directory: str, writer: int, results) -> None:
    """Records its own faces and the faces every writer shares, interleaved."""
    seeds = [1000 * (writer + 1) + i for i in range(OWN_FACES)] + list(range(SHARED_FACES))
    np.random.default_rng(writer).shuffle(seeds)
    ids = {}
    with ReviewQueue(directory) as queue:
        for seed in seeds:
            result = queue.record(face(seed), f"writer{writer}:{seed}", predictions(seed),
                                  DECISION)
            ids[seed] = (result.item_id, result.inserted)
    results.put((writer, ids))


def test_concurrent_writer_processes_lose_nothing_and_duplicate_nothing(tmp_path):
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=_writer, args=(str(tmp_path), w, results))
               for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    reported = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    expected = WRITERS * OWN_FACES + SHARED_FACES
    with ReviewQueue(str(tmp_path)) as queue:
        assert queue.counts()[STATUS_PENDING] == expected
    db = sqlite3.connect(tmp_path / REVIEW_QUEUE_FILE)
    hashes = [row[0] for row in db.execute("SELECT content_hash FROM items")]
    assert len(hashes) == len(set(hashes)) == expected
    # Every face's predictions were written with it (two models each), none twice.
    assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 2 * expected
    # Each shared face was inserted by exactly one writer; all writers got the same id.
    for seed in range(SHARED_FACES):
        answers = [reported[w][seed] for w in range(WRITERS)]
        assert sum(inserted for _, inserted in answers) == 1
        assert len({item_id for item_id, _ in answers}) == 1
    for w in range(WRITERS):
        for seed in range(1000 * (w + 1), 1000 * (w + 1) + OWN_FACES):
            assert reported[w][seed][1] is True


def _hold_open_transaction(directory: str, committed: int, ready) -> None:
    """Commits `committed` faces, then dies (SIGKILL from the parent) inside a write
    transaction that has inserted more rows but not committed them."""
    with ReviewQueue(directory) as queue:
        for seed in range(committed):
            queue.record(face(seed), f"ok:{seed}", predictions(seed), DECISION)
    db = sqlite3.connect(os.path.join(directory, REVIEW_QUEUE_FILE), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    for seed in range(committed, committed + 20):
        db.execute("INSERT INTO items (content_hash, pixels, source, created_at, decision) "
                   "VALUES (?, ?, 'lost', 't', '{}')", (content_hash(face(seed)),
                                                       face(seed).tobytes()))
    ready.set()
    time.sleep(60)


def _record_forever(directory: str, progress) -> None:
    with ReviewQueue(directory) as queue:
        seed = 0
        while True:
            queue.record(face(seed), f"loop:{seed}", predictions(seed, with_saliency=True),
                         DECISION)
            seed += 1
            progress.value = seed


def _assert_opens_cleanly(directory: str) -> int:
    db = sqlite3.connect(os.path.join(directory, REVIEW_QUEUE_FILE))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    # No face without its predictions, and none with half of them.
    partial = db.execute("SELECT COUNT(*) FROM items WHERE id NOT IN (SELECT item_id FROM "
                         "predictions GROUP BY item_id HAVING COUNT(*) = 2)").fetchone()[0]
    assert partial == 0
    db.close()
    with ReviewQueue(directory) as queue:    # and it still takes writes
        assert queue.record(face(99_999), "after", predictions(1), DECISION).inserted
    return items


def test_a_writer_killed_mid_transaction_loses_nothing_committed(tmp_path):
    ready = SPAWN.Event()
    child = SPAWN.Process(target=_hold_open_transaction, args=(str(tmp_path), 10, ready))
    child.start()
    assert ready.wait(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert _assert_opens_cleanly(str(tmp_path)) == 10
    with ReviewQueue(str(tmp_path)) as queue:
        sources = {queue.get(i).source for i in range(1, 11)}
    assert sources == {f"ok:{s}" for s in range(10)}


def test_a_writer_killed_at_a_random_moment_leaves_only_whole_records(tmp_path):
    # No lock: the writer is killed at a random moment, possibly while holding the
    # Value's lock, and reading through a lock a dead process holds waits forever (seen in
    # CI). One writer storing one int needs no lock.
    progress = SPAWN.Value("i", 0, lock=False)
    child = SPAWN.Process(target=_record_forever, args=(str(tmp_path), progress))
    child.start()
    deadline = time.monotonic() + 60
    while progress.value < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    reported = progress.value
    assert reported >= 15
    # Everything the writer saw committed is there; at most the one in flight is extra.
    assert _assert_opens_cleanly(str(tmp_path)) in (reported, reported + 1)


# --- decisions -----------------------------------------------------------------------

def _queue_with(tmp_path, count: int) -> ReviewQueue:
    queue = ReviewQueue(str(tmp_path))
    for seed in range(count):
        queue.record(face(seed), f"f:{seed}", predictions(seed), DECISION)
    return queue


def test_decide_moves_through_the_queue_and_undo_takes_back_the_last(tmp_path):
    with _queue_with(tmp_path, 4) as queue:
        assert queue.next_pending().id == 1
        assert queue.decide(1, "label", 5, session="a").status == STATUS_LABELED
        assert queue.decide(2, "not_face", session="a").label is None
        assert queue.decide(3, "skip", session="b").status == STATUS_SKIPPED
        assert queue.next_pending().id == 4
        assert queue.counts() == {STATUS_PENDING: 1, STATUS_LABELED: 1, STATUS_NOT_FACE: 1,
                                  STATUS_SKIPPED: 1}
        # Undo is per session: a's last decision was item 2, b's was item 3.
        assert queue.undo("a") == 2
        assert queue.get(2).status == STATUS_PENDING and queue.next_pending().id == 2
        assert queue.undo("a") == 1
        assert queue.get(1).label is None
        assert queue.undo("a") is None and not queue.can_undo("a")
        assert queue.can_undo("b")
        # Decided again after the undo: the new decision stands.
        assert queue.decide(1, "label", 0, session="a").label == 0


@pytest.mark.parametrize("action,label,kind", [
    ("label", 7, "invalid"), ("label", -1, "invalid"), ("label", None, "invalid"),
    ("label", True, "invalid"), ("label", "3", "invalid"), ("delete", None, "invalid")])
def test_bad_decisions_are_refused(tmp_path, action, label, kind):
    with _queue_with(tmp_path, 1) as queue:
        with pytest.raises(ReviewError) as raised:
            queue.decide(1, action, label)
        assert raised.value.kind == kind
        assert queue.get(1).status == STATUS_PENDING


def test_unknown_and_already_decided_items_are_refused(tmp_path):
    with _queue_with(tmp_path, 1) as queue:
        with pytest.raises(ReviewError) as raised:
            queue.decide(42, "skip")
        assert raised.value.kind == "not_found"
        queue.decide(1, "label", 2)
        with pytest.raises(ReviewError) as raised:
            queue.decide(1, "label", 3)
        assert raised.value.kind == "conflict" and queue.get(1).label == 2


def test_export_writes_only_labelled_faces_as_fer2013_training_rows(tmp_path):
    with _queue_with(tmp_path / "q", 5) as queue:
        queue.decide(1, "label", 6)
        queue.decide(2, "not_face")
        queue.decide(3, "skip")
        queue.decide(4, "label", 1)
        out = tmp_path / "reviewed.csv"
        assert queue.export_csv(str(out)) == 2
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["emotion", "pixels", "Usage"]
    assert [(r[0], r[2]) for r in rows[1:]] == [("6", "Training"), ("1", "Training")]
    for row, seed in zip(rows[1:], (0, 3)):
        values = np.array(row[1].split(), dtype=np.int64)
        assert values.size == NUM_PIXELS
        np.testing.assert_array_equal(values.reshape(IMAGE_SIZE, IMAGE_SIZE), face(seed))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
