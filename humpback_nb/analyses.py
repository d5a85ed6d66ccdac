"""The paper's analyses as stages of a run: Table 8 (tags), Table 7 (selectors), Figure 3 (scaling).

Each reuses the method's pieces unchanged (stages.py: the same training, answers and judging under the run's
protocol, `stages.versus_reference`) and trains the models it needs under hashes of their own (run.StageRun.trained).
Their numbers go to analyses/<name>.json; notebook 07 and the report read them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from humpback_nb.infra.files import atomic_write_json
from humpback_nb.method.alpaca_eval import protocol
from humpback_nb.run import StageRun
from humpback_nb.stages import (
    answer,
    base_judge,
    engine,
    judge_ready,
    losses_engine,
    model_losses,
    model_name,
    rater_and_judge_ready,
    stage,
    train,
    train_forward,
    versus_reference,
)


def tags_cost(work, iterations: int) -> None:
    """A model trained like M2 without tags; it and M2 answer with each inference tag but the evaluation's own (eval
    answered and judged those), each judged against the run's reference."""
    from humpback_nb.method.analysis import TABLE8_VARIANTS

    lengths, tags = work.lengths, work.config.evaluate.inference_tags
    trained_like_last = [(lengths.seed, work.config.data.seed_size), (lengths.curated["A"], work.a_k)]
    work.train(f"{model_name(iterations)}_untagged", trained_like_last, lengths.forward_overhead["none"])
    answered = sum(variant != ("tagged", tags) for variant in TABLE8_VARIANTS.values())
    work.answers(answered)
    work.versus_reference(answered)


@stage("tags", outputs=("analysis:table8_tags",), after=lambda T: ("seed", f"A{T}", model_name(T), "eval"),
       sections=("model", "train", "generate", "evaluate", "engine"), check=judge_ready, cost=tags_cost)
