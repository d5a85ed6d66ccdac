"""Humpback, top to bottom: the stages of a run in the paper's order (Li et al. 2023, arXiv 2308.06259).

    seed, segments                      the seed pairs and the unlabelled web segments        section 2.1, 3.1
    backward, backward_check            the backward model M_yx, and its held-out check        section 2.2
    candidates                          self-augmentation: M_yx writes an instruction each     section 2.2
    m0                                  M0: the seed pairs only                                section 2.3
    rate_m{t-1}, A{t}, m{t}             self-curation, for t = 1..T (curate.iterations,        section 2.3
                                        the paper's 2: M2 is Humpback)
    heldout, eval                       held-out losses; answers, judged                       section 4
    tags, selectors, scaling            the paper's analyses: Table 8, Table 7, Figure 3       section 5
    [variant_pairs, <method>,           a follow-up's own stages (variant.method: bft, kun, alpagasus; followups.py)
     variant_eval]
    summary                             every number of the run in one file

The method's stages are declared in stages.py, the analyses' in analyses.py, the follow-ups' in followups.py; this
module puts them in order for a number of iterations and a method, and gives them to the run folder (run.RunFolder),
which runs and skips them.
"""

from __future__ import annotations

from pathlib import Path

from humpback_nb import analyses, followups, stages  # noqa: F401 (analyses declares its stages when imported)
from humpback_nb.config import HumpbackConfig
from humpback_nb.run import RunFiles, RunFolder, Stage

BEFORE = ("seed", "segments", "backward", "backward_check", "candidates", "m0")
AFTER = ("heldout", "eval", "tags", "selectors", "scaling", "summary")


def pipeline(iterations: int = 2, method: str = "humpback") -> list[Stage]:
    """Every stage of a run with `iterations` self-curation iterations, in order; a follow-up's (`method`, config
    variant.method) after Humpback's, before the summary, which then reads them too."""
    from dataclasses import replace

    curation = [s for t in range(1, iterations + 1) for s in stages.iteration(t, iterations)]
    after = [bind(stages.DECLARED[name], iterations) for name in AFTER]
    added = followups.stages(method, iterations)
    if added:
        after[-1] = replace(after[-1], after=(*after[-1].after, added[-1].name))
    return [stages.DECLARED[name] for name in BEFORE] + curation + after[:-1] + added + after[-1:]


def bind(stage: Stage, iterations: int) -> Stage:
    """A stage whose inputs depend on the number of iterations, made for `iterations` (others as they are)."""
    if not callable(stage.after):
        return stage
    from dataclasses import replace
    from functools import partial

    return replace(stage, after=stage.after(iterations), function=partial(stage.function, iterations=iterations),
                   cost=partial(stage.cost, iterations=iterations) if stage.cost else None)


STAGES = pipeline()  # the paper's run: two iterations


def open_run(path: str | Path, config: HumpbackConfig | None = None) -> RunFolder:
    """The run folder at `path` with the stages of `config`, or of the config stored there (the paper's two
    iterations when there is none yet)."""
    folder = Path(path)
    if config is None and RunFiles(folder).path("config").is_file():
        config = RunFolder(folder, STAGES).config()
    if config is None:
        return RunFolder(folder, pipeline())
    return RunFolder(folder, pipeline(config.curate.iterations, config.variant.method))


def run(config: HumpbackConfig, run_dir: str | Path, until: str | None = None,
        redo: tuple[str, ...] = ()) -> dict[str, str]:
    """Run the method's stages for `config` in `run_dir` (what `humpback run` does)."""
    return open_run(run_dir, config).run(config, until=until, redo=redo)


def start_variant(humpback: RunFolder, config: HumpbackConfig, method: str, until: str | None = None,
                  log=print) -> tuple[HumpbackConfig, RunFolder]:
    """(config, run folder) of the follow-up `method` beside the Humpback run folder `humpback` (config `config`):
    Humpback's settings with followups.VARIANT_SETTINGS[method], in `<run_dir>-<method>`; every stage the Humpback
    run has done is linked from it, so that only the follow-up's own stages run (up to `until`, all by default)."""
    from humpback_nb.config import with_overrides
    from humpback_nb.run import PipelineError

    if method not in followups.VARIANT_SETTINGS:
        raise PipelineError(f"unknown follow-up {method!r}; follow-ups: {', '.join(followups.VARIANT_SETTINGS)}")
    variant_config = with_overrides(config, followups.VARIANT_SETTINGS[method])
    folder = open_run(followups.variant_folder(humpback.path, method), variant_config)
    folder.run(variant_config, until=until, start_from=humpback.path, log=log)
    return variant_config, folder
