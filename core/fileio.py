"""File I/O for artifacts that may live on a local disk or an object store.

Every path here may be a local path or a URI (`gs://bucket/run`, `s3://bucket/run`): reads
and writes go through `tf.io.gfile`, which picks the filesystem by scheme. Object stores
have no directories and no rename, so nothing here renames a directory; publication is the
caller's business (see `fer_pipeline.core.artifacts`: a step writes under a fresh prefix and commits
by writing its record last).

TensorFlow's S3 filesystem lives in tensorflow-io; it is registered on first use of an
`s3://` path, so local runs never import it. One read bypasses it: `iter_chunks` streams an
s3:// object through boto3 in one GET, where tensorflow-io would issue one per 512 KiB.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

_SCHEMES = ("gs://", "s3://", "hdfs://", "memory://")


def is_uri(path: str) -> bool:
    return str(path).startswith(_SCHEMES)


def _gfile():
    import tensorflow as tf  # imported lazily: the CLI's --help must not pay for TF

    return tf.io.gfile


_native_s3_loaded = False


def register_filesystem(path: str) -> None:
    """Makes TensorFlow able to open `path` (registers s3:// from tensorflow-io once)."""
    global _native_s3_loaded
    if str(path).startswith("s3://"):
        import tensorflow_io  # noqa: F401  (registers the s3:// filesystem with TensorFlow)
        _native_s3_loaded = True


def native_s3_loaded() -> bool:
    """Whether this process loaded tensorflow-io's S3 filesystem (see
    fer_pipeline.core.errors.exit_process)."""
    return _native_s3_loaded


def join(root: str, *parts: str) -> str:
    """Joins path parts with '/' for URIs and the OS separator for local paths."""
    root = str(root)
    if is_uri(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def dirname(path: str) -> str:
    """The parent of `path` ('s3://b/run/x.json' -> 's3://b/run')."""
    path = str(path).rstrip("/")
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


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


READ_CHUNK_BYTES = 8 << 20


def iter_chunks(path: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """A file's bytes in pieces of at most `chunk_bytes`, so a multi-GB object never sits
    in memory whole.

    s3:// objects come from one streamed GET (boto3, configured from the settings
    TensorFlow's S3 filesystem reads). Not through `tf.io.gfile`: its reader asks for 512 KiB
    at a time and tensorflow-io turns each ask into a HEAD and a ranged GET, so a 64 MiB
    object cost 128 of each (measured against the tests' S3 server). Other URIs are read
    through `tf.io.gfile` in `chunk_bytes` pieces (their filesystem decides the requests).
    """
    path = str(path)
    if path.startswith("s3://"):
        yield from _s3_chunks(path, chunk_bytes)
        return
    with (open_file(path, "rb") if is_uri(path) else open(path, "rb")) as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            yield chunk


_s3_clients: dict[tuple, Any] = {}


def _s3_client() -> Any:
    """One boto3 S3 client per set of TensorFlow's S3 settings (S3_ENDPOINT, S3_USE_HTTPS,
    S3_VERIFY_SSL, AWS_REGION; boto3 reads the AWS_* credentials itself), built once: a
    client loads botocore's service model, which is slow."""
    endpoint = os.environ.get("S3_ENDPOINT") or None
    https = os.environ.get("S3_USE_HTTPS", "1") != "0"
    if endpoint and "://" not in endpoint:
        endpoint = ("https://" if https else "http://") + endpoint
    verify = os.environ.get("S3_VERIFY_SSL", "1") != "0"
    region = os.environ.get("AWS_REGION") or os.environ.get("S3_REGION") or None
    key = (endpoint, verify, region)
    if key not in _s3_clients:
        import boto3  # in the venv through apache-beam[aws]; imported only for s3://
        from botocore.config import Config

        # Path-style addressing for a custom endpoint, as S3-compatible servers expect.
        config = Config(s3={"addressing_style": "path"}) if endpoint else None
        _s3_clients[key] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, verify=verify, region_name=region, config=config)
    return _s3_clients[key]


def _s3_chunks(path: str, chunk_bytes: int) -> Iterator[bytes]:
    bucket, _, key = path[len("s3://"):].partition("/")
    client = _s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(f"{path}: no such object") from None
    try:
        yield from body.iter_chunks(chunk_bytes)
    finally:
        body.close()


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file so that a reader sees the old content or the new, never half.

    On object stores an object appears only once its upload is complete. Locally the bytes
    go to a hidden temp file in the same directory that is then renamed over the target
    (a file rename, which every POSIX filesystem does atomically).
    """
    path = str(path)
    if is_uri(path):
        register_filesystem(path)
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                    dir=parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it owner-only; the target is a normal file
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Dataclasses, mappings, sequences, paths and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, data: Any) -> None:
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
    """Copies one file, overwriting `target`; either side may be local or a URI."""
    source, target = str(source), str(target)
    if not is_uri(target):
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if not is_uri(source):
            shutil.copyfile(source, target)  # no TensorFlow needed for a local copy
            return
    register_filesystem(source)
    register_filesystem(target)
    _gfile().copy(source, target, overwrite=True)


def copytree(source: str, target: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copies every file under `source` to the same relative path under `target`.

    Works in every direction (local -> URI uploads, URI -> local downloads). Files whose
    relative path is in `last` are copied after all others, in that order: a reader that
    trusts such a file (a checkpoint's metadata) then finds what it describes already there.
    Returns the relative paths copied, in copy order.
    """
    files = list(walk_files(source))
    ordered = ([f for f in files if f[0] not in last]
               + sorted((f for f in files if f[0] in last), key=lambda f: last.index(f[0])))
    for rel, full in ordered:
        copy_file(full, join(target, *rel.split("/")))
    return [rel for rel, _ in ordered]


@contextlib.contextmanager
def local_directory(target: str, prefix: str) -> Iterator[str]:
    """`target` itself when it is a local path (created if missing), else a scratch
    directory, removed on exit. For libraries that write many small files and rewrite some
    (Keras, KerasTuner): on an object store they write to the scratch directory and the
    caller uploads what is finished."""
    if not is_uri(target):
        os.makedirs(target, exist_ok=True)
        yield target
        return
    scratch = tempfile.mkdtemp(prefix=prefix)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def configure_beam_filesystems(beam_args: list[str]) -> None:
    """Lets `FileSystems.open/match/delete` outside a pipeline see Beam's flags.

    Inside a pipeline Beam hands every filesystem the pipeline's options; a direct call in
    the driver uses process-wide options, which stay empty until set, so e.g.
    `--s3_endpoint_url` would be ignored there without this.
    """
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions(list(beam_args)))
