import subprocess
import sys

import pytest

from humpback_nb.cli import main
from humpback_nb.config import load_preset, with_overrides
from humpback_nb.infra.files import read_jsonl, write_jsonl
from humpback_nb.run import STAGES, PipelineError, RunFolder, Stage

CALLS: list[str] = []


def make_numbers(ctx):
    CALLS.append("numbers")
    n = ctx.config.data.seed_size
    write_jsonl(ctx.path("numbers.jsonl"), ({"id": i, "value": i * i} for i in range(n)))


def sum_numbers(ctx):
    CALLS.append("total")
    values = [r["value"] for r in read_jsonl(ctx.path("numbers.jsonl"))]
    scale = ctx.config.generate.temperature
    write_jsonl(ctx.path("total.jsonl"), [{"total": sum(values) * scale}])


def crash(ctx):
    CALLS.append("crash")
    raise RuntimeError("killed halfway")


TOY = (
    Stage("numbers", ("numbers.jsonl",), (), ("data",), run=make_numbers),
    Stage("total", ("total.jsonl",), ("numbers",), ("generate",), run=sum_numbers),
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
    assert read_jsonl(folder.path / "total.jsonl") == [{"total": sum(i * i for i in range(24)) * 0.7}]
    manifest = folder.manifest("numbers")
    assert manifest["hash"] == folder.stage_hash("numbers", config)
    assert manifest["config"] == config.to_dict()
    assert (folder.path / "config.yaml").is_file()


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
    stages = (TOY[0], Stage("total", ("total.jsonl",), ("numbers",), ("generate",), run=crash))
    folder = RunFolder(tmp_path / "run", stages)
    with pytest.raises(RuntimeError, match="killed halfway"):
        folder.run(config, log=lambda _: None)
    assert folder.state("numbers", config) == "done"
    assert folder.state("total", config) == "pending"
    assert not (folder.path / "stages" / "total.yaml").exists()
    assert not (folder.path / ".lock").exists()
    fixed = RunFolder(tmp_path / "run", TOY)
    assert fixed.run(config, log=lambda _: None) == {"numbers": "skipped", "total": "ran"}


def test_a_stage_that_writes_nothing_is_not_marked_done(tmp_path, config):
    stages = (Stage("lazy", ("never.jsonl",), (), (), run=lambda ctx: None),)
    folder = RunFolder(tmp_path / "run", stages)
    with pytest.raises(PipelineError, match=r"finished without writing \['never.jsonl'\]"):
        folder.run(config, log=lambda _: None)
    assert folder.manifest("lazy") is None


def test_clear_makes_the_stage_and_its_readers_pending(folder, config):
    folder.run(config, log=lambda _: None)
    assert folder.clear("numbers") == ["numbers", "total"]
    assert not (folder.path / "numbers.jsonl").exists()
    assert [folder.state(s, config) for s in ("numbers", "total")] == ["pending", "pending"]


def test_one_process_at_a_time(folder):
    folder.path.mkdir(parents=True)
    code = f"from humpback_nb.run import RunFolder\nwith RunFolder({str(folder.path)!r}).lock(): pass"
    with folder.lock():
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and "another process" in other.stderr
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(folder, config):
    folder.path.mkdir(parents=True)
    (folder.path / ".lock").write_text("999999999\n")
    assert folder.run(config, until="numbers", log=lambda _: None) == {"numbers": "ran"}


def test_the_methods_stages_read_only_earlier_stages():
    seen = set()
    for stage in STAGES:
        assert set(stage.after) <= seen, stage.name
        seen.add(stage.name)
    outputs = [out for stage in STAGES for out in stage.outputs]
    assert outputs == ["seed.jsonl", "segments.jsonl", "segments_dropped.jsonl", "segments_report.json",
                       "backward", "candidates.jsonl", "candidates_dropped.jsonl", "candidates_report.json",
                       "m0", "scores_m0.jsonl",
                       "A1.jsonl", "m1", "scores_m1.jsonl", "A2.jsonl", "m2", "eval", "tags", "selection.json",
                       "scaling", "summary.json"]


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

    def resumable(ctx):
        mine = ctx.partial("out.jsonl")
        seen.append(mine.exists())
        mine.write_text('{"id": 1}\n')
        raise RuntimeError("interrupted")

    stages = (Stage("s", ("out.jsonl",), (), ("generate",), run=resumable),)
    folder = RunFolder(tmp_path / "run", stages)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            folder.run(config, log=lambda _: None)
    assert seen == [False, True]  # the second run finds the first one's records
    other = with_overrides(config, {"generate.temperature": 1.0})
    with pytest.raises(RuntimeError):
        folder.run(other, log=lambda _: None)
    assert seen[-1] is False  # records made with other settings are never resumed
    assert len(list(folder.path.glob("out.jsonl.*.partial"))) == 1
