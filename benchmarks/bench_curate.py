"""Self-curation: candidates rated per second, the kit's `logprob` rater against the paper's `generate` rater, and
the kit's share of this machine's bound.

The paper's rater writes a brief reasoning and then "Score: N" (here batched and greedy, as the kit runs
it); the `logprob` rater reads the probabilities of "1".."5" after "Score: " in one forward pass, with the
rubric's keys and values computed once for every batch. Also measured: `logprob` without that reuse (the
slow reference; same scores), and how the two raters agree on the pairs both scored.

The bound of the logprob rater (bounds.rating_bound) is the FLOPs of the tokens it must read, the rubric prefix
once and each pair's tail attending over it, at the model-shape bf16 peak. Every figure is the median of --reps
runs (the slow raters, of --naive-reps runs) with its spread, min-max.

    python benchmarks/bench_curate.py [--reps 5] [--pairs 64] [--generate-pairs 16] [--naive-reps 1] [--bounds FILE]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import demo_inputs, emit, peak_rss_gib, rounded, run_facts, summary
from bench_augment import naive_loop
from bounds import Bounds, ModelShape, bounds_for, rating_bound

from humpback_nb.config import CurateConfig
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_model
from humpback_nb.method.curate import agreement, parse_rate, rate_generate, rate_logprob
from humpback_nb.method.prompts import curation_messages


def timed(function, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def repeated(reps: int, function, *args, **kwargs) -> tuple[Any, list[float]]:
    """(the first run's result, the seconds of every run) of `reps` runs."""
    runs = [timed(function, *args, **kwargs) for _ in range(reps)]
    return runs[0][0], [s for _, s in runs]


def logprob_tokens(tokenizer, pairs: list[dict[str, Any]], settings: CurateConfig,
                   context_length: int) -> tuple[int, list[int]]:
    """(tokens of the rubric prefix, tokens of each pair's tail) as `rate_logprob` reads them."""
    from humpback_nb.method.curate import _PAIR, _output_fitter, _rubric_split, score_tokens

    answer_prefix, _ = score_tokens(tokenizer)
    prefix_ids, tail = _rubric_split(tokenizer, settings, answer_prefix)
    fit = _output_fitter(tokenizer, settings, context_length, reserve=8)
    return len(prefix_ids), [len(tokenizer(tail.replace(_PAIR, f"{p['instruction']}\n{fit(p)}"),
                                           add_special_tokens=False)["input_ids"]) for p in pairs]


def rates(count: int, seconds: list[float], digits: int = 4) -> dict[str, Any]:
    """Pairs per second of each run, as median and spread."""
    return summary([count / s for s in seconds], digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of the kit's logprob rater")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--generate-pairs", type=int, default=16, help="pairs for the generate rater (slow)")
    parser.add_argument("--naive-pairs", type=int, default=4, help="pairs for the one-at-a-time generate loop")
    parser.add_argument("--naive-reps", type=int, default=1, help="runs of each slow rater")
    parser.add_argument("--bounds", help="bounds.json written by bounds.py moments before (else measured here)")
    parser.add_argument("--bound-reps", type=int, default=3, help="repetitions of the bounds measured here")
    args = parser.parse_args()

    config, seed, _ = demo_inputs()
    pairs = [{"id": r["id"], "instruction": r["instruction"], "output": r["output"]} for r in seed[: args.pairs]]
    every = max(1, len(pairs) // args.generate_pairs)
    sample = pairs[::every][: args.generate_pairs]
    model, tokenizer = load_model(config.model)
    settings = (config.curate, config.model.context_length)  # what a rater reads of the config
    shape = ModelShape.from_config(model.config)
    measured = bounds_for(shape, args.bounds, args.bound_reps)
    bounds = Bounds.from_json(measured)
    prefix_tokens, tail_tokens = logprob_tokens(tokenizer, pairs, *settings)
    bound = rating_bound(prefix_tokens, tail_tokens, shape, bounds)

    fast, fast_s = repeated(args.reps, rate_logprob, LocalEngine(model, tokenizer), pairs, *settings, progress=False)
    kit_rss = peak_rss_gib()
    whole, whole_s = repeated(args.naive_reps, rate_logprob, LocalEngine(model, tokenizer, shared_prefix=False), sample,
                              *settings, progress=False)
    paper, paper_s = repeated(args.naive_reps, rate_generate, LocalEngine(model, tokenizer), sample, *settings)
    naive_prompts = [{"messages": curation_messages(p["instruction"], p["output"], config.curate.rater_tag)}
                     for p in sample[: args.naive_pairs]]
    naive_s = [naive_loop(model, tokenizer, naive_prompts, config.generate, config.curate.max_new_tokens,
                          greedy=True)[0]["seconds"] for _ in range(args.naive_reps)]
    by_id = {s["id"]: s for s in fast}
    same = max(abs(by_id[s["id"]]["score"] - s["score"]) for s in whole)

    kit = rates(len(pairs), fast_s)
    paper_rate = rates(len(sample), paper_s)
    shares = summary([bound["seconds"] / s for s in fast_s])
    bound_rate = len(pairs) / bound["seconds"]
    ratio = round(kit["median"] / paper_rate["median"], 1)
    one_at_a_time = round(kit["median"] / rates(len(naive_prompts), naive_s)["median"], 1)
    emit({
        "benchmark": "self-curation",
        "model": f"{config.model.name} ({config.model.quantization})",
        "kit_logprob": {"pairs": len(pairs), "seconds": summary(fast_s), "pairs_per_s": kit,
                        "batch_size": config.curate.batch_size, "peak_rss_gib": kit_rss},
        "bound": {**rounded(bound), "pairs_per_s": round(bound_rate, 2),
                  "tokens_read_per_pair": round(bound["tokens_read"] / len(pairs))},
        "share_of_bound": shares,
        "logprob_without_rubric_reuse": {"pairs": len(sample), "seconds": summary(whole_s),
                                         "pairs_per_s": rates(len(sample), whole_s),
                                         "max_score_difference": round(same, 4)},
        "paper_generate": {"pairs": len(sample), "seconds": summary(paper_s), "pairs_per_s": paper_rate,
                           "parse_rate": parse_rate(paper), "max_new_tokens": config.curate.max_new_tokens},
        "paper_generate_one_at_a_time": {"pairs": len(naive_prompts), "seconds": summary(naive_s),
                                         "pairs_per_s": rates(len(naive_prompts), naive_s)},
        "ratio_vs_generate": ratio,
        "ratio_vs_generate_one_at_a_time": one_at_a_time,
        "agreement_with_generate": agreement([by_id[s["id"]] for s in sample], paper),
        "summary": {"loop": "self-curation (rate_logprob)", "unit": "pairs/s", "kit": kit,
                    "bound": round(bound_rate, 2),
                    "bound_how": "FLOPs of the rubric prefix once + each pair's tail over it, at the model-shape peak",
                    "share_of_bound": shares, "naive": paper_rate,
                    "naive_name": "the paper's generate rater, batched, greedy", "ratio_vs_naive": ratio,
                    "note": f"{bound['tokens_read']} tokens read ({bound['prefix_tokens']} of rubric prefix once, "
                            f"{round(bound['tail_tokens'] / len(pairs))} per pair). Against the paper's rater one pair "
                            f"at a time: {one_at_a_time}x."},
        **run_facts(args, measured, goals={"share_of_bound": 0.7, "ratio_vs_generate": 20}),
    })


if __name__ == "__main__":
    main()
