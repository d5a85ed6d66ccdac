"""Self-augmentation: new tokens per second writing instructions for web segments.

The kit's path (`augment.write_instructions`: length-sorted batches, rows leaving the batch when they
finish, nucleus sampling that sorts only the likely tokens, 4-bit weights unpacked once on a CPU) against
the naive loop that public reimplementations run: `model.generate` on one prompt at a time, with the
model loaded in 4-bit the usual way. Same segments, same prompt, same sampling settings, same model.

    python benchmarks/bench_augment.py [--segments 64] [--naive 8] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from _common import demo_inputs, emit, machine, peak_rss_gib

from humpback_nb.infra.models import load_model
from humpback_nb.method.augment import backward_prompts, write_instructions
from humpback_nb.method.prompts import prompt_ids


def naive_loop(model, tokenizer, prompts, settings, max_new_tokens: int, greedy: bool = False) -> dict:
    new = prompt_tokens = 0
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt["messages"])], device=model.device)
        with torch.inference_mode():
            sampling = {"do_sample": False} if greedy else {
                "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        row = out[0, ids.shape[1]:].tolist()
        new += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        prompt_tokens += ids.shape[1]
    seconds = time.perf_counter() - start
    return {"prompts": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens": new, "seconds": round(seconds, 2),
            "new_tokens_per_s": round(new / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--naive", type=int, default=8, help="segments for each naive loop (it is slow)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="instruction budget (the kit's default)")
    args = parser.parse_args()

    config, _, segments = demo_inputs()
    config = replace(config, generate=replace(config.generate, instruction_max_new_tokens=args.max_new_tokens))
    segments = segments[: args.segments]
    every = max(1, len(segments) // args.naive)
    naive_segments = segments[::every][: args.naive]

    model, tokenizer = load_model(config.model)
    torch.manual_seed(0)
    start = time.perf_counter()
    records = write_instructions(model, tokenizer, segments, config.generate, config.model.context_length)
    seconds = time.perf_counter() - start
    new = sum(r["new_tokens"] for r in records)
    kit = {"prompts": len(records), "prompt_tokens": sum(r["prompt_tokens"] for r in records), "new_tokens": new,
           "finished": sum(r["finished"] for r in records), "seconds": round(seconds, 2),
           "new_tokens_per_s": round(new / seconds, 1), "batch_size": config.generate.batch_size,
           "peak_rss_gib": peak_rss_gib()}
    prompts = backward_prompts(tokenizer, naive_segments, config.model.context_length, args.max_new_tokens)
    same_model = naive_loop(model, tokenizer, prompts, config.generate, args.max_new_tokens)
    del model
    packed, _ = load_model(replace(config.model, dequantize_on_cpu=False))
    naive = naive_loop(packed, tokenizer, prompts, config.generate, args.max_new_tokens)
    emit({
        "benchmark": "self-augmentation",
        "model": f"{config.model.name} ({config.model.quantization})",
        "kit": kit,
        "naive_loop_4bit": naive,
        "naive_loop_unpacked_weights": same_model,
        "ratio_vs_naive": round(kit["new_tokens_per_s"] / naive["new_tokens_per_s"], 1),
        "ratio_from_batching_alone": round(kit["new_tokens_per_s"] / same_model["new_tokens_per_s"], 1),
        "goals": {"ratio_vs_naive": 10, "new_tokens_per_s": 1000},
        "peak_rss_gib": peak_rss_gib(),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
