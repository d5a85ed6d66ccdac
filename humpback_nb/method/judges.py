"""Judges: which of two answers to one instruction is better, asked in both orders (judges favour a position).

`LocalJudge`, any model the kit loads (the base model by default), reads the probabilities of "A" and "B"
after the judging prompt; `EndpointJudge`, any OpenAI-compatible chat endpoint (a GPT-4 judge as in the
paper, or a local server), with the key taken from the environment. An endpoint's reply must name exactly one
of A and B (`parse_choice`); any other reply is kept as text and left out of the win rates, never read as a
preference. Replies are parsed, never run.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from humpback_nb.config import EvaluateConfig
from humpback_nb.infra.guard import JudgeError
from humpback_nb.infra.http import Retry, one_line, post_json, retry_after  # noqa: F401  (retry_after: tests)

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

# One capital letter, in the wrappings a chat model writes around it: "A", "(A)", "**B**", "A.", "Response A",
# "Better response: B". "Both", "Neither", "A or B" and an empty reply name no single letter.
_CHOICE = re.compile(r"[\W_]*(?:(?i:(?:the\s+)?(?:better\s+)?(?:response|answer))\s*:?)?[\W_]*([AB])[\W_]*")


class UnparsedReply(Exception):
    """A judge's reply that names neither A nor B, or both; `reply` is its text."""

    def __init__(self, reply: str):
        super().__init__(f"the judge's reply names neither A nor B alone: {reply!r}")
        self.reply = reply


def parse_choice(reply: str) -> str | None:
    """"A" or "B" when the reply names exactly one of them, else None."""
    match = _CHOICE.fullmatch(reply)
    return match.group(1) if match else None


# -- judges --------------------------------------------------------------------------------------
class LocalJudge:
    """A judge from a model the kit runs: P("A") against P("B") after the judging prompt (always a preference).

    Called as `judge(instruction, a, b)` like any judge; `prefer_a_batch` reads many prompts through the engine
    (infra/engines.py: the kit's loops or vLLM), which `winrates.compare` uses."""

    def __init__(self, engine, max_chars: int = 2000, batch_size: int = 8):
        self.engine, self.tokenizer, self.max_chars, self.batch_size = engine, engine.tokenizer, max_chars, batch_size
        self.letters = [self._letter_id(letter) for letter in ("A", "B")]

    def _letter_id(self, letter: str) -> int:
        base = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(f"{ANSWER_PREFIX} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"no single token for ' {letter}' after {ANSWER_PREFIX!r}")
        return full[-1]

    def __call__(self, instruction: str, a: str, b: str) -> float:
        return self.prefer_a(instruction, a, b)

    def prefer_a(self, instruction: str, a: str, b: str) -> float:
        """Probability that response A is the better one (the two letters renormalised)."""
        return self.prefer_a_batch([(instruction, a, b)])[0]

    def prefer_a_batch(self, questions: list[tuple[str, str, str]]) -> list[float]:
        """`prefer_a` of each (instruction, a, b), `batch_size` prompts at a time."""
        from humpback_nb.infra.chat import prompt_ids

        answer = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        rows = [prompt_ids(self.tokenizer, [{"role": "user", "content": JUDGE_PROMPT.format(
            instruction=instruction, a=a[: self.max_chars], b=b[: self.max_chars])}]) + answer
            for instruction, a, b in questions]
        logprobs = self.engine.next_token_logprobs(rows, self.letters, batch_size=self.batch_size)
        return [1.0 / (1.0 + math.exp(b - a)) for a, b in logprobs]  # the two letters renormalised


@dataclass
class EndpointJudge:
    """A judge behind an OpenAI-compatible chat endpoint (`{base_url}/chat/completions`).

    Transient failures (rate limits, server errors, timeouts, dropped connections) are tried again, at most
    `max_tries` times in all, after waits that double from `backoff` seconds with jitter, or as long as the server's
    Retry-After asks, no wait longer than `max_wait` (infra/http.py, the kit's one client). Any other error status
    fails at once."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_tries: int = 6
    backoff: float = 2.0
    max_wait: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    concurrency: int = 1  # requests in flight at once where several are asked for (evaluate.judge_concurrency)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def workers(self) -> int:
        """Requests in flight at once, under an engine's name for it: a follow-up asks an endpoint or an engine."""
        return self.concurrency

    def __call__(self, instruction: str, a: str, b: str) -> float:
        return self.prefer_a(instruction, a, b)

    def prefer_a(self, instruction: str, a: str, b: str) -> float:
        """1.0 if the endpoint answers A, 0.0 for B; `UnparsedReply` when its reply names neither alone."""
        reply = self.reply(JUDGE_PROMPT.format(instruction=instruction, a=a, b=b))
        choice = parse_choice(reply)
        if choice is None:
            raise UnparsedReply(reply)
        return 1.0 if choice == "A" else 0.0

    def reply(self, prompt: str) -> str:
        """The endpoint's reply to `prompt`, tried again after transient failures."""
        return self.chat([{"role": "user", "content": prompt}])

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 4, temperature: float = 0.0) -> str:
        """The endpoint's raw reply to a whole conversation (a system message, say), tried again after transient
        failures: for annotators that bring their own prompt and parser (alpaca_eval.py)."""
        body = {"model": self.model, "temperature": temperature, "max_tokens": max_tokens, "messages": messages}
        payload = post_json(self.url, body, timeout=self.timeout, error=JudgeError, key_env=self.api_key_env,
                            what=f"endpoint {self.url} ({self.model})",
                            retry=Retry(self.max_tries, self.backoff, self.max_wait, self.sleep))
        try:
            return payload["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"endpoint {self.url} ({self.model}) sent no chat completion: "
                             f"{one_line(json.dumps(payload))}") from None


