"""Humpback's stages: every step of the method as a function of the run folder (Li et al. 2023, arXiv 2308.06259).

    seed, segments -> backward (M_yx) -> backward_check -> candidates (self-augmentation) -> m0
    -> for t = 1..T: rate_m{t-1} -> A{t} -> m{t}          (T = curate.iterations; the paper's 2, M2 = Humpback)
    -> heldout -> eval -> summary

Each stage is a short function declared where it is defined: what it writes (artifacts of run.RunFiles), which
stages it reads, which config sections it reads (and may read: `run.config` refuses any other, so a stage's hash
covers what it reads). It reads its inputs through `run.files`, calls the method's modules (method/: pure
functions of records, models and settings) and writes its outputs; run.py skips it when nothing it reads has
changed. The paper's analyses (Tables 7 and 8, Figure 3) are stages too, in analyses.py; pipeline.py puts them all
in order. Heavy modules are imported inside the stages, so that `humpback status` loads no torch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from humpback_nb.infra.files import atomic_dir, atomic_write_json, write_jsonl
from humpback_nb.run import ALL_SECTIONS, PipelineError, Stage, StageRun

DECLARED: dict[str, Stage] = {}  # every stage declared with @stage, by name (pipeline.py orders them)
Iterations = Callable[[int], tuple[str, ...]]


def stage(name: str, *, outputs: tuple[str, ...], after: tuple[str, ...] | Iterations = (),
          sections: tuple[str, ...] = (), check=None, cost=None):
    """Declare a stage of the method: the function below it makes `outputs` from the stages `after`; `check(config)`
    refuses, before a run starts, a config that cannot serve it; `cost(work)` counts its work for `humpback plan`
    (plan.Work: models trained, prompts read, tokens written, judge calls). A stage whose inputs depend on the number
    of self-curation iterations T declares `after` as a function of T; its function and cost then take T as
    `iterations`."""
    def declare(function):
        doc = " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph, whole
        DECLARED[name] = Stage(name, outputs, after, sections, function, doc, check, cost)  # type: ignore[arg-type]
        return function

    return declare


def model_name(t: int) -> str:
    """The forward model of iteration t: "m0" (the seed pairs only), "m1", ..., "m{T}" (Humpback)."""
    return f"m{t}"


def forward_models(iterations: int) -> tuple[str, ...]:
    """M0, M1, ..., M_T."""
    return tuple(model_name(t) for t in range(iterations + 1))


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
def seed_cost(work) -> None:
    work.records("seed", work.config.data.seed_size + work.config.data.heldout_size, sum(work.lengths.seed_mean))


@stage("seed", outputs=("seed",), sections=("data", "random_seed"), cost=seed_cost)
def seed(run: StageRun) -> dict:
    """seed pairs: human-written (instruction, output) pairs, split "train" and "heldout"."""
    from humpback_nb.method.data.seed import build_seed

    records, counts = build_seed(run.config.data, run.config.random_seed)
    write_jsonl(run.files.path("seed"), [dict(r, **conversation(r, "S_a")) for r in records])
    return counts


@stage("segments", outputs=("segments", "segments_dropped", "segments_report"),
       sections=("data", "random_seed"),
       cost=lambda work: work.records("segment", work.candidates, work.lengths.segment))
def segments(run: StageRun) -> dict:
    """unlabelled segments: web text cut at headers, filtered as in the paper, sampled."""
    from humpback_nb.method.data.segments import build_segments

    kept, dropped, report = build_segments(run.config.data, run.config.random_seed)
    write_jsonl(run.files.path("segments_dropped"), dropped)
    atomic_write_json(run.files.path("segments_report"), report)
    write_jsonl(run.files.path("segments"), kept)
    return report


# -- 2. The backward model M_yx (section 2.2) -------------------------------------------------------------------
def backward_cost(work) -> None:
    work.train("backward", [(work.lengths.seed, work.config.data.seed_size)], work.lengths.backward_overhead,
               backward=True)


@stage("backward", outputs=("model:backward",), after=("seed",), sections=("model", "train"), cost=backward_cost)
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


def backward_check_cost(work) -> None:
    """The base model and M_yx read each held-out pair backwards once; M_yx writes a few instructions."""
    lengths, heldout, generate = work.lengths, work.config.data.heldout_size, work.config.generate
    instruction, output = lengths.seed_mean
    backwards = lengths.backward_overhead + output + instruction
    for _ in range(2):
        work.score(heldout, backwards, backwards, losses=True)
    work.generate("candidates", min(BACKWARD_EXAMPLES, heldout), [lengths.backward_overhead + output],
                  lengths.instruction, generate.instruction_max_new_tokens, generate.batch_size)
    work.loads(2)


@stage("backward_check", outputs=("analysis:backward_heldout",), after=("seed", "backward"),
       sections=("model", "train", "generate", "random_seed", "engine"), cost=backward_check_cost)
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
    losses, shown = {}, pairs[:BACKWARD_EXAMPLES]
    for name in ("base", "backward"):
        with engine(run, name, losses=True) as model:
            losses[name] = example_losses(model, examples)
    with engine(run, "backward") as backward_model:
        written = write_instructions(backward_model, [{"id": p["id"], "text": p["output"]} for p in shown],
                                     run.config.generate, run.config.model.context_length)
    tokens = sum(n for _, n in losses["base"])
    difference = loss_difference(losses["backward"], losses["base"], seed=run.config.random_seed)
    difference["resolved"] = resolved(difference)
    result = {"pairs": len(pairs), "tokens": tokens,
              "loss": {name: sum(x for x, _ in rows) / tokens if tokens else None for name, rows in losses.items()},
              "difference": difference,
              "examples": [{"id": p["id"], "output": p["output"], "true": p["instruction"],
                            "generated": w["text"].strip(), "finished": w.get("finished", True)}
                           for p, w in zip(shown, written, strict=True)]}
    atomic_write_json(run.files.path("analysis", "backward_heldout"), result)
    return {"loss": result["loss"], "resolved": difference["resolved"]}


# -- 3. Self-augmentation (section 2.2) -------------------------------------------------------------------------
def candidates_cost(work) -> None:
    """Every segment kept gets an instruction (an upper bound: degenerate ones are dropped)."""
    lengths, generate = work.lengths, work.config.generate
    work.generate("candidates", work.candidates, [lengths.backward_overhead + t for t in lengths.segments],
                  lengths.instruction, generate.instruction_max_new_tokens, generate.batch_size)
    work.loads(1)
    work.records("candidate", work.candidates, lengths.instruction + lengths.segment)


@stage("candidates", outputs=("candidates", "candidates_dropped", "candidates_report"),
       after=("backward", "segments"), sections=("model", "generate", "engine"), cost=candidates_cost)
def candidates(run: StageRun) -> dict:
    """self-augmentation: M_yx writes an instruction for every segment; degenerate ones are set aside."""
    from humpback_nb.method.augment import self_augment

    started = time.time()
    partial = run.partial(run.files.path("candidates"))
    with engine(run, "backward") as backward_model:
        kept, dropped, report = self_augment(backward_model, run.files.segments(), run.config.generate,
                                             run.config.model.context_length, partial=partial)
    report["seconds_this_run"] = round(time.time() - started, 2)
    write_jsonl(run.files.path("candidates_dropped"), dropped)
    atomic_write_json(run.files.path("candidates_report"), report)
    write_jsonl(run.files.path("candidates"), kept)
    return report


# -- 4. Self-curation and its iterations (section 2.3) ---------------------------------------------------------
@stage("m0", outputs=("model:m0",), after=("seed",), sections=("model", "train"),
       cost=lambda work: work.train("m0", [(work.lengths.seed, work.config.data.seed_size)],
                                    work.lengths.forward_overhead["S_a"]))
def m0(run: StageRun) -> dict:
    """M0: the base model fine-tuned on the seed pairs only (tag S_a)."""
    return train_forward(run, "m0", augmented=None)


def iteration(t: int, iterations: int) -> list[Stage]:
    """Iteration t of T self-curation iterations: M_{t-1} rates every candidate (rate_m{t-1}), A(t)_k keeps those it
    scores >= k (A{t}), and M_t is fine-tuned on the seed pairs (S_a) and A(t)_k (S_w). The paper runs T = 2: M2 is
    Humpback."""
    rater, model = model_name(t - 1), model_name(t)
    if t == 1:
        rate_doc = (f"self-curation: {rater.upper()} rates every candidate with the paper's 5-point prompt; the "
                    "rater's check, and the two raters side by side on a few candidates, beside them.")
    else:
        rate_doc = f"self-curation again: {rater.upper()} rates every candidate; the rater's check beside them."

    def curated_cost(work) -> None:
        work.records("curated", work.a_k, sum(i + o for i, o in work.lengths.curated["A"])
                     / len(work.lengths.curated["A"]))
        work.note(f"|A_k| ~ {work.a_k:,} of {work.candidates:,} candidates")

    def model_cost(work) -> None:
        work.train(model, [(work.lengths.seed, work.config.data.seed_size), (work.lengths.curated["A"], work.a_k)],
                   work.lengths.forward_overhead["S_a"])

    return [
        Stage(f"rate_{rater}", (f"scores:{rater}",), ("seed", rater, "candidates"),
              ("model", "curate", "random_seed", "engine"), partial(rate_candidates, model_name=rater), rate_doc,
              rater_ready,
              partial(rate_cost, compare=t == 1)),
        Stage(f"A{t}", (f"curated:{t}", f"curated_info:{t}"), (f"rate_{rater}", "candidates"), ("curate",),
              partial(curate, scored_by=rater, iteration=t), f"A({t})_k: the candidates {rater.upper()} scored >= k.",
              cost=curated_cost),
        Stage(model, (f"model:{model}",), ("seed", f"A{t}"), ("model", "train"),
              partial(train_forward, name=model, augmented=t),
              f"{model.upper()}{' (Humpback)' if t == iterations else ''}: fine-tuned on the seed pairs (S_a) and "
              f"A({t})_k (S_w).", cost=model_cost),
    ]


def rate_cost(work, compare: bool) -> None:
    """A model rates every candidate, and the rater's check's pairs: the paper's rater writes reasoning, the logprob
    rater makes one pass. With `compare` (rate_m0), both raters also rate the first curate.compare_size candidates
    (compare_raters)."""
    settings, lengths = work.config.curate, work.lengths
    pairs = [lengths.instruction + t for t in lengths.segments]
    work.loads(1)
    work.rate(work.candidates + 2 * settings.sanity_size, pairs)  # the check: held-out seed and shuffled pairs
    if settings.rater == "logprob":
        work.records("score", work.candidates, 0)
        work.note("logprob rater: one forward pass per candidate after the rubric's cached keys and values")
    else:
        work.records("score_generate", work.candidates, settings.max_new_tokens)
        if settings.rater == "generate":
            work.note(f"generate rater: up to {settings.max_new_tokens} tokens of reasoning per candidate")
    if compare and settings.compare_size:  # after the rating: its decoding step is the one the notes give
        compared = min(settings.compare_size, work.candidates)
        work.generate("rate", compared, [lengths.rubric + p for p in pairs], settings.max_new_tokens,
                      settings.max_new_tokens, settings.batch_size)
        pair = sum(min(p, work.config.model.context_length - lengths.rubric - 8) for p in pairs) / len(pairs)
        work.score(compared, pair, lengths.rubric + pair, losses=False)


# -- 6. Evaluation (section 4) ----------------------------------------------------------------------------------
def heldout_differences(iterations: int) -> list[tuple[str, str]]:
    """The differences the heldout stage gives intervals for: each M_t against M0, each M_t against M_{t-1}, M0 and
    M_T against the base model (T = 2: M1-M0, M2-M0, M2-M1, M0-base, M2-base)."""
    models = forward_models(iterations)
    return ([(m, "m0") for m in models[1:]] + [(b, a) for a, b in zip(models[1:], models[2:], strict=False)]
            + [("m0", "base"), (models[-1], "base")])


def heldout_cost(work, iterations: int) -> None:
    """The base model and each forward model read the held-out seed pairs once (one forward pass a pair)."""
    instruction, output = work.lengths.seed_mean
    pair = instruction + output + work.lengths.forward_overhead[work.config.evaluate.inference_tags]
    models = 1 + len(forward_models(iterations))
    for _ in range(models):
        work.score(work.config.data.heldout_size, pair, pair, losses=True)
    work.loads(models)


@stage("heldout", outputs=("analysis:heldout_losses",), after=lambda T: ("seed", *forward_models(T)),
       sections=("model", "train", "evaluate", "random_seed", "engine"), cost=heldout_cost)
def heldout(run: StageRun, iterations: int) -> dict:
    """held-out loss: each model's loss per output token on the held-out seed pairs, and the differences between
    models with paired bootstrap 95% intervals; a number that resolves at any scale, whatever the judge."""
    from humpback_nb.method.sanity import loss_difference, resolved

    pairs, tag = run.files.seed_pairs("heldout"), run.config.evaluate.inference_tags
    losses = {name: heldout_losses(run, name, pairs, tag) for name in ("base", *forward_models(iterations))}
    tokens = sum(n for _, n in losses["base"])
    result = {"pairs": len(pairs), "tokens": tokens, "inference_tags": tag,
              "loss": {name: sum(x for x, _ in rows) / tokens if tokens else None for name, rows in losses.items()},
              "differences": {f"{a} - {b}": loss_difference(losses[a], losses[b], seed=run.config.random_seed)
                              for a, b in heldout_differences(iterations)},
              "per_pair": {name: [round(x, 4) for x, _ in rows] for name, rows in losses.items()},
              "tokens_per_pair": [n for _, n in losses["base"]]}
    for difference in result["differences"].values():
        difference["resolved"] = resolved(difference)
    atomic_write_json(run.files.path("analysis", "heldout_losses"), result)
    return {"loss": result["loss"], "resolved": {k: d["resolved"] for k, d in result["differences"].items()}}


def heldout_losses(run: StageRun, name: str, pairs: list[dict], tag: str) -> list[tuple[float, int]]:
    """(summed loss, tokens) of each held-out pair's output under model `name`, prompted with the system prompt
    `tag`, as the model was trained to read it (train.forward_example)."""
    with engine(run, name, losses=True) as model:
        return model_losses(run, model, pairs, tag)


def model_losses(run: StageRun, engine, pairs: list[dict], tag: str) -> list[tuple[float, int]]:
    """heldout_losses of a model already opened (its engine)."""
    from humpback_nb.method.train import example_losses, forward_example

    examples = [forward_example(engine.tokenizer, p["instruction"], p["output"], tag, run.config.train.max_seq_length)
                for p in pairs]
    return example_losses(engine, examples)


def comparisons(iterations: int) -> list[tuple[str, str]]:
    """The eval stage's comparisons (T = 2: M2-M0, M1-M0, M0-base, M2-base): Humpback against M0, the first
    iteration against M0, and M0 and Humpback against the base model."""
    last = model_name(iterations)
    return list(dict.fromkeys(((last, "m0"), ("m1", "m0"), ("m0", "base"), (last, "base"))))


def eval_cost(work, iterations: int) -> None:
    """The base model and each forward model answer; with AlpacaEval's annotator each is judged against its reference,
    and the comparisons and the judge's check on MT-bench's prompts by the kit's judge; else the comparisons and
    the judge's check (each model against its own shuffled answers) on every prompt."""
    settings, models = work.config.evaluate, 1 + len(forward_models(iterations))
    judged = len(comparisons(iterations)) + models  # the comparisons, and each model against its shuffled answers
    work.answers(models)
    if settings.annotator == "alpaca_eval_gpt4":
        work.alpaca_eval(models)
        if settings.mt_bench_prompts:
            work.judge(judged, settings.mt_bench_prompts)
    else:
        work.judge(judged)


