"""The run folder: the one place that names its files, and the rules by which stages fill it.

    runs/<name>/
      config.yaml                  the config of the latest `run`
      seed.jsonl                   seed pairs, split "train" or "heldout"                      stage seed
      segments.jsonl               unlabelled segments (+ segments_dropped.jsonl, segments_report.json)
      models/<model>/              every trained model (adapter or full weights, train_log.json):
                                   backward (M_yx), m0, m1, m2, and the models of the analyses
      candidates.jsonl             (instruction, segment) pairs (+ candidates_dropped.jsonl, candidates_report.json)
      scores_<model>.jsonl         a model's rating of every candidate
      A<i>.jsonl  A<i>.json        A^(i)_k, and the k that made it (with the rule that chose k)
      eval/                        answers_<model>.jsonl, model_outputs_<model>.json (AlpacaEval's format),
                                   judgments_<x>_vs_<y>.jsonl, win_rates.json
      analyses/<name>.json         the paper's analyses: table8_tags, table7_selectors, figure3_scaling
      summary.json                 every number of the run
      figures/                     the run's figures, written by the notebooks
      notebooks/                   the notebooks as executed on this run (`humpback notebooks`)
      report.html                  one page with every table and figure (`humpback report`)
      stages/<stage>.yaml          a stage's manifest: its hash, its inputs' hashes, the config, time, report
      stages/models/<model>.yaml   a model's manifest: its own hash and the settings that made it

Rules (a stage is declared in stages.py or analyses.py, with its outputs, the stages it reads and the config sections
it reads; pipeline.py puts them in order and gives them to the run folder):
- A stage is done when its manifest and outputs exist and the manifest's hash equals the hash the current config
  gives it: the hash of its declared config sections and of the hashes of the stages it reads. A stage sees only
  the sections it declares (`StageRun.config`), so the hash covers what the stage reads.
- Every trained model has a hash of its own (the settings and data that made it) and is retrained when it
  changes, also inside an analysis that trains several (`StageRun.trained`).
- Outputs are written atomically and the manifest last: a stage interrupted halfway is not done and runs again,
  resuming from its `.partial` files, whose names carry the hash (records made with other settings never resume).
- Launched on several processes (infra/distributed.py), every process runs every stage; only the main process
  writes the run folder, and the processes meet before and after each stage.
- A manifest records the size, sha256 digest and mtime of every file a stage wrote (of every file inside a folder
  output, `.tmp-*` aside). A stage whose outputs no longer match is "damaged" (`humpback status` names the files)
  and runs again. A check hashes a file again only when its size is the same and its mtime is not: a size that
  differs, or a file missing from or added to a folder output, is damage at once. Manifests without digests
  (written by older versions of the kit) are trusted as before.
- A manifest also records a digest of what the stage read: the recorded outputs of each stage in its `after`. A
  stage is "stale" when a stage it reads is damaged (or stale for that reason), and when that stage's recorded
  outputs are no longer the ones it read (rerun, it wrote something else); a rerun that restores the same files
  leaves the stages that read them done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from humpback_nb.config import HumpbackConfig, config_differences, config_hash, load_config, save_config
from humpback_nb.infra.distributed import processes, wait_for_everyone
from humpback_nb.infra.files import TMP_PREFIX, atomic_write_text, clean_temporaries, discard_writes, read_jsonl

SECTIONS = tuple(f.name for f in dataclasses.fields(HumpbackConfig) if f.name != "preset")
ALL_SECTIONS = ("*",)  # a stage that reads the whole config (the summary)


class PipelineError(RuntimeError):
    """A run folder or stage that cannot proceed; the message says which and why."""


class SectionError(PipelineError, AttributeError):
    """A stage read a config section it does not declare: its hash would not cover what it reads."""


# -- the accessor: every name in the run folder --------------------------------------------------------------
@dataclass(frozen=True)
class Curated:
    """A^(i)_k as written by a stage: the pairs, the k that made them, and how k was chosen."""

    records: list[dict[str, Any]]
    k: float
    rule: str
    info: dict[str, Any]

    def label(self, iteration: int) -> str:
        """How the kit names this set wherever it shows it: "A(1)_k, k >= 3.97"."""
        return f"A({iteration})_k, k >= {self.k:.3g}"


# Every name in a run folder, by artifact: "{}" is the model, iteration, comparison or stage the file is of.
ARTIFACTS = {
    "config": "config.yaml",                 # the config of the latest `run`
    "lock": ".lock",                         # held while a process runs stages here
    "seed": "seed.jsonl",
    "segments": "segments.jsonl", "segments_dropped": "segments_dropped.jsonl",
    "segments_report": "segments_report.json",
    "candidates": "candidates.jsonl", "candidates_dropped": "candidates_dropped.jsonl",
    "candidates_report": "candidates_report.json",
    "models": "models",
    "model": "models/{}",                    # "backward", "m0", "m1", ..., or a model an analysis trains
    "scores": "scores_{}.jsonl",             # a model's rating of every candidate
    "curated": "A{}.jsonl", "curated_info": "A{}.json",  # A(t)_k, and the k that made it
    "eval": "eval",
    "answers": "eval/answers_{}.jsonl",
    "model_outputs": "eval/model_outputs_{}.json",  # AlpacaEval's format (`alpaca_eval --model_outputs PATH`)
    "judgments": "eval/judgments_{}.jsonl",  # a comparison of the eval stage, e.g. "m2_vs_m0"
    "win_rates": "eval/win_rates.json",
    "analysis": "analyses/{}.json",          # "table8_tags", "table7_selectors", "figure3_scaling", "heldout_losses"
    "summary": "summary.json",
    "gpu_check": "gpu_check.json",           # `humpback gpu-check`'s report
    "notebooks": "notebooks",                # the notebooks as executed on this run (`humpback notebooks`)
    "figures": "figures",                    # the run's figures (PNG), written by the notebooks
    "report": "report.html",                 # `humpback report`'s page
    "variant_pairs": "variant/pairs.jsonl",  # a follow-up's training pairs (config variant.method, followups.py)
    "variant_report": "variant/pairs.json",  # how they were made: the prompt's source, counts, what rewrites changed
    "variant_eval": "variant/eval",          # its model's answers and judgments beside Humpback's models
    "engine_log": "engine/vllm.log",         # the output of the kit's own vLLM server (engine.kind: vllm)
    "manifest": "stages/{}.yaml",            # a stage's manifest
    "model_manifest": "stages/models/{}.yaml",
}


class RunFiles:
    """The files of one run folder: every path from ARTIFACTS (`path`), and a reader for each kind of record.
    Nothing else names them."""

    def __init__(self, path: str | Path):
        self.root = Path(path)

    def path(self, artifact: str, of: str | int | None = None, folder: Path | None = None) -> Path:
        """The path of `artifact` (a key of ARTIFACTS) of `of` (the model, iteration, comparison or stage it is of);
        `folder`: in another folder than its own (the eval stage writes its files into a temporary one)."""
        if artifact not in ARTIFACTS:
            raise PipelineError(f"unknown run-folder artifact {artifact!r}; artifacts: {', '.join(ARTIFACTS)}")
        pattern = ARTIFACTS[artifact]
        if ("{}" in pattern) != (of is not None):
            raise PipelineError(f"run-folder artifact {artifact!r} ({pattern}) "
                                + ("needs what it is of" if of is None else f"is of nothing, not {of!r}"))
        relative = Path(pattern.format(of))
        return folder / relative.name if folder is not None else self.root / relative

    def partial(self, output: Path, hash: str, part: str | None = None) -> Path:
        """Where a resumable stage keeps what it has made so far of `output` (or of one `part` of it), with the
        settings of `hash`."""
        return output.with_name(f"{output.name}{'.' + part if part else ''}.{hash}.partial")

    def partials(self, output: Path) -> list[Path]:
        """Every `.partial` of `output`, whatever its settings and process (`<name>.<hash>[.rank<r>].partial`)."""
        return sorted(output.parent.glob(f"{output.name}.*.partial"))

    def resolve(self, output: str) -> Path:
        """The path of a declared output: "seed", or with what it is of, "model:m0", "scores:m0", "curated:1"."""
        artifact, _, of = output.partition(":")
        return self.path(artifact, of or None)

    # readers
    def seed_pairs(self, split: str = "train") -> list[dict[str, Any]]:
        """The seed pairs of one split: "train" (what M_yx and M0 learn from) or "heldout" (never trained on)."""
        return [r for r in read_jsonl(self.path("seed")) if r["split"] == split]

    def segments(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path("segments"))

    def segments_dropped(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path("segments_dropped"))

    def segments_report(self) -> dict[str, Any]:
        return _read_json(self.path("segments_report"))

    def candidates(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path("candidates"))

    def candidates_dropped(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path("candidates_dropped"))

    def candidates_report(self) -> dict[str, Any]:
        return _read_json(self.path("candidates_report"))

    def scores(self, model: str) -> list[dict[str, Any]]:
        """`model`'s rating of every candidate ("m0" or "m1")."""
        return read_jsonl(self.path("scores", model))

    def curated(self, iteration: int) -> Curated:
        """A^(iteration)_k with the k that made it."""
        info = _read_json(self.path("curated_info", iteration))
        return Curated(read_jsonl(self.path("curated", iteration)), info["k"], info["rule"], info)

    def train_log(self, model: str) -> dict[str, Any]:
        from humpback_nb.infra.models import read_train_log  # the model folder's format belongs to models.py

        return read_train_log(self.path("model", model))

    def answers(self, model: str) -> list[dict[str, Any]]:
        return read_jsonl(self.path("answers", model))

    def judgments(self, comparison: str) -> list[dict[str, Any]]:
        """Every judgment of a comparison of the eval stage, e.g. "m2_vs_m0"."""
        return read_jsonl(self.path("judgments", comparison))

    def win_rates(self) -> dict[str, Any]:
        return _read_json(self.path("win_rates"))

    def analysis(self, name: str) -> dict[str, Any] | None:
        """An analysis' results, or None when its stage has not run."""
        path = self.path("analysis", name)
        return _read_json(path) if path.is_file() else None

    def summary(self) -> dict[str, Any]:
        return _read_json(self.path("summary"))

    def variant_pairs(self) -> list[dict[str, Any]]:
        """A follow-up's training pairs (a rewritten pair keeps its web text as "original")."""
        return read_jsonl(self.path("variant_pairs"))

    def variant_report(self) -> dict[str, Any]:
        """How a follow-up's pairs were made: its paper, the model asked, counts, what the rewrites changed."""
        return _read_json(self.path("variant_report"))

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """A stage's manifest, or None while the stage is not done."""
        return _read_yaml(self.path("manifest", stage))

    def model_manifests(self) -> list[dict[str, Any]]:
        """The manifest of every trained model in the run folder."""
        folder = self.path("model_manifest", "any").parent
        return [_read_yaml(path) or {} for path in sorted(folder.glob("*.yaml"))]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError(f"{path}: not there yet; run the stage that writes it (`humpback status` shows which)")
    return json.loads(path.read_text(encoding="utf-8"))


