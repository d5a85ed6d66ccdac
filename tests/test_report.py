"""`humpback report`: one self-contained page of a finished run, with every section, every figure embedded, and
markup from the data shown as text, also when a browser opens it."""

import base64
import contextlib
import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from humpback_nb.cli import main
from humpback_nb.infra.files import write_jsonl
from humpback_nb.pipeline import open_run
from humpback_nb.report import FIGURES
from humpback_nb.run import RunFiles

HOSTILE = '<script>alert("pwned")</script><img src=x onerror="alert(2)">'
SECTIONS = ("tables", "figures", "curation", "kept", "dropped", "stages", "config")
TABLES = ("checks", "table2", "table4", "table3", "table7", "table8")  # parts of "tables"


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run folder without model weights (the report reads logs and manifests, never weights)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


@pytest.fixture(scope="module")
def report(finished_tiny_run, tmp_path_factory):
    """The report of a finished tiny run whose data carry markup: a candidate with a script in its instruction and
    output, kept in A(1)_k, rated just below k by M0, and dropped by a rule. Written by `humpback report`."""
    run_dir = copy_run(finished_tiny_run, tmp_path_factory.mktemp("report") / "run")
    files = RunFiles(run_dir)
    candidates, scores, kept = files.candidates(), files.scores("m0"), files.curated(1)
    hostile = dict(candidates[0], id="cand-hostile", instruction=HOSTILE + " Why?", output=HOSTILE + " Because.")
    write_jsonl(files.path("candidates"), [hostile, *candidates])
    write_jsonl(files.path("scores", "m0"), [dict(scores[0], id="cand-hostile", score=round(kept.k - 0.01, 4)),
                                          dict(scores[0], id="cand-hostile-kept", score=5.0), *scores])
    write_jsonl(files.path("curated", 1), [dict(kept.records[0], id="cand-hostile-kept", instruction=HOSTILE + " Why?",
                                             output=HOSTILE + " Because."), *kept.records])
    write_jsonl(files.path("candidates_dropped"), [dict(hostile, id="cand-hostile-dropped", reason=HOSTILE),
                                                  *files.candidates_dropped()])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert out.getvalue() == f"report: {files.path('report')}\n"
    return files, files.path("report").read_text(encoding="utf-8")


def section(page: str, key: str) -> str:
    tag = "article" if key in TABLES else "section"
    match = re.search(rf'<{tag} id="{key}">(.*?)</{tag}>', page, re.DOTALL)
    assert match, f"no section {key}"
    return match.group(1)


def test_the_report_has_every_section_figure_the_config_and_stage_times(report):
    files, page = report
    summary = files.summary()
    contents = re.search(r'<nav id="contents">(.*?)</nav>', page, re.DOTALL).group(1)
    assert re.findall(r'<li><a href="#([\w-]+)">', contents) == list(SECTIONS)
    for key in (*SECTIONS, *TABLES):
        assert section(page, key).strip(), key
    overall = summary["win_rates"]["m2_vs_m0"]["overall"]
    measured = f"{overall['win_rate']:.1f}% ± {overall['se']:.1f}"
    if summary["judge_check"]["separates"]:
        assert f"M2 against M0: win rate {measured}" in page
    else:  # the tiny run's judge, a 135M base model, cannot tell real answers from shuffled ones
        assert f"M2 against M0: no measurement: {html.escape(summary['judge_check']['verdict'])}" in page
        assert f"its win rate, {measured}" in page
    checks = section(page, "checks")
    assert "The judge:" in checks and "The rater (M0):" in checks and "The rater (M1):" in checks
    assert "What this run can show" in checks and "Held-out loss" in checks
    # the held-out losses: every model on every held-out pair, each difference with its interval
    held = summary["heldout"]
    assert set(held["loss"]) == {"base", "m0", "m1", "m2"} and held["pairs"] == len(files.seed_pairs("heldout"))
    assert all(len(losses) == held["pairs"] for losses in held["per_pair"].values())
    assert all(d["interval"] is None or d["interval"][0] <= d["difference"] <= d["interval"][1]
               for d in held["differences"].values())
    assert set(summary["answers_cut"]) == {"base", "m0", "m1", "m2"}
    assert f"<code>{summary['config_hash']}</code>" in page and "preset tiny" in page
    # every figure embedded as a PNG, the rater sanity check from the scores rate_m0 kept
    images = dict(re.findall(r'<figure class="figure" id="([\w-]+)"><img src="data:image/png;base64,([^"]+)"', page))
    assert set(images) == {spec.id for spec in FIGURES}
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images.values())
    # the tables beside the paper's, each with what differs from the paper
    assert section(page, "tables").count("<em>What differs from the paper:</em>") == 5
    assert "paper win rate %" in section(page, "table7") and "paper: count" in section(page, "table2")
    # the config as written, and each stage's seconds and each model's hash
    assert "preset: tiny" in section(page, "config")
    stages = section(page, "stages")
    for row in open_run(files.root).status():  # the copy's edited files and missing weights: damaged stages
        assert f"<td>{row['stage']}</td><td>{row['state']}</td><td class=\"right\">{row['seconds']:.1f}</td>" in stages
        for model in row["models"]:
            assert model["hash"] in stages
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "<script" not in page


