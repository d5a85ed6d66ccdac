"""A run folder notices damage: a stage whose outputs changed after it wrote them is not done, and runs again."""

import os
import shutil

import pytest
import yaml

from humpback_nb.cli import main
from humpback_nb.config import load_preset
from humpback_nb.infra.files import write_jsonl
from humpback_nb.pipeline import open_run
from humpback_nb.run import RunFolder, Stage

CALLS: list[str] = []
SALT = {"total": 0}  # what the next "total" adds: a stage that writes other outputs when it runs again


def make_numbers(run):
    CALLS.append("numbers")
    write_jsonl(run.files.path("seed"), ({"id": i, "value": i * i, "split": "train"} for i in range(40)))


def sum_numbers(run):
    CALLS.append("total")
    values = [r["value"] for r in run.files.seed_pairs("train")]
    write_jsonl(run.files.path("candidates"), [{"id": i, "total": sum(values[:i]) + SALT["total"]} for i in range(40)])


def train_model(run):
    CALLS.append("model")

    def train(folder, checkpoints):
        CALLS.append("train")
        (folder / "weights").mkdir(parents=True)
        (folder / "weights" / "adapter.bin").write_bytes(bytes(range(256)) * 8)
        (folder / "train_log.json").write_text('{"loss": [1.0, 0.5]}')

    run.trained("m0", {"steps": 2}, train)


def rate(run):
    CALLS.append("rate")
    totals = [r["total"] for r in run.files.candidates()]
    write_jsonl(run.files.path("scores", "m0"), [{"id": i, "score": t % 5} for i, t in enumerate(totals)])


STAGES = (
    Stage("numbers", ("seed",), (), ("data",), make_numbers, doc="numbers"),
    Stage("total", ("candidates",), ("numbers",), ("generate",), sum_numbers, doc="running totals"),
    Stage("model", ("model:m0",), ("numbers",), ("train",), train_model, doc="a model folder"),
    Stage("rate", ("scores:m0",), ("total", "model"), ("curate",), rate, doc="scores"),
)


@pytest.fixture
def config():
    return load_preset("tiny")


@pytest.fixture
def folder(tmp_path, config):
    CALLS.clear()
    SALT["total"] = 0
    folder = RunFolder(tmp_path / "run", STAGES)
    folder.run(config, log=lambda _: None)
    CALLS.clear()
    return folder


def states(folder):
    return {row["stage"]: row["state"] for row in folder.status()}


def row(folder, stage):
    return next(r for r in folder.status() if r["stage"] == stage)


