import pytest
import torch
from numerics import logit_tolerance, margins

from humpback_nb.config import ModelConfig, TrainConfig
from humpback_nb.infra.engines import LocalEngine, chat
from humpback_nb.infra.models import (
    ModelError,
    attach_lora,
    cpu_has_bf16,
    is_4bit,
    load_adapter,
    load_model,
    resolve,
    runtime,
    save_adapter,
)

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def test_runtime_is_decided_in_one_place():
    where = runtime()
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert where.device == expected_device
    if where.device == "cpu":
        assert where.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert runtime("cpu", "float32") == runtime("cpu", "float32")
    assert runtime("cpu", "float32").dtype is torch.float32


def test_embedded_checkpoint_is_safetensors_only(embedded_checkpoint):
    names = {p.name for p in embedded_checkpoint.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".gguf")) for n in names)
    assert "quantization_config" not in (embedded_checkpoint / "config.json").read_text()


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_embedded_model_loads_and_answers(embedded_checkpoint, quantization):
    model, tokenizer = load_model(ModelConfig(quantization=quantization, dequantize_on_cpu=False))
    assert is_4bit(model) == (quantization == "4bit")
    if quantization == "4bit":
        import bitsandbytes as bnb

        linear = model.model.layers[0].self_attn.q_proj
        assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.quant_type == "nf4"
    answer = chat(LocalEngine(model, tokenizer), QUESTION, greedy=True)
    assert "Paris" in answer


def test_4bit_and_full_precision_agree_on_the_next_token(embedded_checkpoint):
    full, tokenizer = load_model(ModelConfig(quantization="none"))
    four, _ = load_model(ModelConfig(quantization="4bit", dequantize_on_cpu=False))
    batch = tokenizer(["The capital of France is the city of"], return_tensors="pt")
    with torch.inference_mode():
        top_full = full(**batch).logits[0, -1].topk(5).indices.tolist()
        top_four = four(**batch).logits[0, -1].topk(5).indices.tolist()
    assert top_full[0] in top_four


