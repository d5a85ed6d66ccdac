"""`humpback plan`: every stage of a run priced before it runs, from the config and token counts alone."""

import json
from types import SimpleNamespace

import pytest

from humpback_nb.cli import main
from humpback_nb.config import ConfigError, load_preset, with_overrides
from humpback_nb.plan import (
    KNOWN_MODELS,
    PAPER_CHARS,
    Architecture,
    build_plan,
    known_model,
    render_markdown,
    training_schedule,
)


@pytest.fixture(scope="module")
def tiny():
    return build_plan(load_preset("tiny"))


@pytest.fixture(scope="module")
def paper():
    return build_plan(load_preset("paper-7b"))


@pytest.fixture(scope="module")
def paper_full():
    return build_plan(load_preset("paper-7b-full"), gpu="h100", gpus=8)


def test_the_plan_lists_every_stage_in_the_order_of_the_method(tiny):
    from humpback_nb.stages import STAGES

    assert [s.stage for s in tiny.stages] == [s.name for s in STAGES]


def test_the_tiny_plan_trains_exactly_the_models_of_a_tiny_run(tiny):
    # By hand from presets/tiny.yaml and stages.py: backward, m0, m1, m2; the tags analysis trains m2_untagged;
    # the scaling analysis trains one model per quality and N in scaling_sizes [2, 4] that the quality has N
    # pairs for. Its 24 segments give at most 24 candidates: the top 8.3% keeps ceil(1.99) = 2 (N=2 only), the
    # top 38.8% keeps ceil(9.3) = 10 and "no curation" all 24 (N=2 and N=4). The selectors analysis trains one
    # model on the picks of each of M0 and M1.
    assert tiny.assumptions["seed"].startswith("measured") and tiny.assumptions["segments"].startswith("measured")
    assert tiny.assumptions["architecture"].startswith("config.json of smollm2-135m")
    trained = [name for s in tiny.stages for name in s.models]
    assert trained == ["backward", "m0", "m1", "m2", "m2_untagged", "selected_m0", "selected_m1",
                       "scaling_top_8_3_2", "scaling_top_38_8_2",
                       "scaling_top_38_8_4", "scaling_no_curation_2", "scaling_no_curation_4"]
    # every model trains train.max_steps = 2 steps, the scaling models evaluate.scaling_steps = 1
    steps = {s.stage: s.steps for s in tiny.stages if s.models}
    assert steps == {"backward": 2, "m0": 2, "m1": 2, "m2": 2, "tags": 2, "selectors": 2, "scaling": 5}


def test_totals_are_the_sums_of_the_stages(paper):
    totals = paper.totals
    for key in ("flops", "tokens_read", "tokens_written", "judge_calls", "disk_bytes", "steps"):
        assert totals[key] == pytest.approx(sum(getattr(s, key) for s in paper.stages))
    assert totals["gpu_hours"] == pytest.approx(sum(s.gpu_hours for s in paper.stages))
    # 4 of the method, m2_untagged, 2 trained on the selectors' picks, 3 x 8 scaling less one (A5 < 51,200)
    assert totals["models_trained"] == 30
    # the paper's rater scores in whole numbers: Figure 3's sets are its A5 and A4, as the scaling stage names them
    scaling = next(s for s in paper.stages if s.stage == "scaling").models
    assert scaling[0] == "scaling_a5_100" and "scaling_a4_51200" in scaling and "scaling_a5_51200" not in scaling


def test_the_paper_plan_rests_on_the_paper_lengths_and_the_table_of_known_models(paper):
    said = paper.assumptions
    assert said["architecture"].startswith("table of known models (llama-2-7b")
    assert said["seed"].startswith("paper: Table 2") and said["segments"].startswith("paper: Table 2")
    assert "stand-in" in said["tokenizer"]
    cpt = float(said["chars_per_token"].split(",")[0])
    seed_output = float(said["mean tokens"].split("output ")[1].split(";")[0])
    assert seed_output == pytest.approx(PAPER_CHARS["seed"][1] / cpt, abs=0.5)
    assert [s.judge_calls for s in paper.stages if s.judge_calls] == [4 * 885 * 2, 4 * 885 * 2, 2 * 885 * 2,
                                                                      23 * 885 * 2]


