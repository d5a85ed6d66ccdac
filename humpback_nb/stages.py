"""Humpback, top to bottom: every stage of the method in the paper's order (Li et al. 2023, arXiv 2308.06259).

    seed, segments -> backward (M_yx) -> backward_check -> candidates (self-augmentation) -> m0 -> rate_m0 -> A1
    -> m1 -> rate_m1 -> A2 -> m2 (Humpback) -> heldout -> eval -> the paper's analyses (tags, selectors, scaling)
    -> summary

Each stage is a short function declared where it is defined: what it writes (artifacts of run.RunFiles), which
stages it reads, which config sections it reads (and may read: `run.config` refuses any other, so a stage's hash
covers what it reads). It reads its inputs through `run.files`, calls the method's modules (method/: pure
functions of records, models and settings) and writes its outputs; run.py skips it when nothing it reads has
changed. Heavy modules are imported inside the stages, so that `humpback status` loads no torch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from humpback_nb.infra.files import atomic_dir, atomic_write_json, write_jsonl
from humpback_nb.method.alpaca_eval import protocol
from humpback_nb.run import ALL_SECTIONS, PipelineError, Stage, StageRun

STAGES: list[Stage] = []


def stage(name: str, *, outputs: tuple[str, ...], after: tuple[str, ...] = (), sections: tuple[str, ...] = (),
          check=None):
    """Declare a stage of the method: the function below it makes `outputs` from the stages `after`; `check(config)`
    refuses, before a run starts, a config that cannot serve it."""
    def declare(function):
        doc = " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph, whole
        STAGES.append(Stage(name, outputs, after, sections, function, doc, check))
        return function

    return declare


LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def judge_ready(config) -> None:
    """The judge of the stages that judge: an endpoint (AlpacaEval's annotator, or `evaluate.judge_url`) needs its
    URL, and one off this machine its key, before the run spends hours reaching it; the local judge needs nothing."""
    from humpback_nb.method.alpaca_eval import ANNOTATOR

    settings = config.evaluate
    if settings.annotator != ANNOTATOR and not settings.judge_url:
        return
    kit = "or judge with the kit's own judge: evaluate.annotator=kit, evaluate.reference=base, evaluate.judge_url=null"
    if not settings.judge_url:
        raise PipelineError(f"evaluate.annotator {settings.annotator} judges at an endpoint, but evaluate.judge_url is "
                            f"not set: set it and the key in ${settings.judge_key_env} (evaluate.judge_key_env), {kit}")
    _key_ready(settings.judge_url, settings.judge_key_env, "evaluate.judge_url", "evaluate.judge_key_env", kit)


def rater_ready(config) -> None:
    """The rater "endpoint" needs its URL and model, and one off this machine its key, before the run starts; the
    run's own models need nothing. Stages that judge need their judge too (judge_ready)."""
    settings = config.curate
    if settings.rater == "endpoint":
        local = "or let the run's models rate: curate.rater=logprob (or generate)"
        missing = [k for k in ("rater_url", "rater_model") if not getattr(settings, k)]
        if missing:
            raise PipelineError(f"curate.rater endpoint needs {' and '.join('curate.' + k for k in missing)}: set "
                                f"{'them' if len(missing) > 1 else 'it'}, {local}")
        _key_ready(settings.rater_url, settings.rater_key_env, "curate.rater_url", "curate.rater_key_env", local)


def rater_and_judge_ready(config) -> None:
    rater_ready(config)
    judge_ready(config)


def _key_ready(url: str, key_env: str, url_key: str, env_key: str, instead: str) -> None:
    """An endpoint off this machine needs its key in the environment (a loopback server needs none)."""
    import os
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if not os.environ.get(key_env) and host not in LOOPBACK and not host.startswith("127."):
        raise PipelineError(f"{url_key} {url} needs a key, and ${key_env} ({env_key}) is not set: set it, {instead}")


# -- 1. Data (paper section 2.1, 3.1) ---------------------------------------------------------------------------
@stage("seed", outputs=("seed_file",), sections=("data", "random_seed"))
def seed(run: StageRun) -> dict:
    """seed pairs: human-written (instruction, output) pairs, split "train" and "heldout"."""
    from humpback_nb.method.data.seed import build_seed

    records, counts = build_seed(run.config.data, run.config.random_seed)
    write_jsonl(run.files.seed_file(), [dict(r, **conversation(r, "S_a")) for r in records])
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

    return train(run, "backward", examples, run.config.train, data={"seed": run.upstream["seed"]},
                 about=lambda: f"the {len(run.files.seed_pairs('train'))} seed pairs reversed (output -> instruction)")


BACKWARD_EXAMPLES = 5  # held-out outputs M_yx writes an instruction for in its check (notebook 02 shows them)


@stage("backward_check", outputs=("analysis_file:backward_heldout",), after=("seed", "backward"),
       sections=("model", "train", "generate", "random_seed"))
def backward_check(run: StageRun) -> dict:
    """M_yx's check: the held-out loss of each held-out seed pair's true instruction given its output, under the
    base model and under M_yx (paired bootstrap 95% interval), and the instructions M_yx writes for the first
    held-out outputs beside the true ones."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.augment import write_instructions
    from humpback_nb.method.sanity import loss_difference, resolved
    from humpback_nb.method.train import backward_example, example_losses

    pairs, settings = run.files.seed_pairs("heldout"), run.config.train
    tokenizer = load_tokenizer(run.config.model)
    examples = [backward_example(tokenizer, p["instruction"], p["output"], settings.max_seq_length) for p in pairs]
    losses = {}
    for name in ("base", "backward"):
        model, _ = load(run, name)
        losses[name] = example_losses(model, tokenizer, examples)
        if name == "backward":
            shown = pairs[:BACKWARD_EXAMPLES]
            written = write_instructions(model, tokenizer, [{"id": p["id"], "text": p["output"]} for p in shown],
                                         run.config.generate, run.config.model.context_length)
        del model
    tokens = sum(n for _, n in losses["base"])
    difference = loss_difference(losses["backward"], losses["base"], seed=run.config.random_seed)
    difference["resolved"] = resolved(difference)
    result = {"pairs": len(pairs), "tokens": tokens,
              "loss": {name: sum(x for x, _ in rows) / tokens if tokens else None for name, rows in losses.items()},
              "difference": difference,
              "examples": [{"id": p["id"], "output": p["output"], "true": p["instruction"],
                            "generated": w["text"].strip(), "finished": w.get("finished", True)}
                           for p, w in zip(shown, written, strict=True)]}
    atomic_write_json(run.files.analysis_file("backward_heldout"), result)
    return {"loss": result["loss"], "resolved": difference["resolved"]}


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


@stage("rate_m0", outputs=("scores_file:m0",), after=("seed", "m0", "candidates"),
       sections=("model", "curate", "random_seed"), check=rater_ready)
def rate_m0(run: StageRun) -> dict:
    """self-curation: M0 rates every candidate with the paper's 5-point prompt; the rater's check, and the two
    raters side by side on a few candidates, beside them."""
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


@stage("rate_m1", outputs=("scores_file:m1",), after=("seed", "m1", "candidates"),
       sections=("model", "curate", "random_seed"), check=rater_ready)
def rate_m1(run: StageRun) -> dict:
    """self-curation again: M1 rates every candidate; the rater's check beside them."""
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
HELDOUT_MODELS = ("base", "m0", "m1", "m2")
HELDOUT_DIFFERENCES = (("m1", "m0"), ("m2", "m0"), ("m2", "m1"), ("m0", "base"), ("m2", "base"))


@stage("heldout", outputs=("analysis_file:heldout_losses",), after=("seed", "m0", "m1", "m2"),
       sections=("model", "train", "evaluate", "random_seed"))
def heldout(run: StageRun) -> dict:
    """held-out loss: each model's loss per output token on the held-out seed pairs, and the differences between
    models with paired bootstrap 95% intervals; a number that resolves at any scale, whatever the judge."""
    from humpback_nb.method.sanity import loss_difference, resolved

    pairs, tag = run.files.seed_pairs("heldout"), run.config.evaluate.inference_tags
    losses = {name: heldout_losses(run, name, pairs, tag) for name in HELDOUT_MODELS}
    tokens = sum(n for _, n in losses["base"])
    result = {"pairs": len(pairs), "tokens": tokens, "inference_tags": tag,
              "loss": {name: sum(x for x, _ in rows) / tokens if tokens else None for name, rows in losses.items()},
              "differences": {f"{a} - {b}": loss_difference(losses[a], losses[b], seed=run.config.random_seed)
                              for a, b in HELDOUT_DIFFERENCES},
              "per_pair": {name: [round(x, 4) for x, _ in rows] for name, rows in losses.items()},
              "tokens_per_pair": [n for _, n in losses["base"]]}
    for difference in result["differences"].values():
        difference["resolved"] = resolved(difference)
    atomic_write_json(run.files.analysis_file("heldout_losses"), result)
    return {"loss": result["loss"], "resolved": {k: d["resolved"] for k, d in result["differences"].items()}}


def heldout_losses(run: StageRun, name: str, pairs: list[dict], tag: str) -> list[tuple[float, int]]:
    """(summed loss, tokens) of each held-out pair's output under model `name`, prompted with the system prompt
    `tag`, as the model was trained to read it (train.forward_example)."""
    model, tokenizer = load(run, name)
    losses = model_losses(run, model, tokenizer, pairs, tag)
    del model
    return losses


def model_losses(run: StageRun, model, tokenizer, pairs: list[dict], tag: str) -> list[tuple[float, int]]:
    """heldout_losses of a model already loaded."""
    from humpback_nb.method.train import example_losses, forward_example

    examples = [forward_example(tokenizer, p["instruction"], p["output"], tag, run.config.train.max_seq_length)
                for p in pairs]
    return example_losses(model, tokenizer, examples)

GENERATORS = ("base", "m0", "m1", "m2")
COMPARISONS = (("m2", "m0"), ("m1", "m0"), ("m0", "base"), ("m2", "base"))


@stage("eval", outputs=("eval_dir",), after=("m0", "m1", "m2"), sections=("model", "generate", "evaluate"),
       check=judge_ready)
def evaluate(run: StageRun) -> dict:
    """evaluation: answers of the base model, M0, M1 and M2, judged in both orders; win rates, and the judge's check
    (each model against its own shuffled answers). With annotator alpaca_eval_gpt4, each model's AlpacaEval 1.0 win
    rate against the reference, and MT-bench on its own."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.evaluate import eval_prompts, write_model_outputs
    from humpback_nb.method.judges import EndpointJudge, judge_name, make_judge
    from humpback_nb.method.sanity import judge_check, judge_verdict, shuffled_answers
    from humpback_nb.method.winrates import compare

    settings = run.config.evaluate
    protocol = alpaca_eval.protocol(settings)  # mixed settings, or a missing reference, fail before any answer
    if settings.annotator == alpaca_eval.ANNOTATOR:
        annotator, reference = alpaca_eval.load_annotator(), alpaca_eval.load_reference(settings.reference)
    prompts = eval_prompts(settings)
    answers, judge = {}, None
    for name in GENERATORS:
        model, tokenizer = load(run, name)
        partial = run.partial(run.files.eval_dir(), part=f"answers_{name}")
        answers[name] = answer(run, model, tokenizer, prompts, name, settings.inference_tags, partial)
        if name == "base":
            judge = make_judge(settings, model, tokenizer)  # the local judge is the base model: load it once
        del model
    results, pool, prefix = {}, answers, ""
    if settings.annotator == alpaca_eval.ANNOTATOR:  # AlpacaEval's prompts only; MT-bench is judged on its own
        endpoint = EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env,
                                 concurrency=settings.judge_concurrency)
        ask = alpaca_eval.endpoint_ask(endpoint, annotator)
        for name in GENERATORS:
            judged = run.partial(run.files.eval_dir(), part=f"judge_{name}_vs_reference")
            results[f"{name}_vs_reference"] = alpaca_eval.evaluate(
                ask, annotator, [r for r in answers[name] if r["id"].startswith("alpaca_eval-")], reference,
                partial=judged, progress=True, desc=f"AlpacaEval 1.0 {name}", both_orders=settings.both_orders,
                workers=settings.judge_concurrency)
        pool = {n: [r for r in rows if r["id"].startswith("mt_bench-")] for n, rows in answers.items()}
        prefix = "mt_bench_"
    for x, y in COMPARISONS if pool["base"] else ():  # each judgment is kept as it comes: a rerun asks the rest
        key = f"{prefix}{x}_vs_{y}"
        judged = run.partial(run.files.eval_dir(), part=f"judge_{key}")
        results[key] = compare(judge, pool[x], pool[y], partial=judged, progress=True, desc=f"judging {key}")
    # the judge's check: each model's answers against its own answers to other prompts (sanity.py)
    checks, checked = {}, {}
    for name in GENERATORS if pool["base"] else ():
        key = f"{prefix}{name}_vs_shuffled"
        judged = run.partial(run.files.eval_dir(), part=f"judge_{key}")
        checked[key] = compare(judge, pool[name], shuffled_answers(pool[name]), partial=judged, progress=True,
                               desc=f"judge check: {name} against its shuffled answers")
        checks[name] = judge_check(checked[key]["judgments"])
    with atomic_dir(run.files.eval_dir()) as tmp:
        for name, rows in answers.items():
            # AlpacaEval's file holds its own prompts only; every answer, with its prompt id, is in the JSONL
            write_model_outputs(run.files.model_outputs_file(name, tmp),
                                [r for r in rows if r["id"].startswith("alpaca_eval-")])
            write_jsonl(run.files.answers_file(name, tmp), rows)
        for key, result in results.items():
            records = result.pop("judgments" if "judgments" in result else "annotations")
            write_jsonl(run.files.judgments_file(key, tmp), records)
        for key, result in checked.items():
            write_jsonl(run.files.judgments_file(key, tmp), result["judgments"])
        cap, verdict = run.config.generate.max_new_tokens, judge_verdict(checks)
        atomic_write_json(run.files.win_rates_file(tmp), {"protocol": protocol, "judge": judge_name(settings),
                                                          "prompts": len(prompts),
                                                          "inference_tags": settings.inference_tags,
                                                          "judge_check": verdict,
                                                          "answers_cut": {name: _cut(rows, cap)
                                                                          for name, rows in answers.items()},
                                                          **results})
    return {key: result.get("overall", result) for key, result in results.items()} | {
        "judge_separates": verdict["separates"]}


def _cut(answers: list[dict], cap: int) -> dict[str, int]:
    """How many answers the token cap cut off (still being written at generate.max_new_tokens)."""
    return {"cut": sum(not a.get("finished", True) for a in answers), "of": len(answers), "max_new_tokens": cap}


# -- 7. The paper's analyses ------------------------------------------------------------------------------------
@stage("tags", outputs=("analysis_file:table8_tags",), after=("seed", "A2", "m2", "eval"),
       sections=("model", "train", "generate", "evaluate"), check=judge_ready)
def tags(run: StageRun) -> dict:
    """Table 8: M2 answered with each inference tag, and a model trained like M2 without tags, each against the
    run's reference (AlpacaEval 1.0's when the run uses it, else the base model's answers); and the two models'
    held-out losses, a difference that resolves where the judge cannot."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.analysis import PAPER_TABLE8, TABLE8_VARIANTS
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.sanity import loss_difference, resolved

    untagged = train_forward(run, "m2_untagged", augmented=2, train_settings=replace(run.config.train, tags=False),
                             label="Table 8: model 1 of 1 (trained like M2, without tags)")
    prompts, judge, output = eval_prompts(run.config.evaluate), base_judge(run), run.files.analysis_file("table8_tags")
    settings, pairs = run.config.evaluate, run.files.seed_pairs("heldout")
    results, answered, losses = {}, {}, {}
    for which, name in (("tagged", "m2"), ("untagged", "m2_untagged")):  # each model loaded once
        model, tokenizer = load(run, name)
        for label, (kind, tag) in TABLE8_VARIANTS.items():
            if kind != which or (which, tag) == ("tagged", settings.inference_tags):
                continue  # M2 with the evaluation's own tags: eval answered and judged these very prompts already
            key = f"{which}_{tag.replace('+', '')}"
            answered[label] = (key, answer(run, model, tokenizer, prompts, key, tag, run.partial(output, part=key)))
        # the same question as a held-out loss, which resolves where the judge cannot: M2 prompted with the
        # evaluation's tags, the untagged model without a system prompt, on the held-out seed pairs
        losses[name] = model_losses(run, model, tokenizer, pairs, settings.inference_tags if name == "m2" else "none")
        del model
    for label in TABLE8_VARIANTS:
        if label in answered:
            key, answers = answered[label]
            results[label] = versus_reference(run, judge, answers, output, key) | {"paper": PAPER_TABLE8[label]}
        else:
            key = "m2_vs_reference" if settings.annotator == alpaca_eval.ANNOTATOR else "m2_vs_base"
            results[label] = run.files.win_rates()[key]["overall"] | {"paper": PAPER_TABLE8[label], "from": "eval"}
    difference = loss_difference(losses["m2"], losses["m2_untagged"])
    heldout = {"m2 - m2_untagged": difference | {"resolved": resolved(difference)},
               "prompted": {"m2": settings.inference_tags, "m2_untagged": "none"}}
    atomic_write_json(output, {"protocol": alpaca_eval.protocol(run.config.evaluate), "untagged_model":
                               untagged["model"], **results, "heldout": heldout})
    return {label: r["win_rate"] for label, r in results.items()}


@stage("selectors", outputs=("analysis_file:table7_selectors",),
       after=("seed", "candidates", "m0", "m1", "A1", "A2", "eval"),
       sections=("model", "train", "generate", "curate", "evaluate", "random_seed"), check=rater_and_judge_ready)
def selectors(run: StageRun) -> dict:
    """Table 7: M0, M1 (and an endpoint) as selectors: precision, recall, win rate of a model trained on their picks.

    Each selects by the rule the run curates with, on a labelled set with 20% positives (or people's labels)."""
    from humpback_nb.method.analysis import PAPER_TABLE7, labelled_set, labels_note, read_labels

    settings = run.config.evaluate
    pairs = (read_labels(settings.selection_labels) if settings.selection_labels else
             labelled_set(run.files.seed_pairs("heldout"), run.files.candidates(), settings.selection_positives,
                          run.config.random_seed))
    judge, results, models = base_judge(run), {}, 3 if settings.judge_url else 2
    for number, (iteration, name) in enumerate(((1, "m0"), (2, "m1")), 1):
        label = f"Table 7: model {number} of {models} (trained on {name.upper()}'s selection)"
        results[name.upper()] = (selector_row(run, judge, pairs, name, iteration, label)
                                 | {"paper": PAPER_TABLE7[name.upper()]})
    if settings.judge_url:  # the paper's GPT-4 row: an endpoint rates with the same prompt
        label = f"Table 7: model 3 of 3 (trained on {settings.judge}'s selection)"
        results["endpoint"] = endpoint_selector_row(run, judge, pairs, label) | {"paper": PAPER_TABLE7["GPT-4"]}
    positives = sum(p["label"] for p in pairs)
    report = {"labels": labels_note(settings.selection_labels), "labels_file": settings.selection_labels,
              "rater": run.config.curate.rater, "pairs": len(pairs), "positives": positives,
              "negatives": len(pairs) - positives, "positive_share": positives / max(1, len(pairs)),
              "selectors": list(results), "train_size": settings.selection_train_size,
              "training": "a random sample of each selection, alone (tag S_w), with the run's training settings "
                          "capped at evaluate.scaling_steps", "protocol": protocol(settings), **results}
    atomic_write_json(run.files.analysis_file("table7_selectors"), report)
    return {name: {k: r[k] for k in ("precision", "recall", "win_rate")} for name, r in results.items()}


@stage("scaling", outputs=("analysis_file:figure3_scaling",), after=("candidates", "rate_m1", "eval"),
       sections=("model", "train", "generate", "curate", "evaluate", "random_seed"), check=judge_ready)
def scaling(run: StageRun) -> dict:
    """Figure 3 / Table 3: win rate of models trained on N augmented pairs of each quality, against N; and each
    model's held-out loss, the curated sets' against the uncurated one's at each N."""
    from humpback_nb.method.analysis import (
        LOG_BASE,
        NO_CURATION,
        SCALING_DRAW,
        SCALING_TRAINING,
        quality_sets,
        scaling_fit,
        scaling_model_name,
        scaling_sources,
    )
    from humpback_nb.method.sanity import loss_difference, resolved

    settings = run.config.evaluate
    results: dict[str, Any] = {"sizes": settings.scaling_sizes, "protocol": protocol(settings),
                               "training": SCALING_TRAINING,
                               "draw": SCALING_DRAW, "log_base": LOG_BASE, "sources": {}}
    if settings.scaling_sizes:
        judge = base_judge(run)
        scores, rater = run.files.scores("m1"), run.config.curate.rater
        sources = scaling_sources(run.files.candidates(), scores, run.config.random_seed, rater)
        rules = {name: rule for name, (_, rule) in quality_sets(rater, scores).items()}
        rules[NO_CURATION] = "every candidate"
        data = {"candidates": run.upstream["candidates"], "rate_m1": run.upstream["rate_m1"],
                "random_seed": run.config.random_seed, "draw": "random, nested"}
        models = sum(n <= len(pool) for pool in sources.values() for n in settings.scaling_sizes)
        number, losses = 0, {}
        heldout = run.files.seed_pairs("heldout")  # each model's held-out loss, as the heldout stage measures it
        for source, pool in sources.items():
            points = []
            for n in settings.scaling_sizes:
                if n > len(pool):
                    continue  # this quality has fewer pairs than N at this scale
                number += 1
                name = scaling_model_name(source, n)
                points.append(trained_win_rate(run, judge, name, pool[:n], data | {"source": source, "n": n},
                                               run.files.analysis_file("figure3_scaling"),
                                               f"Figure 3: model {number} of {models} ({source}, N={n})",
                                               heldout=heldout) | {"n": n})
                rows = losses[(source, n)] = points[-1].pop("heldout_rows")
                points[-1]["heldout_loss"] = sum(x for x, _ in rows) / max(1, sum(t for _, t in rows))
            results["sources"][source] = ({"rule": rules[source], "available": len(pool), "points": points}
                                          | scaling_fit(points))
        # quality against quantity as held-out losses: each curated set's model minus the uncurated one's at each N
        for (source, n), curated in losses.items():
            if source != NO_CURATION and (NO_CURATION, n) in losses:
                difference = loss_difference(curated, losses[(NO_CURATION, n)], seed=run.config.random_seed)
                results["sources"][source].setdefault("heldout_vs_no_curation", {})[str(n)] = (
                    difference | {"resolved": resolved(difference)})
    atomic_write_json(run.files.analysis_file("figure3_scaling"), results)
    return {source: r["alpha"] for source, r in results["sources"].items()}


def selector_row(run: StageRun, judge, pairs: list[dict], name: str, iteration: int, label: str) -> dict:
    """Table 7's row of `name` (M0 or M1): it rates the labelled pairs with the run's rater and keeps those >= the
    k of A(iteration)_k, which it selected; a model trained on a sample of A(iteration)_k gives the win rate."""
    from humpback_nb.method.analysis import selector_quality, training_sample
    from humpback_nb.method.curate import rate

    output, curated = run.files.analysis_file("table7_selectors"), run.files.curated(iteration)
    model, tokenizer = load(run, name)
    scores = rate(model, tokenizer, pairs, run.config.curate, run.config.model.context_length,
                  partial=run.partial(output, part=f"rate_{name}"))
    del model
    size, seed = run.config.evaluate.selection_train_size, f"{run.config.random_seed}:{name}"
    chosen = training_sample(curated.records, size, seed)
    data = {f"A{iteration}": run.upstream[f"A{iteration}"], "draw": seed, "size": size}
    return (selector_quality(pairs, scores, curated.k)
            | {"rule": curated.rule, "selection": f"A({iteration})_k", "selection_size": len(curated.records)}
            | selection_win_rate(run, judge, f"selected_{name}", chosen, data, label))


def endpoint_selector_row(run: StageRun, judge, pairs: list[dict], label: str) -> dict:
    """Table 7's endpoint row (the paper's GPT-4): the endpoint rates the labelled pairs with the paper's prompt and
    no system prompt, keeping scores >= curate.threshold; it then rates candidates in a random order until it has
    picked evaluate.selection_train_size, and a model trained on those gives the win rate."""
    from humpback_nb.method.analysis import pick_by_rating, rate_at_endpoint, selector_quality
    from humpback_nb.method.judges import EndpointJudge

    settings, output, k = run.config.evaluate, run.files.analysis_file("table7_selectors"), run.config.curate.threshold
    endpoint = EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env,
                             concurrency=settings.judge_concurrency)
    tokens = run.config.curate.max_new_tokens  # room for the reasoning before "Score: N"
    workers = settings.judge_concurrency
    scores = rate_at_endpoint(endpoint, pairs, tokens, partial=run.partial(output, part="rate_endpoint"),
                              workers=workers)
    picked, rated = pick_by_rating(
        lambda chunk: rate_at_endpoint(endpoint, chunk, tokens, partial=run.partial(output, part="pick_endpoint"),
                                       workers=workers),
        run.files.candidates(), k, settings.selection_train_size, f"{run.config.random_seed}:endpoint")
    data = {"candidates": run.upstream["candidates"], "rater": f"{settings.judge} at {settings.judge_url}", "k": k,
            "size": settings.selection_train_size}
    return (selector_quality(pairs, scores, k)
            | {"model": settings.judge, "rule": f"score >= {k:g} (curate.threshold)", "candidates_rated": rated}
            | selection_win_rate(run, judge, "selected_endpoint", picked, data, label))


