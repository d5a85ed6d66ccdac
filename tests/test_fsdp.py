"""Full fine-tuning under FSDP2 (two processes, gloo on a CPU, launched by accelerate) takes the steps one process
takes, saves every weight as one checkpoint plain transformers loads, and resumes a killed launch from its sharded
checkpoint to the same result."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import humpback_nb
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

# A tiny LLaMA keeps each launch to seconds; float32 and one thread per process so that two runs differ only in how
# the processes split their sums. 12 steps with a checkpoint every 3 leave time to kill a launch after a checkpoint.
SETTINGS = ["train.method=full", "model.quantization=none", "model.dtype=float32", "train.dropout=0.0",
            "train.max_steps=12", "train.save_steps=3"]
# The shipped launch config (FSDP2, full sharding, sharded checkpoints), with 2 processes instead of 8
LAUNCH_CONFIG = Path(humpback_nb.__file__).parent / "presets/accelerate/fsdp-8gpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# accelerate turns FSDP on only when the launch is on GPUs: on a CPU it keeps the processes a MULTI_CPU (DDP) launch.
# FSDP2 itself (fully_shard, distributed checkpoints, gathering the full weights) runs on a CPU with gloo, so the
# launched processes start here: the launch is presented to accelerate as the multi-GPU launch it would be on GPUs,
# and then the kit's own command runs unchanged.
AS_ON_GPUS = """\
import runpy
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

setup = PartialState.__init__


