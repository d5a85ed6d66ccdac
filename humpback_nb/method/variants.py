"""Humpback's follow-ups as functions of records and models (config `variant`, docs/variants.md).

* Back-and-forth translation (Nguyen et al. 2024, arXiv 2408.04614): an aligned chat model rewrites each kept
  pair's response from (generated instruction, original web text): `rewrite(..., method="bft")`.
* Kun (Zheng et al. 2024, arXiv 2401.06477): the instruction alone is rated (curate.sees "instruction", in
  curate.py) and M0 "polishes" the raw text into an answer to it: `rewrite(..., method="kun")`.
* AlpaGasus (Chen et al. 2023, arXiv 2307.08701): a strong model rates existing pairs 0-5 with its prompt and the
  pairs rated >= 4.5 are kept: `rate_alpagasus`, `parse_alpagasus_score`.

The model asked is an engine (infra/engines.py: the kit's loops or vLLM) or an OpenAI-compatible endpoint
(`judges.EndpointJudge`): `ask` takes either. `changes` measures what a rewrite did to the text.
"""

from __future__ import annotations

import difflib
import re
import statistics
from pathlib import Path
from typing import Any

from humpback_nb.config import GenerateConfig
from humpback_nb.infra.batches import in_batches
from humpback_nb.infra.chat import fit_text, prompt_ids
from humpback_nb.method.curate import expected_score
from humpback_nb.method.prompts import alpagasus_messages, rewrite_messages

ALPAGASUS_SCALE = (0.0, 5.0)
_FIRST_LINE_SCORE = re.compile(r"(?:score\s*:\s*)?(\d+(?:\.\d+)?)\s*(?:/\s*5)?\.?", re.IGNORECASE)


def ask(model, prompts: list[dict[str, Any]], settings: GenerateConfig, max_new_tokens: int, greedy: bool,
        partial: Path | None = None, desc: str = "asking", workers: int = 1) -> list[dict[str, Any]]:
    """Replies ({"id", "text", "finished"}) of `model` to chat prompts ({"id", "messages"}): an engine generates them
    in batches (resumable from `partial`), an endpoint answers one request a prompt, `workers` in flight; its replies
    carry "finished": None (the endpoint does not say)."""
    if hasattr(model, "generate"):
        return model.generate(prompts, settings, max_new_tokens, partial=partial, greedy=greedy, desc=desc)
    temperature = 0.0 if greedy else settings.temperature

    def compute(number: int, batch: list[int]) -> list[dict[str, Any]]:
        prompt = prompts[batch[0]]
        text = model.chat(prompt["messages"], max_tokens=max_new_tokens, temperature=temperature)
        return [{"id": prompt["id"], "text": text, "finished": None}]

    return in_batches([p["id"] for p in prompts], [[i] for i in range(len(prompts))], compute, partial=partial,
                      progress=bool(prompts), desc=desc, unit="pair", workers=workers)


def _fitter(model, context_length: int, reserve: int):
    """A function that cuts a text so that the prompt around it and `reserve` new tokens fit the model's context (an
    endpoint's model reads the text whole)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return lambda messages, text: text

    def fit(messages, text: str) -> str:
        around = len(prompt_ids(tokenizer, messages("")))
        return fit_text(tokenizer, text, max(32, context_length - reserve - around))

    return fit


def rewrite(model, pairs: list[dict[str, Any]], method: str, settings: GenerateConfig, max_new_tokens: int,
            context_length: int, partial: Path | None = None, workers: int = 1) -> tuple[list[dict], dict[str, Any]]:
    """Each pair's response rewritten by `model` from (instruction, original text) with the prompt of `method`
    ("bft": back-and-forth translation's rewriting; "kun": Kun's answer polishment), sampled with `settings`
    (the run's T and p). (pairs kept, report): a pair whose rewrite is empty is dropped and counted; each kept pair
    has its rewrite as "output" and the text it was made from as "original"."""
    fit = _fitter(model, context_length, max_new_tokens)
    prompts = [{"id": p["id"], "messages": rewrite_messages(
        method, p["instruction"], fit(lambda text, p=p: rewrite_messages(method, p["instruction"], text), p["output"]))}
        for p in pairs]
    replies = {r["id"]: r for r in ask(model, prompts, settings, max_new_tokens, greedy=False, partial=partial,
                                       desc=f"rewriting ({method})", workers=workers)}
    kept = []
    for pair in pairs:
        reply = replies[pair["id"]]
        text = reply["text"].strip()
        if text:
            kept.append(dict(pair, output=text, original=pair["output"], finished=reply.get("finished")))
    report = {"method": method, "asked": len(pairs), "kept": len(kept), "empty": len(pairs) - len(kept),
              "cut": sum(r.get("finished") is False for r in replies.values()), "max_new_tokens": max_new_tokens}
    return kept, report


def parse_alpagasus_score(text: str) -> float | None:
    """The score of an AlpaGasus rating: its first non-empty line is the score (AlpaGasus reads
    `float(review.split("\\n")[0])`), here also as "Score: 4.5" or "4.5/5", and within 0-5; anything else None."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    match = _FIRST_LINE_SCORE.fullmatch(lines[0].strip("*_ ")) if lines else None
    if not match:
        return None
    score = float(match.group(1))
    return score if ALPAGASUS_SCALE[0] <= score <= ALPAGASUS_SCALE[1] else None


def rate_alpagasus(model, pairs: list[dict[str, Any]], max_new_tokens: int, context_length: int,
                   partial: Path | None = None, workers: int = 1) -> list[dict[str, Any]]:
    """AlpaGasus's rating of each pair ({"id", "instruction", "output", optional "input"}): its prompt, greedy
    (temperature 0, as its code), the score parsed from the reply's first line (None when it is not one)."""
    fit = _fitter(model, context_length, max_new_tokens)
    prompts = [{"id": p["id"], "messages": alpagasus_messages(
        p["instruction"], fit(lambda text, p=p: alpagasus_messages(p["instruction"], text, p.get("input", "")),
                              p["output"]), p.get("input", ""))} for p in pairs]
    replies = ask(model, prompts, GenerateConfig(), max_new_tokens, greedy=True, partial=partial,
                  desc="rating (AlpaGasus)", workers=workers)
    return [{"id": r["id"], "score": parse_alpagasus_score(r["text"]), "review": r["text"].strip()} for r in replies]


def digit_tokens(tokenizer) -> list[int]:
    """The token id of each score "0".."5" as the first token of a reply."""
    ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(6)]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != 6:
        raise ValueError("this tokenizer has no single token for each digit 0-5: rate with variant.rating generate")
    return [i[0] for i in ids]


