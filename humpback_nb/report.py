"""`humpback report`: one self-contained HTML page with every table, figure and number of a finished run.

The page holds what notebooks 01-07 show, drawn again from the run folder with the same functions (nb/tables.py
for the tables, nb/plots.py for the figures), so a run made with `humpback run` alone gets a complete page. It is
one file: CSS inline, figures as base64 PNG, no script, nothing fetched. Every text from the run (web segments,
generated instructions, the config) is escaped: the page shows markup from the data as text.
"""

from __future__ import annotations

import base64
import html
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from textwrap import shorten
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg

from humpback_nb.infra.files import atomic_write_text
from humpback_nb.nb import plots, tables
from humpback_nb.pipeline import open_run
from humpback_nb.run import PipelineError, RunFiles, RunFolder

EXAMPLES = 4  # pairs shown of each kind: kept, rated below k, dropped by a rule
OUTPUT_CHARS = 500  # an example's output is shortened to this many characters


# -- Markdown tables (what nb/tables.py returns) to HTML -----------------------------------------------------------
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _inline(text: str) -> str:
    """Escaped text, with the *emphasis* and `code` the table functions use."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def _table(lines: list[str]) -> str:
    head, align, *rows = lines
    styles = ["right" if a.endswith(":") else "left" for a in _cells(align)]

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f'<{tag} class="{style}">{_inline(cell)}</{tag}>'
                                for cell, style in zip(cells, styles, strict=False)) + "</tr>"

    return (f"<table><thead>{row(_cells(head), 'th')}</thead><tbody>"
            + "".join(row(_cells(line), "td") for line in rows) + "</tbody></table>")


def markdown_html(text: str) -> str:
    """The Markdown of nb/tables.py as HTML: pipe tables become tables, "- " lines a list, other lines paragraphs;
    all escaped."""
    blocks, table, items = [], [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        if table:
            blocks.append(_table(table) if len(table) >= 2 else f"<p>{_inline(table[0])}</p>")
            table = []
        if line.startswith("- "):
            items.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if items:
            blocks.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.strip():
            blocks.append(f"<p>{_inline(line)}</p>")
    return "\n".join(blocks)


# -- figures -------------------------------------------------------------------------------------------------------
def figure_png(figure) -> bytes:
    """A matplotlib Figure drawn by Agg as PNG; the figure is closed."""
    FigureCanvasAgg(figure)  # draws with Agg whatever backend pyplot uses (a notebook's inline one)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the run: where the notebooks show it, the files it needs, and how to draw it."""

    id: str
    title: str
    notebook: str
    needs: Callable[[RunFiles], list[Path]]
    draw: Callable[[RunFiles, dict[str, Any]], Any]  # (files, summary) -> a Figure, PNG bytes, or why there is none


def _lengths(records: list[dict], *fields: str) -> dict[str, list[int]]:
    return {name: [len(r[name]) for r in records] for name in fields}


def _data_lengths(files: RunFiles, _summary) -> Any:
    return plots.length_histograms({"seed": _lengths(files.seed_pairs("train"), "instruction", "output"),
                                    "segments": {"output": [len(s["text"]) for s in files.segments()]}})


def _instruction_lengths(files: RunFiles, _summary) -> Any:
    return plots.length_histograms({"seed": _lengths(files.seed_pairs("train"), "instruction"),
                                    "candidates": _lengths(files.candidates(), "instruction")})


def _score_shift(files: RunFiles, _summary) -> Any:
    m0, m1 = ({s["id"]: s["score"] for s in files.scores(name)} for name in ("m0", "m1"))
    return plots.score_shift(m0, m1, thresholds=(files.curated(1).k, files.curated(2).k))


def _scaling(_files: RunFiles, summary) -> Any:
    scaling = summary.get("figure3_scaling")
    if not scaling or not any(result["points"] for result in scaling["sources"].values()):
        return "this run has no scaling experiment (evaluate.scaling_sizes is empty)"
    return plots.scaling_curves(scaling["sources"])


def _rater_sanity(files: RunFiles, summary) -> Any:
    # rate_m0 rates the sanity pairs and keeps their scores in its report (runs made before it did: notebook 04's PNG)
    check = (summary.get("rater_checks") or {}).get("m0")
    scores = ((files.manifest("rate_m0") or {}).get("report") or {}).get("sanity_scores")
    if scores:
        verdict = f": {'tells' if check['tells_apart'] else 'cannot tell'} matched from shuffled pairs" if check else ""
        return plots.score_distributions(scores, title=f"Rater sanity check (M0){verdict}")
    path = files.path("figures") / "rater_sanity.png"
    if not path.is_file():
        return (f"not in this run: notebook 04 rates the sanity pairs with M0 and writes {path.name} to "
                f"{files.path('figures').name}/ (`humpback notebooks`)")
    return path.read_bytes()


