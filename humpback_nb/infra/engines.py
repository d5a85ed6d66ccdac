"""Inference engines: the one seam through which the method writes and reads with a model.

The method asks an engine for three things, all in token ids of the kit's own chat format (infra/chat.py), so that
every engine reads exactly the prompts the models were trained on:

* `generate(prompts, settings, max_new_tokens, ...)`: a completion per {"id", "messages"} (text, finished, token
  counts), stopping at the format's turn-end ids, resumable through a `.partial` file (infra/batches.py);
* `next_token_logprobs(rows, tokens)`: the log-probabilities of the given next tokens after each row (the logprob
  rater's "1".."5", the local judge's "A" and "B");
* `losses(examples)`: each example's summed loss over its learned tokens (held-out losses): the local engine only.
  vLLM 0.32's prompt log-probabilities stop its CPU engine when LoRA is enabled (an einsum shape error in
  compute_logits), and held-out losses are a few dozen forward passes: the stages read them with the kit's own
  forward pass whatever the engine (stages.model_engine(..., losses=True)).

`LocalEngine` runs a loaded transformers model with the kit's own loops: every CPU-only speedup (packed prompts,
the shared prefix read once, the kit's attention) lives inside it and nowhere in the method. `VLLMEngine` sends the
same token ids to vLLM's OpenAI-compatible server (`/v1/completions`), the engine every system that runs this method
at scale uses: many batches in flight, spread over one or many servers (serve.py starts the kit's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from humpback_nb.config import EngineConfig, GenerateConfig
from humpback_nb.infra.batches import in_batches
from humpback_nb.infra.chat import IGNORE_INDEX, pad_batch, prompt_ids, turn_end_ids
from humpback_nb.infra.guard import EngineError, refuse_compute
from humpback_nb.infra.http import Retry, one_line, post_json


class Engine(Protocol):
    """What the method may ask of a model (module docstring)."""

    name: str
    tokenizer: Any
    workers: int  # batches the engine takes at once (the method's loops hand it that many)

    def generate(self, prompts: Sequence[dict[str, Any]], settings: GenerateConfig, max_new_tokens: int,
                 partial: Path | None = None, greedy: bool = False, progress: bool = True,
                 desc: str = "generating") -> list[dict[str, Any]]: ...

    def next_token_logprobs(self, rows: Sequence[Sequence[int]], tokens: Sequence[int],
                            batch_size: int = 8) -> list[list[float]]: ...

    def losses(self, examples: list[dict[str, list[int]]], batch_size: int = 8) -> list[tuple[float, int]]: ...

    def close(self) -> None: ...


def chat(engine: Engine, message: str, system: str | None = None, settings: GenerateConfig | None = None,
         greedy: bool = False) -> str:
    """The model's reply to one user message, in the model's chat format. Sampling follows `settings` (nucleus
    sampling, seeded); `greedy=True` decodes greedily."""
    settings = settings or GenerateConfig()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    record = engine.generate([{"id": "chat", "messages": messages}], settings, settings.max_new_tokens, greedy=greedy,
                             progress=False)[0]
    return record["text"].strip()


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices cut into batches of `batch_size`, longest first (memory peaks in the first batch, little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_ids(prompts: Sequence[dict[str, Any]]) -> list[str]:
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique")
    return ids


# -- the kit's own loops --------------------------------------------------------------------------------------------
MIN_SHARED_PREFIX = 16  # tokens: a shorter prefix all rows open with is read with each row


class LocalEngine:
    """A transformers model (and its tokenizer) run by the kit's own loops (decode.py). With `shared_prefix` (the
    default), the tokens all rows of a `next_token_logprobs` call open with (the rater's rubric, the judge's opening)
    are read once and kept for the next call that opens with them too; without, every row is read whole (the slow
    reference the benchmarks compare with: both give the same numbers)."""

    name = "local"
    workers = 1

    def __init__(self, model, tokenizer, shared_prefix: bool = True):
        self.model, self.tokenizer, self.shared_prefix = model, tokenizer, shared_prefix
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # (ids, their keys and values)

    def generate(self, prompts: Sequence[dict[str, Any]], settings: GenerateConfig, max_new_tokens: int,
                 partial: Path | None = None, greedy: bool = False, progress: bool = True,
                 desc: str = "generating") -> list[dict[str, Any]]:
        """One completion per prompt ({"id", "messages"}), in input order: {"id", "text", "prompt_tokens",
        "new_tokens", "finished", "tokens" (the new token ids, the stop token aside), "batch"}. With `partial`,
        finished batches are appended there and skipped on rerun. Batch b samples with `settings.random_seed + b`."""
        from humpback_nb.infra.decode import generate_batch

        ids = _check_ids(prompts)
        encoded = [prompt_ids(self.tokenizer, p["messages"]) for p in prompts]
        stops = turn_end_ids(self.tokenizer)

        def compute(number: int, batch: Sequence[int]) -> list[dict[str, Any]]:
            texts = generate_batch(self.model, self.tokenizer, [encoded[i] for i in batch], settings, max_new_tokens,
                                   seed=settings.random_seed + number, greedy=greedy, stops=stops)
            return [{"id": ids[i], **text, "batch": number} for i, text in zip(batch, texts, strict=True)]

        batches = length_batches([len(e) for e in encoded], settings.batch_size)
        return in_batches(ids, batches, compute, partial=partial, progress=progress, desc=desc)

    def next_token_logprobs(self, rows: Sequence[Sequence[int]], tokens: Sequence[int],
                            batch_size: int = 8) -> list[list[float]]:
        """Log-probabilities of each of `tokens` as the next token after each row, `batch_size` rows a pass."""
        import torch

        from humpback_nb.infra.decode import logits_after_prefix

        shared, cache = self._shared(rows)
        out: list[list[float]] = []
        for start in range(0, len(rows), batch_size):
            rests = [list(row[shared:]) for row in rows[start : start + batch_size]]
            logits = logits_after_prefix(self.model, rows[0][:shared], rests, cache, self.tokenizer.pad_token_id)
            out += torch.log_softmax(logits.float(), dim=-1)[:, list(tokens)].tolist()
        return out

    def close(self) -> None:
        """Let the model go (the next one loads into the memory it held)."""
        self.model, self._prefix = None, None

    def _shared(self, rows: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """(how many tokens of each row are read from the kept prefix, the prefix's keys and values or None)."""
        from humpback_nb.infra.decode import shared_prefix

        if not self.shared_prefix:
            return 0, None
        if self._prefix is not None:
            kept = self._prefix[0]
            if all(len(row) > len(kept) and tuple(row[: len(kept)]) == kept for row in rows):
                return len(kept), self._prefix[1]
        length = shared_prefix_length(rows)
        if length < MIN_SHARED_PREFIX:
            return 0, None
        self._prefix = (tuple(rows[0][:length]), shared_prefix(self.model, rows[0][:length]))
        return length, self._prefix[1]

    def losses(self, examples: list[dict[str, list[int]]], batch_size: int = 8) -> list[tuple[float, int]]:
        """Each example's loss summed over its learned tokens (labels not IGNORE_INDEX), and their number, in the
        examples' order. Batches are cut from the examples sorted by length: the demo's held-out pairs read 24%
        fewer padded tokens than in their order."""
        import torch

        from humpback_nb.infra.linear import inference

        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        losses: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        self.model.eval()
        with inference(self.model):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = {k: v.to(self.model.device) for k, v in pad_batch([examples[i] for i in chunk],
                                                                          self.tokenizer.pad_token_id).items()}
                labels = batch.pop("labels")
                learned = labels[:, 1:] != IGNORE_INDEX  # the logits' rows: learned tokens, row by row
                per_token = torch.nn.functional.cross_entropy(self.model(**batch).logits.float(),
                                                              labels[:, 1:][learned], reduction="none")
                for i, part in zip(chunk, per_token.split(learned.sum(1).tolist()), strict=True):
                    losses[i] = (float(part.sum()), len(part))
        return losses


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many tokens all `rows` open with, leaving at least one token of each row after them."""
    length = min(len(row) for row in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return max(0, length)


# -- vLLM's OpenAI-compatible server --------------------------------------------------------------------------------
class VLLMEngine:
    """One model (`model`: the name a server serves it under: "base", or a LoRA adapter's name) behind one or many
    vLLM servers (`urls`, each ending in /v1). Each batch of prompts is one `/v1/completions` request with token-id
    prompts; `settings.concurrency` requests are in flight at once, batch b going to server b mod len(urls). A
    request that fails is tried again (infra/http.py); a server that stays down ends the stage with one line, and
    the rerun resumes from the stage's `.partial` file. With `server` (serve.KitServed: the kit's own server), its
    `url()` is asked before each request (it starts the server again if a stage trained meanwhile) and its `gone()`
    says why it stopped answering (its exit and log)."""

    name = "vllm"

    def __init__(self, urls: Sequence[str], model: str, tokenizer, settings: EngineConfig, server=None):
        if not urls and server is None:
            raise EngineError("no vLLM server to send requests to (engine.urls)")
        self.urls, self.model, self.tokenizer, self.settings = list(urls), model, tokenizer, settings
        self.server, self.retry, self.workers = server, Retry(tries=3, backoff=1.0, max_wait=10.0), settings.concurrency

    def _complete(self, number: int, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The choices of one completions request, in prompt order."""
        url = (self.server.url() if self.server else self.urls[number % len(self.urls)]).rstrip("/")
        where = "the kit's vLLM server" if self.server else f"vLLM server {url} (engine.urls)"
        try:
            payload = post_json(url + "/completions", {"model": self.model, **body}, error=EngineError,
                                timeout=self.settings.request_timeout, retry=self.retry,
                                what=f"{where}, model {self.model},")
        except EngineError as err:
            gone = self.server.gone() if self.server else None
            raise EngineError(gone or str(err)) from None
        try:
            return sorted(payload["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError):
            raise EngineError(f"vLLM server {url} sent no completions: {one_line(str(payload))}") from None

    def generate(self, prompts: Sequence[dict[str, Any]], settings: GenerateConfig, max_new_tokens: int,
                 partial: Path | None = None, greedy: bool = False, progress: bool = True,
                 desc: str = "generating") -> list[dict[str, Any]]:
        """As LocalEngine.generate: the same batches, each one request (the prompts as token ids, stopping at the
        format's turn-end ids and nowhere else)."""
        refuse_compute("generation")
        ids = _check_ids(prompts)
        encoded = [prompt_ids(self.tokenizer, p["messages"]) for p in prompts]
        stops = turn_end_ids(self.tokenizer)
        greedy = greedy or settings.temperature == 0
        sampling = {"temperature": 0.0, "top_p": 1.0} if greedy else {"temperature": settings.temperature,
                                                                      "top_p": settings.top_p}

        def compute(number: int, batch: Sequence[int]) -> list[dict[str, Any]]:
            body = {"prompt": [encoded[i] for i in batch], "max_tokens": max_new_tokens, **sampling,
                    "stop_token_ids": stops, "ignore_eos": True, "return_token_ids": True}
            if self.settings.request_seeds and not greedy:
                body["seed"] = settings.random_seed + number
            choices = self._complete(number, body)
            records = []
            for i, choice in zip(batch, choices, strict=True):
                row = list(choice.get("token_ids") or [])
                finished = choice.get("finish_reason") == "stop" and bool(row) and row[-1] in stops
                new = row[:-1] if finished else row
                records.append({"id": ids[i], "text": self.tokenizer.decode(new, skip_special_tokens=True),
                                "prompt_tokens": len(encoded[i]), "new_tokens": len(new), "finished": finished,
                                "tokens": new, "batch": number})
            return records

        batches = length_batches([len(e) for e in encoded], settings.batch_size)
        return in_batches(ids, batches, compute, partial=partial, progress=progress, desc=desc,
                          workers=self.settings.concurrency)

    def close(self) -> None:
        """Nothing to free here: the server stays up for the next stage (serve.stop ends it)."""

    def _map(self, work, batches: list[list[int]]) -> list:
        """work(number, batch) of each batch, `concurrency` at once, results in batch order."""
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            return list(pool.map(work, range(len(batches)), batches))

    def next_token_logprobs(self, rows: Sequence[Sequence[int]], tokens: Sequence[int],
                            batch_size: int = 8) -> list[list[float]]:
        """Log-probabilities of each of `tokens` after each row: vLLM's `logprob_token_ids` (the raw model's)."""
        wanted = [f"token_id:{t}" for t in tokens]

        def work(number: int, batch: list[int]) -> list[list[float]]:
            body = {"prompt": [list(rows[i]) for i in batch], "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                    "logprob_token_ids": list(tokens), "return_tokens_as_token_ids": True}
            out = []
            for choice in self._complete(number, body):
                top = choice["logprobs"]["top_logprobs"][0]
                missing = [w for w in wanted if w not in top]
                if missing:
                    raise EngineError(f"vLLM server (model {self.model}) sent no log-probability for {missing[0]}: "
                                      "it needs the logprob_token_ids option (the kit is tested with vLLM 0.32)")
                out.append([float(top[w]) for w in wanted])
            return out

        batches = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
        return [row for part in self._map(work, batches) for row in part]
