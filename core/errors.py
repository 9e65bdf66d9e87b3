"""How our command-line tools end when something goes wrong.

Two kinds of failure, told apart on purpose:

- A user's mistake (a mistyped path, a bad flag, a config value of the wrong type, a server
  that is not running): one line, or a short list, saying what is wrong and how to fix it,
  and a non-zero exit status. Never a Python traceback. These are `UserError`s, raised
  where the mistake is detected with a message written for the user, and OSErrors about
  the user's files and machine (missing, no permission, disk full), whoever raised them.
  `is_user_error` tells them apart by type alone.
- Our own bug (any other exception: an internal invariant, a ValueError raised inside a
  library, a plain ValueError of ours): one line saying it is a bug in fer-pipeline and
  where its traceback was written, so the user can report it; `FER_TRACEBACK=1` prints the
  traceback itself instead.

The UserError subclasses say where the mistake was found. Those that existing callers
catch as ValueError, FileNotFoundError, ConnectionError or OSError keep that class as a
second base, so `except ValueError` around a config check still works:

    UserError
    ├── ConfigError(ValueError)            a bad config file or value, flag or argument
    ├── InputDataError(ValueError)         bad data: a CSV, a row, a model's files
    ├── MissingInputError(FileNotFoundError)  an input (a path the user named, a previous
    │                                      step's output) is not there
    ├── ResourceError(OSError)             the machine is in the way: a port in use, an
    │                                      upload that did not complete
    ├── EngineError(RuntimeError)          a Beam engine or cluster the user runs: job
    │                                      server or worker pool unreachable, a lost
    │                                      TaskManager, out of resources
    └── ServerUnreachable(ConnectionError) a server (model server, MySQL) not running or
                                           refusing connections

A library exception the user can fix (a connection refused by the server the user named)
is translated into one of these where it is caught. Everything else stays a plain
exception: a bug. One bug has a class of its own, so a job can name it and a test catch it:
`RecordsLost(RuntimeError)`, a Beam job whose counts do not balance (a record read but
neither scored nor rejected). Neither the input nor the flags nor the engine's health can
cause that (an engine that loses a worker fails or retries the bundle; committed counters
count each bundle once), so it is ours or Beam's to fix, not the user's: a bug, reported as
one.

`run_cli` wraps a tool's main function to do this; every console script of this project
(`fer-pipeline`, `fer-serve`, `fer-client`, `fer-review`) goes through it, and ends its
process through `exit_process`.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, NoReturn, Optional

from fer_pipeline.core import fileio

# Set to 1 to print an unexpected error's traceback on stderr instead of to a file.
TRACEBACK_ENV = "FER_TRACEBACK"
EXIT_USAGE = 2          # argparse's status for a bad command line; ours for user mistakes
EXIT_BUG = 70           # EX_SOFTWARE (sysexits.h): an internal error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


__all__ = [
    "UserError", "ConfigError", "InputDataError", "MissingInputError", "ResourceError",
    "EngineError", "ServerUnreachable", "RecordsLost",
    "is_user_error", "report_bug", "run_cli", "exit_process",
    "TRACEBACK_ENV", "EXIT_USAGE", "EXIT_BUG", "EXIT_INTERRUPTED",
]


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A bad config file or value, command-line flag or argument."""


class InputDataError(UserError, ValueError):
    """Bad input data: a CSV or its rows, request logs, a model's files, a review queue."""


class MissingInputError(UserError, FileNotFoundError):
    """An input is not there: a path the user named, or the output of a step not yet run."""


class ResourceError(UserError, OSError):
    """The user's machine or storage is in the way: a port already in use, an upload that
    did not complete."""


class EngineError(UserError, RuntimeError):
    """A Beam engine or cluster the user runs failed the job for reasons of its own: its job
    server or worker pool is unreachable, a TaskManager was lost, it ran out of resources."""


class ServerUnreachable(UserError, ConnectionError):
    """A server the user named (a model server, a MySQL database) is not running or refuses
    connections."""


class RecordsLost(RuntimeError):
    """A bug, not a UserError: a Beam job's counts show a record that was read but never
    written (module docstring); the job's outputs are not committed."""


# OSErrors about the user's files or machine, whoever raised them: the message names the path.
_ENVIRONMENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError,
                       NotADirectoryError, FileExistsError)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (one line, no traceback) rather than our bug."""
    if isinstance(error, UserError):
        return True
    return isinstance(error, _ENVIRONMENT_ERRORS) or (
        isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS)


def report_bug(prog: str, error: BaseException) -> int:
    """Reports an unexpected exception (called from an `except` block) and returns EXIT_BUG."""
    text = traceback.format_exc()
    summary = f"{type(error).__name__}: {_first_line(str(error))}".rstrip(": ")
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.stderr.write(text)
        print(f"{prog}: internal error ({summary}). This is a bug in fer-pipeline; please "
              "report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG
    path = _write_traceback(prog, text)
    if path:
        what_to_do = (f"its traceback is in {path}: please report it with that file "
                      f"({TRACEBACK_ENV}=1 prints it here instead)")
    else:
        what_to_do = f"run it again with {TRACEBACK_ENV}=1 to see the traceback and report it"
    print(f"{prog}: internal error ({summary}). This is a bug in fer-pipeline, not in how "
          f"you ran it; {what_to_do}.", file=sys.stderr)
    return EXIT_BUG


def run_cli(prog: str, main: Callable[[Optional[list[str]]], int],
            argv: Optional[list[str]] = None) -> int:
    """Runs a tool's main: user errors become one line, bugs become `report_bug`'s line."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - this is the one place that catches all
        if is_user_error(error):
            print(f"{prog}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return report_bug(prog, error)


def exit_process(status: int) -> NoReturn:
    """Ends a console script's process with `status`, skipping the interpreter's teardown.

    Two reasons. After main returns, a process that loaded TensorFlow spends 1-2 s on a
    2-core CPU destroying modules and TensorFlow's C++ state, for nothing: `fer-pipeline
    monitor` took 8.95 s instead of 7.90 (medians of 6 pairs), and the demo runs five such
    processes in a row. And tensorflow-io 0.37.1 (the release for TF 2.16) aborts in a C++
    static destructor of its AWS logger once its S3 filesystem was used ("pure virtual
    method called", exit status 134; tensorflow/io#2039).

    What a normal exit does before that teardown still happens: the atexit handlers run
    (logging's flush, temporary directories, multiprocessing pools) and stdout and stderr
    are flushed. A non-daemon thread still running is waited for as Python would, by
    leaving through sys.exit, unless the S3 filesystem forbids it.
    """
    if _other_threads_running():
        if not fileio.native_s3_loaded():
            sys.exit(status)
        logging.shutdown()  # the atexit handlers could wait on those threads
    else:
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say there
            pass
    os._exit(status)


def _other_threads_running() -> bool:
    return any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
               if thread is not threading.main_thread())


def _write_traceback(prog: str, text: str) -> Optional[str]:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        handle, path = tempfile.mkstemp(prefix=f"{prog}-crash-{stamp}-", suffix=".txt")
        with os.fdopen(handle, "w") as out:
            out.write(f"{prog} {' '.join(sys.argv[1:])}\n\n{text}")
        return path
    except OSError:
        return None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
