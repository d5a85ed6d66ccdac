"""A run killed in the middle of its long stages (SIGKILL: no clean-up code runs) and started again ends
with the same files as a run that was never interrupted, and so two runs of one preset and seed write the
same records: every file of the resumed run is written by processes other than those of the reference run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from humpback_nb.infra.models import ADAPTER_FILE
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

STOP = "rate_m0"
# Small batches and several checkpoints, so that every long stage is caught half-way. float32: in bf16 on a
# CPU, torch's results differ in the last bits from one process to the next (README, "When things go wrong").
SETTINGS = ["model.dtype=float32", "train.max_steps=4", "train.save_steps=1", "generate.batch_size=2",
            "curate.batch_size=2", "data.num_segments=12",  # 6 batches of each generation: killed in the middle
            "curate.compare_size=0"]  # the raters side by side: not what this test is about


def command(folder: Path) -> list[str]:
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return [sys.executable, "-m", "humpback_nb.cli", "run", "--preset", "tiny", "--run-dir", str(folder),
            "--until", STOP, *sets]


def run_to_end(folder: Path) -> None:
    subprocess.run(command(folder), check=True, capture_output=True, text=True, timeout=900)


def kill_when(folder: Path, ready, timeout: float = 600) -> None:
    """Start the run and SIGKILL it as soon as `ready(folder)` holds."""
    process = subprocess.Popen(command(folder), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready(folder):
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline, "the run never reached the point to interrupt"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()


def partial_lines(output):
    """Ready when a `.partial` of the output `output(files)` has a whole batch in it."""
    def ready(folder: Path) -> bool:
        files = RunFiles(folder)
        return any(p.read_bytes().count(b"\n") >= 1 for p in files.partials(output(files)) if p.is_file())

    return ready


def checkpoint(model: str):
    def ready(folder: Path) -> bool:
        files = RunFiles(folder)
        return any(list(p.glob("checkpoint-*/humpback_steps.json")) for p in files.partials(files.path("model", model)))

    return ready


def records(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}


# Two processes computing the same float32 forward pass on this CPU agree to the last bits most of the time, not
# always: the logprob rater's probabilities of one resumed run differed from the reference's by up to 2.4e-5 (and its
# score, rounded to 4 decimals, by 1e-4) in 2 of 5 runs on a Xeon with AMX, at this commit and before it. Texts,
# ids, counts and every other field must be equal; a float within this of the reference's.
FLOAT_TOLERANCE = 2e-4


def assert_same_records(ours: Path, theirs: Path) -> None:
    """The same record files, the same records in the same order, equal but for floats within FLOAT_TOLERANCE."""
    mine, reference = records(ours), records(theirs)
    assert list(mine) == list(reference)
    for name in mine:
        rows = [json.loads(line) for line in mine[name].splitlines()]
        expected = [json.loads(line) for line in reference[name].splitlines()]
        assert len(rows) == len(expected), name
        for row, want in zip(rows, expected, strict=True):
            assert _close(row, want), (name, row, want)


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= FLOAT_TOLERANCE
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(folder)
    return folder


def test_killed_in_training_generation_and_rating_the_run_ends_as_if_never_stopped(uninterrupted, tmp_path):
    kill_when(tmp_path, checkpoint("backward"))  # training M_yx, after its first checkpoint
    kill_when(tmp_path, partial_lines(lambda files: files.path("candidates")))  # self-augmentation, after a batch
    partial = RunFiles(tmp_path).partials(RunFiles(tmp_path).path("candidates"))[0]
    with open(partial, "ab") as handle:  # and a batch cut off while it was being written
        handle.write(b'{"id": "seg-000')
    kill_when(tmp_path, partial_lines(lambda files: files.path("scores", "m0")))  # rating, after a batch
    run_to_end(tmp_path)

    # same preset, same seed, other processes: the same records in every file (floats to the last bits but rarely)
    assert_same_records(tmp_path, uninterrupted)
    assert len(records(tmp_path)) >= 5  # seed, segments, dropped segments, candidates, scores ...
    ours, theirs = (RunFiles(f).path("model", "backward") / ADAPTER_FILE for f in (tmp_path, uninterrupted))
    assert ours.read_bytes() == theirs.read_bytes()
    assert not list(tmp_path.rglob("*.partial"))  # nothing left behind
