"""A finished run's files read as they are by the tools of the field: alpaca_eval's metric on the judgments, peft's
adapter config and model card, and datasets + TRL's SFTTrainer on the seed and A_k rows."""

import json
import math

import pytest

from humpback_nb.infra.files import read_jsonl
from humpback_nb.method.prompts import S_A, S_W
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow


def test_alpaca_eval_metric_reads_the_judgments_as_they_are(finished_tiny_run):
    from alpaca_eval.metrics import get_winrate

    files = RunFiles(finished_tiny_run)
    kit = files.win_rates()["m2_vs_m0"]["overall"]
    judgments = read_jsonl(files.path("judgments", "m2_vs_m0"))
    assert all(j["preference"] == pytest.approx(1 + j["outcome"]) for j in judgments if j["outcome"] is not None)
    theirs = get_winrate(judgments)
    assert not math.isnan(theirs["win_rate"])
    assert theirs["win_rate"] == pytest.approx(kit["win_rate"], abs=0.01)


def test_adapters_name_a_portable_base_model_and_carry_a_filled_card(finished_tiny_run):
    from humpback_nb.config import load_config
    from humpback_nb.infra.models import load_trained

    files = RunFiles(finished_tiny_run)
    config = load_config(files.path("config"))
    folder = files.path("model", "m2")
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == config.model.name == "smollm2-135m-as-base"
    card = (folder / "README.md").read_text()
    train = config.train
    for expected in ("# m2", "M2 (Humpback)", "smollm2-135m-as-base", "arXiv 2308.06259", "Instruction Backtranslation",
                     f"| steps | {train.max_steps} |", f"r {train.lora_r}, alpha {train.lora_alpha}",
                     f"The {len(files.seed_pairs('train'))} seed pairs (tag S_a)",
                     f"the {len(files.curated(2).records)} pairs of A(2)_k", "PeftModel.from_pretrained",
                     f"humpback export --run-dir {finished_tiny_run} --model m2"):
        assert expected in card, expected
    assert "More Information Needed" not in card  # peft's empty template is gone
    model, _ = load_trained(config.model, folder, merge=False)  # the kit still loads it
    assert type(model).__name__.startswith("Peft")


def test_seed_and_A_k_rows_load_together_and_train_with_trl_without_a_map(finished_tiny_run, embedded_checkpoint,
                                                                          tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    files = RunFiles(finished_tiny_run)
    seed_rows, a1_rows = read_jsonl(files.path("seed")), read_jsonl(files.path("curated", 1))
    assert set(seed_rows[0]) == set(a1_rows[0])
    assert seed_rows[0]["prompt"] == [{"role": "system", "content": S_A},
                                      {"role": "user", "content": seed_rows[0]["instruction"]}]
    assert a1_rows[0]["prompt"][0] == {"role": "system", "content": S_W}
    assert a1_rows[0]["completion"] == [{"role": "assistant", "content": a1_rows[0]["output"]}]

    data = load_dataset("json", data_files=[str(files.path("seed")), str(files.path("curated", 1))], split="train",
                        cache_dir=str(tmp_path / "cache"))
    assert len(data) == len(seed_rows) + len(a1_rows)
    assert data[len(seed_rows)]["tag"] == "S_w" and data[0]["split"] in ("train", "heldout")

    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, max_length=512,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(embedded_checkpoint), args=args,
                         train_dataset=data, processing_class=tokenizer)
    first = trainer.train_dataset[0]
    learned = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    assert tokenizer.decode(learned).startswith(seed_rows[0]["output"][:20])  # the loss is on the completion only
    assert S_A in tokenizer.decode(first["input_ids"])
    assert math.isfinite(trainer.train().training_loss)