def selection_win_rate(run: StageRun, judge, name: str, chosen: list[dict], data: dict[str, Any],
                       label: str | None = None) -> dict:
    """A Table 7 win rate: of a model trained on `chosen` (fewer than evaluate.selection_train_size when the
    selector picked fewer, said in `note`; none when it picked nothing)."""
    size = run.config.evaluate.selection_train_size
    note = f"picked {len(chosen)} pairs, fewer than {size}: trained on them all" if len(chosen) < size else None
    if not chosen:
        return {"win_rate": None, "se": None, "trained_on": 0, "note": "picked no pairs: no model trained"}
    overall = trained_win_rate(run, judge, name, chosen, data, run.files.analysis_file("table7_selectors"), label)
    return {"win_rate": overall["win_rate"], "se": overall["se"], "trained_on": len(chosen), "note": note,
            "win": overall}


def trained_win_rate(run: StageRun, judge, name: str, pairs: list[dict], data: dict[str, Any], output: Path,
                     label: str | None = None, heldout: list[dict] | None = None) -> dict:
    """Win rate against the run's reference (`versus_reference`) of model `name`, trained on the augmented `pairs`
    alone (tag S_w) with the run's training settings, its steps capped by evaluate.scaling_steps (the paper's
    rule for N otherwise); answers and judgments are kept in parts of `output` as they come."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.train import forward_examples

    settings = run.config.evaluate
    small = replace(run.config.train, max_steps=settings.scaling_steps or run.config.train.max_steps)

    def examples() -> list[dict]:
        tokenizer = load_tokenizer(run.config.model)
        return forward_examples(tokenizer, [], pairs, small.max_seq_length, small.tags)

    train(run, name, examples, small, data=data, label=label,
          about=lambda: f"{len(pairs)} augmented pairs alone{' (tag S_w)' if small.tags else ''}, drawn by {data}")
    model, tokenizer = load(run, name)
    answers = answer(run, model, tokenizer, eval_prompts(settings), name, settings.inference_tags,
                     run.partial(output, part=name))
    losses = None if heldout is None else model_losses(run, model, tokenizer, heldout, settings.inference_tags)
    del model
    overall = versus_reference(run, judge, answers, output, name)
    return {**overall, "prompts": overall["n"], "model": name} | ({} if losses is None else {"heldout_rows": losses})


# -- 8. Every number in one file --------------------------------------------------------------------------------
@stage("summary", outputs=("summary_file",),
       after=("segments", "backward_check", "rate_m0", "rate_m1", "heldout", "eval", "A1", "A2", "tags", "selectors",
              "scaling"),
       sections=ALL_SECTIONS)
def summary(run: StageRun) -> dict:
    """summary: every number of the run in one file (what notebook 07 and the README read)."""
    result = summarize(run.files, run.config.whole())
    atomic_write_json(run.files.summary_file(), result)
    return {"pipeline_seconds": result["pipeline_seconds"]}


def summarize(files, config) -> dict[str, Any]:
    """Sizes, Table 2 (with the k of each A_k), win rates, the analyses, stage times and reports, the config."""
    from humpback_nb.method.analysis import quality_sets
    from humpback_nb.method.curate import select
    from humpback_nb.method.data.stats import table2

    manifests = {s.name: manifest for s in STAGES if (manifest := files.manifest(s.name)) is not None}
    curated = {i: files.curated(i) for i in (1, 2)}
    sets = {"seed": files.seed_pairs("train"), "candidates": files.candidates(),
            **{c.label(i): c.records for i, c in curated.items()}}
    # Table 2's A4^(2) beside A5^(2): the candidates M1 scores >= 4 (the generate rater), or its best 38.8%
    m1_scores = files.scores("m1")
    a4_name, (a4_k, _) = list(quality_sets(config.curate.rater, m1_scores).items())[1]
    a4 = {f"{a4_name} by M1's scores": select(sets["candidates"], m1_scores, a4_k)}
    win_rates = files.win_rates()
    return {
        "preset": config.preset,
        "config_hash": config.hash(),
        "sizes": {name: len(records) for name, records in sets.items()} | {"segments": len(files.segments())},
        "curated": {f"A{i}": {"k": c.k, "rule": c.rule, "size": len(c.records)} for i, c in curated.items()},
        "table2": table2(sets | a4, paper_rows={"candidates": "augmented, all", curated[2].label(2): "A5^(2)",
                                                **dict.fromkeys(a4, "A4^(2)")}),
        "win_rates": {key: {"overall": value["overall"], "per_dataset": value["per_dataset"]}
                      for key, value in win_rates.items() if isinstance(value, dict) and "overall" in value},
        "judge": win_rates.get("judge"),
        "protocol": win_rates.get("protocol"),
        **checks(files),
        "table8_tags": files.analysis("table8_tags"),
        "table7_selectors": files.analysis("table7_selectors"),
        "figure3_scaling": files.analysis("figure3_scaling"),
        "stage_seconds": {name: m["seconds"] for name, m in manifests.items()},
        "pipeline_seconds": round(sum(m["seconds"] for m in manifests.values()), 1),
        "stage_reports": {name: m["report"] for name, m in manifests.items() if m.get("report")},
        "config": config.to_dict(),
    }


def checks(files) -> dict[str, Any]:
    """What the run's checks found so far: the judge's (eval), the raters' (rate_m0, rate_m1), M_yx's held-out loss
    (backward_check) and the forward models' (heldout); None or empty where a stage has not run. What
    `tables.can_show` reads."""
    rater_checks = {}
    for name in ("m0", "m1"):
        report = (files.manifest(f"rate_{name}") or {}).get("report") or {}
        if report.get("rater_check"):
            rater_checks[name] = report["rater_check"]
    win_rates = files.win_rates() if files.win_rates_file().is_file() else {}
    return {"judge_check": win_rates.get("judge_check"), "heldout": files.analysis("heldout_losses"),
            "backward_heldout": files.analysis("backward_heldout"),
            "rater_checks": rater_checks, "answers_cut": win_rates.get("answers_cut")}


# -- what several stages do ---------------------------------------------------------------------------------------
# Training settings that do not change the weights, so not a model's hash: where the Trainer reports its numbers.
NOT_IN_MODEL_HASH = ("report_to",)


def train(run: StageRun, name: str, examples, settings, data: dict[str, Any], label: str | None = None,
          about=None) -> dict:
    """Train model `name` on `examples()` with `settings` (a TrainConfig) unless a model made with the same base
    model, settings and data (`data`: the hashes or choices that fix its examples) is there; its training log.
    `label` is the line said before it trains, in an analysis that trains several ("Figure 3: model 3 of 8 ...");
    `about()` says what the examples are, in the model card (README.md) written beside the weights."""
    from humpback_nb.infra.distributed import processes
    from humpback_nb.infra.files import atomic_write_text
    from humpback_nb.method.train import model_card, train_model

    def fit(folder: Path, checkpoints: Path) -> None:
        main = processes().is_main
        if label and main:
            print(label, flush=True)
        log = train_model(examples(), run.config.model, settings, folder, checkpoints=checkpoints,
                          desc=f"training {name}")
        if main:
            card = model_card(name, label or run.stage.doc, run.config.model, settings, log,
                              about() if about else f"data: {data}", run.files.root, forward=name != "backward")
            atomic_write_text(folder / "README.md", card)

    weights = {k: v for k, v in asdict(settings).items() if k not in NOT_IN_MODEL_HASH}
    run.trained(name, {"model": asdict(run.config.model), "train": weights, "data": data}, fit)
    return {"model": name, **{k: v for k, v in run.files.train_log(name).items() if k != "steps"}}


def train_forward(run: StageRun, name: str, augmented: int | None, train_settings=None,
                  label: str | None = None) -> dict:
    """A forward model (instruction -> output): the seed pairs tagged S_a, plus A^(augmented)_k tagged S_w."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.train import forward_examples

    settings = train_settings or run.config.train

    def examples() -> list[dict]:
        tokenizer = load_tokenizer(run.config.model)
        extra = run.files.curated(augmented).records if augmented else []
        return forward_examples(tokenizer, run.files.seed_pairs("train"), extra, settings.max_seq_length,
                                tags=settings.tags)

    def about() -> str:
        seed = f"the {len(run.files.seed_pairs('train'))} seed pairs" + (" (tag S_a)" if settings.tags else "")
        if not augmented:
            return seed
        curated = run.files.curated(augmented)
        return (f"{seed} and the {len(curated.records)} pairs of {curated.label(augmented)}"
                + (" (tag S_w)" if settings.tags else ""))

    data = {"seed": run.upstream["seed"]} | ({f"A{augmented}": run.upstream[f"A{augmented}"]} if augmented else {})
    return train(run, name, examples, settings, data, label, about)