def test_full_fine_tuning_costs_about_6_flops_per_weight_and_token_lora_about_4():
    arch = KNOWN_MODELS["llama-2-7b"]
    weights = arch.layers * arch.layer_weights
    assert arch.training_flops(1, 1, 0, full=True, lora=0) / weights == pytest.approx(6, rel=1e-3)
    assert arch.training_flops(1, 1, 0, full=False, lora=0) / weights == pytest.approx(4, rel=1e-3)


def test_the_flop_count_and_the_schedule_are_the_trainers():
    from humpback_nb.method.train import training_flops

    arch = Architecture(576, 30, 9, 3, 1536, 49152, tied=True, head_dim=64)
    config = SimpleNamespace(hidden_size=576, num_attention_heads=9, head_dim=64, num_key_value_heads=3,
                             intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    examples = [{"input_ids": [1] * 40, "labels": [-100] * 30 + [1] * 10}] * 3
    for full, lora in ((True, 0), (False, arch.lora_weights(8))):
        assert arch.training_flops(3, 40, 10, full, lora) == training_flops(config, examples, lora, full)
    assert training_schedule(45021, load_preset("paper-7b").train) == (32, 1526)


def test_gpus_divide_the_wall_clock_not_the_gpu_hours(paper):
    eight = build_plan(load_preset("paper-7b"), gpus=8)
    assert eight.totals["gpu_hours"] == pytest.approx(paper.totals["gpu_hours"])
    assert eight.totals["wall_hours"] == pytest.approx(paper.totals["wall_hours"] / 8)


def test_memory_verdicts_follow_the_method_and_the_gpus(paper, paper_full):
    assert paper.memory.verdict == "fits"  # QLoRA 7B on one H100
    assert paper.memory.generation_verdict == "fits"  # 4-bit 7B and a KV cache of 32 x 2,048 tokens
    assert build_plan(load_preset("paper-7b"), gpu="a10").memory.verdict == "tight"  # 24 GB: mean lengths only
    assert paper_full.memory.verdict == "fits"  # 16 bytes a weight over 8 GPUs with FSDP
    one = build_plan(load_preset("paper-7b-full"), gpus=1)
    assert one.memory.verdict == "no"  # ~108 GB of weights and AdamW state
    assert one.memory.state_bytes == pytest.approx(8 * paper_full.memory.state_bytes)


def test_an_endpoint_judge_is_priced_in_calls_not_gpu_time(paper):
    # the paper preset judges at an endpoint (GPT-4, as the paper); the kit's judge on the base model costs GPU time
    assert load_preset("paper-7b").evaluate.judge_url
    kit_judge = {"evaluate.annotator": "kit", "evaluate.reference": "base", "evaluate.judge_url": None}
    local = build_plan(with_overrides(load_preset("paper-7b"), kit_judge))
    assert paper.totals["judge_calls"] == local.totals["judge_calls"]
    assert paper.totals["judge_reply_tokens"] == 4 * paper.totals["judge_calls"]
    assert local.totals["judge_reply_tokens"] == 0 and paper.totals["gpu_hours"] < local.totals["gpu_hours"]


def test_known_models_are_read_from_hub_ids():
    assert known_model("meta-llama/Llama-2-70b-hf") == "llama-2-70b"
    assert known_model("huggyllama/llama-30b") == "llama-33b"
    assert known_model("meta-llama/Meta-Llama-3-8B") is None
    assert KNOWN_MODELS["llama-2-70b"].kv_heads == 8  # grouped-query attention
    with pytest.raises(ConfigError, match="known models"):
        build_plan(with_overrides(load_preset("tiny"), {"model.name": "someone/unknown-model"}))


def test_markdown_has_a_row_per_stage_and_a_total(paper_full):
    lines = render_markdown(paper_full).splitlines()
    assert lines[0].startswith("| stage |") and "wall hours" in lines[0]
    assert sum(line.startswith("| ") for line in lines) == 1 + 16 + 1


def test_the_cli_prints_the_totals_and_exits_0(capsys):
    assert main(["plan", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "GPU-hours" in out
    assert main(["plan", "--preset", "tiny", "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["totals"]["wall_hours"] == pytest.approx(plan["totals"]["gpu_hours"] / 2)


def test_an_unknown_gpu_exits_2_with_one_line(capsys):
    assert main(["plan", "--preset", "tiny", "--gpu", "tpu-v9"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown GPU 'tpu-v9'" in err
