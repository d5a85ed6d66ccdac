"""Fine-tuning shared by every model of the method (M_yx, M0, M1, M2): supervised, loss on the output only.

An example is a prompt (chat messages) and a completion (the text the model must learn to write).
`encode` renders both with the chat template and masks every prompt token out of the loss, so the
model learns to answer, not to repeat instructions (paper section 2.3). Training runs on transformers'
`Trainer` with LoRA adapters (QLoRA on a 4-bit base) or all weights, and the paper's schedule: the
learning rate decays linearly from `learning_rate` to `final_learning_rate`, which is the learning rate
of the last step itself (1e-5 -> 9e-6 in the paper), with weight decay 0.1 and dropout 0.1.

Launched by accelerate with several processes, training is DDP (every process holds the model), or FSDP2 when
the launch config asks for it (full fine-tuning only: weights, gradients and optimizer state are sharded over
the processes, as the paper's 7B and 65B runs need). The code is the same; under FSDP the full weights are
gathered once at the end and the main process saves them, and checkpoints are the sharded ones accelerate writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft.helpers import disable_input_dtype_casting
from torch.optim.lr_scheduler import LambdaLR
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from humpback_nb.config import ConfigError, ModelConfig, TrainConfig
from humpback_nb.infra.chat import IGNORE_INDEX, Message, fit_text, pad_batch, prompt_ids, rendered_ids
from humpback_nb.infra.distributed import gather, processes, wait_for_everyone
from humpback_nb.infra.files import atomic_dir
from humpback_nb.infra.models import TRAIN_LOG, attach_lora, load_model, runtime
from humpback_nb.infra.progress import tqdm
from humpback_nb.method.prompts import backward_messages, forward_messages
from humpback_nb.method.schedule import linear_to_final, paper_schedule

# peft asks transformers a question transformers renamed; the answer is the same.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

STEPS_FILE = "humpback_steps.json"  # in a checkpoint: the steps logged before it
TRACKING_DIR = "tracking"  # in a model's folder: what the experiment trackers of train.report_to wrote there

# -- examples ------------------------------------------------------------------------------------
def encode(tokenizer, messages: list[Message], completion: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels of one example; labels are IGNORE_INDEX on every prompt token."""
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside a full conversation")
    prompt = rendered_ids(tokenizer, prompt_text)  # as prompt_ids reads it when generating
    answer_text = full_text[len(prompt_text):]
    if completion and answer_text.startswith(completion):
        # The completion is data: a special token's text inside it (a web page quoting "</s>") stays text, so that
        # the only end of turn the model learns is the one the template writes after it.
        answer = (tokenizer(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                  + tokenizer(answer_text[len(completion):], add_special_tokens=False)["input_ids"])
    else:  # a template that rewrites the text (strips it, say): read it as rendered
        answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    input_ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def backward_example(tokenizer, instruction: str, output: str, max_length: int) -> dict[str, list[int]]:
    """M_yx learns output -> instruction. A long output is cut so that the instruction still fits."""
    room = max_length - len(prompt_ids(tokenizer, backward_messages(""))) - max(16, max_length // 8)
    return encode(tokenizer, backward_messages(fit_text(tokenizer, output, room)), instruction, max_length)


def forward_example(tokenizer, instruction: str, output: str, tag: str,
                    max_length: int) -> dict[str, list[int]]:
    """M0, M1, M2 learn instruction -> output, with the system prompt of the example's tag."""
    return encode(tokenizer, forward_messages(instruction, tag), output, max_length)


def forward_examples(tokenizer, seed: list[dict[str, Any]], augmented: list[dict[str, Any]], max_length: int,
                     tags: bool = True) -> list[dict[str, list[int]]]:
    """Training examples of M0 / M1 / M2: seed pairs tagged S_a, augmented pairs tagged S_w (paper
    section 2.3); `tags=False` trains without system prompts (the paper's "no tags" ablation)."""
    seed_tag, web_tag = ("S_a", "S_w") if tags else ("none", "none")
    return ([forward_example(tokenizer, r["instruction"], r["output"], seed_tag, max_length) for r in seed]
            + [forward_example(tokenizer, r["instruction"], r["output"], web_tag, max_length) for r in augmented])


def mean_loss(engine, examples: list[dict[str, list[int]]], batch_size: int = 8) -> float:
    """Average loss per output token of the engine's model on encoded examples (prompt tokens do not count)."""
    losses = engine.losses(examples, batch_size)
    return sum(total for total, _ in losses) / max(1, sum(count for _, count in losses))


def example_losses(engine, examples: list[dict[str, list[int]]], batch_size: int = 8) -> list[tuple[float, int]]:
    """Each example's loss summed over its output tokens, and their number, in the examples' order (the engine's
    `losses`: the kit's forward pass, or vLLM's prompt log-probabilities)."""
    return engine.losses(examples, batch_size)


def output_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of the learned tokens, from the logits computed at `loss_mask(labels)` only; summed and
    divided by the number of learned tokens in the whole (accumulated) batch."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    logits = outputs.logits
    if logits.dim() != 2 or len(logits) != len(targets):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(targets)} learned tokens: the model must be "
                         "called with logits_to_keep=loss_mask(labels) (pad_batch), which needs transformers >= 5.21")
    total = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else len(targets)
    return total / count


