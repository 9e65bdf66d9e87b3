"""The human review queue: faces the ensemble could not decide, waiting for a person.

One SQLite database in WAL mode (`<queue dir>/review_queue.sqlite3`). Each flagged face is
stored once, keyed by the sha256 of its 2304 pixel bytes (UNIQUE + INSERT OR IGNORE, so
concurrent clients that flag the same face never duplicate it), with where it came from,
each model's probabilities, version and saliency maps, the ensemble's decision and the
time. Every write is one transaction: a process killed mid-write leaves the database as
it was at the last commit, and `synchronous=FULL` keeps commits across a power cut too.

A person then labels the pending faces (`fer-review`): a class 0-6, "not a face", or skip.
Every decision is appended to a log, so the last one of a reviewer's session can be
undone; `export_csv` writes the labelled faces as FER-2013 training rows.

A face's classes are its models' (the width of their probabilities, all equal): FER-2013's
seven, or FER+'s eight when the models were trained with `contempt` (class 7). FER-2013's
CSV has no contempt, so an answer `contempt` goes back as FER+ votes: `export_csv` with
`votes_path` also writes a fer2013new.csv-style vote file, row for row with the CSV, that
`fer-pipeline run --data reviewed.csv --ferplus-labels votes.csv` (ingest.ferplus_classes 8)
trains on; the CSV's emotion column of such a row holds neutral (6) only because that
column must hold one of FER-2013's classes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS, IMAGE_SIZE,
                                        NUM_CLASSES, NUM_PIXELS, REVIEW_QUEUE_FILE)
from fer_pipeline.core.ensemble import shared_class_count
from fer_pipeline.core.errors import UserError
from fer_pipeline.serving.review_export import vote_rows, write_csv_atomically

# 2: labels 0-7 (FER+'s contempt); a version-1 queue (labels 0-6) is rebuilt on opening.
SCHEMA_VERSION = 2

STATUS_PENDING = "pending"
STATUS_LABELED = "labeled"
STATUS_NOT_FACE = "not_face"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_PENDING, STATUS_LABELED, STATUS_NOT_FACE, STATUS_SKIPPED)
# What a reviewer can do to a pending face, and the status it leaves the face in.
ACTIONS = {"label": STATUS_LABELED, "not_face": STATUS_NOT_FACE, "skip": STATUS_SKIPPED}

EXPORT_USAGE = "Training"
EXPORT_HEADER = ("emotion", "pixels", "Usage")
# The CSV's emotion for a face answered `contempt`, which FER-2013 lacks (module docstring).
CONTEMPT_STAND_IN = CLASS_NAMES.index("neutral")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT NOT NULL UNIQUE,
    pixels BLOB NOT NULL CHECK (length(pixels) = {NUM_PIXELS}),
    source TEXT NOT NULL,
    created_at TEXT NOT NULL,
    decision TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '{STATUS_PENDING}'
        CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    label INTEGER CHECK (label IS NULL OR label BETWEEN 0 AND {len(CLASS_NAMES_FERPLUS) - 1}),
    decided_at TEXT
);
CREATE INDEX IF NOT EXISTS items_by_status ON items (status, id);
CREATE TABLE IF NOT EXISTS predictions (
    item_id INTEGER NOT NULL REFERENCES items (id),
    model TEXT NOT NULL,
    version INTEGER,
    probabilities TEXT NOT NULL,
    saliency BLOB,
    PRIMARY KEY (item_id, model)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items (id),
    session TEXT NOT NULL,
    status TEXT NOT NULL,
    label INTEGER,
    decided_at TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS decisions_by_session ON decisions (session, undone, id);
"""


class ReviewError(UserError):
    """A request the queue cannot satisfy; `kind` is "not_found", "invalid" or "conflict"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ModelPrediction:
    """One model's answer about one face, as the queue stores it."""
    version: Optional[int]
    probabilities: np.ndarray                 # float [7] (FER+: [8])
    saliency: Optional[np.ndarray] = None     # float [7, 48, 48] in [0, 1]; None if unknown


