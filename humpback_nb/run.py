"""The method as stages over a run folder: each reads the files of the stages before it, writes its own.

    runs/<name>/
      config.yaml            the config of the run (the latest one it was run with)
      seed.jsonl             seed (instruction, output) pairs                      stage `seed`
      segments.jsonl         unlabelled segments (+ segments_dropped.jsonl, segments_report.json)
      backward/              M_yx, the backward model's LoRA adapter               stage `backward`
      candidates.jsonl       (generated instruction, segment) pairs                stage `candidates`
      m0/  scores_m0.jsonl  A1.jsonl  m1/  scores_m1.jsonl  A2.jsonl  m2/  eval/  summary.json
      stages/<stage>.yaml    manifest: the config that made a stage's outputs, its hash, its time

A stage is done when its manifest exists, its outputs exist, and the manifest's hash equals the
hash the current config gives it. That hash covers only the config sections the stage reads plus the
hashes of the stages it reads from, so changing the evaluation settings does not retrain M0, while
changing the data settings redoes everything downstream. Outputs are written atomically and the
manifest last, so a stage interrupted halfway is simply not done and runs again (stages that write
records in batches resume from their `.partial` file).

Launched on several processes (distributed.py), every process runs every stage: the long loops split
their batches, training runs under DDP, and only the main process writes the run folder; the processes
meet before and after each stage.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from humpback_nb.config import HumpbackConfig, config_hash, load_config, save_config
from humpback_nb.infra.distributed import processes, wait_for_everyone
from humpback_nb.infra.files import atomic_write_text, clean_temporaries, discard_writes

CONFIG_FILE = "config.yaml"
MANIFEST_DIR = "stages"
LOCK_FILE = ".lock"


class PipelineError(RuntimeError):
    """A run folder or stage that cannot proceed; the message says which and why."""


@dataclass
class StageContext:
    """What a stage function gets: the run folder, the config, and where its files go."""

    run_dir: Path
    config: HumpbackConfig
    stage: Stage
    hash: str = ""

    def path(self, name: str) -> Path:
        """A file of the run folder, e.g. ctx.path("seed.jsonl")."""
        return self.run_dir / name

    def partial(self, name: str) -> Path:
        """Where a resumable stage keeps the records written so far for output `name`; the name carries the
        stage's hash, so records made with other settings are never resumed."""
        return self.run_dir / f"{name}.{self.hash}.partial"


@dataclass(frozen=True)
class Stage:
    """One step of the method: its outputs, the stages it reads, the config sections it depends on."""

    name: str
    outputs: tuple[str, ...]
    after: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    # The function that makes the outputs, or "module:function" (imported only when the stage runs, so
    # that `humpback status` does not load torch).
    run: Callable[[StageContext], Any] | str | None = field(default=None, compare=False)
    doc: str = ""

    def function(self) -> Callable[[StageContext], Any]:
        if isinstance(self.run, str):
            module, name = self.run.split(":")
            return getattr(importlib.import_module(module), name)
        return self.run