FIGURES = (
    FigureSpec("fig-method", "The method (paper Figure 1)", "00", lambda f: [],
               lambda f, s: plots.method_overview()),
    FigureSpec("fig-funnel", "From documents to segments: what each filter removed", "01",
               lambda f: [f.path("segments_report")],
               lambda f, s: plots.filter_funnel(f.segments_report()["funnel"])),
    FigureSpec("fig-data-lengths", "Lengths of the seed pairs and the segments", "01",
               lambda f: [f.path("seed"), f.path("segments")], _data_lengths),
    FigureSpec("fig-backward-loss", "The backward model M_yx: loss and learning rate", "02",
               lambda f: [f.path("model", "backward")],
               lambda f, s: plots.loss_curves({"M_yx": f.train_log("backward")})),
    FigureSpec("fig-instruction-lengths", "Instruction lengths: seed against generated", "03",
               lambda f: [f.path("seed"), f.path("candidates")], _instruction_lengths),
    FigureSpec("fig-first-words", "First word of the generated instructions", "03", lambda f: [f.path("candidates")],
               lambda f, s: plots.first_words([r["instruction"] for r in f.candidates()])),
    FigureSpec("fig-m0-loss", "M_yx and M0: loss and learning rate", "04",
               lambda f: [f.path("model", "backward"), f.path("model", "m0")],
               lambda f, s: plots.loss_curves({"M_yx": f.train_log("backward"), "M0": f.train_log("m0")})),
    FigureSpec("fig-rater-sanity", "Rater sanity check (M0 on held-out seed, candidate and shuffled pairs)", "04",
               lambda f: [f.path("scores", "m0")], _rater_sanity),
    FigureSpec("fig-score-shift", "How the scores moved from M0 to M1", "05",
               lambda f: [f.path("scores", "m0"), f.path("scores", "m1"), f.path("curated_info", 1),
                          f.path("curated_info", 2)],
               _score_shift),
    FigureSpec("fig-m0-m1-m2-loss", "M0, M1 and M2: loss and learning rate", "05",
               lambda f: [f.path("model", m) for m in ("m0", "m1", "m2")],
               lambda f, s: plots.loss_curves({m.upper(): f.train_log(m) for m in ("m0", "m1", "m2")})),
    FigureSpec("fig-win-rates", "Pairwise win rates", "06", lambda f: [f.path("win_rates")],
               lambda f, s: plots.win_rates(tables.comparisons(f.win_rates()))),
    FigureSpec("fig-scaling", "Data quality against quantity (paper Figure 3)", "07",
               lambda f: [f.path("analysis", "figure3_scaling")], _scaling),
)


def figure_html(spec: FigureSpec, files: RunFiles, summary: dict[str, Any]) -> str:
    """A figure as an embedded image with its caption, or one line saying why this run has none."""
    missing = [path for path in spec.needs(files) if not path.exists()]
    caption = f"{html.escape(spec.title)} <span class=\"muted\">(notebook {spec.notebook})</span>"
    if missing:
        drawn: Any = "not in this run: " + ", ".join(str(p.relative_to(files.root)) for p in missing)
    else:
        drawn = spec.draw(files, summary)
    if isinstance(drawn, str):
        return f'<div class="figure" id="{spec.id}"><p class="note">{caption}: skipped, {html.escape(drawn)}</p></div>'
    png = drawn if isinstance(drawn, bytes) else figure_png(drawn)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure class="figure" id="{spec.id}"><img src="{uri}" alt="{html.escape(spec.title)}">'
            f"<figcaption>{caption}</figcaption></figure>")


