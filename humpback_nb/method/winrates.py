"""Win rates: ties count half, every pair judged in both orders, a standard error on every number; and the
paper's two summaries of many win rates, the data-scaling fit (Table 3) and selection precision (Table 7)."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from humpback_nb.method.judges import Judge, LocalJudge, concurrency, judge_both_orders, judge_many_both_orders


def win_rate(outcomes: Sequence[float]) -> dict[str, Any]:
    """Win rate in percent (the mean outcome: ties count half) and its standard error across prompts; wins, ties
    and losses count the prompts whose outcome is above, at, or below one half."""
    n = len(outcomes)
    if n == 0:
        return {"n": 0, "win_rate": None, "se": None, "wins": 0, "ties": 0, "losses": 0}
    mean = statistics.fmean(outcomes)
    se = round(100 * statistics.stdev(outcomes) / math.sqrt(n), 2) if n > 1 else None  # None: one prompt
    return {"n": n, "win_rate": round(100 * mean, 2), "se": se,
            "wins": sum(o > 0.5 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o < 0.5 for o in outcomes)}


def compare(prefer_a: Judge, answers_x: list[dict[str, Any]], answers_y: list[dict[str, Any]],
            partial: Path | None = None, progress: bool = False, desc: str = "judging") -> dict[str, Any]:
    """Win rate of x against y, overall and per dataset, with every judgment. Pairs whose reply names no letter
    in either order are counted as `unparsed` and left out of the win rates.

    With `partial`, each judged pair is appended there at once, and a rerun judges only the pairs missing
    there (a judgment resumes only for the very same instruction and answers); in a launch of several
    processes, each judges its share of the pairs."""
    from humpback_nb.infra.batches import in_batches

    by_id = {a["id"]: a for a in answers_y}
    keys = [_pair_key(ax, by_id[ax["id"]]) for ax in answers_x]

    triples = [(ax["instruction"], ax["output"], by_id[ax["id"]]["output"]) for ax in answers_x]

    def judge(number: int, batch: list[int]) -> list[dict[str, Any]]:
        if isinstance(prefer_a, LocalJudge):
            judged = judge_many_both_orders(prefer_a, [triples[i] for i in batch])
        else:
            judged = [judge_both_orders(prefer_a, *triples[i]) for i in batch]
        return [{"id": keys[i], "dataset": answers_x[i]["dataset"], **record}
                for i, record in zip(batch, judged, strict=True)]

    # A local judge reads a batch of pairs in one pass, pairs of like length together; any other judge takes one
    # pair a batch, so that a crash while a paid judge runs loses at most the pair being judged.
    size = max(1, prefer_a.batch_size // 2) if isinstance(prefer_a, LocalJudge) else 1
    order = sorted(range(len(keys)), key=lambda i: -sum(map(len, triples[i])) if size > 1 else 0)
    records = in_batches(keys, [order[i : i + size] for i in range(0, len(order), size)], judge, partial=partial,
                         progress=progress, desc=desc, unit="pair", workers=concurrency(prefer_a))
    judgments = [record | {"id": ax["id"], "preference": preference(record["outcome"])}
                 for ax, record in zip(answers_x, records, strict=True)]
    datasets = sorted({j["dataset"] for j in judgments})
    return {
        "x": answers_x[0]["generator"] if answers_x else None,
        "y": answers_y[0]["generator"] if answers_y else None,
        "overall": _summary(judgments),
        "per_dataset": {d: _summary([j for j in judgments if j["dataset"] == d]) for d in datasets},
        "judgments": judgments,
    }


def preference(outcome: float | None) -> float | None:
    """AlpacaEval's `preference` of a judgment whose `outcome` is x's (1 x wins, 0 y wins, 0.5 tie): 1 + outcome,
    that is 1 when y (AlpacaEval's reference, output_1) wins, 2 when x (the model, output_2) wins, 1.5 a tie; so that
    `alpaca_eval.metrics.get_winrate` reads a judgments file as it is. None where the reply was not parsed."""
    return None if outcome is None else round(1.0 + outcome, 4)


def _pair_key(ax: dict[str, Any], ay: dict[str, Any]) -> str:
    """The prompt's id and a digest of the texts judged, so a stored judgment is never read for other answers."""
    texts = json.dumps([ax["instruction"], ax["output"], ay["output"]], ensure_ascii=False)
    return f"{ax['id']}#{hashlib.sha256(texts.encode()).hexdigest()[:16]}"


def _summary(judgments: list[dict[str, Any]]) -> dict[str, Any]:
    """The win rate over the pairs with an outcome, with the number of pairs judged and of those unparsed."""
    outcomes = [j["outcome"] for j in judgments if j["outcome"] is not None]
    return win_rate(outcomes) | {"pairs": len(judgments), "unparsed": len(judgments) - len(outcomes)}


def fit_alpha(ns: Sequence[float], win_rates: Sequence[float],
              with_se: bool = False) -> tuple[float, float] | tuple[float, float, float | None]:
    """(alpha, C) of the least-squares fit w = alpha * ln N + C (paper Table 3), and with `with_se` also alpha's
    standard error: sqrt(residual variance / Sxx), the residual variance on n - 2 degrees of freedom (None with
    fewer than three sizes, where a line fits exactly). The paper does not name its log's base; the kit uses the
    natural log (an alpha for log10 is ln 10 = 2.303 times this one)."""
    if len(ns) < 2:
        raise ValueError("the fit needs at least two data sizes")
    xs = [math.log(n) for n in ns]
    mean_x, mean_w = statistics.fmean(xs), statistics.fmean(win_rates)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    alpha = sum((x - mean_x) * (w - mean_w) for x, w in zip(xs, win_rates, strict=True)) / sxx
    c = mean_w - alpha * mean_x
    if not with_se:
        return alpha, c
    if len(xs) < 3:
        return alpha, c, None
    residuals = sum((w - alpha * x - c) ** 2 for x, w in zip(xs, win_rates, strict=True))
    return alpha, c, math.sqrt(residuals / (len(xs) - 2) / sxx)


def precision_recall(selected: set[str], positives: set[str]) -> dict[str, float]:
    """Precision and recall of a selection against the labelled positives (paper Table 7)."""
    hit = len(selected & positives)
    return {"precision": hit / len(selected) if selected else None,
            "recall": hit / len(positives) if positives else None,
            "selected": len(selected), "positives": len(positives)}


def position_bias(judgments: list[dict[str, Any]]) -> float | None:
    """The judge's mean preference for the answer shown first (0.5: no bias), from judgments in both orders:
    x_as_a is P(first is better) with x first, 1 - x_as_b the same with y first. Pairs with an unparsed reply
    are left out."""
    parsed = [j for j in judgments if j["x_as_a"] is not None and j["x_as_b"] is not None]
    if not parsed:
        return None
    return statistics.fmean((j["x_as_a"] + 1 - j["x_as_b"]) / 2 for j in parsed)
