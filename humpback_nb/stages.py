"""Humpback, top to bottom: every stage of the method in the paper's order (Li et al. 2023, arXiv 2308.06259).

    seed, segments -> backward (M_yx) -> candidates (self-augmentation) -> m0 -> rate_m0 -> A1 -> m1 -> rate_m1
    -> A2 -> m2 (Humpback) -> eval -> the paper's analyses (tags, selectors, scaling) -> summary

Each stage is a short function declared where it is defined: what it writes (artifacts of run.RunFiles), which
stages it reads, which config sections it reads (and may read: `run.config` refuses any other, so a stage's hash
covers what it reads). It reads its inputs through `run.files`, calls the method's modules (method/: pure
functions of records, models and settings) and writes its outputs; run.py skips it when nothing it reads has
changed. Heavy modules are imported inside the stages, so that `humpback status` loads no torch.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from humpback_nb.infra.files import atomic_dir, atomic_write_json, write_jsonl
from humpback_nb.run import ALL_SECTIONS, Stage, StageRun

STAGES: list[Stage] = []


def stage(name: str, *, outputs: tuple[str, ...], after: tuple[str, ...] = (), sections: tuple[str, ...] = ()):
    """Declare a stage of the method: the function below it makes `outputs` from the stages `after`."""
    def declare(function):
        doc = (function.__doc__ or "").strip().splitlines()[0]
        STAGES.append(Stage(name, outputs, after, sections, function, doc))
        return function

    return declare


# -- 1. Data (paper section 2.1, 3.1) ---------------------------------------------------------------------------
@stage("seed", outputs=("seed_file",), sections=("data", "random_seed"))
def seed(run: StageRun) -> dict:
    """seed pairs: human-written (instruction, output) pairs, split "train" and "heldout"."""
    from humpback_nb.method.data.seed import build_seed

    records, counts = build_seed(run.config.data, run.config.random_seed)
    write_jsonl(run.files.seed_file(), records)
    return counts


@stage("segments", outputs=("segments_file", "segments_dropped_file", "segments_report_file"),
       sections=("data", "random_seed"))
def segments(run: StageRun) -> dict:
    """unlabelled segments: web text cut at headers, filtered as in the paper, sampled."""
    from humpback_nb.method.data.segments import build_segments

    kept, dropped, report = build_segments(run.config.data, run.config.random_seed)
    write_jsonl(run.files.segments_dropped_file(), dropped)
    atomic_write_json(run.files.segments_report_file(), report)
    write_jsonl(run.files.segments_file(), kept)
    return report


# -- 2. The backward model M_yx (section 2.2) -------------------------------------------------------------------
@stage("backward", outputs=("model_dir:backward",), after=("seed",), sections=("model", "train"))
def backward(run: StageRun) -> dict:
    """backward model M_yx: the base model fine-tuned on the seed pairs reversed (output -> instruction)."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.train import backward_example

    def examples() -> list[dict]:
        tokenizer = load_tokenizer(run.config.model)
        return [backward_example(tokenizer, r["instruction"], r["output"], run.config.train.max_seq_length)
                for r in run.files.seed_pairs("train")]

    return train(run, "backward", examples, run.config.train, data={"seed": run.upstream["seed"]})


# -- 3. Self-augmentation (section 2.2) -------------------------------------------------------------------------
@stage("candidates", outputs=("candidates_file", "candidates_dropped_file", "candidates_report_file"),
       after=("backward", "segments"), sections=("model", "generate"))
def candidates(run: StageRun) -> dict:
    """self-augmentation: M_yx writes an instruction for every segment; degenerate ones are set aside."""
    from humpback_nb.infra.models import load_trained
    from humpback_nb.method.augment import self_augment

    model, tokenizer = load_trained(run.config.model, run.files.model_dir("backward"))
    started = time.time()
    partial = run.partial(run.files.candidates_file())
    kept, dropped, report = self_augment(model, tokenizer, run.files.segments(), run.config.generate,
                                         run.config.model.context_length, partial=partial)
    report["seconds_this_run"] = round(time.time() - started, 2)
    write_jsonl(run.files.candidates_dropped_file(), dropped)
    atomic_write_json(run.files.candidates_report_file(), report)
    write_jsonl(run.files.candidates_file(), kept)
    return report


