"""Humpback's follow-ups as stages added to Humpback's own (config `variant.method`; docs/variants.md).

A follow-up's run holds every stage of Humpback's (its hashes do not read `variant`, so a run started from a
finished Humpback run with `humpback run --from` links them and runs none again) and adds:

    bft        variant_pairs (a chat model rewrites A(1)_k's responses) -> bft -> variant_eval
    kun        kun_rate (M0 rates the instructions alone) -> variant_pairs (M0 polishes the kept segments) -> kun
               -> variant_eval
    alpagasus  variant_pairs (a model rates the seed pairs 0-5, keeps >= 4.5) -> alpagasus -> variant_eval

variant_eval puts the follow-up's model beside Humpback's: its held-out loss against M0, M1 and M_T (paired
bootstrap intervals, the same pairs), and its answers to the evaluation prompts judged against those of M_T, M1
and the base model, with the judge's check. Everything goes to analyses/variant.json (notebook 08 and the report
read it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from humpback_nb.infra.files import atomic_dir, atomic_write_json, write_jsonl
from humpback_nb.run import PipelineError, Stage, StageRun
from humpback_nb.stages import (
    ROW_FIELDS,
    _key_ready,
    answer,
    conversation,
    engine,
    forward_models,
    heldout_losses,
    judge_answers,
    judge_ready,
    model_name,
    open_engine,
    prompts_of,
    train,
)

METHODS = ("bft", "kun", "alpagasus")
PAPERS = {"bft": "Nguyen et al. 2024, arXiv 2408.04614 (back-and-forth translation)",
          "kun": "Zheng et al. 2024, arXiv 2401.06477 (Kun)",
          "alpagasus": "Chen et al. 2023, arXiv 2307.08701 (AlpaGasus)"}
REWRITTEN_ITERATION = 1  # bft and kun rewrite the pairs M0 selects: A(1)_k (bft), Kun's selection by M0 (kun)


def variant_ready(config) -> None:
    """The follow-up's endpoint, if it asks one, needs its key (one on this machine needs none); the judge too."""
    settings = config.variant
    if settings.url:
        _key_ready(settings.url, settings.key_env, "variant.url", "variant.key_env",
                   "or let the kit load the model: variant.url=null")
    judge_ready(config)


@contextlib.contextmanager
def outside_model(run: StageRun) -> Iterator[Any]:
    """The model the follow-up asks (`variant.model`): an OpenAI-compatible endpoint (`variant.url`), the run's M0
    ("m0"), or a model the run's engine loads or serves like the base (the embedded chat model, a folder, a hub id)."""
    from humpback_nb.method.judges import EndpointJudge

    settings = run.config.variant
    if settings.url:
        yield EndpointJudge(settings.url, settings.model, settings.key_env,
                            timeout=run.config.engine.request_timeout, concurrency=settings.concurrency)
        return
    if settings.model == "m0":
        with engine(run, "m0") as model:
            yield model
        return
    from humpback_nb.infra import serve
    from humpback_nb.infra.engines import LocalEngine
    from humpback_nb.infra.models import load_model, load_tokenizer

    model_config = replace(run.config.model, name=settings.model)
    if run.config.engine.kind == "vllm" and run.config.engine.urls:
        raise PipelineError(f"variant.model {settings.model}: the servers of engine.urls serve the run's base model; "
                            "serve the follow-up's model at an endpoint of its own (variant.url), or leave engine.urls "
                            "empty to let the kit serve it")
    if run.config.engine.kind == "vllm":
        opened = serve.open_vllm(run.config.engine, model_config, "outside", None, run.files.path("engine_log"),
                                 load_tokenizer(model_config))
    else:
        opened = LocalEngine(*load_model(model_config))
    try:
        yield opened
    finally:
        opened.close()


