"""The documentation's reference pages, generated from the code at every build.

Nothing here is written twice: the commands and flags come from the console scripts'
argparse parsers, the configuration keys from core/config.py's dataclass declarations
(`setting(default, check=..., help=...)`) and its smoke profile, the steps from
pipeline/dag.py's `build_steps()`, and the signatures from core/contract.py's
`SERVED_SIGNATURES`. tools/docs_hooks.py adds these pages to the site (mkdocs.yml `hooks:`);
`python -m tools.docs_reference DIR` writes them as files, to read them without a build.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["TOOLS", "cli_page", "config_keys", "config_page", "dag_page", "pages",
           "parsers", "signatures_page", "walk_parsers"]

# Page path inside the site -> the function that writes it.
REFERENCE_DIR = "reference"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _parser_of(parse_args: Callable[[list[str]], Any]) -> argparse.ArgumentParser:
    """The parser a `parse_args(argv)` function builds: fer-serve, fer-client and fer-review
    build theirs and parse in one function, so the parser is taken at the moment it would
    parse (nothing is parsed, nothing runs)."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        parse_args(["--help"])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{parse_args.__module__}.parse_args did not build a parser")


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each console script (pyproject.toml [project.scripts]) -> its argparse parser."""
    from fer_pipeline.pipeline import cli_parser
    from fer_pipeline.serving import client_cli, review_app, server

    return {"fer-pipeline": cli_parser.build_parser(),
            "fer-serve": _parser_of(server.parse_args),
            "fer-client": _parser_of(client_cli.parse_args),
            "fer-review": _parser_of(review_app.parse_args)}


TOOLS = ("fer-pipeline", "fer-serve", "fer-client", "fer-review")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser,
                                                                 str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def walk_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(command path, parser, its one-line help) for the parser and every subcommand."""
    yield path, parser, ""
    for name, sub, help_text in _subcommands(parser):
        for inner_path, inner, inner_help in walk_parsers(sub, path + (name,)):
            yield inner_path, inner, inner_help or help_text


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions `--help` lists, positionals included, subcommand choosers left out."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]


# --------------------------------------------------------------------------- markdown

def _text(value: str) -> str:
    """Plain text made safe for a markdown table cell: no HTML, no table breaks, no
    emphasis from `*` (help texts say `<output>/...` and `examples-*.tfrecord`)."""
    return (html.escape(" ".join(value.split()), quote=False)
            .replace("|", "\\|").replace("*", "\\*"))


def _code(value: str) -> str:
    ticks = "``" if "`" in value else "`"
    pad = " " if ticks == "``" else ""
    return f"{ticks}{pad}{value.replace('|', '&#124;')}{pad}{ticks}"


def _anchor(path: tuple[str, ...], tool: str) -> str:
    return "-".join((tool, *path)).replace("_", "-")


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return parser._get_formatter()._expand_help(action)


def _flag_cell(action: argparse.Action) -> str:
    names = action.option_strings or [action.dest]
    if action.nargs == 0:
        return ", ".join(_code(n) for n in names)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else "")
    if action.choices is not None and not action.metavar:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(_code(f"{n} {metavar}".strip() if action.option_strings else n)
                     for n in names)


def _default_cell(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, [], ""):
        return ""
    return _code(str(action.default))


