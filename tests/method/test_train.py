import json

import pytest
import torch
from safetensors.torch import load_file

from humpback_nb.config import load_preset, with_overrides
from humpback_nb.infra.chat import prompt_ids
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_tokenizer, read_train_log
from humpback_nb.method.prompts import BACKWARD_PROMPT, S_A, S_W
from humpback_nb.method.schedule import linear_to_final, paper_schedule
from humpback_nb.method.train import (
    IGNORE_INDEX,
    backward_example,
    encode,
    example_losses,
    forward_examples,
    mean_loss,
    train_model,
)

PAIRS = [
    {"instruction": "Name a whale that sings.", "output": "The humpback whale is famous for its long songs."},
    {"instruction": "What do baleen whales eat?", "output": "Mostly krill and small fish, filtered from water."},
    {"instruction": "How long is a blue whale?", "output": "Adult blue whales reach about 25 to 30 metres in length."},
    {"instruction": "Where do humpbacks breed?", "output": "In warm tropical waters, such as around Hawaii and Tonga."},
]


@pytest.fixture(scope="module")
def tokenizer(embedded_checkpoint):
    return load_tokenizer("smollm2-135m")


def test_labels_mask_every_prompt_token_and_keep_every_output_token(tokenizer):
    messages = [{"role": "system", "content": S_A}, {"role": "user", "content": PAIRS[0]["instruction"]}]
    example = encode(tokenizer, messages, PAIRS[0]["output"], max_length=512)
    prompt = prompt_ids(tokenizer, messages)
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = example["labels"][len(prompt) :]
    assert answer == example["input_ids"][len(prompt) :] and IGNORE_INDEX not in answer
    assert tokenizer.decode(answer) == PAIRS[0]["output"] + tokenizer.eos_token + "\n"


def test_backward_examples_learn_the_instruction_from_the_output(tokenizer):
    example = backward_example(tokenizer, PAIRS[1]["instruction"], PAIRS[1]["output"], max_length=512)
    first = example["labels"].index(next(x for x in example["labels"] if x != IGNORE_INDEX))
    prompt = tokenizer.decode(example["input_ids"][:first])
    assert BACKWARD_PROMPT in prompt and PAIRS[1]["output"] in prompt
    assert tokenizer.decode(example["input_ids"][first:]).startswith(PAIRS[1]["instruction"])


def test_a_long_output_is_cut_so_that_the_instruction_still_fits(tokenizer):
    example = backward_example(tokenizer, "Describe the ocean.", "The ocean is vast. " * 400, max_length=128)
    assert len(example["input_ids"]) <= 128
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned).startswith("Describe the ocean.")


def test_seed_examples_carry_S_a_and_augmented_ones_S_w(tokenizer):
    examples = forward_examples(tokenizer, PAIRS[:2], PAIRS[2:], max_length=512)
    prompts = [tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"], strict=True)
                                 if label == IGNORE_INDEX]) for e in examples]
    assert all(S_A in p and S_W not in p for p in prompts[:2])
    assert all(S_W in p and S_A not in p for p in prompts[2:])
    untagged = forward_examples(tokenizer, PAIRS[:2], PAIRS[2:], max_length=512, tags=False)
    assert not any(S_A in tokenizer.decode(e["input_ids"]) or S_W in tokenizer.decode(e["input_ids"])
                   for e in untagged)


def test_learning_rate_decays_linearly_to_the_final_rate_itself():
    factor = linear_to_final(500, 1e-5, 9e-6)
    assert factor(0) == 1.0
    assert factor(499) * 1e-5 == pytest.approx(9e-6, rel=1e-12)
    assert factor(250) * 1e-5 == pytest.approx(1e-5 - 1e-6 * 250 / 499)
    assert factor(10_000) * 1e-5 == pytest.approx(9e-6)


@pytest.mark.parametrize("n, expected", [(100, (8, 30)), (1600, (8, 600)), (3200, (32, 500)), (51200, (32, 1600)),
                                         (10, (8, 30)), (200_000, (32, 1600))])
def test_paper_schedule(n, expected):
    assert paper_schedule(n) == expected


def test_paper_schedule_interpolates_between_the_papers_runs():
    batch, steps = paper_schedule(400)
    assert batch == 8 and 30 < steps < 300