# -- 4. Self-curation: M0 rates, A(1)_k (section 2.3) -----------------------------------------------------------
@stage("m0", outputs=("model_dir:m0",), after=("seed",), sections=("model", "train"))
def m0(run: StageRun) -> dict:
    """M0: the base model fine-tuned on the seed pairs only (tag S_a)."""
    return train_forward(run, "m0", augmented=None)


@stage("rate_m0", outputs=("scores_file:m0",), after=("m0", "candidates"), sections=("model", "curate"))
def rate_m0(run: StageRun) -> dict:
    """self-curation: M0 rates every candidate with the paper's 5-point prompt."""
    return rate_candidates(run, "m0")


@stage("A1", outputs=("curated_file:1", "curated_info_file:1"), after=("rate_m0", "candidates"),
       sections=("curate",))
def a1(run: StageRun) -> dict:
    """A(1)_k: the candidates M0 scored >= k."""
    return curate(run, scored_by="m0", iteration=1)


# -- 5. Iteration: M1 rates again, A(2)_k, M2 = Humpback (section 2.3) ------------------------------------------
@stage("m1", outputs=("model_dir:m1",), after=("seed", "A1"), sections=("model", "train"))
def m1(run: StageRun) -> dict:
    """M1: fine-tuned on the seed pairs (S_a) and A(1)_k (S_w)."""
    return train_forward(run, "m1", augmented=1)


@stage("rate_m1", outputs=("scores_file:m1",), after=("m1", "candidates"), sections=("model", "curate"))
def rate_m1(run: StageRun) -> dict:
    """self-curation again: M1 rates every candidate."""
    return rate_candidates(run, "m1")


@stage("A2", outputs=("curated_file:2", "curated_info_file:2"), after=("rate_m1", "candidates"),
       sections=("curate",))
def a2(run: StageRun) -> dict:
    """A(2)_k: the candidates M1 scored >= k."""
    return curate(run, scored_by="m1", iteration=2)


@stage("m2", outputs=("model_dir:m2",), after=("seed", "A2"), sections=("model", "train"))
def m2(run: StageRun) -> dict:
    """M2 (Humpback): fine-tuned on the seed pairs (S_a) and A(2)_k (S_w)."""
    return train_forward(run, "m2", augmented=2)


# -- 6. Evaluation (section 4) ----------------------------------------------------------------------------------
GENERATORS = ("base", "m0", "m1", "m2")
COMPARISONS = (("m2", "m0"), ("m1", "m0"), ("m0", "base"), ("m2", "base"))


@stage("eval", outputs=("eval_dir",), after=("m0", "m1", "m2"), sections=("model", "generate", "evaluate"))
def evaluate(run: StageRun) -> dict:
    """evaluation: answers of the base model, M0, M1 and M2, judged in both orders; win rates."""
    from humpback_nb.method.evaluate import eval_prompts, write_model_outputs
    from humpback_nb.method.judges import judge_name, make_judge
    from humpback_nb.method.winrates import compare

    settings = run.config.evaluate
    prompts = eval_prompts(settings)
    answers, judge = {}, None
    for name in GENERATORS:
        model, tokenizer = load(run, name)
        partial = run.partial(run.files.eval_dir(), part=f"answers_{name}")
        answers[name] = answer(run, model, tokenizer, prompts, name, settings.inference_tags, partial)
        if name == "base":
            judge = make_judge(settings, model, tokenizer)  # the local judge is the base model: load it once
        del model
    results = {}
    for x, y in COMPARISONS:  # each pair's judgment is kept as it comes: a rerun asks only for the missing ones
        key = f"{x}_vs_{y}"
        judged = run.partial(run.files.eval_dir(), part=f"judge_{key}")
        results[key] = compare(judge, answers[x], answers[y], partial=judged, progress=True, desc=f"judging {key}")
    with atomic_dir(run.files.eval_dir()) as tmp:
        for name, rows in answers.items():
            # AlpacaEval's file holds its own prompts only; every answer, with its prompt id, is in the JSONL
            write_model_outputs(run.files.model_outputs_file(name, tmp),
                                [r for r in rows if r["id"].startswith("alpaca_eval-")])
            write_jsonl(run.files.answers_file(name, tmp), rows)
        for key, result in results.items():
            write_jsonl(run.files.judgments_file(key, tmp), result.pop("judgments"))
        atomic_write_json(run.files.win_rates_file(tmp), {"judge": judge_name(settings), "prompts": len(prompts),
                                                          "inference_tags": settings.inference_tags, **results})
    return {key: result["overall"] for key, result in results.items()}


