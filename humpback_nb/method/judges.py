"""Judges: which of two answers to one instruction is better, asked in both orders (judges favour a position).

`LocalJudge`, any model the kit loads (the base model by default), reads the probabilities of "A" and "B"
after the judging prompt; `EndpointJudge`, any OpenAI-compatible chat endpoint (a GPT-4 judge as in the
paper, or a local server), with the key taken from the environment. An endpoint's reply must name exactly one
of A and B (`parse_choice`); any other reply is kept as text and left out of the win rates, never read as a
preference. Replies are parsed, never run.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from humpback_nb.config import EvaluateConfig
from humpback_nb.infra.guard import JudgeError

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
    """A judge from a local model: P("A") against P("B") after the judging prompt (always a preference).

    Called as `judge(instruction, a, b)` like any judge; `prefer_a_batch` reads many prompts in batches of
    `batch_size`, which `winrates.compare` uses."""

    def __init__(self, model, tokenizer, max_chars: int = 2000, batch_size: int = 8):
        self.model, self.tokenizer, self.max_chars, self.batch_size = model, tokenizer, max_chars, batch_size
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
        """`prefer_a` of each (instruction, a, b), `batch_size` prompts a forward pass."""
        from humpback_nb.infra.chat import prompt_ids
        from humpback_nb.infra.decode import logits_after_prefix, shared_prefix

        answer = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        rows = [prompt_ids(self.tokenizer, [{"role": "user", "content": JUDGE_PROMPT.format(
            instruction=instruction, a=a[: self.max_chars], b=b[: self.max_chars])}]) + answer
            for instruction, a, b in questions]
        # On a CPU, the tokens every prompt opens with (chat template, system prompt and the judge's opening up to
        # the instruction: 48 of a demo prompt's ~230) are read once, and each prompt's rest after them, packed.
        shared = shared_prefix_length(rows) if self.model.device.type == "cpu" else 0
        shared = shared if shared >= MIN_SHARED_PREFIX else 0
        prefix = shared_prefix(self.model, rows[0][:shared]) if shared else None
        preferences: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            rests = [row[shared:] for row in rows[start : start + self.batch_size]]
            logits = logits_after_prefix(self.model, rows[0][:shared], rests, prefix, self.tokenizer.pad_token_id)
            preferences += torch.softmax(logits[:, self.letters].float(), dim=-1)[:, 0].tolist()
        return preferences


MIN_SHARED_PREFIX = 16  # tokens: a shorter prefix is read with each prompt


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many tokens all `rows` open with, leaving at least one token of each row after them."""
    length = min(len(row) for row in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return max(0, length)


class _Transient(Exception):
    """A failure worth another try: a rate limit, a server error, a timeout or a dropped connection."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait  # the seconds the server asked for (Retry-After), if it did


@dataclass
class EndpointJudge:
    """A judge behind an OpenAI-compatible chat endpoint (`{base_url}/chat/completions`).

    Rate limits (429), server errors (5xx, 408), timeouts and connection errors are tried again, at most
    `max_tries` times in all, after waits that double from `backoff` seconds with jitter, or as long as the
    server's Retry-After asks; no wait is longer than `max_wait`. Any other error status fails at once."""

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
        for tries in range(1, self.max_tries + 1):
            try:
                return self._post(messages, max_tokens, temperature)
            except _Transient as err:
                if tries >= self.max_tries:
                    raise JudgeError(f"endpoint {self.url} ({self.model}) failed {tries} tries; "
                                     f"the last: {err}") from None
                wait = err.wait if err.wait is not None else self.backoff * 2 ** (tries - 1) * random.uniform(0.5, 1)
                self.sleep(min(wait, self.max_wait))
        raise JudgeError(f"endpoint {self.url}: max_tries is {self.max_tries}, at least 1 is needed")

    def _post(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        body = {"model": self.model, "temperature": temperature, "max_tokens": max_tokens, "messages": messages}
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {os.environ.get(self.api_key_env, '')}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            status = f"HTTP {err.code}: {_error_message(err)}"
            if err.code in (408, 429) or err.code >= 500:
                raise _Transient(status, retry_after(err.headers.get("Retry-After"))) from None
            raise JudgeError(f"endpoint {self.url} ({self.model}) refused the request: {status}") from None
        except (OSError, http.client.HTTPException) as err:  # timeouts, refused and dropped connections
            raise _Transient(f"{type(err).__name__}: {err}") from None
        try:
            return json.loads(payload)["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"endpoint {self.url} ({self.model}) sent no chat completion: "
                             f"{_one_line(payload.decode('utf-8', 'replace'))}") from None


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (a number of seconds or an HTTP date); None without one."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_message(err: urllib.error.HTTPError) -> str:
    """The error message of an error reply: OpenAI's {"error": {"message": ...}}, or the body's text."""
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else error or text
    except (ValueError, AttributeError):
        pass
    return _one_line(str(text)) or str(err.reason)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


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


def make_judge(settings: EvaluateConfig, base_model=None, tokenizer=None) -> Judge:
    """The judge of `settings`: the local base model, or an OpenAI-compatible endpoint when `judge_url` is set."""
    if settings.judge_url:
        return EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env,
                             concurrency=settings.judge_concurrency).prefer_a
    return LocalJudge(base_model, tokenizer)


def concurrency(judge) -> int:
    """How many pairs `judge` may judge at once: an endpoint's `concurrency`, else 1 (a local model, one at a time)."""
    endpoint = getattr(judge, "__self__", judge)
    return endpoint.concurrency if isinstance(endpoint, EndpointJudge) else 1


def judge_name(settings: EvaluateConfig) -> str:
    """How results name the judge of `settings`."""
    return f"{settings.judge} at {settings.judge_url}" if settings.judge_url else "local:base"