# -- stages --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of the method: what it writes, which stages it reads, which config sections it reads, and how
    `humpback plan` counts its work."""

    name: str
    outputs: tuple[str, ...]  # artifacts of the run folder (ARTIFACTS): "seed", "model:m0", "scores:m0", ...
    after: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    function: Callable[[StageRun], Any] | None = field(default=None, compare=False)
    doc: str = ""
    # Raises a one-line error when the config cannot serve this stage (a judge out of reach, say): called for every
    # stage a run will run, before the first of them starts.
    check: Callable[[HumpbackConfig], None] | None = field(default=None, compare=False)
    # Counts the stage's work into a plan.Work (models trained, prompts read, tokens written, judge calls, disk):
    # `humpback plan` walks the same stages `humpback run` runs.
    cost: Callable[[Any], None] | None = field(default=None, compare=False)


class StageConfig:
    """The config as one stage sees it: the sections it declares, and an error naming the stage for any other."""

    def __init__(self, config: HumpbackConfig, stage: Stage):
        self._config, self._stage = config, stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "preset" or (name in SECTIONS and (self._stage.sections == ALL_SECTIONS
                                                      or name in self._stage.sections)):
            return getattr(self._config, name)
        if name in SECTIONS:
            raise SectionError(f"stage {self._stage.name!r} reads config section {name!r}, which it does not declare "
                               f"(it declares {', '.join(self._stage.sections) or 'none'}); add it to its sections")
        raise AttributeError(f"a stage's config has sections only; {name!r} is none of {', '.join(SECTIONS)}")

    def whole(self) -> HumpbackConfig:
        """The whole config, for a stage that declares every section (the summary)."""
        if self._stage.sections != ALL_SECTIONS:
            raise SectionError(f"stage {self._stage.name!r} asks for the whole config but declares "
                               f"{', '.join(self._stage.sections) or 'no sections'}")
        return self._config


@dataclass
class StageRun:
    """What a stage function gets: the run's files, its own view of the config, its hash."""

    files: RunFiles
    config: StageConfig
    stage: Stage
    hash: str
    upstream: dict[str, str]  # hash of each stage this one reads
    stages: list[str] = field(default_factory=list)  # every stage of the run, in order (the summary lists them)
    models: dict[str, str] = field(default_factory=dict)  # models this run of the stage trained or kept: name -> hash

    def partial(self, output: Path, part: str | None = None) -> Path:
        """The `.partial` of `output` (or of one `part` of it) made with this stage's settings (resumed by a rerun
        with the same ones)."""
        output.parent.mkdir(parents=True, exist_ok=True)
        return self.files.partial(output, self.hash, part)

    def trained(self, model: str, settings: dict[str, Any], train: Callable[[Path, Path], Any]) -> Path:
        """The folder of `model`, trained by `train(folder, checkpoints)` unless it already holds a model made with
        the same `settings` (everything its training reads: base model, training settings, and the hashes or
        choices of its data). A model made with other settings is trained again from scratch."""
        model_hash = config_hash({"model": model, "settings": settings})
        folder, manifest_file = self.files.path("model", model), self.files.path("model_manifest", model)
        self.models[model] = model_hash
        manifest = _read_yaml(manifest_file)
        if manifest and manifest.get("hash") == model_hash and folder.is_dir():
            return folder
        main = processes().is_main
        if main:  # a model made with other settings is never read again, even if this training fails
            manifest_file.unlink(missing_ok=True)
            _remove(folder)
            for leftover in self.files.partials(folder):  # checkpoints of the same model with other settings
                if f".{model_hash}." not in leftover.name:
                    _remove(leftover)
        started = time.time()
        with contextlib.nullcontext() if main else discard_writes(self.files.root):
            train(folder, self.files.partial(folder, model_hash))
        if main:
            for leftover in self.files.partials(folder):
                _remove(leftover)
            record = {"model": model, "stage": self.stage.name, "hash": model_hash, "settings": settings,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 3)}
            atomic_write_text(manifest_file, yaml.safe_dump(record, sort_keys=False))
        return folder