# -- 7. The paper's analyses ------------------------------------------------------------------------------------
@stage("tags", outputs=("analysis_file:table8_tags",), after=("seed", "A2", "m2", "eval"),
       sections=("model", "train", "generate", "evaluate"))
def tags(run: StageRun) -> dict:
    """Table 8: M2 answered with each inference tag, and a model trained like M2 without tags."""
    from humpback_nb.method.analysis import PAPER_TABLE8, TABLE8_VARIANTS
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.winrates import compare

    untagged = train_forward(run, "m2_untagged", augmented=2, train_settings=replace(run.config.train, tags=False))
    prompts, reference, judge = eval_prompts(run.config.evaluate), run.files.answers("base"), base_judge(run)
    results = {}
    for label, (which, tag) in TABLE8_VARIANTS.items():
        model, tokenizer = load(run, "m2" if which == "tagged" else "m2_untagged")
        key = f"{which}_{tag.replace('+', '')}"
        partial = run.partial(run.files.analysis_file("table8_tags"), part=key)
        answers = answer(run, model, tokenizer, prompts, key, tag, partial)
        del model
        judged = run.partial(run.files.analysis_file("table8_tags"), part=f"judge_{key}")
        overall = compare(judge, answers, reference, partial=judged, progress=True, desc=f"judging {key}")["overall"]
        results[label] = overall | {"paper": PAPER_TABLE8[label]}
    atomic_write_json(run.files.analysis_file("table8_tags"), {"reference": "base", "untagged_model":
                                                               untagged["model"], **results})
    return {label: r["win_rate"] for label, r in results.items()}


@stage("selectors", outputs=("analysis_file:table7_selectors",), after=("seed", "candidates", "m0", "m1"),
       sections=("model", "curate", "evaluate", "random_seed"))
def selectors(run: StageRun) -> dict:
    """Table 7: precision and recall of M0 and M1 as selectors on a labelled set with 20% positives."""
    from humpback_nb.method.analysis import PAPER_TABLE7, labelled_set, selector_quality
    from humpback_nb.method.curate import rate_logprob

    pairs = labelled_set(run.files.seed_pairs("heldout"), run.files.candidates(),
                         run.config.evaluate.selection_positives, run.config.random_seed)
    results = {}
    for name in ("m0", "m1"):
        model, tokenizer = load(run, name)
        scores = rate_logprob(model, tokenizer, pairs, run.config.curate, run.config.model.context_length,
                              progress=False)
        results[name.upper()] = selector_quality(pairs, scores) | {"paper": PAPER_TABLE7[name.upper()]}
    positives = sum(p["label"] for p in pairs)
    report = {"labels": "positives: held-out seed pairs; negatives: candidates with another candidate's output",
              "rater": "logprob", "pairs": len(pairs), "positives": positives,
              "selected_share": positives / max(1, len(pairs)), **results}
    atomic_write_json(run.files.analysis_file("table7_selectors"), report)
    return {name: {"precision": r["precision"], "recall": r["recall"]} for name, r in results.items()}


@stage("scaling", outputs=("analysis_file:figure3_scaling",), after=("candidates", "rate_m1", "eval"),
       sections=("model", "train", "generate", "evaluate", "random_seed"))