def training_flops(model_config, examples: list[dict[str, list[int]]], lora_params: int = 0,
                   full: bool = False) -> int:
    """Model FLOPs of one training pass (forward and backward) over `examples`, padding not counted.

    The usual count (PaLM's appendix B): a token costs 2 FLOPs per weight forward and 4 backward, except
    that frozen weights need no weight gradient (2 + 2 with LoRA); LoRA's own weights cost 6 per weight;
    attention costs 12 x layers x width x length per token; the vocabulary head is computed only where a
    token is learned. `model_config` is the transformers config; `lora_params` counts LoRA's weights.
    """
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention_width = c.num_attention_heads * head_dim
    per_layer = (2 * c.hidden_size * attention_width + 2 * c.hidden_size * c.num_key_value_heads * head_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    per_weight = 6 if full else 4
    total = 0
    for e in examples:
        length = len(e["input_ids"])
        learned = sum(label != IGNORE_INDEX for label in e["labels"][1:])
        total += (per_weight * c.num_hidden_layers * per_layer + 6 * lora_params) * length
        total += 12 * c.num_hidden_layers * attention_width * length * length
        total += per_weight * c.vocab_size * c.hidden_size * learned
    return total


# -- the schedule --------------------------------------------------------------------------------
class _PaperScheduleTrainer(Trainer):
    def __init__(self, *args, train_config: TrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config = train_config
        self.tokens_seen = 0  # tokens of the examples trained on so far, padding not counted

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            factor = linear_to_final(num_training_steps, self.train_config.learning_rate,
                                     self.train_config.final_learning_rate)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_seen += int(inputs.pop("tokens"))
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        # Grouped by length in mega-batches of the whole (global) batch, not of one process's share: N processes
        # then train each step on the examples one process would, each taking every N-th micro-batch.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(self.train_config.batch_size, dataset=dataset)


def _collate(pad_token_id: int):
    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, pad_token_id)
        batch["tokens"] = torch.tensor(sum(len(f["input_ids"]) for f in features))
        return batch

    return collate


class _LossLog(TrainerCallback):
    """Keeps, for every optimizer step, the learning rate it used, the loss it reported, its wall time and
    the tokens it trained on (padding not counted)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.counted = 0  # the first `counted` steps hold every process's tokens already (read from a checkpoint)
        self.trainer: _PaperScheduleTrainer | None = None
        self._lr = None
        self._start = 0.0
        self._tokens = 0
        self._timing: dict[str, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        self._start = time.perf_counter()
        self._tokens = self.trainer.tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self._timing = {"seconds": round(time.perf_counter() - self._start, 4),
                        "tokens": self.trainer.tokens_seen - self._tokens}

    def all_steps(self) -> list[dict[str, float]]:
        """The steps so far, each with the tokens of every process (each trained on its share of a step's tokens).
        Under a launch, every process calls this at the same point."""
        own = self.steps[self.counted:]
        shares = gather([step["tokens"] for step in own])
        return self.steps[:self.counted] + [dict(step, tokens=sum(share[i] for share in shares))
                                            for i, step in enumerate(own)]

    def on_save(self, args, state, control, **kwargs):
        # Every process writes its own part of a checkpoint (its random generators; under FSDP its shards of the
        # weights and optimizer state): the steps file, which marks the checkpoint complete, comes after all of them.
        steps = self.all_steps()
        wait_for_everyone()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / STEPS_FILE).write_text(json.dumps(steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append({"step": state.global_step, "loss": float(logs["loss"]), "lr": self._lr,
                               **self._timing})


class _StepBar(TrainerCallback):
    """One progress bar over the optimizer steps, with the latest loss beside it, on the main process only: the
    Trainer's own callbacks would print every step's logs as a dict (the numbers are kept in train_log.json)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- experiment tracking -------------------------------------------------------------------------
# The trackers whose availability check in transformers is not named is_<tracker>_available
_AVAILABILITY = {"azure_ml": "azureml", "comet_ml": "comet", "flyte": "flytekit"}


def check_trackers(report_to: list[str]) -> None:
    """Refuse, in one line naming train.report_to, a tracker transformers does not know or whose package is
    missing, before any model is loaded."""
    from transformers.integrations import integration_utils

    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in report_to:
        if name not in known:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; transformers reports to: "
                              f"{', '.join(sorted(known))}")
        available = getattr(integration_utils, f"is_{_AVAILABILITY.get(name, name)}_available", None)
        if available is not None and not available():
            raise ConfigError(f"train.report_to: {name!r} needs its package, which is not installed "
                              f"(pip install {name.replace('_', '-')}), or remove it from train.report_to")


def _track_into(trainer: Trainer, folder: Path) -> None:
    """Point the trackers that write files (TensorBoard) at `folder`; it moves into the model's folder at the end."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(folder)


# -- training ------------------------------------------------------------------------------------
def training_plan(n_examples: int, train: TrainConfig) -> TrainConfig:
    """`train` with batch size and steps filled in by the paper's rule where the config leaves them open."""
    batch, steps = paper_schedule(n_examples)
    return replace(train, batch_size=train.batch_size or batch, max_steps=train.max_steps or steps)


def model_for_training(base: ModelConfig, plan: TrainConfig):
    """(model, tokenizer) as training starts: LoRA adapters with dropout `plan.dropout` on the base (QLoRA on a 4-bit
    base), or for full fine-tuning every weight trainable and the model built with attention dropout `plan.dropout`
    (LLaMA's one dropout: the paper's 0.1 goes there)."""
    if plan.method == "lora":
        model, tokenizer = load_model(base)
        set_seed(plan.random_seed)  # LoRA's initial weights come from the random generator: same seed, same start
        return attach_lora(model, plan), tokenizer
    model, tokenizer = load_model(base, attention_dropout=plan.dropout)
    set_seed(plan.random_seed)
    return model.requires_grad_(True), tokenizer


def train_model(examples: list[dict[str, list[int]]], base: ModelConfig, train: TrainConfig, out_dir: str | Path,
                log=print, checkpoints: str | Path | None = None, desc: str | None = None) -> dict[str, Any]:
    """Fine-tune the base model `base` on encoded examples with `train`; save it (adapter or full) to `out_dir`.

    Returns the training log (also saved as train_log.json beside the weights): the loss and learning
    rate of every step, the plan, and the time it took. With `checkpoints`, a folder, the state of training
    (adapter, optimizer, schedule, random generators, position in the data) is saved there every
    `train.save_steps` steps, and a run that finds a checkpoint there goes on from it to the same result.
    Training shows one progress bar (`desc`, by default the model's folder name) and then one line saying what
    it did; the experiment trackers of `train.report_to` (TensorBoard) write into the model's folder.
    """
    from datasets import Dataset

    from humpback_nb.infra.guard import refuse_compute

    refuse_compute(f"training {Path(out_dir).name}")
    if not examples:
        raise ValueError("no training examples")
    plan = training_plan(len(examples), train)
    if plan.method == "full" and base.quantization == "4bit":
        raise ValueError("full fine-tuning needs model.quantization: none (4-bit weights cannot be trained)")
    check_launch(plan.method)
    check_trackers(plan.report_to)
    model, tokenizer = model_for_training(base, plan)
    where = runtime(base.device, base.dtype)
    world = processes().world  # under a launch of N processes (DDP or FSDP), each accumulates 1/N of the batch
    micro = min(plan.micro_batch_size, plan.batch_size // world)
    if micro < 1 or plan.batch_size % (micro * world):
        raise ValueError(f"train.batch_size {plan.batch_size} is not a multiple of train.micro_batch_size {micro} "
                         f"x {world} process(es)")
    saving = checkpoints is not None and plan.save_steps > 0
    args = TrainingArguments(
        output_dir=str(checkpoints) if saving else str(Path(out_dir).parent / f".trainer-{Path(out_dir).name}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=plan.batch_size // (micro * world),
        max_steps=plan.max_steps,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="steps" if saving else "no",
        save_steps=max(1, plan.save_steps),
        save_total_limit=1,
        report_to=list(plan.report_to),
        seed=plan.random_seed,
        data_seed=plan.random_seed,
        bf16=where.dtype == torch.bfloat16,
        fp16=where.dtype == torch.float16,
        use_cpu=where.device == "cpu",
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # the Trainer's bar would print each step's logs: _StepBar shows them instead
    )
    losses = _LossLog()
    trainer = _PaperScheduleTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(examples),
        data_collator=_collate(tokenizer.pad_token_id), compute_loss_func=output_loss,
        callbacks=[losses, _StepBar(desc or f"training {Path(out_dir).name}")], train_config=plan,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every step's logs as a dict
    tracking = Path(args.output_dir) / TRACKING_DIR
    _track_into(trainer, tracking)
    losses.trainer = trainer
    if _env_flag("ACCELERATE_USE_FSDP") and not trainer.is_fsdp_enabled:
        log("accelerate runs FSDP on GPUs only: this launch trains under DDP, every process holding the whole model")
    # Under mixed precision, LoRA's matrices multiply in the compute dtype (autocast casts them once per step);
    # peft would otherwise cast every activation to float32 first, as its 4-bit layers already do not.
    mixed = args.bf16 or args.fp16
    started = time.time()
    resume = _last_checkpoint(checkpoints) if saving else None
    if resume is not None:
        losses.steps = json.loads((resume / STEPS_FILE).read_text())
        losses.counted = len(losses.steps)
        log(f"resuming training from {resume.name}")
    with disable_input_dtype_casting(model, active=mixed and plan.method == "lora"):
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.time() - started
    # Under FSDP every process holds a shard of each weight: all take part in gathering the full weights, which
    # only the main process receives (the others get an empty dict).
    full_weights = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    model.eval()
    losses.steps = losses.all_steps()
    train_log = {
        "examples": len(examples),
        "batch_size": plan.batch_size,
        "max_steps": plan.max_steps,
        "method": plan.method,
        "quantization": base.quantization,
        "learning_rate": plan.learning_rate,
        "final_learning_rate": plan.final_learning_rate,
        "seconds": round(seconds, 2),
        "processes": world,
        "parallel": "fsdp2" if trainer.is_fsdp_enabled else "ddp" if world > 1 else "none",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_step": plan.batch_size * sum(len(e["input_ids"]) for e in examples) / len(examples),
        "tokens": sum(step.get("tokens", 0) for step in losses.steps),
        "steps": losses.steps,
    }
    if processes().is_main:
        with atomic_dir(out_dir) as tmp:
            save_weights(model, tmp, full_weights, where.dtype, base_name=base.name)
            if tracking.is_dir():
                shutil.move(tracking, tmp / TRACKING_DIR)
            if plan.method == "full":
                tokenizer.save_pretrained(tmp)
            (tmp / TRAIN_LOG).write_text(json.dumps(train_log, indent=2) + "\n")
    wait_for_everyone()  # in a launch, the main process has saved the model before anyone reads it
    if processes().is_main:
        log(f"trained {plan.method} ({base.quantization}) on {len(examples)} examples: {plan.max_steps} steps "
            f"of {plan.batch_size} in {seconds:.0f}s, loss {losses.steps[0]['loss']:.3f} -> "
            f"{losses.steps[-1]['loss']:.3f}")
    return train_log


def check_launch(method: str) -> None:
    """Refuse, in one line, a launch the kit cannot train under: DeepSpeed, FSDP but version 2, LoRA under FSDP."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("training under DeepSpeed is not supported by this kit: launch with --multi_gpu (DDP) for "
                         "LoRA, or with an FSDP config (presets/accelerate/fsdp-8gpu.yaml) for train.method: full")
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return
    if method != "full":
        raise ValueError("LoRA under FSDP is not supported: launch with --multi_gpu (DDP; a 4-bit 7B model and its "
                         "LoRA fit on every GPU); FSDP is for train.method: full")
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("the kit trains under FSDP version 2 only: set fsdp_version: 2 in the accelerate config")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def save_weights(model, folder: Path, full_weights: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                 base_name: str | None = None) -> None:
    """Save the trained model (adapter or full) as safetensors into `folder`; `full_weights` are the weights
    gathered from FSDP's shards, saved in the model's dtype (FSDP trains in float32 master weights). An adapter
    names its base model `base_name` (model.name as configured: an embedded name, a hub id or the user's folder),
    not the cache folder it was loaded from, so that its adapter_config.json means the same on another machine."""
    if full_weights is None:
        model.save_pretrained(folder, safe_serialization=True)
        adapter = folder / "adapter_config.json"
        if base_name is not None and adapter.is_file():  # after saving: peft reads the base's files from where it was
            settings = json.loads(adapter.read_text(encoding="utf-8"))
            adapter.write_text(json.dumps(settings | {"base_model_name_or_path": base_name}, indent=2) + "\n",
                               encoding="utf-8")
        return
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_weights.items()}
    model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
    model.config.dtype = dtype  # save_pretrained wrote the dtype of the float32 master weights
    model.config.save_pretrained(folder)


def _last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder` (one killed while saving lacks its steps file)."""
    found = [p for p in Path(folder).glob("checkpoint-*") if (p / STEPS_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


# -- the model card -------------------------------------------------------------------------------
def model_card(name: str, role: str, base: ModelConfig, train: TrainConfig, train_log: dict[str, Any], data: str,
               run_dir: str | Path, forward: bool = True) -> str:
    """README.md of a trained model: what it is, its base model, the data and settings it was trained with, and
    how to load it (with peft, or merged by `humpback export`). `forward`: a model that answers instructions (the
    backward model writes them)."""
    from humpback_nb.method.prompts import TAGS

    adapter = train_log["method"] == "lora"
    hub_id = base.name.count("/") == 1 and not Path(base.name).expanduser().exists()
    steps = train_log["steps"]
    header = ["---", "library_name: " + ("peft" if adapter else "transformers"), "pipeline_tag: text-generation",
              "tags: [humpback, instruction-backtranslation" + (", lora" if adapter else "") + "]"]
    header += [f"base_model: {base.name}"] if hub_id else []
    settings = {"method": train_log["method"] + (" (QLoRA: LoRA on the 4-bit base)" if adapter and
                                                 train_log["quantization"] == "4bit" else ""),
                **({"LoRA": f"r {train.lora_r}, alpha {train.lora_alpha}, dropout {train.dropout:g}, "
                            f"on {train.lora_target}"} if adapter else {"dropout": f"{train.dropout:g}"}),
                "learning rate": f"{train_log['learning_rate']:g} -> {train_log['final_learning_rate']:g}, linear",
                "weight decay": f"{train.weight_decay:g}", "max sequence length": train.max_seq_length,
                "tags": "S_a on seed pairs, S_w on augmented ones" if train.tags else "none (no system prompts)",
                "random seed": train.random_seed,
                "batch size": train_log["batch_size"], "steps": train_log["max_steps"],
                "examples": train_log["examples"], "trainable parameters": f"{train_log['trainable_parameters']:,}",
                "loss": f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}" if steps else "n/a",
                "time": f"{train_log['seconds']:.0f}s on {train_log['processes']} process(es)"}
    use = (["With peft (the base model, then the adapter in this folder; the tokenizer with the chat template the kit "
            "trained with):", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
            "from humpback_nb.infra.models import load_tokenizer, resolve", "",
            f"base = AutoModelForCausalLM.from_pretrained(resolve(\"{base.name}\"))",
            f"model = PeftModel.from_pretrained(base, \"{Path(run_dir) / 'models' / name}\")",
            f"tokenizer = load_tokenizer(\"{base.name}\")", "```", ""]
           if adapter else [])
    return "\n".join([
        *header, "---", "", f"# {name}", "",
        f"{role} Trained by humpback-nb, a notebook kit for Humpback (Li et al. 2023, \"Self-Alignment with "
        "Instruction Backtranslation\", arXiv 2308.06259), " + ("as a LoRA adapter on" if adapter else "from") +
        f" the base model `{base.name}`.", "",
        "## Data", "", f"{data[:1].upper()}{data[1:]}; {train_log['examples']} examples, the loss on the output tokens "
        "only.", "",
        "## Training", "", "| setting | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in settings.items()], "",
        "Every step's loss and learning rate are in train_log.json beside the weights.", "",
        "## Use", "",
        *([f"Prompt: a system prompt, then the instruction. The paper answers with both tags, S_a + S_w: "
           f"\"{TAGS['S_a+S_w']}\" (the kit's evaluation: evaluate.inference_tags).", ""] if forward else []),
        *use,
        "As one merged model that plain transformers loads (the chat template the kit trained with included):", "",
        "```", f"humpback export --run-dir {run_dir} --model {name} --to {name}-merged", "```", "",
        f"or answer in a terminal: `humpback chat --run-dir {run_dir} --model {name}`.", ""])
