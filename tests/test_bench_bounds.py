"""The bound times of benchmarks/bounds.py: pure arithmetic, no model and no timing."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bounds import (  # noqa: E402
    Bounds,
    ModelShape,
    combined_rate,
    decode_steps,
    generation_bound,
    prefill_flops,
    prompt_bound,
    rating_bound,
    step_costs,
    step_seconds,
    training_bound,
)

SHAPE = ModelShape()  # smollm2-135m
# bandwidth-bound: reading the weights (0.27 GB at 1 GB/s) takes far longer than their FLOPs at 1 PFLOP/s
SLOW_MEMORY = Bounds(peak=1e15, square_peak=2e15, bandwidth=1e9)
# FLOP-bound: 1 GFLOP/s against 1 PB/s
SLOW_MATH = Bounds(peak=1e9, square_peak=2e9, bandwidth=1e15)


def record(prompt: int, new: int, batch: int, finished: bool = True) -> dict:
    return {"prompt_tokens": prompt, "new_tokens": new, "finished": finished, "batch": batch}


def test_smollm2_shape():
    assert SHAPE.params == 134_515_008  # SmolLM2-135M's parameter count
    assert SHAPE.weight_bytes == 2 * SHAPE.params
    assert SHAPE.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert [count for *_, count in SHAPE.matmuls()] == [30] * 7 + [1]


def test_from_config_reads_a_transformers_config():
    class Config:
        num_hidden_layers, hidden_size, intermediate_size = 30, 576, 1536
        num_attention_heads, num_key_value_heads, head_dim, vocab_size = 9, 3, 64, 49152
        tie_word_embeddings = True

    assert ModelShape.from_config(Config()) == SHAPE


def test_one_row_bandwidth_bound_step_reads_the_weights():
    # one row with a single cached token: the weights and one token's keys and values, once
    assert step_seconds(SHAPE, [1], SLOW_MEMORY) == pytest.approx((SHAPE.weight_bytes + SHAPE.kv_bytes_per_token) / 1e9)
    # more rows add only their keys and values, not the weights again
    read, compute = step_costs(SHAPE, [100] * 8, SLOW_MEMORY)
    assert read > compute
    assert read == pytest.approx((SHAPE.weight_bytes + 800 * SHAPE.kv_bytes_per_token) / 1e9)


def test_flop_bound_step_grows_with_rows():
    one, eight = step_seconds(SHAPE, [10], SLOW_MATH), step_seconds(SHAPE, [10] * 8, SLOW_MATH)
    assert one == pytest.approx((2 * SHAPE.params + SHAPE.attention_flops(10)) / 1e9)
    assert eight == pytest.approx(8 * one)


def test_decode_steps_rows_that_finish_leave():
    # finished: a row of 3 new tokens sampled 4 (3 + its stop): the first from the prefill, then 3 steps
    # unfinished (the budget ran out): 2 tokens, the first from the prefill, then 1 step
    steps = decode_steps([record(10, 3, 0), record(5, 2, 0, finished=False)])
    assert steps == {0: [[11, 6], [12], [13]]}


def test_finished_rows_stop_costing_kv_bytes():
    long_row, short_row = record(100, 5, 0), record(100, 1, 0)
    bound = generation_bound([long_row, short_row], SHAPE, SLOW_MEMORY)
    kv = SHAPE.kv_bytes_per_token * (sum(100 + t for t in range(1, 6)) + 101)  # the short row: step 1 only
    prompts = prefill_flops(SHAPE, [100, 100]) / 1e15  # read at the model-shape peak
    expected = 5 * SHAPE.weight_bytes / 1e9 + kv / 1e9 + prompts
    assert bound["seconds"] == pytest.approx(expected)
    assert bound["steps"] == 5 and bound["flop_bound_steps"] == 0
    assert bound["prefill_seconds"] == pytest.approx(prompts)


def test_batches_read_the_weights_each():
    together = generation_bound([record(10, 4, 0), record(10, 4, 0)], SHAPE, SLOW_MEMORY)
    apart = generation_bound([record(10, 4, 0), record(10, 4, 1)], SHAPE, SLOW_MEMORY)
    assert together["batches"] == 1 and apart["batches"] == 2
    assert together["steps"] == 4 and apart["steps"] == 8
    weights = 4 * SHAPE.weight_bytes / 1e9
    assert apart["seconds"] - together["seconds"] == pytest.approx(weights)


def test_flop_bound_generation_does_not_care_about_batches():
    together = generation_bound([record(10, 4, 0), record(10, 4, 0)], SHAPE, SLOW_MATH)
    apart = generation_bound([record(10, 4, 0), record(10, 4, 1)], SHAPE, SLOW_MATH)
    assert together["flop_bound_steps"] == together["steps"]
    assert together["seconds"] == pytest.approx(apart["seconds"])


def test_records_in_any_order():
    rows = [record(10, 4, 1), record(20, 2, 0), record(30, 3, 1)]
    assert decode_steps(rows) == {0: [[21], [22]], 1: [[11, 31], [12, 32], [13, 33], [14]]}
    assert generation_bound(rows, SHAPE, SLOW_MEMORY) == generation_bound(rows[::-1], SHAPE, SLOW_MEMORY)


def test_rating_reads_the_prefix_once():
    bound = rating_bound(300, [50, 70, 80], SHAPE, SLOW_MATH)
    assert bound["tokens_read"] == 500
    # the prefix once (no head), the tails attending over it, the head once per tail, at the model-shape peak
    flops = prefill_flops(SHAPE, [300], kept=0) + prefill_flops(SHAPE, [50, 70, 80], past=300)
    assert bound["flops"] == flops
    assert bound["seconds"] == pytest.approx(flops / SLOW_MATH.peak)
    # reading each pair whole would cost more: the prefix's FLOPs once per pair
    assert prompt_bound([350, 370, 380], SHAPE, SLOW_MATH)["seconds"] > 2 * bound["seconds"]


def test_prompt_bound_is_the_prompts_flops_at_the_model_shape_peak():
    bound = prompt_bound([10, 20], SHAPE, SLOW_MATH)
    assert bound["prompt_tokens"] == 30
    assert bound["seconds"] == pytest.approx(prefill_flops(SHAPE, [10, 20]) / 1e9)
    # the same as a generation of one token each (no decoding step)
    one_token = [record(10, 1, 0, finished=False), record(20, 1, 0, finished=False)]
    assert generation_bound(one_token, SHAPE, SLOW_MATH)["seconds"] == pytest.approx(bound["seconds"])


def test_prefill_flops():
    weights = 2 * SHAPE.layer_params
    head = 2 * SHAPE.hidden * SHAPE.vocab
    assert prefill_flops(SHAPE, [1]) == weights + SHAPE.attention_flops(1) + head
    assert prefill_flops(SHAPE, [4], kept=0) == 4 * weights + SHAPE.attention_flops(1 + 2 + 3 + 4)
    assert prefill_flops(SHAPE, [2], past=10, kept=0) == 2 * weights + SHAPE.attention_flops(11 + 12)


def test_combined_rate_weights_by_flops():
    assert combined_rate([(1.0, 2.0), (1.0, 2.0)]) == pytest.approx(2.0)
    # 1 FLOP at 1 FLOP/s and 3 at 3: 4 FLOPs in 2 s
    assert combined_rate([(1.0, 1.0), (3.0, 3.0)]) == pytest.approx(2.0)


def test_training_bound_against_both_peaks():
    bound = training_bound(4e9, SLOW_MATH)
    assert bound == {"seconds": pytest.approx(4.0), "seconds_at_square_peak": pytest.approx(2.0)}


def test_bounds_from_json_medians():
    measured = {"bounds": {"square_peak_tflops": 0.5, "model_peak_tflops": 0.25, "read_gb_s": 20.0}}
    assert Bounds.from_json(measured) == Bounds(peak=0.25e12, square_peak=0.5e12, bandwidth=20e9)


def test_summary_and_repeat():
    from _common import repeat, summary

    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "values": [3.0, 1.0, 2.0]}
    values = iter([5.0, 1.0, 4.0, 2.0])
    result = repeat(lambda: next(values), 4)
    assert (result["median"], result["min"], result["max"], result["n"]) == (3.0, 1.0, 5.0, 4)
