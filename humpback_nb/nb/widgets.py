"""Interactive explorers for the notebooks (ipywidgets). Web text is untrusted: every string is escaped
before it becomes HTML, so a segment that contains <script> shows as text."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

PREVIEW_CHARS = 700
CARD = "<div style='border:1px solid #cbd5e1;border-radius:6px;padding:8px;margin:4px 0'>{}</div>"
BLOCK = "<div style='white-space:pre-wrap;margin-top:4px'><b>{}</b>: {}</div>"


def pair_html(record: dict[str, Any], score: float | None = None, reasoning: str | None = None) -> str:
    """One (instruction, output) pair as an HTML card, every field escaped."""
    def esc(value: Any) -> str:
        return html.escape(str(value), quote=True)

    output = record.get("output", "")
    clipped = output if len(output) <= PREVIEW_CHARS else output[:PREVIEW_CHARS] + " [...]"
    rows = [
        f"<div style='font-size:0.85em;color:#475569'>{esc(record.get('id', ''))} · {esc(record.get('source', ''))}"
        + (f" · score <b>{score:.2f}</b>" if score is not None else " · unscored") + "</div>",
        f"<div><b>Instruction</b>: {esc(record.get('instruction', ''))}</div>",
        BLOCK.format("Output", esc(clipped)),
    ]
    if reasoning:
        rows.append(BLOCK.format("Rater", esc(reasoning)))
    return CARD.format("".join(rows))


def _score_map(scores: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in scores}


def pair_explorer(candidates: list[dict[str, Any]], scores: list[dict[str, Any]]) -> widgets.VBox:
    """Browse candidates with their score and the rater's reasoning; filter by a score range."""
    by_id = _score_map(scores)
    score_range = widgets.FloatRangeSlider(value=(1.0, 5.0), min=1.0, max=5.0, step=0.1, description="score",
                                           continuous_update=False)
    index = widgets.IntSlider(value=0, min=0, max=0, description="pair", continuous_update=False)
    count = widgets.HTML()
    card = widgets.HTML()

    def chosen() -> list[dict[str, Any]]:
        low, high = score_range.value
        return [c for c in candidates if (s := by_id.get(c["id"], {}).get("score")) is not None and low <= s <= high]

    def show(*_) -> None:
        pairs = chosen()
        index.max = max(0, len(pairs) - 1)
        count.value = f"{len(pairs):,} of {len(candidates):,} candidates in range"
        if not pairs:
            card.value = "<i>no candidate in this range</i>"
            return
        record = pairs[min(index.value, len(pairs) - 1)]
        rating = by_id.get(record["id"], {})
        card.value = pair_html(record, rating.get("score"), rating.get("reasoning"))

    score_range.observe(show, names="value")
    index.observe(show, names="value")
    show()
    return widgets.VBox([score_range, index, count, card])


def threshold_explorer(candidates: list[dict[str, Any]], scores: list[dict[str, Any]], k: float = 4.5,
                       examples: int = 2) -> widgets.VBox:
    """A slider for k: |A_k|, and the pairs just above and just below the threshold."""
    by_id = {s["id"]: s["score"] for s in scores if s["score"] is not None}
    ranked = sorted((c for c in candidates if c["id"] in by_id), key=lambda c: by_id[c["id"]])
    slider = widgets.FloatSlider(value=k, min=1.0, max=5.0, step=0.05, description="k", continuous_update=False)
    summary = widgets.HTML()
    half = {"flex": "1 1 0%", "min_width": "0"}  # the two columns share the width equally
    above = widgets.HTML(layout=widgets.Layout(**half))
    below = widgets.HTML(layout=widgets.Layout(**half))

    def show(*_) -> None:
        k = slider.value
        kept = [c for c in ranked if by_id[c["id"]] >= k]
        left = [c for c in ranked if by_id[c["id"]] < k]
        summary.value = (f"<b>|A_k| = {len(kept):,}</b> of {len(ranked):,} rated candidates "
                         f"({len(kept) / max(1, len(ranked)):.0%}) have score &ge; {k:.2f}")
        above.value = "<b>just above k (kept)</b>" + "".join(
            pair_html(c, by_id[c["id"]]) for c in kept[:examples]) if kept else "<i>nothing is kept</i>"
        below.value = "<b>just below k (left out)</b>" + "".join(
            pair_html(c, by_id[c["id"]]) for c in left[-examples:][::-1]) if left else "<i>nothing is left out</i>"

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, summary, widgets.HBox([above, below])])