# -- the page's sections ---------------------------------------------------------------------------------------------
def main_result(summary: dict[str, Any]) -> str | None:
    """"M2 against M0: win rate 52.1% ± 3.0 over 6 prompts", said to be noise when the judge failed its check
    (sanity.judge_check), or None when the run has no such comparison."""
    check = summary.get("judge_check") or {}
    for key in ("m2_vs_m0", "mt_bench_m2_vs_m0"):
        overall = (summary.get("win_rates", {}).get(key) or {}).get("overall")
        if overall:
            prompts = "MT-bench prompts" if key.startswith("mt_bench") else "prompts"
            se = "-" if overall["se"] is None else f"{overall['se']:.1f}"
            measured = (f"{overall['win_rate']:.1f}% ± {se} over {overall['n']} {prompts} (judge: "
                        f"{summary.get('judge')})")
            if check.get("models") and not check["separates"]:
                return f"M2 against M0: no measurement: {check['verdict']}; its win rate, {measured}, is noise."
            return (f"M2 against M0: win rate {measured}"
                    + ("" if check.get("models") else "; the judge was not checked"))
    return None


def tables_html(summary: dict[str, Any], config) -> list[tuple[str, str, str]]:
    """Notebook 07's tables, each beside the paper's and followed by how this run differs: (id, title, html)."""
    from humpback_nb.method.analysis import PAPER_TABLE3

    def differs(name: str) -> str:
        return markdown_html(tables.differences(config, name))

    curated = "".join(f"<p>{html.escape(name)}: {c['size']} pairs, k = {c['k']:.3g}: {html.escape(c['rule'])}</p>"
                      for name, c in summary["curated"].items())
    judge_check = summary.get("judge_check")
    checks = ("<h4>What this run can show</h4>" + markdown_html(tables.can_show(summary))
              + "<h4>The checks behind it</h4>"
              + markdown_html(tables.verdicts(judge_check, summary.get("rater_checks"))))
    if judge_check and judge_check.get("models"):
        checks += markdown_html(tables.judge_checks(judge_check))
    if summary.get("heldout"):
        checks += "<h4>Held-out loss: a number that resolves at any scale</h4>" + markdown_html(
            tables.heldout(summary["heldout"]))
    out = [("checks", "What this run can show, and what its judge and rater can tell apart", checks),
           ("table2", "Table 2: data statistics", curated + markdown_html(tables.table2(summary["table2"]))
            + differs("table2"))]
    comparisons = tables.comparisons(summary["win_rates"])
    per_dataset = "".join(f"<h4>{html.escape(name)}, per prompt set</h4>"
                          + markdown_html(tables.win_rates(value["per_dataset"]))
                          for name, value in summary["win_rates"].items() if value.get("per_dataset"))
    out.append(("table4", "Table 4 at our scale: win rates",
                f"<p>judge: {html.escape(str(summary.get('judge')))}; {html.escape(str(summary.get('protocol')))}</p>"
                + markdown_html(tables.win_rates(comparisons)) + per_dataset + differs("table4")))
    scaling = summary.get("figure3_scaling")
    if scaling and any(result["points"] for result in scaling["sources"].values()):
        body = (markdown_html(tables.scaling(scaling["sources"], PAPER_TABLE3, scaling["log_base"]))
                + f"<p>training: {html.escape(scaling['training'])}</p><p>draws: {html.escape(scaling['draw'])}</p>"
                + '<p>The figure: <a href="#fig-scaling">Figure 3</a>.</p>')
    else:
        body = '<p class="note">This run has no scaling experiment (evaluate.scaling_sizes is empty).</p>'
    out.append(("table3", "Figure 3 and Table 3: data quality against quantity", body + differs("figure3")))
    for key, name, title, stage in (("table7_selectors", "table7", "Table 7: selector quality", "selectors"),
                                    ("table8_tags", "table8", "Table 8: the tags", "tags")):
        result = summary.get(key)
        if result:
            body = markdown_html(tables.selectors(result) if name == "table7" else tables.tags(result)) + differs(name)
        else:
            body = f'<p class="note">The {stage} stage has not run.</p>'
        out.append((name, title, body))
    return out


