"""Every notebook runs top to bottom under papermill on the `tiny` preset, and is committed clean.

The notebooks run in order on one run folder, as `make demo` runs them: each finds the stages of the
notebooks before it done and runs only its own. Run alone (`pytest -k 05_iteration`), a notebook runs the
stages it needs first, as it does for a reader who opens it first."""

import json

import nbformat
import pytest

from humpback_nb.nb.notebooks import execute, notebook_paths

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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, embedded_checkpoint):
    """One run folder for all the notebooks of this module."""
    return tmp_path_factory.mktemp("notebooks") / "run"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_preset(path, tmp_path, run_dir):
    output = execute(path, tmp_path / path.name,
                     {"preset": "tiny", "run_dir": str(run_dir), "figures_dir": str(tmp_path / "figures")})
    executed = nbformat.read(output, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.name == "00_overview.ipynb":
        assert (tmp_path / "figures" / "method_overview.png").stat().st_size > 10_000
