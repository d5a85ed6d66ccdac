"""Evaluation (paper section 4): answers to held-out prompts, pairwise judging in both orders, win rates.

The paper reports AlpacaEval win rates against text-davinci-003 with a GPT-4 judge. The kit keeps the
parts that make such numbers meaningful at any scale: the same 805 AlpacaEval prompts (and MT-bench first
turns), answers saved in AlpacaEval's model-outputs format so that `alpaca_eval` can judge them as they
are, every pair judged twice with the answers swapped (judges favour a position), ties counted as half a
win, and a standard error on every win rate.

Judges: `LocalJudge`, any model the kit loads (the embedded one by default), which reads the
probabilities of "A" and "B" after the judging prompt; and `EndpointJudge`, any OpenAI-compatible chat
endpoint (a GPT-4 judge as in the paper, or a local server), with the key taken from the environment.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from humpback_nb.config import HumpbackConfig
from humpback_nb.infra.files import read_jsonl
from humpback_nb.infra.sources import fetch

# A pairwise judging prompt in the manner of AlpacaEval's annotators (ours; AlpacaEval's GPT-4 template is
# longer and asks for a ranking). The judge must answer with one letter.
JUDGE_PROMPT = """You are a fair judge of AI assistants. Here is an instruction and two responses to it.

Instruction:
{instruction}

Response A:
{a}

Response B:
{b}

Which response follows the instruction better: it is helpful, correct, relevant and well written? Answer with one letter, A or B."""  # noqa: E501
ANSWER_PREFIX = "Better response:"


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


def eval_prompts(config: HumpbackConfig) -> list[dict[str, Any]]:
    """The preset's evaluation prompts: AlpacaEval, then MT-bench first turns."""
    settings = config.evaluate
    return (alpaca_eval_prompts(settings.alpaca_eval_prompts, settings.random_seed)
            + mt_bench_prompts(settings.mt_bench_prompts, settings.random_seed))


# -- answers -------------------------------------------------------------------------------------
def answer(model, tokenizer, prompts: list[dict[str, Any]], config: HumpbackConfig, generator: str,
           tags: str | None = None, partial=None) -> list[dict[str, Any]]:
    """Answers in AlpacaEval's model-outputs format: instruction, output, generator, dataset (and our id)."""
    from humpback_nb.infra.generate import generate_records
    from humpback_nb.method.prompts import forward_messages

    tag = tags or config.evaluate.inference_tags
    requests = [{"id": p["id"], "messages": forward_messages(p["instruction"], tag)} for p in prompts]
    generated = generate_records(model, tokenizer, requests, config.generate, config.generate.max_new_tokens,
                                 partial=partial, desc=f"answers ({generator})")
    return [{"instruction": p["instruction"], "output": g["text"].strip(), "generator": generator,
             "dataset": p["dataset"], "id": p["id"]} for p, g in zip(prompts, generated, strict=True)]


ALPACA_EVAL_FIELDS = ("instruction", "output", "generator", "dataset")


def write_model_outputs(path, answers: list[dict[str, Any]]):
    """Save answers as AlpacaEval's model-outputs JSON (a list of {instruction, output, generator, dataset}),
    ready for `alpaca_eval --model_outputs PATH`."""
    from humpback_nb.infra.files import atomic_write_json

    return atomic_write_json(path, [{key: a[key] for key in ALPACA_EVAL_FIELDS} for a in answers])


# -- judges --------------------------------------------------------------------------------------
class LocalJudge:
    """A judge from a local model: P("A") against P("B") after the judging prompt."""

    def __init__(self, model, tokenizer, max_chars: int = 2000):
        self.model, self.tokenizer, self.max_chars = model, tokenizer, max_chars
        self.letters = [self._letter_id(letter) for letter in ("A", "B")]

    def _letter_id(self, letter: str) -> int:
        base = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(f"{ANSWER_PREFIX} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"no single token for ' {letter}' after {ANSWER_PREFIX!r}")
        return full[-1]

    def prefer_a(self, instruction: str, a: str, b: str) -> float:
        """Probability that response A is the better one (the two letters renormalised)."""
        from humpback_nb.method.prompts import prompt_ids

        text = JUDGE_PROMPT.format(instruction=instruction, a=a[: self.max_chars], b=b[: self.max_chars])
        ids = prompt_ids(self.tokenizer, [{"role": "user", "content": text}])
        ids += self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, -1].float()
        pair = torch.softmax(logits[self.letters], dim=-1)
        return float(pair[0])


