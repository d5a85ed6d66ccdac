"""The paper's analyses, as functions of records: the tags ablation (Table 8), how well a model selects
(Table 7, "selector quality", not to be confused with A_k selection), and data scaling (Figure 3, Table 3).

The stages that run them (stages.py) reuse the method's pieces unchanged: the same training for every extra
model, the same answers, the run's judge, and the base model's answers as the common reference.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from humpback_nb.config import ConfigError, CurateConfig
from humpback_nb.infra.files import RecordError, parse_jsonl
from humpback_nb.method.curate import select, selection_threshold
from humpback_nb.method.data.inputs import read_input_text

# Li et al. 2023, Table 8 (v1; Table 5 in v3): win rate % of 7B models, by training and inference tags.
PAPER_TABLE8 = {"S_a/S_w, infer S_a+S_w": 66.47, "no tags": 59.96, "S_a/S_w, infer S_a": 62.69,
                "S_a/S_w, infer none": 62.70}
# Table 7 (v1; Table 9 in v3): selection quality on 250 candidates labelled by an expert (20% positives), and the
# win rate % (against text-davinci-003) of a 7B model trained on 100 pairs each selector picked.
PAPER_TABLE7 = {"M0": {"precision": 0.44, "recall": 0.09, "win_rate": 35.71},
                "M1": {"precision": 0.52, "recall": 0.44, "win_rate": 37.70},
                "GPT-4": {"precision": 0.88, "recall": 0.92, "win_rate": 41.04}}
# Table 3: alpha of w = alpha * log N + C for 7B models trained on each data set.
PAPER_TABLE3 = {"Humpback": 6.95, "WizardLLM": 5.69, "Alpaca-GPT4": 5.40, "Vicuna": 4.53, "Open Assistant": 4.43,
                "LIMA": 2.86, "Alpaca": 1.99, "FLAN v2": 0.22}
# The shares of the paper's A5 and A4 among its 502,133 candidates (Table 2).
PAPER_SHARES = {"A5": 41821 / 502133, "A4": 195043 / 502133}

# Table 8's rows: (the model: trained with tags or not, the system prompt at inference).
TABLE8_VARIANTS = {"S_a/S_w, infer S_a+S_w": ("tagged", "S_a+S_w"), "S_a/S_w, infer S_a": ("tagged", "S_a"),
                   "S_a/S_w, infer none": ("tagged", "none"), "no tags": ("untagged", "none")}


# -- Table 7: how well M0, M1 and an endpoint select ------------------------------------------------
NEGATIVES_PER_POSITIVE = 4  # 20% positives, as the paper's 250 labelled candidates


def labelled_set(seed_heldout: list[dict], candidates: list[dict], positives: int, rng_seed: int) -> list[dict]:
    """A labelled set with 20% positives, as in the paper's Table 7 (50 positives of 250). Labels come from
    construction, not from people: positives are held-out seed pairs (answers written for their instruction),
    negatives are candidates whose output was swapped with another candidate's (an answer to some other request).
    Too few held-out pairs is a config error: a smaller set would not be the paper's."""
    if len(seed_heldout) < positives:
        raise ConfigError(f"Table 7 needs {positives} held-out seed pairs as positives (evaluate.selection_positives)"
                          f" but the seed stage kept {len(seed_heldout)} (data.heldout_size): raise "
                          f"data.heldout_size to {positives}, lower evaluate.selection_positives, or give "
                          "people's labels in evaluate.selection_labels")
    rng = random.Random(rng_seed)
    chosen = rng.sample(seed_heldout, positives)
    pool = rng.sample(candidates, min(len(candidates), NEGATIVES_PER_POSITIVE * positives))
    negatives = [{"id": f"negative-{a['id']}", "instruction": a["instruction"], "output": b["output"], "label": 0}
                 for a, b in zip(pool, pool[1:] + pool[:1], strict=True)] if len(pool) > 1 else []
    return [{"id": f"positive-{p['id']}", "instruction": p["instruction"], "output": p["output"], "label": 1}
            for p in chosen] + negatives


def read_labels(path: str | Path) -> list[dict]:
    """People's labels for Table 7 (`evaluate.selection_labels`): a JSONL file of {"instruction", "output",
    "label"}, label 1 (a good example) or 0 (.gz, .bz2, .xz allowed); a file that cannot be read or a bad line
    raises RecordError naming the file, the line and the problem."""
    path = Path(path).expanduser()
    pairs = []
    for line, record in parse_jsonl(read_input_text(path, "evaluate.selection_labels"), path):
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise RecordError(f"{path}, line {line}: {key!r} must be a non-empty string")
        if record.get("label") not in (0, 1) or isinstance(record.get("label"), float):
            raise RecordError(f"{path}, line {line}: 'label' must be 1 (a good example) or 0, "
                              f"got {record.get('label')!r}")
        pairs.append({"id": f"labelled-{line}", "instruction": record["instruction"], "output": record["output"],
                      "label": int(record["label"])})
    if not any(p["label"] for p in pairs):
        raise RecordError(f"{path}: no pair is labelled 1, so recall means nothing")
    return pairs


def selector_quality(pairs: list[dict], scores: list[dict], k: float) -> dict:
    """Precision and recall of a selector that keeps the labelled pairs it scored >= k, k the rule it curates the
    candidates with: the selection size is the selector's own, so precision and recall are measured, not forced
    equal (the paper's M0 keeps few pairs: precision 0.44, recall 0.09)."""
    from humpback_nb.method.winrates import precision_recall

    positives = {p["id"] for p in pairs if p["label"] == 1}
    chosen = {p["id"] for p in select(pairs, scores, k)}
    rated = sum(s["score"] is not None for s in scores)
    return precision_recall(chosen, positives) | {"k": k, "parse_rate": rated / max(1, len(scores))}


