"""Shared by the benchmarks: the inputs (the demo preset's seed pairs and web segments), repetitions summed up as
median and spread, peak memory, the machine's bounds as `make bench` measured them, and one JSON object printed
per benchmark."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Run as a benchmark script, stdout carries its one JSON object and what the libraries print goes to stderr
# (imported elsewhere, by the tests, stdout is left alone).
_STDOUT = sys.stdout
if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:
    sys.stdout = sys.stderr

from humpback_nb.config import HumpbackConfig, load_preset, with_overrides  # noqa: E402
from humpback_nb.pipeline import open_run  # noqa: E402

SPREAD = "min-max over the repetitions"  # what every {"median", "min", "max", "n"} of the benchmarks means


def demo_inputs(preset: str = "demo", overrides: dict[str, Any] | None = None
                ) -> tuple[HumpbackConfig, list[dict[str, Any]], list[dict[str, Any]]]:
    """(config, training seed pairs, segments) of a preset (with `overrides`, e.g. more segments): its `seed` and
    `segments` stages, run in a temporary folder (no model is needed for them)."""
    config = with_overrides(load_preset(preset), overrides or {})
    with tempfile.TemporaryDirectory(prefix="humpback-bench-") as folder:
        run = open_run(folder, config)
        run.run(config, until="segments", log=lambda _: None)
        seed, segments = run.files.seed_pairs("train"), run.files.segments()
    return config, seed, segments


def summary(values: list[float], digits: int = 4) -> dict[str, Any]:
    """{"median", "min", "max", "n", "values"} of repeated measurements of one figure."""
    if not values:
        raise ValueError("no measurements")
    return {"median": _round(statistics.median(values), digits), "min": _round(min(values), digits),
            "max": _round(max(values), digits), "n": len(values), "values": [_round(v, digits) for v in values]}


def repeat(fn: Callable[[], float], n: int, digits: int = 4) -> dict[str, Any]:
    """Median and spread (min-max) of `fn()`, a measured figure, over `n` calls."""
    return summary([fn() for _ in range(n)], digits)


def rounded(figures: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """`figures` with every float kept to `digits` significant digits."""
    return {k: _round(v, digits) if isinstance(v, float) else v for k, v in figures.items()}


def _round(value: float, digits: int) -> float:
    """`digits` significant digits (figures here range from 1e-3 to 1e12)."""
    return float(f"{value:.{digits}g}")


def load_bounds(path: str | None) -> dict[str, Any] | None:
    """The bounds bounds.py wrote to `path` (`make bench` measures them moments before the loops), or None."""
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "malloc_tuned": "MALLOC_MMAP_THRESHOLD_" in os.environ}


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=None if os.environ.get("BENCH_COMPACT") else 2), file=_STDOUT, flush=True)


def run_facts(args: Any, measured: dict[str, Any], goals: dict[str, float]) -> dict[str, Any]:
    """What every benchmark's JSON ends with: repetitions, the bounds it used, the issue's goals, peak memory and
    the machine."""
    return {"reps": {"kit": args.reps, "naive": args.naive_reps, "spread": SPREAD},
            "bounds_used": {"source": measured["source"], "measured_at": measured["measured_at"],
                            **measured["bounds"]},
            "goals": goals, "peak_rss_gib": peak_rss_gib(), "machine": machine()}
