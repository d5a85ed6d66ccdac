"""`humpback gpu-check` without CUDA: the same code on the CPU, the embedded model in base-model format, here at
the smallest scale that runs every stage it checks."""

import json

import pytest

from humpback_nb.cli import main
from humpback_nb.gpucheck import check_config
from humpback_nb.infra.files import read_jsonl
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

SMALLEST = ["data.seed_size=8", "data.num_segments=6", "train.max_steps=2", "train.batch_size=4",
            "generate.max_new_tokens=8", "generate.instruction_max_new_tokens=8", "curate.max_new_tokens=8",
            "evaluate.alpaca_eval_prompts=3"]


def test_without_cuda_it_checks_the_paper_preset_shrunk_on_the_base_format_model():
    config = check_config(cuda=False)
    assert config.model.name == "smollm2-135m-as-base" and config.curate.rater == "generate"  # the paper's rater
    assert config.generate.temperature == 0.7 and config.generate.top_p == 0.9
    gpu = check_config(cuda=True)
    assert gpu.model.name == "meta-llama/Llama-2-7b-hf" and gpu.model.quantization == "4bit"
    assert gpu.data.num_segments == 300 and gpu.train.max_steps == 40
    assert check_config("my/model", cuda=True).model.name == "my/model"


def test_gpu_check_runs_on_the_cpu_and_prints_a_verdict_per_check(tmp_path, capsys):
    sets = [arg for setting in SMALLEST for arg in ("--set", setting)]
    status = main(["gpu-check", "--run-dir", str(tmp_path), *sets])
    out = capsys.readouterr().out
    report = json.loads(RunFiles(tmp_path).path("gpu_check").read_text())
    assert status == (0 if report["passed"] else 1)
    assert report["format"].startswith("base-model format") and report["stop_tokens"] == ["<|endoftext|>"]
    verdicts = {c["check"]: c["verdict"] for c in report["checks"]}
    assert len(verdicts) == 7 and set(verdicts.values()) <= {"pass", "FAIL"}
    for check, verdict in verdicts.items():
        assert f"{verdict:<4}  {check}" in out
    # the numbers come from the run's own records
    scores = list(read_jsonl(RunFiles(tmp_path).path("scores", "m0")))
    parsed = sum(s["score"] is not None for s in scores) / len(scores)
    assert next(c["value"] for c in report["checks"] if c["check"].startswith("score parse")) == round(parsed, 3)
    assert report["scale"]["answers"] == 3 and report["scale"]["rater"] == "generate"
    assert all(value > 0 for value in report["throughput"].values())
    # what it measured is what `humpback plan --calibrate` prices with: every decoding stage's steps, and training
    timings = report["timings"]
    assert set(timings["decoding"]) == {"candidates", "rate_m0", "answers"}
    assert all(t["steps"] > 0 and t["seconds_per_step"] > 0 for t in timings["decoding"].values())
    assert "ms a step at" in out
    path = str(RunFiles(tmp_path).path("gpu_check"))
    model = ["--set", f"model.name={report['model']}", "--set", "model.quantization=none"]
    assert main(["plan", "--preset", "paper-7b", *model, "--calibrate", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calibrated_on"] == "cpu" and "calibrated by" in plan["assumptions"]["utilization"]
    candidates = next(s for s in plan["stages"] if s["stage"] == "candidates")
    batches = -(-candidates["examples"] // 32)  # paper-7b: generate.batch_size 32, 512 new tokens at most
    step = timings["decoding"]["candidates"]["seconds_per_step"]
    assert candidates["decode_seconds"] == pytest.approx(batches * 512 * step)
    # a gpu-check of another model does not price this one
    assert main(["plan", "--preset", "paper-7b", "--calibrate", path]) == 2
    assert "this plan's model is meta-llama/Llama-2-7b-hf" in capsys.readouterr().err