def test_4bit_unpacked_once_on_cpu_computes_what_bitsandbytes_computes(embedded_checkpoint):
    packed, tokenizer = load_model(ModelConfig(quantization="4bit", dequantize_on_cpu=False))
    unpacked, _ = load_model(ModelConfig(quantization="4bit", dequantize_on_cpu=True))
    assert is_4bit(packed) and not is_4bit(unpacked)
    import bitsandbytes.functional as F

    layer = packed.model.layers[3].mlp.down_proj
    nf4 = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(unpacked.model.layers[3].mlp.down_proj.weight, nf4)  # the very same NF4 values
    batch = tokenizer(["Humpback whales sing long songs in the winter because"], return_tensors="pt")
    with torch.inference_mode():
        a, b = packed(**batch).logits.float(), unpacked(**batch).logits.float()
    # the same NF4 values through bitsandbytes' kernel and through torch's: within bf16's tolerance (numerics.py),
    # the same argmax wherever the margin decides it
    tolerance = logit_tolerance(torch.bfloat16, a)
    assert float((a - b).abs().max()) <= tolerance
    decided = margins(a) > 2 * tolerance
    assert torch.equal(a.argmax(-1)[decided], b.argmax(-1)[decided])


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_the_base_model_is_loaded_once_and_copied_after(embedded_checkpoint, tmp_path, monkeypatch, quantization):
    """Unpacked NF4 or full precision, a CPU process loads its base model from the file once."""
    from transformers import AutoModelForCausalLM

    from humpback_nb.infra import models

    models._KEPT.clear()
    first, tokenizer = load_model(ModelConfig(quantization=quantization))
    assert len(models._KEPT) == 1
    def read_the_file(*args, **kwargs):
        raise AssertionError("the base model was read from the file again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", read_the_file)
    second, _ = load_model(ModelConfig(quantization=quantization))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert second.lm_head.weight is second.model.embed_tokens.weight  # tied weights stay tied in the copy
    # a model merged with an adapter leaves the kept base model as it was
    lora = attach_lora(second, TrainConfig(lora_r=4))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.05)  # a fresh adapter changes nothing: this one does
    adapter = save_adapter(lora, tmp_path / "adapter")
    merged, _ = load_model(ModelConfig(quantization=quantization), adapter=adapter)
    third, _ = load_model(ModelConfig(quantization=quantization))
    q = first.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q)
    assert torch.equal(third.model.layers[0].self_attn.q_proj.weight, q)
    with pytest.raises(AssertionError, match="read from the file"):  # another build (attention dropout) reads it
        load_model(ModelConfig(quantization=quantization), attention_dropout=0.1)


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_lora_trains_saves_and_reloads_identically(embedded_checkpoint, tmp_path, quantization):
    train = TrainConfig(lora_r=8, lora_alpha=16, dropout=0.0)
    spec = ModelConfig(quantization=quantization, dequantize_on_cpu=False)  # QLoRA through bitsandbytes itself
    model, tokenizer = load_model(spec)
    model = attach_lora(model, train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = tokenizer(["Humpback whales sing long, complex songs in the winter breeding grounds."],
                      return_tensors="pt")
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.inference_mode():
        trained = model(**batch).logits.float()
    path = save_adapter(model, tmp_path / "adapter")
    assert (path / "adapter_model.safetensors").is_file()
    assert not any(p.suffix in {".bin", ".pt"} for p in path.iterdir())

    # Reloaded to go on training, the model computes exactly what the trained one did.
    base, _ = load_model(spec)
    resumed = load_adapter(base, path, trainable=True).eval()
    with torch.inference_mode():
        again = resumed(**batch).logits.float()
    assert torch.equal(trained, again)
    # Reloaded for inference, it agrees within bf16's rounding: the adapter merged into bf16 weights (QLoRA: kept
    # apart, with norms and embeddings in bf16), so the same argmax wherever the margin decides it (numerics.py).
    reloaded, _ = load_model(spec, adapter=path)
    with torch.inference_mode():
        served = reloaded(**batch).logits.float()
    tolerance = logit_tolerance(torch.bfloat16, trained)
    decided = margins(trained) > 2 * tolerance
    assert decided.any() and torch.equal(served.argmax(-1)[decided], trained.argmax(-1)[decided])
    plain, _ = load_model(spec)
    with torch.inference_mode():
        untrained = plain(**batch).logits.float()
    assert not torch.allclose(untrained, served, atol=1e-2)


CONVERT = """
import os, sys
from humpback_nb.infra.models import embedded_checkpoint
target = embedded_checkpoint("smollm2-135m-as-base")
print(os.stat(target / "config.json").st_ino, os.stat(target).st_ino)
"""


def test_two_processes_on_an_empty_cache_make_the_base_model_form_once(embedded_checkpoint, tmp_path):
    """Started at once on a cache without it (two test workers, a launch's processes), both get the one folder the
    first made: the second waits for it rather than making its own and replacing the first's under its reads."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(embedded_checkpoint, cache / "models" / "smollm2-135m")  # the converted model; its base form is not
    env = {**os.environ, "HUMPBACK_CACHE": str(cache)}
    started = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    assert [process.returncode for process in started] == [0, 0]
    target = cache / "models" / "smollm2-135m-as-base"
    assert outputs[0] == outputs[1] == f"{(target / 'config.json').stat().st_ino} {target.stat().st_ino}\n"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        ".smollm2-135m-as-base.lock", "smollm2-135m", "smollm2-135m-as-base"]  # no temporary folder left


def test_resolve_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ModelError, match="neither an embedded model"):
        resolve(str(tmp_path / "missing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="no \\*.safetensors file"):
        resolve(str(pickled))
    assert resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_an_adapter_folder_without_safetensors_is_refused(embedded_checkpoint, tmp_path):
    model, _ = load_model("smollm2-135m")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path)
