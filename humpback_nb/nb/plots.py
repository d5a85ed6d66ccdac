"""One function per figure. Each returns a matplotlib Figure; `save` writes it as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "widget", "ipympl")):
    matplotlib.use("Agg")  # headless outside Jupyter (tests, CLI); notebooks keep the inline backend

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from humpback_nb.infra.files import atomic_path

SEED_COLOR, WEB_COLOR, MODEL_COLOR, DATA_COLOR = "#dbeafe", "#fde68a", "#e9d5ff", "#dcfce7"


def save(fig: plt.Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `fig` as PNG atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def method_overview() -> plt.Figure:
    """The method in one picture (paper Figure 1): backtranslate, curate, iterate."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0.3, 5.2)
    ax.axis("off")
    boxes = {
        "seed": (0.2, 3.3, "Seed data\n(instruction, output) pairs\nhuman-written, tag S_a", SEED_COLOR),
        "web": (0.2, 0.5, "Unlabelled web text\nsegments y (600-3,000 chars,\nfiltered, deduplicated)", WEB_COLOR),
        "myx": (3.0, 3.3, "Backward model M_yx\nlearns output -> instruction\n(seed pairs reversed)", MODEL_COLOR),
        "m0": (5.9, 3.3, "Seed model M0\nlearns instruction -> output\n(seed pairs)", MODEL_COLOR),
        "aug": (3.0, 0.5, "Self-augmentation\nM_yx writes x for each y\n-> candidates (x, y)", DATA_COLOR),
        "cur": (5.9, 0.5, "Self-curation\nM_k rates each candidate\n1-5 (paper Table 1)", DATA_COLOR),
        "ak": (8.6, 0.5, "A_k = candidates scored >= k\n(augmented, tag S_w)", DATA_COLOR),
        "next": (8.6, 3.3, "Train M_k+1 on\nseed (S_a) + A_k (S_w)\nM2 = Humpback", MODEL_COLOR),
    }
    width, height = 2.3, 1.0
    for x, y, text, color in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", fc=color, ec="#334155"))
        ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=8.5)

    def edge(x: float, y: float, toward: tuple[float, float]) -> tuple[float, float]:
        """Where the line from the box centre toward `toward` leaves the box (x, y)."""
        cx, cy = x + width / 2, y + height / 2
        dx, dy = toward[0] - cx, toward[1] - cy
        scale = min((width / 2 + 0.08) / abs(dx) if dx else float("inf"),
                    (height / 2 + 0.08) / abs(dy) if dy else float("inf"))
        return cx + dx * scale, cy + dy * scale

    def arrow(a: str, b: str, label: str = "", bend: float = 0.0, align: str = "center") -> None:
        (xa, ya, *_), (xb, yb, *_) = boxes[a], boxes[b]
        start = edge(xa, ya, (xb + width / 2, yb + height / 2))
        end = edge(xb, yb, (xa + width / 2, ya + height / 2))
        patch = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#475569",
                                connectionstyle=f"arc3,rad={bend}", lw=1.3)
        ax.add_patch(patch)
        if label:
            nudge = {"left": 0.08, "right": -0.08, "center": 0.0}[align]
            ax.text((start[0] + end[0]) / 2 + nudge, (start[1] + end[1]) / 2, label, fontsize=7.5,
                    ha=align, va="center", color="#475569", style="italic")

    arrow("seed", "myx")
    arrow("seed", "m0", bend=-0.45)
    arrow("web", "aug")
    arrow("myx", "aug", bend=0.0)
    arrow("aug", "cur")
    arrow("m0", "cur", "M0 rates first", align="right")
    arrow("cur", "ak")
    arrow("ak", "next")
    arrow("next", "cur", "iterate:\nM1 rates again", align="left")
    ax.set_title("Instruction backtranslation (Li et al. 2023): self-augment, then self-curate, then iterate",
                 fontsize=10)
    return fig


def length_histograms(sets: dict[str, dict[str, list[int]]], bins: int = 40) -> plt.Figure:
    """Histograms of lengths in characters: one panel per field ("instruction", "output"), one
    colour per set, e.g. {"seed": {"instruction": [...], "output": [...]}, "segments": {"output": [...]}}."""
    fields = [f for f in ("instruction", "output") if any(f in lengths for lengths in sets.values())]
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 3.6), squeeze=False)
    for ax, name in zip(axes[0], fields, strict=True):
        values = [v for lengths in sets.values() for v in lengths.get(name, [])]
        edges = np.histogram_bin_edges(values, bins=bins) if values else bins
        for label, lengths in sets.items():
            if lengths.get(name):
                ax.hist(lengths[name], bins=edges, alpha=0.55, label=f"{label} (n={len(lengths[name]):,})")
        ax.set_title(f"{name} length")
        ax.set_xlabel("characters")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def filter_funnel(funnel: list[dict]) -> plt.Figure:
    """How many segments are left after each step (documents -> segments -> each filter -> sample)."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(funnel) + 1))
    steps = [step["step"] for step in funnel][::-1]
    counts = [step["count"] for step in funnel][::-1]
    bars = ax.barh(steps, counts, color="#93c5fd", edgecolor="#1e3a8a")
    for bar, step in zip(bars, funnel[::-1], strict=True):
        note = f"{step['count']:,}" + (f"  (-{step['removed']:,})" if step["removed"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
    ax.set_xlabel("count")
    ax.set_xlim(0, max(counts) * 1.25)
    ax.set_title("From documents to segments: what each filter removed")
    fig.tight_layout()
    return fig


def loss_curves(logs: dict[str, dict]) -> plt.Figure:
    """Training loss per step, and the learning rate on a second axis, for each named training log."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rate = ax.twinx()
    for name, log in logs.items():
        steps = [s["step"] for s in log["steps"]]
        (line,) = ax.plot(steps, [s["loss"] for s in log["steps"]], marker="o", ms=3, label=f"{name} loss")
        rate.plot(steps, [s["lr"] for s in log["steps"]], ls="--", color=line.get_color(), alpha=0.6,
                  label=f"{name} learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (output tokens)")
    rate.set_ylabel("learning rate")
    rate.set_ylim(bottom=0)  # from 0: the paper's decay to 0.9 of the start is small, and looks small
    rate.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles = ax.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    ax.set_title("Fine-tuning: loss and learning rate per step")
    fig.tight_layout()
    return fig


