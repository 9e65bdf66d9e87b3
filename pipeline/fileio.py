"""File I/O for artifacts that may live on a local disk or an object store.

Every path here may be a local path or a URI (`gs://bucket/run`, `s3://bucket/run`): reads
and writes go through `tf.io.gfile`, which picks the filesystem by scheme. Object stores
have no directories and no rename, so nothing here renames a directory; publication is the
caller's business (see `pipeline.artifacts`: a step writes under a fresh prefix and commits
by writing its record last).

TensorFlow's S3 filesystem lives in tensorflow-io; it is registered on first use of an
`s3://` path, so local runs never import it.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Iterator

_SCHEMES = ("gs://", "s3://", "hdfs://", "memory://")


def is_uri(path: str) -> bool:
    return str(path).startswith(_SCHEMES)


def _gfile():
    import tensorflow as tf  # imported lazily: the CLI's --help must not pay for TF

    return tf.io.gfile


def register_filesystem(path: str) -> None:
    """Makes TensorFlow able to open `path` (registers s3:// from tensorflow-io once)."""
    if str(path).startswith("s3://"):
        import tensorflow_io  # noqa: F401  (registers the s3:// filesystem with TensorFlow)


def join(root: str, *parts: str) -> str:
    """Joins path parts with '/' for URIs and the OS separator for local paths."""
    root = str(root)
    if is_uri(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def absolute(path: str) -> str:
    return str(path) if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    register_filesystem(path)
    return _gfile().exists(str(path))


def isdir(path: str) -> bool:
    register_filesystem(path)
    return _gfile().isdir(str(path))


def makedirs(path: str) -> None:
    register_filesystem(path)
    _gfile().makedirs(str(path))


def listdir(path: str) -> list[str]:
    """Entry names (no trailing '/'), sorted."""
    register_filesystem(path)
    return sorted(name.rstrip("/") for name in _gfile().listdir(str(path)))


def glob(pattern: str) -> list[str]:
    register_filesystem(pattern)
    return sorted(_gfile().glob(str(pattern)))


def walk_files(root: str) -> Iterator[tuple[str, str]]:
    """(relative path with '/', full path) of every file under `root`, sorted."""
    register_filesystem(root)
    gfile = _gfile()
    found = []
    for directory, _, files in gfile.walk(str(root)):
        for name in files:
            full = join(directory, name)
            rel = full[len(str(root)):].lstrip("/").replace(os.sep, "/")
            found.append((rel, full))
    return iter(sorted(found))


def open_file(path: str, mode: str = "r"):
    register_filesystem(path)
    return _gfile().GFile(str(path), mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file. On object stores an object appears only once it is complete."""
    parent = posixpath.dirname(str(path)) if is_uri(path) else os.path.dirname(str(path))
    if parent and not is_uri(path):
        os.makedirs(parent, exist_ok=True)
    with open_file(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, data: Any) -> None:
    from pipeline.artifacts import to_jsonable

    write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")


def remove(path: str) -> None:
    register_filesystem(path)
    if _gfile().exists(str(path)):
        _gfile().remove(str(path))


def rmtree(path: str) -> None:
    register_filesystem(path)
    if _gfile().exists(str(path)):
        _gfile().rmtree(str(path))


def copy_file(source: str, target: str) -> None:
    register_filesystem(source)
    register_filesystem(target)
    if not is_uri(target):
        os.makedirs(os.path.dirname(str(target)) or ".", exist_ok=True)
    _gfile().copy(str(source), str(target), overwrite=True)


def copytree(source: str, target: str) -> list[str]:
    """Copies every file under `source` to the same relative path under `target`."""
    copied = []
    for rel, full in walk_files(source):
        copy_file(full, join(target, *rel.split("/")))
        copied.append(rel)
    return copied
