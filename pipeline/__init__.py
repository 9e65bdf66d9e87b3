"""The FER pipeline's orchestration. Importing it silences known third-party noise first
(core/quiet.py says exactly what, and why), before any module imports TensorFlow."""
from fer_pipeline.core import quiet as _quiet

_quiet.install()
