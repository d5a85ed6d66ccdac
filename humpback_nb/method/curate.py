"""Self-curation (paper section 2.3): a model rates every candidate pair; A_k keeps those rated >= k.

Two raters, one interface (`rate`):

* `generate`, the paper's way: the model writes a brief reasoning and then "Score: N" on its last
  line. The last line is parsed strictly; anything else (no score, two scores, a score outside 1-5,
  "Score: 10502") is recorded as unparsed, never guessed, and the parse rate goes with every result.
* `logprob`: no text is generated. The assistant's turn is started with "Score: " and one forward pass
  reads the probabilities of the tokens "1".."5" there; the expected score and the distribution are
  kept. The rubric, the long part of the prompt, is the same for every candidate: its keys and values
  are computed once and reused for every batch (inside the engine: the local one reads it once, vLLM caches it).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from humpback_nb.config import CurateConfig, GenerateConfig
from humpback_nb.infra.batches import in_batches
from humpback_nb.infra.chat import fit_text, prompt_ids, rendered_ids
from humpback_nb.infra.engines import length_batches
from humpback_nb.method.prompts import curation_messages, instruction_messages

SCORES = (1, 2, 3, 4, 5)
_SCORE_LINE = re.compile(r"score\s*:\s*(\S+?)\.?", re.IGNORECASE)
_PAIR = "\x00PAIR\x00"  # stands for the candidate while the shared rubric prefix is rendered


# -- the strict parser ---------------------------------------------------------------------------
def parse_score(text: str) -> int | None:
    """The score of a rater's reply, or None. The last non-empty line must be "Score: N" with N in 1-5
    (case and spacing aside, a final period allowed), and no other line may carry a score."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    scored = [line for line in lines if re.match(r"\W*score\s*:", line, re.IGNORECASE)]
    if len(scored) != 1 or scored[0] != lines[-1]:
        return None
    match = _SCORE_LINE.fullmatch(lines[-1].strip("*_ "))
    if not match or match.group(1) not in {str(s) for s in SCORES}:
        return None
    return int(match.group(1))


def rating_messages(instruction: str, output: str, settings: CurateConfig, tag: str | None = None) -> list:
    """The rating prompt of `settings`: the paper's rubric for the pair, or (`curate.sees` "instruction") the
    instruction alone, as Kun rates; with the system prompt of `tag` (default `curate.rater_tag`)."""
    tag = settings.rater_tag if tag is None else tag
    if settings.sees == "instruction":
        return instruction_messages(instruction, tag)
    return curation_messages(instruction, output, tag)


# -- the generate rater --------------------------------------------------------------------------
def rate_generate(engine, pairs: list[dict[str, Any]], settings: CurateConfig, context_length: int,
                  partial: Path | None = None) -> list[dict[str, Any]]:
    """The paper's rater: reasoning, then "Score: N" on the last line (greedy decoding)."""
    fit = _output_fitter(engine.tokenizer, settings, context_length, reserve=settings.max_new_tokens)
    prompts = [{"id": p["id"], "messages": rating_messages(p["instruction"], fit(p), settings)} for p in pairs]
    greedy = GenerateConfig(batch_size=settings.batch_size)  # no sampling: only the batch size counts
    generated = engine.generate(prompts, greedy, settings.max_new_tokens, partial=partial, greedy=True,
                                desc="rating (generate)")
    return [{"id": g["id"], "rater": "generate", "score": parse_score(g["text"]), "reasoning": g["text"].strip(),
             "finished": g["finished"]} for g in generated]


