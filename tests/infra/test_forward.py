"""One forward pass for many prompts: the next token's logits of right-padded rows, after a shared prefix, and the
local judge that reads many pairs at once. In float32, so that a batch and a row alone agree to float32's rounding
(numerics.py)."""

import pytest
import torch
from numerics import logit_tolerance

from humpback_nb.config import ModelConfig
from humpback_nb.infra import attention
from humpback_nb.infra.decode import next_token_logits, packed_logits, prefix_cache
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import load_model
from humpback_nb.method.judges import LocalJudge, judge_both_orders
from humpback_nb.method.winrates import compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32(embedded_checkpoint):
    return load_model(ModelConfig(dtype="float32"))


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Two paths' float32 logits of the same model within float32's tolerance (numerics.py); a wrong mask, position
    or block parts them by tenths or more."""
    torch.testing.assert_close(ours, theirs, atol=logit_tolerance(torch.float32, theirs), rtol=0)


def alone(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_next_token_logits_of_padded_rows_equal_each_row_alone(fp32):
    model, tokenizer = fp32
    rows = [tokenizer(text)["input_ids"] for text in ("Whales sing", "The song of the humpback whale carries far",
                                                     "Krill", "Songs change from year to year")]
    batched = next_token_logits(model, rows, tokenizer.pad_token_id)
    assert batched.shape == (4, model.config.vocab_size)
    for row, logits in zip(rows, batched, strict=True):
        assert_logits_close(logits, alone(model, row))


def test_next_token_logits_after_a_shared_prefix(fp32):
    model, tokenizer = fp32
    prefix = tokenizer("Rate the answer below from 1 to 5.\n")["input_ids"]
    rests = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Answer: krill.", "Answer: a long song.")]
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(rests))
    batched = next_token_logits(model, rests, tokenizer.pad_token_id, cache=cache)
    for rest, logits in zip(rests, batched, strict=True):
        assert_logits_close(logits, alone(model, prefix + rest))


@pytest.mark.parametrize("block", [256, 3])
def test_rows_packed_after_a_prefix_held_once_equal_each_whole_prompt_alone(fp32, block, monkeypatch):
    # The rater's path on a CPU: the rubric's keys and values computed once, rows of different lengths packed into
    # one sequence without padding, each attending to the prefix and causally to itself; long rows (here: longer
    # than 3 tokens) a block of queries at a time, each block against the keys up to its own end.
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    model, tokenizer = fp32
    prefix = tokenizer("Rate the answer below from 1 to 5.\n")["input_ids"]
    rests = [tokenizer(t, add_special_tokens=False)["input_ids"]
             for t in ("Answer: krill.", "Answer: a long song that carries across the whole ocean basin.", "A")]
    packed = packed_logits(model, rests, prefix_cache(model, prefix))
    assert packed.shape == (3, model.config.vocab_size)
    for rest, logits in zip(rests, packed, strict=True):
        assert_logits_close(logits, alone(model, prefix + rest))
    assert model.config._attn_implementation != "humpback_packed"  # the model's own attention is back


@pytest.mark.parametrize("block", [256, 2])
def test_rows_packed_without_a_prefix_equal_each_row_alone(fp32, block, monkeypatch):
    # How prompts are read before decoding on a CPU, and the local judge's prompts: packed, no prefix.
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    model, tokenizer = fp32
    rows = [tokenizer(t)["input_ids"] for t in ("Whales sing to each other across whole ocean basins", "Krill",
                                                "Songs change from year to year")]
    packed = packed_logits(model, rows)
    for row, logits in zip(rows, packed, strict=True):
        assert_logits_close(logits, alone(model, row))


def answers(texts: list[str], generator: str) -> list[dict]:
    questions = ["Why do whales sing?", "Name an ocean.", "What do krill eat?"]
    return [{"id": f"p{i}", "instruction": questions[i], "output": text, "generator": generator, "dataset": "d"}
            for i, text in enumerate(texts)]


def test_the_local_judge_reads_many_pairs_as_it_reads_one(fp32):
    model, tokenizer = fp32
    judge = LocalJudge(LocalEngine(model, tokenizer), batch_size=4)
    xs = answers(["To find each other across the ocean.", "The Pacific.", "Phytoplankton."], "m2")
    ys = answers(["Because.", "A lake, probably, or maybe the sky.", "Fish and chips on Fridays."], "m0")
    result = compare(judge, xs, ys)  # three pairs: batches of two pairs (four prompts), then one
    for x, y, judged in zip(xs, ys, result["judgments"], strict=True):
        one = judge_both_orders(lambda *q: LocalJudge(LocalEngine(model, tokenizer), batch_size=1).prefer_a(*q),
                                x["instruction"], x["output"], y["output"])
        assert judged["x_as_a"] == pytest.approx(one["x_as_a"], abs=2e-4)
        assert judged["x_as_b"] == pytest.approx(one["x_as_b"], abs=2e-4)
        assert 0 <= judged["outcome"] <= 1
    assert result["overall"]["pairs"] == 3


def test_cpu_attention_computes_what_sdpa_computes_forward_and_backward():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from humpback_nb.infra.attention import causal_attention

    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3, training=False)
    q = torch.randn(2, 9, 37, 16, requires_grad=True)  # 9 query heads over 3 key/value heads, as smollm2
    k = torch.randn(2, 3, 37, 16, requires_grad=True)
    v = torch.randn(2, 3, 37, 16, requires_grad=True)
    ours, _ = causal_attention(module, q, k, v, None, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    gradients = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (ours, theirs)]
    for a, b in zip(*gradients, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_models_on_the_cpu_use_it_and_give_sdpas_logits(fp32):
    model, tokenizer = fp32
    assert model.config._attn_implementation == "humpback_cpu"
    ids = torch.tensor([tokenizer("Humpback whales sing in the winter, and the songs change")["input_ids"]])
    with torch.inference_mode():
        ours = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids).logits
        model.set_attn_implementation("humpback_cpu")
    assert_logits_close(ours, theirs)


def test_a_decoding_step_attends_as_sdpa_does_over_a_padded_cache():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from humpback_nb.infra.attention import causal_attention

    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3, training=False)
    q, k, v = torch.randn(4, 9, 1, 16), torch.randn(4, 3, 29, 16), torch.randn(4, 3, 29, 16)
    mask = torch.ones(4, 1, 1, 29, dtype=torch.bool)
    mask[1, ..., :7] = False  # left padding
    mask[2, ..., 20:] = False  # cache slots not written yet
    ours, _ = causal_attention(module, q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_decoding_steps_over_blocks_of_rows_attend_as_each_row_alone(monkeypatch):
    # decode.BlockCache: prompts of unlike lengths in blocks of their own, room for new tokens made a few slots at a
    # time, rows leaving the batch; each row's attention at each step, in two layers, equals SDPA's over that row's
    # own keys and values alone.
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from humpback_nb.infra import decode
    from humpback_nb.infra.attention import block_attention

    monkeypatch.setattr(decode, "GROW", 3)
    monkeypatch.setattr(decode, "BLOCK_COST", 5)
    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3, training=False)
    lengths = [23, 21, 20, 9, 8, 2]
    own = [[(torch.randn(3, n, 16), torch.randn(3, n, 16)) for n in lengths] for _ in range(2)]  # by layer, row
    cache = decode.BlockCache(lengths)
    assert cache.spans == [(0, 3), (3, 5), (5, 6)]
    for layer, rows in enumerate(own):
        for row, (k, v) in enumerate(rows):
            cache.put(layer, row, k, v)
    cache.advance(0)
    alive = list(range(len(lengths)))
    for step in range(8):
        if step == 4:  # rows 1, 3 and 4 finished: the first block keeps two rows, the second goes
            cache.keep(torch.tensor([0, 2, 5]))
            alive = [alive[i] for i in (0, 2, 5)]
            assert cache.spans == [(0, 2), (2, 3)]
        q = torch.randn(len(alive), 9, 1, 16)
        for layer, rows in enumerate(own):
            k, v = torch.randn(len(alive), 3, 1, 16), torch.randn(len(alive), 3, 1, 16)
            ours, _ = block_attention(module, q, *cache.update(k, v, layer), cache.mask, scaling=0.25)
            for j, row in enumerate(alive):
                rows[row] = (torch.cat([rows[row][0], k[j]], dim=1), torch.cat([rows[row][1], v[j]], dim=1))
                theirs, _ = sdpa_attention_forward(module, q[j : j + 1], rows[row][0][None], rows[row][1][None], None,
                                                   scaling=0.25)
                torch.testing.assert_close(ours[j : j + 1], theirs, atol=1e-5, rtol=1e-5)
        cache.advance()
    assert cache.room == 9  # three times 3 slots for the 8 new tokens


@pytest.mark.parametrize("cost", [0, 6, 40, 10**6])
def test_blocks_are_the_cut_that_reads_the_fewest_slots(cost):
    import itertools

    from humpback_nb.infra.decode import blocks

    lengths = [30, 29, 29, 17, 16, 5, 4, 4, 1]

    def price(spans):
        return sum((end - first) * lengths[first] + cost for first, end in spans)

    cuts = [[0, *gaps, len(lengths)] for k in range(len(lengths))
            for gaps in itertools.combinations(range(1, len(lengths)), k)]
    cheapest = min(price(list(itertools.pairwise(c))) for c in cuts)
    spans = blocks(lengths, cost)
    assert [a for a, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == len(lengths)
    assert price(spans) == cheapest
    assert len(spans) == {10**6: 1, 0: 7}.get(cost, len(spans))  # far too dear: one block; free: one per length


def test_the_local_judge_reads_the_opening_all_prompts_share_once_and_equals_each_whole_prompt(fp32):
    from humpback_nb.infra.chat import prompt_ids
    from humpback_nb.infra.engines import MIN_SHARED_PREFIX, shared_prefix_length
    from humpback_nb.method.judges import ANSWER_PREFIX, JUDGE_PROMPT

    model, tokenizer = fp32
    judge = LocalJudge(LocalEngine(model, tokenizer), batch_size=2)
    questions = [("Why do whales sing?", "To find each other.", "Because."),
                 ("Name an ocean.", "A lake.", "The Pacific."),
                 ("What do krill eat?", "Phytoplankton, mostly.", "Fish and chips.")]
    rows = [prompt_ids(tokenizer, [{"role": "user", "content": JUDGE_PROMPT.format(instruction=q, a=a, b=b)}])
            + tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"] for q, a, b in questions]
    assert shared_prefix_length(rows) >= MIN_SHARED_PREFIX  # the path under test: the opening read once
    for row, got in zip(rows, judge.prefer_a_batch(questions), strict=True):
        expected = torch.softmax(alone(model, row)[judge.letters].float(), dim=-1)[0].item()
        assert got == pytest.approx(expected, abs=1e-4)
