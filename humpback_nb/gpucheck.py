"""`humpback gpu-check`: the paper's preset shrunk to minutes, on your GPU and base model, before a paid run.

It runs the method's own stages (seed, segments, M_yx, self-augmentation, M0, rating with the paper's rater)
on a few hundred segments and a few dozen training steps, then has M0 answer a few evaluation prompts, and
checks what breaks a real run first: that M_yx, the rater and M0 end their turns (EOS stop rates), that the
paper's rater writes a score the strict parser reads, that no template text leaks into what they write, and
that training lowers the loss. It also reports tokens/s per stage and peak memory. Each check has a verdict.
Its `timings` (seconds a decoding step at the preset's batch sizes, prompt tokens and training tokens a second)
are what `humpback plan --calibrate gpu_check.json` prices a run with in place of its assumptions.

Without CUDA the same code runs on the CPU with the embedded model dressed as a base model (no chat template,
its own EOS), at a smaller scale; its stop rates after so little training say little about a real model.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from humpback_nb.config import HumpbackConfig, load_preset, with_overrides
from humpback_nb.infra.files import atomic_write_json
from humpback_nb.run import RunFiles

# The paper's preset shrunk: enough segments and steps that a working setup shows working numbers.
GPU_SCALE = {
    "data.seed_source": "alpaca_en_demo",  # embedded: the check needs no hub access for data
    "data.corpus_sources": ["c4_demo", "wiki_demo", "enwiki_sample"],
    "data.seed_size": 240, "data.heldout_size": 20, "data.num_segments": 300,
    "train.batch_size": 8, "train.max_steps": 40, "train.save_steps": 0,
    "generate.max_new_tokens": 256, "generate.instruction_max_new_tokens": 128,
    # keep cut-off instructions: their share is a check of its own, and the rater is checked on every candidate
    "generate.drop_capped": False,
    "evaluate.alpaca_eval_prompts": 32, "evaluate.mt_bench_prompts": 8,
}
# Without CUDA: the embedded model as a base model, small enough for a few minutes on two cores.
CPU_SCALE = {
    **GPU_SCALE,
    "model.name": "smollm2-135m-as-base", "model.quantization": "none", "model.context_length": 1024,
    "data.seed_size": 64, "data.heldout_size": 4, "data.num_segments": 24,
    "train.max_steps": 24, "train.micro_batch_size": 4, "train.max_seq_length": 320, "train.dropout": 0.0,
    "train.lora_r": 8, "train.lora_alpha": 16,
    # a few dozen steps teach a 135M model little at a 7B model's rate
    "train.learning_rate": 1e-3, "train.final_learning_rate": 9e-4,
    "generate.max_new_tokens": 48, "generate.instruction_max_new_tokens": 32, "generate.batch_size": 24,
    "curate.max_new_tokens": 64, "curate.batch_size": 24,
    "evaluate.alpaca_eval_prompts": 8, "evaluate.mt_bench_prompts": 0,
}
STOP_RATE = 0.9  # share of turns that must end at the end-of-turn token rather than at the token limit
PARSE_RATE = 0.8  # the paper's follow-up (arXiv 2408.04614) reports 88% valid 1-5 scores
# Text that must never appear in what a model writes: the markers of the kit's base-model format and ChatML's.
TEMPLATE_TEXT = ("### System:", "### User:", "### Assistant:", "<|im_start|>", "<|im_end|>", "</s>")


@dataclass
class Check:
    """One check: what was measured, the bar it must reach, and the verdict."""

    name: str
    value: float | None
    bar: str
    passed: bool
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "value": self.value, "bar": self.bar,
                "verdict": "pass" if self.passed else "FAIL", "hint": "" if self.passed else self.hint}


def check_config(model: str | None = None, cuda: bool | None = None,
                 overrides: dict[str, Any] | None = None) -> HumpbackConfig:
    """The config the check runs: paper-7b shrunk (GPU) or the CPU scale, then `model`, then `overrides`."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    config = with_overrides(load_preset("paper-7b"), GPU_SCALE if cuda else CPU_SCALE)
    config = with_overrides(config, {**({"model.name": model} if model else {}), **(overrides or {})})
    config.preset = "gpu-check"
    return config


