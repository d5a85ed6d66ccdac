"""The notebooks as a class uses them on a finished run: JupyterLab on loopback with HUMPBACK_NO_COMPUTE=1 (as
`HUMPBACK_NO_COMPUTE=1 make lab` starts it), a notebook opened in headless Chromium, every cell run from the Run
menu. Notebook 02 must show what the stages stored of M_yx at work (its held-out loss, the instructions it
wrote) and notebook 04 the two raters side by side and the rater's check, without computing anything. In 04 the
threshold slider is moved: the counts and examples must follow it, and a segment that carries a <script> must
show as text and never run.

Skipped, with the reason, where Chromium or Playwright is missing (`make test` installs Chromium where
it can: root with apt-get)."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (os.environ.get("HUMPBACK_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("02_backward_model", "04_self_curation")
HOSTILE = '<script>alert("pwned")</script><img src=x onerror="alert(2)"> What is the tallest mountain?'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, finished_tiny_run):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium where apt-get can)")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

    from humpback_nb.infra.files import write_jsonl
    from humpback_nb.infra.guard import NO_COMPUTE
    from humpback_nb.run import RunFiles

    root = tmp_path_factory.mktemp("lab")
    run_dir = root / "run"
    shutil.copytree(finished_tiny_run, run_dir)  # a finished run, as a class opens it
    # A web segment with markup in it, rated just under the k of A(1)_k, first among the candidates.
    files = RunFiles(run_dir)
    candidates = files.candidates()
    hostile = dict(candidates[0], id="cand-hostile", instruction=HOSTILE, output=HOSTILE + " Mount Everest.")
    write_jsonl(files.path("candidates"), [hostile, *candidates])
    scores = files.scores("m0")
    k = files.curated(1).k
    write_jsonl(files.path("scores", "m0"), [dict(scores[0], id="cand-hostile", score=round(k - 0.01, 4)), *scores])
    # The manifests as a kit before output digests wrote them (trusted as they are): the records edited by hand above
    # stand as the stages' own, rather than showing the stages damaged and asking to make them again.
    for manifest in files.path("manifest", "any").parent.glob("*.yaml"):
        record = yaml.safe_load(manifest.read_text())
        manifest.write_text(yaml.safe_dump({k: v for k, v in record.items() if k not in ("files", "read")},
                                           sort_keys=False))
    for name in NOTEBOOKS:
        source = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        for cell in source["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                values = {"run_dir": repr(str(run_dir)), "figures_dir": repr(str(root / "figures")),
                          "examples_to_show": "2"}  # the rest of the cell as committed: the run's own settings
                lines = "".join(cell["source"]).splitlines()
                cell["source"] = "\n".join(
                    f"{line.split('=')[0].strip()} = {values[line.split('=')[0].strip()]}"
                    if line.split("=")[0].strip() in values else line for line in lines) + "\n"
        (root / f"{name}.ipynb").write_text(json.dumps(source))

    # A person's JupyterLab settings, written here so that neither a kernel chooser nor a news prompt
    # depends on what the machine has in ~/.jupyter: the notebook starts its own kernel, and no news is fetched.
    # Every cell stays on the page (no windowing), so that an output below the fold can be found.
    settings = root / "settings"
    for name, values in {"notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
                         "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    port, token = free_port(), secrets.token_hex(16)
    log = open(root / "lab.log", "wb")  # noqa: SIM115  (the server writes to it while the test runs)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.news_url=", "--ServerApp.open_browser=False", f"--LabApp.user_settings_dir={settings}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}"],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT), NO_COMPUTE: "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (root / "lab.log").read_text()[-2000:]
                time.sleep(0.5)
        # each notebook in a workspace of its own: the page holds that notebook alone, as a person opening it sees
        yield lambda name: f"{url}/lab/workspaces/{name}/tree/{name}.ipynb?token={token}", root
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def summary_text(page) -> str:
    return page.locator(".widget-html-content", has_text="|A_k| =").first.inner_text()


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def outputs(page, text: str):
    """The cell outputs that show `text` (not the cells' source, which may quote it)."""
    return page.locator(".jp-OutputArea-output", has_text=text)


def run_all_until(page, url: str, root, shown: str, seconds: int = 240) -> None:
    """Open the notebook at `url`, run every cell from the Run menu, and wait until a cell's output shows `shown`. Fails
    at an output that carries an error, or after `seconds`, with the page's last text and JupyterLab's log."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)

    def run_all() -> None:
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()

    run_all()
    # On a finished run a notebook runs in seconds. JupyterLab may still ask which kernel to use (it does when its
    # list of kernels arrives after the notebook opened): the person answers with the notebook's own. A click that
    # arrived before the kernel was ready runs nothing, and cells sent to a kernel that JupyterLab then replaced by
    # another stay waiting while the new kernel sits idle: in either case the person asks again.
    started_at = time.monotonic()
    deadline, asked_again, idle_since = started_at + seconds, started_at + 20, None
    while not outputs(page, shown).count():
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "Select Kernel" in dialog.first.inner_text():
            dialog.first.locator("button.jp-mod-accept").click()
        started = page.locator(".jp-InputArea-prompt", has_text=re.compile(r"\[(\*|\d+)\]")).count()
        now = time.monotonic()
        if page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
            idle_since = idle_since or now
        else:
            idle_since = None  # the kernel is at work (between two cells it is idle for a moment only)
        stalled = not started or (idle_since is not None and now - idle_since > 10)
        if stalled and not dialog.count() and now > asked_again:
            run_all()
            asked_again, idle_since = time.monotonic() + 20, None
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                              has_text="Error")
        if errors.count() or time.monotonic() > deadline:
            name = url.split("?")[0].rsplit("/", 1)[-1]
            page.screenshot(path=str(root / f"failure-{name}.png"), full_page=True)
            text = page.inner_text("body")
            (root / f"failure-{name}.txt").write_text(text)
            shown_error = errors.first.inner_text()[-1500:] if errors.count() else "no output with an error"
            open_dialog = dialog.first.inner_text()[:300] if dialog.count() else "none"
            log = (root / "lab.log").read_text(errors="replace")[-1500:]
            pytest.fail(f"{name} did not show {shown!r} in {time.monotonic() - started_at:.0f} s ({shown_error}; "
                        f"{started} cells started; dialog: {open_dialog}).\nThe page ends: {text[-1500:]}\n"
                        f"JupyterLab's log ends: {log}")
        page.wait_for_timeout(1000)


def test_a_finished_run_shows_what_m_yx_did_without_computing(lab):
    from playwright.sync_api import sync_playwright

    url, root = lab
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        run_all_until(page, url("02_backward_model"), root, "GENERATED:")
        assert outputs(page, "M_yx - base").count() >= 1  # the held-out losses' table, rendered
        assert outputs(page, "loss per instruction token").count() >= 1
        browser.close()


def test_the_threshold_slider_moves_counts_and_examples_and_markup_stays_text(lab):
    from playwright.sync_api import sync_playwright

    url, root = lab

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        run_all_until(page, url("04_self_curation"), root, "|A_k| =")
        # what rate_m0 stored of the raters at work, shown without loading M0
        assert outputs(page, "candidates rated by both raters, with M0").count() >= 1
        assert outputs(page, "The rater's check (M0):").count() >= 1

        before = summary_text(page)
        slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="k")).last
        readout = slider.locator(".widget-readout")
        explorer = page.locator(".widget-vbox", has=slider).last

        def examples() -> str:  # the pairs shown beside the threshold, without the count line
            return explorer.locator(".widget-hbox").last.inner_text()

        examples_before = examples()
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("1.0")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "before => [...document.querySelectorAll('.widget-html-content')].some("
            "e => e.innerText.includes('|A_k| =') && e.innerText !== before)", arg=before, timeout=30_000)
        after = summary_text(page)
        examples_after = examples()
        assert before != after and "1.00" in after
        assert examples_before != examples_after

        # The hostile segment is on the page as text, and nothing of it runs or becomes an element.
        assert page.get_by_text('<script>alert("pwned")</script>', exact=False).count() >= 1
        injected = page.evaluate("[...document.querySelectorAll('.jp-OutputArea script, .jp-OutputArea img')]"
                                 ".filter(e => (e.outerHTML || '').includes('alert')).length")
        assert injected == 0
        assert dialogs == []
        if os.environ.get("HUMPBACK_SCREENSHOT"):
            page.screenshot(path=os.environ["HUMPBACK_SCREENSHOT"], full_page=True)
        browser.close()
