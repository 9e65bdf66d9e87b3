"""Serving: the embedded TF-Serving-protocol server and the ensemble client. Importing it
silences known third-party noise first (core/quiet.py), before TensorFlow loads."""
from fer_pipeline.core import quiet as _quiet

_quiet.install()