def cli_page() -> str:
    """Every console script, its commands and each command's flags, from the parsers."""
    lines = ["# Command-line reference", "",
             "Generated at build time from the console scripts' own argparse parsers "
             "(`tools/docs_reference.py`): a flag added to the code appears here, and the "
             "build fails on a page that shows a flag no command takes. The same text, "
             "shorter, is what `--help` prints.", ""]
    for tool, parser in parsers().items():
        lines += [f"## {tool}", "", _text(parser.description or "").split("\n")[0], ""]
        subs = _subcommands(parser)
        if subs:
            lines += ["| command | what it does |", "|---|---|"]
            lines += [f"| [{_code(f'{tool} {name}')}](#{_anchor((name,), tool)}) | "
                      f"{_text(help_text)} |" for name, _, help_text in subs]
            lines.append("")
        for path, command, help_text in walk_parsers(parser):
            if path:
                lines += [f"### {tool} {' '.join(path)} {{ #{_anchor(path, tool)} }}", ""]
                description = command.description or help_text
                if description:
                    lines += [_text(description), ""]
            lines += ["```text", command.format_usage().strip(), "```", ""]
            options = _options(command)
            if options:
                lines += ["| flag | default | what it does |", "|---|---|---|"]
                lines += [f"| {_flag_cell(a)} | {_default_cell(a)} | "
                          f"{_text(_help(command, a))} |" for a in options]
                lines.append("")
            if command.epilog:
                lines += [_text(command.epilog), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- config

def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or unset"
    if origin is tuple:
        return f"list of {len(args)} {_type_name(args[0])}s"
    if origin is dict:
        return f"mapping of model name to {_type_name(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str            # dotted, e.g. "monitor.min_requests"
    type: str
    default: Any
    smoke: Any          # the smoke profile's value, or _SAME
    rule: str           # the check in words ("0 to 1", "one of ..."), "" when unchecked
    help: str


_SAME = object()


def _lookup(overrides: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(overrides, dict) or part not in overrides:
            return _SAME
        overrides = overrides[part]
    return overrides


def _keys_of(obj: Any, prefix: str, smoke: dict) -> Iterator[ConfigKey]:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys_of(value, f"{key}.", smoke)
            continue
        if isinstance(value, dict) and value and all(
                dataclasses.is_dataclass(v) for v in value.values()):
            for name, section in value.items():   # train.models.<model>
                yield from _keys_of(section, f"{key}.{name}.", smoke)
            continue
        check = f.metadata.get("check")
        rule = getattr(check, "rule", "") if check else ""
        if f.metadata.get("at_most"):
            rule = f"{rule}; at most {prefix}{f.metadata['at_most']}".lstrip("; ")
        overridden = _lookup(smoke, key.split("."))
        if isinstance(value, dict) and isinstance(overridden, dict):
            overridden = {**value, **overridden}
        yield ConfigKey(key, _type_name(hints[f.name]), value, overridden, rule,
                        f.metadata.get("help", ""))


def config_keys() -> list[ConfigKey]:
    """Every key a config file may set, in declaration order, with its smoke override."""
    from fer_pipeline.core.config import PROFILES, PipelineConfig

    return list(_keys_of(PipelineConfig(), "", PROFILES["smoke"]()))


def _doc(cls: type) -> str:
    """A config class's own docstring (a dataclass without one gets its signature)."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def config_page() -> str:
    from fer_pipeline.core.config import PipelineConfig

    config = PipelineConfig()
    lines = ["# Configuration reference", "",
             "Generated at build time from the declarations in `core/config.py` "
             "(each field's `setting(default, check=..., help=...)`) and the smoke profile "
             "(`--profile smoke`, what `make demo` and the tests run). A `--config` file "
             "(YAML or JSON) sets any of these keys, nested by section:", "",
             "```yaml", "monitor: {min_requests: 1000}",
             "train:", "  models:", "    cnn: {epochs: 60}", "```", "",
             "The whole file is checked before any step runs: an unknown key, a value of the "
             "wrong type or one outside its range is reported with its dotted key, all "
             "problems in one message.", ""]
    keys = config_keys()
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if not any(k.key.startswith(f.name + ".") for k in keys):
            continue   # a top-level key: listed at the end
        lines += [f"## {f.name} {{ #{f.name.replace('_', '-')} }}", ""]
        doc = (_doc(type(section)) if dataclasses.is_dataclass(section)
               else f.metadata.get("help", ""))
        if doc:
            lines += [_text(doc), ""]
        lines += ["| key | type | default | smoke profile | allowed | what it sets |",
                  "|---|---|---|---|---|---|"]
        for k in keys:
            if not k.key.startswith(f.name + "."):
                continue
            smoke = "" if k.smoke is _SAME or k.smoke == k.default else _code(_value(k.smoke))
            lines.append(f"| {_code(k.key)} | {_text(k.type)} | {_code(_value(k.default))} | "
                         f"{smoke} | {_text(k.rule)} | {_text(k.help)} |")
        lines.append("")
    top = [k for k in keys if "." not in k.key]
    if top:
        lines += ["## Top level", "", "| key | type | default | allowed | what it sets |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_code(k.key)} | {_text(k.type)} | {_code(_value(k.default))} | "
                  f"{_text(k.rule)} | {_text(k.help)} |" for k in top]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the DAG

def _sections_of(step: Any, config: Any) -> list[str]:
    """The config sections whose values a step's parameters (its cache key) include."""
    from fer_pipeline.pipeline.dag import StepEnv

    value = step.parameters(config, StepEnv(config))
    values = list(value.values()) if isinstance(value, dict) else [value]
    found = [f.name for f in dataclasses.fields(config)
             if any(v is getattr(config, f.name) for v in values)]
    for name, model_config in config.train.models.items():
        if any(v is model_config for v in values):
            found += ["train", f"train.models.{name}"]
    return found


def dag_page() -> str:
    from fer_pipeline.core.config import PipelineConfig
    from fer_pipeline.pipeline.dag import build_steps, mermaid

    steps = build_steps()
    config = PipelineConfig()
    lines = ["# Steps reference", "",
             "Generated at build time from the pipeline's one declaration, "
             "`pipeline/dag.py` `build_steps()`, which the local runner, the CLI and the "
             "Kubeflow compiler also read. Inputs name another step's output "
             "(`step.output`) or the pipeline's own inputs (`pipeline.data`, the CSVs; "
             "`pipeline.schema`, the checked-in schema). Outputs are paths inside the step's "
             "execution directory (empty: the directory itself).", "",
             "| step | run root directory | inputs | outputs | config | Beam | what it does |",
             "|---|---|---|---|---|---|---|"]
    for step in steps:
        inputs = "<br>".join(f"{_code(name)} ← {_code(ref)}" for name, ref in step.inputs.items())
        outputs = "<br>".join(_code(f"{name}: {path or '.'}")
                              for name, path in step.outputs.items())
        sections = ", ".join(_code(s) for s in _sections_of(step, config))
        lines.append(f"| {_code(step.name)} | {_code(step.directory + '/')} | {inputs} | "
                     f"{outputs} | {sections} | {'yes' if step.beam else ''} | "
                     f"{_text(step.description)} |")
    lines += ["", "A step's cache key covers its inputs' fingerprints, its config values and "
              "the source of the modules it runs:", "",
              "| step | code it runs |", "|---|---|"]
    lines += [f"| {_code(step.name)} | " + ", ".join(_code(m) for m in step.code) + " |"
              for step in steps]
    lines += ["", "## The graph", "",
              "`fer-pipeline dag --mermaid` prints this Mermaid source (GitHub draws it; "
              "the README shows it):", "", "```mermaid", mermaid(steps).rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- signatures

def signatures_page() -> str:
    from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS,
                                            CLASS_NAMES_FERPLUS_ES, SERVED_SIGNATURES)

    lines = ["# Served signatures reference", "",
             "Generated at build time from `core/contract.py` (`SERVED_SIGNATURES`), the "
             "declaration the trainer's export builds and `tests/test_export.py` "
             "checks a real export against. Every pushed SavedModel has these signatures; "
             "TF Serving and `fer-serve` serve all of them over gRPC (`signature_name`) and "
             "REST (`\"signature_name\"` in the body).", "",
             "| signature | inputs | outputs | what it is for |", "|---|---|---|---|"]
    for name, (purpose, inputs, outputs) in SERVED_SIGNATURES.items():
        cells = ["<br>".join(_code(f"{t} {d} {s}") for t, d, s in tensors)
                 for tensors in (inputs, outputs)]
        lines.append(f"| {_code(name)} | {cells[0]} | {cells[1]} | {_text(purpose)} |")
    lines += ["", "`probabilities` are calibrated: softmax(`logits` / T), with the model's "
              "temperature T fitted on the validation split at export; `logits` are the "
              "values before the softmax, and `class_id` is the top class of either "
              "([calibrated confidences](../concepts/calibration.md))."]
    lines += ["", "`class_id` indexes these classes (`class_name` is the English name; the "
              "review page shows both). A FER-2013 model has the first "
              f"{len(CLASS_NAMES)} (`classes` = {len(CLASS_NAMES)} above); a FER+ model has "
              f"all {len(CLASS_NAMES_FERPLUS)} (`classes` = {len(CLASS_NAMES_FERPLUS)}):", "",
              "| class_id | class_name | Spanish |", "|---|---|---|"]
    lines += [f"| {i} | {en} | {es} |" for i, (en, es) in
              enumerate(zip(CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES))]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Site path -> markdown of every generated page."""
    return {f"{REFERENCE_DIR}/cli.md": cli_page(),
            f"{REFERENCE_DIR}/config.md": config_page(),
            f"{REFERENCE_DIR}/steps.md": dag_page(),
            f"{REFERENCE_DIR}/signatures.md": signatures_page()}


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m tools.docs_reference OUT_DIR", file=sys.stderr)
        return 2
    for path, text in pages().items():
        target = Path(args[0]) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