Judge = Callable[[str, str, str], float]


def judge_both_orders(prefer_a: Judge, instruction: str, x: str, y: str) -> dict[str, Any]:
    """Judge x against y twice, x shown first and then second. The outcome is x's preference averaged over
    the two orders: 1 if x wins both, 0 if it loses both, 0.5 when the orders disagree (a judge that always
    picks the first answer ties everything). With a judge that gives probabilities, the average is AlpacaEval
    2.0's "weighted" preference; with one that names a letter it is 0, 0.5 or 1. When a reply names no letter,
    the outcome is None and `unparsed` holds that reply's text by order."""
    return _both_orders(_ask(prefer_a, instruction, x, y), _ask(prefer_a, instruction, y, x))


def judge_many_both_orders(judge: LocalJudge, pairs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """`judge_both_orders` of each (instruction, x, y), the 2 x len(pairs) prompts read in batches."""
    questions = [q for instruction, x, y in pairs for q in ((instruction, x, y), (instruction, y, x))]
    p = judge.prefer_a_batch(questions)
    return [_both_orders((p[2 * i], None), (p[2 * i + 1], None)) for i in range(len(pairs))]


def _both_orders(first: tuple[float | None, str | None], second: tuple[float | None, str | None]) -> dict[str, Any]:
    """The record of one pair from (preference for A, unparsed reply) with x as A, then with x as B."""
    (a, a_reply), (b, b_reply) = first, second
    record = {"x_as_a": None if a is None else round(a, 4), "x_as_b": None if b is None else round(1.0 - b, 4)}
    if a is None or b is None:
        replies = {"x_as_a": a_reply, "x_as_b": b_reply}
        return record | {"outcome": None, "unparsed": {k: r for k, r in replies.items() if r is not None}}
    return record | {"outcome": round((a + 1.0 - b) / 2, 4)}


def _ask(prefer_a: Judge, instruction: str, a: str, b: str) -> tuple[float | None, str | None]:
    """(preference for A, None), or (None, the reply) when the judge's reply names no letter."""
    try:
        return prefer_a(instruction, a, b), None
    except UnparsedReply as err:
        return None, err.reply


def make_judge(settings: EvaluateConfig, engine=None) -> Judge:
    """The judge of `settings`: the base model through `engine` (LocalJudge), or an OpenAI-compatible endpoint when
    `judge_url` is set (EndpointJudge, `judge_concurrency` requests in flight)."""
    if settings.judge_url:
        return EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env,
                             concurrency=settings.judge_concurrency)
    return LocalJudge(engine)


def concurrency(judge) -> int:
    """How many batches of pairs `judge` takes at once: an endpoint's `concurrency`, a local judge's engine's workers
    (vLLM's requests in flight; the kit's loops one), else 1."""
    if isinstance(judge, EndpointJudge):
        return judge.concurrency
    return judge.engine.workers if isinstance(judge, LocalJudge) else 1


def judge_name(settings: EvaluateConfig) -> str:
    """How results name the judge of `settings`."""
    return f"{settings.judge} at {settings.judge_url}" if settings.judge_url else "local:base"
