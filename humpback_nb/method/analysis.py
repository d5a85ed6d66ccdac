"""The paper's analyses at the run's scale: the tags ablation (Table 8), curation quality (Table 7) and data
scaling (Figure 3, Table 3). Each is a stage that reads the run folder and writes its own folder or file.

They reuse the method's pieces unchanged: `train_model` for every extra model, `evaluate.answer` for
answers, the run's judge, and the base model's answers from `eval/` as the common reference.
"""

from __future__ import annotations

import random
from typing import Any

from humpback_nb.config import CurateConfig, HumpbackConfig, with_overrides
from humpback_nb.infra.files import atomic_write_json, read_jsonl
from humpback_nb.infra.models import load_tokenizer
from humpback_nb.method.curate import rate_logprob, select, selection_threshold
from humpback_nb.method.evaluate import (
    answer,
    compare,
    eval_prompts,
    fit_alpha,
    load_generator,
    make_judge,
    precision_recall,
)
from humpback_nb.method.train import forward_examples, load_trained, train_model

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


def _base_answers(run_dir) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "eval" / "answers_base.jsonl")


def _judge(config: HumpbackConfig, run_dir):
    base, tokenizer = load_generator(config, run_dir, "base")
    return make_judge(config, base, tokenizer)


# -- Table 8: tags -------------------------------------------------------------------------------
def tags_stage(ctx) -> dict[str, Any]:
    """tags/: M2 answered with each inference tag, and a model trained like M2 without tags (paper Table 8)."""
    config, run_dir = ctx.config, ctx.run_dir
    prompts = eval_prompts(config)
    reference = _base_answers(run_dir)
    seed = [r for r in read_jsonl(run_dir / "seed.jsonl") if r["split"] == "train"]
    a2 = read_jsonl(run_dir / "A2.jsonl")
    out = ctx.path("tags")
    out.mkdir(exist_ok=True)
    untagged_dir = out / "m2_notags"
    if not (untagged_dir / "train_log.json").is_file():
        tokenizer = load_tokenizer(config.model)
        train_model(forward_examples(tokenizer, seed, a2, config.train.max_seq_length, tags=False), config, untagged_dir)
    variants = {"S_a/S_w, infer S_a+S_w": ("m2", "S_a+S_w"), "S_a/S_w, infer S_a": ("m2", "S_a"),
                "S_a/S_w, infer none": ("m2", "none"), "no tags": ("tags/m2_notags", "none")}
    judge = _judge(config, run_dir)
    results = {}
    for label, (model_dir, tag) in variants.items():
        model, tokenizer = load_trained(config, run_dir / model_dir)
        key = label.replace("/", "").replace(", ", "_").replace(" ", "_").replace("+", "")
        answers = answer(model, tokenizer, prompts, config, generator=f"humpback-nb-{key}", tags=tag,
                         partial=ctx.partial(f"tags.{key}"))
        del model
        results[label] = compare(judge, answers, reference)["overall"] | {"paper": PAPER_TABLE8[label]}
    atomic_write_json(out / "win_rates.json", {"reference": "base", **results})
    return {label: r["win_rate"] for label, r in results.items()}


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


def selection_stage(ctx) -> dict[str, Any]:
    """selection.json: precision and recall of M0 and M1 as selectors on a labelled set (paper Table 7)."""
    config, run_dir = ctx.config, ctx.run_dir
    heldout = [r for r in read_jsonl(run_dir / "seed.jsonl") if r["split"] == "heldout"]
    pairs = labelled_set(heldout, read_jsonl(run_dir / "candidates.jsonl"), config.evaluate.selection_positives,
                         config.random_seed)
    positives = {p["id"] for p in pairs if p["label"] == 1}
    share = len(positives) / max(1, len(pairs))
    results = {}
    for name in ("m0", "m1"):
        model, tokenizer = load_trained(config, run_dir / name)
        scores = rate_logprob(model, tokenizer, pairs, config, progress=False)
        k = selection_threshold(scores, CurateConfig(top_share=share))
        chosen = {p["id"] for p in select(pairs, scores, k)}
        results[name.upper()] = precision_recall(chosen, positives) | {"k": k, "paper": PAPER_TABLE7[name.upper()]}
    report = {"labels": "positives: held-out seed pairs; negatives: candidates with another candidate's output",
              "pairs": len(pairs), "positives": len(positives), "selected_share": share, **results}
    atomic_write_json(ctx.path("selection.json"), report)
    return {name: {"precision": r["precision"], "recall": r["recall"]} for name, r in results.items()}


# -- Figure 3 and Table 3: data scaling ----------------------------------------------------------
def scaling_sources(candidates: list[dict], scores: list[dict], rng_seed: int) -> dict[str, list[dict]]:
    """Augmented data of three qualities, best first: A5 and A4 (the shares of the paper's A5 and A4 among
    the candidates, by M1's scores) and no curation (a random order)."""
    sources = {}
    for name, share in PAPER_SHARES.items():
        k = selection_threshold(scores, CurateConfig(top_share=share))
        chosen = select(candidates, scores, k)
        sources[name] = sorted(chosen, key=lambda c: -c["score"])
    shuffled = list(candidates)
    random.Random(rng_seed).shuffle(shuffled)
    sources["no curation"] = shuffled
    return sources


def scaling_stage(ctx) -> dict[str, Any]:
    """scaling/: win rate against the base model of models trained on N augmented pairs of each quality."""
    config, run_dir = ctx.config, ctx.run_dir
    out = ctx.path("scaling")
    out.mkdir(exist_ok=True)
    sizes = config.evaluate.scaling_sizes
    results: dict[str, Any] = {"sizes": sizes, "reference": "base", "sources": {}}
    if sizes:
        prompts = eval_prompts(config)
        reference = _base_answers(run_dir)
        sources = scaling_sources(read_jsonl(run_dir / "candidates.jsonl"), read_jsonl(run_dir / "scores_m1.jsonl"),
                                  config.random_seed)
        judge = _judge(config, run_dir)
        tokenizer = load_tokenizer(config.model)
        # steps of each model: the paper's rule for N (or the preset's steps), capped by scaling_steps
        small = with_overrides(config, {"train.max_steps": config.evaluate.scaling_steps or config.train.max_steps})
        for source, pool in sources.items():
            points = []
            for n in sizes:
                if n > len(pool):
                    continue  # this quality has fewer pairs than N at this scale
                name = f"{source.replace(' ', '_')}_{n}"
                model_dir = out / name
                if not (model_dir / "train_log.json").is_file():
                    examples = forward_examples(tokenizer, [], pool[:n], config.train.max_seq_length, config.train.tags)
                    train_model(examples, small, model_dir)
                model, model_tokenizer = load_trained(config, model_dir)
                answers = answer(model, model_tokenizer, prompts, config, generator=f"humpback-nb-{name}",
                                 partial=ctx.partial(f"scaling.{name}"))
                del model
                overall = compare(judge, answers, reference)["overall"]
                points.append({**overall, "prompts": overall["n"], "n": n})
            fit = fit_alpha([p["n"] for p in points], [p["win_rate"] for p in points]) if len(points) > 1 else None
            results["sources"][source] = {"available": len(pool), "points": points,
                                          "alpha": fit[0] if fit else None, "C": fit[1] if fit else None}
    atomic_write_json(out / "results.json", results)
    return {source: r["alpha"] for source, r in results["sources"].items()}


def alpha_label(alpha: float | None) -> str:
    return "-" if alpha is None else f"{alpha:.2f}"
