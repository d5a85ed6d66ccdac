"""Every notebook runs top to bottom under papermill on the `tiny` preset, and is committed clean.

The notebooks run in order on one run folder, as `make demo` runs them: each finds the stages of the
notebooks before it done and runs only its own (the session fixture `executed_notebooks` in conftest.py runs
them once; its run folder is the finished run the other tests read). On that finished run, every notebook
then executes again, reading only."""

import json
import re

import nbformat
import pytest

from humpback_nb.nb.notebooks import execute, notebook_paths
from humpback_nb.run import RunFiles

NOTEBOOKS = notebook_paths()


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_overview.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_one_parameters_cell(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "strip the outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert notebook["cells"][0]["cell_type"] == "markdown", "a notebook opens with prose"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_preset(path, executed_notebooks):
    run_dir, executed = executed_notebooks  # executed in order on one new run folder (conftest.py)
    output = executed[path.stem]
    if isinstance(output, Exception):
        pytest.fail(f"{path.name}: {output}")
    executed = nbformat.read(output, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # a bar is kept at its last state: a text bar, not a widget whose saved form is its first "0%"
    frozen = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
              if "%|" in o.get("data", {}).get("text/plain", "")]
    assert not frozen, frozen[0]["data"]["text/plain"]
    if path.name == "00_overview.ipynb":
        assert (run_dir.parent / "figures" / "method_overview.png").stat().st_size > 10_000


def stage_records(run_dir) -> dict[str, str]:
    """Every manifest of the run folder (stages and models), by path: what a stage or a training rewrites."""
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted((run_dir / "stages").rglob("*.yaml"))}


# What a finished run shows of the models at work, read from what the stages stored (issue: the class sees it).
STORED_LIVE_RESULTS = {
    "02_backward_model": ("| M_yx - base |", "GENERATED: "),
    "04_self_curation": ("candidates rated by both raters, with M0", "The rater's check (M0):"),
    "05_iteration": ("M2: ",),
}


def output_text(notebook) -> str:
    """Everything a notebook's code cells printed or displayed as text or Markdown."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts.append(data.get("text/markdown", "") or data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_on_a_finished_run_every_notebook_only_reads(finished_tiny_run, tmp_path, monkeypatch):
    """The workshop path: on a finished run, opened with its own settings, every notebook executes while training
    and generation refuse to run (HUMPBACK_NO_COMPUTE=1, inherited by the kernel), and leaves the run as it was."""
    import time

    from humpback_nb.infra.guard import NO_COMPUTE

    run_dir = finished_tiny_run
    before = stage_records(run_dir)
    monkeypatch.setenv(NO_COMPUTE, "1")
    seconds = {}
    for path in NOTEBOOKS:
        started = time.time()
        output = execute(path, tmp_path / path.name, {"run_dir": str(run_dir), "figures_dir": str(tmp_path / "fig")})
        seconds[path.stem] = round(time.time() - started, 1)
        executed = nbformat.read(output, as_version=4)
        assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        shown = output_text(executed)
        for stored in STORED_LIVE_RESULTS.get(path.stem, ()):  # what the stages kept of the models at work
            assert stored in shown, f"{path.name} does not show {stored!r}"
    assert stage_records(run_dir) == before
    print(f"\nnotebooks on a finished tiny run, seconds each: {seconds}, {sum(seconds.values()):.0f} in all")


@pytest.mark.slow
def test_the_switch_reaches_the_notebook_kernel(finished_tiny_run, tmp_path, monkeypatch):
    """The check above can fail: asked to answer live on the finished run, notebook 00 stops at the generation."""
    from papermill.exceptions import PapermillExecutionError

    from humpback_nb.infra.guard import NO_COMPUTE

    monkeypatch.setenv(NO_COMPUTE, "1")
    with pytest.raises(PapermillExecutionError, match="ComputeRefused"):
        execute(NOTEBOOKS[0], tmp_path / NOTEBOOKS[0].name, {"run_dir": str(finished_tiny_run), "live": True,
                                                           "figures_dir": str(tmp_path / "fig")})


@pytest.mark.slow
def test_after_a_change_of_learning_rate_every_model_is_trained_again(finished_tiny_run, tmp_path):
    """Stale models must not reach the tables: the models the analyses train (Table 8's untagged M2, Figure 3's
    models) are retrained with the main ones. Runs after the notebooks, on a copy of their run folder."""
    import shutil
    import subprocess
    import sys

    from humpback_nb.pipeline import open_run

    command = [sys.executable, "-m", "humpback_nb.cli", "run", "--preset", "tiny"]
    copy = tmp_path / "run"
    shutil.copytree(finished_tiny_run, copy, ignore=shutil.ignore_patterns("notebooks"))
    before = sorted(p.name for p in RunFiles(copy).path("models").iterdir())
    assert {"backward", "m0", "m1", "m2", "m2_untagged"} <= set(before) and any("scaling_" in m for m in before)

    changed = ["--set", "train.learning_rate=3e-4", "--set", "train.final_learning_rate=2.7e-4",
               # fewer segments to write instructions for and rate, fewer prompts to answer and judge, the same
               # models: this test is about what is trained again
               "--set", "data.num_segments=12",
               "--set", "evaluate.alpaca_eval_prompts=2", "--set", "evaluate.mt_bench_prompts=1",
               "--set", "evaluate.scaling_sizes=[2]"]  # one Figure 3 model per set
    subprocess.run([*command, "--run-dir", str(copy), *changed], check=True, capture_output=True, timeout=900)
    files, rows = RunFiles(copy), open_run(copy).status()
    # Which Figure 3 models there are depends on how many candidates each quality keeps, which the retrained models
    # decide anew (and which the CPU's rounding can move): the models are those the finished stages name, no others.
    after = sorted(model["model"] for row in rows for model in row["models"])
    assert sorted(p.name for p in files.path("models").iterdir()) == after
    assert {"backward", "m0", "m1", "m2", "m2_untagged"} <= set(after) and any("scaling_" in m for m in after)
    assert {model: files.train_log(model)["steps"][0]["lr"] for model in after} == {model: 3e-4 for model in after}
    assert all(row["state"] == "done" for row in rows)
    assert all(model["state"] == "done" for row in rows for model in row["models"])


QUIET_CHECK = """
import warnings
from transformers.utils import logging
from humpback_nb.nb.quiet import quiet_libraries

