"""Training: tokens per second and model-FLOPs utilisation (MFU) of the kit's fine-tuning.

MFU is the model FLOPs of the real tokens trained on (`train.training_flops`, padding not counted) per
second, over the bf16 matmul peak measured on this machine at the start of the run. The baseline is a
plain float32 transformers Trainer with the same LoRA settings on the same examples: default padding
collator, logits and loss over every position, dropout as configured.

    python benchmarks/bench_train.py [--steps 8] [--examples 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch
from _common import demo_inputs, emit, machine, matmul_peak, peak_rss_gib

from humpback_nb.config import with_overrides
from humpback_nb.infra.models import attach_lora, load_model, load_tokenizer
from humpback_nb.method.train import IGNORE_INDEX, forward_examples, train_model, training_flops


def lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def plain_fp32_trainer(config, examples, steps: int, folder: str) -> dict:
    """What a first LoRA script does: float32 weights, Trainer defaults, padded batches of `batch_size`."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = load_model(replace(config.model, quantization="none", dtype="float32"))
    model = attach_lora(model, config.train)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = TrainingArguments(output_dir=folder, per_device_train_batch_size=config.train.batch_size,
                             max_steps=steps, learning_rate=config.train.learning_rate, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
                             dataloader_num_workers=0, seed=config.train.random_seed)
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=collator,
                      callbacks=[Clock()])
    trainer.train()
    # The sampler is seeded and shuffles; steps after the first are timed, at the mean example length.
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
    seconds = sum(times[1:])
    tokens = mean_tokens * config.train.batch_size * (len(times) - 1)
    return {"steps_timed": len(times) - 1, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "lora_params": lora_params(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples", type=int, default=96)
    args = parser.parse_args()

    peak = matmul_peak(torch.bfloat16)
    config, seed, _ = demo_inputs()
    config = with_overrides(config, {"train.max_steps": args.steps})
    tokenizer = load_tokenizer(config.model)
    examples = forward_examples(tokenizer, seed[: args.examples], [], config.train.max_seq_length)

    with tempfile.TemporaryDirectory() as folder:
        log = train_model(examples, config.model, config.train, f"{folder}/kit", log=lambda *_: None)
        kit_rss = peak_rss_gib()
        timed = log["steps"][1:]  # the first step pays for warm-up
        seconds = sum(s["seconds"] for s in timed)
        tokens = sum(s["tokens"] for s in timed)
        flops_per_token = (training_flops(_model_config(config), examples, lora_params=log["trainable_parameters"])
                           / sum(len(e["input_ids"]) for e in examples))
        kit = {"steps_timed": len(timed), "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
               "model_flops_per_token": round(flops_per_token), "model_tflops": round(tokens * flops_per_token
                                                                                      / seconds / 1e12, 3),
               "mfu": round(tokens * flops_per_token / seconds / peak, 4),
               "micro_batch_size": config.train.micro_batch_size, "peak_rss_gib": kit_rss}
        baseline = plain_fp32_trainer(config, examples, args.steps, f"{folder}/plain")
    emit({
        "benchmark": "training",
        "model": f"{config.model.name} ({config.model.quantization}), LoRA r={config.train.lora_r}",
        "examples": len(examples),
        "batch_size": config.train.batch_size,
        "mean_tokens_per_example": round(sum(len(e["input_ids"]) for e in examples) / len(examples), 1),
        "bf16_matmul_peak_tflops": round(peak / 1e12, 3),
        "kit": kit,
        "plain_fp32_trainer": baseline,
        "ratio_vs_plain_fp32": round(kit["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "goals": {"mfu": 0.40, "ratio_vs_plain_fp32": 3},
        "peak_rss_gib": peak_rss_gib(),
        "machine": machine(),
    })


def _model_config(config):
    from transformers import AutoConfig

    from humpback_nb.infra.models import resolve

    return AutoConfig.from_pretrained(resolve(config.model.name))


if __name__ == "__main__":
    main()