def variant_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The results (analyses/variant.json) of the follow-ups' runs beside the Humpback run at `run_dir`
    (followups.variant_folder), for those that have them."""
    from humpback_nb import followups

    found = {method: RunFiles(followups.variant_folder(run_dir, method)).analysis("variant")
             for method in followups.VARIANT_SETTINGS}
    return {method: result for method, result in found.items() if result}


def variants_html(results: dict[str, dict[str, Any]], config) -> str:
    """The follow-ups beside Humpback (notebook 08): one row each, then what differs from their papers."""
    return (f"<p>Each follow-up's run lies beside this one and shares its stages; its model is compared with "
            f"{html.escape(', '.join(next(iter(results.values()))['compared_with']))} on the same held-out pairs "
            "and prompts.</p>" + markdown_html(tables.variants(results))
            + markdown_html(tables.variant_differences(config, results)))


def curation_html(files: RunFiles) -> str:
    """The curated sets with the k that made each, and |A_k| for several k (notebooks 04 and 05)."""
    from humpback_nb.method.curate import threshold_counts

    sets = {f"A({i})_k": files.curated(i) for i in (1, 2) if files.path("curated_info", i).is_file()}
    if not sets:
        return '<p class="note">No curated set yet (stages A1, A2).</p>'
    parts = [markdown_html(tables.curated_sets(sets))]
    for i, name in ((1, "m0"), (2, "m1")):
        if files.path("scores", name).is_file() and files.path("curated_info", i).is_file():
            parts.append(f"<h4>Scores of {name.upper()}: pairs at or above each k</h4>" + markdown_html(
                tables.threshold_counts(threshold_counts(files.scores(name)), files.curated(i).info["rated"])))
    return "\n".join(parts)


def pair_html(record: dict[str, Any], note: str) -> str:
    """One (instruction, output) pair as escaped text, with its score or reason."""
    return (f'<div class="pair"><div class="meta">{html.escape(note)}</div>'
            f'<div class="label">instruction</div><div class="text">{html.escape(str(record.get("instruction")))}</div>'
            f'<div class="label">output</div><div class="text">'
            f'{html.escape(shorten(str(record.get("output")), OUTPUT_CHARS, placeholder=" [...]"))}</div></div>')


def kept_html(files: RunFiles) -> str:
    """The best-scored pairs of A(1)_k and A(2)_k, with the score of the model that rated them (M0, M1)."""
    parts = []
    for i, rater in ((1, "m0"), (2, "m1")):
        if not files.path("curated_info", i).is_file():
            continue
        curated = files.curated(i)
        scores = ({s["id"]: s["score"] for s in files.scores(rater)} if files.path("scores", rater).is_file() else {})
        best = sorted(curated.records, key=lambda r: -(scores.get(r["id"]) or 0))[:EXAMPLES]
        parts.append(f"<h3>{html.escape(curated.label(i))}: {len(curated.records)} pairs, the best scored by "
                     f"{rater.upper()}</h3>"
                     + "".join(pair_html(r, f"{r['id']}, score {scores.get(r['id'])}") for r in best))
    return "\n".join(parts) or '<p class="note">No curated set yet (stages A1, A2).</p>'


def dropped_html(files: RunFiles) -> str:
    """Candidates M0 rated just below the k of A(1)_k, and candidates a rule dropped, with the rule."""
    parts = []
    needed = (files.path("scores", "m0"), files.path("curated_info", 1), files.path("candidates"))
    if all(path.is_file() for path in needed):
        k = files.curated(1).k
        scores = {s["id"]: s["score"] for s in files.scores("m0") if s["score"] is not None}
        below = sorted((c for c in files.candidates() if scores.get(c["id"], k) < k), key=lambda c: -scores[c["id"]])
        parts.append(f"<h3>Rated below k = {k:.3g} by M0 ({len(below)} candidates), the nearest misses</h3>"
                     + "".join(pair_html(c, f"{c['id']}, score {scores[c['id']]}") for c in below[:EXAMPLES]))
    if files.path("candidates_dropped").is_file():
        from humpback_nb.method.data.stats import examples

        dropped = files.candidates_dropped()
        shown = examples([dict(d, rule=str(d.get("reason")).split(" (")[0]) for d in dropped], key="rule")
        parts.append(f"<h3>Dropped by a rule before rating ({len(dropped)} candidates), one per rule</h3>"
                     + ("".join(pair_html(d, f"{d.get('id')}: {d.get('reason')}") for d in shown[:EXAMPLES])
                        or '<p class="note">none</p>'))
    return "\n".join(parts) or '<p class="note">No candidates yet (stage candidates).</p>'


def stages_html(folder: RunFolder, config) -> str:
    """Each stage with its state and seconds, and the models it trained with their hash."""
    rows = []
    for row in folder.status(config):
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        rows.append(f"<tr><td>{html.escape(row['stage'])}</td><td>{html.escape(row['state'])}</td>"
                    f'<td class="right">{seconds}</td><td>{html.escape(row["doc"])}</td></tr>')
        for model in row["models"]:
            seconds = "" if model["seconds"] is None else f"{model['seconds']:.1f}"
            rows.append(f'<tr class="model"><td>model {html.escape(model["model"])}</td>'
                        f'<td>{html.escape(model["state"])}</td><td class="right">{seconds}</td>'
                        f"<td><code>{html.escape(str(model['hash'] or ''))}</code></td></tr>")
    return ('<table><thead><tr><th class="left">stage</th><th class="left">state</th><th class="right">seconds</th>'
            '<th class="left">what it does / model hash</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1e293b; max-width: 1100px;
       margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 2px solid #e2e8f0; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; } .muted, .meta { color: #64748b; font-size: 90%; }
header .result { font-size: 120%; font-weight: 600; background: #f0fdf4; border-left: 4px solid #22c55e;
                 padding: .4em .8em; }
nav ol { columns: 2; } table { border-collapse: collapse; margin: .6em 0; font-size: 90%; }
th, td { border: 1px solid #cbd5e1; padding: .25em .6em; vertical-align: top; } th { background: #f1f5f9; }
.right { text-align: right; } .left { text-align: left; } tr.model td { color: #475569; font-size: 92%; }
tr.model td:first-child { padding-left: 1.6em; }
.figure { margin: 1.2em 0; } .figure img { max-width: min(100%, 860px); border: 1px solid #e2e8f0; }
.note { color: #92400e; background: #fffbeb; border-left: 4px solid #f59e0b; padding: .3em .8em; }
.pair { border: 1px solid #e2e8f0; border-radius: 6px; padding: .5em .8em; margin: .6em 0; }
.pair .label { font-size: 80%; text-transform: uppercase; color: #64748b; margin-top: .3em; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
pre { background: #f8fafc; border: 1px solid #e2e8f0; padding: .8em; overflow-x: auto; font-size: 85%; }
"""