# The method, in order (paper section 2). Each stage's `run` is filled in as the kit grows; a stage
# without one is listed by `status` as "not built" and stops `run` with a clear message.
STAGES: tuple[Stage, ...] = (
    Stage("seed", ("seed.jsonl",), (), ("random_seed", "data"), run="humpback_nb.method.data.stages:seed_stage",
          doc="seed (instruction, output) pairs"),
    Stage("segments", ("segments.jsonl", "segments_dropped.jsonl", "segments_report.json"), (), ("random_seed", "data"),
          run="humpback_nb.method.data.stages:segments_stage", doc="unlabelled segments, filtered"),
    Stage("backward", ("backward",), ("seed",), ("random_seed", "model", "train"), run="humpback_nb.method.train:backward_stage",
          doc="backward model M_yx"),
    Stage("candidates", ("candidates.jsonl", "candidates_dropped.jsonl", "candidates_report.json"),
          ("backward", "segments"), ("generate",), run="humpback_nb.method.augment:self_augment_stage",
          doc="self-augmentation: M_yx writes an instruction for each segment"),
    Stage("m0", ("m0",), ("seed",), ("random_seed", "model", "train"), run="humpback_nb.method.train:m0_stage",
          doc="M0: fine-tuned on seed data only"),
    Stage("scores_m0", ("scores_m0.jsonl",), ("m0", "candidates"), ("curate",),
          run="humpback_nb.method.curate:scores_m0_stage", doc="M0 rates the candidates"),
    Stage("A1", ("A1.jsonl",), ("scores_m0",), ("curate",), run="humpback_nb.method.curate:a1_stage",
          doc="A(1)_k: candidates scored >= k by M0"),
    Stage("m1", ("m1",), ("seed", "A1"), ("random_seed", "model", "train"), run="humpback_nb.method.train:m1_stage",
          doc="M1: seed + A(1)_k"),
    Stage("scores_m1", ("scores_m1.jsonl",), ("m1", "candidates"), ("curate",),
          run="humpback_nb.method.curate:scores_m1_stage", doc="M1 rates the candidates"),
    Stage("A2", ("A2.jsonl",), ("scores_m1",), ("curate",), run="humpback_nb.method.curate:a2_stage",
          doc="A(2)_k: candidates scored >= k by M1"),
    Stage("m2", ("m2",), ("seed", "A2"), ("random_seed", "model", "train"), run="humpback_nb.method.train:m2_stage",
          doc="M2 (Humpback): seed + A(2)_k"),
    Stage("eval", ("eval",), ("m0", "m1", "m2"), ("evaluate", "generate"), run="humpback_nb.method.evaluate:eval_stage",
          doc="answers and judged win rates"),
    Stage("tags", ("tags",), ("eval", "m2"), ("evaluate", "generate"), run="humpback_nb.method.analysis:tags_stage",
          doc="Table 8: inference tags, and a model trained without tags"),
    Stage("selection", ("selection.json",), ("m0", "m1", "candidates"), ("evaluate",),
          run="humpback_nb.method.analysis:selection_stage", doc="Table 7: M0 and M1 as selectors on a labelled set"),
    Stage("scaling", ("scaling",), ("eval", "scores_m1"), ("evaluate", "generate"),
          run="humpback_nb.method.analysis:scaling_stage", doc="Figure 3 / Table 3: win rate against data size N"),
    Stage("summary", ("summary.json",), ("eval", "A1", "A2", "tags", "selection", "scaling"), (),
          run="humpback_nb.method.evaluate:summary_stage", doc="every figure's numbers in one file"),
)