quiet_libraries()
logging.get_logger("transformers.modeling_utils").warning("library notice")
logging.get_logger("transformers.modeling_utils").error("library error")
for text, category, module in [("library deprecation", FutureWarning, "transformers.modeling_utils"),
                               ("`past_key_values` is deprecated", FutureWarning, "torch.nn.modules.module"),
                               ("kit warning", UserWarning, "humpback_nb.method.curate")]:
    warnings.warn_explicit(text, category, module.replace(".", "/") + ".py", 1, module=module)
"""


def test_quiet_libraries_hides_their_notices_and_keeps_errors_and_the_kits_warnings():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", QUIET_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "library error" in done.stderr and "kit warning" in done.stderr
    assert "library notice" not in done.stderr and "deprecation" not in done.stderr
    assert "past_key_values" not in done.stderr


def test_an_executed_notebook_is_kept_when_the_notebooks_run_again(tmp_path, capsys):
    """Executing the notebooks on a run again never replaces the executed ones (which hold what the models did
    live): each goes to previous/ under the time it was executed, and the line says where."""
    import os

    from humpback_nb.nb.notebooks import keep_previous

    executed = tmp_path / "notebooks" / "02_backward_model.ipynb"
    assert keep_previous(executed) is None  # nothing executed yet: nothing to keep
    executed.parent.mkdir()
    for number, stamp in enumerate((1_700_000_000, 1_700_000_100)):
        executed.write_text(f"execution {number}")
        os.utime(executed, (stamp, stamp))
        kept = keep_previous(executed)
        assert not executed.exists() and kept.read_text() == f"execution {number}"
        assert str(kept) in capsys.readouterr().out
    assert sorted(p.read_text() for p in (tmp_path / "notebooks" / "previous").iterdir()) == [
        "execution 0", "execution 1"]


# A count of the run's own things ("120 seed pairs", "about 16 pairs") in a notebook's prose is a number the run can
# contradict: the notebooks run on any preset, so their prose quotes only the paper's counts, in a sentence that
# says they are the paper's. The run's own counts are printed by the cells.
RUN_COUNT = re.compile(r"(?<![\w.$-])(\d[\d,]*(?:\.\d+)?)\s+(?:of the\s+|more\s+|new\s+)?(seed pairs|seed|held-out|"
                       r"segments|candidates|pairs|prompts|steps|examples|instructions|answers|models|articles|"
                       r"tokens|questions|outputs)\b")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_quotes_no_count_the_run_could_contradict(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    quoted = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for sentence in re.split(r"(?<=[.!?])\s+|\n\n", text):
            quoted += [match.group(0) for match in RUN_COUNT.finditer(sentence) if "paper" not in sentence]
    assert not quoted, f"{path.name}: prose quotes counts of the run: {quoted}"
