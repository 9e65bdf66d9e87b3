"""How core/config.py's dataclasses are declared, merged and checked.

Each field of a config dataclass is declared with `setting(default, check=..., help=...)`:
its range or choices (`check`), its one-line description (`help`), and where it applies,
the names its mapping may have (`keys`) and the sibling it must not exceed (`at_most`), all
in the field's metadata. `merge` applies a nested mapping (a config file, the command
line's flags) to a config, type-checking each value by the field's annotation; then
`check_values` and `check_order` walk the fields and their metadata. Problems are
collected, each with its dotted key, so that one error can name them all.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable, Iterable, Optional

import yaml  # PyYAML ships with apache-beam

__all__ = ["Check", "YamlLoader", "at_least", "between", "check_order", "check_values",
           "described", "fractions", "local_directory", "merge", "one_of", "optional", "positive",
           "setting", "weights_file"]

# A check takes a field's value and returns what is wrong with it, or None.
Check = Callable[[Any], Optional[str]]


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            check: Optional[Check] = None, help: str = "",  # noqa: A002 - argparse's word
            keys: Optional[Callable[[], Iterable[str]]] = None,
            at_most: Optional[str] = None) -> Any:
    """A dataclass field whose metadata carries its check and its description.

    `check` applies to the value, or to each value of a mapping; `keys` returns the names
    a mapping may have (the registered models); `at_most` names a sibling field this one
    must not exceed."""
    metadata = {"check": check, "help": help, "keys": keys, "at_most": at_most}
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={k: v for k, v in metadata.items() if v})


def described(rule: str, check: Check) -> Check:
    """`check` with its rule in words as `check.rule` (the generated config reference shows
    it), so the rule is written once, beside the check."""
    check.rule = rule  # type: ignore[attr-defined]
    return check


def between(low: float, high: float) -> Check:
    return described(f"{low:g} to {high:g}", lambda v: None if low <= v <= high
                     else f"must be between {low:g} and {high:g}")


def at_least(low: float) -> Check:
    return described(f">= {low:g}",
                     lambda v: None if v >= low else f"must be at least {low:g}")


def positive(v: float) -> Optional[str]:
    return None if v > 0 else "must be greater than 0"


def one_of(*choices: Any) -> Check:
    named = ", ".join(map(str, choices))   # choices may be numbers (ingest.ferplus_classes)
    return described("one of " + named, lambda v: None if v in choices
                     else f"must be one of {named}")


def optional(check: Check) -> Check:
    return described(f"unset, or {getattr(check, 'rule', 'checked')}",
                     lambda v: None if v is None else check(v))


def fractions(v: tuple) -> Optional[str]:
    if any(f < 0 or f > 1 for f in v) or abs(sum(v) - 1.0) > 1e-6:
        return "must be three fractions (train, validation, test) that add up to 1"
    return None


def weights_file(v: str) -> Optional[str]:
    if v in ("", "none", "imagenet") or v.endswith(".h5"):
        return None
    return "must be 'none', 'imagenet' or the path of a .h5 weights file"


def local_directory(v: str) -> Optional[str]:
    # fer-serve writes request logs with plain file I/O on the serving machine.
    if "://" in v:
        return "must be a local directory of the serving machine, not a URI"
    return None


described("> 0", positive)
described("three shares that add up to 1", fractions)
described('"none", "imagenet" or a path ending in .h5', weights_file)
described("a local directory, not a URI", local_directory)


# ----------------------------------------------------------------------------- merging

def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _checked(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """`value` as the type `hint` says (ints are numbers too), or a problem recorded."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _checked(key, value, hint, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}: expected {_type_name(hint)}, got {value!r}")
            return value
        return tuple(_checked(f"{key}[{i}]", v, a, problems) for i, (v, a) in
                     enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        return {k: _checked(f"{key}.{k}", v, args[1], problems) for k, v in value.items()}
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(hint, True)
    if not ok:
        hint_text = ""
        if hint in (int, float) and isinstance(value, str):
            hint_text = " (write a number without quotes)"
        problems.append(f"{key}: expected {_type_name(hint)}, got {value!r}{hint_text}")
        return value
    return float(value) if hint is float else value


def _sections_of(hint: Any) -> bool:
    """Whether a field annotated `hint` holds named sections (dict[str, SomeDataclass])."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is dict and dataclasses.is_dataclass(args[1])


def merge(obj: Any, overrides: Any, problems: list[str], prefix: str = "") -> Any:
    """A copy of dataclass `obj` with nested `overrides` applied; unknown keys and values of
    the wrong type go to `problems`. Sub-dataclasses and named sections merge field by
    field, other mappings key by key; anything else is replaced."""
    section = prefix.rstrip(".") or "the top level"
    fields = dataclasses.fields(obj)
    if not isinstance(overrides, dict):
        problems.append(f"{section}: expected a mapping of "
                        f"{', '.join(f.name for f in fields)}; got {overrides!r}")
        return obj
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields}
    changes = {}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in known:
            problems.append(f"{path}: unknown key; {section} has {', '.join(sorted(known))}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, problems, f"{path}.")
        elif _sections_of(hints[key]):
            changes[key] = _merge_sections(path, current, value, problems)
        else:
            checked = _checked(path, value, hints[key], problems)
            if isinstance(current, dict) and isinstance(checked, dict):
                checked = {**current, **checked}
            changes[key] = checked
    return dataclasses.replace(obj, **changes)


def _merge_sections(key: str, current: dict[str, Any], overrides: Any,
                    problems: list[str]) -> dict[str, Any]:
    """Per-name sections (train.models.<name>): names must exist, fields merge."""
    if not isinstance(overrides, dict):
        problems.append(f"{key}: expected a mapping of {', '.join(current)}; got {overrides!r}")
        return current
    for name in sorted(set(overrides) - set(current)):
        problems.append(f"{key}.{name}: not a registered model; registered: "
                        f"{', '.join(current)}")
    return {name: merge(section, overrides.get(name) or {}, problems, f"{key}.{name}.")
            for name, section in current.items()}


# ----------------------------------------------------------------------------- checking

def check_values(obj: Any, problems: list[str], prefix: str = "") -> None:
    """Every field's `check` over a merged config (on each value of a field annotated as a
    mapping), and a mapping's names against its field's `keys`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        check, keys = f.metadata.get("check"), f.metadata.get("keys")
        per_item = typing.get_origin(hints[f.name]) is dict
        if dataclasses.is_dataclass(value):
            check_values(value, problems, f"{key}.")
        elif isinstance(value, dict) and value and all(
                dataclasses.is_dataclass(v) for v in value.values()):
            for name, section in value.items():
                check_values(section, problems, f"{key}.{name}.")
        elif isinstance(value, dict):   # (a mapping given to any other field: reported)
            for name, item in value.items():
                if keys is not None and name not in (allowed := list(keys())):
                    problems.append(f"{key}.{name}: not a registered model; registered: "
                                    f"{', '.join(allowed)}")
                if per_item:
                    _apply(check, f"{key}.{name}", item, problems)
        elif not per_item:              # (not a mapping where one belongs: reported)
            _apply(check, key, value, problems)


def _apply(check: Optional[Check], key: str, value: Any, problems: list[str]) -> None:
    if check is None:
        return
    try:
        problem = check(value)
    except TypeError:   # a value of the wrong type, already reported by _checked
        return
    if problem:
        problems.append(f"{key}: {problem}, got {value!r}")


def check_order(obj: Any, problems: list[str], prefix: str = "") -> None:
    """Fields declared `at_most` another: the first value must not exceed the second."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_order(value, problems, f"{prefix}{f.name}.")
        other = f.metadata.get("at_most")
        if other is None:
            continue
        low, high = f"{prefix}{f.name}", f"{prefix}{other}"
        larger = getattr(obj, other)
        try:
            if value > larger:
                problems.append(f"{low} ({value!r}) must not exceed {high} ({larger!r})")
        except TypeError:   # a value of the wrong type, already reported by _checked
            pass


# ----------------------------------------------------------------------------- files

class YamlLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-4` (no dot) is a string; YAML 1.2 and every user
    read it as a number, so this loader does too."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