def scaling(run: StageRun) -> dict:
    """Figure 3 / Table 3: win rate of models trained on N augmented pairs of each quality, against N."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.analysis import scaling_sources
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.train import forward_examples
    from humpback_nb.method.winrates import compare, fit_alpha

    settings = run.config.evaluate
    results: dict[str, Any] = {"sizes": settings.scaling_sizes, "reference": "base", "sources": {}}
    if settings.scaling_sizes:
        prompts, reference, judge = eval_prompts(settings), run.files.answers("base"), base_judge(run)
        sources = scaling_sources(run.files.candidates(), run.files.scores("m1"), run.config.random_seed)
        # steps of each model: the paper's rule for N (or the preset's steps), capped by scaling_steps
        small = replace(run.config.train, max_steps=settings.scaling_steps or run.config.train.max_steps)
        data = {"candidates": run.upstream["candidates"], "rate_m1": run.upstream["rate_m1"],
                "random_seed": run.config.random_seed}
        for source, pool in sources.items():
            points = []
            for n in settings.scaling_sizes:
                if n > len(pool):
                    continue  # this quality has fewer pairs than N at this scale
                name = f"scaling_{re.sub(r'[^a-z0-9]+', '_', source).strip('_')}_{n}"  # scaling_top_8_3_100

                def examples(pool=pool, n=n) -> list[dict]:
                    tokenizer = load_tokenizer(run.config.model)
                    return forward_examples(tokenizer, [], pool[:n], small.max_seq_length, small.tags)

                train(run, name, examples, small, data=data | {"source": source, "n": n})
                model, tokenizer = load(run, name)
                partial = run.partial(run.files.analysis_file("figure3_scaling"), part=name)
                judged = run.partial(run.files.analysis_file("figure3_scaling"), part=f"judge_{name}")
                answers = answer(run, model, tokenizer, prompts, name, settings.inference_tags, partial)
                overall = compare(judge, answers, reference, partial=judged, progress=True,
                                  desc=f"judging {name}")["overall"]
                del model
                points.append({**overall, "prompts": overall["n"], "n": n, "model": name})
            rated = [p for p in points if p["win_rate"] is not None]  # None: every judge reply was unparsed
            fit = fit_alpha([p["n"] for p in rated], [p["win_rate"] for p in rated]) if len(rated) > 1 else None
            results["sources"][source] = {"available": len(pool), "points": points,
                                          "alpha": fit[0] if fit else None, "C": fit[1] if fit else None}
    atomic_write_json(run.files.analysis_file("figure3_scaling"), results)
    return {source: r["alpha"] for source, r in results["sources"].items()}


# -- 8. Every number in one file --------------------------------------------------------------------------------
@stage("summary", outputs=("summary_file",), after=("segments", "eval", "A1", "A2", "tags", "selectors", "scaling"),
       sections=ALL_SECTIONS)
def summary(run: StageRun) -> dict:
    """summary: every number of the run in one file (what notebook 07 and the README read)."""
    result = summarize(run.files, run.config.whole())
    atomic_write_json(run.files.summary_file(), result)
    return {"pipeline_seconds": result["pipeline_seconds"]}


def summarize(files, config) -> dict[str, Any]:
    """Sizes, Table 2 (with the k of each A_k), win rates, the analyses, stage times and reports, the config."""
    from humpback_nb.method.data.stats import table2

    manifests = {s.name: manifest for s in STAGES if (manifest := files.manifest(s.name)) is not None}
    curated = {i: files.curated(i) for i in (1, 2)}
    sets = {"seed": files.seed_pairs("train"), "candidates": files.candidates(),
            **{c.label(i): c.records for i, c in curated.items()}}
    win_rates = files.win_rates()
    return {
        "preset": config.preset,
        "config_hash": config.hash(),
        "sizes": {name: len(records) for name, records in sets.items()} | {"segments": len(files.segments())},
        "curated": {f"A{i}": {"k": c.k, "rule": c.rule, "size": len(c.records)} for i, c in curated.items()},
        "table2": table2(sets, paper_rows={"candidates": "augmented, all", curated[2].label(2): "A5^(2)"}),
        "win_rates": {key: {"overall": value["overall"], "per_dataset": value["per_dataset"]}
                      for key, value in win_rates.items() if isinstance(value, dict) and "overall" in value},
        "judge": win_rates.get("judge"),
        "table8_tags": files.analysis("table8_tags"),
        "table7_selectors": files.analysis("table7_selectors"),
        "figure3_scaling": files.analysis("figure3_scaling"),
        "stage_seconds": {name: m["seconds"] for name, m in manifests.items()},
        "pipeline_seconds": round(sum(m["seconds"] for m in manifests.values()), 1),
        "stage_reports": {name: m["report"] for name, m in manifests.items() if m.get("report")},
        "config": config.to_dict(),
    }


# -- what several stages do ---------------------------------------------------------------------------------------
def train(run: StageRun, name: str, examples, settings, data: dict[str, Any]) -> dict:
    """Train model `name` on `examples()` with `settings` (a TrainConfig) unless a model made with the same base
    model, settings and data (`data`: the hashes or choices that fix its examples) is there; its training log."""
    from humpback_nb.method.train import train_model

    def fit(folder: Path, checkpoints: Path) -> None:
        train_model(examples(), run.config.model, settings, folder, checkpoints=checkpoints)

    run.trained(name, {"model": asdict(run.config.model), "train": asdict(settings), "data": data}, fit)
    return {"model": name, **{k: v for k, v in run.files.train_log(name).items() if k != "steps"}}


def train_forward(run: StageRun, name: str, augmented: int | None, train_settings=None) -> dict:
    """A forward model (instruction -> output): the seed pairs tagged S_a, plus A^(augmented)_k tagged S_w."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.train import forward_examples

    settings = train_settings or run.config.train

    def examples() -> list[dict]:
        tokenizer = load_tokenizer(run.config.model)
        extra = run.files.curated(augmented).records if augmented else []
        return forward_examples(tokenizer, run.files.seed_pairs("train"), extra, settings.max_seq_length,
                                tags=settings.tags)

    data = {"seed": run.upstream["seed"]} | ({f"A{augmented}": run.upstream[f"A{augmented}"]} if augmented else {})
    return train(run, name, examples, settings, data)


