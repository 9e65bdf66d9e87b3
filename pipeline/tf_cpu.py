"""TensorFlow CPU settings that have to be in place before TensorFlow is imported.

TensorFlow's Linux x86 wheels use oneDNN's kernels only on CPUs that have AVX-512 VNNI or
BF16, AVX-VNNI or AMX; on every other x86 CPU (an AVX2-only AMD EPYC, say) they fall back
to Eigen's. On such a CPU, 2 cores, oneDNN trained the CNN 2-3x faster per step and VGG16
2x faster, and served batch 1 and batch 32 at about the same latency (docs/benchmarks.md,
"oneDNN on a CPU without AVX-512"). So every process of ours asks for oneDNN, as a default
that a user's own TF_ENABLE_ONEDNN_OPTS (0 turns it off) overrides. The variable is
inherited by the processes we start (Beam workers, fer-serve, Kubeflow components).
"""
from __future__ import annotations

import os

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> None:
    """Turns oneDNN on for TensorFlow imported after this call, unless the user chose."""
    os.environ.setdefault(ONEDNN_VARIABLE, "1")
