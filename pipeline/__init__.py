"""The FER pipeline's orchestration. Importing it silences known third-party noise first
(pipeline/quiet.py says exactly what, and why) and asks for oneDNN's CPU kernels
(pipeline/tf_cpu.py), before any module imports TensorFlow."""
from pipeline import quiet as _quiet
from pipeline import tf_cpu as _tf_cpu

_quiet.install()
_tf_cpu.prefer_onednn()
