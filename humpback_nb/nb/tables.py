"""Every Markdown table the notebooks show, ours beside the paper's where the paper has one.

Each function takes the records or results the run wrote and returns Markdown text; in a notebook,
`Markdown(tables.win_rates(...))` shows it. No numbers are computed here beyond formatting.
"""

from __future__ import annotations

from typing import Any


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _lengths(stats: tuple[float, float] | None) -> str:
    return "-" if stats is None else f"{stats[0]:,.0f} ± {stats[1]:,.0f}"


def table2(rows: list[dict[str, Any]]) -> str:
    """Table 2 (data statistics; lengths in characters, mean ± std), ours beside the paper's row."""
    lines = [
        "| set | count | instruction length | output length | paper: count | paper: instruction | paper: output |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        paper_count = "-" if row["paper_count"] is None else f"{row['paper_count']:,}"
        lines.append(
            f"| {row['set']} | {row['count']:,} | {_lengths(row['instruction'])} | {_lengths(row['output'])} "
            f"| {paper_count} | {_lengths(row['paper_instruction'])} | {_lengths(row['paper_output'])} |"
        )
    return "\n".join(lines)


def win_rates(rows: dict[str, dict[str, Any]], paper: dict[str, float] | None = None) -> str:
    """Win rates (label, win rate, standard error, wins/ties/losses, n, pairs whose judge reply was unparsed and
    left out[, the paper's number])."""
    head = "| | win rate % | ± se | wins | ties | losses | n | unparsed |" + (" paper % |" if paper else "")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if paper else "")]
    for label, r in rows.items():
        line = (f"| {label} | {_number(r['win_rate'])} | {_number(r['se'])} | {r['wins']} | {r['ties']} "
                f"| {r['losses']} | {r['n']} | {r.get('unparsed', 0)} |")
        lines.append(line + (f" {paper.get(label, '-')} |" if paper else ""))
    return "\n".join(lines)