def rate_candidates(run: StageRun, model_name: str) -> dict:
    """`model_name` rates every candidate with the rater of `curate.rater`; the parse rate goes with the scores, and
    the rater's check: held-out seed pairs and `curate.sanity_size` candidates with another candidate's output,
    rated too, against the same candidates as they are (sanity.rater_check). M0 also rates its first
    `curate.compare_size` candidates with both raters (compare_raters), for notebook 04."""
    from humpback_nb.method.curate import parse_rate, rate, sanity_pairs
    from humpback_nb.method.sanity import rater_check

    model, tokenizer = load(run, model_name)
    settings, context = run.config.curate, run.config.model.context_length
    started = time.time()
    candidates = run.files.candidates()
    scores = rate(model, tokenizer, candidates, settings, context,
                  partial=run.partial(run.files.scores_file(model_name)))
    seconds = time.time() - started
    seed = run.files.seed_pairs("heldout") or run.files.seed_pairs("train")  # pairs the rater never trained on
    sets = sanity_pairs(seed, candidates, settings.sanity_size, run.config.random_seed)
    by_id = {s["id"]: s["score"] for s in scores}
    sanity = {"seed": [s["score"] for s in rate(model, tokenizer, sets["seed"], settings, context)] if sets["seed"]
              else [], "augmented": [by_id.get(c["id"]) for c in sets["augmented"]],
              "shuffled": [s["score"] for s in rate(model, tokenizer, sets["shuffled"], settings, context)]
              if sets["shuffled"] else []}
    check = rater_check(sanity["augmented"][:len(sanity["shuffled"])], sanity["shuffled"], run.config.random_seed)
    report = {"pairs": len(scores), "parse_rate": parse_rate(scores), "seconds_this_run": round(seconds, 2),
              "rater_check": check, "sanity_scores": sanity}
    if model_name == "m0" and settings.compare_size:  # the paper's rater and the kit's side by side, on the same
        report["rater_comparison"] = compare_raters(model, tokenizer, candidates[: settings.compare_size], settings,
                                                    context)  # first candidates
    write_jsonl(run.files.scores_file(model_name),
                [dict(s, rater=settings.rater, model=model_name, tag=settings.rater_tag) for s in scores])
    return report