def later(path, seconds=5):
    """Move a file's mtime on, as time passing would (a test edits faster than the clock's resolution)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def cli_status(folder, monkeypatch, capsys):
    monkeypatch.setattr("humpback_nb.cli.open_run", lambda path, config=None: RunFolder(path, STAGES))
    assert main(["status", "--run-dir", str(folder.path)]) == 0
    return capsys.readouterr().out


def test_a_finished_run_records_each_outputs_size_and_digest_and_is_done(folder):
    files = folder.manifest("total")["files"]
    size = folder.files.path("candidates").stat().st_size
    assert files["candidates.jsonl"]["size"] == size and len(files["candidates.jsonl"]["sha256"]) == 64
    assert set(folder.manifest("model")["files"]["models/m0"]["folder"]) == {"weights/adapter.bin", "train_log.json"}
    assert set(folder.manifest("rate")["read"]) == {"total", "model"}
    assert set(states(folder).values()) == {"done"}


def test_a_truncated_output_is_damaged_and_named_and_its_readers_are_stale(folder, monkeypatch, capsys):
    path = folder.files.path("candidates")
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    assert states(folder) == {"numbers": "done", "total": "damaged", "model": "done", "rate": "stale"}
    damaged = row(folder, "total")
    assert damaged["damaged"] == ["candidates.jsonl"]
    assert damaged["reason"] == "candidates.jsonl changed since the stage wrote it"
    assert row(folder, "rate")["reason"] == "reads total, which is damaged"
    out = cli_status(folder, monkeypatch, capsys)
    assert "damaged (candidates.jsonl changed since the stage wrote it)" in out
    assert "stale (reads total, which is damaged)" in out


def test_a_byte_edited_in_place_is_caught_by_its_digest(folder):
    path = folder.files.path("candidates")
    text = path.read_text()
    edited = text.replace('"total": 0', '"total": 9', 1)
    assert edited != text and len(edited) == len(text)
    path.write_text(edited)
    later(path)
    assert row(folder, "total")["damaged"] == ["candidates.jsonl"]


def test_a_touched_file_is_still_done_and_its_new_mtime_is_recorded_by_the_next_run(folder, config):
    path = folder.files.path("candidates")
    later(path)
    assert set(states(folder).values()) == {"done"}
    assert folder.run(config, log=lambda _: None) == dict.fromkeys(("numbers", "total", "model", "rate"), "skipped")
    assert folder.manifest("total")["files"]["candidates.jsonl"]["mtime_ns"] == path.stat().st_mtime_ns
    assert CALLS == []


def test_a_folder_output_missing_a_file_or_holding_an_extra_one_is_damaged(folder):
    model = folder.files.path("model", "m0")
    (model / "notes.txt").write_text("added by hand")
    (model / ".tmp-adapter.bin.x").write_text("left by an interrupted write: not an output")
    assert row(folder, "model")["damaged"] == ["models/m0/notes.txt"]
    (model / "notes.txt").unlink()
    assert states(folder)["model"] == "done"
    (model / "weights" / "adapter.bin").unlink()
    damaged = row(folder, "model")
    assert damaged["state"] == "damaged" and damaged["damaged"] == ["models/m0/weights/adapter.bin"]
    assert damaged["reason"] == "models/m0/weights/adapter.bin is missing"
    assert states(folder)["rate"] == "stale"


def test_run_makes_a_damaged_output_again_and_keeps_readers_whose_input_came_back_the_same(folder, config):
    path = folder.files.path("candidates")
    before = path.read_bytes()
    path.write_text("")
    assert folder.run(config, log=lambda _: None) == {"numbers": "skipped", "total": "ran", "model": "skipped",
                                                    "rate": "skipped"}
    assert path.read_bytes() == before and CALLS == ["total"]
    assert set(states(folder).values()) == {"done"}


def test_run_reruns_the_readers_when_the_damaged_stage_writes_other_outputs(folder, config):
    path = folder.files.path("candidates")
    path.write_text("")
    SALT["total"] = 1  # the stage is not deterministic: its rerun writes other totals
    assert folder.run(config, log=lambda _: None) == {"numbers": "skipped", "total": "ran", "model": "skipped",
                                                    "rate": "ran"}
    assert CALLS == ["total", "rate"]
    assert set(states(folder).values()) == {"done"}


def test_a_damaged_model_is_trained_again(folder, config):
    (folder.files.path("model", "m0") / "weights" / "adapter.bin").write_bytes(b"\0" * 10)
    results = folder.run(config, log=lambda _: None)
    assert results["model"] == "ran" and results["rate"] == "skipped"
    assert CALLS == ["model", "train"]  # not kept as "made with the same settings"
    assert set(states(folder).values()) == {"done"}


def test_a_stage_whose_input_was_rewritten_since_it_read_it_is_stale(folder, config):
    SALT["total"] = 2
    folder.run(config, redo=("total",), until="total", log=lambda _: None)
    check = row(folder, "rate")
    assert check["state"] == "stale" and check["reason"] == "total wrote other outputs since this stage read them"


def test_manifests_without_digests_are_trusted_as_before(folder):
    for stage in ("total", "rate"):
        manifest_file = folder.files.path("manifest", stage)
        manifest = yaml.safe_load(manifest_file.read_text())
        del manifest["files"], manifest["read"]
        manifest_file.write_text(yaml.safe_dump(manifest, sort_keys=False))
    folder.files.path("candidates").write_text("")
    assert set(states(folder).values()) == {"done"}


def test_the_stage_hashes_do_not_depend_on_the_outputs(folder, config):
    hashes = {name: folder.stage_hash(name, config) for name in folder.stages}
    folder.files.path("candidates").write_text("")
    assert {name: folder.stage_hash(name, config) for name in folder.stages} == hashes
    assert all(folder.manifest(name)["hash"] == hashes[name] for name in folder.stages)


@pytest.mark.slow
def test_status_names_a_cut_candidates_file_of_the_tiny_run(finished_tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished_tiny_run, copy, ignore=shutil.ignore_patterns("notebooks"))
    assert "damaged" not in {r["state"] for r in open_run(copy).status()}
    candidates = open_run(copy).files.path("candidates")
    candidates.write_text(candidates.read_text().splitlines(keepends=True)[0])
    assert main(["status", "--run-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "damaged (candidates.jsonl changed since the stage wrote it)" in out
    assert "stale (reads candidates, which is damaged)" in out