class RunFolder:
    """A run folder and the stages that fill it."""

    def __init__(self, path: str | Path, stages: Sequence[Stage] = STAGES):
        self.path = Path(path)
        self.stages = {stage.name: stage for stage in stages}
        for stage in stages:
            missing = [name for name in stage.after if name not in self.stages]
            if missing:
                raise PipelineError(f"stage {stage.name!r} reads from unknown stage(s) {missing}")

    # -- config -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def config(self) -> HumpbackConfig:
        """The config stored in the run folder."""
        if not self.config_path.is_file():
            raise PipelineError(f"{self.path}: no {CONFIG_FILE}; start the run with `humpback run`")
        return load_config(self.config_path)

    def set_config(self, config: HumpbackConfig) -> None:
        """Store `config` as the run's config; stages it changes become stale."""
        save_config(config, self.config_path)

    # -- hashes and manifests -----------------------------------------------------------------
    def stage_hash(self, name: str, config: HumpbackConfig) -> str:
        """Hash of what determines a stage's outputs: its config sections and its inputs' hashes."""
        stage = self.stages[name]
        return config_hash(
            {
                "stage": name,
                "sections": {section: config.section(section) for section in stage.sections},
                "after": {up: self.stage_hash(up, config) for up in stage.after},
            }
        )

    def manifest_path(self, name: str) -> Path:
        return self.path / MANIFEST_DIR / f"{name}.yaml"

    def manifest(self, name: str) -> dict[str, Any] | None:
        path = self.manifest_path(name)
        if not path.is_file():
            return None
        return yaml.safe_load(path.read_text(encoding="utf-8"))

    def state(self, name: str, config: HumpbackConfig) -> str:
        """"done", "stale" (made by another config), "pending", or "not built"."""
        stage = self.stages[name]
        manifest = self.manifest(name)
        outputs_exist = all((self.path / out).exists() for out in stage.outputs)
        if manifest is not None and outputs_exist:
            return "done" if manifest.get("hash") == self.stage_hash(name, config) else "stale"
        return "pending" if stage.run is not None else "not built"

    def is_done(self, name: str, config: HumpbackConfig) -> bool:
        return self.state(name, config) == "done"

    def status(self, config: HumpbackConfig | None = None) -> list[dict[str, Any]]:
        """One row per stage: name, state, outputs, seconds it took."""
        if config is None:
            config = self.config() if self.config_path.is_file() else None
        rows = []
        for name, stage in self.stages.items():
            manifest = self.manifest(name) or {}
            if config is None:
                state = "pending" if stage.run is not None else "not built"
            else:
                state = self.state(name, config)
            rows.append({"stage": name, "state": state, "outputs": list(stage.outputs),
                         "seconds": manifest.get("seconds"), "doc": stage.doc})
        return rows

    # -- running ------------------------------------------------------------------------------
    def run_stage(self, name: str, config: HumpbackConfig, redo: bool = False) -> str:
        """Run one stage unless it is done with this config; returns "skipped" or "ran"."""
        stage = self.stages[name]
        main = processes().is_main
        wait_for_everyone()  # in a launch: every process sees the folder as the last stage left it
        if not redo and self.is_done(name, config):
            return "skipped"
        for up in stage.after:
            if not self.is_done(up, config):
                raise PipelineError(f"stage {name!r} needs stage {up!r}, which is {self.state(up, config)}")
        if stage.run is None:
            raise PipelineError(f"stage {name!r} ({stage.doc}) is not built in this version of the kit")
        context = StageContext(self.path, config, stage, self.stage_hash(name, config))
        if main:
            self.manifest_path(name).unlink(missing_ok=True)  # from here on the stage is not done
            clean_temporaries(self.path)
            self._remove_partials(stage, keep_hash=context.hash)  # left by runs with other settings
        wait_for_everyone()
        started = time.time()
        with contextlib.nullcontext() if main else discard_writes(self.path):
            report = stage.function()(context)
        wait_for_everyone()  # every process has read the part files before they go
        if not main:
            return "ran"
        missing = [out for out in stage.outputs if not (self.path / out).exists()]
        if missing:
            raise PipelineError(f"stage {name!r} finished without writing {missing}")
        self._remove_partials(stage)
        manifest = {
            "stage": name,
            "hash": self.stage_hash(name, config),
            "after": {up: self.stage_hash(up, config) for up in stage.after},
            "outputs": list(stage.outputs),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3),
            "report": report if isinstance(report, dict) else None,
            "config": config.to_dict(),
        }
        atomic_write_text(self.manifest_path(name), yaml.safe_dump(manifest, sort_keys=False))
        return "ran"

    def run(self, config: HumpbackConfig, until: str | None = None, redo: Sequence[str] = (),
            log: Callable[[str], None] = print) -> dict[str, str]:
        """Store the config, then run every stage in order up to `until` (inclusive)."""
        names = list(self.stages)
        if until is not None and until not in self.stages:
            raise PipelineError(f"unknown stage {until!r}; stages: {', '.join(names)}")
        unknown = [name for name in redo if name not in self.stages]
        if unknown:
            raise PipelineError(f"unknown stage(s) to redo {unknown}; stages: {', '.join(names)}")
        main = processes().is_main
        self.path.mkdir(parents=True, exist_ok=True)
        results = {}
        with self.lock() if main else contextlib.nullcontext():
            if main:
                self.set_config(config)
            for name in names[: names.index(until) + 1] if until else names:
                results[name] = self.run_stage(name, config, redo=name in redo)
                if main:
                    log(f"{name:<11} {results[name]}")
        return results

    def _remove_partials(self, stage: Stage, keep_hash: str | None = None) -> None:
        """Delete the stage's `.partial` files, except those made with the settings of `keep_hash`."""
        for out in stage.outputs:
            for leftover in self.path.glob(f"{out}.*.partial"):  # <out>[.<name>].<hash>[.rank<r>].partial
                if keep_hash is None or f".{keep_hash}." not in leftover.name:
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def clear(self, name: str) -> list[str]:
        """Delete a stage's outputs and manifest, and the manifests of every stage that reads them."""
        cleared = []
        for stage in self.stages.values():
            if stage.name == name or name in self._upstream(stage.name):
                self.manifest_path(stage.name).unlink(missing_ok=True)
                cleared.append(stage.name)
        self._remove_partials(self.stages[name])
        for out in self.stages[name].outputs:
            target = self.path / out
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        return cleared

    def _upstream(self, name: str) -> set[str]:
        found: set[str] = set()
        for up in self.stages[name].after:
            found |= {up} | self._upstream(up)
        return found

    def lock(self) -> _Lock:
        """Keep two processes from running stages in one run folder at the same time."""
        return _Lock(self.path / LOCK_FILE)


class _Lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _pid_alive(self.path):
                    raise PipelineError(
                        f"{self.path.parent}: another process ({self.path.read_text().strip()}) is running "
                        f"stages here; if it is gone, delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a process that died
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            return self
        raise PipelineError(f"{self.path}: could not take the run folder's lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(lock_path: Path) -> bool:
    try:
        pid = int(lock_path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return pid != os.getpid()


def run(config: HumpbackConfig, run_dir: str | Path, until: str | None = None,
        redo: Sequence[str] = ()) -> dict[str, str]:
    """Run the method's stages for `config` in `run_dir` (what `humpback run` does)."""
    return RunFolder(run_dir).run(config, until=until, redo=redo)


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Which stages of `run_dir` are done, stale, pending or not built (what `humpback status` shows)."""
    return RunFolder(run_dir).status()
