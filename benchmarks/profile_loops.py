"""Where each loop's time goes on this CPU: torch.profiler over the kit's three loops on the demo's inputs, after a
warm-up run of each.

For each loop: its wall time; the operators' own time (self CPU time, the main thread: intra-op threads work
inside their operator) grouped as matrix products (the weights' and attention's: mm, addmm, bmm, oneDNN's packed
linear), attention's softmax, and the rest (norms, rotary, activations, casts, copies, sampling, the optimizer);
the time in no operator (Python, the tokenizer, the host's bookkeeping); and the top operators by own time.
Matrix products at the machine's model-shape peak would take their FLOPs / that peak: the share of the loop's time
that would be left is what stands between the loop and its bound.

    python benchmarks/profile_loops.py [--loops augment rate train] [--segments 32] [--pairs 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from _common import demo_inputs, emit, machine
from torch.profiler import ProfilerActivity, profile

from humpback_nb.config import with_overrides
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_model, load_tokenizer
from humpback_nb.method.augment import write_instructions
from humpback_nb.method.curate import rate_logprob
from humpback_nb.method.train import forward_examples, train_model

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
           "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "aten::_mkldnn_linear")
SOFTMAX = ("aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax", "aten::_log_softmax_backward_data")


def group(name: str) -> str:
    """Which part of a loop's time an operator is."""
    if name in MATMULS:
        return "matrix products"
    if name in SOFTMAX:
        return "softmax"
    return "rest"


def profiled(work) -> dict[str, Any]:
    """Wall time, own time by group and the top operators of one run of `work` under the profiler."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        start = time.perf_counter()
        work()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    own: dict[str, float] = defaultdict(float)
    for e in events:
        own[group(e.key)] += e.self_cpu_time_total / 1e6
    in_ops = sum(own.values())
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "wall_seconds": round(wall, 3),
        "share": {name: round(seconds / wall, 3) for name, seconds in sorted(own.items())}
        | {"no operator (Python, host)": round(max(0.0, wall - in_ops) / wall, 3)},
        "operators": len(events), "calls": sum(e.count for e in events),
        "top": [{"op": e.key, "group": group(e.key), "calls": e.count, "seconds": round(e.self_cpu_time_total / 1e6, 3),
                 "share": round(e.self_cpu_time_total / 1e6 / wall, 3)} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["augment", "rate", "train"],
                        choices=["augment", "rate", "train"])
    parser.add_argument("--segments", type=int, default=32, help="segments the instructions are written for")
    parser.add_argument("--pairs", type=int, default=32, help="seed pairs rated")
    parser.add_argument("--steps", type=int, default=3, help="training steps profiled (after one of warm-up)")
    args = parser.parse_args()

    config, seed, segments = demo_inputs()
    loops: dict[str, Any] = {}
    if {"augment", "rate"} & set(args.loops):
        model, tokenizer = load_model(config.model)
        engine = LocalEngine(model, tokenizer)
        if "augment" in args.loops:
            def augment() -> None:
                torch.manual_seed(0)
                write_instructions(engine, segments[: args.segments], config.generate, config.model.context_length)
            augment()  # warm-up
            loops["augment"] = {"segments": args.segments, **profiled(augment)}
        if "rate" in args.loops:
            pairs = [{"id": p["id"], "instruction": p["instruction"], "output": p["output"]}
                     for p in seed[: args.pairs]]

            def rate() -> None:  # a new engine: the rubric is read in each run, as in a stage
                rate_logprob(LocalEngine(model, tokenizer), pairs, config.curate, config.model.context_length,
                             progress=False)
            rate()
            loops["rate"] = {"pairs": args.pairs, **profiled(rate)}
        del engine, model
    if "train" in args.loops:
        train = with_overrides(config, {"train.max_steps": args.steps + 1}).train
        examples = forward_examples(load_tokenizer(config.model), seed[:96], [], train.max_seq_length)
        with tempfile.TemporaryDirectory() as folder:
            train_model(examples, config.model, replace(train, max_steps=1), f"{folder}/warm", log=lambda *_: None)
            loops["train"] = {"steps": args.steps + 1, "micro_batch_size": train.micro_batch_size,
                              **profiled(lambda: train_model(examples, config.model, train, f"{folder}/run",
                                                             log=lambda *_: None))}
    emit({"benchmark": "profile", "model": f"{config.model.name} ({config.model.quantization})", "loops": loops,
          "groups": {"matrix products": list(MATMULS), "softmax": list(SOFTMAX)}, "machine": machine()})


if __name__ == "__main__":
    main()
