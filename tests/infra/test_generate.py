import json

import pytest
from numerics import assert_same_greedy_path, logit_tolerance

from humpback_nb.config import GenerateConfig, ModelConfig
from humpback_nb.infra import decode as generate
from humpback_nb.infra.batches import read_partial
from humpback_nb.infra.engines import LocalEngine
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


@pytest.fixture(scope="module")
def greedy_reference(embedded_checkpoint):
    """The embedded model in float32, and for each question transformers' own greedy path, one prompt at a time:
    {prompt ids: (its tokens, their logits, the kit's logits teacher-forced on them)}."""
    import torch

    from humpback_nb.infra.chat import prompt_ids, turn_end_ids
    from humpback_nb.infra.decode import next_token_logits

    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    paths = {}
    for p in prompts():
        ids = prompt_ids(tokenizer, p["messages"])
        single = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(input_ids=single, attention_mask=torch.ones_like(single), do_sample=False,
                                 max_new_tokens=24, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=turn_end_ids(tokenizer), output_logits=True,
                                 return_dict_in_generate=True)
        theirs = out.sequences[0, len(ids):].tolist()
        kit = next_token_logits(model, [ids + theirs[:t] for t in range(len(theirs))], tokenizer.pad_token_id)
        paths[tuple(ids)] = theirs, torch.cat(out.logits), kit
    return model, tokenizer, paths


def recorded_rows(monkeypatch) -> dict[tuple[int, ...], list[int]]:
    """The tokens `decode` writes after each prompt (keyed by the prompt's ids), while the local engine generates."""
    rows, real = {}, generate.decode

    def recording(model, input_ids, attention_mask, *args, **kwargs):
        written = real(model, input_ids, attention_mask, *args, **kwargs)
        for ids, mask, row in zip(input_ids.tolist(), attention_mask.tolist(), written, strict=True):
            rows[tuple(i for i, keep in zip(ids, mask, strict=True) if keep)] = row
        return written

    monkeypatch.setattr(generate, "decode", recording)
    return rows


@pytest.mark.parametrize("batch_size", [3, 1])
def test_generation_in_batches_writes_what_transformers_writes_when_greedy(greedy_reference, monkeypatch,
                                                                         batch_size):
    # Batches sorted by length, read in groups and padded on the left, against transformers one prompt at a time,
    # in float32: the same tokens wherever the logits decide them (numerics.py), each reply under its own id.
    import torch

    model, tokenizer, paths = greedy_reference
    rows = recorded_rows(monkeypatch)
    records = LocalEngine(model, tokenizer).generate(prompts(), GenerateConfig(batch_size=batch_size), 12, greedy=True,
                               progress=False)
    assert [r["id"] for r in records] == [p["id"] for p in prompts()]
    assert len(rows) == len(paths)
    for record, (ids, (theirs, their_logits, kit_logits)) in zip(records, paths.items(), strict=True):
        ours = rows[ids]
        assert record["text"] == tokenizer.decode(ours[:record["new_tokens"]], skip_special_tokens=True)
        assert_same_greedy_path(theirs[:12], their_logits[:12], kit_logits[:12], ours,
                                logit_tolerance(torch.float32, their_logits))


def test_generation_resumes_after_an_interruption_without_duplicates_or_gaps(model_and_tokenizer, tmp_path,
                                                                            monkeypatch):
    model, tokenizer = model_and_tokenizer
    reference = LocalEngine(model, tokenizer).generate(prompts(), SETTINGS, 10, progress=False)

    partial = tmp_path / "out.partial"
    real = generate.generate_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        LocalEngine(model, tokenizer).generate(prompts(), SETTINGS, 10, partial=partial, progress=False)
    assert len(read_partial(partial)) == 3
    with open(partial, "a") as handle:  # a crash in the middle of writing a line
        handle.write('{"id": "q9", "text": "cut sh')
    monkeypatch.setattr(generate, "generate_batch", real)
    resumed = LocalEngine(model, tokenizer).generate(prompts(), SETTINGS, 10, partial=partial, progress=False)

    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(p["id"] for p in prompts())
    assert [r["text"] for r in resumed] == [r["text"] for r in reference]