def as_on_gpus(self, *args, **kwargs):
    setup(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


PartialState.__init__ = as_on_gpus
sys.argv = ["humpback", *sys.argv[1:]]
runpy.run_module("humpback_nb.cli", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_checkpoint) -> Path:
    """A randomly initialised two-layer LLaMA with the embedded model's tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def humpback(folder: Path, model: Path, fsdp: bool = False, settings: tuple[str, ...] = (),
             as_on_gpus: bool = True) -> list[str]:
    sets = [arg for setting in [*SETTINGS, f"model.name={model}", *settings] for arg in ("--set", setting)]
    command = ["run", "--preset", "tiny", "--run-dir", str(folder), "--until", "backward", *sets]
    if not fsdp:
        return [sys.executable, "-m", "humpback_nb.cli", *command]
    driver = folder.parent / f"{folder.name}-as-on-gpus.py"
    driver.write_text(AS_ON_GPUS)
    start = [str(driver)] if as_on_gpus else ["-m", "humpback_nb.cli"]
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(LAUNCH_CONFIG),
            "--num_processes", "2", "--main_process_port", str(port), *start, *command]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(RunFiles(folder).path("model", "backward") / "model.safetensors")


def same_training(ours: Path, theirs: Path) -> None:
    """Two runs took the same steps on the same tokens, to within what the order of float32 sums changes."""
    a, b = (RunFiles(f).train_log("backward") for f in (ours, theirs))
    assert [s["tokens"] for s in a["steps"]] == [s["tokens"] for s in b["steps"]]  # the same examples in each step
    # The two processes each sum half of a step's tokens and FSDP reduce-scatters the halves: float32 sums in another
    # order, ~1e-7 relative to a loss of ~10, a few 1e-6 apart after 12 steps (measured ~1e-6); a wrong batch, a
    # missed gradient or a step trained twice moves the loss by ~1e-2.
    assert [s["loss"] for s in a["steps"]] == pytest.approx([s["loss"] for s in b["steps"]], abs=1e-4)
    # Adam moves every weight by about the learning rate whatever the gradient's size, so a gradient that differs in
    # its last bits can move a weight the other way: 2 x lr per step at most.
    bound = 2 * b["learning_rate"] * len(b["steps"])
    wa, wb = weights(ours), weights(theirs)
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= bound


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("one-process") / "run"
    run(humpback(folder, tiny_llama))
    return folder


@pytest.fixture(scope="module")
def under_fsdp(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("fsdp") / "run"
    run(humpback(folder, tiny_llama, fsdp=True))
    return folder


def test_full_fine_tuning_under_fsdp_takes_the_steps_one_process_takes(one_process, under_fsdp):
    log = RunFiles(under_fsdp).train_log("backward")
    assert log["parallel"] == "fsdp2" and log["processes"] == 2 and log["method"] == "full"
    assert RunFiles(one_process).train_log("backward")["parallel"] == "none"
    same_training(under_fsdp, one_process)


def test_the_model_saved_under_fsdp_loads_with_plain_transformers_and_every_weight_trained(under_fsdp, tiny_llama):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = RunFiles(under_fsdp).path("model", "backward")
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    initial, trained = load_file(tiny_llama / "model.safetensors"), weights(under_fsdp)
    assert trained.keys() == initial.keys()
    assert all(trained[k].dtype == torch.float32 for k in trained)
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"not trained: {unchanged}"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert (folder / "tokenizer.json").is_file()


def test_under_mixed_precision_the_model_is_saved_in_its_own_dtype(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    # bf16 compute on float32 master weights (FSDP's mixed precision): the gathered weights are float32, and the
    # model is saved in model.dtype, as the model it started from
    run(humpback(tmp_path / "run", tiny_llama, fsdp=True,
                 settings=("model.dtype=bfloat16", "train.max_steps=2", "train.save_steps=0")))
    assert RunFiles(tmp_path / "run").train_log("backward")["parallel"] == "fsdp2"
    assert {w.dtype for w in weights(tmp_path / "run").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(RunFiles(tmp_path / "run").path("model", "backward"))
    assert model.dtype == torch.bfloat16


def test_a_killed_fsdp_launch_resumes_from_its_sharded_checkpoint(under_fsdp, tiny_llama, tmp_path):
    import psutil

    folder = tmp_path / "run"
    launch = subprocess.Popen(humpback(folder, tiny_llama, fsdp=True), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
    model_dir = RunFiles(folder).path("model", "backward")
    deadline = time.time() + 300
    try:  # kill every process of the launch once a complete checkpoint (one with its steps file) is there
        while not list(model_dir.parent.glob("backward.*.partial/checkpoint-*/humpback_steps.json")):
            assert launch.poll() is None and time.time() < deadline, "the launch ended before it could be killed"
            time.sleep(0.05)
    finally:
        launcher = psutil.Process(launch.pid)
        family = [launcher, *launcher.children(recursive=True)]  # the launcher starts its workers in new sessions
        for process in family:
            process.kill()
        launch.wait()
        psutil.wait_procs(family, timeout=30)
    assert not model_dir.exists()
    checkpoint = next(model_dir.parent.glob("backward.*.partial/checkpoint-*"))
    # sharded: a distributed checkpoint of the model and of the optimizer, and each process's random generators
    assert list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert list((checkpoint / "optimizer_0").glob("*.distcp"))
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    done = json.loads((checkpoint / "humpback_steps.json").read_text())

    output = run(humpback(folder, tiny_llama, fsdp=True))
    assert f"resuming training from {checkpoint.name}" in output and 0 < len(done) < 12
    assert [s["step"] for s in RunFiles(folder).train_log("backward")["steps"]] == list(range(1, 13))
    same_training(folder, under_fsdp)


def test_a_plain_cpu_launch_with_the_fsdp_config_says_that_it_trains_under_ddp(tiny_llama, tmp_path):
    # Why the launches above start as on GPUs; when accelerate shards on a CPU too, this fails and they need not.
    output = run(humpback(tmp_path / "run", tiny_llama, fsdp=True, as_on_gpus=False,
                          settings=("train.max_steps=1", "train.save_steps=0")))
    assert "accelerate runs FSDP on GPUs only: this launch trains under DDP" in output
    assert RunFiles(tmp_path / "run").train_log("backward")["parallel"] == "ddp"


def test_lora_under_fsdp_is_refused_with_one_clear_line(monkeypatch, tmp_path):
    from dataclasses import replace

    from humpback_nb.config import load_preset
    from humpback_nb.method.train import train_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    config = load_preset("tiny")
    with pytest.raises(ValueError, match="LoRA under FSDP is not supported: launch with --multi_gpu"):
        train_model([{"input_ids": [1, 2], "labels": [-100, 2]}], config.model, config.train, tmp_path / "m")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 2 only"):
        train_model([{"input_ids": [1, 2], "labels": [-100, 2]}], config.model,
                    replace(config.train, method="full"), tmp_path / "m")


def test_the_shipped_fsdp_launch_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH_CONFIG))
    assert str(config.distributed_type).endswith("FSDP") and config.num_processes == 8 and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert "--preset paper-7b-full" in LAUNCH_CONFIG.read_text().splitlines()[0]