class RunFolder:
    """A run folder and the stages that fill it (the method's come from pipeline.py: `pipeline.open_run`)."""

    def __init__(self, path: str | Path, stages: Sequence[Stage]):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"{self.path}: is a file, not a run folder; give a folder (new or holding a run)")
        self.files = RunFiles(self.path)
        self.stages = {stage.name: stage for stage in stages}
        for stage in stages:
            missing = [name for name in stage.after if name not in self.stages]
            if missing:
                raise PipelineError(f"stage {stage.name!r} reads from unknown stage(s) {missing}")
            unknown = [s for s in stage.sections if s not in SECTIONS and stage.sections != ALL_SECTIONS]
            if unknown:
                raise PipelineError(f"stage {stage.name!r} declares unknown config section(s) {unknown}")
            for output in stage.outputs:  # a misspelt artifact fails here, not after hours of work
                self.files.resolve(output)

    # -- config ---------------------------------------------------------------------------------------------
    def config(self) -> HumpbackConfig:
        """The config stored in the run folder."""
        path = self.files.path("config")
        if not path.is_file():
            raise PipelineError(f"{self.path}: no {path.name}; start the run with `humpback run`")
        return load_config(path)

    def set_config(self, config: HumpbackConfig) -> None:
        """Store `config` as the run's config; stages it changes become stale."""
        save_config(config, self.files.path("config"))

    # -- hashes and manifests -------------------------------------------------------------------------------
    def stage_hash(self, name: str, config: HumpbackConfig) -> str:
        """Hash of what determines a stage's outputs: its config sections and its inputs' hashes."""
        stage = self.stages[name]
        sections = SECTIONS if stage.sections == ALL_SECTIONS else stage.sections
        hashed = {s: config.hashed_section(s) for s in sections}  # the engine (how, not what) hashes to nothing
        return config_hash({"stage": name, "sections": {s: value for s, value in hashed.items() if value != {}},
                            "after": {up: self.stage_hash(up, config) for up in stage.after}})

    def manifest(self, name: str) -> dict[str, Any] | None:
        return self.files.manifest(name)

    def outputs(self, name: str) -> list[Path]:
        return [self.files.resolve(out) for out in self.stages[name].outputs]

    def state(self, name: str, config: HumpbackConfig) -> str:
        """"done", "stale" (made by another config, or reads a damaged or changed stage), "damaged" (its outputs no
        longer match its manifest), "pending", or "not built"."""
        return self.check(name, config).state

    def check(self, name: str, config: HumpbackConfig, _seen: dict[str, StageCheck] | None = None) -> StageCheck:
        """A stage's state, and why it is not done: the damaged files, or the stage it reads that changed."""
        seen = {} if _seen is None else _seen
        if name not in seen:
            seen[name] = self._check(name, config, seen)
        return seen[name]

    def _check(self, name: str, config: HumpbackConfig, seen: dict[str, StageCheck]) -> StageCheck:
        manifest = self.manifest(name)
        if manifest is None or not all(out.exists() for out in self.outputs(name)):
            return StageCheck("pending" if self.stages[name].function is not None else "not built")
        if manifest.get("hash") != self.stage_hash(name, config):
            return StageCheck("stale")
        problems = _output_problems(self.path, manifest.get("files"))
        if problems:
            return StageCheck("damaged", _describe_problems(problems), damaged=[path for path, _ in problems],
                              source=name)
        for up in self.stages[name].after:
            upstream = self.check(up, config, seen)
            if upstream.source is not None:  # it would read damaged files
                which = "is damaged" if upstream.state == "damaged" else f"reads damaged {upstream.source}"
                return StageCheck("stale", f"reads {up}, which {which}", source=upstream.source)
            read = (manifest.get("read") or {}).get(up)
            now = _outputs_digest((self.manifest(up) or {}).get("files"))
            if read is not None and now is not None and read != now:
                return StageCheck("stale", f"{up} wrote other outputs since this stage read them")
        return StageCheck("done")

    def is_done(self, name: str, config: HumpbackConfig) -> bool:
        return self.state(name, config) == "done"

    def model_rows(self, name: str, stage_state: str) -> list[dict[str, Any]]:
        """The models a stage trained: each done while its stage is done with that model's hash."""
        kept = (self.manifest(name) or {}).get("models") or {}
        found = {record["model"]: record for record in self.files.model_manifests() if record.get("stage") == name}
        rows = []
        for model in sorted(set(kept) | set(found), key=lambda m: (m not in kept, m)):
            record = found.get(model, {})
            done = (stage_state == "done" and kept.get(model) == record.get("hash")
                    and self.files.path("model", model).is_dir())
            rows.append({"model": model, "state": "done" if done else "stale" if record else "pending",
                         "hash": record.get("hash"), "seconds": record.get("seconds")})
        return rows

    def status(self, config: HumpbackConfig | None = None) -> list[dict[str, Any]]:
        """One row per stage: name, state, outputs, seconds it took, the models it trained, and why it is not done
        ("reason", and "damaged": the files, relative to the run folder, that changed since the stage wrote them)."""
        if config is None and self.files.path("config").is_file():
            config = self.config()
        rows, seen = [], {}
        for name, stage in self.stages.items():
            manifest = self.manifest(name) or {}
            if config is None:
                check = StageCheck("pending" if stage.function is not None else "not built")
            else:
                check = self.check(name, config, seen)
            state = check.state
            rows.append({"stage": name, "state": state, "outputs": [str(p.relative_to(self.path))
                                                                     for p in self.outputs(name)],
                         "seconds": manifest.get("seconds"), "doc": stage.doc,
                         "models": self.model_rows(name, state), "linked_from": manifest.get("linked_from"),
                         "reason": check.reason, "damaged": check.damaged})
        return rows

    # -- running --------------------------------------------------------------------------------------------
    def run_stage(self, name: str, config: HumpbackConfig, redo: bool = False) -> str:
        """Run one stage unless it is done with this config; returns "skipped" or "ran"."""
        stage = self.stages[name]
        main = processes().is_main
        wait_for_everyone()  # in a launch: every process sees the folder as the last stage left it
        check = self.check(name, config)
        if not redo and check.state == "done":
            if main:
                self._refresh_mtimes(name)
            return "skipped"
        for up in stage.after:
            if not self.is_done(up, config):
                raise PipelineError(f"stage {name!r} needs stage {up!r}, which is {self.state(up, config)}")
        if stage.function is None:
            raise PipelineError(f"stage {name!r} ({stage.doc}) is not built in this version of the kit")
        context = StageRun(self.files, StageConfig(config, stage), stage, self.stage_hash(name, config),
                           {up: self.stage_hash(up, config) for up in stage.after}, list(self.stages))
        read = {up: digest for up in stage.after
                if (digest := _outputs_digest((self.manifest(up) or {}).get("files"))) is not None}
        if main:
            self.files.path("manifest", name).unlink(missing_ok=True)  # from here on the stage is not done
            for output in self.outputs(name):  # a damaged output is made again, a model retrained
                if any(_within(path, output.relative_to(self.path).as_posix()) for path in check.damaged):
                    if output.parent == self.files.path("models"):
                        self._remove_model(output.name)
                    else:
                        _remove(output)
            for output in self.outputs(name):
                clean_temporaries(output.parent)
                if output.parent != self.files.path("models"):  # a model's checkpoints: see StageRun.trained
                    self._remove_partials(output, keep_hash=context.hash)  # left by runs with other settings
        wait_for_everyone()
        from humpback_nb.infra.decode import timing

        started = time.time()
        with contextlib.nullcontext() if main else discard_writes(self.path), timing() as decoding:
            report = stage.function(context)
        wait_for_everyone()  # every process has read the part files before they go
        if not main:
            return "ran"
        missing = [str(out.relative_to(self.path)) for out in self.outputs(name) if not out.exists()]
        if missing:
            raise PipelineError(f"stage {name!r} finished without writing {missing}")
        for output in self.outputs(name):
            self._remove_partials(output)
        for row in self.model_rows(name, "stale"):  # models this stage trained before and no longer needs
            if row["model"] not in context.models:
                self._remove_model(row["model"])
        manifest = {
            "stage": name,
            "hash": context.hash,
            "after": context.upstream,
            "outputs": list(stage.outputs),
            "models": context.models,
            "read": read,
            "files": {output.relative_to(self.path).as_posix(): _describe_output(output)
                      for output in self.outputs(name)},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3),
            "report": report if isinstance(report, dict) else None,
            "config": config.to_dict(),
        }
        if decoding.steps:  # what this process's decoding took: `humpback gpu-check` and `plan --calibrate` read it
            manifest["decoding"] = {k: round(v, 6) for k, v in decoding.to_dict().items()}
        atomic_write_text(self.files.path("manifest", name), yaml.safe_dump(manifest, sort_keys=False))
        return "ran"

    def run(self, config: HumpbackConfig, until: str | None = None, redo: Sequence[str] = (),
            log: Callable[[str], None] = print, start_from: str | Path | None = None) -> dict[str, str]:
        """Store the config, then run every stage in order up to `until` (inclusive); with `start_from`, the stages
        the run folder there has done with the same hashes are linked first (`link_from`), and not run again."""
        names = list(self.stages)
        if until is not None and until not in self.stages:
            raise PipelineError(f"unknown stage {until!r}; stages: {', '.join(names)}")
        unknown = [name for name in redo if name not in self.stages]
        if unknown:
            raise PipelineError(f"unknown stage(s) to redo {unknown}; stages: {', '.join(names)}")
        main = processes().is_main
        selected = names[: names.index(until) + 1] if until else names
        # what the config cannot serve stops the run here, before anything is written, not after hours of work
        seen: dict[str, StageCheck] = {}  # each stage checked once for the whole list
        todo = [n for n in selected if n in redo or self.check(n, config, seen).state != "done"]
        for name in todo:
            if self.stages[name].check is not None:
                self.stages[name].check(config)
        if any("engine" in self.stages[name].sections for name in todo):
            from humpback_nb.infra.serve import check_ready

            check_ready(config.engine)  # vLLM's servers answer, or the kit can start its own
        self.path.mkdir(parents=True, exist_ok=True)
        results = {}
        with self.lock() if main else contextlib.nullcontext():
            if main:
                if self.files.path("config").is_file():
                    for key, old, new in config_differences(self.config(), config):
                        log(f"changed     {key}: {old!r} -> {new!r}")
                self.set_config(config)
                for name in self.link_from(start_from, config) if start_from is not None else ():
                    log(f"{name:<11} linked from {start_from}")
            try:
                for name in selected:
                    results[name] = self.run_stage(name, config, redo=name in redo)
                    if main:
                        log(f"{name:<11} {results[name]}")
            finally:
                from humpback_nb.infra import serve

                serve.stop()  # the kit's vLLM server, if a stage started one (engine.kind: vllm)
        return results

    def _refresh_mtimes(self, name: str) -> None:
        """Record the mtimes of a done stage's files whose content was found unchanged (copied, touched), so that
        the next check does not hash them again."""
        manifest = self.manifest(name)
        if manifest and manifest.get("files"):
            files = _refresh_mtimes(self.path, manifest["files"])
            if files != manifest["files"]:
                manifest["files"] = files
                atomic_write_text(self.files.path("manifest", name), yaml.safe_dump(manifest, sort_keys=False))

    def _remove_partials(self, output: Path, keep_hash: str | None = None) -> None:
        """Delete the `.partial` files of `output`, except those made with the settings of `keep_hash`."""
        for leftover in self.files.partials(output):
            if keep_hash is None or f".{keep_hash}." not in leftover.name:
                _remove(leftover)

    def link_from(self, source: str | Path, config: HumpbackConfig) -> list[str]:
        """Take every stage that the run folder `source` has done with the hash `config` gives it here: its outputs,
        the models it trained and their manifests are hard-linked into this folder (copied where a link cannot be
        made), its manifest copied with `linked_from: <source>`. A stage this folder has already made stays its own.
        The stages taken, in order: a follow-up started from a Humpback run runs only what Humpback did not."""
        source = Path(source)
        if source.resolve() == self.path.resolve():
            raise PipelineError(f"{source}: is this run folder itself; give the run to start from")
        if not RunFiles(source).path("config").is_file():
            raise PipelineError(f"{source}: holds no run to start from (no {ARTIFACTS['config']})")
        theirs, taken, seen = RunFolder(source, list(self.stages.values())), [], {}
        for name in self.stages:
            manifest = theirs.manifest(name)
            if (self.manifest(name) is not None or manifest is None
                    or manifest.get("hash") != self.stage_hash(name, config)
                    or theirs.check(name, config, seen).state != "done"):
                continue
            for output in theirs.outputs(name):
                _link(output, self.path / output.relative_to(theirs.path))
            for model in manifest.get("models") or {}:
                for path in (theirs.files.path("model", model), theirs.files.path("model_manifest", model)):
                    _link(path, self.path / path.relative_to(theirs.path))
            manifest["linked_from"] = str(source)
            atomic_write_text(self.files.path("manifest", name), yaml.safe_dump(manifest, sort_keys=False))
            taken.append(name)
        return taken

    def clear(self, name: str) -> list[str]:
        """Delete a stage's outputs, models and manifest, and the manifests of every stage that reads them."""
        cleared = []
        for stage in self.stages.values():
            if stage.name == name or name in self._upstream(stage.name):
                self.files.path("manifest", stage.name).unlink(missing_ok=True)
                cleared.append(stage.name)
        for row in self.model_rows(name, "stale"):
            self._remove_model(row["model"])
        for output in self.outputs(name):
            self._remove_partials(output)
            _remove(output)
        return cleared

    def _remove_model(self, model: str) -> None:
        folder = self.files.path("model", model)
        self.files.path("model_manifest", model).unlink(missing_ok=True)
        for target in (folder, *self.files.partials(folder)):
            _remove(target)

    def _upstream(self, name: str) -> set[str]:
        found: set[str] = set()
        for up in self.stages[name].after:
            found |= {up} | self._upstream(up)
        return found

    def lock(self) -> _Lock:
        """Keep two processes from running stages in one run folder at the same time."""
        return _Lock(self.files.path("lock"))