def rate_candidates(run: StageRun, model_name: str) -> dict:
    """`model_name` rates every candidate with the rater of `curate.rater`; the parse rate goes with the scores."""
    from humpback_nb.method.curate import parse_rate, rate

    model, tokenizer = load(run, model_name)
    settings = run.config.curate
    started = time.time()
    scores = rate(model, tokenizer, run.files.candidates(), settings, run.config.model.context_length,
                  partial=run.partial(run.files.scores_file(model_name)))
    seconds = time.time() - started
    write_jsonl(run.files.scores_file(model_name),
                [dict(s, rater=settings.rater, model=model_name, tag=settings.rater_tag) for s in scores])
    return {"pairs": len(scores), "parse_rate": parse_rate(scores), "seconds_this_run": round(seconds, 2)}


def curate(run: StageRun, scored_by: str, iteration: int) -> dict:
    """A^(iteration)_k from the scores of `scored_by`, with the k that made it written beside it."""
    from humpback_nb.method.curate import curated_set

    chosen, info = curated_set(run.files.candidates(), run.files.scores(scored_by), run.config.curate)
    info["scored_by"] = scored_by
    atomic_write_json(run.files.curated_info_file(iteration), info)
    write_jsonl(run.files.curated_file(iteration), chosen)
    return info


def load(run: StageRun, name: str):
    """(model, tokenizer): the base model ("base"), or a model of this run (`models/<name>`)."""
    from humpback_nb.infra.models import load_model, load_trained

    if name == "base":
        return load_model(run.config.model)
    return load_trained(run.config.model, run.files.model_dir(name))


def answer(run: StageRun, model, tokenizer, prompts: list[dict], name: str, tags: str, partial: Path) -> list[dict]:
    """`name`'s answers to the evaluation prompts, with the system prompt `tags`, in AlpacaEval's format."""
    from humpback_nb.method.evaluate import answer as answers

    return answers(model, tokenizer, prompts, run.config.generate, generator=f"humpback-nb-{name}", tags=tags,
                   partial=partial)


def base_judge(run: StageRun):
    """The run's judge (`evaluate.judge`): the base model, or an endpoint."""
    from humpback_nb.method.judges import make_judge

    if run.config.evaluate.judge_url:
        return make_judge(run.config.evaluate)
    model, tokenizer = load(run, "base")
    return make_judge(run.config.evaluate, model, tokenizer)
