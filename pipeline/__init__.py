import os

# TensorFlow's C++ INFO/WARNING lines (CUDA probing, oneDNN, tf.data end-of-sequence) drown
# the CLI's own output; errors still show. Set before any module imports TensorFlow, and
# only as a default so a user's own TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
