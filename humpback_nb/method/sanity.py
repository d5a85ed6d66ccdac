"""Can this run's judge and rater tell anything apart? Checks with verdicts, and intervals that say so at any scale.

A judge's win rate has a small standard error when the judge is indifferent: per-prompt preferences that all lie
near one half vary little. So before a win rate is read as a measurement, the judge must pass a test it cannot
fail if it reads the answers at all: a model's answer to a prompt against the same model's answer to another
prompt (`shuffled_answers`). A rater likewise: matched candidate pairs against the same instructions with another
candidate's output. Each check gives its effect with a bootstrap 95% interval and a verdict.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

DRAWS = 2000  # bootstrap resamples
LEVEL = 0.95
# A judge must prefer a model's own answer over its answer to another prompt at least this often (the 95% interval's
# lower end) before its win rates between models count as measurements: a capable judge does so nearly always, and
# differences between trained models are far subtler than a wrong answer.
JUDGE_SEPARATION = 0.60


def bootstrap_interval(values: Sequence[float], draws: int = DRAWS, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of `values` (resampled with replacement, `draws` times, seeded);
    None for fewer than two values."""
    if len(values) < 2:
        return None
    rng, n = random.Random(seed), len(values)
    return _percentiles([statistics.fmean(rng.choices(values, k=n)) for _ in range(draws)], level)


def _percentiles(estimates: list[float], level: float = LEVEL) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 percentiles of bootstrap estimates."""
    estimates, tail, draws = sorted(estimates), (1 - level) / 2, len(estimates)
    return estimates[int(tail * draws)], estimates[min(draws - 1, int((1 - tail) * draws))]


def paired_difference(a: Sequence[float], b: Sequence[float], draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
    """mean(a - b) over paired items, with the bootstrap interval of that mean (the pairs resampled together)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    interval = bootstrap_interval(differences, draws, seed)
    return {"n": len(differences), "difference": statistics.fmean(differences) if differences else None,
            "interval": list(interval) if interval else None}


def resolved(difference: dict[str, Any]) -> bool:
    """Whether a paired difference's interval leaves out 0."""
    interval = difference.get("interval")
    return bool(interval) and (interval[0] > 0 or interval[1] < 0)


def shuffled_answers(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each answer's output replaced by the same model's answer to the next prompt of its dataset (the last by the
    first): as long, as fluent and in the same style, but to another question. Ids and instructions stay."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for answer in answers:
        by_dataset.setdefault(answer.get("dataset", ""), []).append(answer)
    other = {}
    for rows in by_dataset.values():
        for i, answer in enumerate(rows):
            other[answer["id"]] = rows[(i + 1) % len(rows)]["output"]
    return [answer | {"output": other[answer["id"]], "generator": f"{answer.get('generator', '')} (shuffled)"}
            for answer in answers]


def judge_check(judgments: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The judge on a model's answers (x) against the same model's shuffled answers (y), judged in both orders:
    how often it prefers the real answer (mean outcome, with its bootstrap interval), the share of ties, the share
    of pairs whose two orders disagree, and whether it separates (interval's lower end >= JUDGE_SEPARATION)."""
    parsed = [j for j in judgments if j.get("outcome") is not None]
    outcomes = [j["outcome"] for j in parsed]
    interval = bootstrap_interval(outcomes, seed=seed)
    both = [j for j in parsed if j.get("x_as_a") is not None and j.get("x_as_b") is not None]
    disagree = [j for j in both if (j["x_as_a"] > 0.5) != (j["x_as_b"] > 0.5)]
    separates = bool(interval) and interval[0] >= JUDGE_SEPARATION
    return {"n": len(outcomes), "unparsed": len(judgments) - len(outcomes),
            "real_preferred": statistics.fmean(outcomes) if outcomes else None,
            "interval": list(interval) if interval else None,
            "ties": sum(o == 0.5 for o in outcomes) / len(outcomes) if outcomes else None,
            "orders_disagree": len(disagree) / len(both) if both else None,
            "separates": separates}


def judge_verdict(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One verdict over the judge's checks on each model: it separates only if it does so on every model."""
    separates = bool(checks) and all(c["separates"] for c in checks.values())
    if not checks:
        text = "not checked"
    elif separates:
        text = ("the judge prefers each model's real answers over its answers to other prompts (at least "
                f"{JUDGE_SEPARATION:.0%}, 95% interval): its win rates are measurements")
    else:
        worst = min(checks, key=lambda name: (checks[name]["interval"] or [0.0])[0])
        c = checks[worst]
        shown = (f"{100 * c['real_preferred']:.1f}%, 95% interval {100 * c['interval'][0]:.1f}-"
                 f"{100 * c['interval'][1]:.1f}" if c["interval"] else "too few pairs")
        text = (f"the judge cannot separate real answers from shuffled ones ({worst}'s answers over its answers to "
                f"other prompts: {shown}; a judge that reads answers prefers them at least "
                f"{JUDGE_SEPARATION:.0%}): its win rates are noise, not measurements")
    return {"separates": separates, "verdict": text, "bar": JUDGE_SEPARATION, "models": checks}


def rater_check(matched: Sequence[float | None], shuffled: Sequence[float | None], seed: int = 0) -> dict[str, Any]:
    """The rater's scores of candidate pairs (`matched`) against the same instructions with another candidate's
    output (`shuffled`), paired by instruction (pairs with an unreadable score in either are left out): the mean
    difference with its bootstrap interval, and whether it tells them apart (the interval above 0)."""
    pairs = [(m, s) for m, s in zip(matched, shuffled, strict=True) if m is not None and s is not None]
    difference = paired_difference([m for m, _ in pairs], [s for _, s in pairs], seed=seed)
    tells = bool(difference["interval"]) and difference["interval"][0] > 0
    shown = (f"{difference['difference']:+.2f} points, 95% interval {difference['interval'][0]:+.2f} to "
             f"{difference['interval'][1]:+.2f}, {difference['n']} pairs" if difference["interval"] else
             f"{difference['n']} pairs: too few")
    verdict = (f"the rater scores matched pairs above mismatched ones ({shown})" if tells else
               f"the rater cannot tell matched from mismatched pairs at this scale ({shown}): its A_k is not a "
               "selection by quality")
    return difference | {"matched": statistics.fmean(m for m, _ in pairs) if pairs else None,
                         "shuffled": statistics.fmean(s for _, s in pairs) if pairs else None,
                         "tells_apart": tells, "verdict": verdict}


def loss_difference(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]], draws: int = DRAWS,
                    seed: int = 0) -> dict[str, Any]:
    """Loss per output token of model a minus model b on the same examples ((summed loss, tokens) of each, in the
    same order): sum(a - b) / tokens, with the bootstrap 95% interval of that ratio (the examples resampled, both
    models' losses of an example together). Negative: a predicts the held-out outputs better."""
    if len(a) != len(b):
        raise ValueError(f"paired losses differ in number: {len(a)} and {len(b)}")
    rows = [(x - y, n) for (x, n), (y, _) in zip(a, b, strict=True)]
    tokens = sum(n for _, n in rows)
    if not tokens:
        return {"n": len(rows), "tokens": 0, "difference": None, "interval": None}
    rng, estimates = random.Random(seed), []
    for _ in range(draws if len(rows) > 1 else 0):
        sample = rng.choices(rows, k=len(rows))
        count = sum(n for _, n in sample)
        estimates.append(sum(d for d, _ in sample) / count if count else 0.0)
    interval = list(_percentiles(estimates)) if estimates else None
    return {"n": len(rows), "tokens": tokens, "difference": sum(d for d, _ in rows) / tokens, "interval": interval}