# libyaml's safe loader where PyYAML was built with it: the same records, read about 8 times faster (a run's
# manifests list every file's digest, and checking which stages are done reads them all)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) if path.is_file() else None


def _link(source: Path, target: Path) -> None:
    """`source` (a file or a folder) at `target` too, file by file as hard links (copies across file systems); what
    was at `target` is replaced."""
    _remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_held: dict[Path, tuple[int, int]] = {}  # the run folders' locks this process holds: (file descriptor, `with`s in)


class _Lock:
    """A run folder's lock: an exclusive `flock` on its `.lock` file, which names the process holding it. The kernel
    lets go of it when that process ends, however it ends; and a copy of the folder made meanwhile (`cp -r`,
    `shutil.copytree`) holds a file, not a lock. A process may take its own lock again."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _Lock:
        key = self.path.resolve()
        if key in _held:
            fd, depth = _held[key]
            _held[key] = fd, depth + 1
            return self
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "starting"
                os.close(fd)
                raise PipelineError(f"{self.path.parent}: another process ({holder}) is running stages here") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # the file at that path still: not one its last holder removed as it let go
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = fd, 1
        return self

    def __exit__(self, *exc) -> None:
        key = self.path.resolve()
        fd, depth = _held.pop(key)
        if depth > 1:
            _held[key] = fd, depth - 1
        else:
            self.path.unlink(missing_ok=True)  # before letting go: whoever opened this file meanwhile opens anew
            os.close(fd)


# -- the outputs' digests: what a manifest records of the files a stage wrote ------------------------------------
@dataclass(frozen=True)
class StageCheck:
    """A stage's state, and why it is not done: the files that changed since it wrote them ("damaged"), or the
    stage it reads that is damaged or wrote other outputs since ("stale"). `source`: the damaged stage, if any."""

    state: str
    reason: str | None = None
    damaged: list[str] = field(default_factory=list)
    source: str | None = None


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once a process


def _sha256(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "sha256": _sha256(path, stat), "mtime_ns": stat.st_mtime_ns}


def _folder_files(folder: Path) -> dict[str, Path]:
    """The files in a folder output, by path relative to it; leftovers of interrupted writes (`.tmp-*`) aside."""
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(TMP_PREFIX) for part in relative.parts):
            found[relative.as_posix()] = path
    return found


def _describe_output(output: Path) -> dict[str, Any]:
    """What a manifest records of an output: a file's size, digest and mtime; each file's, for a folder."""
    if output.is_dir():
        return {"folder": {name: _file_record(path) for name, path in sorted(_folder_files(output).items())}}
    return _file_record(output)


def _changed(path: Path, record: dict[str, Any]) -> bool:
    """Whether a file differs from its record: its size at once; its digest only when its mtime moved."""
    stat = path.stat()
    if stat.st_size != record["size"]:
        return True
    return stat.st_mtime_ns != record.get("mtime_ns") and _sha256(path, stat) != record["sha256"]


def _output_problems(root: Path, files: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The files of a stage's recorded outputs that no longer match: (path in the run folder, "changed", "missing"
    or "added"). None recorded (a manifest of an older kit): none found."""
    problems: list[tuple[str, str]] = []
    for name, entry in (files or {}).items():
        path = root / name
        if "folder" not in entry:
            if not path.is_file():
                problems.append((name, "missing"))
            elif _changed(path, entry):
                problems.append((name, "changed"))
            continue
        if not path.is_dir():
            problems.append((name, "missing"))
            continue
        present = _folder_files(path)
        for inner, record in entry["folder"].items():
            if inner not in present:
                problems.append((f"{name}/{inner}", "missing"))
            elif _changed(present[inner], record):
                problems.append((f"{name}/{inner}", "changed"))
        problems += [(f"{name}/{inner}", "added") for inner in sorted(set(present) - set(entry["folder"]))]
    return problems