@dataclass
class EndpointJudge:
    """A judge behind an OpenAI-compatible chat endpoint (`{base_url}/chat/completions`)."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0

    def prefer_a(self, instruction: str, a: str, b: str) -> float:
        """1.0 if the endpoint answers A, 0.0 for B, 0.5 when its reply names neither (counted as a tie)."""
        body = {"model": self.model, "temperature": 0, "max_tokens": 4,
                "messages": [{"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, a=a, b=b)}]}
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {os.environ.get(self.api_key_env, '')}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except (OSError, KeyError, IndexError, json.JSONDecodeError) as err:  # URLError and timeouts are OSErrors
            raise RuntimeError(f"judge endpoint {self.base_url} ({self.model}) failed: {err}") from None
        letter = reply.strip().lstrip("(*[ ").upper()[:1]
        return {"A": 1.0, "B": 0.0}.get(letter, 0.5)


Judge = Callable[[str, str, str], float]


def judge_both_orders(prefer_a: Judge, instruction: str, x: str, y: str) -> dict[str, Any]:
    """Judge x against y twice, x shown first and then second. The outcome is x's preference averaged over
    the two orders: 1 if x wins both, 0 if it loses both, 0.5 when the orders disagree (a judge that always
    picks the first answer ties everything). With a judge that gives probabilities, the average is AlpacaEval
    2.0's "weighted" preference; with one that names a letter it is 0, 0.25, 0.5, 0.75 or 1."""
    first = prefer_a(instruction, x, y)  # x is A
    second = 1.0 - prefer_a(instruction, y, x)  # x is B
    return {"x_as_a": round(first, 4), "x_as_b": round(second, 4), "outcome": round((first + second) / 2, 4)}


def win_rate(outcomes: Sequence[float]) -> dict[str, Any]:
    """Win rate in percent (the mean outcome: ties count half) and its standard error across prompts; wins, ties
    and losses count the prompts whose outcome is above, at, or below one half."""
    n = len(outcomes)
    if n == 0:
        return {"n": 0, "win_rate": None, "se": None, "wins": 0, "ties": 0, "losses": 0}
    mean = statistics.fmean(outcomes)
    se = round(100 * statistics.stdev(outcomes) / math.sqrt(n), 2) if n > 1 else None  # None: one prompt
    return {"n": n, "win_rate": round(100 * mean, 2), "se": se,
            "wins": sum(o > 0.5 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o < 0.5 for o in outcomes)}


def compare(prefer_a: Judge, answers_x: list[dict[str, Any]], answers_y: list[dict[str, Any]]) -> dict[str, Any]:
    """Win rate of x against y, overall and per dataset, with every judgment."""
    from humpback_nb.infra.distributed import shared_map

    by_id = {a["id"]: a for a in answers_y}

    def judge(ax: dict[str, Any]) -> dict[str, Any]:
        return {"id": ax["id"], "dataset": ax["dataset"],
                **judge_both_orders(prefer_a, ax["instruction"], ax["output"], by_id[ax["id"]]["output"])}

    judgments = shared_map(judge, answers_x)  # in a launch of several processes, each judges its share
    datasets = sorted({j["dataset"] for j in judgments})
    return {
        "x": answers_x[0]["generator"] if answers_x else None,
        "y": answers_y[0]["generator"] if answers_y else None,
        "overall": win_rate([j["outcome"] for j in judgments]),
        "per_dataset": {d: win_rate([j["outcome"] for j in judgments if j["dataset"] == d]) for d in datasets},
        "judgments": judgments,
    }


# -- the paper's analyses ------------------------------------------------------------------------
def fit_alpha(ns: Sequence[float], win_rates: Sequence[float]) -> tuple[float, float]:
    """(alpha, C) of the least-squares fit w = alpha * log N + C (paper Table 3; natural log)."""
    if len(ns) < 2:
        raise ValueError("the fit needs at least two data sizes")
    xs = [math.log(n) for n in ns]
    mean_x, mean_w = statistics.fmean(xs), statistics.fmean(win_rates)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    alpha = sum((x - mean_x) * (w - mean_w) for x, w in zip(xs, win_rates, strict=True)) / sxx
    return alpha, mean_w - alpha * mean_x


def precision_recall(selected: set[str], positives: set[str]) -> dict[str, float]:
    """Precision and recall of a selection against the labelled positives (paper Table 7)."""
    hit = len(selected & positives)
    return {"precision": hit / len(selected) if selected else None,
            "recall": hit / len(positives) if positives else None,
            "selected": len(selected), "positives": len(positives)}


# -- the stage -----------------------------------------------------------------------------------
GENERATORS = ("base", "m0", "m1", "m2")
COMPARISONS = (("m2", "m0"), ("m1", "m0"), ("m0", "base"), ("m2", "base"))


def make_judge(config: HumpbackConfig, base_model=None, tokenizer=None) -> Judge:
    """The config's judge: the local base model, or an OpenAI-compatible endpoint when `judge_url` is set."""
    settings = config.evaluate
    if settings.judge_url:
        return EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env).prefer_a
    return LocalJudge(base_model, tokenizer).prefer_a


def load_generator(config: HumpbackConfig, run_dir, name: str):
    """(model, tokenizer) of `name`: the base model, or a model the run trained (m0, m1, m2, ...)."""
    from humpback_nb.infra.models import load_model
    from humpback_nb.method.train import load_trained

    return load_model(config.model) if name == "base" else load_trained(config, run_dir / name)


