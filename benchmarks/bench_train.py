"""Training: tokens per second and model-FLOPs utilisation (MFU) of the kit's fine-tuning, its share of this
machine's bound.

The share of the bound is the model FLOPs of the real tokens trained on (`train.training_flops`, padding not
counted) per second, over the median bf16 matmul peak at the model's own shapes measured in the same `make bench`
run (MFU at the model's shapes); the usual MFU, against the peak at a large square shape, is given too. The
baseline is a plain float32 transformers Trainer with the same LoRA settings on the same examples: default padding
collator, logits and loss over every position, dropout as configured. Every figure is the median of --reps
trainings (the baseline, slow, of --naive-reps) with its spread, min-max; each training's first step pays for
warm-up and is not timed.

    python benchmarks/bench_train.py [--reps 3] [--steps 5] [--examples 96] [--naive-reps 1] [--bounds FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from _common import demo_inputs, emit, peak_rss_gib, run_facts, summary
from bounds import Bounds, ModelShape, bounds_for, training_bound, transformers_config

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
    parser.add_argument("--reps", type=int, default=3, help="trainings of the kit")
    parser.add_argument("--steps", type=int, default=5, help="steps of each training, the first not timed")
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--naive-reps", type=int, default=1, help="trainings of the plain fp32 Trainer (slow)")
    parser.add_argument("--bounds", help="bounds.json written by bounds.py moments before (else measured here)")
    parser.add_argument("--bound-reps", type=int, default=3, help="repetitions of the bounds measured here")
    args = parser.parse_args()

    config, seed, _ = demo_inputs()
    config = with_overrides(config, {"train.max_steps": args.steps})
    model_config = transformers_config(config.model)
    measured = bounds_for(ModelShape.from_config(model_config), args.bounds, args.bound_reps)
    bounds = Bounds.from_json(measured)
    tokenizer = load_tokenizer(config.model)
    examples = forward_examples(tokenizer, seed[: args.examples], [], config.train.max_seq_length)

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(args.reps):
            log = train_model(examples, config.model, config.train, f"{folder}/kit{rep}", log=lambda *_: None)
            timed = log["steps"][1:]  # the first step pays for warm-up
            runs.append((sum(s["seconds"] for s in timed), sum(s["tokens"] for s in timed), log))
        kit_rss = peak_rss_gib()
        baselines = [plain_fp32_trainer(config, examples, args.steps, f"{folder}/plain{rep}")
                     for rep in range(args.naive_reps)]
    log = runs[0][2]
    flops_per_token = (training_flops(model_config, examples, lora_params=log["trainable_parameters"])
                       / sum(len(e["input_ids"]) for e in examples))
    tokens_per_s = [tokens / seconds for seconds, tokens, _ in runs]
    share = summary([t * flops_per_token / bounds.peak for t in tokens_per_s])
    mfu = summary([t * flops_per_token / bounds.square_peak for t in tokens_per_s])
    bound = training_bound(flops_per_token, bounds)  # seconds per token
    kit = {"steps_timed": len(log["steps"]) - 1, "tokens_timed": runs[0][1],
           "seconds": summary([s for s, _, _ in runs]), "tokens_per_s": summary(tokens_per_s),
           "model_flops_per_token": round(flops_per_token),
           "model_tflops": summary([t * flops_per_token / 1e12 for t in tokens_per_s]), "mfu": mfu,
           "share_of_model_shape_peak": share,
           "micro_batch_size": config.train.micro_batch_size, "peak_rss_gib": kit_rss}
    baseline = {"steps_timed": baselines[0]["steps_timed"], "lora_params": baselines[0]["lora_params"],
                "seconds": summary([b["seconds"] for b in baselines]),
                "tokens_per_s": summary([b["tokens_per_s"] for b in baselines]),
                "mfu": summary([b["tokens_per_s"] * flops_per_token / bounds.square_peak for b in baselines])}
    ratio = round(kit["tokens_per_s"]["median"] / baseline["tokens_per_s"]["median"], 2)
    emit({
        "benchmark": "training",
        "model": f"{config.model.name} ({config.model.quantization}), LoRA r={config.train.lora_r}",
        "examples": len(examples),
        "batch_size": config.train.batch_size,
        "mean_tokens_per_example": round(sum(len(e["input_ids"]) for e in examples) / len(examples), 1),
        "bf16_matmul_peak_tflops": measured["bounds"]["square_peak_tflops"],
        "bf16_model_shape_peak_tflops": measured["bounds"]["model_peak_tflops"],
        "kit": kit,
        "bound": {"tokens_per_s": round(1 / bound["seconds"], 1),
                  "tokens_per_s_at_square_peak": round(1 / bound["seconds_at_square_peak"], 1)},
        "share_of_bound": share,
        "plain_fp32_trainer": baseline,
        "ratio_vs_plain_fp32": ratio,
        "summary": {"loop": "training (train_model, LoRA; share = MFU at the model's shapes)", "unit": "tokens/s",
                    "kit": kit["tokens_per_s"], "bound": round(1 / bound["seconds"], 1),
                    "bound_how": "model FLOPs per token (training_flops, no padding) at the model-shape bf16 peak",
                    "share_of_bound": share, "naive": baseline["tokens_per_s"],
                    "naive_name": "plain fp32 transformers Trainer, same LoRA", "ratio_vs_naive": ratio,
                    "note": f"MFU against the large-square bf16 peak: {mfu['median']:.1%}; the fp32 Trainer's: "
                            f"{baseline['mfu']['median']:.1%}."},
        **run_facts(args, measured, goals={"share_of_model_shape_peak": 0.40, "ratio_vs_plain_fp32": 3}),
    })


if __name__ == "__main__":
    main()