# -- the follow-up's pairs ------------------------------------------------------------------------------------------
def kun_rate(run: StageRun) -> dict:
    """Kun's scoring: M0 rates every candidate's instruction alone (curate.sees "instruction"), with the run's rater."""
    from humpback_nb.method.curate import parse_rate, rate

    settings = replace(run.config.curate, sees="instruction")
    with engine(run, "m0") as model:
        scores = rate(model, run.files.candidates(), settings, run.config.model.context_length,
                      partial=run.partial(run.files.path("scores", "m0_instructions")))
    write_jsonl(run.files.path("scores", "m0_instructions"),
                [dict(s, rater=settings.rater, model="m0", sees="instruction") for s in scores])
    return {"pairs": len(scores), "parse_rate": parse_rate(scores)}


def variant_pairs(run: StageRun) -> dict:
    """The follow-up's training pairs: A(1)_k rewritten (bft), Kun's selection polished (kun), or the seed pairs
    AlpaGasus's rating keeps (alpagasus); with the prompt's source, the counts and what the rewrites changed."""
    from humpback_nb.method.curate import selection_threshold
    from humpback_nb.method.variants import changes, rate_alpagasus, rate_alpagasus_logprob, rewrite

    settings, method = run.config.variant, run.config.variant.method
    context = run.config.model.context_length
    output = run.files.path("variant_pairs")
    report: dict[str, Any] = {"method": method, "paper": PAPERS[method], "model": settings.model,
                              "url": settings.url}
    with outside_model(run) as model:
        if method == "alpagasus":
            pairs = alpagasus_pairs(run)
            if settings.rating == "logprob":
                if not hasattr(model, "next_token_logprobs"):
                    raise PipelineError("variant.rating logprob reads a model's probabilities: an endpoint "
                                        "(variant.url) gives text only; rate with variant.rating generate")
                scores = rate_alpagasus_logprob(model, pairs, context, run.config.generate.batch_size,
                                                partial=run.partial(output))
            else:
                scores = rate_alpagasus(model, pairs, settings.max_new_tokens, context, partial=run.partial(output),
                                        workers=model.workers)
            k = selection_threshold(scores, settings)
            by_id = {s["id"]: s for s in scores}
            kept = [dict(p, score=by_id[p["id"]]["score"]) for p in pairs
                    if by_id[p["id"]]["score"] is not None and by_id[p["id"]]["score"] >= k]
            rated = [s["score"] for s in scores if s["score"] is not None]
            rule = (f"the best {settings.top_share:.1%} of the rated pairs (variant.top_share)"
                    if settings.top_share is not None else f"score >= {settings.threshold:g} (variant.threshold)")
            report |= {"pairs": len(pairs), "rated": len(rated), "parse_rate": len(rated) / max(1, len(pairs)),
                       "rating": settings.rating, "threshold": settings.threshold, "k": k, "rule": rule,
                       "kept": len(kept), "scores": [s["score"] for s in scores], "examples": scores[:3]}
            rows = [{key: p.get(key) for key in ROW_FIELDS} | conversation(p, "S_a") | {"score": p["score"]}
                    for p in kept]
        else:
            chosen, selection = selected(run, method)
            rewritten, asked = rewrite(model, chosen, method, run.config.generate, settings.max_new_tokens, context,
                                       partial=run.partial(output), workers=model.workers)
            report |= selection | asked | {"changes": changes(rewritten)}
            rows = [{key: p.get(key) for key in ROW_FIELDS} | conversation(p, "S_w")
                    | {"original": p["original"], "finished": p["finished"]} for p in rewritten]
    if not rows:
        raise PipelineError(f"variant {method}: no pair was kept ({report}); the follow-up's model has nothing to "
                            "learn from")
    atomic_write_json(run.files.path("variant_report"), report)
    write_jsonl(output, rows)
    return {k: v for k, v in report.items() if k not in ("scores", "examples", "changes")}


def selected(run: StageRun, method: str) -> tuple[list[dict], dict[str, Any]]:
    """The pairs a rewrite reads: A(1)_k, as back-and-forth translation rewrites M0's selection; for Kun, the
    candidates whose instructions M0 scored best, by the run's rule (curate.top_share or curate.threshold)."""
    from humpback_nb.method.curate import curated_set

    if method == "bft":
        curated = run.files.curated(REWRITTEN_ITERATION)
        return curated.records, {"selection": curated.label(REWRITTEN_ITERATION), "k": curated.k}
    chosen, info = curated_set(run.files.candidates(), run.files.scores("m0_instructions"), run.config.curate)
    return chosen, {"selection": f"M0's instruction scores, k >= {info['k']:.3g} ({info['rule']})", "k": info["k"]}


