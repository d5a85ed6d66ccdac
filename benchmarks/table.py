"""The benchmarks as one Markdown table: each loop's speed, its machine's bound, its share of that bound, and its
naive baseline, from the JSON files `make bench` wrote (runs/bench/*.json), with a line of the machine's bounds.

    python benchmarks/table.py [runs/bench]                          # the table, on stdout
    python benchmarks/table.py runs/bench --measured docs/measured   # also docs/measured/bench-<cpu kind>.md
    python benchmarks/table.py --cpu-kind                            # this machine's kind, e.g. intel-xeon-amx

The page under docs/measured/ says what wrote it, on which CPU and at which commit; the docs link to it. The CPU
kind names a page: the model name's first two words and the bf16 matrix feature (amx, avx512bf16 or no-bf16), so
that each kind of machine keeps its own page. Standard library only: benchmarks/fresh_clone.sh runs it without
the environment.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
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


def engines_table(result: dict[str, Any]) -> list[str]:
    """The same work through the kit's loops and vLLM's server (benchmarks/bench_engines.py)."""
    rows = ["| same work, same bf16 weights | engine local | engine vllm (CPU build) | vLLM / local |",
            "|---|---|---|---|"]
    for loop, unit, name in (("prompt_reading", "prompt_tokens_per_s", "prompt reading, prompt tokens/s"),
                             ("self_augmentation", "new_tokens_per_s", "self-augmentation, new tokens/s"),
                             ("rating", "pairs_per_s", "logprob rater, pairs/s")):
        if loop not in result["local"]:
            continue
        local, vllm = result["local"][loop], result["vllm"][loop]
        rows.append(f"| {name} ({local.get('prompts', local.get('pairs'))} prompts) | {spread(local[unit])}, "
                    f"{spread(local['share_of_bound'], 100, '%')} of bound | {spread(vllm[unit])}, "
                    f"{spread(vllm['share_of_bound'], 100, '%')} of bound | {result['vllm_over_local'][loop]}x |")
    v = result["vllm"]
    rows += ["", f"vLLM's server: started in {v['server_start_seconds']} s, its first request "
                 f"{v['first_request_seconds']} s (neither in the rates); {v['server']}, {v['concurrency']} requests "
                 "in flight."]
    return rows


def profile_table(result: dict[str, Any]) -> list[str]:
    """Where each loop's time went (benchmarks/profile_loops.py): shares of its wall time, its top operators."""
    rows = ["| where the time went (torch.profiler, one run) | wall | matrix products | softmax | other operators | "
            "no operator (Python, host) | top operators (share) |", "|---|---|---|---|---|---|---|"]
    for name, loop in result["loops"].items():
        share = loop["share"]
        top = ", ".join(f"{t['op'].split('::')[-1]} {t['share']:.0%}" for t in loop["top"][:4])
        rows.append(f"| {name} | {loop['wall_seconds']:.1f} s | {share.get('matrix products', 0):.0%} | "
                    f"{share.get('softmax', 0):.0%} | {share.get('rest', 0):.0%} | "
                    f"{share['no operator (Python, host)']:.0%} | {top} |")
    return rows


def machine_line(bounds: dict[str, Any]) -> str:
    m, b = bounds["matmul"], bounds["bandwidth"]
    square = m["square_peak_tflops"]
    return (f"Machine bounds (median (min-max) of {bounds['reps']} repetitions, measured {bounds['measured_at']}): "
            f"bf16 matmul peak {spread(square, unit=' TFLOP/s')} at {square['size']}x{square['size']}, "
            f"{spread(m['model_peak_tflops'], unit=' TFLOP/s')} at the model's shapes "
            f"({' and '.join(map(str, m['model_peak_tflops']['tokens']))} token rows); memory bandwidth "
            f"{spread(b['read_gb_s'], unit=' GB/s')} read ({b['read_gb_s']['how']}), "
            f"{spread(b['copy_gb_s'], unit=' GB/s')} copy (read + write). Every bound is made of these: prompts "
            "and the rater's reading are their FLOPs at the model-shape peak, a decoding step the larger of its "
            "bytes over the read bandwidth and its FLOPs over that peak, training its model FLOPs over that peak.")


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
    engines = folder / "engines.json"
    if engines.is_file():
        lines += ["", *engines_table(json.loads(engines.read_text()))]
    else:
        notes.append(f"{engines} is missing.")
    profile = folder / "profile.json"
    if profile.is_file():
        lines += ["", *profile_table(json.loads(profile.read_text()))]
    else:
        notes.append(f"{profile} is missing.")
    if bounds:
        lines += ["", machine_line(bounds)]
    lines += ["", "Spread: min-max over the repetitions (n of each figure); a share is bound time / measured time of "
              "each repetition, against the median bounds.", ""]
    return "\n".join(lines + [f"* {n}" for n in notes])


def cpu() -> dict[str, Any]:
    """This machine's CPU: its model name (/proc/cpuinfo), its logical CPUs, its bf16 matrix feature, its kind."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine() or "unknown CPU"
    matrix = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else "no-bf16"
    return {"model": model, "cpus": os.cpu_count(), "matrix": matrix, "kind": cpu_kind(model, matrix)}


def cpu_kind(model: str, matrix: str) -> str:
    """'Intel(R) Xeon(R) Processor', 'amx' -> 'intel-xeon-amx'; 'AMD EPYC 9R14 96-Core Processor', 'avx512bf16'
    -> 'amd-epyc-avx512bf16'."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"\((r|tm)\)", " ", model.lower()))
    words = [w for w in words if w not in {"processor", "cpu"}][:2]
    return "-".join(words + [matrix]) if words else f"cpu-{matrix}"


def commit() -> str:
    """The short commit of the checkout, and whether tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes)" if dirty else head


def measured_page(body: str, machine: dict[str, Any], at: str) -> str:
    """docs/measured/bench-<kind>.md: what wrote it, on which CPU and at which commit, then the table."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "\n".join([
        "<!-- written by make bench (benchmarks/table.py); make bench rewrites it -->",
        f"# `make bench` on {machine['kind']}", "",
        f"Written by `make bench` (benchmarks/table.py) on {machine['model']} ({machine['cpus']} CPUs; bf16 matrix "
        f"feature: {machine['matrix']}), at commit {at}, {when}. `make bench` on a machine of this kind rewrites "
        "this file.", "", body, ""])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--cpu-kind"]:
        print(cpu()["kind"])
        return 0
    measured = None
    if "--measured" in argv:
        at = argv.index("--measured")
        measured = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    body = table(Path(argv[0] if argv else "runs/bench"))
    print(body)
    if measured is not None:
        machine = cpu()
        measured.mkdir(parents=True, exist_ok=True)
        page = measured / f"bench-{machine['kind']}.md"
        page.write_text(measured_page(body, machine, commit()))
        print(f"\n{page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