def training_sample(selected: list[dict], size: int, rng_seed: int | str) -> list[dict]:
    """The pairs a Table 7 model trains on: `size` drawn at random from a selector's selection (all of them when
    it picked fewer), not its best-scored ones, so the win rate measures the selection and not its top."""
    return random.Random(rng_seed).sample(selected, min(size, len(selected)))


def pick_by_rating(rate_pairs: Callable[[list[dict]], list[dict]], candidates: list[dict], k: float, size: int,
                   rng_seed: int | str) -> tuple[list[dict], int]:
    """(the first `size` candidates a rater scores >= k, how many it rated): candidates are rated a chunk at a
    time in a seeded random order until `size` are picked, for a paid rater that has not rated them all."""
    order = random.Random(rng_seed).sample(candidates, len(candidates))
    picked, rated = [], 0
    while len(picked) < size and rated < len(order):
        chunk = order[rated : rated + max(1, size)]
        picked += select(chunk, rate_pairs(chunk), k)
        rated += len(chunk)
    return picked[:size], rated


def labels_note(labels_file: str | None) -> str:
    """Where Table 7's labels come from, in words."""
    if labels_file:
        return f"people's labels from {labels_file}"
    return "positives: held-out seed pairs; negatives: candidates with another candidate's output"


# -- Figure 3 and Table 3: data scaling ----------------------------------------------------------
# How the N pairs of a model are drawn, and what it trains on, as the analysis file says it.
SCALING_DRAW = ("each set in a random order of its own (seeded by random_seed and the set's name); a model of size "
                "N trains on the first N: random draws, nested (the N=800 sample holds the N=100 one)")
# The paper's Figure 3 compares "finetuning on augmented data of different quality" (section 3.3), and section
# 3.6.2 restates its finding as "training on self-augmented data alone (without seed data)": no seed pairs.
SCALING_TRAINING = "the N augmented pairs alone (tag S_w), no seed pairs, as the paper's Figure 3 (sections 3.3, 3.6.2)"
LOG_BASE = "e"  # w = alpha ln N + C: the paper does not name its base; log10 would give alphas 2.303 times larger


NO_CURATION = "no curation"


WHOLE_SCORES = ("generate", "endpoint")  # raters whose scores are the paper's whole numbers


def quality_sets(rater: str, scores: list[dict]) -> dict[str, tuple[float, str]]:
    """Figure 3's curated sets by M1's `scores`: {name: (k, the rule in words)}, a set holding the pairs scored >= k.

    The `generate` and `endpoint` raters score in whole numbers, as the paper's did: their A5 (score 5) and A4
    (score >= 4) then mean what the paper's mean, ties included. The `logprob` rater's expected scores are
    continuous and bunch up where a small model puts its probability, so a fixed k keeps other shares at another
    scale: its sets are the shares the paper's A5 and A4 had among the candidates (Table 2), named by their share."""
    a5, a4 = quality_names(rater)
    if rater in WHOLE_SCORES:
        return {a5: (5, "score 5 (the paper's A5)"), a4: (4, "score >= 4 (the paper's A4)")}
    return {ours: (selection_threshold(scores, CurateConfig(top_share=share)),
                   f"the best {share:.1%} of the expected scores (the share of the paper's {paper})")
            for ours, (paper, share) in zip((a5, a4), PAPER_SHARES.items(), strict=True)}


def quality_names(rater: str) -> tuple[str, str]:
    """The names of Figure 3's two curated sets (`quality_sets`) for a rater: the paper's A5 and A4 first."""
    return ("A5", "A4") if rater in WHOLE_SCORES else tuple(f"top {share:.1%}" for share in PAPER_SHARES.values())


def scaling_model_name(source: str, n: int) -> str:
    """The model Figure 3 trains on `n` pairs of the set `source`: scaling_a5_100, scaling_top_8_3_100."""
    return f"scaling_{re.sub(r'[^a-z0-9]+', '_', source.lower()).strip('_')}_{n}"


def scaling_sources(candidates: list[dict], scores: list[dict], rng_seed: int,
                    rater: str = "logprob") -> dict[str, list[dict]]:
    """Augmented data of three qualities, each shuffled with its own seeded generator: the two curated sets of
    `quality_sets` by M1's scores ("A5" and "A4" for whole-number scores, "top 8.3%" and "top 38.8%" for expected
    ones) and "no curation" (every candidate). A model of size N trains on a set's first N pairs: a random sample
    of the set, nested across N, and drawn apart from the other sets' (the first set lies inside the second, yet
    their samples at equal N differ), so small N is not always the very best pairs."""
    sources = {name: select(candidates, scores, k) for name, (k, _) in quality_sets(rater, scores).items()}
    sources[NO_CURATION] = list(candidates)
    return {name: random.Random(f"{rng_seed}:{name}").sample(pool, len(pool)) for name, pool in sources.items()}


def scaling_fit(points: list[dict]) -> dict:
    """alpha, C and alpha's standard error of w = alpha ln N + C over the points with a win rate (None where
    fewer than two sizes have one; the standard error needs three)."""
    from humpback_nb.method.winrates import fit_alpha

    rated = [p for p in points if p["win_rate"] is not None]  # None: every judge reply was unparsed
    if len(rated) < 2:
        return {"alpha": None, "C": None, "alpha_se": None, "fit_points": len(rated)}
    alpha, c, se = fit_alpha([p["n"] for p in rated], [p["win_rate"] for p in rated], with_se=True)
    return {"alpha": alpha, "C": c, "alpha_se": se, "fit_points": len(rated)}
