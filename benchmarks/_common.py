"""Shared by the benchmarks: the inputs (the demo preset's seed pairs and web segments), the machine's measured
bf16 matmul peak, peak memory, and one JSON object printed per benchmark."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# stdout carries the one JSON object of the benchmark; what the libraries print goes to stderr.
_STDOUT, sys.stdout = sys.stdout, sys.stderr

from humpback_nb.config import HumpbackConfig, load_preset  # noqa: E402
from humpback_nb.run import RunFolder  # noqa: E402


def demo_inputs(preset: str = "demo") -> tuple[HumpbackConfig, list[dict[str, Any]], list[dict[str, Any]]]:
    """(config, training seed pairs, segments) of a preset: its `seed` and `segments` stages, run in a
    temporary folder (no model is needed for them)."""
    config = load_preset(preset)
    with tempfile.TemporaryDirectory(prefix="humpback-bench-") as folder:
        run = RunFolder(folder)
        run.run(config, until="segments", log=lambda _: None)
        seed, segments = run.files.seed_pairs("train"), run.files.segments()
    return config, seed, segments


def matmul_peak(dtype: torch.dtype = torch.bfloat16, sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    """The best FLOP/s of square matmuls in `dtype` on this machine, measured now."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "malloc_tuned": "MALLOC_MMAP_THRESHOLD_" in os.environ}


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=None if os.environ.get("BENCH_COMPACT") else 2), file=_STDOUT, flush=True)
