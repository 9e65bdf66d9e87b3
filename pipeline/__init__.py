"""The FER pipeline's orchestration. Importing it silences known third-party noise first
(pipeline/quiet.py says exactly what, and why), before any module imports TensorFlow."""
from pipeline import quiet as _quiet

_quiet.install()