def test_markup_from_the_data_shows_as_text(report):
    _, page = report
    escaped = "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;&lt;img src=x onerror=&quot;alert(2)&quot;&gt;"
    assert escaped + " Why?" in section(page, "kept")
    dropped = section(page, "dropped")
    assert dropped.count(escaped + " Why?") == 2  # rated below k, and dropped by a rule
    # nothing of it is markup anywhere (web text may say "alert" in prose: the Manhattan Project's page does)
    assert HOSTILE not in page and "<script" not in page and "<img src=x" not in page and 'onerror="' not in page


def test_a_folder_without_a_run_or_without_a_summary_is_one_error_line(tmp_path, finished_tiny_run, capsys):
    assert main(["report", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("humpback: error: ") and "no config.yaml" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(RunFiles(finished_tiny_run).path("config"), unfinished / "config.yaml")
    assert main(["report", "--run-dir", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.json" in err
    assert not RunFiles(unfinished).path("report").exists() and not RunFiles(tmp_path).path("report").exists()


def test_a_run_without_the_analyses_says_so_and_draws_the_rest(finished_tiny_run, tmp_path):
    from humpback_nb.report import build_report

    files = RunFiles(copy_run(finished_tiny_run, tmp_path / "run"))
    summary = files.summary() | {"figure3_scaling": None, "table7_selectors": None}
    files.path("summary").write_text(json.dumps(summary))
    files.path("analysis", "figure3_scaling").unlink()
    page = build_report(files.root)
    assert 'id="fig-scaling"><p class="note">' in page and "no scaling experiment" in section(page, "table3")
    assert "The selectors stage has not run." in section(page, "table7")
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES) - 1


CHROMIUM = next((p for p in (os.environ.get("HUMPBACK_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)


@pytest.mark.slow
def test_the_report_renders_in_a_browser_and_runs_no_script_from_the_data(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium where apt-get can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    files, _ = report
    screenshot = Path(os.environ.get("HUMPBACK_REPORT_SCREENSHOT") or tmp_path / "report.png")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        dialogs, requests = [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(files.path("report").resolve().as_uri())
        page.wait_for_load_state("load")
        for key in (*SECTIONS, *TABLES):
            located = page.locator(f"#{key}")
            assert located.is_visible() and located.inner_text().strip(), key
        widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == len(FIGURES) and all(width > 0 for width in widths)
        assert "<script>" in page.locator("section#kept").inner_text()  # the markup shows, as text
        assert page.evaluate("[...document.querySelectorAll('script, img')].filter("
                             "e => e.outerHTML.includes('alert')).length") == 0
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert dialogs == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    print(f"report screenshot: {screenshot}")