def comparisons(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The overall win rate of each comparison in an eval result ("m2_vs_m0" -> "m2 vs m0")."""
    return {key.replace("_vs_", " vs "): value["overall"] for key, value in results.items()
            if isinstance(value, dict) and "overall" in value}


def threshold_counts(counts: dict[float, int], rated: int) -> str:
    """|A_k| for several k: how the size of the curated set falls as k rises."""
    lines = ["| k | " + " | ".join(f"{k:g}" for k in counts) + " |",
             "|---|" + "---:|" * len(counts),
             "| pairs with score >= k | " + " | ".join(f"{n:,}" for n in counts.values()) + " |",
             "| share of rated | " + " | ".join(f"{n / max(1, rated):.0%}" for n in counts.values()) + " |"]
    return "\n".join(lines)


def curated_sets(sets: dict[str, Any]) -> str:
    """A_k sets with the k that made each and the rule that chose k: {"A(1)_k": Curated, ...}."""
    lines = ["| set | k | pairs | of candidates | how k was chosen |", "|---|---:|---:|---:|---|"]
    for name, curated in sets.items():
        lines.append(f"| {name} | {curated.k:.3g} | {len(curated.records):,} | {curated.info['candidates']:,} "
                     f"| {curated.rule} |")
    return "\n".join(lines)


def scaling(sources: dict[str, dict[str, Any]], paper: dict[str, float], log_base: str = "e") -> str:
    """Table 3: alpha of w = alpha log N + C for each data quality (with the rule that chose it), with its standard
    error (ordinary least squares; none below three sizes), then the paper's alphas (7B models)."""
    base = "natural log" if log_base == "e" else f"log base {log_base}"
    lines = [f"| data | chosen by M1's scores | available | alpha (ours, {base}) | ± se |", "|---|---|---:|---:|---:|"]
    lines += [f"| {name} | {r.get('rule', '-')} | {r['available']} | {_number(r['alpha'], 2)} "
              f"| {_number(r.get('alpha_se'), 2)} |" for name, r in sources.items()]
    lines += ["", "| paper (7B) | alpha |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in paper.items()]
    held = [(name, n, d) for name, r in sources.items() for n, d in (r.get("heldout_vs_no_curation") or {}).items()]
    if held:  # the same question as held-out losses (per output token), which resolve where the judge cannot
        lines += ["", "Held-out loss of each model (per output token, the held-out seed pairs):", "",
                  "| data | " + " | ".join(f"N={p['n']}" for p in max((r["points"] for r in sources.values()),
                                                                       key=len)) + " |",
                  "|---|" + "---:|" * max(len(r["points"]) for r in sources.values())]
        lines += [f"| {name} | " + " | ".join(_number(p.get("heldout_loss"), 3) for p in r["points"]) + " |"
                  for name, r in sources.items()]
        lines += ["", DIFFERENCE_HEADER, "|---|---:|---|---|"]
        lines += [_difference_row(f"{name} - no curation, N={n}", d) for name, n, d in held]
    return "\n".join(lines)


def selectors(results: dict[str, Any]) -> str:
    """Table 7: precision and recall of each selector by its own rule, and the win rate of a model trained on what
    it selects, ours beside the paper's."""
    lines = [f"labels: {results['labels']} ({results['positives']} positives of {results['pairs']}); win rates: "
             f"{results.get('training', '')}", "",
             "| selector | rule | precision | recall | win rate % | ± se | paper precision | paper recall "
             "| paper win rate % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in results.get("selectors", ("M0", "M1")):
        r = results[name]
        paper = r.get("paper") or {}
        rule = f"k = {r['k']:.3g}" if isinstance(r.get("k"), (int, float)) else "-"
        lines.append(f"| {name} | {rule} | {_number(r['precision'], 2)} | {_number(r['recall'], 2)} "
                     f"| {_number(r.get('win_rate'))} | {_number(r.get('se'))} | {paper.get('precision', '-')} "
                     f"| {paper.get('recall', '-')} | {paper.get('win_rate', '-')} |")
    notes = [f"{name}: {results[name]['note']}" for name in results.get("selectors", ()) if results[name].get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def tags(results: dict[str, Any]) -> str:
    """Table 8: win rate of each training/inference tag setting, ours beside the paper's; then the held-out loss
    of M2 trained without tags against M2's, where the run measured it."""
    rows = {label: r for label, r in results.items() if isinstance(r, dict) and "win_rate" in r}
    table = win_rates(rows, paper={label: r["paper"] for label, r in rows.items()})
    held = (results.get("heldout") or {}).get("m2 - m2_untagged")
    if held is None:
        return table
    prompted = results["heldout"]["prompted"]
    return "\n".join([table, "", f"Held-out loss (per output token, the held-out seed pairs; M2 prompted with "
                       f"{prompted['m2']}, the untagged model with {prompted['m2_untagged']}):", "",
                       DIFFERENCE_HEADER, "|---|---:|---|---|", _difference_row("m2 - m2_untagged", held)])


# -- held-out losses (stage heldout) -------------------------------------------------------------------------------
def heldout(result: dict[str, Any]) -> str:
    """Each model's loss per output token on the held-out seed pairs, then each difference with its paired
    bootstrap 95% interval and whether the interval leaves out 0 (a negative difference: the first model is better)."""
    lines = [f"{result['pairs']} held-out seed pairs, {result['tokens']:,} output tokens, system prompt "
             f"{result['inference_tags']}", "", "| model | loss per output token |", "|---|---:|"]
    lines += [f"| {name} | {_number(loss, 3)} |" for name, loss in result["loss"].items()]
    lines += ["", DIFFERENCE_HEADER, "|---|---:|---|---|"]
    lines += [_difference_row(name, d) for name, d in result["differences"].items()]
    return "\n".join(lines)


DIFFERENCE_HEADER = "| difference | loss per token | 95% interval | resolved |"


def _difference_row(name: str, d: dict[str, Any]) -> str:
    """A row of DIFFERENCE_HEADER: "a - b", the difference, its interval, and which model is better if resolved."""
    return "| " + " | ".join([name, *_difference_cells(name, d)]) + " |"


def _difference_cells(name: str, d: dict[str, Any]) -> list[str]:
    """The difference, its interval, and which model is better if resolved (the cells of `_difference_row`)."""
    interval = f"{d['interval'][0]:+.3f} to {d['interval'][1]:+.3f}" if d["interval"] else "-"
    shown = "-" if d["difference"] is None else f"{d['difference']:+.3f}"
    verdict = ("yes: " + (f"{name.split(' - ')[0]} better" if d["difference"] < 0 else f"{name.split(' - ')[1]} "
                          "better")) if d.get("resolved") else "no: noise at this size"
    return [shown, interval, verdict]


def backward_check(result: dict[str, Any]) -> str:
    """M_yx's check (stage backward_check): the loss per token of the held-out true instructions given their
    outputs, under the base model and M_yx, and their difference with its paired bootstrap 95% interval."""
    lines = [f"{result['pairs']} held-out seed pairs, {result['tokens']:,} instruction tokens", "",
             "| model | loss per instruction token |", "|---|---:|"]
    names = {"backward": "M_yx"}
    lines += [f"| {names.get(name, name)} | {_number(loss, 3)} |" for name, loss in result["loss"].items()]
    lines += ["", DIFFERENCE_HEADER, "|---|---:|---|---|", _difference_row("M_yx - base", result["difference"])]
    return "\n".join(lines)


def rater_comparison(comparison: dict[str, Any]) -> str:
    """The two raters on the same candidates (rate_m0's report, stages.compare_raters): speed, parse rate, mean
    score, and how they agree on the pairs both scored."""
    lines = [f"{comparison['pairs']} candidates rated by both raters, with M0; the generate rater reasons in up to "
             f"{comparison['max_new_tokens']} tokens", "", "| rater | candidates/s | parse rate | mean score |",
             "|---|---:|---:|---:|"]
    for name in ("logprob", "generate"):
        rater = comparison[name]
        scores = [s for s in rater["scores"] if s is not None]
        parsed = rater.get("parse_rate", len(scores) / max(1, len(rater["scores"])))
        lines.append(f"| {name} | {rater['per_second']:.2f} | {parsed:.0%} | "
                     f"{_number(sum(scores) / len(scores) if scores else None, 2)} |")
    agreement = comparison["agreement"]
    same = agreement["same_rounded_score"]
    lines += ["", f"Agreement on the {agreement['pairs']} pairs both scored: Spearman's rank correlation "
              f"{_number(agreement['spearman'], 2)}, same rounded score {'-' if same is None else f'{same:.0%}'}"
              + (" (fewer than 3 pairs: not computed)" if agreement["spearman"] is None else "") + "."]
    return "\n".join(lines)


# -- what this run can show ------------------------------------------------------------------------------------
def _loss_finding(finding: str, d: dict[str, Any]) -> str:
    """A line of can_show for a finding that a held-out loss difference (first model minus second) tests."""
    if d["difference"] is None:
        return f"- *{finding}* (held-out loss): no held-out tokens to measure it on."
    interval = (f"{d['difference']:+.3f} per token, 95% interval {d['interval'][0]:+.3f} to "
                f"{d['interval'][1]:+.3f}" if d["interval"] else
                f"{d['difference']:+.3f} per token, too few pairs for an interval")
    answer = (("yes, and it does" if d["difference"] < 0 else "yes, and it does not: the loss rose")
              if d.get("resolved") else "not at this size: the interval holds 0")
    return f"- *{finding}* (held-out loss, {interval}): {answer}."


def can_show(summary: dict[str, Any]) -> str:
    """Which of the paper's findings this run can test at its size, from its own checks: the held-out losses'
    intervals, the judge's check and the rater's. One line each: the finding, yes or no, and why."""
    judge, raters, held = summary.get("judge_check") or {}, summary.get("rater_checks") or {}, summary.get("heldout")
    lines = []
    backward = summary.get("backward_heldout")
    if backward:
        lines.append(_loss_finding("the backward model learns to write the instruction of an output: M_yx better "
                                   "than the base model", backward["difference"]))
    if held:
        for key, finding in (("m0 - base", "fine-tuning on the seed pairs teaches the base model: M0 better than it"),
                             ("m2 - m0", "M2 (Humpback) fits held-out human answers better than M0 (seed only)"),
                             ("m2 - m1", "the second iteration helps: M2 better than M1")):
            d = held["differences"].get(key)
            if d is not None and d["difference"] is not None:
                lines.append(_loss_finding(finding, d))
    else:
        lines.append("- *Held-out loss:* not in this run (the heldout stage has not run).")
    if judge.get("models"):
        answer = ("yes: the judge separates real answers from shuffled ones" if judge["separates"] else
                  "no: the judge cannot separate real answers from shuffled ones, so these win rates are noise")
    else:
        answer = "not checked: the run's judge has no check (made before the kit ran it, or no prompt it judges)"
    lines.append(f"- *Win rates (Table 4, Table 8, Figure 3 and Table 7's win rates):* {answer}.")
    if raters:
        blind = [m.upper() for m, c in raters.items() if not c["tells_apart"]]
        answer = ("yes: the rater scores matched pairs above mismatched ones" if not blind else
                  f"no: {' and '.join(blind)} cannot tell matched from mismatched pairs, so A_k is close to a random "
                  "sample and Table 2's curated rows and Table 7's precision say little")
        lines.append(f"- *Self-curation selects better pairs (A_k, Table 2, Table 7):* {answer}.")
    table8 = ((summary.get("table8_tags") or {}).get("heldout") or {}).get("m2 - m2_untagged")
    if table8:
        lines.append(_loss_finding("training with tags helps (Table 8): M2 better than M2 trained without them",
                                   table8))
    for source, result in ((summary.get("figure3_scaling") or {}).get("sources") or {}).items():
        by_n = result.get("heldout_vs_no_curation") or {}
        if by_n:
            n = max(by_n, key=int)  # the largest N both sets reached
            lines.append(_loss_finding(f"quality beats quantity (Figure 3): {source}'s model better than the "
                                       f"uncurated one's at N={n}", by_n[n]))
    cut = {name: c for name, c in (summary.get("answers_cut") or {}).items() if c["of"]}
    if cut:
        shares = ", ".join(f"{name} {c['cut']}/{c['of']}" for name, c in cut.items())
        cap = next(iter(cut.values()))["max_new_tokens"]
        heavy = sum(c["cut"] for c in cut.values()) > sum(c["of"] for c in cut.values()) / 2
        lines.append(f"- *Answers as the models write them:* {'no' if heavy else 'mostly'}: generate.max_new_tokens "
                     f"({cap}) cut off {shares}; the judge compared "
                     + ("mostly cut-off answers." if heavy else "few cut-off answers."))
    scaling = summary.get("figure3_scaling") or {}
    sizes = max((len(r["points"]) for r in (scaling.get("sources") or {}).values()), default=0)
    if scaling:
        answer = ("no: fewer than three sizes give alpha no standard error" if sizes < 3 else
                  "not with this judge" if not judge.get("separates") else "yes: see Table 3's alpha and its error")
        lines.append(f"- *Data quality beats quantity (Figure 3's slopes):* {answer}.")
    return "\n".join(lines)


# -- what the run's judge and rater can tell apart (method/sanity.py) ------------------------------------------
def verdicts(judge_check: dict[str, Any] | None, rater_checks: dict[str, dict[str, Any]] | None) -> str:
    """The judge's and each rater's verdict, one line each, for the top of a table of results."""
    lines = []
    if judge_check and judge_check.get("models"):
        lines.append(f"*The judge:* {judge_check['verdict']}.")
    elif judge_check is not None:
        lines.append("*The judge:* not checked in this run (no prompt is judged by the kit's judge).")
    for model, check in (rater_checks or {}).items():
        lines.append(f"*The rater ({model.upper()}):* {check['verdict']}.")
    return "\n\n".join(lines) or "No check of the judge or the rater in this run (made before the kit ran them)."


def judge_checks(judge_check: dict[str, Any]) -> str:
    """The judge's check on each model: how often it prefers the model's real answer over the model's answer to
    another prompt, with the 95% bootstrap interval, the share of ties and of pairs whose two orders disagree."""
    lines = ["| model | real answer preferred % | 95% interval | ties % | orders disagree % | n | separates |",
             "|---|---:|---|---:|---:|---:|---|"]
    for model, c in judge_check.get("models", {}).items():
        interval = f"{100 * c['interval'][0]:.1f}-{100 * c['interval'][1]:.1f}" if c["interval"] else "-"
        share = (lambda x: "-" if x is None else f"{100 * x:.0f}")  # noqa: E731
        lines.append(f"| {model} | {_number(None if c['real_preferred'] is None else 100 * c['real_preferred'])} "
                     f"| {interval} | {share(c['ties'])} | {share(c['orders_disagree'])} | {c['n']} "
                     f"| {'yes' if c['separates'] else 'no'} |")
    return "\n".join(lines)


# -- what differs from the paper ---------------------------------------------------------------------------------
PAPER_SETTING = {
    "model": "LLaMA 7B (65B in Table 4)",
    "judge": "GPT-4 with AlpacaEval 1.0's annotator",
    "reference": "text-davinci-003's answers",
    "prompts": "the 805 AlpacaEval prompts",
    "seed": "3,200 Open Assistant pairs",
    "segments": "502,133 ClueWeb segments",
    "labels": "250 candidates labelled by people, 20% positive",
}


def differences(config, table: str) -> str:
    """One line, for a table of notebook 07, on what this run does differently from the paper: its model, data,
    judge, reference and labels, read from the run's config. Empty parts mean: as the paper."""
    e, paper = config.evaluate, PAPER_SETTING
    reference = e.reference
    if e.annotator == "alpaca_eval_gpt4":
        judge = f"AlpacaEval 1.0's annotator with {e.judge}"
    else:
        judge = (f"{e.judge} at an endpoint with the kit's one-letter prompt" if e.judge_url
                 else "the base model as a local judge (reads P(A), P(B))")
    parts = {
        "model": f"model {config.model.name} ({config.model.quantization}, train.method {config.train.method}); "
                 f"the paper: {paper['model']}",
        "judge": f"judge: {judge}; the paper: {paper['judge']}",
        "reference": ("reference: the base model's answers" if reference == "base" else f"reference: {reference}")
                     + f"; the paper: {paper['reference']}",
        "prompts": f"{e.alpaca_eval_prompts} AlpacaEval prompts and {e.mt_bench_prompts} MT-bench first turns; "
                   f"the paper: {paper['prompts']}",
        "data": f"{config.data.seed_size:,} seed pairs of {config.data.seed_source}, {config.data.num_segments:,} "
                f"segments of {', '.join(config.data.corpus_sources) or 'no corpus'}, instructions written up to "
                f"{config.generate.instruction_max_new_tokens} new tokens (longer ones "
                f"{'dropped' if config.generate.drop_capped else 'kept, cut off'}); the paper: {paper['seed']}, "
                f"{paper['segments']}, no cap stated",
        "sizes": f"N in {e.scaling_sizes}, at most {e.scaling_steps or 'the paper schedule of'} steps each; the "
                 "paper: N from 100 to 51,200 with its schedule",
        "labels": (f"labels from {e.selection_labels}" if e.selection_labels else
                   "labels by construction (held-out seed pairs positive, swapped outputs negative)")
                  + f" ({e.selection_positives} positives of {5 * e.selection_positives}), rater "
                    f"{config.curate.rater}, win rates of models trained on {e.selection_train_size} pairs; the "
                    f"paper: {paper['labels']}, the generate rater, 100 pairs",
    }
    wanted = {"table2": ("data", "model"), "table4": ("reference", "judge", "prompts", "model"),
              "figure3": ("sizes", "reference", "judge", "model"), "table7": ("labels", "model"),
              "table8": ("reference", "judge", "prompts", "model")}
    if table not in wanted:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(wanted)}")
    return "*What differs from the paper:* " + "; ".join(parts[p] for p in wanted[table]) + "."


# -- Humpback's follow-ups (followups.py: analyses/variant.json of each follow-up's run; notebook 08) ---------------
# What each follow-up's paper did and found, as far as the kit states it: numbers only where they are known for
# sure (AlpaGasus's counts and training times), the rest in words.
VARIANT_PAPERS: dict[str, dict[str, str]] = {
    "bft": {"name": "back-and-forth translation", "paper": "Nguyen et al. 2024, arXiv 2408.04614",
            "models": "7B and 70B models", "asked": "Llama-2-70B-chat rewrites each kept response",
            "data": "Humpback's backtranslation and filtering on Dolma", "judge": "AlpacaEval",
            "headline": "at similar data sizes its models beat Humpback's (and ShareGPT, Open Orca, Alpaca-GPT4 and "
                        "Self-instruct data) on AlpacaEval, at 7B and at 70B"},
    "kun": {"name": "Kun", "paper": "Zheng et al. 2024, arXiv 2401.06477", "models": "",
            "asked": "the chat model polishes the raw text into the answer, with a Chinese prompt",
            "data": "Chinese raw text after perplexity and length filters", "judge": "",
            "headline": "instructions scored alone, then answer polishment, make an instruction set from raw text "
                        "without written answers (described, no number quoted here)"},
    "alpagasus": {"name": "AlpaGasus", "paper": "Chen et al. 2023, arXiv 2307.08701", "models": "LLaMA 7B and 13B",
                  "asked": "ChatGPT rates each pair 0-5", "data": "Alpaca's 52,002 pairs", "judge": "GPT-4",
                  "headline": "ChatGPT kept 9,229 of Alpaca's 52,002 pairs (score >= 4.5, 17.7%); the 7B model "
                              "trained on them beats the one trained on all 52k, and trains in 14 minutes instead "
                              "of 80"},
}
EMBEDDED_CHAT = {"smollm2-135m": "SmolLM2-135M-Instruct, the kit's embedded chat model"}  # infra/models.py
Z95 = 1.96  # a win rate's approximate 95% interval: its standard error across prompts times this, either side


def _spread(stats: dict[str, Any] | None, digits: int = 0, share: bool = False) -> str:
    """"mean ± std" of a {"mean", "std", "n"} dict (variants.changes); shares as percentages."""
    if not stats or stats.get("mean") is None:
        return "-"
    scale, unit = (100, "%") if share else (1, "")
    std = "" if stats.get("std") is None else f" ± {scale * stats['std']:,.{digits}f}"
    return f"{scale * stats['mean']:,.{digits}f}{std}{unit}"


def _humpback(result: dict[str, Any]) -> str:
    """The Humpback model a follow-up is put beside first (M_T: "m2" for two iterations)."""
    return result["compared_with"][0]


def _versus(result: dict[str, Any], other: str) -> dict[str, Any] | None:
    """The overall win rate of the follow-up's model against `other` (its MT-bench one under AlpacaEval's own
    annotator, where the models are compared with each other on MT-bench only)."""
    method = result["method"]
    for key in (f"{method}_vs_{other}", f"mt_bench_{method}_vs_{other}"):
        if key in (result.get("win_rates") or {}):
            return result["win_rates"][key].get("overall")
    return None


def _judge_passes(result: dict[str, Any]) -> bool | None:
    """Whether the follow-up's judge passed its check (None: not checked)."""
    check = result.get("judge_check") or {}
    return check["separates"] if check.get("models") else None


def _win_cell(overall: dict[str, Any] | None, judge: bool | None) -> str:
    """A win rate with its ≈95% interval (± 1.96 se) and what it says: noise when the judge fails its check or the
    interval holds 50%."""
    if not overall or overall.get("win_rate") is None:
        return "-"
    rate, se, n = overall["win_rate"], overall.get("se"), overall["n"]
    if se is None:
        return f"{rate:.1f}% (n={n}, no interval): noise"
    low, high = rate - Z95 * se, rate + Z95 * se
    shown = f"{rate:.1f}% ({low:.1f} to {high:.1f}, n={n})"
    if judge is False:
        return f"{shown}: noise, the judge fails its check"
    if low <= 50 <= high:
        return f"{shown}: noise, the interval holds 50%"
    return f"{shown}: {'better' if rate > 50 else 'worse'}" + ("" if judge else " (the judge was not checked)")


def _judge_cell(result: dict[str, Any]) -> str:
    check = result.get("judge_check") or {}
    if not check.get("models"):
        return "not checked"
    c = next(iter(check["models"].values()))
    interval = (f", 95% interval {100 * c['interval'][0]:.1f} to {100 * c['interval'][1]:.1f}"
                if c.get("interval") else "")
    real = "-" if c.get("real_preferred") is None else f"{100 * c['real_preferred']:.1f}%"
    return f"{'passes' if check['separates'] else 'fails'}: real answers preferred {real}{interval}"


def _trained_on(pairs: dict[str, Any]) -> str:
    if pairs.get("method") == "alpagasus":
        return f"{pairs.get('kept', 0):,} of {pairs.get('pairs', 0):,} seed pairs ({_kept_by(pairs)})"
    return f"seed pairs + {pairs.get('kept', 0):,} rewritten ({pairs.get('selection', '-')})"


def variants(results: dict[str, dict[str, Any]]) -> str:
    """One row per follow-up (its analyses/variant.json): what its model trained on, its held-out loss minus
    Humpback's with the paired bootstrap 95% interval, its win rate against Humpback with its interval (or why it
    is noise), and the judge's check."""
    lines = ["| follow-up | trained on | held-out loss − Humpback's | 95% interval | resolved "
             "| win rate vs Humpback (≈95% interval) | the judge's check |", "|---|---|---:|---|---|---|---|"]
    for method, result in results.items():
        humpback = _humpback(result)
        name = f"{method} - {humpback}"
        d = result["heldout"]["differences"].get(name)
        loss = _difference_cells(name, d) if d else ["-", "-", "-"]
        lines.append(f"| {method} | {_trained_on(result['pairs'])} | {' | '.join(loss)} "
                     f"| {_win_cell(_versus(result, humpback), _judge_passes(result))} | {_judge_cell(result)} |")
    return "\n".join(lines)


def variant_win_rates(result: dict[str, Any]) -> str:
    """The follow-up's model against each of Humpback's (and the base model): win rate, its ≈95% interval and what
    it says, wins, ties, losses, n."""
    judge = _judge_passes(result)
    lines = ["| comparison | win rate (≈95% interval): reading | wins | ties | losses | n | unparsed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, overall in comparisons(result.get("win_rates") or {}).items():
        lines.append(f"| {label} | {_win_cell(overall, judge)} | {overall['wins']} | {overall['ties']} "
                     f"| {overall['losses']} | {overall['n']} | {overall.get('unparsed', 0)} |")
    return "\n".join(lines)


def variant_changes(changes: dict[str, dict[str, Any]]) -> str:
    """What each way of making responses did to the segments (variants.changes, one dict per row label): lengths in
    characters (mean ± std), the share of the response's word 3-grams found in its segment, and the word-level
    similarity of the two. Humpback's row (A(1)_k keeps the segment) reads 100% on both."""
    lines = ["| responses | pairs | segment chars | response chars | response 3-grams in the segment "
             "| word similarity to the segment |", "|---|---:|---:|---:|---:|---:|"]
    for label, c in changes.items():
        lines.append(f"| {label} | {c['pairs']:,} | {_spread(c['original_chars'])} | {_spread(c['rewrite_chars'])} "
                     f"| {_spread(c['from_original'], share=True)} | {_spread(c['similarity'], share=True)} |")
    return "\n".join(lines)


def _kept_by(report: dict[str, Any]) -> str:
    """The rule AlpaGasus's follow-up kept its pairs by: the threshold, or the k of a top share (variant.top_share)."""
    if report.get("k") is not None and report.get("k") != report.get("threshold"):
        return f"score >= {report['k']:.3g}, {report.get('rule', 'variant.top_share')}"
    return f"score >= {report.get('threshold'):g}"


def alpagasus_ratings(report: dict[str, Any]) -> str:
    """AlpaGasus's rating of the seed pairs (the alpagasus follow-up's variant_report) beside the paper's: pairs
    rated, replies with a score, the rule that kept pairs, pairs kept and their share; then how many pairs got each
    score (rounded down to a half: the logprob rating gives expected scores)."""
    share = report["kept"] / report["pairs"] if report.get("pairs") else None
    rating = f", {report['rating']} rating" if report.get("rating") else ""
    lines = ["| | pairs | rated (a score read) | kept by | kept | share kept |", "|---|---:|---:|---|---:|---:|",
             f"| ours: {report.get('model')} rates the seed pairs{rating} | {report['pairs']:,} "
             f"| {report['rated']:,} ({report['parse_rate']:.0%}) | {_kept_by(report)} | {report['kept']:,} "
             f"| {'-' if share is None else f'{share:.1%}'} |",
             "| AlpaGasus: ChatGPT rates Alpaca | 52,002 | - | score >= 4.5 | 9,229 | 17.7% |"]
    scores = report.get("scores")
    if scores:
        counts: dict[str, int] = {}
        for score in sorted(scores, key=lambda s: (s is None, s or 0)):
            key = "no score" if score is None else f"{int(score * 2) / 2:g}"
            counts[key] = counts.get(key, 0) + 1
        lines += ["", "| score | " + " | ".join(counts) + " |", "|---|" + "---:|" * len(counts),
                  "| pairs | " + " | ".join(f"{n:,}" for n in counts.values()) + " |"]
    return "\n".join(lines)


def _cell_text(text: Any, chars: int) -> str:
    """A text for one cell of a Markdown table: on one line, shortened, with Markdown and HTML shown as text."""
    from textwrap import shorten

    cut = "\x00"  # where shorten cut, marked apart from the text's own characters until they are escaped
    text = shorten(" ".join(str(text).split()), chars, placeholder=" " + cut) if text is not None else "-"
    for special in ("\\", "|", "*", "_", "`", "[", "]", "#"):
        text = text.replace(special, "\\" + special)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(cut, "[...]")


def side_by_side(rows: list[dict[str, Any]], chars: int = 300) -> str:
    """Texts side by side, one column per key of the rows (e.g. instruction, segment, Humpback's response, the
    rewrite), each shortened to `chars` characters and escaped."""
    if not rows:
        return "(no pairs)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell_text(row.get(c), chars) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _ours(result: dict[str, Any]) -> str:
    """This run's answer to a follow-up's headline: its data, then its model against Humpback's."""
    humpback = _humpback(result)
    pairs = result["pairs"]
    data = (f"{pairs['kept']:,} of {pairs['pairs']:,} seed pairs kept ({pairs['kept'] / max(1, pairs['pairs']):.1%})"
            if result["method"] == "alpagasus" else _trained_on(pairs))
    d = result["heldout"]["differences"].get(f"{result['method']} - {humpback}")
    if d and d["difference"] is not None and d["interval"]:
        verdict = ("noise, the interval holds 0" if not d.get("resolved") else
                   "lower than Humpback's" if d["difference"] < 0 else "higher than Humpback's")
        loss = (f"held-out loss − {humpback}'s {d['difference']:+.3f} per token (95% interval "
                f"{d['interval'][0]:+.3f} to {d['interval'][1]:+.3f}): {verdict}")
    else:
        loss = "held-out loss: not measured"
    win = _win_cell(_versus(result, humpback), _judge_passes(result))
    return f"{data}; {loss}; win rate vs {humpback} {win}"


def variant_headlines(results: dict[str, dict[str, Any]]) -> str:
    """Each follow-up's paper and its headline beside this run's measurement of the same thing."""
    lines = ["| follow-up | paper | its headline | ours |", "|---|---|---|---|"]
    for method, result in results.items():
        paper = VARIANT_PAPERS[method]
        lines.append(f"| {paper['name']} ({method}) | {paper['paper']} | {paper['headline']} | {_ours(result)} |")
    return "\n".join(lines)


def _asked(method: str, pairs: dict[str, Any]) -> str:
    """The model a follow-up asked to rewrite or rate, as this run named it."""
    role = {"bft": "rewriter", "kun": "polisher", "alpagasus": "rater"}[method]
    model = "this run's M0" if pairs.get("model") == "m0" else str(pairs.get("model"))
    model += f" ({EMBEDDED_CHAT[model]})" if model in EMBEDDED_CHAT else ""
    return f"{method}'s {role} {model}" + (f" at {pairs['url']}" if pairs.get("url") else "")


def variant_differences(config, results: dict[str, dict[str, Any]]) -> str:
    """One line on what the follow-ups' runs do differently from their papers: the model trained, the model that
    rewrites or rates, the judge and the data (read from the Humpback run's config and the follow-ups' results)."""
    def theirs(field: str) -> str:  # what a paper did, where the kit states it
        return ", ".join(f"{VARIANT_PAPERS[m]['name']} {VARIANT_PAPERS[m][field]}" for m in results
                         if VARIANT_PAPERS[m][field]) or "-"

    helpers = "; ".join(f"{_asked(m, r['pairs'])}, where in the paper {VARIANT_PAPERS[m]['asked']}"
                        for m, r in results.items())
    judges = sorted({str(r.get("judge")) for r in results.values()})
    judge = ", ".join("the base model as a local judge" if j == "local:base" else j for j in judges)
    data = (f"{config.data.seed_size:,} seed pairs of {config.data.seed_source} and {config.data.num_segments:,} "
            f"segments of {', '.join(config.data.corpus_sources) or 'no corpus'}")
    return (f"*What differs from the papers:* model {config.model.name} ({config.model.quantization}, train.method "
            f"{config.train.method}; the papers': {theirs('models')}); {helpers}; judge: {judge} (the papers': "
            f"{theirs('judge')}); data: {data} (the papers': {theirs('data')}).")