@stage("eval", outputs=("eval",), after=forward_models, sections=("model", "generate", "evaluate", "engine"),
       check=judge_ready, cost=eval_cost)
def evaluate(run: StageRun, iterations: int) -> dict:
    """evaluation: answers of the base model, M0, M1 and M2, judged in both orders; win rates, and the judge's check
    (each model against its own shuffled answers). With annotator alpaca_eval_gpt4, each model's AlpacaEval 1.0 win
    rate against the reference, and MT-bench on its own."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.evaluate import eval_prompts, write_model_outputs
    from humpback_nb.method.judges import judge_name, make_judge
    from humpback_nb.method.sanity import judge_check, judge_verdict

    settings, generators = run.config.evaluate, ("base", *forward_models(iterations))
    protocol = alpaca_eval.protocol(settings)  # mixed settings, or a missing reference, fail before any answer
    if settings.annotator == alpaca_eval.ANNOTATOR:
        alpaca_eval.load_reference(settings.reference)
    prompts = eval_prompts(settings)
    answers, base = {}, open_engine(run, "base")  # the local judge is the base model: opened once
    for name in generators:
        partial = run.partial(run.files.path("eval"), part=f"answers_{name}")
        if name == "base":
            answers[name] = answer(run, base, prompts, name, settings.inference_tags, partial)
        else:
            with engine(run, name) as model:
                answers[name] = answer(run, model, prompts, name, settings.inference_tags, partial)
    judge = make_judge(settings, base)
    results, checked = judge_answers(run, judge, answers, generators, comparisons(iterations), generators,
                                     run.files.path("eval"))
    checks = {name: judge_check(check["judgments"]) for name, check in checked.items()}
    with atomic_dir(run.files.path("eval")) as tmp:
        for name, rows in answers.items():
            # AlpacaEval's file holds its own prompts only; every answer, with its prompt id, is in the JSONL
            write_model_outputs(run.files.path("model_outputs", name, tmp), prompts_of(rows, "alpaca_eval"))
            write_jsonl(run.files.path("answers", name, tmp), rows)
        for key, result in results.items():
            records = result.pop("judgments" if "judgments" in result else "annotations")
            write_jsonl(run.files.path("judgments", key, tmp), records)
        for check in checked.values():
            write_jsonl(run.files.path("judgments", check["key"], tmp), check["judgments"])
        cap, verdict = run.config.generate.max_new_tokens, judge_verdict(checks)
        atomic_write_json(run.files.path("win_rates", folder=tmp), {"protocol": protocol, "judge": judge_name(settings),
                                                          "prompts": len(prompts),
                                                          "inference_tags": settings.inference_tags,
                                                          "judge_check": verdict,
                                                          "answers_cut": {name: _cut(rows, cap)
                                                                          for name, rows in answers.items()},
                                                          **results})
    return {key: result.get("overall", result) for key, result in results.items()} | {
        "judge_separates": verdict["separates"]}


def judge_answers(run: StageRun, judge, answers: dict[str, list[dict]], against_reference: Sequence[str],
                  pairs: Sequence[tuple[str, str]], checked: Sequence[str], folder: Path) -> tuple[dict, dict]:
    """The judging of the evaluation, under the run's protocol. With AlpacaEval 1.0's annotator, each model of
    `against_reference` against the reference on AlpacaEval's prompts (`versus_reference`), and the rest on MT-bench's
    prompts alone; else on every prompt. Each pair (x, y) judged in both orders; each model of `checked` against its
    own answers to other prompts (the judge's check, sanity.py). Each judgment is kept as it comes in a part of
    `folder`: a rerun asks for the rest. Returns the win rates by key, with their judgments, and each checked model's
    judgments with the key they are kept under."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.sanity import shuffled_answers
    from humpback_nb.method.winrates import compare

    results, pool, prefix = {}, answers, ""
    if run.config.evaluate.annotator == alpaca_eval.ANNOTATOR:  # MT-bench is judged on its own
        for name in against_reference:
            key = f"{name}_vs_reference"
            results[key] = versus_reference(run, judge, answers[name], folder, key, whole=True)
        pool, prefix = {n: prompts_of(rows, "mt_bench") for n, rows in answers.items()}, "mt_bench_"
    if not all(pool.values()):  # no prompt left to judge (MT-bench's prompts set to 0)
        return results, {}
    for x, y in pairs:
        key = f"{prefix}{x}_vs_{y}"
        results[key] = compare(judge, pool[x], pool[y], partial=run.partial(folder, part=f"judge_{key}"),
                               progress=True, desc=f"judging {key}")
    checks = {}
    for name in checked:
        key = f"{prefix}{name}_vs_shuffled"
        judged = compare(judge, pool[name], shuffled_answers(pool[name]), progress=True,
                         partial=run.partial(folder, part=f"judge_{key}"),
                         desc=f"judge check: {name} against its shuffled answers")
        checks[name] = {"key": key, "judgments": judged["judgments"]}
    return results, checks


def prompts_of(rows: list[dict], source: str) -> list[dict]:
    """The rows of one source of evaluation prompts ("alpaca_eval" or "mt_bench"), by their ids' prefix."""
    return [r for r in rows if r["id"].startswith(f"{source}-")]


def versus_reference(run: StageRun, judge, answers: list[dict], output: Path, key: str, whole: bool = False) -> dict:
    """Judge `answers` against the run's reference under the run's protocol: with AlpacaEval 1.0's annotator against
    its reference (text-davinci-003's answers) on AlpacaEval's prompts, as the paper does; else with the run's
    `judge` against the base model's answers (not the paper's protocol). Judgments are kept as they come in the
    part `judge_<key>` of `output`. The overall win rate, or with `whole` every judgment too."""
    from humpback_nb.method import alpaca_eval
    from humpback_nb.method.judges import make_judge
    from humpback_nb.method.winrates import compare

    settings, judged = run.config.evaluate, run.partial(output, part=f"judge_{key}")
    if settings.annotator != alpaca_eval.ANNOTATOR:
        result = compare(judge, answers, run.files.answers("base"), partial=judged, progress=True,
                         desc=f"judging {key}")
    else:
        annotator = alpaca_eval.load_annotator()
        ask = alpaca_eval.endpoint_ask(make_judge(settings), annotator)
        result = alpaca_eval.evaluate(ask, annotator, prompts_of(answers, "alpaca_eval"),
                                      alpaca_eval.load_reference(settings.reference), partial=judged, progress=True,
                                      desc=f"AlpacaEval 1.0 {key.removesuffix('_vs_reference')}",
                                      both_orders=settings.both_orders, workers=settings.judge_concurrency)
    return result if whole else result["overall"]


def base_judge(run: StageRun):
    """The run's judge (`evaluate.judge`): the base model, or an endpoint."""
    from humpback_nb.method.judges import make_judge

    if run.config.evaluate.judge_url:
        return make_judge(run.config.evaluate)
    return make_judge(run.config.evaluate, open_engine(run, "base"))


def _cut(answers: list[dict], cap: int) -> dict[str, int]:
    """How many answers the token cap cut off (still being written at generate.max_new_tokens)."""
    return {"cut": sum(not a.get("finished", True) for a in answers), "of": len(answers), "max_new_tokens": cap}


# -- 8. Every number in one file --------------------------------------------------------------------------------
@stage("summary", outputs=("summary",),
       after=lambda T: ("segments", "backward_check", *(f"rate_{m}" for m in forward_models(T - 1)), "heldout",
                        "eval", *(f"A{t}" for t in range(1, T + 1)), "tags", "selectors", "scaling"),
       sections=ALL_SECTIONS, cost=lambda work, iterations: None)  # a file of numbers: no work to count
def summary(run: StageRun, iterations: int) -> dict:
    """summary: every number of the run in one file (what notebook 07 and the report read)."""
    result = summarize(run.files, run.config.whole(), run.stages, iterations)
    atomic_write_json(run.files.path("summary"), result)
    return {"pipeline_seconds": result["pipeline_seconds"]}


def summarize(files, config, stages: list[str], iterations: int) -> dict[str, Any]:
    """Sizes, Table 2 (with the k of each A_k), win rates, the analyses, the times and reports of `stages`, the
    config."""
    from humpback_nb.method.analysis import quality_sets
    from humpback_nb.method.curate import select
    from humpback_nb.method.data.stats import table2

    manifests = {name: manifest for name in stages if (manifest := files.manifest(name)) is not None}
    curated = {i: files.curated(i) for i in range(1, iterations + 1)}
    sets = {"seed": files.seed_pairs("train"), "candidates": files.candidates(),
            **{c.label(i): c.records for i, c in curated.items()}}
    # Table 2's A4^(2) beside A5^(2): the candidates the last rater (M1) scores >= 4 (the generate rater), or its
    # best 38.8%
    rater = model_name(iterations - 1)
    scores = files.scores(rater)
    a4_name, (a4_k, _) = list(quality_sets(config.curate.rater, scores).items())[1]
    a4 = {f"{a4_name} by {rater.upper()}'s scores": select(sets["candidates"], scores, a4_k)}
    win_rates = files.win_rates()
    last = curated[iterations]
    return {
        "preset": config.preset,
        "config_hash": config.hash(),
        "sizes": {name: len(records) for name, records in sets.items()} | {"segments": len(files.segments())},
        "curated": {f"A{i}": {"k": c.k, "rule": c.rule, "size": len(c.records)} for i, c in curated.items()},
        "table2": table2(sets | a4, paper_rows={"candidates": "augmented, all", last.label(iterations): "A5^(2)",
                                                **dict.fromkeys(a4, "A4^(2)")}),
        "win_rates": {key: {"overall": value["overall"], "per_dataset": value["per_dataset"]}
                      for key, value in win_rates.items() if isinstance(value, dict) and "overall" in value},
        "judge": win_rates.get("judge"),
        "protocol": win_rates.get("protocol"),
        **checks(files),
        "table8_tags": files.analysis("table8_tags"),
        "table7_selectors": files.analysis("table7_selectors"),
        "figure3_scaling": files.analysis("figure3_scaling"),
        "variant": files.analysis("variant"),  # a follow-up's model beside Humpback's (config variant.method)
        "stage_seconds": {name: m["seconds"] for name, m in manifests.items()},
        "pipeline_seconds": round(sum(m["seconds"] for m in manifests.values()), 1),
        "stage_reports": {name: m["report"] for name, m in manifests.items() if m.get("report")},
        "config": config.to_dict(),
    }


def checks(files) -> dict[str, Any]:
    """What the run's checks found so far: the judge's (eval), the raters' (rate_m0, rate_m1, ...), M_yx's held-out
    loss (backward_check) and the forward models' (heldout); None or empty where a stage has not run. What
    `tables.can_show` reads."""
    rater_checks, t = {}, 0
    while (manifest := files.manifest(f"rate_{model_name(t)}")) is not None or t < 2:
        report = (manifest or {}).get("report") or {}
        if report.get("rater_check"):
            rater_checks[model_name(t)] = report["rater_check"]
        t += 1
    win_rates = files.win_rates() if files.path("win_rates").is_file() else {}
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
        from humpback_nb.infra import serve

        serve.before_training()  # on a GPU, a vLLM server the kit started gives its memory to the training
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
    with engine(run, model_name) as model:
        return _rate_candidates(run, model, model_name)


def _rate_candidates(run: StageRun, model, model_name: str) -> dict:
    from humpback_nb.method.curate import parse_rate, rate, sanity_pairs
    from humpback_nb.method.sanity import rater_check


    settings, context = run.config.curate, run.config.model.context_length
    started = time.time()
    candidates = run.files.candidates()
    scores = rate(model, candidates, settings, context, partial=run.partial(run.files.path("scores", model_name)))
    seconds = time.time() - started
    seed = run.files.seed_pairs("heldout") or run.files.seed_pairs("train")  # pairs the rater never trained on
    sets = sanity_pairs(seed, candidates, settings.sanity_size, run.config.random_seed)
    by_id = {s["id"]: s["score"] for s in scores}
    sanity = {"seed": [s["score"] for s in rate(model, sets["seed"], settings, context)] if sets["seed"]
              else [], "augmented": [by_id.get(c["id"]) for c in sets["augmented"]],
              "shuffled": [s["score"] for s in rate(model, sets["shuffled"], settings, context)]
              if sets["shuffled"] else []}
    check = rater_check(sanity["augmented"][:len(sanity["shuffled"])], sanity["shuffled"], run.config.random_seed)
    report = {"pairs": len(scores), "parse_rate": parse_rate(scores), "seconds_this_run": round(seconds, 2),
              "rater_check": check, "sanity_scores": sanity}
    if model_name == "m0" and settings.compare_size:  # the paper's rater and the kit's side by side, on the same
        report["rater_comparison"] = compare_raters(model, candidates[: settings.compare_size], settings,
                                                    context)  # first candidates
    write_jsonl(run.files.path("scores", model_name),
                [dict(s, rater=settings.rater, model=model_name, tag=settings.rater_tag) for s in scores])
    return report


COMPARISON_EXAMPLES = 3  # of the generate rater's replies kept whole in the comparison


def compare_raters(engine, pairs: list[dict], settings, context: int) -> dict[str, Any]:
    """The two raters on the same pairs: the paper's (reasoning, then "Score: N", greedy) and the kit's (the expected
    score from the probabilities of "1".."5"): each one's speed and scores, the generate rater's parse rate, how
    they agree, and the first replies of the generate rater."""
    from humpback_nb.method.curate import agreement, parse_rate, rate_generate, rate_logprob

    started = time.time()
    by_logprob = rate_logprob(engine, pairs, settings, context, progress=False)
    logprob_seconds, started = time.time() - started, time.time()
    by_generate = rate_generate(engine, pairs, settings, context)
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
    atomic_write_json(run.files.path("curated_info", iteration), info)
    # A row as a seed row: its generation details and score stay in the candidates file and the rater's scores file
    write_jsonl(run.files.path("curated", iteration),
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


def open_engine(run: StageRun, name: str, losses: bool = False):
    """The engine that runs model `name` for a stage (`model_engine`)."""
    return model_engine(run.config, run.files, name, losses)


def model_engine(config, files, name: str, losses: bool = False):
    """The engine that runs model `name`, the base model ("base") or a model of the run (`models/<name>`), as
    `engine.kind` says: loaded here for the kit's own loops (`local`), or served by vLLM (`vllm`: the kit's own
    server, its log in the run folder, or the servers of `engine.urls`). With `losses`, the kit's own forward pass
    whatever the engine (infra/engines.py says why), the kit's server stopped first. `close()` frees it."""
    from humpback_nb.infra import serve
    from humpback_nb.infra.engines import LocalEngine
    from humpback_nb.infra.models import load_model, load_tokenizer, load_trained

    settings, folder = config.engine, None if name == "base" else files.path("model", name)
    if losses:
        serve.before_training()  # the same: on a GPU, the memory is the local model's
    elif settings.kind == "vllm":
        return serve.open_vllm(settings, config.model, name, folder, files.path("engine_log"),
                               load_tokenizer(config.model))
    model, tokenizer = load_model(config.model) if folder is None else load_trained(config.model, folder)
    return LocalEngine(model, tokenizer)


@contextlib.contextmanager
def engine(run: StageRun, name: str, losses: bool = False) -> Iterator[Any]:
    """`open_engine(run, name, losses)` for the block, freed after it (the next model loads into the memory it
    held)."""
    opened = open_engine(run, name, losses)
    try:
        yield opened
    finally:
        opened.close()


@contextlib.contextmanager
def losses_engine(run: StageRun, name: str, opened=None) -> Iterator[Any]:
    """An engine of model `name` that reads held-out losses (the kit's own forward pass): `opened`, when it is one."""
    if opened is not None and opened.name == "local":
        yield opened
        return
    with engine(run, name, losses=True) as local:
        yield local


def answer(run: StageRun, engine, prompts: list[dict], name: str, tags: str, partial: Path) -> list[dict]:
    """`name`'s answers to the evaluation prompts, with the system prompt `tags`, in AlpacaEval's format."""
    from humpback_nb.method.evaluate import answer as answers

    return answers(engine, prompts, run.config.generate, generator=f"humpback-nb-{name}", tags=tags,
                   partial=partial)