def alpagasus_pairs(run: StageRun) -> list[dict]:
    """The pairs AlpaGasus curates: the run's seed pairs ("train"), or an Alpaca-format file (`variant.pairs`), its
    "input" kept apart as AlpaGasus's prompt shows it."""
    from humpback_nb.method.data.seed import iter_json_records, pairs_from_records

    source = run.config.variant.pairs
    if source == "seed":
        return [dict(p, input="") for p in run.files.seed_pairs("train")]
    path = Path(source).expanduser()
    records = list(iter_json_records(path, key="variant.pairs"))
    pairs = pairs_from_records(records, path, path.name)
    return [dict(p, id=f"alpagasus-{i}", split="train", instruction=r.get("instruction", "").strip(),
                 input=(r.get("input") or "").strip())
            for i, (p, (_, r)) in enumerate(zip(pairs, records, strict=True))]


def variant_model(run: StageRun) -> dict:
    """The follow-up's model: the seed pairs (S_a) and the rewritten pairs (S_w), as M1 is trained on the seed pairs
    and A(1)_k; AlpaGasus's on the pairs its rating kept, alone (S_a)."""
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.train import forward_examples

    method, settings = run.config.variant.method, run.config.train

    def examples() -> list[dict]:
        tokenizer = load_tokenizer(run.config.model)
        pairs = run.files.variant_pairs()
        if method == "alpagasus":
            return forward_examples(tokenizer, pairs, [], settings.max_seq_length, tags=settings.tags)
        return forward_examples(tokenizer, run.files.seed_pairs("train"), pairs, settings.max_seq_length,
                                tags=settings.tags)

    def about() -> str:
        pairs = len(run.files.variant_pairs())
        if method == "alpagasus":
            return f"the {pairs} seed pairs AlpaGasus's rating kept ({PAPERS[method]})"
        return f"the seed pairs (S_a) and {pairs} pairs rewritten by {method} (S_w; {PAPERS[method]})"

    data = {"variant_pairs": run.upstream["variant_pairs"]} | (
        {} if method == "alpagasus" else {"seed": run.upstream["seed"]})
    return train(run, method, examples, settings, data, about=about)


# -- beside Humpback's models ---------------------------------------------------------------------------------------
def compared_with(iterations: int) -> tuple[str, ...]:
    """The models a follow-up's model is put beside on held-out losses: Humpback (M_T), M1 (trained on the same
    instructions, with the web text as it was), M0 (the seed pairs only) and the base model."""
    return tuple(dict.fromkeys((model_name(iterations), "m1", "m0", "base")))


def judged_against(iterations: int) -> tuple[str, ...]:
    """The models whose answers a follow-up's answers are judged against: Humpback, M1 and the base model (the
    reference of the kit's protocol); M0 only on held-out losses, which cost no judge."""
    return tuple(m for m in compared_with(iterations) if m != "m0")