COMPARISON_EXAMPLES = 3  # of the generate rater's replies kept whole in the comparison


def compare_raters(model, tokenizer, pairs: list[dict], settings, context: int) -> dict[str, Any]:
    """The two raters on the same pairs: the paper's (reasoning, then "Score: N", greedy) and the kit's (the expected
    score from the probabilities of "1".."5"): each one's speed and scores, the generate rater's parse rate, how
    they agree, and the first replies of the generate rater."""
    from humpback_nb.method.curate import agreement, parse_rate, rate_generate, rate_logprob

    started = time.time()
    by_logprob = rate_logprob(model, tokenizer, pairs, settings, context, progress=False)
    logprob_seconds, started = time.time() - started, time.time()
    by_generate = rate_generate(model, tokenizer, pairs, settings, context)
    generate_seconds = time.time() - started
    return {"pairs": len(pairs), "max_new_tokens": settings.max_new_tokens,
            "logprob": {"per_second": len(pairs) / max(logprob_seconds, 1e-9),
                        "scores": [s["score"] for s in by_logprob]},
            "generate": {"per_second": len(pairs) / max(generate_seconds, 1e-9), "parse_rate": parse_rate(by_generate),
                         "scores": [s["score"] for s in by_generate]},
            "agreement": agreement(by_logprob, by_generate),
            "examples": [{"id": s["id"], "instruction": p["instruction"], "score": s["score"],
                          "reasoning": s["reasoning"]}
                         for p, s in zip(pairs[:COMPARISON_EXAMPLES], by_generate, strict=False)]}