def gpu_check(run_dir: str | Path, config: HumpbackConfig, log=print, vllm: bool = False) -> dict[str, Any]:
    """Run the shrunk method in `run_dir` and return the report (also written to `run_dir`/gpu_check.json). With
    `vllm`, M0 answers the same prompts through vLLM's server too (`measure_vllm`: report["vllm"])."""
    import torch

    from humpback_nb.infra.chat import BASE_TEMPLATE, turn_end_ids
    from humpback_nb.infra.decode import timing
    from humpback_nb.infra.models import load_tokenizer, read_train_log
    from humpback_nb.method.curate import parse_rate
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.prompts import forward_messages
    from humpback_nb.pipeline import open_run
    from humpback_nb.stages import model_engine

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    folder = open_run(run_dir, config)
    folder.run(config, until="rate_m0", log=log)
    files = RunFiles(run_dir)
    tokenizer = load_tokenizer(config.model)

    candidates = files.manifest("candidates")["report"]
    scores = _jsonl(files.path("scores", "m0"))
    rating_seconds = files.manifest("rate_m0")["seconds"]
    rated_tokens = sum(len(tokenizer(s.get("reasoning", ""), add_special_tokens=False)["input_ids"])
                       for s in scores)

    log("M0 answers the evaluation prompts")
    model = model_engine(config, files, "m0")
    prompts = eval_prompts(config.evaluate)
    started = time.time()
    with timing() as answering:
        answers = model.generate([{"id": p["id"], "messages": forward_messages(
            p["instruction"], config.evaluate.inference_tags)} for p in prompts], config.generate,
            config.generate.max_new_tokens, desc="answers (M0)")
    answer_seconds = time.time() - started
    model.close()
    measured_vllm = measure_vllm(config, files, prompts, log) if vllm else None

    texts = ([c["instruction"] for c in _jsonl(files.path("candidates"))]
             + [s.get("reasoning", "") for s in scores] + [a["text"] for a in answers])
    leaked = sum(any(marker in text for marker in TEMPLATE_TEXT) for text in texts)
    logs = {name: read_train_log(files.path("model", name)) for name in ("backward", "m0")}
    generated = candidates["segments"]
    stop = {
        "self-augmentation (M_yx writes instructions)": 1 - candidates["unfinished"] / max(1, generated),
        "rating (M0, the paper's rater)": sum(bool(s.get("finished")) for s in scores) / max(1, len(scores)),
        "answers (M0)": sum(a["finished"] for a in answers) / max(1, len(answers)),
    }
    checks = [Check(f"EOS stop rate: {stage}", round(rate, 3), f">= {STOP_RATE}", rate >= STOP_RATE,
                    "turns run to the token limit: the format's end of turn is not learned or not a stop id "
                    "(train longer, or check the tokenizer's EOS and chat template)") for stage, rate in stop.items()]
    parsed = parse_rate(scores)
    checks.append(Check("score parse rate of the paper's rater", round(parsed, 3), f">= {PARSE_RATE}",
                        parsed >= PARSE_RATE, "the rater's last line is not 'Score: N' (see curate.parse_score)"))
    checks.append(Check("template text in generated text (share)", round(leaked / max(1, len(texts)), 3), "0",
                        leaked == 0, "the model writes the format's markers: the end of turn is not where it "
                        "stops"))
    for name, train_log in logs.items():
        losses = [step["loss"] for step in train_log["steps"]]
        third = max(1, len(losses) // 3)  # one step's loss is noisy: the mean of the first third against the last
        change = sum(losses[-third:]) / third - sum(losses[:third]) / third
        checks.append(Check(f"training lowers the loss ({name}; last third - first third)", round(change, 4), "< 0",
                            change < 0, "the loss did not fall: check the learning rate and the labels"))

    def per_second(tokens: float, seconds: float) -> float:
        return round(tokens / seconds, 1) if seconds else 0.0

    throughput = {
        "backward (training, tokens/s)": per_second(logs["backward"]["tokens"], logs["backward"]["seconds"]),
        "candidates (new tokens/s)": per_second(candidates["new_tokens"], candidates["seconds_this_run"]),
        "m0 (training, tokens/s)": per_second(logs["m0"]["tokens"], logs["m0"]["seconds"]),
        "rate_m0 (new tokens/s)": per_second(rated_tokens, rating_seconds),
        "answers (new tokens/s)": per_second(sum(a["new_tokens"] for a in answers), answer_seconds),
    }
    device = torch.cuda.get_device_name() if cuda else "cpu"
    decoding = {"candidates": files.manifest("candidates").get("decoding"),
                "rate_m0": files.manifest("rate_m0").get("decoding"),
                "answers": {k: round(v, 6) for k, v in answering.to_dict().items()}}
    timings = {  # what `humpback plan --calibrate` reads in place of its assumptions
        "device": device, "model": config.model.name, "quantization": config.model.quantization,
        "dtype": config.model.dtype,
        "batch_size": {"candidates": config.generate.batch_size, "rate_m0": config.curate.batch_size,
                       "answers": config.generate.batch_size},
        "decoding": {stage: timed for stage, timed in decoding.items() if timed},
        "training": {name: {"tokens": log["tokens"], "seconds": log["seconds"],
                            "tokens_per_second": per_second(log["tokens"], log["seconds"])}
                     for name, log in logs.items()},
    }
    if cuda:
        memory = {"peak GPU memory (GiB)": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "device": device}
    else:
        memory = {"peak CPU memory of this process (GiB)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                  / 2**20, 2), "device": "cpu"}
    report = {
        "model": config.model.name,
        "format": "base-model format (turns end with the EOS)" if tokenizer.chat_template == BASE_TEMPLATE
        else "the tokenizer's chat template",
        "stop_tokens": tokenizer.convert_ids_to_tokens(turn_end_ids(tokenizer)),
        **memory,
        "checks": [c.to_dict() for c in checks],
        "passed": all(c.passed for c in checks),
        "throughput": throughput,
        "timings": timings,
        "scale": {"segments": generated, "rated": len(scores), "answers": len(answers),
                  "train_steps": config.train.max_steps, "rater": config.curate.rater},
    }
    if measured_vllm is not None:
        report["vllm"] = measured_vllm | {"device": device}
        stop["answers (M0, vLLM)"] = measured_vllm["stop_rate"]
        report["checks"].append(Check("EOS stop rate: answers (M0, vLLM)", round(measured_vllm["stop_rate"], 3),
                                      f">= {STOP_RATE}", measured_vllm["stop_rate"] >= STOP_RATE,
                                      "vLLM's answers run to the token limit: the format's end of turn is not a stop "
                                      "id there").to_dict())
        report["passed"] = all(c["passed"] for c in report["checks"])
        throughput["answers on vLLM (new tokens/s)"] = measured_vllm["new_tokens_per_second"]
        throughput["prompts read on vLLM (tokens/s)"] = measured_vllm["prefill_tokens_per_second"]
    if not cuda:
        report["note"] = ("no CUDA: the embedded model dressed as a base model ran on the CPU after a few steps of "
                          "training; its stop and parse rates say little about a 7B model")
    atomic_write_json(files.path("gpu_check"), report)
    return report


def measure_vllm(config: HumpbackConfig, files: RunFiles, prompts: list[dict[str, Any]], log=print) -> dict[str, Any]:
    """M0's answers to `prompts` through vLLM's server (the kit's own, or engine.urls): new tokens a second, and the
    same prompts read for one next token each (prompt tokens a second), the server's start apart. What
    `humpback plan --engine vllm --calibrate` prices vLLM's decoding and prompt reading with."""
    from dataclasses import replace

    from humpback_nb.infra import serve
    from humpback_nb.infra.chat import prompt_ids
    from humpback_nb.method.prompts import forward_messages
    from humpback_nb.stages import model_engine

    log("M0 answers the evaluation prompts again, through vLLM's server")
    settings = replace(config, engine=replace(config.engine, kind="vllm"))
    started = time.time()
    remote = model_engine(settings, files, "m0")
    requests = [{"id": p["id"], "messages": forward_messages(p["instruction"], config.evaluate.inference_tags)}
                for p in prompts]
    remote.generate(requests[:1], config.generate, 4, progress=False)  # the first request warms the server up
    start_seconds, started = time.time() - started, time.time()
    try:
        answers = remote.generate(requests, config.generate, config.generate.max_new_tokens, desc="answers (M0, vLLM)")
        answer_seconds, started = time.time() - started, time.time()
        rows = [prompt_ids(remote.tokenizer, r["messages"]) for r in requests]
        remote.next_token_logprobs(rows, [0], batch_size=config.generate.batch_size)
        read_seconds = time.time() - started
    finally:
        serve.stop()
    new = sum(a["new_tokens"] for a in answers)
    return {"prompts": len(requests), "new_tokens": new, "seconds": round(answer_seconds, 2),
            "new_tokens_per_second": round(new / answer_seconds, 1) if answer_seconds else 0.0,
            "prefill_tokens_per_second": round(sum(map(len, rows)) / read_seconds, 1) if read_seconds else 0.0,
            "stop_rate": sum(a["finished"] for a in answers) / max(1, len(answers)),
            "server_start_seconds": round(start_seconds, 1)}


def format_report(report: dict[str, Any]) -> str:
    """The report as lines a person reads: one verdict per check."""
    lines = [f"model {report['model']} ({report['format']}; turns end at {', '.join(report['stop_tokens'])}) "
             f"on {report['device']}"]
    width = max(len(c["check"]) for c in report["checks"])
    for c in report["checks"]:
        lines.append(f"  {c['verdict']:<4}  {c['check']:<{width}}  {c['value']} (needs {c['bar']})"
                     + (f"\n        {c['hint']}" if c["hint"] else ""))
    lines += [f"  {name}: {value}" for name, value in report["throughput"].items()]
    for stage, timed in report.get("timings", {}).get("decoding", {}).items():
        lines.append(f"  {stage} decoding: {1000 * timed['seconds_per_step']:.1f} ms a step at "
                     f"{timed['rows_per_step']:.1f} rows ({timed['steps']} steps); prompts read at "
                     f"{timed['prefill_tokens_per_second']:.0f} tokens/s")
    lines += [f"  {k}: {v}" for k, v in report.items() if k.startswith("peak")]
    if "note" in report:
        lines.append(f"  note: {report['note']}")
    lines.append("all checks pass" if report["passed"] else "some checks FAIL: fix them before a paid run")
    return "\n".join(lines)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    from humpback_nb.infra.files import read_jsonl

    return list(read_jsonl(path))


def main(run_dir: str | Path, model: str | None = None, overrides: dict[str, Any] | None = None,
         engine: str = "local") -> int:
    """What `humpback gpu-check` does: run, print the verdicts; exit status 1 when a check fails. With engine "vllm",
    vLLM's server is measured beside the kit's loops."""
    report = gpu_check(run_dir, check_config(model, overrides=overrides), vllm=engine == "vllm")
    print(format_report(report))
    print(f"report: {RunFiles(run_dir).path('gpu_check')}", file=sys.stderr)
    return 0 if report["passed"] else 1
