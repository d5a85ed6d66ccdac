"""Data statistics in the layout of the paper's Table 2 (v1; Table 1 in v3), lengths in characters."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

# Li et al. 2023, Table 2: count, instruction length (mean, std), output length (mean, std).
PAPER_TABLE2 = {
    "seed": (3200, (148, 322), (1072, 818)),
    "A5^(2)": (41821, (115, 175), (1663, 616)),
    "A4^(2)": (195043, (206, 298), (1985, 649)),
    "augmented, all": (502133, (352, 134), (1722, 653)),
}


def length_stats(texts: Iterable[str]) -> tuple[float, float] | None:
    """(mean, population std) of the lengths in characters; None for no texts."""
    lengths = [len(t) for t in texts]
    if not lengths:
        return None
    return statistics.fmean(lengths), statistics.pstdev(lengths)


def table2(sets: dict[str, list[dict[str, Any]]], paper_rows: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per named set: our count and lengths, and the paper's row it corresponds to.

    `paper_rows` maps our set name to the paper's row name (e.g. {"seed": "seed"}); records without an
    `instruction` (unlabelled segments) have only output lengths.
    """
    rows = []
    for name, records in sets.items():
        paper = PAPER_TABLE2.get((paper_rows or {}).get(name, name))
        rows.append({
            "set": name,
            "count": len(records),
            "instruction": length_stats(r["instruction"] for r in records if r.get("instruction") is not None),
            "output": length_stats(r.get("output", r.get("text", "")) for r in records),
            "paper_count": paper[0] if paper else None,
            "paper_instruction": paper[1] if paper else None,
            "paper_output": paper[2] if paper else None,
        })
    return rows


def examples(records: list[dict[str, Any]], key: str, per_group: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """A few records of each value of `key` (e.g. one dropped segment per filter), chosen with `seed`."""
    import random

    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record.get(key), []).append(record)
    rng = random.Random(seed)
    return [r for _, group in sorted(groups.items(), key=lambda g: str(g[0]))
            for r in rng.sample(group, min(per_group, len(group)))]