def eval_stage(ctx) -> dict[str, Any]:
    """eval/: answers of the base model, M0, M1 and M2 (AlpacaEval format) and their win rates."""
    from humpback_nb.infra.files import atomic_dir, atomic_write_json, write_jsonl

    config = ctx.config
    prompts = eval_prompts(config)
    answers = {}
    for name in GENERATORS:
        model, tokenizer = load_generator(config, ctx.run_dir, name)
        answers[name] = answer(model, tokenizer, prompts, config, generator=f"humpback-nb-{name}",
                               partial=ctx.partial(f"eval.answers_{name}"))
        if name == "base":
            judge = make_judge(config, model, tokenizer)  # the local judge is the base model: load it once
        del model
    results = {f"{x}_vs_{y}": compare(judge, answers[x], answers[y]) for x, y in COMPARISONS}
    with atomic_dir(ctx.path("eval")) as tmp:
        for name, rows in answers.items():
            # AlpacaEval's file holds its own prompts only; every answer, with its prompt id, is in the JSONL
            write_model_outputs(tmp / f"model_outputs_{name}.json",
                                [r for r in rows if r["id"].startswith("alpaca_eval-")])
            write_jsonl(tmp / f"answers_{name}.jsonl", rows)
        for key, result in results.items():
            write_jsonl(tmp / f"judgments_{key}.jsonl", result.pop("judgments"))
        atomic_write_json(tmp / "win_rates.json", {"judge": config.evaluate.judge_url or "local:base",
                                                   "inference_tags": config.evaluate.inference_tags,
                                                   "prompts": len(prompts), **results})
    return {key: result["overall"] for key, result in results.items()}


def summary(run_dir, config: HumpbackConfig) -> dict[str, Any]:
    """Every number of a run in one place: sizes, stage times and reports, Table 2, win rates, the config."""
    from pathlib import Path

    import yaml

    from humpback_nb.method.data.stats import table2

    run_dir = Path(run_dir)
    stages = {}
    for manifest in sorted((run_dir / "stages").glob("*.yaml")):
        data = yaml.safe_load(manifest.read_text())
        stages[data["stage"]] = {"seconds": data["seconds"], "report": data.get("report")}
    seed = [r for r in read_jsonl(run_dir / "seed.jsonl") if r["split"] == "train"]
    candidates = read_jsonl(run_dir / "candidates.jsonl")
    sets = {"seed": seed, "candidates": candidates, "A1": read_jsonl(run_dir / "A1.jsonl"),
            "A2": read_jsonl(run_dir / "A2.jsonl")}
    win_rates = json.loads((run_dir / "eval" / "win_rates.json").read_text())
    analyses = {name: json.loads((run_dir / path).read_text()) for name, path in
                (("table8_tags", "tags/win_rates.json"), ("table7_selection", "selection.json"),
                 ("figure3_scaling", "scaling/results.json")) if (run_dir / path).is_file()}
    return {
        "preset": config.preset,
        "config_hash": config.hash(),
        "sizes": {name: len(records) for name, records in sets.items()} | {
            "segments": len(read_jsonl(run_dir / "segments.jsonl"))},
        "table2": table2(sets, paper_rows={"candidates": "augmented, all", "A2": "A5^(2)"}),
        "win_rates": {key: {"overall": value["overall"], "per_dataset": value["per_dataset"]}
                      for key, value in win_rates.items() if isinstance(value, dict) and "overall" in value},
        "judge": win_rates.get("judge"),
        **analyses,
        "stage_seconds": {name: info["seconds"] for name, info in stages.items()},
        "pipeline_seconds": round(sum(info["seconds"] for info in stages.values()), 1),
        "stage_reports": {name: info["report"] for name, info in stages.items() if info["report"]},
        "config": config.to_dict(),
    }


def summary_stage(ctx) -> dict[str, Any]:
    """summary.json: every number of the run (what notebook 07 and the README's figures read)."""
    from humpback_nb.infra.files import atomic_write_json

    result = summary(ctx.run_dir, ctx.config)
    atomic_write_json(ctx.path("summary.json"), result)
    return {"pipeline_seconds": result["pipeline_seconds"]}


def win_rate_table(rows: dict[str, dict[str, Any]], paper: dict[str, float] | None = None) -> str:
    """Win rates as a Markdown table (label, win rate, standard error, wins/ties/losses, n[, paper])."""
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    head = "| | win rate % | ± se | wins | ties | losses | n |" + (" paper % |" if paper else "")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if paper else "")]
    for label, r in rows.items():
        line = (f"| {label} | {number(r['win_rate'])} | {number(r['se'])} | {r['wins']} | {r['ties']} | {r['losses']} "
                f"| {r['n']} |")
        lines.append(line + (f" {paper.get(label, '-')} |" if paper else ""))
    return "\n".join(lines)
