"""Self-augmentation: new tokens per second writing instructions for web segments, and its share of this machine's
bound for the same token mix.

The kit's path (`augment.write_instructions`: length-sorted batches, rows leaving the batch when they
finish, nucleus sampling that sorts only the likely tokens, 4-bit weights unpacked once on a CPU) against
the naive loop that public reimplementations run: `model.generate` on one prompt at a time, with the
model loaded in 4-bit the usual way. Same segments, same prompt, same sampling settings, same model.

The bound of a generation (bounds.generation_bound) is computed from its records: the FLOPs of reading its prompts
at the model-shape bf16 peak, then every decoding step with the rows still writing, each step
max(bytes / bandwidth, FLOPs / peak). Every figure is the median of --reps runs (the naive loops, slow, of
--naive-reps runs) with its spread, min-max.

    python benchmarks/bench_augment.py [--reps 3] [--segments 64] [--naive 8] [--naive-reps 1] [--bounds FILE]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import torch
from _common import demo_inputs, emit, peak_rss_gib, rounded, run_facts, summary
from bounds import Bounds, ModelShape, bounds_for, generation_bound

from humpback_nb.infra.chat import prompt_ids
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_model
from humpback_nb.method.augment import backward_prompts, write_instructions


def naive_loop(model, tokenizer, prompts, settings, max_new_tokens: int,
               greedy: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`model.generate` on one prompt at a time: (totals, one generation record per prompt, its own batch)."""
    records = []
    start = time.perf_counter()
    for number, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tokenizer, prompt["messages"])], device=model.device)
        with torch.inference_mode():
            sampling = {"do_sample": False} if greedy else {
                "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        row = out[0, ids.shape[1]:].tolist()
        finished = tokenizer.eos_token_id in row
        records.append({"prompt_tokens": ids.shape[1], "new_tokens": row.index(tokenizer.eos_token_id) if finished
                        else len(row), "finished": finished, "batch": number})
    seconds = time.perf_counter() - start
    new = sum(r["new_tokens"] for r in records)
    return ({"prompts": len(prompts), "prompt_tokens": sum(r["prompt_tokens"] for r in records), "new_tokens": new,
             "seconds": round(seconds, 2), "new_tokens_per_s": round(new / seconds, 1)}, records)


def repeated_naive(model, tokenizer, prompts, settings, max_new_tokens: int, reps: int, shape: ModelShape,
                   bounds: Bounds) -> dict[str, Any]:
    """The naive loop `reps` times: its figures as median and spread, and its share of the bound."""
    runs = [naive_loop(model, tokenizer, prompts, settings, max_new_tokens) for _ in range(reps)]
    first, records = runs[0]
    bound = generation_bound(records, shape, bounds)["seconds"]
    return {"prompts": first["prompts"], "prompt_tokens": first["prompt_tokens"], "new_tokens": first["new_tokens"],
            "seconds": summary([r["seconds"] for r, _ in runs]),
            "new_tokens_per_s": summary([r["new_tokens_per_s"] for r, _ in runs]),
            "share_of_bound": summary([generation_bound(rec, shape, bounds)["seconds"] / r["seconds"]
                                       for r, rec in runs]),
            "bound_new_tokens_per_s": round(first["new_tokens"] / bound, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of the kit's loop")
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--naive", type=int, default=8, help="segments for each naive loop (it is slow)")
    parser.add_argument("--naive-reps", type=int, default=1, help="runs of each naive loop (slow)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="instruction budget (the kit's default)")
    parser.add_argument("--bounds", help="bounds.json written by bounds.py moments before (else measured here)")
    parser.add_argument("--bound-reps", type=int, default=3, help="repetitions of the bounds measured here")
    args = parser.parse_args()

    config, _, segments = demo_inputs()
    config = replace(config, generate=replace(config.generate, instruction_max_new_tokens=args.max_new_tokens))
    segments = segments[: args.segments]
    every = max(1, len(segments) // args.naive)
    naive_segments = segments[::every][: args.naive]

    model, tokenizer = load_model(config.model)
    shape = ModelShape.from_config(model.config)
    measured = bounds_for(shape, args.bounds, args.bound_reps)
    bounds = Bounds.from_json(measured)

    runs = []
    for _ in range(args.reps):
        torch.manual_seed(0)
        start = time.perf_counter()
        records = write_instructions(LocalEngine(model, tokenizer), segments, config.generate,
                                     config.model.context_length)
        runs.append((time.perf_counter() - start, records))
    seconds = [s for s, _ in runs]
    records = runs[0][1]
    new = sum(r["new_tokens"] for r in records)
    bound = generation_bound(records, shape, bounds)
    shares = [generation_bound(rec, shape, bounds)["seconds"] / s for s, rec in runs]
    kit = {"prompts": len(records), "prompt_tokens": bound["prompt_tokens"], "new_tokens": new,
           "finished": sum(r["finished"] for r in records), "same_tokens_every_run": all(
               [r["new_tokens"] for r in rec] == [r["new_tokens"] for r in records] for _, rec in runs),
           "seconds": summary(seconds), "new_tokens_per_s": summary([new / s for s in seconds]),
           "batch_size": config.generate.batch_size, "peak_rss_gib": peak_rss_gib()}

    prompts = backward_prompts(tokenizer, naive_segments, config.model.context_length, args.max_new_tokens)
    same_model = repeated_naive(model, tokenizer, prompts, config.generate, args.max_new_tokens, args.naive_reps,
                                shape, bounds)
    del model
    packed, _ = load_model(replace(config.model, dequantize_on_cpu=False))
    naive = repeated_naive(packed, tokenizer, prompts, config.generate, args.max_new_tokens, args.naive_reps,
                           shape, bounds)

    kit_rate, naive_rate = kit["new_tokens_per_s"]["median"], naive["new_tokens_per_s"]["median"]
    bound_rate = new / bound["seconds"]
    emit({
        "benchmark": "self-augmentation",
        "model": f"{config.model.name} ({config.model.quantization})",
        "kit": kit,
        "bound": {**rounded(bound), "new_tokens_per_s": round(bound_rate, 1)},
        "share_of_bound": summary(shares),
        "naive_loop_4bit": naive,
        "naive_loop_unpacked_weights": same_model,
        "ratio_vs_naive": round(kit_rate / naive_rate, 1),
        "ratio_from_batching_alone": round(kit_rate / same_model["new_tokens_per_s"]["median"], 1),
        "summary": {"loop": "self-augmentation (write_instructions)", "unit": "new tokens/s",
                    "kit": kit["new_tokens_per_s"], "bound": round(bound_rate, 1),
                    "bound_how": "prompts' FLOPs at the model-shape peak + decoding steps at max(bytes/bandwidth, "
                                 "FLOPs/model-shape peak)",
                    "share_of_bound": summary(shares), "naive": naive["new_tokens_per_s"],
                    "naive_name": "model.generate one prompt at a time, 4-bit",
                    "ratio_vs_naive": round(kit_rate / naive_rate, 1),
                    "note": f"{bound['prompt_tokens']} prompt tokens, {new} new tokens; the bound is "
                            f"{bound['prefill_seconds'] / bound['seconds']:.0%} prefill. Against model.generate one "
                            f"prompt at a time on the same unpacked bf16 weights: "
                            f"{kit_rate / same_model['new_tokens_per_s']['median']:.1f}x. The naive loops' share of "
                            f"their own bound: {naive['share_of_bound']['median']:.1%} (4-bit), "
                            f"{same_model['share_of_bound']['median']:.1%} (bf16)."},
        **run_facts(args, measured, goals={"share_of_bound": 0.5, "ratio_vs_naive": 10}),
    })


if __name__ == "__main__":
    main()
