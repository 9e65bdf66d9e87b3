"""ExampleGen on labelled image folders: the layouts, the class maps, faces cut from photos,
quarantined files, duplicates across splits, and images mixed with a CSV in one run."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components.example_gen import run_example_gen, shard_paths
from fer_pipeline.components.example_gen.images import BUILTIN_CLASS_MAP, _share_of
from fer_pipeline.core.config import IngestConfig
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_LABEL, FEATURE_PIXELS, FEATURE_ROW,
                                        FEATURE_SOURCE, FEATURE_USAGE, SPLITS)
from fer_pipeline.core.errors import InputDataError
from fer_pipeline.pipeline.synthetic import draw_faces, encode_pixel_strings
from fer_pipeline.serving.faces import faces_in_file


def _face(label: int, seed: int) -> np.ndarray:
    return draw_faces(np.array([label]), np.random.default_rng(seed))[0]


def _photo(path: Path, label: int, seed: int, colour: bool) -> None:
    """A synthetic face enlarged and padded into a 480x400 'photo' the cascade finds (as in
    tests/test_bulk_inferrer.py)."""
    face = _face(label, seed)
    big = cv2.resize(face, (240, 240), interpolation=cv2.INTER_CUBIC)
    photo = cv2.copyMakeBorder(big, 80, 80, 120, 120, cv2.BORDER_CONSTANT, value=int(face[0, 0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR) if colour else photo)


def _small(path: Path, face: np.ndarray, colour: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(face, cv2.COLOR_GRAY2BGR) if colour else face)


def read_examples(examples_dir: str) -> dict[str, dict]:
    """source -> the example's fields, over all splits."""
    found = {}
    for split in SPLITS:
        for path in shard_paths(examples_dir, split):
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                f = tf.train.Example.FromString(record).features.feature
                found[f[FEATURE_SOURCE].bytes_list.value[0].decode()] = {
                    "split": split, "label": f[FEATURE_LABEL].int64_list.value[0],
                    "pixels": np.frombuffer(f[FEATURE_PIXELS].bytes_list.value[0], np.uint8),
                    "usage": f[FEATURE_USAGE].bytes_list.value[0].decode(),
                    "row": f[FEATURE_ROW].int64_list.value[0]}
    return found


