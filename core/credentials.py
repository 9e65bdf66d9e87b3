"""Credentials among Beam's options: what never reaches an artifact, and how they come back.

Beam takes credentials as pipeline options (`--s3_access_key_id`, `--s3_secret_access_key`,
`--s3_session_token`, `--azure_connection_string`, ...). Locally they stay in the process
that runs the job; but anything written down (a compiled Kubeflow pipeline, a manifest,
ML Metadata, a log line, an error message) must not hold them. Everything that records or
shows Beam options goes through this module:

* `is_secret_option(name)`: an option whose value is a credential, by its name (secret,
  password, token, credential, access key, private key, connection string, api key) or,
  for any option, a value that is a PEM private key or a service-account key's JSON;
* `redact_beam_args(args)`: the arguments with each such value replaced by `<redacted>`
  (for log lines and messages);
* `without_secrets(args)`: the arguments with each such option left out, and their names
  (what `fer-pipeline compile` bakes into the pipeline);
* `beam_args_from_environment(args)`: what a component adds back on the cluster: each
  left-out option from the environment variable `secret_env_name(option)`
  (`FER_BEAM_S3_SECRET_ACCESS_KEY` for `--s3_secret_access_key`), set from a Kubernetes
  secret. Beam's S3 filesystem needs none of them when AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) are set: boto3 reads those itself, and so
  does TensorFlow's S3 filesystem.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

__all__ = ["REDACTED", "ENV_PREFIX", "is_secret_option", "redact_beam_args", "without_secrets",
           "secret_env_name", "beam_args_from_environment", "AWS_ENVIRONMENT", "left_out_note",
           "redact_text"]

REDACTED = "<redacted>"
ENV_PREFIX = "FER_BEAM_"

# What Beam's S3 client (boto3) and TensorFlow's S3 filesystem read when no option says.
AWS_ENVIRONMENT = {"s3_access_key_id": "AWS_ACCESS_KEY_ID",
                   "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
                   "s3_session_token": "AWS_SESSION_TOKEN"}

_SECRET_NAME = re.compile(r"secret|passw(or)?d|token|credential|access_key|private_key|"
                          r"connection_string|api_key|account_key|sas_key", re.I)
_SECRET_VALUE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:")


def _option_name(flag: str) -> Optional[str]:
    """`s3_secret_access_key` for `--s3_secret_access_key[=...]` or `--s3-secret-...`; None
    for a word that is not an option."""
    if not flag.startswith("-"):
        return None
    return flag.lstrip("-").split("=", 1)[0].replace("-", "_").lower()


def is_secret_option(name: str, value: str = "") -> bool:
    """Whether option `name` (with or without dashes) carries a credential (or `value`
    looks like a private key / a service-account key)."""
    option = _option_name(name) if name.startswith("-") else name.replace("-", "_").lower()
    return bool(option and _SECRET_NAME.search(option)) or bool(_SECRET_VALUE.search(value))


def _split(args: Sequence[str]) -> list[tuple[list[str], Optional[str]]]:
    """The arguments grouped per option: ([`--x=v`] or [`--x`, `v`] or [word], secret name
    or None)."""
    groups: list[tuple[list[str], Optional[str]]] = []
    index = 0
    args = list(args)
    while index < len(args):
        arg = args[index]
        name = _option_name(arg)
        if name is None:
            groups.append(([arg], "" if _SECRET_VALUE.search(arg) else None))
            index += 1
            continue
        if "=" in arg:
            group = [arg]
            value = arg.split("=", 1)[1]
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            group, value = [arg, args[index + 1]], args[index + 1]
        else:
            group, value = [arg], ""
        groups.append((group, name if is_secret_option(name, value) else None))
        index += len(group)
    return groups


def redact_beam_args(args: Sequence[str]) -> list[str]:
    """`args` with every credential's value replaced by REDACTED (its option kept)."""
    out: list[str] = []
    for group, secret in _split(args):
        if secret is None:
            out += group
        elif not secret:
            out.append(REDACTED)
        elif "=" in group[0]:
            out.append(group[0].split("=", 1)[0] + "=" + REDACTED)
        else:
            out += [group[0]] + ([REDACTED] if len(group) > 1 else [])
    return out


def redact_text(text: str, args: Sequence[str]) -> str:
    """`text` with every credential value found in `args` replaced by REDACTED (for an
    engine's error message, which may quote the job's options)."""
    for group, secret in _split(args):
        if secret is None:
            continue
        value = group[0].split("=", 1)[1] if "=" in group[0] else group[-1]
        if secret and len(group) == 1 and "=" not in group[0]:
            continue   # a flag without a value
        if len(value) >= 4:   # shorter values would blank out ordinary words
            text = text.replace(value, REDACTED)
    return text


def without_secrets(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`args` without the credential options, the names of those left out)."""
    kept: list[str] = []
    left_out: list[str] = []
    for group, secret in _split(args):
        if secret is None:
            kept += group
        elif secret and secret not in left_out:
            left_out.append(secret)
    return kept, left_out


def secret_env_name(option: str) -> str:
    """The environment variable a component reads option `option` from on the cluster."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def beam_args_from_environment(args: Sequence[str],
                               environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """`args` plus `--option=value` for each FER_BEAM_<OPTION> set in the environment and
    not given in `args` (how a component on the cluster gets what compile left out)."""
    environ = os.environ if environ is None else environ
    given = {_option_name(arg) for arg in args if _option_name(arg)}
    added = [f"--{name[len(ENV_PREFIX):].lower()}={value}"
             for name, value in sorted(environ.items())
             if name.startswith(ENV_PREFIX) and value
             and name[len(ENV_PREFIX):].lower() not in given]
    return list(args) + added


def left_out_note(left_out: Sequence[str]) -> str:
    """What `fer-pipeline compile` says about the credential options it left out."""
    names = ", ".join(f"--{name}" for name in left_out)
    where = "; ".join(f"--{name}: {AWS_ENVIRONMENT[name]} or {secret_env_name(name)}"
                      if name in AWS_ENVIRONMENT else f"--{name}: {secret_env_name(name)}"
                      for name in left_out)
    return (f"left out of the compiled pipeline (credentials): {names}. On the cluster each "
            f"component reads them from its environment ({where}): set those from a "
            "Kubernetes secret, see the cluster how-to (docs/how-to/cluster.md)")