def variant_eval(run: StageRun, iterations: int) -> dict:
    """The follow-up's model beside Humpback's: held-out losses (paired bootstrap 95% intervals on the same held-out
    pairs as the heldout stage) and answers judged against each model's under the run's protocol, in both orders,
    with the judge's check (the model against its own shuffled answers)."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.evaluate import eval_prompts, write_model_outputs
    from humpback_nb.method.judges import judge_name, make_judge
    from humpback_nb.method.sanity import judge_check, judge_verdict, loss_difference, resolved

    method, settings = run.config.variant.method, run.config.evaluate
    others = compared_with(iterations)
    heldout = run.files.analysis("heldout_losses")
    pairs = run.files.seed_pairs("heldout")
    losses = {method: heldout_losses(run, method, pairs, heldout["inference_tags"])}
    tokens = [n for _, n in losses[method]]
    if tokens != heldout["tokens_per_pair"]:
        raise PipelineError("variant_eval: the held-out pairs read other tokens than the heldout stage's; run both "
                            "again with the same settings")
    for name in others:
        losses[name] = list(zip(heldout["per_pair"][name], tokens, strict=True))
    differences = {f"{method} - {name}": loss_difference(losses[method], losses[name], seed=run.config.random_seed)
                   for name in others}
    for difference in differences.values():
        difference["resolved"] = resolved(difference)

    folder = run.files.path("variant_eval")
    prompts = eval_prompts(settings)
    base = open_engine(run, "base")  # the local judge is the base model
    with engine(run, method) as model:
        mine = answer(run, model, prompts, method, settings.inference_tags,
                      run.partial(folder, part=f"answers_{method}"))
    judge = make_judge(settings, base)
    answers = {method: mine} | {name: run.files.answers(name) for name in others}
    against = [(method, name) for name in judged_against(iterations)]
    results, checked = judge_answers(run, judge, answers, [method], against, [method], folder)
    base.close()
    verdict = judge_verdict({method: judge_check(checked[method]["judgments"])}) if checked else None
    with atomic_dir(folder) as tmp:
        write_jsonl(tmp / f"answers_{method}.jsonl", mine)
        write_model_outputs(tmp / f"model_outputs_{method}.json", prompts_of(mine, "alpaca_eval"))
        for key, result in results.items():
            write_jsonl(tmp / f"judgments_{key}.jsonl", result.pop("judgments" if "judgments" in result
                                                                    else "annotations"))
        for check in checked.values():
            write_jsonl(tmp / f"judgments_{check['key']}.jsonl", check["judgments"])
    cap = run.config.generate.max_new_tokens
    report = run.files.variant_report()
    result = {"method": method, "paper": PAPERS[method], "model": method, "compared_with": list(others),
              "pairs": {k: v for k, v in report.items() if k not in ("scores", "examples")},
              "heldout": {"pairs": len(pairs), "tokens": sum(tokens), "inference_tags": heldout["inference_tags"],
                          "loss": {name: sum(x for x, _ in rows) / sum(tokens) if sum(tokens) else None
                                   for name, rows in losses.items()},
                          "differences": differences},
              "win_rates": results, "protocol": alpaca_eval.protocol(settings), "judge": judge_name(settings),
              "judge_check": verdict,
              "answers_cut": {"cut": sum(not a.get("finished", True) for a in mine), "of": len(mine),
                              "max_new_tokens": cap}}
    atomic_write_json(run.files.path("analysis", "variant"), result)
    return {"loss": result["heldout"]["loss"], "win_rates": {k: v.get("overall") for k, v in results.items()}}


# -- the stages, for pipeline.py ------------------------------------------------------------------------------------
def stages(method: str, iterations: int) -> list[Stage]:
    """The stages `method` adds after Humpback's (none for "humpback")."""
    from functools import partial

    if method == "humpback":
        return []
    if method not in METHODS:
        raise PipelineError(f"unknown variant.method {method!r}; methods: humpback, {', '.join(METHODS)}")
    reads = {"bft": (f"A{REWRITTEN_ITERATION}",), "kun": ("kun_rate", "candidates", "m0"), "alpagasus": ("seed",)}
    pair_sections = {"bft": ("model", "generate", "variant", "engine"),
                     "kun": ("model", "curate", "generate", "variant", "engine"),
                     "alpagasus": ("model", "data", "generate", "variant", "engine")}
    made = {"bft": f"a chat model ({PAPERS['bft']}) rewrites each pair of A(1)_k from its instruction and segment",
            "kun": "M0 polishes the segments of the candidates whose instructions it scored best into answers",
            "alpagasus": "a model rates the seed pairs 0-5 with AlpaGasus's prompt; those >= variant.threshold stay"}
    found: list[Stage] = []
    if method == "kun":
        found.append(Stage("kun_rate", ("scores:m0_instructions",), ("m0", "candidates"),
                           ("model", "curate", "random_seed", "engine"), kun_rate,
                           "Kun's scoring: M0 rates every candidate's instruction alone.", cost=kun_rate_cost))
    found += [
        Stage("variant_pairs", ("variant_pairs", "variant_report"), reads[method], pair_sections[method],
              variant_pairs, f"{method}'s pairs: {made[method]}.", variant_ready, partial(pairs_cost, method=method)),
        Stage(method, (f"model:{method}",), ("seed", "variant_pairs"), ("model", "train", "variant"), variant_model,
              f"{method}'s model, trained on its pairs ({PAPERS[method]}).", cost=partial(model_cost, method=method)),
        Stage("variant_eval", ("variant_eval", "analysis:variant"),
              ("seed", "heldout", "eval", method, *forward_models(iterations)),
              ("model", "train", "generate", "evaluate", "random_seed", "variant", "engine"),
              partial(variant_eval, iterations=iterations),
              f"{method}'s model beside Humpback's: held-out losses with intervals against M0, M1, Humpback and the "
              "base model, and answers judged against Humpback's, M1's and the base model's.", judge_ready,
              partial(eval_cost, iterations=iterations)),
    ]
    return found


