"""The paper's analyses, as functions of records: the tags ablation (Table 8), how well a model selects
(Table 7, "selector quality", not to be confused with A_k selection), and data scaling (Figure 3, Table 3).

The stages that run them (stages.py) reuse the method's pieces unchanged: the same training for every extra
model, the same answers, the run's judge, and the base model's answers as the common reference.
"""

from __future__ import annotations

import random

from humpback_nb.config import CurateConfig
from humpback_nb.method.curate import select, selection_threshold

# Li et al. 2023, Table 8 (v1; Table 5 in v3): win rate % of 7B models, by training and inference tags.
PAPER_TABLE8 = {"S_a/S_w, infer S_a+S_w": 66.47, "no tags": 59.96, "S_a/S_w, infer S_a": 62.69,
                "S_a/S_w, infer none": 62.70}
# Table 7 (v1; Table 9 in v3): selection quality on 250 labelled candidates (20% positives).
PAPER_TABLE7 = {"M0": {"precision": 0.44, "recall": 0.09}, "M1": {"precision": 0.52, "recall": 0.44},
                "GPT-4": {"precision": 0.88, "recall": 0.92}}
# Table 3: alpha of w = alpha * log N + C for 7B models trained on each data set.
PAPER_TABLE3 = {"Humpback": 6.95, "WizardLLM": 5.69, "Alpaca-GPT4": 5.40, "Vicuna": 4.53, "Open Assistant": 4.43,
                "LIMA": 2.86, "Alpaca": 1.99, "FLAN v2": 0.22}
# The shares of the paper's A5 and A4 among its 502,133 candidates (Table 2).
PAPER_SHARES = {"A5": 41821 / 502133, "A4": 195043 / 502133}

# Table 8's rows: (the model: trained with tags or not, the system prompt at inference).
TABLE8_VARIANTS = {"S_a/S_w, infer S_a+S_w": ("tagged", "S_a+S_w"), "S_a/S_w, infer S_a": ("tagged", "S_a"),
                   "S_a/S_w, infer none": ("tagged", "none"), "no tags": ("untagged", "none")}


# -- Table 7: how well M0 and M1 select ------------------------------------------------------------
def labelled_set(seed_heldout: list[dict], candidates: list[dict], positives: int, rng_seed: int) -> list[dict]:
    """A labelled set with 20% positives, as in the paper's Table 7. Labels come from construction, not from
    people: positives are held-out seed pairs (answers written for their instruction), negatives are
    candidates whose output was swapped with another candidate's (an answer to some other request)."""
    rng = random.Random(rng_seed)
    chosen = rng.sample(seed_heldout, min(positives, len(seed_heldout)))
    pool = rng.sample(candidates, min(len(candidates), 4 * len(chosen) + 1))
    negatives = [{"id": f"negative-{a['id']}", "instruction": a["instruction"], "output": b["output"], "label": 0}
                 for a, b in zip(pool, pool[1:], strict=False)][: 4 * len(chosen)]
    return [{"id": f"positive-{p['id']}", "instruction": p["instruction"], "output": p["output"], "label": 1}
            for p in chosen] + negatives


def selector_quality(pairs: list[dict], scores: list[dict]) -> dict:
    """Precision and recall of a rater that keeps the best-scored share of `pairs` equal to the share of positives
    (the paper's Table 7 compares selectors at one selection size)."""
    from humpback_nb.method.winrates import precision_recall

    positives = {p["id"] for p in pairs if p["label"] == 1}
    k = selection_threshold(scores, CurateConfig(top_share=len(positives) / max(1, len(pairs))))
    chosen = {p["id"] for p in select(pairs, scores, k)}
    return precision_recall(chosen, positives) | {"k": k}


# -- Figure 3 and Table 3: data scaling ----------------------------------------------------------
def scaling_sources(candidates: list[dict], scores: list[dict], rng_seed: int) -> dict[str, list[dict]]:
    """Augmented data of three qualities, best first: "top 8.3%" and "top 38.8%" of the candidates by M1's scores
    (the shares the paper's A5 and A4 had among its candidates: at another scale a fixed k keeps other shares, so
    the sets are named by their share, not by a k they were not made with) and "no curation" (a random order)."""
    sources = {}
    for share in PAPER_SHARES.values():
        k = selection_threshold(scores, CurateConfig(top_share=share))
        chosen = select(candidates, scores, k)
        sources[f"top {share:.1%}"] = sorted(chosen, key=lambda c: -c["score"])
    shuffled = list(candidates)
    random.Random(rng_seed).shuffle(shuffled)
    sources["no curation"] = shuffled
    return sources
