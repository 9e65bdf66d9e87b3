"""oneDNN's CPU kernels for the processes that run pipeline steps.

TensorFlow's Linux x86 wheels use oneDNN's kernels only on CPUs that have AVX-512 VNNI or
BF16, AVX-VNNI or AMX; on every other x86 CPU (an AVX2-only AMD EPYC, say) they fall back
to Eigen's. On such a CPU, 2 cores (docs/benchmarks.md, "oneDNN on a CPU without
AVX-512"), oneDNN made training faster (the CNN's step 1.2-2.9x across runs, the demo's
whole CNN training 1.6x; VGG16's step 1.45x) and inference about 10 % slower. So the processes that run steps
(`fer-pipeline`, the Kubeflow components, and the Beam workers and servers they start,
which inherit the variable) ask for oneDNN, and `fer-serve` and `fer-client`, started on
their own, keep TensorFlow's choice for the CPU. Either way a user's own
TF_ENABLE_ONEDNN_OPTS (1 on, 0 off) wins.

TensorFlow reads the variable once, when it loads: call prefer_onednn() before anything
imports it.
"""
from __future__ import annotations

import os

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> None:
    """Turns oneDNN on for TensorFlow loaded after this call, unless the user chose."""
    os.environ.setdefault(ONEDNN_VARIABLE, "1")
