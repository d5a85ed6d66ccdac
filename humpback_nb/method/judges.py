"""Judges: which of two answers to one instruction is better, asked in both orders (judges favour a position).

`LocalJudge`, any model the kit loads (the base model by default), reads the probabilities of "A" and "B"
after the judging prompt; `EndpointJudge`, any OpenAI-compatible chat endpoint (a GPT-4 judge as in the
paper, or a local server), with the key taken from the environment. Replies are parsed, never run.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from humpback_nb.config import EvaluateConfig

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


def make_judge(settings: EvaluateConfig, base_model=None, tokenizer=None) -> Judge:
    """The judge of `settings`: the local base model, or an OpenAI-compatible endpoint when `judge_url` is set."""
    if settings.judge_url:
        return EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env).prefer_a
    return LocalJudge(base_model, tokenizer).prefer_a


def judge_name(settings: EvaluateConfig) -> str:
    """How results name the judge of `settings`."""
    return f"{settings.judge} at {settings.judge_url}" if settings.judge_url else "local:base"