# -- the logprob rater ---------------------------------------------------------------------------
def score_tokens(tokenizer, prefix: str = "Score: ") -> tuple[str, list[int]]:
    """(answer prefix, token id of each digit 1-5 right after it) for this tokenizer."""
    for start, digit_text in ((prefix, "{}"), (prefix.rstrip(), " {}")):
        base = tokenizer(start, add_special_tokens=False)["input_ids"]
        ids = []
        for score in SCORES:
            full = tokenizer(start + digit_text.format(score), add_special_tokens=False)["input_ids"]
            if full[: len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(set(ids)) == len(SCORES):
            return start, ids
    raise ValueError("this tokenizer has no single token for each score digit after 'Score:'")


def _output_fitter(tokenizer, settings: CurateConfig, context_length: int, reserve: int):
    """A function that cuts a pair's output so that rubric, instruction, output and `reserve` tokens fit."""
    rubric = len(prompt_ids(tokenizer, rating_messages("", "", settings)))
    room = context_length - rubric - reserve

    def fit(pair: dict[str, Any]) -> str:
        instruction = len(tokenizer(pair["instruction"], add_special_tokens=False)["input_ids"])
        return fit_text(tokenizer, pair["output"], max(32, room - instruction))

    return fit


def _rubric_split(tokenizer, settings: CurateConfig, answer_prefix: str) -> tuple[list[int], str]:
    """(token ids of the shared prefix, text template of the rest with _PAIR where the pair goes)."""
    text = tokenizer.apply_chat_template(rating_messages(_PAIR, "", settings), add_generation_prompt=True,
                                         tokenize=False) + answer_prefix
    head, tail = text.split(_PAIR)
    return rendered_ids(tokenizer, head), _PAIR + tail


def expected_score(logprobs: list[float], values: tuple[int, ...] | range) -> dict[str, Any]:
    """The score expected from the log-probabilities of the tokens that write `values` (renormalised over them): the
    score, the distribution, and the mass the score tokens had before renormalising (digit_mass)."""
    mass = [math.exp(x) for x in logprobs]
    distribution = [m / sum(mass) for m in mass]
    return {"score": round(sum(v * p for v, p in zip(values, distribution, strict=True)), 4),
            "distribution": [round(p, 6) for p in distribution], "digit_mass": round(sum(mass), 6)}


def rate_logprob(engine, pairs: list[dict[str, Any]], settings: CurateConfig, context_length: int,
                 partial: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Scores from the probabilities of "1".."5" after "Score: ", one forward pass per candidate. Every prompt opens
    with the same rubric: the local engine reads it once, vLLM caches it."""
    tokenizer = engine.tokenizer
    answer_prefix, digit_ids = score_tokens(tokenizer)
    prefix_ids, tail = _rubric_split(tokenizer, settings, answer_prefix)
    fit = _output_fitter(tokenizer, settings, context_length, reserve=8)

    def rated(p: dict[str, Any]) -> str:  # what takes the place of _PAIR: the pair, or the instruction alone
        return p["instruction"] if settings.sees == "instruction" else f"{p['instruction']}\n{fit(p)}"

    rows = [prefix_ids + tokenizer(tail.replace(_PAIR, rated(p)), add_special_tokens=False)["input_ids"]
            for p in pairs]

    def compute(number: int, batch: list[int]) -> list[dict[str, Any]]:
        logprobs = engine.next_token_logprobs([rows[i] for i in batch], digit_ids, batch_size=len(batch))
        return [{"id": pairs[i]["id"], "rater": "logprob", **expected_score(row, SCORES)}
                for row, i in zip(logprobs, batch, strict=True)]

    # a batch cut by a crash is rated whole again (the same rows give the same numbers); its missing rows are kept
    return in_batches([p["id"] for p in pairs], length_batches([len(r) for r in rows], settings.batch_size), compute,
                      partial=partial, progress=progress, desc="rating (logprob)", unit="pair", workers=engine.workers)


def rate_at_endpoint(endpoint, pairs: list[dict], max_tokens: int, partial: Path | None = None,
                     desc: str = "Table 7 rating (endpoint)", workers: int = 1,
                     settings: CurateConfig | None = None) -> list[dict]:
    """Scores of an OpenAI-compatible endpoint (a `judges.EndpointJudge`: the paper's GPT-4 row, or the rater
    "endpoint"): the paper's rating prompt without a system prompt, the reply's reasoning and "Score: N" parsed as
    strictly as a local model's (None otherwise). With `partial`, each rating is kept as it comes and a rerun asks
    only for the missing ones; `workers` requests are in flight at once."""

    def compute(number: int, batch: list[int]) -> list[dict]:
        pair = pairs[batch[0]]
        messages = (rating_messages(pair["instruction"], pair["output"], settings, tag="none") if settings
                    else curation_messages(pair["instruction"], pair["output"], "none"))
        reply = endpoint.chat(messages, max_tokens=max_tokens)
        return [{"id": pair["id"], "rater": "endpoint", "score": parse_score(reply), "reasoning": reply.strip()}]

    return in_batches([p["id"] for p in pairs], [[i] for i in range(len(pairs))], compute, partial=partial,
                      progress=bool(pairs), desc=desc, unit="pair", workers=workers)


def rate_endpoint(engine, pairs: list[dict[str, Any]], settings: CurateConfig, context_length: int,
                  partial: Path | None = None) -> list[dict[str, Any]]:
    """The rater "endpoint": an OpenAI-compatible endpoint (`curate.rater_url`, model `curate.rater_model`) rates
    with the paper's prompt, no system prompt, and its reasoning then "Score: N" parsed as strictly as a local
    model's; `curate.rater_concurrency` requests at once. The run's model is not asked (`engine` is unused)."""
    from humpback_nb.method.judges import EndpointJudge

    if not settings.rater_url or not settings.rater_model:
        raise ValueError("curate.rater endpoint needs curate.rater_url and curate.rater_model")
    endpoint = EndpointJudge(settings.rater_url, settings.rater_model, settings.rater_key_env)
    return rate_at_endpoint(endpoint, pairs, settings.max_new_tokens, partial=partial,
                            desc=f"rating ({settings.rater_model} at the endpoint)", workers=settings.rater_concurrency,
                            settings=settings)


RATERS = {"logprob": rate_logprob, "generate": rate_generate, "endpoint": rate_endpoint}


def rate(engine, pairs: list[dict[str, Any]], settings: CurateConfig, context_length: int,
         partial: Path | None = None) -> list[dict[str, Any]]:
    """Rate candidate pairs ({"id", "instruction", "output"}) with the rater of `settings` (`curate.rater`);
    prompts are cut to `context_length` tokens (`model.context_length`)."""
    if settings.rater not in RATERS:
        raise ValueError(f"unknown rater {settings.rater!r}; raters: {', '.join(RATERS)}")
    return RATERS[settings.rater](engine, pairs, settings, context_length, partial=partial)


def parse_rate(scores: list[dict[str, Any]]) -> float:
    """Share of ratings that gave a usable score."""
    return sum(s["score"] is not None for s in scores) / max(1, len(scores))


# -- A_k selection -----------------------------------------------------------------------------------
def select(candidates: list[dict[str, Any]], scores: list[dict[str, Any]], k: float) -> list[dict[str, Any]]:
    """A_k: the candidates whose score is >= k (k a real number; the paper's A5 is ">= 4.5")."""
    by_id = {s["id"]: s["score"] for s in scores}
    return [dict(c, score=by_id[c["id"]]) for c in candidates
            if by_id.get(c["id"]) is not None and by_id[c["id"]] >= k]


def threshold_counts(scores: list[dict[str, Any]], ks=(1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)) -> dict[float, int]:
    """|A_k| for several k at once."""
    values = [s["score"] for s in scores if s["score"] is not None]
    return {k: sum(v >= k for v in values) for k in ks}


# -- A_k -----------------------------------------------------------------------------------------
def selection_threshold(scores: list[dict[str, Any]], settings: CurateConfig) -> float:
    """k for A_k: the config's threshold, or the lowest score within the best `top_share` of the rated pairs."""
    if settings.top_share is None:
        return settings.threshold
    values = sorted((s["score"] for s in scores if s["score"] is not None), reverse=True)
    if not values:
        return settings.threshold
    keep = max(1, math.ceil(settings.top_share * len(values)))
    return values[min(keep, len(values)) - 1]


def curated_set(candidates: list[dict[str, Any]], scores: list[dict[str, Any]],
                settings: CurateConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(A_k, how it was made): the candidates scored >= k, k the config's threshold or the one `top_share`
    gives, and a record of k, the rule, and the counts (A_k is only meaningful beside the k that made it)."""
    k = selection_threshold(scores, settings)
    chosen = select(candidates, scores, k)
    rule = (f"the best {settings.top_share:.1%} of the rated candidates (curate.top_share)"
            if settings.top_share is not None else f"score >= {settings.threshold:g} (curate.threshold)")
    return chosen, {"k": k, "rule": rule, "selected": len(chosen), "candidates": len(candidates),
                    "rated": sum(s["score"] is not None for s in scores), "rater": settings.rater}


# -- checks a careful researcher makes first ------------------------------------------------------
def sanity_pairs(seed: list[dict[str, Any]], candidates: list[dict[str, Any]], n: int,
                 rng_seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Three sets to rate: seed pairs, augmented candidates, and shuffled pairs (a candidate's instruction
    with another candidate's output). A rater worth trusting scores them in that order."""
    import random

    rng = random.Random(rng_seed)
    seed_sample = rng.sample(seed, min(n, len(seed)))
    sample = rng.sample(candidates, min(n, len(candidates)))
    shuffled = [{"id": f"shuffled-{a['id']}", "instruction": a["instruction"], "output": b["output"]}
                for a, b in zip(sample, sample[1:] + sample[:1], strict=True)] if len(sample) > 1 else []
    return {"seed": seed_sample, "augmented": sample, "shuffled": shuffled}


def agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    """How two raters agree on the pairs both scored: Spearman rank correlation and rounded-score agreement."""
    from scipy.stats import spearmanr

    by_id = {s["id"]: s["score"] for s in b}
    both = [(s["score"], by_id[s["id"]]) for s in a if s["score"] is not None and by_id.get(s["id"]) is not None]
    if len(both) < 3:
        return {"pairs": len(both), "spearman": None, "same_rounded_score": None}
    x, y = zip(*both, strict=True)
    with warnings.catch_warnings():  # one rater gave every pair the same score: no ranking, said as None
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y).statistic)
    return {"pairs": len(both), "spearman": None if rho != rho else rho,
            "same_rounded_score": sum(round(p) == round(q) for p, q in both) / len(both)}
