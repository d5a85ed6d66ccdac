"""Compute of each stage at the paper's scale (502k segments; LLaMA-2 7B and 65B), as arithmetic from token counts.

Token counts: the paper's mean lengths in characters (Table 2) divided by the characters per token that the
embedded model's tokenizer gives on English text (measured here on the seed data); the prompt overheads (the
backward prompt, the rating rubric) are measured by tokenizing the kit's own prompts. FLOPs per token: the
formula of `train.training_flops` (checked against torch's FLOP counter in the tests), forward only for
generation and rating. GPU hours: FLOPs over an H100's dense bf16 peak at two utilizations, a low one for
generation (decoding one token per step reads every weight for little arithmetic) and a high one for prompt
reading and training. Prints one JSON object with every input, so the README's table can be checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's figure for the SXM part without sparsity
UTILIZATION = {"generation": 0.10, "prompts_and_training": 0.40}
SEGMENTS = 502_133
PAPER_CHARS = {  # Table 2, mean characters
    "augmented": {"instruction": 352, "output": 1722},
    "seed": {"instruction": 148, "output": 1072},
    "A5": {"instruction": 115, "output": 1663},
}
A5_PAIRS = 41_821
SEED_PAIRS = 3_200
MODELS = {  # LLaMA-2 7B and LLaMA 65B (the paper's two sizes)
    "7B": {"hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000},
    "65B": {"hidden": 8192, "layers": 80, "intermediate": 22016, "heads": 64, "kv_heads": 64, "vocab": 32000},
}
RATING_NEW_TOKENS = 256  # paper-7b's curate.max_new_tokens: reasoning, then "Score: N" (an upper bound)


def layer_weights(m: dict) -> int:
    d = m["hidden"]
    return 2 * d * d + 2 * d * d * m["kv_heads"] // m["heads"] + 3 * d * m["intermediate"]


def forward_flops(m: dict, tokens: float, context: float, head_tokens: float) -> float:
    """Forward FLOPs for `tokens` tokens that each attend over `context` positions, with the vocabulary head
    computed for `head_tokens` of them (as train.training_flops counts, forward only)."""
    weights = 2 * m["layers"] * layer_weights(m) * tokens
    attention = 4 * m["layers"] * m["hidden"] * context * tokens
    return weights + attention + 2 * m["vocab"] * m["hidden"] * head_tokens


def lora_training_flops(m: dict, examples: float, length: float, learned: float) -> float:
    """train.training_flops for LoRA (frozen weights: forward and input gradient only), LoRA's own weights aside."""
    per_example = (4 * m["layers"] * layer_weights(m) * length + 12 * m["layers"] * m["hidden"] * length * length
                   + 4 * m["vocab"] * m["hidden"] * learned)
    return examples * per_example


def main() -> None:
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.infra.sources import fetch
    from humpback_nb.method.prompts import backward_messages, curation_messages, forward_messages, prompt_ids

    tokenizer = load_tokenizer("smollm2-135m")
    sample = [r["output"] for r in json.loads(fetch("alpaca_en_demo").read_text()) if r["output"]][:500]
    chars_per_token = sum(map(len, sample)) / sum(len(tokenizer(t)["input_ids"]) for t in sample)

    def tokens(chars: float) -> float:
        return chars / chars_per_token

    backward_overhead = len(prompt_ids(tokenizer, backward_messages("")))
    rubric = len(prompt_ids(tokenizer, curation_messages("", "", "S_a")))
    forward_overhead = len(prompt_ids(tokenizer, forward_messages("", "S_a")))
    aug = {k: tokens(v) for k, v in PAPER_CHARS["augmented"].items()}

    stages = {}
    for size, m in MODELS.items():
        # self-augmentation: read backward prompt + segment, write the instruction
        prompt = backward_overhead + aug["output"]
        augment_prefill = forward_flops(m, SEGMENTS * prompt, prompt, SEGMENTS)
        augment_decode = forward_flops(m, SEGMENTS * aug["instruction"], prompt + aug["instruction"] / 2,
                                       SEGMENTS * aug["instruction"])
        # rating (twice: M0, then M1): read rubric + pair, write reasoning and score (paper's rater)
        rate_prompt = rubric + aug["instruction"] + aug["output"]
        rate_prefill = 2 * forward_flops(m, SEGMENTS * rate_prompt, rate_prompt, SEGMENTS)
        rate_decode = 2 * forward_flops(m, SEGMENTS * RATING_NEW_TOKENS, rate_prompt + RATING_NEW_TOKENS / 2,
                                        SEGMENTS * RATING_NEW_TOKENS)
        # the kit's logprob rater: one forward pass per pair, the rubric read once
        rate_logprob = 2 * forward_flops(m, SEGMENTS * (aug["instruction"] + aug["output"]), rate_prompt, SEGMENTS)
        # training M2 on seed + A5, one epoch (paper: 51,200 examples -> 1,600 steps of 32)
        a5 = {k: tokens(v) for k, v in PAPER_CHARS["A5"].items()}
        length = forward_overhead + a5["instruction"] + a5["output"]
        train = lora_training_flops(m, SEED_PAIRS + A5_PAIRS, length, a5["output"])
        rows = {
            "self-augmentation (M_yx writes 502k instructions)": (augment_prefill, augment_decode),
            "rating, paper's rater (M0 and M1, 502k pairs each)": (rate_prefill, rate_decode),
            "rating, kit's logprob rater (M0 and M1)": (rate_logprob, 0.0),
            "training M2 with LoRA (seed + A5, one epoch)": (train, 0.0),
        }
        stages[size] = {
            name: {"prompt_and_training_flops": p, "generation_flops": g,
                   "h100_hours": round((p / (H100_BF16_DENSE * UTILIZATION["prompts_and_training"])
                                        + g / (H100_BF16_DENSE * UTILIZATION["generation"])) / 3600, 1)}
            for name, (p, g) in rows.items()
        }
    print(json.dumps({
        "benchmark": "compute at the paper's scale (arithmetic, not a measurement of a GPU)",
        "inputs": {"segments": SEGMENTS, "chars_per_token": round(chars_per_token, 3),
                   "tokens": {"backward_prompt_overhead": backward_overhead, "rubric": rubric,
                              "forward_prompt_overhead": forward_overhead,
                              "augmented_instruction": round(aug["instruction"], 1),
                              "augmented_output": round(aug["output"], 1)},
                   "rating_new_tokens": RATING_NEW_TOKENS, "h100_bf16_dense_flops": H100_BF16_DENSE,
                   "utilization": UTILIZATION, "models": MODELS},
        "stages": stages,
    }, indent=2))


if __name__ == "__main__":
    main()