def tags(run: StageRun, iterations: int) -> dict:
    """Table 8: M2 answered with each inference tag, and a model trained like M2 without tags, each against the
    run's reference (AlpacaEval 1.0's when the run uses it, else the base model's answers); and the two models'
    held-out losses, a difference that resolves where the judge cannot."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.analysis import PAPER_TABLE8, TABLE8_VARIANTS
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.sanity import loss_difference, resolved

    last = model_name(iterations)  # Humpback: M2 in the paper
    untagged = train_forward(run, f"{last}_untagged", augmented=iterations,
                             train_settings=replace(run.config.train, tags=False),
                             label=f"Table 8: model 1 of 1 (trained like {last.upper()}, without tags)")
    prompts, judge = eval_prompts(run.config.evaluate), base_judge(run)
    output = run.files.path("analysis", "table8_tags")
    settings, pairs = run.config.evaluate, run.files.seed_pairs("heldout")
    results, answered, losses = {}, {}, {}
    for which, name in (("tagged", last), ("untagged", untagged["model"])):  # each model opened once
        with engine(run, name) as model:
            for label, (kind, tag) in TABLE8_VARIANTS.items():
                if kind != which or (which, tag) == ("tagged", settings.inference_tags):
                    continue  # M2 with the evaluation's own tags: eval answered and judged these very prompts already
                key = f"{which}_{tag.replace('+', '')}"
                answered[label] = (key, answer(run, model, prompts, key, tag, run.partial(output, part=key)))
            # the same question as a held-out loss, which resolves where the judge cannot: M2 prompted with the
            # evaluation's tags, the untagged model without a system prompt, on the held-out seed pairs
            with losses_engine(run, name, model) as scorer:
                losses[which] = model_losses(run, scorer, pairs,
                                             settings.inference_tags if which == "tagged" else "none")
    for label in TABLE8_VARIANTS:
        if label in answered:
            key, answers = answered[label]
            results[label] = versus_reference(run, judge, answers, output, key) | {"paper": PAPER_TABLE8[label]}
        else:
            key = f"{last}_vs_reference" if settings.annotator == alpaca_eval.ANNOTATOR else f"{last}_vs_base"
            results[label] = run.files.win_rates()[key]["overall"] | {"paper": PAPER_TABLE8[label], "from": "eval"}
    difference = loss_difference(losses["tagged"], losses["untagged"])
    heldout = {f"{last} - {untagged['model']}": difference | {"resolved": resolved(difference)},
               "prompted": {last: settings.inference_tags, untagged["model"]: "none"}}
    atomic_write_json(output, {"protocol": protocol(run.config.evaluate), "untagged_model": untagged["model"],
                               **results, "heldout": heldout})
    return {label: r["win_rate"] for label, r in results.items()}


SELECTORS = ((1, "m0"), (2, "m1"))  # Table 7's selectors: M0 picked A(1)_k, M1 picked A(2)_k


def selectors_cost(work) -> None:
    """M0 and M1 rate the labelled set (held-out seed pairs, 4 mismatched candidates each) with the run's rater; with
    an endpoint, it rates them too, then candidates until it has picked enough; a model trained on
    selection_train_size of each one's picks answers, judged against the run's reference."""
    import math

    from humpback_nb.method.analysis import NEGATIVES_PER_POSITIVE

    settings, lengths, curate = work.config.evaluate, work.lengths, work.config.curate
    pairs = (1 + NEGATIVES_PER_POSITIVE) * settings.selection_positives
    pair = (sum(lengths.seed_mean) + NEGATIVES_PER_POSITIVE * (lengths.instruction + lengths.segment)) / (
        1 + NEGATIVES_PER_POSITIVE)
    for _ in SELECTORS:
        work.rate(pairs, [pair])
    work.loads(len(SELECTORS))
    selected = [f"selected_{name}" for _, name in SELECTORS]
    if settings.judge_url:
        calls = pairs + min(work.candidates, math.ceil(settings.selection_train_size / (work.a_k / work.candidates)))
        work.endpoint_rating(calls, pair)
        work.note(f"the endpoint rates {pairs:,} labelled pairs and ~{calls - pairs:,} candidates to pick "
                  f"{settings.selection_train_size:,} (at A_k's share), up to {curate.max_new_tokens} tokens a reply")
        selected.append("selected_endpoint")
    for name in selected:
        work.train(name, [(lengths.curated["A"], settings.selection_train_size)], lengths.forward_overhead["S_w"],
                   max_steps=settings.scaling_steps)
        work.answers(1)
    work.versus_reference(len(selected))


@stage("selectors", outputs=("analysis:table7_selectors",),
       after=("seed", "candidates", "m0", "m1", "A1", "A2", "eval"),
       sections=("model", "train", "generate", "curate", "evaluate", "random_seed", "engine"),
       check=rater_and_judge_ready,
       cost=selectors_cost)
def selectors(run: StageRun) -> dict:
    """Table 7: M0, M1 (and an endpoint) as selectors: precision, recall, win rate of a model trained on their picks.

    Each selects by the rule the run curates with, on a labelled set with 20% positives (or people's labels)."""
    from humpback_nb.method.analysis import PAPER_TABLE7, labelled_set, labels_note, read_labels

    settings = run.config.evaluate
    pairs = (read_labels(settings.selection_labels) if settings.selection_labels else
             labelled_set(run.files.seed_pairs("heldout"), run.files.candidates(), settings.selection_positives,
                          run.config.random_seed))
    judge, results, models = base_judge(run), {}, 3 if settings.judge_url else 2
    for number, (iteration, name) in enumerate(SELECTORS, 1):
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
    atomic_write_json(run.files.path("analysis", "table7_selectors"), report)
    return {name: {k: r[k] for k in ("precision", "recall", "win_rate")} for name, r in results.items()}


def scaling_cost(work, iterations: int) -> None:
    """A model per quality and size N that the quality has N pairs for, each answering, judged against the run's
    reference. The curated sets' sizes: the paper's shares of the candidates (exactly, for the logprob rater's "top"
    sets; an estimate for the generate rater's A5 and A4, whose sizes its scores decide)."""
    import math

    from humpback_nb.method.analysis import NO_CURATION, PAPER_SHARES, quality_names, scaling_model_name

    settings, lengths, candidates = work.config.evaluate, work.lengths, work.candidates
    a5, a4 = quality_names(work.config.curate.rater)
    pools = {a5: ("top A5 share", math.ceil(PAPER_SHARES["A5"] * candidates)),
             a4: ("top A4 share", math.ceil(PAPER_SHARES["A4"] * candidates)), NO_CURATION: ("no curation", candidates)}
    models = 0
    for source, (kind, available) in pools.items():
        for n in settings.scaling_sizes:
            if n > available:
                work.note(f"{source}: no model for N={n:,} (at most {available:,} pairs)")
                continue
            if n > 0.9 * available:  # the pool shrinks with every degenerate instruction dropped
                work.note(f"{source}: N={n:,} needs {n:,} of at most {available:,} pairs: no model if over "
                          f"{1 - n / available:.0%} of the instructions are dropped")
            work.train(scaling_model_name(source, n), [(lengths.curated[kind], n)], lengths.forward_overhead["S_w"],
                       max_steps=settings.scaling_steps)
            work.answers(1)
            models += 1
    if models:
        work.versus_reference(models)


@stage("scaling", outputs=("analysis:figure3_scaling",),
       after=lambda T: ("candidates", f"rate_{model_name(T - 1)}", "eval"),
       sections=("model", "train", "generate", "curate", "evaluate", "random_seed", "engine"), check=judge_ready,
       cost=scaling_cost)
def scaling(run: StageRun, iterations: int) -> dict:
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
        last_rater = model_name(iterations - 1)  # M1 in the paper: it rated A(2)_k
        scores, rater = run.files.scores(last_rater), run.config.curate.rater
        sources = scaling_sources(run.files.candidates(), scores, run.config.random_seed, rater)
        rules = {name: rule for name, (_, rule) in quality_sets(rater, scores).items()}
        rules[NO_CURATION] = "every candidate"
        data = {"candidates": run.upstream["candidates"], f"rate_{last_rater}": run.upstream[f"rate_{last_rater}"],
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
                                               run.files.path("analysis", "figure3_scaling"),
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
    atomic_write_json(run.files.path("analysis", "figure3_scaling"), results)
    return {source: r["alpha"] for source, r in results["sources"].items()}


def selector_row(run: StageRun, judge, pairs: list[dict], name: str, iteration: int, label: str) -> dict:
    """Table 7's row of `name` (M0 or M1): it rates the labelled pairs with the run's rater and keeps those >= the
    k of A(iteration)_k, which it selected; a model trained on a sample of A(iteration)_k gives the win rate."""
    from humpback_nb.method.analysis import selector_quality, training_sample
    from humpback_nb.method.curate import rate

    output, curated = run.files.path("analysis", "table7_selectors"), run.files.curated(iteration)
    with engine(run, name) as model:
        scores = rate(model, pairs, run.config.curate, run.config.model.context_length,
                      partial=run.partial(output, part=f"rate_{name}"))
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
    from humpback_nb.method.analysis import pick_by_rating, selector_quality
    from humpback_nb.method.curate import rate_at_endpoint
    from humpback_nb.method.judges import make_judge

    settings, k = run.config.evaluate, run.config.curate.threshold
    output = run.files.path("analysis", "table7_selectors")
    endpoint = make_judge(settings)  # evaluate.judge_url: an EndpointJudge
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
    overall = trained_win_rate(run, judge, name, chosen, data, run.files.path("analysis", "table7_selectors"), label)
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
    losses = None
    with engine(run, name) as model:
        answers = answer(run, model, eval_prompts(settings), name, settings.inference_tags,
                         run.partial(output, part=name))
        if heldout is not None:
            with losses_engine(run, name, model) as scorer:
                losses = model_losses(run, scorer, heldout, settings.inference_tags)
    overall = versus_reference(run, judge, answers, output, name)
    return {**overall, "prompts": overall["n"], "model": name} | ({} if losses is None else {"heldout_rows": losses})