def curate(run: StageRun, scored_by: str, iteration: int) -> dict:
    """A^(iteration)_k from the scores of `scored_by`, with the k that made it written beside it."""
    from humpback_nb.method.curate import curated_set

    chosen, info = curated_set(run.files.candidates(), run.files.scores(scored_by), run.config.curate)
    info["scored_by"] = scored_by
    atomic_write_json(run.files.curated_info_file(iteration), info)
    # A row as a seed row: its generation details and score stay in the candidates file and the rater's scores file
    write_jsonl(run.files.curated_file(iteration),
                [{key: c.get(key) for key in ROW_FIELDS} | conversation(c, "S_w") for c in chosen])
    return info


# The fields of a seed row and of an A_k row: the same in both files, so that `datasets` loads them together in
# one call (it reads the first file's types: a field all null there refuses values in the next), and TRL's
# conversational `prompt` (the tag's system message and the instruction) and `completion` (the output), so that
# its SFTTrainer trains on them as they are. Seed rows keep any other field their source gave them.
ROW_FIELDS = ("id", "split", "instruction", "output", "source", "tag", "prompt", "completion")


def conversation(record: dict[str, Any], tag: str) -> dict[str, Any]:
    """The tag, and the pair as TRL's conversational prompt and completion, with the system prompt of `tag`."""
    from humpback_nb.method.prompts import forward_messages

    return {"split": record.get("split"), "tag": tag, "prompt": forward_messages(record["instruction"], tag),
            "completion": [{"role": "assistant", "content": record["output"]}]}


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


