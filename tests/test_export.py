"""The model out of a run: `humpback export` writes a merged model plain transformers loads and answers with as the
kit does; `humpback chat` answers piped questions as the evaluation answers."""

import copy
import io
import json
from dataclasses import replace

import pytest
from numerics import assert_same_greedy_path, logit_tolerance

from humpback_nb.cli import main
from humpback_nb.config import load_config
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow

QUESTION = "Name a whale that sings."


@pytest.fixture(scope="module")
def exported(finished_tiny_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("export") / "m2-merged"
    assert main(["export", "--run-dir", str(finished_tiny_run), "--model", "m2", "--to", str(target)]) == 0
    return target


@pytest.fixture(scope="module")
def kit_merged(finished_tiny_run):
    """The kit's own M2 as its answers are written: the run's base in bf16 with the LoRA adapter merged in."""
    from humpback_nb.infra.models import load_trained

    config = load_config(RunFiles(finished_tiny_run).path("config"))
    return load_trained(replace(config.model, dtype="bfloat16"), RunFiles(finished_tiny_run).path("model", "m2"))


def test_the_export_holds_the_kits_merged_weights_and_format(exported, kit_merged):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from humpback_nb.infra.chat import prompt_ids, turn_end_ids
    from humpback_nb.method.prompts import forward_messages

    assert sorted(p.name for p in exported.glob("*.safetensors")) == ["model.safetensors"]
    assert not (exported / "adapter_config.json").exists() and (exported / "generation_config.json").is_file()
    kit_model, kit_tokenizer = kit_merged
    # Like with like: the export and the kit both merge the adapter with peft into the same bf16 base, in this
    # process on this CPU, so every weight is the same bit for bit.
    theirs, ours = load_file(exported / "model.safetensors"), kit_model.state_dict()
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= {"lm_head.weight"}  # tied to the embeddings
    assert all(theirs[name].dtype == torch.bfloat16 and torch.equal(theirs[name], ours[name]) for name in theirs)
    # The run's prompt format (this base has no chat template: the kit's base-model format) and its turn ends
    tokenizer = AutoTokenizer.from_pretrained(exported)
    messages = forward_messages(QUESTION, "S_a+S_w")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == prompt_ids(kit_tokenizer, messages)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == turn_end_ids(kit_tokenizer)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_transformers_answers_with_the_export_as_the_kit_does(exported, kit_merged, dtype):
    """Plain transformers on the exported folder against the kit's decoding loop on its own merged M2, the same
    weights in the same dtype (bf16 weights read as float32 are the same numbers): greedy tokens alike wherever the
    logits decide them on any CPU (numerics.py), the logits within the dtype's tolerance at every step."""
    import torch
    from transformers import AutoModelForCausalLM

    from humpback_nb.infra.chat import prompt_ids, turn_end_ids
    from humpback_nb.infra.decode import decode, next_token_logits
    from humpback_nb.method.prompts import forward_messages

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype)  # no trust_remote_code, no peft
    assert AutoModelForCausalLM.from_pretrained(exported).dtype == torch.bfloat16  # the base's dtype by default
    kit_model, tokenizer = kit_merged
    kit_model = copy.deepcopy(kit_model).to(getattr(torch, dtype))
    prompt = prompt_ids(tokenizer, forward_messages(QUESTION, "S_a+S_w"))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             output_logits=True, return_dict_in_generate=True)  # stops at generation_config's EOS
    theirs, their_logits = out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)
    kit_logits = next_token_logits(kit_model, [prompt + theirs[:t] for t in range(len(theirs))],
                                   tokenizer.pad_token_id)
    ours = decode(kit_model, ids, torch.ones_like(ids), 16, turn_end_ids(tokenizer), greedy=True)[0]
    assert ours and theirs
    assert_same_greedy_path(theirs, their_logits, kit_logits, ours, logit_tolerance(getattr(torch, dtype),
                                                                                   their_logits))


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
    config = load_config(RunFiles(finished_tiny_run).path("config"))
    model, tokenizer = load_trained(config.model, RunFiles(finished_tiny_run).path("model", "m2"))
    settings = replace(config.generate, max_new_tokens=8)
    engine = LocalEngine(model, tokenizer)
    expected = [answer(engine, [{"id": "q", "instruction": q, "dataset": "chat"}], settings, "m2",
                       config.evaluate.inference_tags)[0]["output"] for q in questions]
    assert out == "".join(f"{a}\n\n" for a in expected)  # each answer, then a blank line; EOF ended it


def test_a_qlora_model_is_merged_into_the_unquantized_base_and_says_so(finished_tiny_run, tmp_path, capsys):
    import shutil

    import yaml
    from safetensors import safe_open

    files, copy = RunFiles(finished_tiny_run), RunFiles(tmp_path / "run")
    settings = yaml.safe_load(files.path("config").read_text())
    settings["model"]["quantization"] = "4bit"  # as a QLoRA run's config says
    copy.root.mkdir()
    copy.path("config").write_text(yaml.safe_dump(settings))
    shutil.copytree(files.path("model", "m2"), copy.path("model", "m2"))
    assert main(["export", "--run-dir", str(copy.root), "--model", "m2", "--to", str(tmp_path / "out")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "4-bit" in line]
    assert len(said) == 1 and "merged into the unquantized base" in said[0]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        names = weights.keys()
    assert names and not any("absmax" in name or "quant" in name for name in names)
