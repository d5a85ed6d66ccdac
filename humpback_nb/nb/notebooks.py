"""Executing the kit's notebooks with papermill, and finding the project's folders from inside one."""

from __future__ import annotations

import os
import time
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


def open_run(preset: str | None = None, run_dir: str | Path = "runs/demo", config_file: str | Path | None = None,
             overrides: dict[str, Any] | None = None):
    """(config, run folder) for a notebook.

    With no preset, config file or overrides, a folder that holds a run gives that run's own config (and an
    empty folder the demo preset). Otherwise the config is the layers given (config.resolve_config); on a folder
    that holds a run made with other settings, the notebook stops with the differences and the ways on, and the
    run is left as it is."""
    from humpback_nb import pipeline
    from humpback_nb.config import ConfigError, config_differences, load_preset, resolve_config

    folder = pipeline.open_run(project_path(run_dir))  # with the stages of the config stored there
    existing = folder.config() if folder.files.path("config").is_file() else None
    if preset is None and config_file is None and not overrides:
        config = existing or load_preset("demo")
        return config, pipeline.open_run(folder.path, config)
    if config_file is not None:
        config_file = project_path(config_file)
    config = resolve_config(preset, config_file, overrides)
    differences = config_differences(existing, config) if existing is not None else []
    if differences:
        shown = "\n".join(f"  {key}: {old!r} in the run, {new!r} here" for key, old, new in differences[:12])
        more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
        raise ConfigError(
            f"{folder.path} holds a run made with other settings ({len(differences)} differ):\n{shown}{more}\n"
            "Nothing was changed. Set preset = None, config_file = None and overrides = {} to continue with the "
            "run's own settings; or choose another run_dir for these settings; or, to redo this run with them, "
            f"run `humpback run --run-dir {folder.path} ...` with these settings (the stages they touch run again).")
    return config, pipeline.open_run(folder.path, config)


def figures_folder(folder, figures_dir: str | Path | None = None) -> Path:
    """Where a notebook saves its figures: `figures_dir`, else the run's own figures/ folder."""
    path = project_path(figures_dir) if figures_dir is not None else folder.files.path("figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebook_paths() -> list[Path]:
    """The numbered notebooks of the kit, in order."""
    return sorted((PACKAGE_DIR.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute(notebook: str | Path, output: str | Path, parameters: dict[str, Any], verbose: bool = False) -> Path:
    """Run one notebook top to bottom with papermill, writing the executed copy to `output`. Verbose: a bar over
    the cells and each cell's output as it comes (what `make demo` shows)."""
    import logging

    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if verbose and not logging.getLogger("papermill").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("papermill").addHandler(handler)
        logging.getLogger("papermill").setLevel(logging.INFO)
    from humpback_nb.infra.progress import TEXT_BARS

    before = os.environ.get(TEXT_BARS)
    os.environ[TEXT_BARS] = "1"  # the kernel inherits it: bars whose last line the executed notebook keeps
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, cwd=str(project_root(notebook)),
            progress_bar=verbose, log_output=verbose, kernel_name="python3",
        )
    finally:
        if before is None:
            os.environ.pop(TEXT_BARS, None)
        else:
            os.environ[TEXT_BARS] = before
    return output


def execute_all(preset: str | None, run_dir: str | Path, names: Sequence[str] | None = None,
                extra: dict[str, Any] | None = None, config_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None, verbose: bool = False) -> list[Path]:
    """Execute every notebook (or those whose file names start with `names`) on one run folder, with the config
    of `preset`, `config_file` and `overrides` (all None: the run's own config, else the demo preset)."""
    from humpback_nb.run import RunFiles

    run_dir = project_path(run_dir)
    config_file = str(project_path(config_file)) if config_file is not None else None
    open_run(preset, run_dir, config_file, overrides)  # settings that differ from the run's stop here, not midway
    executed = []
    for notebook in notebook_paths():
        if names and not notebook.name.startswith(tuple(names)):
            continue
        parameters = {"preset": preset, "config_file": config_file, "overrides": overrides or {},
                      "run_dir": str(run_dir), **(extra or {})}
        print(f"executing {notebook.name}", flush=True)
        output = RunFiles(run_dir).path("notebooks") / notebook.name
        keep_previous(output)
        executed.append(execute(notebook, output, parameters, verbose))
    return executed


def keep_previous(output: Path) -> Path | None:
    """An executed notebook about to be executed again is kept, never replaced: moved to `previous/` beside it,
    under the time it was executed (the first execution of a run holds what the models did live). Says where."""
    if not output.is_file():
        return None
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(output.stat().st_mtime))
    kept = output.parent / "previous" / f"{output.stem}.{stamp}{output.suffix}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    output.replace(kept)
    print(f"  the previous execution is kept as {kept}", flush=True)
    return kept
