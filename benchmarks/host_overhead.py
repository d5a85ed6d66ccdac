"""The host's work in one eager decoding step, the part of `humpback plan`'s decoding price that is not the GPU's.

A LLaMA too narrow to compute anything (hidden 64) but as deep as LLaMA-7B (32 layers) runs the kit's own decoding
loop: its step time is the host's alone (Python, the modules' calls and PyTorch's dispatch). Printed: the operators
a step dispatches (per layer and once a step, counted with a dispatch mode, as tests/test_plan.py counts them), the
seconds a step takes, and so the seconds an operator takes, medians of repetitions with their spread. On a GPU each
kernel also waits for its launch: `plan.HOST_SECONDS_PER_OP` adds that to what this measures, and `humpback
gpu-check` measures the whole step there.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import emit, machine, repeat
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from humpback_nb.infra.decode import decode
from humpback_nb.plan import HOST_SECONDS_PER_OP, OPS_PER_LAYER, OPS_PER_STEP

ROWS, PROMPT = 8, 32


class _Count(TorchDispatchMode):
    operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators += 1
        return func(*args, **(kwargs or {}))


def _model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _decode(model: LlamaForCausalLM, steps: int) -> None:
    ids = torch.randint(3, 250, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    decode(model, ids, torch.ones_like(ids), steps, stop_ids=[999], temperature=0.7, top_p=0.9,
           generator=torch.Generator().manual_seed(0))  # no stop id can be drawn: every row writes every step


def operators(layers: int, steps: int) -> int:
    """Operators the kit's decoding loop dispatches over `steps` steps of a model of `layers` layers."""
    model = _model(layers)
    with _Count() as count:
        _decode(model, steps)
    return count.operators


def step_seconds(layers: int, short: int = 8, long: int = 72) -> float:
    """Seconds a decoding step takes: the difference of a long and a short run over their steps (prompt reading and
    set-up cancel out)."""
    model = _model(layers)
    times = []
    for steps in (short, long):
        started = time.perf_counter()
        _decode(model, steps)
        times.append(time.perf_counter() - started)
    return (times[1] - times[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each timing")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (LLaMA-7B has 32)")
    args = parser.parse_args()
    operators(2, 1)  # lazy set-up, once a process
    per_step = {n: (operators(n, 12) - operators(n, 4)) / 8 for n in (2, 3)}
    per_layer, fixed = per_step[3] - per_step[2], per_step[2] - 2 * (per_step[3] - per_step[2])
    step_seconds(2)  # warm-up
    step = repeat(lambda: step_seconds(args.layers), args.repeat, digits=4)
    ops = fixed + args.layers * per_layer
    emit({
        "benchmark": "host_overhead",
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "rows": ROWS, "layers": args.layers,
        "operators_per_layer": per_layer, "operators_per_step": fixed,
        "plan_counts_agree": (per_layer, fixed) == (OPS_PER_LAYER, OPS_PER_STEP),
        "step_seconds": step,
        "seconds_per_operator": float(f"{step['median'] / ops:.3g}"),
        "plan_seconds_per_operator": HOST_SECONDS_PER_OP,
        "note": "host time only (the model computes next to nothing); a GPU adds a kernel launch per operator",
    })


if __name__ == "__main__":
    main()