@dataclass
class ReviewItem:
    id: int
    content_hash: str
    pixels: np.ndarray                        # uint8 [48, 48]
    source: str
    created_at: str
    decision: dict[str, Any]                  # the ensemble's decision (fer_pipeline.core.ensemble)
    status: str
    label: Optional[int]
    decided_at: Optional[str]
    models: dict[str, ModelPrediction] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The classes a person chooses from: the models' (7, or FER+'s 8)."""
        for prediction in self.models.values():
            return int(np.asarray(prediction.probabilities).size)
        return NUM_CLASSES


@dataclass
class RecordResult:
    item_id: int
    inserted: bool                            # False: the same face was already queued


def content_hash(pixels: np.ndarray) -> str:
    """sha256 of the face's 2304 uint8 pixel bytes (row-major), hex."""
    return hashlib.sha256(_pixel_bytes(pixels)).hexdigest()


def _pixel_bytes(pixels: np.ndarray) -> bytes:
    array = np.asarray(pixels)
    if array.size != NUM_PIXELS:
        raise ValueError(f"a face has {NUM_PIXELS} pixels (48x48), got {array.size}")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise ValueError("pixels must be 0-255")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array).reshape(NUM_PIXELS).tobytes()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _saliency_bytes(saliency: Optional[np.ndarray], num_classes: int) -> Optional[bytes]:
    # Stored as uint8 (map * 255): 16 KB per model and face instead of 64 KB of float32;
    # a display needs no more than 256 levels.
    if saliency is None:
        return None
    maps = np.asarray(saliency, dtype=np.float32)
    if maps.shape != (num_classes, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"saliency must be [{num_classes}, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                         f"got {list(maps.shape)}")
    return np.round(np.clip(maps, 0.0, 1.0) * 255).astype(np.uint8).tobytes()


def _probabilities_json(probabilities: np.ndarray) -> str:
    return json.dumps([round(float(p), 6) for p in np.asarray(probabilities).reshape(-1)])


def _class_count(models: Mapping[str, ModelPrediction]) -> int:
    """The one class count of a face's models: 7 or 8, the same for all of them."""
    widths = {name: int(np.asarray(p.probabilities).size) for name, p in models.items()}
    return shared_class_count(widths) if widths else NUM_CLASSES


class ReviewQueue:
    """The queue in `directory` (created if needed). Safe to share between threads; any
    number of processes may open the same directory at once."""

    def __init__(self, directory: str, timeout_s: float = 30.0) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, REVIEW_QUEUE_FILE)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each write is exactly
        # one transaction; timeout: writers from other processes wait instead of failing.
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        self._setup()

    def _setup(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Foreign keys are switched on after the (rare) rebuild of a version-1 table,
            # which SQLite allows only with them off (and cannot switch inside a
            # transaction).
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{self.path} has schema version {version}; this "
                                       f"program knows up to {SCHEMA_VERSION}")
                if version == 1:
                    self._widen_labels()
                # One statement at a time: executescript() would COMMIT our transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("PRAGMA foreign_keys=ON")

    def _widen_labels(self) -> None:
        """Version 1 -> 2: the items table's CHECK allowed labels 0-6; SQLite cannot alter a
        CHECK, so the table is rebuilt under the new one (SQLite's documented procedure:
        new table, copy, drop, rename; the other tables keep referring to `items`)."""
        create = _SCHEMA.split(";")[0].replace("CREATE TABLE IF NOT EXISTS items",
                                               "CREATE TABLE items_v2")
        self._db.execute(create)
        self._db.execute("INSERT INTO items_v2 SELECT * FROM items")
        self._db.execute("DROP TABLE items")
        self._db.execute("ALTER TABLE items_v2 RENAME TO items")

    @staticmethod
    def _classes_of(db: sqlite3.Connection, item_id: int) -> int:
        row = db.execute("SELECT probabilities FROM predictions WHERE item_id = ? "
                         "ORDER BY rowid LIMIT 1", (item_id,)).fetchone()
        return len(json.loads(row[0])) if row else NUM_CLASSES

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ReviewQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions ----------------------------------------------------------------

    class _Transaction:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock now: two writers cannot both read "absent"
            # and then both insert.
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _transaction(self) -> "ReviewQueue._Transaction":
        return ReviewQueue._Transaction(self._db)

    # --- recording -------------------------------------------------------------------

    def record(self, pixels: np.ndarray, source: str, models: Mapping[str, ModelPrediction],
               decision: Mapping[str, Any], created_at: Optional[str] = None) -> RecordResult:
        """Queues one face (once: a face already queued keeps its first record)."""
        raw = _pixel_bytes(pixels)
        digest = hashlib.sha256(raw).hexdigest()
        num_classes = _class_count(models)
        rows = [(name, None if p.version is None else int(p.version),
                 _probabilities_json(p.probabilities), _saliency_bytes(p.saliency, num_classes))
                for name, p in models.items()]
        decision_json = json.dumps(dict(decision), default=_json_default)
        with self._lock, self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO items (content_hash, pixels, source, created_at, "
                "decision) VALUES (?, ?, ?, ?, ?)",
                (digest, raw, str(source), created_at or _now(), decision_json))
            if cursor.rowcount == 0:
                existing = db.execute("SELECT id FROM items WHERE content_hash = ?",
                                      (digest,)).fetchone()[0]
                return RecordResult(existing, False)
            item_id = cursor.lastrowid
            db.executemany("INSERT INTO predictions (item_id, model, version, probabilities, "
                           "saliency) VALUES (?, ?, ?, ?, ?)",
                           [(item_id, *row) for row in rows])
            return RecordResult(item_id, True)

    # --- reading ---------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many faces are in each status (every status present, zero included)."""
        with self._lock:
            found = dict(self._db.execute(
                "SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
        return {status: int(found.get(status, 0)) for status in STATUSES}

    def next_pending(self) -> Optional[ReviewItem]:
        """The oldest face nobody has decided yet, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM items WHERE status = ? ORDER BY id LIMIT 1",
                (STATUS_PENDING,)).fetchone()
        return self.get(row[0]) if row else None

    def get(self, item_id: int) -> ReviewItem:
        with self._lock:
            row = self._db.execute(
                "SELECT id, content_hash, pixels, source, created_at, decision, status, "
                "label, decided_at FROM items WHERE id = ?", (int(item_id),)).fetchone()
            if row is None:
                raise ReviewError("not_found", f"no review item {item_id}")
            predictions = self._db.execute(
                "SELECT model, version, probabilities, saliency FROM predictions "
                "WHERE item_id = ? ORDER BY rowid", (int(item_id),)).fetchall()
        item = ReviewItem(
            id=row[0], content_hash=row[1],
            pixels=np.frombuffer(row[2], np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE),
            source=row[3], created_at=row[4], decision=json.loads(row[5]), status=row[6],
            label=row[7], decided_at=row[8])
        for model, version, probabilities, saliency in predictions:
            maps = None
            if saliency is not None:
                maps = np.frombuffer(saliency, np.uint8).reshape(
                    -1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 255.0
            item.models[model] = ModelPrediction(version, np.array(json.loads(probabilities)),
                                                 maps)
        return item

    # --- deciding --------------------------------------------------------------------

    def decide(self, item_id: int, action: str, label: Optional[int] = None,
               session: str = "") -> ReviewItem:
        """A reviewer's decision on a pending face: action "label" (with label 0-6, or 0-7
        when the face's models are FER+'s), "not_face" or "skip". Deciding a face that is
        no longer pending is a conflict (someone else got there first, or the page was
        stale)."""
        if action not in ACTIONS:
            raise ReviewError("invalid", f"action must be one of {sorted(ACTIONS)}, "
                                         f"got {action!r}")
        if action == "label":
            if not isinstance(label, int) or isinstance(label, bool):
                raise ReviewError("invalid", f"label must be an integer, got {label!r}")
        else:
            label = None
        status, now = ACTIONS[action], _now()
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT status FROM items WHERE id = ?", (int(item_id),)).fetchone()
            if row is None:
                raise ReviewError("not_found", f"no review item {item_id}")
            if row[0] != STATUS_PENDING:
                raise ReviewError("conflict", f"review item {item_id} is already {row[0]}")
            classes = self._classes_of(db, int(item_id))
            if label is not None and not 0 <= label < classes:
                raise ReviewError("invalid", f"label must be an integer 0-{classes - 1} "
                                             f"(this face's models have {classes} classes), "
                                             f"got {label!r}")
            db.execute("UPDATE items SET status = ?, label = ?, decided_at = ? WHERE id = ?",
                       (status, label, now, int(item_id)))
            db.execute("INSERT INTO decisions (item_id, session, status, label, decided_at) "
                       "VALUES (?, ?, ?, ?, ?)", (int(item_id), session, status, label, now))
        return self.get(item_id)

    def undo(self, session: str = "") -> Optional[int]:
        """Takes back `session`'s last decision that is not undone yet: its face is pending
        again. Returns that face's id, or None when there is nothing to undo. A face can
        only be decided while pending, so its state before any decision was pending."""
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT id, item_id FROM decisions WHERE session = ? AND "
                             "undone = 0 ORDER BY id DESC LIMIT 1", (session,)).fetchone()
            if row is None:
                return None
            decision_id, item_id = row
            db.execute("UPDATE decisions SET undone = 1 WHERE id = ?", (decision_id,))
            db.execute("UPDATE items SET status = ?, label = NULL, decided_at = NULL "
                       "WHERE id = ?", (STATUS_PENDING, item_id))
            return int(item_id)

    def can_undo(self, session: str = "") -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM decisions WHERE session = ? AND undone = 0 "
                                    "LIMIT 1", (session,)).fetchone() is not None

    # --- export ----------------------------------------------------------------------

    def labeled(self) -> Iterator[tuple[int, np.ndarray]]:
        """(label, uint8 [48, 48] pixels) of every face a person gave a class, oldest first
        (label 7 is FER+'s contempt)."""
        with self._lock:
            rows = self._db.execute("SELECT label, pixels FROM items WHERE status = ? "
                                    "ORDER BY id", (STATUS_LABELED,)).fetchall()
        for label, raw in rows:
            yield int(label), np.frombuffer(raw, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)

    def export_csv(self, out_path: str, votes_path: Optional[str] = None) -> int:
        """Writes the labelled faces as a FER-2013 CSV (emotion,pixels,Usage with
        Usage=Training); returns how many. With `votes_path`, also a FER+ vote file row for
        row with it (module docstring); without one, a face answered `contempt` stops the
        export (ReviewError), since FER-2013's CSV alone cannot say contempt. Each file
        appears whole or not at all."""
        answers = list(self.labeled())
        contempt = sum(label >= NUM_CLASSES for label, _ in answers)
        if contempt and votes_path is None:
            raise ReviewError("invalid", f"{contempt} face(s) were answered contempt, which "
                                         "FER-2013's CSV cannot hold: export FER+ votes too "
                                         "(fer-review export --ferplus-votes FILE)")
        write_csv_atomically(out_path, [EXPORT_HEADER] + [
            (CONTEMPT_STAND_IN if label >= NUM_CLASSES else label,
             " ".join(map(str, pixels.reshape(-1))), EXPORT_USAGE)
            for label, pixels in answers])
        if votes_path is not None:
            write_csv_atomically(votes_path, vote_rows([label for label, _ in answers],
                                                       EXPORT_USAGE))
        return len(answers)


def _json_default(value: Any) -> Any:
    # Decisions come from dataclasses.asdict(EnsembleDecision): numpy scalars may slip in.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a review decision")


def record_if_flagged(queue: ReviewQueue, pixels: np.ndarray, source: str,
                      models: Mapping[str, ModelPrediction],
                      decision: Mapping[str, Any]) -> Optional[RecordResult]:
    """What every caller of the ensemble rule does with a decision: queue the face when the
    decision says a person must look at it (`needs_human_review`); otherwise nothing."""
    if not decision.get("needs_human_review"):
        return None
    return queue.record(pixels, source, models, decision)
