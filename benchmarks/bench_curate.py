"""Self-curation: candidates rated per second, the kit's `logprob` rater against the paper's `generate` rater.

The paper's rater writes a brief reasoning and then "Score: N" (here batched and greedy, as the kit runs
it); the `logprob` rater reads the probabilities of "1".."5" after "Score: " in one forward pass, with the
rubric's keys and values computed once for every batch. Also measured: `logprob` without that reuse (the
slow reference; same scores), and how the two raters agree on the pairs both scored.

    python benchmarks/bench_curate.py [--pairs 64] [--generate-pairs 16]
"""

from __future__ import annotations

import argparse
import time

from _common import demo_inputs, emit, machine, peak_rss_gib
from bench_augment import naive_loop

from humpback_nb.infra.models import load_model
from humpback_nb.method.curate import agreement, parse_rate, rate_generate, rate_logprob
from humpback_nb.method.prompts import curation_messages


def timed(function, *args, **kwargs) -> tuple[list, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--generate-pairs", type=int, default=16, help="pairs for the generate rater (slow)")
    parser.add_argument("--naive-pairs", type=int, default=4, help="pairs for the one-at-a-time generate loop")
    args = parser.parse_args()

    config, seed, _ = demo_inputs()
    pairs = [{"id": r["id"], "instruction": r["instruction"], "output": r["output"]} for r in seed[: args.pairs]]
    every = max(1, len(pairs) // args.generate_pairs)
    sample = pairs[::every][: args.generate_pairs]
    model, tokenizer = load_model(config.model)
    settings = (config.curate, config.model.context_length)  # what a rater reads of the config

    fast, fast_s = timed(rate_logprob, model, tokenizer, pairs, *settings, progress=False)
    kit_rss = peak_rss_gib()
    whole, whole_s = timed(rate_logprob, model, tokenizer, sample, *settings, reuse_prefix=False, progress=False)
    paper, paper_s = timed(rate_generate, model, tokenizer, sample, *settings)
    naive = naive_loop(model, tokenizer, [{"messages": curation_messages(p["instruction"], p["output"],
                                                                          config.curate.rater_tag)}
                                          for p in sample[: args.naive_pairs]],
                       config.generate, config.curate.max_new_tokens, greedy=True)
    by_id = {s["id"]: s for s in fast}
    same = max(abs(by_id[s["id"]]["score"] - s["score"]) for s in whole)
    kit_rate = len(pairs) / fast_s
    emit({
        "benchmark": "self-curation",
        "model": f"{config.model.name} ({config.model.quantization})",
        "kit_logprob": {"pairs": len(pairs), "seconds": round(fast_s, 2), "pairs_per_s": round(kit_rate, 2),
                        "batch_size": config.curate.batch_size, "peak_rss_gib": kit_rss},
        "logprob_without_rubric_reuse": {"pairs": len(sample), "seconds": round(whole_s, 2),
                                         "pairs_per_s": round(len(sample) / whole_s, 2),
                                         "max_score_difference": round(same, 4)},
        "paper_generate": {"pairs": len(sample), "seconds": round(paper_s, 2),
                           "pairs_per_s": round(len(sample) / paper_s, 3), "parse_rate": parse_rate(paper),
                           "max_new_tokens": config.curate.max_new_tokens},
        "paper_generate_one_at_a_time": {"pairs": naive["prompts"], "seconds": naive["seconds"],
                                         "pairs_per_s": round(naive["prompts"] / naive["seconds"], 3)},
        "ratio_vs_generate": round(kit_rate / (len(sample) / paper_s), 1),
        "ratio_vs_generate_one_at_a_time": round(kit_rate / (naive["prompts"] / naive["seconds"]), 1),
        "agreement_with_generate": agreement([by_id[s["id"]] for s in sample], paper),
        "goals": {"ratio_vs_generate": 20},
        "peak_rss_gib": peak_rss_gib(),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
