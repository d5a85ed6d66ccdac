"""The model out of a run: `humpback export` writes a merged model plain transformers loads and answers with as the
kit does; `humpback chat` answers piped questions as the evaluation answers."""

import io
import json
from dataclasses import replace

import pytest

from humpback_nb.cli import main
from humpback_nb.config import load_config
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

QUESTION = "Name a whale that sings."


@pytest.fixture(scope="module")
def exported(finished_tiny_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("export") / "m2-merged"
    assert main(["export", "--run-dir", str(finished_tiny_run), "--model", "m2", "--to", str(target)]) == 0
    return target


def test_plain_transformers_loads_the_export_and_answers_as_the_kit_does(finished_tiny_run, exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from humpback_nb.infra.decode import chat
    from humpback_nb.infra.models import load_trained
    from humpback_nb.method.prompts import TAGS, forward_messages, prompt_ids, turn_end_ids

    assert sorted(p.name for p in exported.glob("*.safetensors")) == ["model.safetensors"]
    assert not (exported / "adapter_config.json").exists() and (exported / "generation_config.json").is_file()
    config = load_config(RunFiles(finished_tiny_run).config_file())
    model = AutoModelForCausalLM.from_pretrained(exported)  # no trust_remote_code, no peft
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert model.dtype == torch.bfloat16  # the base's dtype
    # the run's tokenizer format (this base has no chat template: the kit's base-model format) and its turn ends
    kit_model, kit_tokenizer = load_trained(replace(config.model, dtype="bfloat16"),
                                            RunFiles(finished_tiny_run).model_dir("m2"))
    messages = forward_messages(QUESTION, "S_a+S_w")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == prompt_ids(kit_tokenizer, messages)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == turn_end_ids(kit_tokenizer)
    # The same answer, greedy, in float32: in bf16 the kit's CPU attention and SDPA round differently, and 16 greedy
    # tokens can part at a near tie, which says nothing of the export.
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    kit_model, kit_tokenizer = load_trained(replace(config.model, dtype="float32"),
                                            RunFiles(finished_tiny_run).model_dir("m2"))
    generated = model.generate(**ids, do_sample=False, max_new_tokens=16)
    theirs = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    settings = replace(config.generate, max_new_tokens=16)
    ours = chat(kit_model, kit_tokenizer, QUESTION, system=TAGS["S_a+S_w"], settings=settings, greedy=True)
    assert theirs == ours and ours


def test_export_refuses_a_model_the_run_lacks_and_a_folder_in_use(finished_tiny_run, exported, tmp_path, capsys):
    assert main(["export", "--run-dir", str(finished_tiny_run), "--model", "m7", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("humpback: error: ") and "'m7'" in err and "m0, m1, m2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    before = sorted(p.name for p in exported.iterdir())
    assert main(["export", "--run-dir", str(finished_tiny_run), "--model", "m2", "--to", str(exported)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in exported.iterdir()) == before
    assert not [p for p in exported.parent.iterdir() if p.name != exported.name]  # no temporary folder left


def test_chat_answers_piped_questions_as_the_evaluation_answers(finished_tiny_run, monkeypatch, capsys):
    from humpback_nb.infra.models import load_trained
    from humpback_nb.method.evaluate import answer

    questions = [QUESTION, "What do whales eat?"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{questions[0]}\n\n{questions[1]}\n"))  # piped, a blank line
    assert main(["chat", "--run-dir", str(finished_tiny_run), "--model", "m2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    config = load_config(RunFiles(finished_tiny_run).config_file())
    model, tokenizer = load_trained(config.model, RunFiles(finished_tiny_run).model_dir("m2"))
    settings = replace(config.generate, max_new_tokens=8)
    expected = [answer(model, tokenizer, [{"id": "q", "instruction": q, "dataset": "chat"}], settings, "m2",
                       config.evaluate.inference_tags)[0]["output"] for q in questions]
    assert out == "".join(f"{a}\n\n" for a in expected)  # each answer, then a blank line; EOF ended it


def test_a_qlora_model_is_merged_into_the_unquantized_base_and_says_so(finished_tiny_run, tmp_path, capsys):
    import shutil

    import yaml
    from safetensors import safe_open

    files, copy = RunFiles(finished_tiny_run), RunFiles(tmp_path / "run")
    settings = yaml.safe_load(files.config_file().read_text())
    settings["model"]["quantization"] = "4bit"  # as a QLoRA run's config says
    copy.root.mkdir()
    copy.config_file().write_text(yaml.safe_dump(settings))
    shutil.copytree(files.model_dir("m2"), copy.model_dir("m2"))
    assert main(["export", "--run-dir", str(copy.root), "--model", "m2", "--to", str(tmp_path / "out")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "4-bit" in line]
    assert len(said) == 1 and "merged into the unquantized base" in said[0]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        names = weights.keys()
    assert names and not any("absmax" in name or "quant" in name for name in names)