def build_report(run_dir: str | Path) -> str:
    """The report page of a finished run as HTML text."""
    folder = open_run(run_dir)
    files = folder.files
    if not files.path("config").is_file():
        raise PipelineError(f"{folder.path}: no run here (no {files.path('config').name}); "
                            "start one with `humpback run --run-dir ...`")
    if not files.path("summary").is_file():
        raise PipelineError(f"{folder.path}: the run has no {files.path('summary').name} yet; finish it with "
                            "`humpback run` (`humpback status` shows which stages are left)")
    config, summary = folder.config(), files.summary()
    result = main_result(summary)
    followed = variant_results(folder.path)
    sections = [
        ("tables", "Tables beside the paper's (notebook 07)",
         "\n".join(f'<article id="{key}"><h3>{html.escape(title)}</h3>{body}</article>'
                   for key, title, body in tables_html(summary, config))),
        *([("variants", "Follow-ups beside Humpback: the variants' table (notebook 08)",
            variants_html(followed, config))] if followed else []),
        ("figures", "Figures (notebooks 00-07)", "\n".join(figure_html(spec, files, summary) for spec in FIGURES)),
        ("curation", "Curated sets and thresholds (notebooks 04, 05)", curation_html(files)),
        ("kept", "Kept pairs (examples)", kept_html(files)),
        ("dropped", "Dropped pairs (examples)", dropped_html(files)),
        ("stages", "Stage times", f"<p>pipeline: {summary.get('pipeline_seconds', 0) / 60:.1f} min of stages</p>"
         + stages_html(folder, config)),
        ("config", "Config", f"<pre>{html.escape(files.path('config').read_text(encoding='utf-8'))}</pre>"),
    ]
    written = time.strftime("%Y-%m-%d %H:%M %Z")
    header = (f"<header><h1>Humpback run: {html.escape(folder.path.resolve().name)}</h1>"
              f'<p class="muted">preset {html.escape(str(config.preset))} · config hash '
              f"<code>{html.escape(config.hash())}</code> · written {html.escape(written)}</p>"
              + (f'<p class="result" id="result">{html.escape(result)}</p>' if result else
                 '<p class="note" id="result">No M2 against M0 comparison in this run.</p>') + "</header>")
    contents = "<nav id=\"contents\"><h2>Contents</h2><ol>" + "".join(
        f'<li><a href="#{key}">{html.escape(title)}</a></li>' for key, title, _ in sections) + "</ol></nav>"
    body = "\n".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{content}\n</section>'
                     for key, title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            f"style-src 'unsafe-inline'\">"
            f"<title>Humpback report: {html.escape(folder.path.resolve().name)}</title><style>{STYLE}</style></head>"
            f"<body>{header}{contents}\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write the run's report page (RunFiles.report_file) atomically; returns its path."""
    path = RunFiles(run_dir).path("report")
    atomic_write_text(path, build_report(run_dir))
    return path
