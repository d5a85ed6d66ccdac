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


def scaling(sources: dict[str, dict[str, Any]], paper: dict[str, float]) -> str:
    """Table 3: alpha of w = alpha log N + C for each data quality, then the paper's alphas (7B models)."""
    lines = ["| data | available | alpha (ours) |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['available']} | {_number(r['alpha'], 2)} |" for name, r in sources.items()]
    lines += ["", "| paper (7B) | alpha |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in paper.items()]
    return "\n".join(lines)


def selectors(results: dict[str, Any]) -> str:
    """Table 7: precision and recall of each selector, ours beside the paper's."""
    lines = [f"labels: {results['labels']} ({results['positives']} positives of {results['pairs']})", "",
             "| selector | precision | recall | paper precision | paper recall |", "|---|---:|---:|---:|---:|"]
    for name in ("M0", "M1"):
        r = results[name]
        lines.append(f"| {name} | {_number(r['precision'], 2)} | {_number(r['recall'], 2)} "
                     f"| {r['paper']['precision']} | {r['paper']['recall']} |")
    return "\n".join(lines)


def tags(results: dict[str, Any]) -> str:
    """Table 8: win rate of each training/inference tag setting, ours beside the paper's."""
    rows = {label: r for label, r in results.items() if isinstance(r, dict) and "win_rate" in r}
    return win_rates(rows, paper={label: r["paper"] for label, r in rows.items()})
