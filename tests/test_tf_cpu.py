"""pipeline/tf_cpu.py: our processes run TensorFlow with oneDNN unless the user said no."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.tf_cpu import ONEDNN_VARIABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports one of our packages, then TensorFlow, and prints whether oneDNN's kernels are on
# (TensorFlow reads the variable once, when it loads).
PROBE = ("import {package}\n"
         "from tensorflow.python.util import _pywrap_util_port\n"
         "print(_pywrap_util_port.IsMklEnabled())\n")


def onednn_enabled(package: str, user_setting: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_VARIABLE}
    if user_setting is not None:
        env[ONEDNN_VARIABLE] = user_setting
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_importing_serving_turns_onednn_on():
    # serving imports pipeline first, as every CLI, Beam worker and component does.
    assert onednn_enabled("serving", None)


def test_the_users_own_setting_wins():
    assert not onednn_enabled("pipeline", "0")
