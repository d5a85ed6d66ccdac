"""Evaluation (paper section 4): the evaluation prompts and each model's answers, in AlpacaEval's format.

The paper reports AlpacaEval win rates against text-davinci-003 with a GPT-4 judge. The kit keeps the parts
that make such numbers meaningful at any scale: the same 805 AlpacaEval prompts (and MT-bench first turns),
answers saved in AlpacaEval's model-outputs format so that `alpaca_eval` can judge them as they are. Judging
is in judges.py, win rates and their standard errors in winrates.py.
"""

from __future__ import annotations

import json
import random
from typing import Any

from humpback_nb.config import EvaluateConfig, GenerateConfig
from humpback_nb.infra.files import read_jsonl
from humpback_nb.infra.sources import fetch


# -- evaluation prompts --------------------------------------------------------------------------
def alpaca_eval_prompts(n: int, seed: int = 42) -> list[dict[str, Any]]:
    """n of the 805 AlpacaEval prompts (all of them for n >= 805), sampled with `seed`, in file order."""
    rows = json.loads(fetch("alpaca_eval_prompts").read_text(encoding="utf-8"))
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [{"id": f"alpaca_eval-{i}", "instruction": rows[i]["instruction"], "dataset": rows[i]["dataset"]}
            for i in chosen]


def mt_bench_prompts(n: int, seed: int = 42) -> list[dict[str, Any]]:
    """n first turns of the 80 MT-bench questions, sampled with `seed`; `dataset` is mt_bench/<category>."""
    rows = read_jsonl(fetch("mt_bench_questions"))
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [{"id": f"mt_bench-{rows[i]['question_id']}", "instruction": rows[i]["turns"][0],
             "dataset": f"mt_bench/{rows[i]['category']}"} for i in chosen]


def eval_prompts(settings: EvaluateConfig) -> list[dict[str, Any]]:
    """The evaluation prompts of `settings`: AlpacaEval, then MT-bench first turns."""
    return (alpaca_eval_prompts(settings.alpaca_eval_prompts, settings.random_seed)
            + mt_bench_prompts(settings.mt_bench_prompts, settings.random_seed))


# -- answers -------------------------------------------------------------------------------------
def answer(engine, prompts: list[dict[str, Any]], settings: GenerateConfig, generator: str, tags: str,
           partial=None) -> list[dict[str, Any]]:
    """Answers in AlpacaEval's model-outputs format: instruction, output, generator, dataset (and our id, and
    `finished`: false where generate.max_new_tokens cut the answer off); `tags` is the system prompt at inference
    (a key of prompts.TAGS; the paper's best is "S_a+S_w"); `engine` runs the model that answers."""
    from humpback_nb.method.prompts import forward_messages

    requests = [{"id": p["id"], "messages": forward_messages(p["instruction"], tags)} for p in prompts]
    generated = engine.generate(requests, settings, settings.max_new_tokens, partial=partial,
                                desc=f"answers ({generator})")
    return [{"instruction": p["instruction"], "output": g["text"].strip(), "generator": generator,
             "dataset": p["dataset"], "id": p["id"], "finished": g["finished"]}
            for p, g in zip(prompts, generated, strict=True)]


ALPACA_EVAL_FIELDS = ("instruction", "output", "generator", "dataset")


def write_model_outputs(path, answers: list[dict[str, Any]]):
    """Save answers as AlpacaEval's model-outputs JSON (a list of {instruction, output, generator, dataset}),
    ready for `alpaca_eval --model_outputs PATH`."""
    from humpback_nb.infra.files import atomic_write_json

    return atomic_write_json(path, [{key: a[key] for key in ALPACA_EVAL_FIELDS} for a in answers])