def versus_reference(run: StageRun, judge, answers: list[dict], output: Path, key: str) -> dict:
    """The overall win rate of `answers` as the run measures it: with AlpacaEval 1.0's annotator against its
    reference (text-davinci-003's answers) on AlpacaEval's prompts, as the paper does; else with the run's judge
    against the base model's answers (not the paper's protocol). Judgments are kept in a part of `output`."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.judges import EndpointJudge
    from humpback_nb.method.winrates import compare

    settings, judged = run.config.evaluate, run.partial(output, part=f"judge_{key}")
    if settings.annotator != alpaca_eval.ANNOTATOR:
        return compare(judge, answers, run.files.answers("base"), partial=judged, progress=True,
                       desc=f"judging {key}")["overall"]
    annotator = alpaca_eval.load_annotator()
    endpoint = EndpointJudge(settings.judge_url, settings.judge, settings.judge_key_env,
                             concurrency=settings.judge_concurrency)
    ask = alpaca_eval.endpoint_ask(endpoint, annotator)
    return alpaca_eval.evaluate(ask, annotator, [a for a in answers if a["id"].startswith("alpaca_eval-")],
                                alpaca_eval.load_reference(settings.reference), partial=judged, progress=True,
                                desc=f"AlpacaEval 1.0 {key}", both_orders=settings.both_orders,
                                workers=settings.judge_concurrency)["overall"]


def base_judge(run: StageRun):
    """The run's judge (`evaluate.judge`): the base model, or an endpoint."""
    from humpback_nb.method.judges import make_judge

    if run.config.evaluate.judge_url:
        return make_judge(run.config.evaluate)
    model, tokenizer = load(run, "base")
    return make_judge(run.config.evaluate, model, tokenizer)
