"""The config door: every mistake in a config file is reported before any step runs, all
at once, each naming its key and the file, in one message without a traceback; and every
config example the README and docs show is a config that loads.

Table-driven: each case is a file's text and the key words its message must hold. The
CLI cases run `fer-pipeline` in this process (no TensorFlow import per case).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fer_pipeline.pipeline import cli, cli_parser
from fer_pipeline.core.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
# Every page written by hand: the README and docs/ at any depth (the site's reference pages
# are generated at build time and are not files).
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SECTIONS = tuple(f.name for f in dataclasses.fields(PipelineConfig))

# (file name, its text, words the one error message must hold)
BAD_CONFIGS = [
    ("syntax.yaml", "train:\n  models: [cnn\n", ["syntax.yaml", "not valid YAML", "line 3"]),
    ("list.yaml", "- train\n- epochs\n", ["list.yaml", "top level must be a mapping"]),
    ("scalar.yaml", "60\n", ["scalar.yaml", "top level must be a mapping"]),
    ("bad.json", '{"train": ', ["bad.json", "not valid JSON"]),
    ("words.yaml", "train: {models: {cnn: {epochs: sixty}}}\n",
     ["words.yaml", "train.models.cnn.epochs", "expected an integer", "'sixty'"]),
    ("quoted.yaml", "train: {models: {cnn: {learning_rate: '0.001'}}}\n",
     ["train.models.cnn.learning_rate", "expected a number"]),
    ("bool.yaml", "train: {models: {cnn: {epochs: true}}}\n",
     ["train.models.cnn.epochs", "expected an integer"]),
    ("range.yaml", "train: {models: {cnn: {batch_size: 0}}}\nevaluation: {tie_tolerance: 2}\n",
     ["2 problems", "train.models.cnn.batch_size", "at least 1",
      "evaluation.tie_tolerance", "between 0 and 1"]),
    ("choice.yaml", "ingest: {split_mode: randm}\ntransform: {normalization: l2}\n",
     ["ingest.split_mode", "usage, random", "transform.normalization", "zscore"]),
    ("fractions.yaml", "ingest: {split_fractions: [0.8, 0.1]}\n",
     ["ingest.split_fractions", "a list of 3 numbers"]),
    ("sum.yaml", "ingest: {split_fractions: [0.8, 0.3, 0.1]}\n",
     ["ingest.split_fractions", "add up to 1"]),
    ("unknown.yaml", "train: {vgg_train_base: true}\n",
     ["train.vgg_train_base", "unknown key", "models"]),
    ("section.yaml", "training: {epochs: 3}\n", ["training", "unknown key", "train"]),
    ("model.yaml", "train: {models: {resnet: {epochs: 3}}}\n",
     ["train.models.resnet", "not a registered model", "cnn, vgg16"]),
    ("threshold.yaml", "evaluation: {min_accuracy: {vgg19: 0.5}}\n",
     ["evaluation.min_accuracy.vgg19", "not a registered model"]),
    ("weights.yaml", "train: {models: {vgg16: {weights: imagenette}}}\n",
     ["train.models.vgg16.weights", "imagenet"]),
    ("not_mapping.yaml", "train: {models: {cnn: 5}}\n",
     ["train.models.cnn", "expected a mapping"]),
    ("infra.yaml", "infra_validation: {mode: load, server: tfservng, load_timeout_s: -5,"
                   " canary_examples: 0}\n",
     ["4 problems", "infra_validation.mode", "load_and_query, load_only",
      "infra_validation.server", "auto, embedded, tfserving", "load_timeout_s",
      "greater than 0", "infra_validation.canary_examples", "between 1 and 1000"]),
    ("monitor.yaml", "monitor: {brightness_js: -1, class_mix_linf: 2, min_requests: 0,"
                     " dark_level: 250}\n",
     ["4 problems", "monitor.brightness_js", "monitor.class_mix_linf", "between 0 and 1",
      "monitor.min_requests", "monitor.dark_level (250) must not exceed monitor.bright_level"]),
    ("inference.yaml", "inference: {min_batch_size: 512}\n",
     ["inference.min_batch_size (512) must not exceed inference.max_batch_size (256)"]),
    ("request_logs.yaml", "push: {request_log_dir: 's3://bucket/logs'}\n",
     ["push.request_log_dir", "local directory of the serving machine"]),
    ("many.yaml", "train: {models: {cnn: {epochs: sixty, learning_rate: -1}}}\n"
                  "push: {keep_versions: 0}\nmonitors: {}\n",
     ["4 problems", "epochs", "learning_rate", "greater than 0", "push.keep_versions",
      "monitors"]),
]


@pytest.mark.parametrize("name, text, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_is_one_message_naming_file_and_keys(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    for word in words:
        assert word in message, (word, message)


def test_yaml_reads_exponents_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {models: {cnn: {learning_rate: 1e-4}, vgg16: {learning_rate: 5E-4}}}\n")
    config = load_config(str(path))
    assert config.train.models["cnn"].learning_rate == pytest.approx(1e-4)
    assert config.train.models["vgg16"].learning_rate == pytest.approx(5e-4)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_the_cli_stops_on_a_bad_config_before_creating_anything(tmp_path, small_csv, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {models: {cnn: {epochs: sixty}}}\nevaluation: {x: 1}\n")
    run_root = tmp_path / "run"
    status = cli.main(["run", "--data", small_csv, "--output", str(run_root),
                       "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    assert str(config) in err and "train.models.cnn.epochs" in err and "evaluation.x" in err
    assert not run_root.exists()


# --- the documented examples --------------------------------------------------------------

def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S)


def _inline_config(text: str) -> list[str]:
    """Inline `code` spans that are config keys: `section.key...` or `section: {...}`."""
    spans = re.findall(r"`([^`\n]+)`", text)
    found = []
    for span in spans:
        head = re.split(r"[.:\[ ]", span, maxsplit=1)[0]
        if head not in SECTIONS or re.search(r"\.(json|sqlite|html|txt|pbtxt|ya?ml)$", span):
            continue
        if span.startswith(head + ".") or span.startswith(head + ":"):
            found.append(span)
    return found


def _placeholder(value: object) -> bool:
    """A documented stand-in for a value the user chooses: HOST, DIR, R, `...`."""
    return isinstance(value, str) and (value == "..." or re.fullmatch(r"[A-Z][A-Z_]*", value)
                                       is not None)


def _defaults_for_placeholders(value: object, parts: list[str]) -> object:
    """Placeholders replaced by the default at their key, so only the key is checked."""
    if isinstance(value, dict):
        return {k: _defaults_for_placeholders(v, parts + [k]) for k, v in value.items()}
    return _default(parts) if _placeholder(value) else value


def _as_override(span: str) -> dict:
    """`a.b.c: v` or `a.b` (a reference: checked with its default value) as a mapping."""
    if span.startswith(tuple(f"{s}:" for s in SECTIONS)):
        return _defaults_for_placeholders(yaml.safe_load(span), [])
    key, _, value = span.partition(":")
    parts = re.sub(r"\[[^\]]*\]", "", key).strip().split(".")
    leaf: object = yaml.safe_load(value) if value.strip() else _default(parts)
    for part in reversed(parts):
        leaf = {part: leaf}
    return leaf


def _default(parts: list[str]) -> object:
    """The default value at a dotted key; KeyError/AttributeError when it does not exist."""
    value: object = load_config()
    for part in parts:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


DOC_TEXT = {str(path.relative_to(ROOT)): path.read_text() for path in DOCS}
YAML_EXAMPLES = [(name, block) for name, text in DOC_TEXT.items() for block in _yaml_blocks(text)]
INLINE_EXAMPLES = [(name, span) for name, text in DOC_TEXT.items()
                   for span in _inline_config(text)]


def test_the_readme_has_config_examples_to_check():
    assert any(name == "README.md" for name, _ in YAML_EXAMPLES)
    assert len(INLINE_EXAMPLES) >= 5


@pytest.mark.parametrize("doc, block", YAML_EXAMPLES)
def test_every_documented_yaml_config_loads(tmp_path, doc, block):
    path = tmp_path / "example.yaml"
    path.write_text(block)
    load_config(str(path))


@pytest.mark.parametrize("doc, span", INLINE_EXAMPLES)
def test_every_documented_config_key_exists(tmp_path, doc, span):
    try:
        override = _as_override(span)
    except (KeyError, AttributeError) as error:
        pytest.fail(f"{doc}: `{span}` names a config key that does not exist ({error})")
    path = tmp_path / "example.json"
    path.write_text(__import__("json").dumps(override))
    load_config(str(path))


# --- the documented command lines -----------------------------------------------------------

TOOLS = ("fer-pipeline", "fer-serve", "fer-client", "fer-review")


def _command_lines(text: str) -> list[str]:
    """Each `fer-*` command line of the indented or fenced examples, continuations joined,
    comments dropped and optional `[...]` groups kept as if given."""
    lines, joined, fenced = [], "", False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            fenced = not fenced
            continue
        if joined:
            joined += " " + line
        elif (fenced or raw.startswith("    ")) and any(line.startswith(tool + " ")
                                                     for tool in TOOLS):
            joined = line
        else:
            continue
        if joined.endswith("\\"):
            joined = joined[:-1].rstrip()
            continue
        command = re.sub(r"\s#.*$", "", joined)
        lines.append(re.sub(r"\[([^\]]*)\]", r"\1", command).strip())
        joined = ""
    return [line for line in lines if "..." not in line and "<-" not in line
            and "->" not in line]


COMMAND_LINES = [(name, line) for name, text in DOC_TEXT.items()
                 for line in _command_lines(text)]


def _parse_command(argv: list[str]) -> None:
    from fer_pipeline.serving import client_cli
    from fer_pipeline.serving import review_app
    from fer_pipeline.serving import server

    tool, args = argv[0], argv[1:]
    if tool == "fer-pipeline":
        cli_parser.parse_command_line(args)
    else:
        {"fer-serve": server.parse_args, "fer-client": client_cli.parse_args,
         "fer-review": review_app.parse_args}[tool](args)


def test_the_docs_have_command_lines_to_check():
    tools = {line.split()[0] for _, line in COMMAND_LINES}
    assert tools == set(TOOLS), tools
    assert len(COMMAND_LINES) >= 20


@pytest.mark.parametrize("doc, line", COMMAND_LINES,
                         ids=[f"{d}:{line[:50]}" for d, line in COMMAND_LINES])
def test_every_documented_command_line_parses(doc, line):
    """A flag the docs show that the tool does not take fails here (argparse exits 2)."""
    import shlex

    _parse_command(shlex.split(line))
