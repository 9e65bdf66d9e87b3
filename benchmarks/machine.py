"""What a benchmark prints beside its numbers: the CPU they were measured on."""
from __future__ import annotations

import os
import re
from pathlib import Path


def cpu_description() -> str:
    """e.g. "AMD EPYC, 2 cores, AVX2, no AVX-512" (from /proc/cpuinfo, Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.M) or [None, ""])[1].split())
    vector = "AVX2" if "avx2" in flags else "no AVX2"
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512"
    return (f"{model.group(1).strip() if model else 'unknown CPU'}, "
            f"{len(os.sched_getaffinity(0))} cores, {vector}, {avx512}")
