"""Labelled image folders as ingest input: the layouts, the class maps, and the Beam steps
that read, decode and crop the images.

Two layouts are accepted (see docs/how-to/your-data.md):

    DIR/<class>/**/<image>                      no split: the random split applies
    DIR/<split>/<class>/**/<image>              split = train | validation | test

A class folder's name is looked up, case-insensitively, in `ingest.class_map` over the
built-in names (FER-2013's Kaggle image edition and RAF-DB's). The driver only lists the
top one or two folder levels to check every name is mapped; the files themselves are
matched and read inside the Beam job (`fileio.MatchAll` / `ReadMatches`), so image trees
run on the cluster engines like the CSV path. Every function Beam pickles is module-level.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam.io import fileio as beam_fileio

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE
from fer_pipeline.core.errors import InputDataError
from fer_pipeline.core.fer_csv import REJECTED_TAG

__all__ = ["BUILTIN_CLASS_MAP", "ImageTree", "DecodeImages", "image_records", "is_image_tree",
           "image_rejection", "resolve_class_map", "scan_image_tree"]

# Folder name (lower case) -> our class. FER-2013's Kaggle image edition names its folders
# after our classes; RAF-DB's basic set (as commonly distributed in folders) numbers them
# 1-7 in its own order: 1 surprise, 2 fear, 3 disgust, 4 happiness, 5 sadness, 6 anger,
# 7 neutral. The spelled-out variants are what other folder datasets use.
BUILTIN_CLASS_MAP: dict[str, str] = {
    **{name: name for name in CLASS_NAMES},
    "1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry",
    "7": "neutral",
    "anger": "angry", "disgusted": "disgust", "fearful": "fear", "happiness": "happy",
    "sadness": "sad", "surprised": "surprise",
}
# Split folder -> (split, FER-2013 Usage value, so the "usage" split mode reads it as usual).
SPLIT_FOLDERS: dict[str, tuple[str, str]] = {
    "train": ("train", "Training"), "validation": ("validation", "PublicTest"),
    "val": ("validation", "PublicTest"), "test": ("test", "PrivateTest")}


@dataclass(frozen=True)
class ImageTree:
    """One --data directory: its root, and each class folder's (usage, label) by its path
    relative to the root ("happy" or "train/happy")."""
    root: str
    folders: tuple[tuple[str, str, int], ...]     # (relative folder, usage, label)
    has_splits: bool
    # Share of train/ moved to validation when the tree has no validation/ folder.
    validation_share: float = 0.0


def is_image_tree(path: str) -> bool:
    return fileio.isdir(path)


def resolve_class_map(overrides: Mapping[str, str]) -> dict[str, int]:
    """Folder name (lower case) -> label: the built-in names, then `ingest.class_map`."""
    merged = {**BUILTIN_CLASS_MAP, **{str(k).strip().lower(): v for k, v in overrides.items()}}
    return {folder: CLASS_NAMES.index(name) for folder, name in merged.items()}


def _subfolders(path: str) -> list[str]:
    return [name for name in fileio.listdir(path) if fileio.isdir(fileio.join(path, name))]


def scan_image_tree(root: str, class_map: Mapping[str, int],
                    split_fractions: Sequence[float]) -> ImageTree:
    """The tree's layout and class folders; InputDataError naming the first folder that is
    neither a split nor a mapped class."""
    top = _subfolders(root)
    if not top:
        raise InputDataError(f"--data {root}: no class folders in it (expected "
                             f"{root}/<class>/... or {root}/train/<class>/...)")
    has_splits = any(name.lower() in SPLIT_FOLDERS for name in top)
    folders = []
    for name in top:
        if has_splits:
            if name.lower() not in SPLIT_FOLDERS:
                raise InputDataError(f"--data {root}: folder {name!r} is not a split "
                                     f"(train, validation, test) beside the others")
            usage = SPLIT_FOLDERS[name.lower()][1]
            for folder in _subfolders(fileio.join(root, name)):
                folders.append((f"{name}/{folder}", usage, _label(root, f"{name}/{folder}",
                                                                  class_map)))
        else:
            folders.append((name, "", _label(root, name, class_map)))
    splits = {SPLIT_FOLDERS[name.lower()][0] for name in top if name.lower() in SPLIT_FOLDERS}
    share = 0.0
    if has_splits and "train" in splits and "validation" not in splits:
        share = split_fractions[1] / (split_fractions[0] + split_fractions[1])
    return ImageTree(root, tuple(folders), has_splits, share)


def _label(root: str, folder: str, class_map: Mapping[str, int]) -> int:
    name = folder.rsplit("/", 1)[-1]
    if name.strip().lower() not in class_map:
        raise InputDataError(
            f"--data {root}: class folder {folder!r} is not mapped to a class; add it to "
            f"ingest.class_map (e.g. {name}: happy); classes: {', '.join(CLASS_NAMES)}")
    return class_map[name.strip().lower()]


def image_rejection(path: str, reason: str) -> dict[str, Any]:
    """A rejected image, in the rejected-rows format: no line number, the file as source."""
    return {"line_number": None, "reason": reason, "raw_line": "", "source": path}


def _number_files(files: list[Any], first_row: int) -> Iterator[tuple[int, Any]]:
    """Row numbers for images, after the CSV lines, in path order: the same numbering
    whatever order the runner matched the files in."""
    for offset, readable in enumerate(sorted(files, key=lambda f: f.metadata.path)):
        yield first_row + offset, readable


def _folder_patterns(trees: Sequence[ImageTree]) -> list[str]:
    return [fileio.join(tree.root, folder, "**") for tree in trees for folder, _, _ in
            tree.folders]


def image_records(pipeline: beam.Pipeline, trees: Sequence[ImageTree], first_row: int,
                  seed: int) -> Any:
    """Records (row, label, pixels, usage, path) and tagged rejections of every image."""
    return (pipeline
            | "ImageFolders" >> beam.Create(_folder_patterns(trees))
            | "MatchImages" >> beam_fileio.MatchAll()
            | "OpenImages" >> beam_fileio.ReadMatches()
            # One list of file handles (paths, not bytes) so numbering is deterministic.
            | "ListImages" >> beam.combiners.ToList()
            | "NumberImages" >> beam.FlatMap(_number_files, first_row)
            | "SpreadImages" >> beam.Reshuffle()
            | "DecodeImages" >> beam.ParDo(DecodeImages(trees, seed)).with_outputs(
                REJECTED_TAG, main="rows"))


class DecodeImages(beam.DoFn):
    """(row, file) -> (row, label, 2304 pixel bytes, usage, path), or a rejection."""

    def __init__(self, trees: Sequence[ImageTree], seed: int):
        self._trees = list(trees)
        self._seed = seed

    def setup(self) -> None:
        # Imported in the worker: the driver never needs OpenCV for the CSV path.
        from fer_pipeline.serving import faces
        self._faces = faces

    def _folder(self, path: str) -> tuple[ImageTree, str, int]:
        for tree in self._trees:
            for folder, usage, label in tree.folders:
                if path.startswith(fileio.join(tree.root, folder) + "/"):
                    return tree, usage, label
        raise RuntimeError(f"{path} matched no class folder")   # the patterns are ours

    def process(self, element: tuple[int, Any]) -> Iterator[Any]:
        row, readable = element
        path = readable.metadata.path
        tree, usage, label = self._folder(path)
        try:
            gray = self._faces.decode_grayscale(readable.read(), path)
        except InputDataError:
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, image_rejection(
                path, "unreadable_image: not an image file OpenCV can read"))
            return
        found = self._faces.faces_in_image(gray)
        if not found:
            yield beam.pvalue.TaggedOutput(REJECTED_TAG, image_rejection(
                path, f"no_face_found: no face in the {gray.shape[1]}x{gray.shape[0]} image"))
            return
        pixels = found[0].pixels   # the largest face
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE)
        if usage == "Training" and tree.validation_share and _share_of(
                self._seed, path[len(tree.root):]) < tree.validation_share:
            usage = "PublicTest"
        yield row, label, pixels.tobytes(), usage, path


def _share_of(seed: int, relative: str) -> float:
    """A seeded number in [0, 1) from the image's path in its tree (stable across runs)."""
    return int(hashlib.sha256(f"{seed}:{relative}".encode()).hexdigest()[:15], 16) / 16 ** 15
