import os
import shutil
import subprocess
import sys

import pytest

from humpback_nb.cli import main
from humpback_nb.config import load_preset, with_overrides
from humpback_nb.infra.files import read_jsonl, write_jsonl
from humpback_nb.pipeline import STAGES
from humpback_nb.run import PipelineError, RunFiles, RunFolder, SectionError, Stage

CALLS: list[str] = []


def make_numbers(run):
    CALLS.append("numbers")
    n = run.config.data.seed_size
    write_jsonl(run.files.path("seed"), ({"id": i, "value": i * i, "split": "train"} for i in range(n)))


def sum_numbers(run):
    CALLS.append("total")
    values = [r["value"] for r in run.files.seed_pairs("train")]
    scale = run.config.generate.temperature
    write_jsonl(run.files.path("candidates"), [{"total": sum(values) * scale}])


def crash(run):
    CALLS.append("crash")
    raise RuntimeError("killed halfway")


TOY = (
    Stage("numbers", ("seed",), (), ("data",), make_numbers),
    Stage("total", ("candidates",), ("numbers",), ("generate",), sum_numbers),
)


@pytest.fixture
def folder(tmp_path):
    CALLS.clear()
    return RunFolder(tmp_path / "run", TOY)


@pytest.fixture
def config():
    return load_preset("tiny")


def test_stages_run_once_and_are_skipped_with_the_same_config(folder, config):
    assert folder.run(config, log=lambda _: None) == {"numbers": "ran", "total": "ran"}
    assert folder.run(config, log=lambda _: None) == {"numbers": "skipped", "total": "skipped"}
    assert CALLS == ["numbers", "total"]
    assert read_jsonl(folder.files.path("candidates")) == [{"total": sum(i * i for i in range(24)) * 0.7}]
    manifest = folder.manifest("numbers")
    assert manifest["hash"] == folder.stage_hash("numbers", config)
    assert manifest["config"] == config.to_dict()
    assert folder.files.path("config").is_file()


def test_a_change_redoes_only_the_stages_it_touches(folder, config):
    folder.run(config, log=lambda _: None)
    hotter = with_overrides(config, {"generate.temperature": 1.0})
    assert folder.run(hotter, log=lambda _: None) == {"numbers": "skipped", "total": "ran"}
    bigger = with_overrides(hotter, {"data.seed_size": 5})
    assert [folder.state(s, bigger) for s in ("numbers", "total")] == ["stale", "stale"]
    assert folder.run(bigger, log=lambda _: None) == {"numbers": "ran", "total": "ran"}
    assert CALLS == ["numbers", "total", "total", "numbers", "total"]


def test_until_and_redo(folder, config):
    assert folder.run(config, until="numbers", log=lambda _: None) == {"numbers": "ran"}
    assert folder.state("total", config) == "pending"
    assert folder.run(config, redo=["numbers"], log=lambda _: None) == {"numbers": "ran", "total": "ran"}


def test_an_interrupted_stage_is_not_done_and_runs_again(tmp_path, config):
    CALLS.clear()
    stages = (TOY[0], Stage("total", ("candidates",), ("numbers",), ("generate",), crash))
    folder = RunFolder(tmp_path / "run", stages)
    with pytest.raises(RuntimeError, match="killed halfway"):
        folder.run(config, log=lambda _: None)
    assert folder.state("numbers", config) == "done"
    assert folder.state("total", config) == "pending"
    assert not folder.files.path("manifest", "total").exists()
    assert not folder.files.path("lock").exists()
    fixed = RunFolder(tmp_path / "run", TOY)
    assert fixed.run(config, log=lambda _: None) == {"numbers": "skipped", "total": "ran"}


def test_a_stage_that_writes_nothing_is_not_marked_done(tmp_path, config):
    stages = (Stage("lazy", ("summary",), (), (), lambda run: None),)
    folder = RunFolder(tmp_path / "run", stages)
    with pytest.raises(PipelineError, match=r"finished without writing \['summary.json'\]"):
        folder.run(config, log=lambda _: None)
    assert folder.manifest("lazy") is None


