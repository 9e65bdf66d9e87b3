"""MkDocs hooks (mkdocs.yml `hooks:`): the generated reference pages, and a check of every
page written by hand against the code.

`on_files` adds tools/docs_reference.py's pages to the site, so they exist only in the
build (never in docs/, never edited). `on_page_markdown` warns, and `mkdocs build --strict`
(`make docs`, tests/test_docs.py) then fails, when a page shows a flag that none of our
commands takes (nor Beam, nor the few other programs the docs quote), or a config key
(`section.key`) that core/config.py does not declare: a flag or key that was removed or
renamed fails the build instead of living on in the docs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # mkdocs loads this file by path, not as tools.docs_hooks
    sys.path.insert(0, str(ROOT))

from fer_pipeline.core import quiet  # noqa: E402
from tools import docs_reference  # noqa: E402

log = logging.getLogger("mkdocs.hooks.fer_docs")
# The parsers import TensorFlow and Beam; their known notices are not the build's business.
quiet.install()

# Flags of programs other than ours that the pages quote, with whose they are. Beam's
# pipeline options are checked against Beam's own option classes instead.
FOREIGN_FLAGS = {
    # tensorflow_model_server (TF Serving's binary, as run by Docker or fer-serve)
    "--model_config_file", "--model_config_file_poll_wait_seconds", "--rest_api_port",
    "--file_system_poll_wait_seconds", "--enable_batching", "--batching_parameters_file",
    "--tensorflow_intra_op_parallelism", "--tensorflow_inter_op_parallelism",
    # Beam's Python SDK worker pool (apache_beam.runners.worker.worker_pool_main)
    "--service_port",
    # Beam's Java job servers, which tools/local_cluster.py starts
    "--job-host",
    # Java (the engines' daemons), pytest, uv and pip
    "--add-opens", "--durations", "--dist", "--dry-run", "--compile-bytecode",
    # farm-bench, the paired A/B runner some benchmark sections were measured with
    "--vs",
}
# Our scripts that are not console scripts: their flags are read from their source.
SCRIPTS = ("benchmarks/*.py", "tools/*.py", "tests/mariadb.py")
FLAG = re.compile(r"(?<![\w/.-])(--[a-z][a-z0-9_-]*[a-z0-9])")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def on_files(files, config):
    from mkdocs.structure.files import File

    with _no_import_notices():
        generated = docs_reference.pages()
    for path, text in generated.items():
        files.append(File.generated(config, path, content=text))
    return files


@contextlib.contextmanager
def _no_import_notices() -> Iterator[None]:
    """Deprecation notices that third-party packages raise while being imported (mkdocs
    turns them on; the commands themselves run with Python's default filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@functools.lru_cache(maxsize=1)
def our_flags() -> frozenset[str]:
    flags = set()
    for parser in docs_reference.parsers().values():
        for _, command, _ in docs_reference.walk_parsers(parser):
            for action in command._actions:
                flags.update(s for s in action.option_strings if s.startswith("--"))
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def script_flags() -> frozenset[str]:
    """The flags our benchmark and tool scripts declare (`add_argument("--x"`)."""
    flags = set()
    for pattern in SCRIPTS:
        for path in ROOT.glob(pattern):
            flags.update(re.findall(r'add_argument\(\s*(?:"-\w",\s*)?"(--[\w-]+)"',
                                    path.read_text()))
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def beam_flags() -> frozenset[str]:
    """Every option Beam's pipeline option classes declare, as `fer-pipeline` checks them
    (pipeline/cli_parser.py unknown_beam_options), with our job-server options."""
    with _no_import_notices():
        from apache_beam.options import pipeline_options as beam_options

        from fer_pipeline.core import beam_job  # noqa: F401 - declares our options

        parser = beam_options._BeamArgumentParser()
        for cls in {str(c): c for c in beam_options.PipelineOptions.__subclasses__()}.values():
            cls._add_argparse_args(parser)
    return frozenset(s for s in parser._option_string_actions if s.startswith("--"))


def unknown_flags(markdown: str) -> list[str]:
    """The `--flags` a page shows that no program it may quote takes."""
    unknown = []
    for flag in sorted(set(FLAG.findall(markdown))):
        if flag in our_flags() or flag in FOREIGN_FLAGS or flag in script_flags():
            continue
        if flag in beam_flags() or flag.replace("-", "_") in beam_flags():
            continue
        unknown.append(flag)
    return unknown


@functools.lru_cache(maxsize=1)
def _config() -> tuple[frozenset[str], frozenset[str]]:
    keys = [k.key for k in docs_reference.config_keys()]
    sections = {k.split(".")[0] for k in keys}
    prefixes = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)}
    return frozenset(sections), frozenset(prefixes)


def unknown_config_keys(markdown: str) -> list[str]:
    """`section.key` code spans that name no declared key (nor a part of one's path)."""
    sections, known = _config()
    unknown = []
    for span in CODE_SPAN.findall(markdown):
        head = span.split(".", 1)[0]
        if head not in sections or "." not in span or " " in span.split(":")[0]:
            continue
        if re.search(r"\.(json|sqlite|html|txt|pbtxt|ya?ml|py|md)$", span):
            continue
        key = re.sub(r"\[[^\]]*\]", "", span.split(":", 1)[0]).strip()
        if key not in known:
            unknown.append(span)
    return unknown


def on_page_markdown(markdown, page, config, files):
    if page.file.generated_by:   # ours, from the code itself
        return markdown
    for flag in unknown_flags(markdown):
        log.warning("%s shows %s, which no fer-* command takes (nor Beam, nor a program "
                    "listed in tools/docs_hooks.py FOREIGN_FLAGS)", page.file.src_uri, flag)
    for span in unknown_config_keys(markdown):
        log.warning("%s shows `%s`, which is not a key of core/config.py (see "
                    "reference/config.md)", page.file.src_uri, span)
    return markdown
