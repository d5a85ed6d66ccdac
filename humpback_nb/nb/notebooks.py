"""Executing the kit's notebooks with papermill, and finding the project's folders from inside one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # humpback_nb/


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding pyproject.toml above `start` (or the working folder), else the working folder.

    A notebook runs with the notebooks/ folder as its working folder in JupyterLab and with the
    project folder under papermill; relative run folders resolve against the project either way.
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "humpback_nb").is_dir():
            return folder
    return here


def project_path(path: str | Path) -> Path:
    """`path` made absolute against the project root (absolute paths are kept)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def open_run(preset: str, run_dir: str | Path):
    """(config, run folder) for a notebook: the preset's config and the run folder it fills."""
    from humpback_nb.config import load_preset
    from humpback_nb.run import RunFolder

    return load_preset(preset), RunFolder(project_path(run_dir))


def notebook_paths() -> list[Path]:
    """The numbered notebooks of the kit, in order."""
    return sorted((PACKAGE_DIR.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute(notebook: str | Path, output: str | Path, parameters: dict[str, Any]) -> Path:
    """Run one notebook top to bottom with papermill, writing the executed copy to `output`."""
    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, cwd=str(project_root(notebook)),
        progress_bar=False, kernel_name="python3",
    )
    return output


def execute_all(preset: str, run_dir: str | Path, names: Sequence[str] | None = None,
                extra: dict[str, Any] | None = None) -> list[Path]:
    """Execute every notebook (or those whose file names start with `names`) on `preset`."""
    from humpback_nb.run import RunFiles

    run_dir = project_path(run_dir)
    executed = []
    for notebook in notebook_paths():
        if names and not notebook.name.startswith(tuple(names)):
            continue
        parameters = {"preset": preset, "run_dir": str(run_dir), **(extra or {})}
        print(f"executing {notebook.name} (preset {preset})", flush=True)
        executed.append(execute(notebook, RunFiles(run_dir).notebooks_dir() / notebook.name, parameters))
    return executed
