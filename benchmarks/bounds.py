"""This machine's bounds for the kit's loops, measured now, and the bound time of each loop's token mix.

Measured (each repeated --reps times, given as {"median", "min", "max", "n", "values"}, the spread min-max over the
repetitions; the repetitions of several shapes are interleaved, so that a noisy minute spreads over all of them):

* bf16 matmul peak at large square shapes, and at the model's own shapes (x @ W.T) for a realistic number of token
  rows, each shape the faster of torch's plain `linear` and oneDNN's product with a packed weight; the model-shape
  peak does every shape once per token at each token count (time = sum of flops_i / rate_i), so it is a
  FLOP-weighted mean of the per-shape rates.
* memory bandwidth: read (sum of a float32 tensor of --gib GiB) and copy (read + write counted).

Every bound is the machine's, none the kit's own speed: reading prompts (prefill, the rater) = their FLOPs (each
prompt causal, its attention included, the head at its last token) / the model-shape peak; a decoding step =
max(bytes / read bandwidth, FLOPs / model-shape peak); training = model FLOPs / the model-shape peak (its MFU
against the large-square peak is given too). The bound times are pure functions, no torch.

    python benchmarks/bounds.py [--reps 5] [--square 2048 3072] [--tokens 512 2048] [--gib 1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any


# -- the model's shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What a bound needs to know of a LLaMA-style model (defaults: smollm2-135m)."""

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152
    tied: bool = True  # the embedding is the head
    value_bytes: int = 2  # bf16

    @classmethod
    def from_config(cls, c: Any) -> ModelShape:
        """From a transformers config."""
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                   heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=head_dim,
                   vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)))

    def layer_matmuls(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each matmul of one layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return [("q", h, q), ("k", h, kv), ("v", h, kv), ("o", q, h), ("gate", h, i), ("up", h, i), ("down", i, h)]

    def matmuls(self) -> list[tuple[str, int, int, int]]:
        """(name, in, out, times per token) of every matmul a token goes through, the head last."""
        return [(n, k, o, self.layers) for n, k, o in self.layer_matmuls()] + [("head", self.hidden, self.vocab, 1)]

    @property
    def layer_params(self) -> int:
        """Matmul weights of all the layers (no embedding, no norms)."""
        return self.layers * sum(k * o for _, k, o in self.layer_matmuls())

    @property
    def params(self) -> int:
        """Every parameter: layers, embedding (and head, unless tied), norms."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layer_params + embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.value_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one cached token, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.value_bytes

    def attention_flops(self, keys: int) -> int:
        """FLOPs of attention (q.k and the weighted sum of values) over `keys` query-key pairs, all layers."""
        return 4 * self.layers * self.heads * self.head_dim * keys


@dataclass(frozen=True)
class Bounds:
    """The machine's figures the bound times are made of (medians of the measurements)."""

    peak: float  # bf16 FLOP/s at the model's own shapes
    square_peak: float  # bf16 FLOP/s at a large square shape
    bandwidth: float  # bytes/s read

    @classmethod
    def from_json(cls, measured: dict[str, Any]) -> Bounds:
        """From what `measure` returns (or bounds.json)."""
        b = measured["bounds"]
        return cls(peak=b["model_peak_tflops"] * 1e12, square_peak=b["square_peak_tflops"] * 1e12,
                   bandwidth=b["read_gb_s"] * 1e9)


# -- bound times (pure) --------------------------------------------------------------------------
def combined_rate(parts: Iterable[tuple[float, float]]) -> float:
    """The rate of doing every (flops, rate) of `parts` one after another: sum of flops / sum of flops/rate."""
    parts = list(parts)
    return sum(f for f, _ in parts) / sum(f / r for f, r in parts)


def prefill_flops(shape: ModelShape, lengths: Iterable[int], past: int = 0, kept: int = 1) -> int:
    """FLOPs of reading prompts of `lengths` tokens (causal attention), each after `past` cached tokens, with the
    head computed for the last `kept` tokens of each."""
    head = 2 * shape.hidden * shape.vocab
    total = 0
    for n in lengths:
        total += 2 * shape.layer_params * n + shape.attention_flops(n * past + n * (n + 1) // 2) + head * min(kept, n)
    return total


def step_costs(shape: ModelShape, lengths: Sequence[int], bounds: Bounds) -> tuple[float, float]:
    """(seconds to read, seconds to compute) one decoding step: a new token for each row, row i over `lengths[i]`
    cached tokens (its new one included). Every weight is read once, and each row's keys and values."""
    read = shape.weight_bytes + shape.kv_bytes_per_token * sum(lengths)
    flops = 2 * shape.params * len(lengths) + shape.attention_flops(sum(lengths))
    return read / bounds.bandwidth, flops / bounds.peak


def step_seconds(shape: ModelShape, lengths: Sequence[int], bounds: Bounds) -> float:
    """Bound time of one decoding step: max(bytes / bandwidth, FLOPs / peak)."""
    return max(step_costs(shape, lengths, bounds))


def decode_steps(records: Iterable[dict[str, Any]]) -> dict[int, list[list[int]]]:
    """Per batch ("batch" of a generation record): the cached length of each row still writing, at each step.

    A row writes "new_tokens" tokens, then its stop token if "finished". The first token it samples comes from the
    prefill's logits; every other one from a decoding step: step t (t = 1, 2, ...) feeds the row's t-th token and
    attends over its prompt + t tokens. So a row is in steps 1 .. new_tokens (finished) or 1 .. new_tokens - 1.
    """
    batches: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in records:
        steps = r["new_tokens"] + int(r.get("finished", True)) - 1
        batches[r["batch"]].append((r["prompt_tokens"], max(0, steps)))
    return {batch: [[prompt + t for prompt, steps in rows if steps >= t]
                    for t in range(1, max(steps for _, steps in rows) + 1)]
            for batch, rows in sorted(batches.items())}


def generation_bound(records: Sequence[dict[str, Any]], shape: ModelShape, bounds: Bounds) -> dict[str, Any]:
    """Bound time of a batched generation from its records ({"prompt_tokens", "new_tokens", "finished", "batch"}):
    the FLOPs of reading every prompt at the model-shape peak, plus each batch's decoding steps with the rows still
    writing."""
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    steps = [lengths for batch in decode_steps(records).values() for lengths in batch]
    costs = [step_costs(shape, lengths, bounds) for lengths in steps]
    decode = sum(max(read, compute) for read, compute in costs)
    prefill = prefill_flops(shape, [r["prompt_tokens"] for r in records]) / bounds.peak
    flop_bound = sum(compute > read for read, compute in costs)
    return {"seconds": prefill + decode, "prefill_seconds": prefill, "decode_seconds": decode,
            "prompt_tokens": prompt_tokens, "new_tokens": sum(r["new_tokens"] for r in records),
            "batches": len({r["batch"] for r in records}), "steps": len(steps), "flop_bound_steps": flop_bound}


def rating_bound(prefix_tokens: int, tail_tokens: Sequence[int], shape: ModelShape, bounds: Bounds) -> dict[str, Any]:
    """Bound time of the logprob rater: the FLOPs of what it must read, the rubric prefix once and each pair's tail
    (instruction, output, "Score: ") attending over it, at the model-shape peak."""
    flops = prefill_flops(shape, [prefix_tokens], kept=0) + prefill_flops(shape, tail_tokens, past=prefix_tokens)
    return {"seconds": flops / bounds.peak, "tokens_read": prefix_tokens + sum(tail_tokens),
            "prefix_tokens": prefix_tokens, "tail_tokens": sum(tail_tokens), "flops": flops}


def prompt_bound(lengths: Sequence[int], shape: ModelShape, bounds: Bounds) -> dict[str, Any]:
    """Bound time of reading prompts of `lengths` tokens for one next token each: their FLOPs at the model-shape
    peak."""
    flops = prefill_flops(shape, lengths)
    return {"seconds": flops / bounds.peak, "prompt_tokens": sum(lengths), "flops": flops}


def training_bound(flops: float, bounds: Bounds) -> dict[str, float]:
    """Bound time of training `flops` model FLOPs at the model-shape bf16 peak, and at the large-square peak (the
    usual MFU's)."""
    return {"seconds": flops / bounds.peak, "seconds_at_square_peak": flops / bounds.square_peak}


# -- measurements --------------------------------------------------------------------------------
def measure_matmuls(shape: ModelShape, square: Sequence[int] = (2048, 3072), tokens: Sequence[int] = (512, 2048),
                    reps: int = 5, flops_per_sample: float = 4e9) -> dict[str, Any]:
    """bf16 FLOP/s of x @ W.T at large square shapes and at the model's shapes (`tokens` rows), each the faster of
    torch's `linear` on the plain weight and oneDNN's product with the weight packed once (as the kit's inference
    loops multiply, infra/linear.py): the machine's rate by the fastest means torch has, not the kit's."""
    import torch
    import torch.nn.functional as F
    from _common import summary

    packs = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
    unique = sorted({(k, o) for _, k, o, _ in shape.matmuls()})
    cases = {f"square {n}": (n, n, n) for n in square}
    cases |= {f"{t}x{k}x{o}": (t, k, o) for t in tokens for k, o in unique}
    tensors = {name: (torch.randn(m, k, dtype=torch.bfloat16), torch.randn(o, k, dtype=torch.bfloat16))
               for name, (m, k, o) in cases.items()}
    products = {"plain": lambda x, w, _: F.linear(x, w)}
    if packs:
        tensors = {name: (x, w, torch.ops.mkldnn._reorder_linear_weight(w, 64)) for name, (x, w) in tensors.items()}
        products["packed"] = lambda x, _, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    else:
        tensors = {name: (x, w, None) for name, (x, w) in tensors.items()}
    rates: dict[str, dict[str, list[float]]] = {how: defaultdict(list) for how in products}
    for rep in range(reps + 1):  # the first round warms up
        for name, (m, k, o) in cases.items():
            x, w, packed = tensors[name]
            inner = max(1, round(flops_per_sample / (2 * m * k * o)))
            for how, product in products.items():
                start = time.perf_counter()
                for _ in range(inner):
                    product(x, w, packed)
                if rep:
                    rates[how][name].append(2 * m * k * o * inner / (time.perf_counter() - start))
    best = {name: [max(rates[how][name][i] for how in products) for i in range(reps)] for name in cases}
    # the model-shape peak of each round: every matmul of a token, at each token count
    model_peak = [combined_rate((t * count * 2 * k * o, best[f"{t}x{k}x{o}"][i])
                                for t in tokens for _, k, o, count in shape.matmuls()) for i in range(reps)]
    squares = {n: summary([r / 1e12 for r in best[f"square {n}"]]) for n in square}
    size = max(square, key=lambda n: squares[n]["median"])
    return {"square_peak_tflops": {"size": size, **squares[size]},
            "model_peak_tflops": {"tokens": list(tokens), **summary([r / 1e12 for r in model_peak])},
            "per_shape_tflops": {name: summary([r / 1e12 for r in values]) for name, values in best.items()},
            "per_shape_tflops_by_product": {how: {name: summary([r / 1e12 for r in values])["median"]
                                                  for name, values in by_name.items()}
                                            for how, by_name in rates.items()}}


def measure_bandwidth(gib: float = 1.0, reps: int = 5) -> dict[str, Any]:
    """GB/s of reading a float32 tensor of `gib` GiB (its sum), and of copying it (bytes read + written)."""
    import torch
    from _common import summary

    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    size = x.numel() * 4
    read, copy = [], []
    for rep in range(reps + 1):  # the first round warms up (and touches every page of y)
        start = time.perf_counter()
        x.sum()
        middle = time.perf_counter()
        y.copy_(x)
        end = time.perf_counter()
        if rep:
            read.append(size / (middle - start) / 1e9)
            copy.append(2 * size / (end - middle) / 1e9)
    return {"bytes": size, "read_gb_s": {"how": "sum of a float32 tensor", **summary(read)},
            "copy_gb_s": {"how": "copy of a float32 tensor, bytes read + written", **summary(copy)}}


def measure(shape: ModelShape, reps: int = 5, square: Sequence[int] = (2048, 3072),
            tokens: Sequence[int] = (512, 2048), gib: float = 1.0) -> dict[str, Any]:
    """Every bound of this machine for a model of `shape`, measured now; "bounds" holds the medians the bound times
    use."""
    from _common import SPREAD

    started = datetime.now(UTC).isoformat(timespec="seconds")
    clock = time.perf_counter()
    bandwidth = measure_bandwidth(gib, reps)
    matmuls = measure_matmuls(shape, square, tokens, reps)
    return {
        "bounds": {"square_peak_tflops": matmuls["square_peak_tflops"]["median"],
                   "model_peak_tflops": matmuls["model_peak_tflops"]["median"],
                   "read_gb_s": bandwidth["read_gb_s"]["median"]},
        "matmul": matmuls, "bandwidth": bandwidth,
        "model_shape": {**asdict(shape), "params": shape.params, "weight_bytes": shape.weight_bytes,
                        "kv_bytes_per_token": shape.kv_bytes_per_token},
        "reps": reps, "spread": SPREAD, "measured_at": started, "seconds": round(time.perf_counter() - clock, 1),
    }


def transformers_config(model: Any) -> Any:
    """The transformers config of a kit's model (`ModelConfig`): its shapes, without loading its weights."""
    from transformers import AutoConfig

    from humpback_nb.infra.models import resolve

    return AutoConfig.from_pretrained(resolve(model.name), trust_remote_code=False)


def bounds_for(shape: ModelShape, path: str | None, reps: int) -> dict[str, Any]:
    """The bounds `make bench` wrote to `path` moments before, else measured now (`reps` repetitions)."""
    from _common import load_bounds

    measured = load_bounds(path)
    if measured is None:
        measured = measure(shape, reps=reps)
        measured["source"] = "measured in this process"
    else:
        measured["source"] = path
    return measured


def main() -> None:
    from _common import emit, machine

    from humpback_nb.config import load_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--square", type=int, nargs="+", default=[2048, 3072], help="square matmul sizes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="token rows of the model shapes")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the tensor read for the bandwidth")
    args = parser.parse_args()

    config = load_preset("demo")
    shape = ModelShape.from_config(transformers_config(config.model))
    emit({"benchmark": "bounds", "model": f"{config.model.name} (its shapes, in bf16)",
          **measure(shape, args.reps, args.square, args.tokens, args.gib), "machine": machine()})


if __name__ == "__main__":
    import _common  # noqa: F401  (sys.path and stdout as a benchmark script has them)

    main()
