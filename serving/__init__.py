"""Serving: the embedded TF-Serving-protocol server and the ensemble client. Importing it
silences known third-party noise first (pipeline/quiet.py) and asks for oneDNN
(pipeline/tf_cpu.py), before TensorFlow loads."""
from pipeline import quiet as _quiet
from pipeline import tf_cpu as _tf_cpu

_quiet.install()
_tf_cpu.prefer_onednn()