def test_clear_makes_the_stage_and_its_readers_pending(folder, config):
    folder.run(config, log=lambda _: None)
    assert folder.clear("numbers") == ["numbers", "total"]
    assert not folder.files.path("seed").exists()
    assert [folder.state(s, config) for s in ("numbers", "total")] == ["pending", "pending"]


def test_one_process_at_a_time_names_the_holder_and_a_copy_of_its_folder_is_free(folder, tmp_path):
    folder.path.mkdir(parents=True)
    code = "import sys\nfrom humpback_nb.run import RunFolder\nwith RunFolder(sys.argv[1], ()).lock(): pass"
    with folder.lock(), folder.lock():  # a process may take its own lock again
        copy = tmp_path / "copy"
        shutil.copytree(folder.path, copy)  # as `cp -r` copies a run folder that a notebook is working in
        assert (copy / ".lock").is_file()
        assert subprocess.run([sys.executable, "-c", code, str(copy)]).returncode == 0  # the file, not the lock
        other = subprocess.run([sys.executable, "-c", code, str(folder.path)], capture_output=True, text=True)
        assert folder.files.path("lock").is_file()  # the inner `with` left it held
    assert other.returncode != 0 and f"another process ({os.getpid()}) is running stages here" in other.stderr
    assert not folder.files.path("lock").exists()
    assert subprocess.run([sys.executable, "-c", code, str(folder.path)]).returncode == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(folder, config):
    folder.path.mkdir(parents=True)
    folder.files.path("lock").write_text("999999999\n")
    assert folder.run(config, until="numbers", log=lambda _: None) == {"numbers": "ran"}


def test_the_methods_stages_read_only_earlier_stages_in_the_papers_order():
    seen = set()
    for stage in STAGES:
        assert set(stage.after) <= seen, stage.name
        seen.add(stage.name)
    assert [stage.name for stage in STAGES] == ["seed", "segments", "backward", "backward_check", "candidates", "m0",
                                                "rate_m0", "A1", "m1", "rate_m1", "A2", "m2", "heldout", "eval", "tags",
                                                "selectors", "scaling", "summary"]
    folder = RunFolder("runs/x", STAGES)  # every declared output names an artifact of the run folder
    assert all(folder.outputs(stage.name) for stage in STAGES)
    # what `humpback status` and the report say of each stage: its docstring's first paragraph, whole sentences
    assert all(stage.doc.endswith((".", ")")) and "\n" not in stage.doc for stage in STAGES), [
        stage.doc for stage in STAGES if not stage.doc.endswith((".", ")"))]


