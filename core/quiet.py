"""Silences known third-party noise at its source, and nothing else.

`make demo` and every CLI should print our own lines and Keras' progress. Each entry below
names one message we have seen, where it comes from and why dropping it loses nothing;
anything not listed (our warnings, real errors, a library's other messages) still shows.

- TensorFlow's C++ INFO and WARNING lines (oneDNN notice, CUDA probing, CPU features,
  TF-TRT): `TF_CPP_MIN_LOG_LEVEL=2`, as a default a user's own setting overrides. C++
  errors still show.
- The gRPC C core's INFO line for every connection whose TLS handshake fails ("Handshake
  failed with error SSL_ERROR_SSL: ... WRONG_VERSION_NUMBER" for a plaintext client of
  `fer-serve --ssl-config-file`, "... PEER_DID_NOT_RETURN_A_CERTIFICATE" for one without a
  client certificate under client_verify): one line per refused connection, on the server,
  from whoever knocks. The C core's log cannot be filtered per message, so
  `GRPC_VERBOSITY=ERROR` (a default a user's own setting overrides, as for TensorFlow):
  the C core's INFO and WARNING lines go, its ERROR lines (a certificate it cannot load, a
  port it cannot create) still show. The refused client is the one told why (fer-client
  says the server expects TLS or a client certificate); the server writes no line per
  refusal at its default log level, as its REST port logs a failed handshake only at
  `--log-level DEBUG`. `GRPC_VERBOSITY=INFO fer-serve ...` shows gRPC's lines again.
  gRPC reads the variable once, at `import grpc`, so install() must run before that
  (every entry point calls it first; none of our modules imported before it imports grpc).
- "Unable to register cuFFT/cuDNN/cuBLAS factory: Attempting to register factory for
  plugin ... when one has already been registered": printed at ERROR level by XLA while
  `import tensorflow` runs, on every machine, GPU or not (TensorFlow 2.16 registers the
  CUDA plugins twice). The only switch TensorFlow offers is TF_CPP_MIN_LOG_LEVEL=3, which
  would hide every C++ error too, so instead these exact lines are dropped from what the
  import writes to stderr; every other line of that output is passed through unchanged.
- "Unable to import IPython ... TFDV visualization APIs will not function": written by
  tensorflow_data_validation at import. We use no TFDV visualization (our pages are our
  own), so those two lines are dropped the same way.
- google.api_core's FutureWarning that Python 3.11 will stop being supported in new
  releases (a date in 2027): a warnings filter on that message, category and module.
- TFDV's `load_statistics` calls `tf_record_iterator`, whose deprecation TensorFlow logs
  on the "tensorflow" logger: a logging filter drops exactly that record.
- apache_beam.io.tfrecordio's "Couldn't find python-snappy" (a speed hint about CRC
  computation): a logging filter drops exactly that record.
- The multi-processing DirectRunner relays two warnings of each of its worker processes
  through apache_beam.runners.portability.local_job_service: "No semi_persistent_directory
  found: Functions defined in __main__ ... may fail" (we define none there: Beam pickles
  only module-level functions of ours) and "Discarding unparseable args:
  ['--direct_runner_use_stacked_bundle', '--pipeline_type_check']" (the DirectRunner's own
  flags, which the worker does not declare): a logging filter drops exactly those records.
  Beam workers install these filters themselves at start (core/beam_worker.py).
- ml-metadata's C++ log line when it cannot log in to a MySQL server ("MySQL database was
  not initialized ... starting from MySQL 8.0, mysql_native_password ... is not
  supported", plus glog's "Logging before InitGoogleLogging" line before it): it blames an
  authentication plugin whatever the cause, so pipeline/metadata.py drops exactly these
  lines (MLMD_CONNECT_NOISE) while it connects and says itself what went wrong.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator, Pattern, Sequence

# Lines written to stderr while these modules are first imported, dropped when they match.
IMPORT_NOISE: dict[str, tuple[Pattern[str], ...]] = {
    "tensorflow": (re.compile(
        r"Unable to register cu(FFT|DNN|BLAS) factory: Attempting to register factory for "
        r"plugin cu(FFT|DNN|BLAS) when one has already been registered"),),
    "tensorflow_data_validation": (
        re.compile(r"^Unable to import IPython: No module named 'IPython'\. ?$"),
        re.compile(r"^TFDV visualization APIs will not function\. To use visualization "
                   r"features, make sure IPython is installed")),
}
# (logger name, an exact phrase of the message) pairs dropped by a logging filter.
LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("tensorflow", "tf_record_iterator (from tensorflow.python.lib.io.tf_record) is "
                   "deprecated"),
    ("apache_beam.io.tfrecordio",
     "Couldn't find python-snappy so the implementation of _TFRecordUtil._masked_crc32c "
     "is not as fast as it could be."),
    ("apache_beam.runners.portability.local_job_service",
     "No semi_persistent_directory found: Functions defined in __main__"),
    ("apache_beam.runners.portability.local_job_service",
     "Discarding unparseable args: [\\'--direct_runner_use_stacked_bundle\\', "
     "\\'--pipeline_type_check\\']"),
)
# Written by ml-metadata's C++ code to stderr when a MySQL connection fails (see above).
MLMD_CONNECT_NOISE: tuple[Pattern[str], ...] = (
    re.compile(r"^WARNING: Logging before InitGoogleLogging\(\) is written to STDERR$"),
    re.compile(r"mysql_metadata_source\.cc:\d+\] MySQL database was not initialized"),
)

_installed = False


def install() -> None:
    """Applies every setting above once per process (idempotent, cheap, imports no TF)."""
    global _installed
    if _installed:
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The C core's per-connection TLS handshake failures are INFO lines (see above); read at
    # `import grpc`, and inherited by Beam workers and our other child processes.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    warnings.filterwarnings(
        "ignore", message=r"You are using a Python version \S+ which Google will stop "
                          r"supporting in new releases of",
        category=FutureWarning, module=r"google\.api_core\._python_version_support")
    # Beam's SDK worker processes import Google's client libraries before any module of
    # ours (core/beam_worker.py) runs; the environment they inherit carries this one filter
    # into them. -W syntax: the message is a literal prefix.
    _pass_to_child_processes("ignore:You are using a Python version:FutureWarning")
    for name, phrase in LOG_NOISE:
        logging.getLogger(name).addFilter(_DropMessage(phrase))
    unimported = {name: p for name, p in IMPORT_NOISE.items() if name not in sys.modules}
    if unimported:
        sys.meta_path.insert(0, _QuietImport(unimported))


def _pass_to_child_processes(warning_filter: str) -> None:
    current = os.environ.get("PYTHONWARNINGS", "")
    if warning_filter not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (current, warning_filter)))


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `phrase`; passes every other record."""

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


@contextlib.contextmanager
def filtered_stderr(patterns: Sequence[Pattern[str]]) -> Iterator[None]:
    """Captures file descriptor 2 (C++ and Python writes alike) for the block, then writes
    back every line that matches none of `patterns`, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield  # no usable stderr: nothing to filter
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(p.search(line) for p in patterns):
                    os.write(2, line.encode("utf-8"))


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first import of each watched module inside `filtered_stderr`."""

    def __init__(self, watched: dict[str, tuple[Pattern[str], ...]]) -> None:
        self.watched = dict(watched)

    def find_spec(self, fullname, path=None, target=None):
        patterns = self.watched.pop(fullname, None)
        if patterns is None:
            return None
        if not self.watched:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the normal finders, without us
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _FilteredLoader(spec.loader, patterns)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader, patterns: tuple[Pattern[str], ...]) -> None:
        self.loader = loader
        self.patterns = patterns

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module's own loader stays in module.__loader__ / __spec__ for tools that ask.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with filtered_stderr(self.patterns):
            self.loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