def rate_alpagasus_logprob(engine, pairs: list[dict[str, Any]], context_length: int, batch_size: int = 8,
                           partial: Path | None = None) -> list[dict[str, Any]]:
    """AlpaGasus's prompt, read rather than answered: the score expected from the probabilities of "0".."5" as the
    reply's first token (where AlpaGasus's reply writes its score), one forward pass a pair; the distribution kept.
    For a model that does not write the score line (a 135M one); `rate_alpagasus` parses the line as AlpaGasus."""
    from humpback_nb.infra.engines import length_batches

    tokenizer = engine.tokenizer
    digits = digit_tokens(tokenizer)
    fit = _fitter(engine, context_length, 8)
    rows = [prompt_ids(tokenizer, alpagasus_messages(
        p["instruction"], fit(lambda text, p=p: alpagasus_messages(p["instruction"], text, p.get("input", "")),
                              p["output"]), p.get("input", ""))) for p in pairs]

    def compute(number: int, batch: list[int]) -> list[dict[str, Any]]:
        logprobs = engine.next_token_logprobs([rows[i] for i in batch], digits, batch_size=len(batch))
        return [{"id": pairs[i]["id"], **expected_score(row, range(6))} for row, i in zip(logprobs, batch, strict=True)]

    return in_batches([p["id"] for p in pairs], length_batches([len(r) for r in rows], batch_size), compute,
                      partial=partial, progress=bool(pairs), desc="rating (AlpaGasus, logprob)", unit="pair",
                      workers=engine.workers)


# -- what a rewrite changed ---------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlap(text: str, source: str, n: int = 3) -> float | None:
    """Share of `text`'s word n-grams found in `source`: 1.0 copies it, 0.0 shares no phrase with it."""
    words, found = _words(text), _words(source)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return None
    present = {tuple(found[i:i + n]) for i in range(len(found) - n + 1)}
    return sum(g in present for g in grams) / len(grams)


def similarity(a: str, b: str) -> float:
    """How much of two texts is the same, word by word (difflib's ratio: 1.0 the same, 0.0 nothing in common)."""
    return difflib.SequenceMatcher(None, _words(a), _words(b), autojunk=False).ratio()


def changes(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the rewrites did (pairs with "output" and "original"): lengths in characters (mean and std, as the
    paper's Table 2), the share of each rewrite's word 3-grams taken from its original text, and the word-level
    similarity of the two."""
    def spread(values: list[float]) -> dict[str, float | None]:
        values = [v for v in values if v is not None]
        return {"mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}

    rows = [p for p in pairs if p.get("original") is not None]
    return {"pairs": len(rows),
            "original_chars": spread([len(p["original"]) for p in rows]),
            "rewrite_chars": spread([len(p["output"]) for p in rows]),
            "from_original": spread([overlap(p["output"], p["original"]) for p in rows]),
            "similarity": spread([similarity(p["output"], p["original"]) for p in rows])}
