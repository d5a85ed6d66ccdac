import json

import pytest

from humpback_nb.config import GenerateConfig, ModelConfig
from humpback_nb.infra import decode as generate
from humpback_nb.infra.batches import read_partial
from humpback_nb.infra.decode import generate_records
from humpback_nb.infra.models import load_model

pytestmark = pytest.mark.slow

QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello in French.", "Name a planet.",
             "What do bees make?", "Name an ocean.", "What is ice made of?"]


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded_checkpoint):
    return load_model("smollm2-135m")


def prompts():
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]


SETTINGS = GenerateConfig(batch_size=3, random_seed=7)


def test_batched_generation_matches_one_at_a_time_when_greedy(embedded_checkpoint):
    # In float32, left padding changes no greedy choice; in bf16 it can flip a near-tie.
    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    batched = generate_records(model, tokenizer, prompts(), SETTINGS, 12, greedy=True, progress=False)
    single = generate_records(model, tokenizer, prompts(), GenerateConfig(batch_size=1), 12, greedy=True,
                              progress=False)
    assert [r["id"] for r in batched] == [p["id"] for p in prompts()]
    assert [r["text"] for r in batched] == [r["text"] for r in single]


def test_generation_resumes_after_an_interruption_without_duplicates_or_gaps(model_and_tokenizer, tmp_path,
                                                                            monkeypatch):
    model, tokenizer = model_and_tokenizer
    reference = generate_records(model, tokenizer, prompts(), SETTINGS, 10, progress=False)

    partial = tmp_path / "out.partial"
    real = generate._generate_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_generate_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_records(model, tokenizer, prompts(), SETTINGS, 10, partial=partial, progress=False)
    assert len(read_partial(partial)) == 3
    with open(partial, "a") as handle:  # a crash in the middle of writing a line
        handle.write('{"id": "q9", "text": "cut sh')
    monkeypatch.setattr(generate, "_generate_batch", real)
    resumed = generate_records(model, tokenizer, prompts(), SETTINGS, 10, partial=partial, progress=False)

    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(p["id"] for p in prompts())
    assert [r["text"] for r in resumed] == [r["text"] for r in reference]


def test_sampling_is_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    a = generate_records(model, tokenizer, prompts()[:3], SETTINGS, 10, progress=False)
    b = generate_records(model, tokenizer, prompts()[:3], SETTINGS, 10, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_decoding_loop_matches_transformers_generate_when_greedy(embedded_checkpoint):
    # The kit's loop (grouped prefill, one preallocated cache, finished rows leaving the batch) against
    # transformers' own generate, one prompt at a time, in float32: the same tokens.
    import torch

    from humpback_nb.infra.decode import decode
    from humpback_nb.method.prompts import prompt_ids

    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    encoded = [prompt_ids(tokenizer, p["messages"]) for p in prompts()]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    ours = decode(model, ids, mask, 24, tokenizer.eos_token_id, greedy=True, prefill_rows=3)
    assert any(row[-1] == tokenizer.eos_token_id and len(row) < 24 for row in ours)  # rows did leave early
    for e, row in zip(encoded, ours, strict=True):
        single = torch.tensor([e])
        with torch.inference_mode():
            out = model.generate(input_ids=single, attention_mask=torch.ones_like(single), do_sample=False,
                                 max_new_tokens=24, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        assert out[0, len(e):].tolist()[: len(row)] == row


@pytest.mark.parametrize("temperature", [0.3, 0.7, 5.0])  # 5.0: a flat distribution, past the candidates
def test_nucleus_is_the_one_transformers_samples_from(temperature):
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from humpback_nb.infra.decode import nucleus

    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits / temperature, dim=-1)
    weights, index = nucleus(probs, 0.9, candidates=64)
    ours = torch.zeros_like(probs).scatter(-1, index, weights)
    warped = TopPLogitsWarper(0.9)(None, logits / temperature)
    assert torch.equal(ours > 0, warped > float("-inf"))
    assert torch.allclose(ours[ours > 0], probs[ours > 0])
