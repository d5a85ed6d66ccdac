"""Text generation: one reply to one message (`chat`), and batched, resumable generation (`generate_records`).

Batched generation sorts the prompts by length (long first, so that memory peaks in the first batch and
batches waste little padding), pads them on the left, samples with the config's nucleus settings and a
seed per batch, and appends each finished batch to a `.partial` file. A rerun after an interruption reads
that file and generates only the batches that are missing there, with the same composition and seed, so
the result is the same as an uninterrupted run, without duplicates or gaps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from humpback_nb.config import GenerationConfig
from humpback_nb.prompts import prompt_ids


def chat(model, tokenizer, message: str, system: str | None = None,
         settings: GenerationConfig | None = None, greedy: bool = False) -> str:
    """The model's reply to one user message, through the tokenizer's chat template.

    Sampling follows `settings` (nucleus sampling, seeded); `greedy=True` decodes greedily.
    """
    settings = settings or GenerationConfig()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    record = generate_records(model, tokenizer, [{"id": "chat", "messages": messages}], settings,
                              settings.max_new_tokens, greedy=greedy, progress=False)[0]
    return record["text"].strip()


def read_partial(path: Path | None) -> dict[str, dict[str, Any]]:
    """Records already generated, by id. A last line cut short by a crash is dropped from the file."""
    if path is None or not path.is_file():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = {}
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["id"]] = record
    return records


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def generate_records(model, tokenizer, prompts: Sequence[dict[str, Any]], settings: GenerationConfig,
                     max_new_tokens: int, partial: Path | None = None, greedy: bool = False,
                     progress: bool = True, desc: str = "generating") -> list[dict[str, Any]]:
    """One completion per prompt ({"id", "messages"}), in input order: {"id", "text", "prompt_tokens",
    "new_tokens", "finished"}. With `partial`, finished batches are appended there and skipped on rerun."""
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique")
    encoded = [prompt_ids(tokenizer, p["messages"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    done = {key: value for key, value in read_partial(partial).items() if key in set(ids)}
    bar = tqdm(total=len(prompts), initial=len(done), desc=desc, disable=not progress, unit="prompt")
    for number, batch in enumerate(batches):
        if all(ids[i] in done for i in batch):
            continue
        texts = _generate_batch(model, tokenizer, [encoded[i] for i in batch], settings, max_new_tokens,
                                seed=settings.seed + number, greedy=greedy)
        new = [{"id": ids[i], **text, "batch": number}
               for i, text in zip(batch, texts, strict=True) if ids[i] not in done]
        if partial is not None:
            append_records(partial, new)
        done.update((r["id"], r) for r in new)
        bar.update(len(new))
    bar.close()
    return [done[key] for key in ids]


def _generate_batch(model, tokenizer, batch: list[list[int]], settings: GenerationConfig, max_new_tokens: int,
                    seed: int, greedy: bool) -> list[dict[str, Any]]:
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling)
    results = []
    for ids, row in zip(batch, output[:, width:].tolist(), strict=True):
        finished = tokenizer.eos_token_id in row
        new = row[: row.index(tokenizer.eos_token_id)] if finished else row
        results.append({"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": len(ids),
                        "new_tokens": len(new), "finished": finished})
    return results