def read_rejected(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A CSV (with Usage), a Kaggle-layout tree (train/ and test/, no validation/) holding
    PNG and JPEG, colour and gray, 48x48 faces and nested photos, a text file, a blank image
    and a copy across splits, and a RAF-DB-layout tree (digit folders): one ingest."""
    root = tmp_path_factory.mktemp("images")
    labels = np.arange(14) % 7
    pixels = [p.decode() for p in encode_pixel_strings(draw_faces(labels, np.random.default_rng(5)))]
    usages = ["Training"] * 8 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    fer = root / "fer.csv"
    fer.write_text("emotion,pixels,Usage\n" + "".join(
        f"{labels[i]},{pixels[i]},{usages[i]}\n" for i in range(14)))

    kaggle = root / "kaggle"
    shared = _face(3, 100)
    files = {   # path -> (label, split or "train|validation", how its pixels are expected)
        "train/happy/a.png": (3, "train", shared),
        "train/angry/b.jpg": (0, "train", None),
        "train/Sad/nested/deeper/c.png": (4, "train", None),
        "train/surprise/d.jpg": (5, "train", None),
        "test/fear/e.png": (2, "test", _face(2, 103)),
    }
    _small(kaggle / "train/happy/a.png", shared)
    _small(kaggle / "train/angry/b.jpg", _face(0, 101), colour=True)
    _photo(kaggle / "train/Sad/nested/deeper/c.png", 4, 102, colour=True)
    _photo(kaggle / "train/surprise/d.jpg", 5, 1, colour=False)   # seed as in bulk inference
    _small(kaggle / "test/fear/e.png", _face(2, 103))
    _small(kaggle / "test/happy/copy.png", shared)                  # in train too
    (kaggle / "train/Sad/notes.png").parent.mkdir(parents=True, exist_ok=True)
    (kaggle / "train/Sad/notes.png").write_text("not an image")
    cv2.imwrite(str(kaggle / "train/angry/blank.jpg"), np.full((200, 160), 128, np.uint8))

    rafdb = root / "rafdb"
    _small(rafdb / "train/4/r1.png", _face(3, 105), colour=True)      # 4: happiness
    _photo(rafdb / "test/1/r2.jpg", 5, 106, colour=True)               # 1: surprise
    out = root / "examples"
    result = run_example_gen([str(fer), str(kaggle), str(rafdb)], str(out),
                             IngestConfig(max_rejected_fraction=1.0), [])
    return {"result": result, "out": str(out), "fer": fer, "kaggle": kaggle, "rafdb": rafdb,
            "files": files}


def test_images_become_examples_with_their_class_split_and_source(mixed):
    result, kaggle = mixed["result"], mixed["kaggle"]
    examples = read_examples(mixed["out"])
    assert result.split_mode == "usage"
    # 14 CSV rows + 8 Kaggle files + 2 RAF-DB files read; 3 rejected.
    assert result.rows_read == 24
    assert result.rows_read == sum(result.rows_written.values()) + result.rows_rejected
    share = 0.1 / 0.9   # no validation/: this share of train/ goes to validation
    for rel, (label, split, pixels) in mixed["files"].items():
        path = str(kaggle / rel)
        example = examples[path]
        assert example["label"] == label, rel
        if split == "train":
            split = "validation" if _share_of(42, "/" + rel) < share else "train"
        assert example["split"] == split, rel
        assert example["row"] >= 16                      # numbered after the CSV's lines
        if pixels is not None:
            assert np.array_equal(example["pixels"], pixels.reshape(-1)), rel
    # A photo's face is cut as `fer-pipeline infer` and `fer-client --image` cut it.
    photo = str(kaggle / "train/Sad/nested/deeper/c.png")
    assert np.array_equal(examples[photo]["pixels"],
                          faces_in_file(photo)[0].pixels.reshape(-1))
    # A colour 48x48 JPEG is its grayscale as OpenCV decodes it.
    jpeg = str(kaggle / "train/angry/b.jpg")
    assert np.array_equal(examples[jpeg]["pixels"],
                          cv2.imread(jpeg, cv2.IMREAD_GRAYSCALE).reshape(-1))
    rafdb = mixed["rafdb"]
    assert examples[str(rafdb / "train/4/r1.png")]["label"] == CLASS_NAMES.index("happy")
    assert examples[str(rafdb / "test/1/r2.jpg")]["label"] == CLASS_NAMES.index("surprise")
    assert examples[str(rafdb / "test/1/r2.jpg")]["split"] == "test"
    # CSV rows keep `path:line`; row numbers stay unique across both kinds.
    assert examples[f"{mixed['fer']}:2"]["row"] == 2
    assert len({e["row"] for e in examples.values()}) == len(examples) == 21


def test_bad_files_and_copies_across_splits_are_quarantined_with_reasons(mixed):
    result, kaggle = mixed["result"], mixed["kaggle"]
    rejected = read_rejected(result.rejected_path)
    by_source = {r["source"]: r for r in rejected}
    assert {s: r["reason"].split(":")[0] for s, r in by_source.items()} == {
        str(kaggle / "train/Sad/notes.png"): "unreadable_image",
        str(kaggle / "train/angry/blank.jpg"): "no_face_found",
        str(kaggle / "test/happy/copy.png"): "duplicate_of_train_row"}
    assert all(r["line_number"] == "" and r["raw_line"] == "" for r in rejected)
    # The copy names the file it duplicates.
    assert str(kaggle / "train/happy/a.png") in by_source[str(kaggle / "test/happy/copy.png")][
        "reason"]
    assert result.rejected_by_reason == {"duplicate_of_train_row": 1, "no_face_found": 1,
                                         "unreadable_image": 1}
    assert result.cross_split_duplicates == 1


def test_the_statistics_page_lists_rejected_images_by_file(mixed):
    from fer_pipeline.components.statistics.page_data import rejected_summary
    summary = rejected_summary(read_rejected(mixed["result"].rejected_path))
    assert summary["total"] == 3
    assert {r["line_number"] for r in summary["shown"]} == {
        str(mixed["kaggle"] / p) for p in ("train/Sad/notes.png", "train/angry/blank.jpg",
                                           "test/happy/copy.png")}


def test_class_folders_without_splits_and_the_class_map(tmp_path):
    """DIR/<class>/...: the random split; a folder no map knows stops the run naming it,
    until ingest.class_map maps it."""
    tree = tmp_path / "affect"
    for i in range(3):
        _small(tree / "Happiness" / f"h{i}.png", _face(3, 200 + i))
        _small(tree / "contempt" / f"c{i}.png", _face(1, 300 + i))
    with pytest.raises(InputDataError, match="class folder 'contempt' is not mapped"):
        run_example_gen(str(tree), str(tmp_path / "x"), IngestConfig(), [])
    result = run_example_gen(str(tree), str(tmp_path / "out"),
                             IngestConfig(class_map={"Contempt": "disgust"}), [])
    assert result.split_mode == "random"
    assert result.rows_read == 6 and sum(result.rows_written.values()) == 6
    examples = read_examples(str(tmp_path / "out"))
    assert {e["label"] for s, e in examples.items() if "/contempt/" in s} == {1}
    assert {e["label"] for s, e in examples.items() if "/Happiness/" in s} == {3}
    assert {e["usage"] for e in examples.values()} == {""}


def test_builtin_maps_cover_fer2013_and_rafdb_names():
    assert all(BUILTIN_CLASS_MAP[name] == name for name in CLASS_NAMES)
    rafdb = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]
    assert [BUILTIN_CLASS_MAP[str(i)] for i in range(1, 8)] == rafdb


def test_a_folder_beside_the_splits_stops_the_run(tmp_path):
    _small(tmp_path / "tree/train/happy/a.png", _face(3, 1))
    _small(tmp_path / "tree/extra/happy/b.png", _face(3, 2))
    with pytest.raises(InputDataError, match="folder 'extra' is not a split"):
        run_example_gen(str(tmp_path / "tree"), str(tmp_path / "x"), IngestConfig(), [])


def test_fer_pipeline_ingest_takes_a_folder_and_names_an_unmapped_one_in_one_line(tmp_path,
                                                                                 capsys):
    from fer_pipeline.pipeline.cli import main as fer_pipeline
    tree = tmp_path / "faces"
    for i in range(4):
        _small(tree / "train" / "happy" / f"h{i}.png", _face(3, 400 + i))
        _small(tree / "test" / "neutral" / f"n{i}.png", _face(6, 500 + i))
    assert fer_pipeline(["ingest", "--data", str(tree), "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    _small(tree / "test" / "Smiling" / "s.png", _face(3, 600))
    assert fer_pipeline(["ingest", "--data", str(tree), "--output", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "'test/Smiling' is not mapped" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_multi_process_runner_writes_the_same_examples_and_rejects(mixed, tmp_path):
    """The images are matched, read and decoded in Beam's workers: two worker processes
    write exactly what the in-process run wrote."""
    out = tmp_path / "examples"
    result = run_example_gen(
        [str(mixed["fer"]), str(mixed["kaggle"]), str(mixed["rafdb"])], str(out),
        IngestConfig(max_rejected_fraction=1.0),
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert result.rows_written == mixed["result"].rows_written
    for split in SPLITS:
        assert _serialized(str(out), split) == _serialized(mixed["out"], split), split
    assert (Path(result.rejected_path).read_text()
            == Path(mixed["result"].rejected_path).read_text())


def _serialized(examples_dir: str, split: str) -> list[bytes]:
    return sorted(record for path in shard_paths(examples_dir, split)
                  for record in tf.data.TFRecordDataset(path).as_numpy_iterator())