def test_sampling_is_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    a = LocalEngine(model, tokenizer).generate(prompts()[:3], SETTINGS, 10, progress=False)
    b = LocalEngine(model, tokenizer).generate(prompts()[:3], SETTINGS, 10, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_timing_counts_what_decoding_did(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with generate.timing() as timed:
        records = LocalEngine(model, tokenizer).generate(prompts(), SETTINGS, 10, progress=False)
    assert timed.prompts == len(records) and timed.prefill_tokens == sum(r["prompt_tokens"] for r in records)
    batches = [[r for r in records if r["batch"] == b] for b in range(3)]  # 7 prompts, 3 to a batch
    # every batch steps until its longest row is written (its last token, a stop or the 10th, needs no step after)
    assert timed.steps == sum(max(r["new_tokens"] + r["finished"] for r in batch) - 1 for batch in batches)
    assert timed.row_steps >= timed.steps and timed.step_seconds > 0 and timed.prefill_seconds > 0
    summary = timed.to_dict()
    assert summary["seconds_per_step"] == pytest.approx(timed.step_seconds / timed.steps)
    with generate.timing() as other:  # nothing recorded outside the block, or after it
        pass
    LocalEngine(model, tokenizer).generate(prompts()[:1], SETTINGS, 4, progress=False)
    assert other.steps == 0


@pytest.mark.parametrize("grow, block_cost", [(None, None), (2, 0)])  # the kit's settings; a block per length
def test_decoding_loop_matches_transformers_generate_when_greedy(greedy_reference, monkeypatch, grow, block_cost):
    # The kit's loop (grouped prefill, a cache of blocks of rows growing a few slots at a time, finished rows leaving
    # the batch) against transformers' own generate, one prompt at a time, in float32: the logits within float32's
    # tolerance, the same tokens wherever they decide them (numerics.py).
    import torch

    from humpback_nb.infra.chat import turn_end_ids
    from humpback_nb.infra.decode import decode

    if grow is not None:
        monkeypatch.setattr(generate, "GROW", grow)
        monkeypatch.setattr(generate, "BLOCK_COST", block_cost)
    model, tokenizer, paths = greedy_reference
    assert len({len(e) for e in paths}) > 2  # prompts of several lengths: several blocks with a block per length
    encoded = list(paths)
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    ours = decode(model, ids, mask, 24, turn_end_ids(tokenizer), greedy=True, prefill_rows=3)
    assert any(row[-1] in turn_end_ids(tokenizer) and len(row) < 24 for row in ours)  # rows did leave early
    compared = [assert_same_greedy_path(*paths[e], row, logit_tolerance(torch.float32, paths[e][1]))
                for e, row in zip(encoded, ours, strict=True)]
    assert sum(compared) > len(encoded)  # the text is compared, not only the logits


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


def test_batches_computed_by_several_workers_come_back_in_order_and_a_failure_keeps_what_finished(tmp_path):
    """in_batches with workers (an endpoint's requests in flight): records in the ids' order whatever order the
    batches finish in; when one batch fails, those that finished are in the partial file and a rerun asks the rest."""
    import threading
    import time

    from humpback_nb.infra.batches import in_batches, read_partial

    ids = [f"p{i}" for i in range(12)]
    batches = [[i] for i in range(12)]
    at_once, most, lock, asked = [0], [0], threading.Lock(), []

    def compute(number, batch, fail_at=None):
        with lock:
            asked.append(number)
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        try:
            if number == fail_at:
                raise RuntimeError("refused")
            time.sleep(0.02 * (12 - number) / 12)  # later batches finish sooner
            return [{"id": ids[i], "n": i} for i in batch]
        finally:
            with lock:
                at_once[0] -= 1

    partial = tmp_path / "scores.jsonl.partial"
    with pytest.raises(RuntimeError, match="refused"):
        in_batches(ids, batches, lambda n, b: compute(n, b, fail_at=9), partial=partial, progress=False, workers=4)
    kept = read_partial(partial)
    assert "p9" not in kept and all(record["n"] == int(key[1:]) for key, record in kept.items())
    asked.clear()
    records = in_batches(ids, batches, compute, partial=partial, progress=False, workers=4)
    assert [r["id"] for r in records] == ids
    assert sorted(asked) == sorted(set(range(12)) - {int(k[1:]) for k in kept})  # only what was missing
    assert most[0] > 1