def test_cli_status_on_a_folder_with_no_run(tmp_path, capsys):
    assert main(["status", "--run-dir", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "no run here yet" in out
    for stage in STAGES:
        assert stage.name in out


def test_cli_config_overrides_and_errors(capsys):
    assert main(["config", "--preset", "tiny", "--set", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    assert main(["config", "--preset", "tiny", "--set", "train.max_stepz=7"]) == 2
    assert "unknown key 'max_stepz'" in capsys.readouterr().err


def test_partials_of_other_settings_are_removed_and_own_ones_kept(tmp_path, config):
    seen = []

    def resumable(run):
        mine = run.partial(run.files.path("candidates"))
        seen.append(mine.exists())
        mine.write_text('{"id": 1}\n')
        raise RuntimeError("interrupted")

    stages = (Stage("s", ("candidates",), (), ("generate",), resumable),)
    folder = RunFolder(tmp_path / "run", stages)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            folder.run(config, log=lambda _: None)
    assert seen == [False, True]  # the second run finds the first one's records
    other = with_overrides(config, {"generate.temperature": 1.0})
    with pytest.raises(RuntimeError):
        folder.run(other, log=lambda _: None)
    assert seen[-1] is False  # records made with other settings are never resumed
    assert len(folder.files.partials(folder.files.path("candidates"))) == 1


# -- honest hashes: a stage sees only the sections it declares -----------------------------------------------------
def test_a_stage_that_reads_an_undeclared_section_stops_with_its_name_and_the_section(tmp_path, config):
    def sneaky(run):
        return run.config.train.learning_rate  # declares only "generate"

    folder = RunFolder(tmp_path / "run", (Stage("sneaky", ("candidates",), (), ("generate",), sneaky),))
    with pytest.raises(SectionError, match="stage 'sneaky' reads config section 'train', which it does not declare"):
        folder.run(config, log=lambda _: None)
    assert folder.manifest("sneaky") is None


def test_the_cli_reports_an_undeclared_section_in_one_line(tmp_path, monkeypatch, capsys):
    import humpback_nb.pipeline

    def sneaky(run):
        return run.config.evaluate.judge

    monkeypatch.setattr(humpback_nb.pipeline, "pipeline",
                        lambda iterations, method="humpback": [Stage("sneaky", ("summary",), (), ("data",), sneaky)])
    assert main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "humpback: error: stage 'sneaky' reads config section 'evaluate', which it does not declare (it declares "
        "data); add it to its sections"]


# -- every trained model is under a hash ---------------------------------------------------------------------------
def test_models_inside_a_stage_are_retrained_when_their_settings_change_and_kept_when_not(tmp_path, config):
    trained = []

    def fit(name, rate):
        def train(folder, checkpoints):
            trained.append((name, rate))
            folder.mkdir(parents=True)
            (folder / "weights.txt").write_text(str(rate))
        return train

    def analysis(run):  # an analysis that trains two models of its own, as Table 8 and Figure 3 do
        for name in ("extra_a", "extra_b"):
            rate = run.config.train.learning_rate
            run.trained(name, {"train": rate, "n": name}, fit(name, rate))
        write_jsonl(run.files.path("candidates"), [{"judge": run.config.evaluate.judge}])

    stages = (Stage("analysis", ("candidates",), (), ("train", "evaluate"), analysis),)
    folder = RunFolder(tmp_path / "run", stages)
    folder.run(config, log=lambda _: None)
    assert [(m["model"], m["state"]) for m in folder.status(config)[0]["models"]] == [("extra_a", "done"),
                                                                                      ("extra_b", "done")]
    other_judge = with_overrides(config, {"evaluate.judge": "other"})
    folder.run(other_judge, log=lambda _: None)  # the stage reruns, its models are kept
    assert len(trained) == 2
    new_rate = with_overrides(other_judge, {"train.learning_rate": 3e-4})
    assert [m["state"] for m in folder.status(new_rate)[0]["models"]] == ["stale", "stale"]
    folder.run(new_rate, log=lambda _: None)
    assert trained[2:] == [("extra_a", 3e-4), ("extra_b", 3e-4)]
    assert (folder.files.path("model", "extra_a") / "weights.txt").read_text() == "0.0003"
    assert folder.files.path("model_manifest", "extra_b").is_file()


def test_status_shows_the_models_of_a_stage(tmp_path, config, capsys):
    def analysis(run):
        run.trained("extra", {"n": 1}, lambda folder, checkpoints: folder.mkdir(parents=True))
        write_jsonl(run.files.path("candidates"), [])

    RunFolder(tmp_path, (Stage("analysis", ("candidates",), (), (), analysis),)).run(config, log=lambda _: None)
    rows = RunFolder(tmp_path, (Stage("analysis", ("candidates",), (), (), analysis),)).status()
    assert rows[0]["models"][0]["model"] == "extra" and rows[0]["models"][0]["state"] == "done"


# -- one accessor names the run folder's files ----------------------------------------------------------------------
def test_no_file_name_of_the_run_folder_is_written_outside_the_run_module():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = RunFiles("R")
    names = {p.name for p in (files.path("config"), files.path("seed"), files.path("segments"),
                              files.path("segments_dropped"), files.path("segments_report"), files.path("candidates"),
                              files.path("candidates_dropped"), files.path("candidates_report"), files.path("summary"),
                              files.path("win_rates"), files.path("curated", 1), files.path("curated_info", 2))}
    patterns = [re.escape(name) for name in names] + [r"scores_m\d", r"\bA[12]\.jsonl", r"answers_\w*\.jsonl",
                                                      r"model_outputs_\w*\.json", r"judgments_\w*\.jsonl"]
    sources = [p for folder in ("humpback_nb", "notebooks", "benchmarks") for p in (root / folder).rglob("*")
               if p.suffix in (".py", ".ipynb") and p.name != "run.py"]

    def code(path: Path) -> str:  # a notebook's code cells (its prose may name a file for the reader)
        if path.suffix != ".ipynb":
            return path.read_text(encoding="utf-8")
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")

    found = [f"{p.relative_to(root)}: {m.group(0)}" for p in sources for pattern in patterns
             for m in re.finditer(pattern, code(p))]
    assert len(sources) > 20 and found == []


def test_cli_reads_numbers_in_e_notation_as_numbers(capsys):
    assert main(["config", "--preset", "tiny", "--set", "train.learning_rate=3e-4"]) == 0
    assert "learning_rate: 0.0003" in capsys.readouterr().out


def test_models_a_stage_no_longer_trains_are_removed_with_their_manifests(tmp_path, config):
    def analysis(run):  # one model per size, as Figure 3 trains them
        for n in run.config.evaluate.scaling_sizes:
            run.trained(f"size_{n}", {"n": n}, lambda folder, checkpoints: folder.mkdir(parents=True))
        write_jsonl(run.files.path("candidates"), [])

    folder = RunFolder(tmp_path, (Stage("analysis", ("candidates",), (), ("evaluate",), analysis),))
    folder.run(config, log=lambda _: None)  # tiny: sizes 2 and 4
    folder.run(with_overrides(config, {"evaluate.scaling_sizes": [4, 8]}), log=lambda _: None)
    assert sorted(p.name for p in folder.files.path("models").iterdir()) == ["size_4", "size_8"]
    assert not folder.files.path("model_manifest", "size_2").exists()
    assert folder.clear("analysis") == ["analysis"] and not list(folder.files.path("models").iterdir())


def test_status_loads_no_torch(tmp_path):
    code = ("import sys\nfrom humpback_nb.cli import main\n"
            f"main(['status', '--run-dir', {str(tmp_path)!r}])\nassert 'torch' not in sys.modules, 'torch loaded'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_paper_run_without_its_judge_stops_before_its_first_stage(tmp_path, monkeypatch, capsys):
    # paper-7b judges with AlpacaEval's GPT-4 annotator at an endpoint: no key, no run (and nothing written)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["run", "--preset", "paper-7b", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "$OPENAI_API_KEY" in err and "evaluate.annotator=kit" in err
    assert not (tmp_path / "run").exists()
    assert main(["run", "--preset", "paper-7b", "--run-dir", str(tmp_path / "run"),
                 "--set", "evaluate.judge_url=null"]) == 2
    assert "evaluate.judge_url is not set" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_judge_check_asks_only_what_the_run_needs(monkeypatch):
    from humpback_nb.stages import judge_ready

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    paper = load_preset("paper-7b")
    judge_ready(with_overrides(paper, {"evaluate.judge_url": "http://127.0.0.1:8000/v1"}))  # a local server: no key
    judge_ready(with_overrides(paper, {"evaluate.annotator": "kit", "evaluate.reference": "base",
                                       "evaluate.judge_url": None}))  # the kit's judge on the base model
    with pytest.raises(PipelineError, match="needs a key"):
        judge_ready(paper)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge_ready(paper)
    # gpu-check stops at rate_m0, before any stage that judges: the paper preset's judge is not asked for
    monkeypatch.delenv("OPENAI_API_KEY")
    for stage in STAGES[: [s.name for s in STAGES].index("rate_m0") + 1]:
        if stage.check is not None:
            stage.check(paper)  # the rater's check only: the run's own models rate


# -- iterations as data --------------------------------------------------------------------------------------------
PAPER_RUN = [  # the stages of the paper's run and what each writes, as every earlier version of the kit named them
    ("seed", ["seed.jsonl"]),
    ("segments", ["segments.jsonl", "segments_dropped.jsonl", "segments_report.json"]),
    ("backward", ["models/backward"]), ("backward_check", ["analyses/backward_heldout.json"]),
    ("candidates", ["candidates.jsonl", "candidates_dropped.jsonl", "candidates_report.json"]),
    ("m0", ["models/m0"]), ("rate_m0", ["scores_m0.jsonl"]), ("A1", ["A1.jsonl", "A1.json"]), ("m1", ["models/m1"]),
    ("rate_m1", ["scores_m1.jsonl"]), ("A2", ["A2.jsonl", "A2.json"]), ("m2", ["models/m2"]),
    ("heldout", ["analyses/heldout_losses.json"]), ("eval", ["eval"]), ("tags", ["analyses/table8_tags.json"]),
    ("selectors", ["analyses/table7_selectors.json"]), ("scaling", ["analyses/figure3_scaling.json"]),
    ("summary", ["summary.json"])]


def test_the_paper_s_two_iterations_keep_their_stages_and_names(tmp_path, config):
    from humpback_nb.pipeline import open_run, pipeline

    folder = open_run(tmp_path / "run", config)
    assert [(s, [str(p.relative_to(folder.path)) for p in folder.outputs(s)]) for s in folder.stages] == PAPER_RUN
    # the number of iterations decides which stages a run has, not what a stage makes: no hash changes with it
    three = with_overrides(config, {"curate.iterations": 3})
    assert three.hash() == config.hash()
    assert all(folder.stage_hash(name, three) == folder.stage_hash(name, config) for name in folder.stages
               if name not in ("heldout", "eval", "tags", "scaling", "summary"))
    names = [s.name for s in pipeline(3)]
    assert names[names.index("m2") + 1:names.index("heldout")] == ["rate_m2", "A3", "m3"]
    assert dict((s.name, s.after) for s in pipeline(3))["tags"] == ("seed", "A3", "m3", "eval")
    with pytest.raises(Exception, match="curate.iterations"):
        with_overrides(config, {"curate.iterations": 1})  # Table 7 compares M0's and M1's selections


@pytest.mark.slow
def test_a_third_iteration_trains_m3_and_leaves_the_paper_s_stages_as_they_are(finished_tiny_run, tmp_path):
    from humpback_nb.pipeline import open_run

    copy = tmp_path / "run"
    shutil.copytree(finished_tiny_run, copy, ignore=shutil.ignore_patterns("notebooks", "figures", "report.html"))
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    config = with_overrides(open_run(copy).config(), {"curate.iterations": 3})
    results = open_run(copy, config).run(config, until="heldout", log=lambda _: None)
    assert [name for name, result in results.items() if result == "ran"] == ["rate_m2", "A3", "m3", "heldout"]
    files = RunFiles(copy)
    assert files.path("model", "m3").is_dir() and files.curated(3).records
    assert files.train_log("m3")["steps"] and "A(3)_k" in (files.path("model", "m3") / "README.md").read_text()
    assert {"m3 - m0", "m3 - m2", "m3 - base"} <= set(files.analysis("heldout_losses")["differences"])
    changed = {p.relative_to(copy).as_posix() for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t}
    assert changed <= {"config.yaml", "analyses/heldout_losses.json", "stages/heldout.yaml"}, changed