@pytest.mark.slow
def test_qlora_lowers_the_training_loss_and_ends_at_the_final_learning_rate(tokenizer, tmp_path):
    config = with_overrides(load_preset("tiny"), {
        "model.quantization": "4bit", "model.dequantize_on_cpu": False,  # QLoRA through bitsandbytes itself
        "train.max_steps": 6, "train.batch_size": 4, "train.micro_batch_size": 4,
        "train.learning_rate": 1e-3, "train.final_learning_rate": 5e-4, "train.dropout": 0.0,
    })
    examples = forward_examples(tokenizer, PAIRS, [], max_length=128)
    from humpback_nb.infra.models import load_model

    base, _ = load_model(config.model)
    before = mean_loss(LocalEngine(base, tokenizer), examples)
    log = train_model(examples, config.model, config.train, tmp_path / "m", log=lambda _: None)
    from humpback_nb.infra.models import load_trained

    trained, _ = load_trained(config.model, tmp_path / "m")
    after = mean_loss(LocalEngine(trained, tokenizer), examples)
    assert after < before - 0.1
    assert [s["lr"] for s in log["steps"]][0] == pytest.approx(1e-3)
    assert log["steps"][-1]["lr"] == pytest.approx(5e-4)
    assert len(log["steps"]) == 6 and read_train_log(tmp_path / "m") == log
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    saved = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert log["trainable_parameters"] == sum(t.numel() for t in saved.values())
    assert torch.is_tensor(trained.get_input_embeddings().weight)


@pytest.mark.slow
def test_training_batches_need_no_attention_mask_and_count_model_flops(embedded_checkpoint):
    # Right padding + causal attention: the loss is the one computed with an explicit padding mask. And the
    # analytic FLOP count of the benchmarks equals what torch counts in a real forward and backward pass.
    from torch.utils.flop_counter import FlopCounterMode

    from humpback_nb.config import ModelConfig
    from humpback_nb.infra.models import load_model
    from humpback_nb.method.train import forward_example, output_loss, pad_batch, training_flops

    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    examples = [forward_example(tokenizer, "Name a colour.", "Blue, like the sky on a clear day.", "S_a", 64),
                forward_example(tokenizer, "What is two plus two?", "Four.", "S_a", 64)]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    labels = batch.pop("labels")
    assert "attention_mask" not in batch
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (labels.shape[1] - len(e["input_ids"])) for e in examples])
    with torch.inference_mode():
        plain = output_loss(model(**batch), labels)
        masked = output_loss(model(**batch, attention_mask=mask), labels)
    # two attention paths (the kit's without a mask, SDPA with one) in float32 agree to float32's rounding on a
    # loss of ~3, whatever the CPU; a wrong mask or position moves it by far more than 1e-4 of it
    assert torch.allclose(plain, masked, rtol=1e-4, atol=0)

    model = attach_lora_for_test(model)
    model.config._attn_implementation = "eager"  # attention as plain matmuls, which torch counts
    one = pad_batch(examples[:1], tokenizer.pad_token_id)
    one_labels = one.pop("labels")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with FlopCounterMode(display=False) as counter:
        output_loss(model(**one), one_labels).backward()
    expected = training_flops(model.config, examples[:1], lora_params=lora)
    assert abs(counter.get_total_flops() - expected) / expected < 0.02


def attach_lora_for_test(model):
    from humpback_nb.config import TrainConfig
    from humpback_nb.infra.models import attach_lora

    return attach_lora(model, TrainConfig(dropout=0.0))


@pytest.mark.slow
def test_training_shows_one_bar_and_one_line_and_keeps_every_step_in_its_log(tokenizer, tmp_path, capsys):
    config = with_overrides(load_preset("tiny"), {"train.max_steps": 2, "train.batch_size": 2,
                                                  "train.micro_batch_size": 2})
    examples = forward_examples(tokenizer, PAIRS, [], max_length=128)
    log = train_model(examples, config.model, config.train, tmp_path / "m", desc="training m")
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trained lora (none) on 4 examples: 2 steps of 2")
    assert "{'loss'" not in out + err and "train_runtime" not in out + err  # the Trainer's dicts are gone
    assert err.count("training m") >= 1 and "2/2" in err and "loss=" in err  # one bar, the loss beside it
    assert [s["step"] for s in log["steps"]] == [1, 2] and read_train_log(tmp_path / "m") == log
    # the adapter names its base model as configured, not the cache folder it loaded from
    adapter = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == config.model.name


