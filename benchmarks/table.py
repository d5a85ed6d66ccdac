"""The benchmarks as one Markdown table: each loop's speed, its machine's bound, its share of that bound, and its
naive baseline, from the JSON files `make bench` wrote (runs/bench/*.json), with a line of the machine's bounds.

    python benchmarks/table.py [runs/bench]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LOOPS = ("augment", "curate", "train")


def fmt(value: float) -> str:
    """Three significant digits, no exponent below a million."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(figure: dict[str, Any], scale: float = 1.0, unit: str = "") -> str:
    """"median unit (min-max, n=N)" of a {"median", "min", "max", "n"}."""
    median, low, high = (fmt(figure[k] * scale) for k in ("median", "min", "max"))
    return f"{median}{unit} ({low}-{high}, n={figure['n']})" if figure["n"] > 1 else f"{median}{unit} (n=1)"


def row(result: dict[str, Any]) -> str:
    s = result["summary"]
    unit = f" {s['unit']}"
    return " | ".join([
        "", s["loop"], spread(s["kit"], unit=unit), f"{fmt(s['bound'])}{unit}", spread(s["share_of_bound"], 100, "%"),
        f"{spread(s['naive'], unit=unit)}: {s['naive_name']}", f"{s['ratio_vs_naive']}x", ""]).strip()


def machine_line(bounds: dict[str, Any]) -> str:
    m, b, p = bounds["matmul"], bounds["bandwidth"], bounds["prefill"]
    square, best = m["square_peak_tflops"], p["best"]
    return (f"Machine bounds (median (min-max) of {bounds['reps']} repetitions, measured {bounds['measured_at']}): "
            f"bf16 matmul peak {spread(square, unit=' TFLOP/s')} at {square['size']}x{square['size']}, "
            f"{spread(m['model_peak_tflops'], unit=' TFLOP/s')} at the model's shapes "
            f"({' and '.join(map(str, m['model_peak_tflops']['tokens']))} token rows); memory bandwidth "
            f"{spread(b['read_gb_s'], unit=' GB/s')} read ({b['read_gb_s']['how']}), "
            f"{spread(b['copy_gb_s'], unit=' GB/s')} copy (read + write); prefill {spread(best, unit=' tokens/s')} "
            f"at its best shape, {best['rows']} rows x {best['length']} tokens (the FLOP bound there: "
            f"{fmt(p['flop_bound_tokens_per_s'])} tokens/s).")


def table(folder: Path) -> str:
    lines = ["| loop | kit (median (min-max)) | bound | share of bound (median (min-max)) | naive baseline | ratio |",
             "|---|---|---|---|---|---|"]
    notes = []
    bounds_file = folder / "bounds.json"
    bounds = json.loads(bounds_file.read_text()) if bounds_file.is_file() else None
    for name in LOOPS:
        path = folder / f"{name}.json"
        if not path.is_file():
            notes.append(f"{path} is missing.")
            continue
        result = json.loads(path.read_text())
        lines.append(row(result))
        summary = result["summary"]
        notes.append(f"{summary['loop']}: bound = {summary['bound_how']}. {summary.get('note', '')}".strip())
        used = result.get("bounds_used", {})
        if bounds and used.get("measured_at") != bounds["measured_at"]:
            notes.append(f"{path.name} used bounds measured at {used.get('measured_at')} ({used.get('source')}), "
                         f"not those of {bounds_file}.")
    if bounds:
        lines += ["", machine_line(bounds)]
    lines += ["", "Spread: min-max over the repetitions (n of each figure); a share is bound time / measured time of "
              "each repetition, against the median bounds.", ""]
    return "\n".join(lines + [f"* {n}" for n in notes])


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")))
