"""No credential reaches an artifact (core/credentials.py).

Planted credentials, given the ways a user gives them (Beam's `--s3_*` options in both
`--flag=value` and `--flag value` form, the MySQL password's environment variable), must
appear in nothing a run or a compile leaves: no file under the run root (manifests, commit
records, the ML Metadata store), no compiled Kubeflow YAML, nothing printed. The compile
says which options it left out and how the components get them on the cluster.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fer_pipeline.core.credentials import (beam_args_from_environment, redact_beam_args,
                                           redact_text, without_secrets)
from fer_pipeline.pipeline import cli

SECRET_KEY = "planted-secret-key-7f3a91"
KEY_ID = "AKIAPLANTED0KEY0ID42"
SESSION_TOKEN = "planted-session-token-9c1e"
MYSQL_PASSWORD = "planted-mysql-password-2b6d"
PLANTED = (SECRET_KEY, KEY_ID, SESSION_TOKEN, MYSQL_PASSWORD)
BEAM_CREDENTIALS = [f"--s3_secret_access_key={SECRET_KEY}", f"--s3_access_key_id={KEY_ID}",
                    "--s3_session_token", SESSION_TOKEN, "--s3_region_name=eu-west-1"]


@pytest.fixture
def planted_environment(monkeypatch):
    monkeypatch.setenv("FER_METADATA_MYSQL_PASSWORD", MYSQL_PASSWORD)


def _leaks(text: bytes | str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [value for value in PLANTED if value.encode() in data]


def _files_leaking(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            leaks = _leaks(path.read_bytes())
            if leaks:
                found[str(path)] = leaks
    return found


def test_a_run_leaves_no_credential_in_its_run_root_metadata_or_output(
        tmp_path, small_csv, capfd, planted_environment):
    run_root = tmp_path / "run"
    status = cli.main(["ingest", "--data", small_csv, "--output", str(run_root), "-v",
                       *BEAM_CREDENTIALS])
    output = capfd.readouterr()
    assert status == 0, output.err[-2000:]
    assert (run_root / "metadata.sqlite").exists()   # ML Metadata is among the files read
    assert list(run_root.rglob("manifest.json"))
    assert _files_leaking(run_root) == {}
    assert _leaks(output.out + output.err) == []


def test_compile_leaves_credentials_out_and_says_how_pods_get_them(tmp_path, capfd,
                                                                    planted_environment):
    for extra in ([], ["--bulk-inference"]):
        path = tmp_path / f"pipeline{len(extra)}.yaml"
        status = cli.main(["compile", "--kfp", str(path), *extra, "--runner=DataflowRunner",
                           "--project=p", *BEAM_CREDENTIALS])
        output = capfd.readouterr()
        assert status == 0, output.err[-2000:]
        assert _leaks(path.read_text()) == [] and _leaks(output.out + output.err) == []
        for said in ("--s3_secret_access_key", "--s3_access_key_id", "--s3_session_token",
                     "AWS_SECRET_ACCESS_KEY", "FER_BEAM_S3_SECRET_ACCESS_KEY",
                     "Kubernetes secret"):
            assert said in output.out, (said, output.out)
        spec = yaml.safe_load(path.read_text())
        default = spec["root"]["inputDefinitions"]["parameters"]["beam_args_json"]
        assert yaml.safe_load(default["defaultValue"]) == [
            "--runner=DataflowRunner", "--project=p", "--s3_region_name=eu-west-1"]


def test_a_mistyped_credential_option_is_not_echoed(tmp_path, capsys):
    status = cli.main(["ingest", "--data", "x.csv", "--output", str(tmp_path / "run"),
                       f"--s3_secret_acces_key={SECRET_KEY}"])
    output = capsys.readouterr()
    assert status == 2 and "--s3_secret_acces_key=<redacted>" in output.err
    assert _leaks(output.out + output.err) == []


def test_the_helpers_redact_leave_out_and_restore():
    service_account = '--credentials={"type": "service_account", "private_key": "k"}'
    args = [*BEAM_CREDENTIALS, service_account, "--runner=FlinkRunner"]
    assert redact_beam_args(args) == [
        "--s3_secret_access_key=<redacted>", "--s3_access_key_id=<redacted>",
        "--s3_session_token", "<redacted>", "--s3_region_name=eu-west-1",
        "--credentials=<redacted>", "--runner=FlinkRunner"]
    kept, left_out = without_secrets(args)
    assert kept == ["--s3_region_name=eu-west-1", "--runner=FlinkRunner"]
    assert left_out == ["s3_secret_access_key", "s3_access_key_id", "s3_session_token",
                        "credentials"]
    message = f"job failed: options {{'s3_secret_access_key': '{SECRET_KEY}'}} {KEY_ID}"
    assert _leaks(redact_text(message, args)) == []
    # In the component's pod: what compile left out comes back from the environment.
    restored = beam_args_from_environment(kept, {
        "FER_BEAM_S3_SECRET_ACCESS_KEY": SECRET_KEY, "FER_BEAM_S3_REGION_NAME": "ignored",
        "HOME": os.environ.get("HOME", "/")})
    assert restored == kept + [f"--s3_secret_access_key={SECRET_KEY}"]
