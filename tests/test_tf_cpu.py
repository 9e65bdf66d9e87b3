"""core/tf_cpu.py: processes that run steps ask for oneDNN, servers keep TF's choice,
and a user's own TF_ENABLE_ONEDNN_OPTS always wins."""
from __future__ import annotations

import os
import subprocess
import sys

from fer_pipeline.core.tf_cpu import ONEDNN_VARIABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_probe(code: str, user_setting: str | None = None) -> str:
    """Runs `code` in a fresh interpreter without our test settings; its last line."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_VARIABLE}
    if user_setting is not None:
        env[ONEDNN_VARIABLE] = user_setting
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def setting_after_importing(module: str, user_setting: str | None = None) -> str:
    return run_probe(f"import os, {module}\nprint(os.environ.get({ONEDNN_VARIABLE!r}))",
                     user_setting)


def test_fer_pipeline_runs_tensorflow_with_onednn():
    # TensorFlow itself reports its kernels on when loaded after the CLI module.
    assert run_probe("import fer_pipeline.pipeline.cli\n"
                     "from tensorflow.python.util import _pywrap_util_port\n"
                     "print(_pywrap_util_port.IsMklEnabled())") == "True"


def test_the_kubeflow_components_ask_for_onednn_too():
    assert setting_after_importing("fer_pipeline.pipeline.kfp_pipeline") == "1"


def test_fer_serve_and_fer_client_keep_tensorflows_own_choice():
    assert setting_after_importing("fer_pipeline.serving.client") == "None"
    assert setting_after_importing("fer_pipeline.serving.server") == "None"


def test_the_users_own_setting_wins():
    assert setting_after_importing("fer_pipeline.pipeline.cli", user_setting="0") == "0"