def first_words(texts: list[str], top: int = 15, title: str = "First word of the generated instructions") -> plt.Figure:
    """How often each first word opens the texts: a backward model's habits at a glance."""
    from collections import Counter

    counts = Counter((t.split() or [""])[0].strip(".,:;!?\"'").lower() or "(empty)" for t in texts).most_common(top)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1.2))
    ax.barh([w for w, _ in counts][::-1], [c / max(1, len(texts)) for _, c in counts][::-1], color="#c4b5fd")
    ax.set_xlabel(f"share of {len(texts):,} instructions")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def score_distributions(scores: dict[str, list[float]], title: str = "Rater sanity check") -> plt.Figure:
    """Histograms of scores (1-5) for named sets of pairs on one figure, each with its mean marked."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    edges = np.linspace(1, 5, 17)
    for name, values in scores.items():
        values = [v for v in values if v is not None]
        if not values:
            continue
        mean = float(np.mean(values))
        _, _, patches = ax.hist(values, bins=edges, alpha=0.45, label=f"{name}: mean {mean:.2f} (n={len(values)})")
        ax.axvline(mean, color=patches[0].get_facecolor(), lw=2, alpha=1.0)
    ax.set_xlim(1, 5)  # the rubric's whole scale, whatever the scores
    ax.set_xlabel("score")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def score_shift(before: dict[str, float], after: dict[str, float], labels: tuple[str, str] = ("M0", "M1"),
                thresholds: tuple[float, float] | None = None) -> plt.Figure:
    """Each candidate's score by one rater against another's, with the k of each rater's A_k on its axis (under
    `curate.top_share` the two k differ)."""
    ids = [key for key in before if before[key] is not None and after.get(key) is not None]
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.scatter([before[i] for i in ids], [after[i] for i in ids], s=10, alpha=0.5)
    ax.plot([1, 5], [1, 5], color="#94a3b8", lw=1)
    if thresholds is not None:
        ax.axvline(thresholds[0], color="#ef4444", lw=1, ls="--", label=f"k of {labels[0]}: {thresholds[0]:.3g}")
        ax.axhline(thresholds[1], color="#f97316", lw=1, ls="--", label=f"k of {labels[1]}: {thresholds[1]:.3g}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(1, 5)
    ax.set_ylim(1, 5)
    ax.set_xlabel(f"score by {labels[0]}")
    ax.set_ylabel(f"score by {labels[1]}")
    ax.set_title(f"How the scores moved ({len(ids)} candidates)")
    fig.tight_layout()
    return fig


def win_rates(results: dict[str, dict], title: str = "Pairwise win rates (ties count half)") -> plt.Figure:
    """Win rate of x against y for each comparison, with the standard error as an error bar."""
    names = list(results)
    rates = [results[n]["win_rate"] for n in names]
    errors = [results[n]["se"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.3))
    ax.barh(names[::-1], rates[::-1], xerr=errors[::-1], color="#86efac", edgecolor="#166534", capsize=4)
    ax.axvline(50, color="#64748b", ls="--", lw=1)
    for y, (rate, n) in enumerate(zip(rates[::-1], [results[n]["n"] for n in names][::-1], strict=True)):
        ax.text(1, y, f"{rate:.1f}% (n={n})", va="center", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate of the first model, % (50 = no difference)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def scaling_curves(sources: dict[str, dict]) -> plt.Figure:
    """Paper Figure 3 at the run's scale: win rate against the number N of augmented training pairs, one line per
    data quality, with standard errors and the fit w = alpha log N + C."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, result in sources.items():
        points = result["points"]
        if not points:
            continue
        ns = [p["n"] for p in points]
        bars = ax.errorbar(ns, [p["win_rate"] for p in points], yerr=[p["se"] for p in points], marker="o",
                           capsize=3, label=f"{name} (alpha {result['alpha']:.2f})" if result["alpha"] is not None
                           else name)
        if result["alpha"] is not None:
            grid = np.geomspace(min(ns), max(ns), 20)
            ax.plot(grid, result["alpha"] * np.log(grid) + result["C"], ls=":", color=bars[0].get_color())
    ax.set_xscale("log")
    sizes = sorted({p["n"] for result in sources.values() for p in result["points"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("augmented training pairs N (log scale)")
    ax.set_ylabel("win rate against the base model, %")
    ax.set_ylim(0, 100)  # the whole scale, and 50%: no better than the reference
    ax.axhline(50, color="#64748b", ls="--", lw=1)
    ax.set_title("Data quality against data quantity (paper Figure 3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