def test_a_tracker_whose_package_is_missing_stops_before_any_model_loads(tmp_path):
    from transformers.integrations import is_tensorboard_available

    from humpback_nb.config import ConfigError
    from humpback_nb.method.train import check_trackers

    config = with_overrides(load_preset("tiny"), {"train.report_to": ["no_such_tracker"]})
    with pytest.raises(ConfigError, match=r"^train\.report_to: unknown tracker 'no_such_tracker'; .*tensorboard"):
        train_model([{"input_ids": [1, 2], "labels": [1, 2]}], config.model, config.train, tmp_path / "m")
    if is_tensorboard_available():
        check_trackers(["tensorboard"])  # installed: accepted
    else:
        with pytest.raises(ConfigError, match=r"^train\.report_to: 'tensorboard' needs its package"):
            check_trackers(["tensorboard"])
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_tensorboard_logs_go_in_the_models_folder(tokenizer, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is optional: train.report_to)")
    config = with_overrides(load_preset("tiny"), {"train.max_steps": 2, "train.batch_size": 2,
                                                  "train.micro_batch_size": 2, "train.report_to": ["tensorboard"]})
    train_model(forward_examples(tokenizer, PAIRS, [], max_length=128), config.model, config.train, tmp_path / "m")
    assert list((tmp_path / "m" / "tracking").rglob("events.out.tfevents.*"))


def test_a_models_hash_leaves_out_where_training_is_reported(finished_tiny_run):
    import yaml

    from humpback_nb.config import config_hash
    from humpback_nb.run import RunFiles

    manifest = yaml.safe_load(RunFiles(finished_tiny_run).path("model_manifest", "m2").read_text())
    assert "report_to" not in manifest["settings"]["train"] and "lora_r" in manifest["settings"]["train"]
    assert manifest["hash"] == config_hash({"model": "m2", "settings": manifest["settings"]})


@pytest.mark.slow
def test_mean_loss_is_the_loss_per_output_token_whatever_the_order_and_batches(tokenizer):
    from humpback_nb.config import ModelConfig
    from humpback_nb.infra.models import load_model

    model, _ = load_model(ModelConfig(dtype="float32"))
    examples = forward_examples(tokenizer, PAIRS + [{"instruction": "Hi", "output": "Hello."}], [], max_length=128)
    per_token, alone = [], []
    for e in examples:  # each example alone: its summed loss over its output tokens
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
        targets = torch.tensor(e["labels"][1:])
        losses = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                                   reduction="none")[targets != IGNORE_INDEX].tolist()
        per_token += losses
        alone.append((sum(losses), len(losses)))
    expected = sum(per_token) / len(per_token)
    assert mean_loss(LocalEngine(model, tokenizer), examples, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert mean_loss(LocalEngine(model, tokenizer), examples[::-1], batch_size=3) == pytest.approx(expected, rel=1e-4)
    # each example's own summed loss and token count, in the examples' order, read in batches (float32: the same
    # numbers up to the order of sums)
    batched = example_losses(LocalEngine(model, tokenizer), examples, batch_size=3)
    assert [n for _, n in batched] == [n for _, n in alone]
    assert [x for x, _ in batched] == pytest.approx([x for x, _ in alone], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_runs_with_the_configured_dropout(embedded_checkpoint, method):
    # The paper's dropout 0.1. Full fine-tuning: LLaMA's attention dropout, which each attention layer copies when
    # it is built, so it must be in the config before; LoRA: dropout on the adapters' input.
    from humpback_nb.config import ModelConfig, TrainConfig
    from humpback_nb.method.train import model_for_training

    model, tokenizer = model_for_training(ModelConfig(dtype="float32"), TrainConfig(method=method, dropout=0.1))
    if method == "full":
        layers = [m for m in model.modules() if hasattr(m, "attention_dropout")]
        assert len(layers) == model.config.num_hidden_layers and model.config.attention_dropout == 0.1
        assert all(layer.attention_dropout == 0.1 for layer in layers)
    else:
        dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
        assert dropouts and all(d.p == 0.1 for d in dropouts)
        with torch.no_grad():  # B starts at zero, which hides what reaches A: give the adapters some weight
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(std=0.1)
    batch = tokenizer(["Humpback whales sing long, complex songs in the winter."], return_tensors="pt")

    def forward(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(**batch).logits

    model.train()
    assert not torch.equal(forward(0), forward(1))  # other masks, other logits
    model.eval()
    assert torch.equal(forward(0), forward(1))  # no dropout when answering