def _describe_problems(problems: list[tuple[str, str]]) -> str:
    """"candidates.jsonl changed since the stage wrote it; models/m0/x is missing"."""
    said = {"changed": "changed since the stage wrote it", "missing": "missing", "added": "not written by the stage"}
    parts = []
    for kind, words in said.items():
        names = [name for name, what in problems if what == kind]
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            verb = "" if kind == "changed" else ("is " if len(names) == 1 else "are ")
            parts.append(f"{shown} {verb}{words}")
    return "; ".join(parts)


def _outputs_digest(files: dict[str, Any] | None) -> str | None:
    """One digest over a stage's recorded outputs (sizes and digests, not mtimes); None when none are recorded."""
    if not files:
        return None

    def content(entry: dict[str, Any]) -> Any:
        if "folder" in entry:
            return {name: content(record) for name, record in entry["folder"].items()}
        return [entry["size"], entry["sha256"]]

    text = json.dumps({name: content(entry) for name, entry in files.items()}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _refresh_mtimes(root: Path, files: dict[str, Any]) -> dict[str, Any]:
    """The records with the mtimes of files whose content is unchanged, so that they are not hashed again."""

    def refreshed(path: Path, record: dict[str, Any]) -> dict[str, Any]:
        if not path.is_file():
            return record
        stat = path.stat()
        if stat.st_size == record["size"] and stat.st_mtime_ns != record.get("mtime_ns") \
                and _sha256(path, stat) == record["sha256"]:
            return {**record, "mtime_ns": stat.st_mtime_ns}
        return record

    new = {}
    for name, entry in files.items():
        if "folder" in entry:
            new[name] = {"folder": {inner: refreshed(root / name / inner, record)
                                    for inner, record in entry["folder"].items()}}
        else:
            new[name] = refreshed(root / name, entry)
    return new


def _within(path: str, output: str) -> bool:
    """Whether `path` (relative to the run folder) is the output `output` or a file inside it."""
    return path == output or path.startswith(output + "/")