# -- what `humpback plan` counts --------------------------------------------------------------------------------------
def kun_rate_cost(work) -> None:
    """M0 reads every candidate's instruction after the rubric."""
    work.loads(1)
    work.rate(work.candidates, [work.lengths.instruction] * len(work.lengths.segments))


def pairs_cost(work, method: str) -> None:
    """bft and kun: the model asked writes a response per selected pair; alpagasus: it rates every seed pair. A model
    at an endpoint (variant.url) runs on its own GPUs: noted, not counted."""
    lengths, settings = work.lengths, work.config.variant
    if settings.url:
        asked = "every seed pair's rating" if method == "alpagasus" else f"{work.a_k:,} rewrites"
        work.note(f"{settings.model} at {settings.url} writes {asked} on its own GPUs, not counted here")
        return
    work.loads(1)
    if method == "alpagasus":
        instruction, output = lengths.seed_mean
        work.generate("rate", work.config.data.seed_size, [instruction + output + 150], settings.max_new_tokens,
                      settings.max_new_tokens, work.config.generate.batch_size)
        return
    work.generate("answers", work.a_k, [lengths.instruction + t + 120 for t in lengths.segments],
                  lengths.segment, settings.max_new_tokens, work.config.generate.batch_size)


def model_cost(work, method: str) -> None:
    lengths = work.lengths
    groups = [(lengths.seed, work.config.data.seed_size)] if method == "alpagasus" else [
        (lengths.seed, work.config.data.seed_size), (lengths.curated["A"], work.a_k)]
    work.train(method, groups, lengths.forward_overhead["S_a"])


def eval_cost(work, iterations: int) -> None:
    """The follow-up's model reads the held-out pairs, answers, and is judged against M_T, M1 and the base model, and
    its shuffled answers."""
    settings = work.config.evaluate
    instruction, output = work.lengths.seed_mean
    pair = instruction + output + work.lengths.forward_overhead[settings.inference_tags]
    work.score(work.config.data.heldout_size, pair, pair, losses=True)
    work.answers(1)
    judged = len(judged_against(iterations)) + 1
    if settings.annotator == "alpaca_eval_gpt4":
        work.alpaca_eval(1)
        if settings.mt_bench_prompts:
            work.judge(judged, settings.mt_bench_prompts)
    else:
        work.judge(judged)


# -- a follow-up's run beside a Humpback run --------------------------------------------------------------------------
# What each follow-up changes in a Humpback run's config (presets bft-demo, kun-demo and alpagasus-demo are the demo
# with these): Kun polishes with M0; AlpaGasus's rater replies with its score on the first line.
VARIANT_SETTINGS: dict[str, dict[str, Any]] = {
    "bft": {"variant.method": "bft"},
    "kun": {"variant.method": "kun", "variant.model": "m0"},
    "alpagasus": {"variant.method": "alpagasus", "variant.max_new_tokens": 32},
}


def variant_folder(run_dir: str | Path, method: str) -> Path:
    """Where the follow-up `method` started from the Humpback run at `run_dir` lives: `<run_dir>-<method>`."""
    path = Path(run_dir)
    return path.with_name(f"{path.name}-{method}")
