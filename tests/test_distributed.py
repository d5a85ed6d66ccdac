"""The same stages on two processes (gloo on a CPU, launched by accelerate) write the records one process
writes, resume a killed launch with any number of processes, and train under DDP as one process does."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from humpback_nb.infra.distributed import Processes, gather, processes, shared_map
from humpback_nb.infra.models import ADAPTER_FILE
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

# float32: bitwise equality across processes (README, "When things go wrong"); small batches: several per process
# (12 segments: 6 batches of self-augmentation, 3 for each of two processes)
SETTINGS = ["model.dtype=float32", "data.num_segments=12", "generate.batch_size=2", "curate.batch_size=2",
            "curate.compare_size=0"]  # the raters side by side: not what this test is about
RECORDS = (lambda files: files.path("candidates"), lambda files: files.path("candidates_dropped"),
           lambda files: files.path("scores", "m0"))
# Every process computes with one thread, as a launcher sets it: float sums split across another number of threads
# round differently in the last bits.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def humpback(folder: Path, until: str, processes: int = 1) -> list[str]:
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    command = ["-m", "humpback_nb.cli", "run", "--preset", "tiny", "--run-dir", str(folder), "--until", until, *sets]
    if processes == 1:
        return [sys.executable, *command]
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *command]


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def cleared(source: Path, target: Path) -> Path:
    """A copy of a finished run whose generation stages (self-augmentation and rating) are to be done again."""
    shutil.copytree(source, target)
    run([sys.executable, "-m", "humpback_nb.cli", "clear", "--run-dir", str(target), "candidates"])
    files = RunFiles(target)
    assert not files.path("candidates").exists() and files.path("model", "m0").is_dir()
    return target


def same_records(a: Path, b: Path) -> None:
    for record_file in RECORDS:
        ours, theirs = record_file(RunFiles(a)), record_file(RunFiles(b))
        assert ours.read_bytes() == theirs.read_bytes(), ours.name


def part_files(folder: Path) -> list[Path]:
    files = RunFiles(folder)
    return [p for p in files.partials(files.path("candidates")) if ".rank" in p.name]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, embedded_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("one-process")
    run(humpback(folder, "rate_m0"))
    return folder


def test_without_a_launcher_there_is_one_process():
    assert processes() == Processes(rank=0, world=1) and processes().is_main
    assert gather([1, 2]) == [[1, 2]]
    assert shared_map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert [Processes(rank=1, world=3).owns(b) for b in range(6)] == [False, True, False, False, True, False]


def test_a_killed_launch_ends_with_the_records_of_one_process(one_process, tmp_path):
    folder = cleared(one_process, tmp_path / "killed")
    import psutil

    launch = subprocess.Popen(humpback(folder, "rate_m0", processes=2), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 600
    try:  # kill every process of the launch once a process has written a batch to its part file
        while not any(p.read_bytes().count(b"\n") for p in part_files(folder)):
            assert launch.poll() is None and time.time() < deadline, "the launch ended before it could be killed"
            time.sleep(0.05)
    finally:
        launcher = psutil.Process(launch.pid)
        family = [launcher, *launcher.children(recursive=True)]  # the launcher starts its workers in new sessions
        for process in family:
            process.kill()
        launch.wait()
        psutil.wait_procs(family, timeout=30)
    parts = part_files(folder)
    assert parts and not RunFiles(folder).path("candidates").exists()
    saved = {part.name: part.read_bytes() for part in parts}
    run(humpback(folder, "rate_m0", processes=2))  # each process redoes only the batches missing in all parts
    same_records(one_process, folder)
    assert not list(folder.rglob("*.partial"))  # part files are merged and removed

    cleared(folder, tmp_path / "again")  # and a launch's parts can be finished by one process
    for name, lines in saved.items():
        (tmp_path / "again" / name).write_bytes(lines)
    run(humpback(tmp_path / "again", "rate_m0"))
    same_records(one_process, tmp_path / "again")


def test_training_under_ddp_takes_the_steps_one_process_takes(one_process, tmp_path):
    from safetensors.torch import load_file

    run(humpback(tmp_path, "backward", processes=2))
    ours, theirs = (RunFiles(f).train_log("backward") for f in (tmp_path, one_process))
    assert ours["processes"] == 2 and theirs["processes"] == 1
    assert [s["tokens"] for s in ours["steps"]] == [s["tokens"] for s in theirs["steps"]]  # the same examples
    assert [s["loss"] for s in ours["steps"]] == pytest.approx([s["loss"] for s in theirs["steps"]], abs=1e-4)
    a, b = (load_file(RunFiles(f).path("model", "backward") / ADAPTER_FILE) for f in (tmp_path, one_process))
    # Adam moves every weight by about the learning rate whatever the gradient's size, so a gradient that
    # differs in its last bits (summed in another order) can move a weight the other way: 2 x lr per step at most
    bound = 2 * theirs["learning_rate"] * len(theirs["steps"])
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= bound


def test_the_shipped_launch_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    import humpback_nb

    config = load_config_from_file(str(Path(humpback_nb.__file__).parent / "presets/accelerate/ddp-8gpu.yaml"))
    assert str(config.distributed_type).endswith("MULTI_GPU") and config.num_processes == 8 and not config.use_cpu


def test_sharded_training_is_refused_with_a_clear_message(monkeypatch, tmp_path):
    from humpback_nb.config import load_preset
    from humpback_nb.method.train import train_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP is not supported"):
        config = load_preset("tiny")
        train_model([{"input_ids": [1, 2], "labels": [-100, 2]}], config.model, config.train, tmp_path / "m")
