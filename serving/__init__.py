"""Serving: the embedded TF-Serving-protocol server and the ensemble client. Importing it
silences known third-party noise first (pipeline/quiet.py), before TensorFlow loads."""
from pipeline import quiet as _quiet

_quiet.install()
