"""`humpback plan`: every stage of a run priced before it runs, from the config and token counts alone."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from humpback_nb.cli import main
from humpback_nb.config import ConfigError, load_preset, with_overrides
from humpback_nb.plan import (
    GPUS,
    HOST_SECONDS_PER_OP,
    KNOWN_MODELS,
    NF4_BYTES,
    OPS_PER_LAYER,
    OPS_PER_NF4_LINEAR,
    OPS_PER_STEP,
    PAPER_CHARS,
    VLLM_DECODE_NEW_TOKENS,
    VLLM_DECODE_REQUESTS,
    VLLM_MODEL,
    VLLM_PREFILL_PROMPT_TOKENS,
    VLLM_PREFILL_REQUESTS,
    Architecture,
    _Costing,
    a_k_size,
    architecture,
    build_plan,
    known_model,
    load_calibration,
    measure_lengths,
    render_markdown,
    render_text,
    training_schedule,
    weight_bytes,
)
from humpback_nb.run import PipelineError


@pytest.fixture(scope="module")
def tiny():
    return build_plan(load_preset("tiny"))


@pytest.fixture(scope="module")
def paper():
    return build_plan(load_preset("paper-7b"))


@pytest.fixture(scope="module")
def paper_vllm():
    return build_plan(load_preset("paper-7b"), engine="vllm")


@pytest.fixture(scope="module")
def paper_full():
    return build_plan(load_preset("paper-7b-full"), gpu="h100", gpus=8)


def test_the_plan_lists_every_stage_in_the_order_of_the_method(tiny):
    from humpback_nb.pipeline import STAGES

    assert [s.stage for s in tiny.stages] == [s.name for s in STAGES]


def test_the_plan_walks_the_stages_a_run_runs(monkeypatch):
    """A third iteration appears in the plan as it appears in the run; a stage that declares no cost stops the plan
    with its name."""
    from dataclasses import replace

    from humpback_nb import plan as plan_module
    from humpback_nb.pipeline import pipeline

    three = build_plan(with_overrides(load_preset("tiny"), {"curate.iterations": 3}))
    names = [s.stage for s in three.stages]
    assert names == [s.name for s in pipeline(3)]
    assert names[names.index("m2") + 1:names.index("m2") + 4] == ["rate_m2", "A3", "m3"]
    assert [n for s in three.stages for n in s.models][:5] == ["backward", "m0", "m1", "m2", "m3"]
    assert next(s for s in three.stages if s.stage == "heldout").model_runs == 5  # base, M0..M3
    assert "m3_untagged" in next(s for s in three.stages if s.stage == "tags").models

    monkeypatch.setattr(plan_module, "pipeline", lambda t, method="humpback": [
        replace(s, cost=None) if s.name == "A1" else s for s in pipeline(t)])
    with pytest.raises(PipelineError, match="stage 'A1' declares no cost"):
        build_plan(load_preset("tiny"))


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
    # 4 of the method, m2_untagged, 3 trained on the selectors' picks (M0's, M1's and the endpoint's), 3 x 8
    # scaling less one (A5 < 51,200)
    assert totals["models_trained"] == 31
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
    # AlpacaEval once per model and prompt (805): eval's 4 models (and MT-bench's 80 prompts, 4 comparisons and
    # the judge's 4 checks against shuffled answers, in both orders by the kit's judge), Table 8's 3 more answers,
    # Table 7's 3 models (and the endpoint's ratings of 250 labelled pairs and of candidates until it has 100 at
    # A5's share), Figure 3's 23
    picking = 250 + math.ceil(100 / (a_k_size(load_preset("paper-7b"), 502_133) / 502_133))
    assert [s.judge_calls for s in paper.stages if s.judge_calls] == [4 * 805 + (4 + 4) * 80 * 2, 3 * 805,
                                                                      3 * 805 + picking, 23 * 805]


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


def test_an_endpoint_judge_is_priced_in_calls_not_gpu_time():
    # the kit's judge at an endpoint and on the base model: the same calls, tokens at the endpoint, GPU time locally
    kit = {"evaluate.annotator": "kit", "evaluate.reference": "base"}
    endpoint = build_plan(with_overrides(load_preset("paper-7b"), kit))
    local = build_plan(with_overrides(load_preset("paper-7b"), kit | {"evaluate.judge_url": None}))
    eval_endpoint, eval_local = (next(s for s in p.stages if s.stage == "eval") for p in (endpoint, local))
    assert eval_endpoint.judge_calls == eval_local.judge_calls == (4 + 4) * 885 * 2  # comparisons, checks
    assert eval_endpoint.judge_reply_tokens == 4 * eval_endpoint.judge_calls  # a one-letter reply
    assert eval_local.judge_reply_tokens == 0 and eval_endpoint.gpu_hours < eval_local.gpu_hours


def test_alpaca_eval_is_priced_as_alpaca_eval_sends_it(paper):
    from humpback_nb.method.alpaca_eval import load_annotator, render_prompt

    config = load_preset("paper-7b")
    annotator = load_annotator()
    assert annotator.max_tokens == 100
    scaling = next(s for s in paper.stages if s.stage == "scaling")
    calls = 23 * 805  # one order per instruction, as alpaca_eval 0.6.6 draws it
    assert scaling.judge_calls == calls and scaling.judge_reply_tokens == calls * 100
    template = 2 * config.generate.max_new_tokens  # its template holds both answers, each counted at the cap
    assert scaling.judge_prompt_tokens / calls > template + len(render_prompt(annotator.template, "", "", "")) / 10
    both = build_plan(with_overrides(config, {"evaluate.both_orders": True}))
    assert next(s for s in both.stages if s.stage == "scaling").judge_calls == 2 * calls
    assert "one order, as AlpacaEval" in paper.assumptions["judge"]


def test_the_judge_is_priced_in_money_given_a_price(capsys):
    priced = build_plan(load_preset("paper-7b"), judge_price=(30.0, 60.0))
    totals = priced.totals
    assert priced.judge_dollars == pytest.approx((30 * totals["judge_prompt_tokens"]
                                                  + 60 * totals["judge_reply_tokens"]) / 1e6)
    assert main(["plan", "--preset", "paper-7b", "--judge-price", "30", "60"]) == 0
    assert f"= ${priced.judge_dollars:,.0f} at $30 / $60 per million" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--preset", "paper-7b", "--judge-price", "-1", "60"])
    assert exit_.value.code == 2 and "a price is at least 0" in capsys.readouterr().err


def _decode_operators(layers: int, steps: int) -> int:
    """Operators dispatched by the kit's decoding loop on a small LLaMA of `layers` layers over `steps` steps."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from humpback_nb.infra.decode import decode

    class Count(TorchDispatchMode):
        operators = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operators += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 250, (4, 12))
    with Count() as count:  # no stop id can be drawn: every row writes every step
        decode(model, ids, torch.ones_like(ids), steps, stop_ids=[999], temperature=0.7, top_p=0.9,
               generator=torch.Generator().manual_seed(0))
    return count.operators


def test_the_host_work_of_a_decoding_step_is_counted_on_the_kits_own_loop():
    _decode_operators(2, 1)  # what happens once in a process (lazy set-up) is not a step's work
    per_step = {layers: (_decode_operators(layers, 12) - _decode_operators(layers, 4)) / 8 for layers in (2, 3)}
    assert per_step[3] - per_step[2] == OPS_PER_LAYER
    assert per_step[2] - 2 * OPS_PER_LAYER == OPS_PER_STEP


def test_eager_nf4_decoding_is_priced_above_its_bandwidth_floor():
    config = load_preset("paper-7b")
    arch, _ = architecture(config.model.name)
    lengths, _ = measure_lengths(config)
    cost = _Costing(config, arch, lengths, GPUS["h100"])
    # bitsandbytes dequantizes every weight at more than one row: 4 more bytes a weight read or written
    one, two = cost.step_seconds("candidates", 1, 0), cost.step_seconds("candidates", 2, 0)
    head, weights, bandwidth = arch.vocab * arch.hidden * 2, arch.layers * arch.layer_weights, GPUS["h100"].bandwidth
    host = (OPS_PER_STEP + arch.layers * OPS_PER_LAYER) * HOST_SECONDS_PER_OP
    nf4_host = host + arch.layers * 7 * OPS_PER_NF4_LINEAR * HOST_SECONDS_PER_OP  # and bitsandbytes' own operators
    assert one == pytest.approx(max(host, (weights * NF4_BYTES + head) / bandwidth))
    assert two == pytest.approx(max(nf4_host, (weights * (NF4_BYTES + 4) + head) / bandwidth))
    assert cost.step_seconds("candidates", 32, 600) > 4 * weight_bytes(config, arch) / GPUS["h100"].bandwidth
    bf16 = _Costing(with_overrides(config, {"model.quantization": "none"}), arch, lengths, GPUS["h100"])
    assert bf16.step_seconds("candidates", 32, 600) < cost.step_seconds("candidates", 32, 600)


def test_a_calibration_must_be_a_gpu_check_of_the_plans_model(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert main(["plan", "--preset", "tiny", "--calibrate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"error: {missing}: no such file (humpback gpu-check writes it in its run folder)")
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "old.json").write_text(json.dumps({"checks": []}))
    assert main(["plan", "--preset", "tiny", "--calibrate", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a gpu-check report with timings" in err
    with pytest.raises(ConfigError, match="this plan's model is"):
        load_calibration(_report(tmp_path, model="someone/else"), load_preset("tiny"))


def _report(tmp_path, model: str = "smollm2-135m-as-base", quantization: str = "none"):
    step = {"seconds_per_step": 0.05, "rows_per_step": 8.0, "prefill_tokens": 4000, "prefill_seconds": 2.0}
    report = {"timings": {"device": "test device", "model": model, "quantization": quantization,
                          "decoding": {"candidates": step, "rate_m0": step | {"seconds_per_step": 0.1}},
                          "training": {"backward": {"tokens_per_second": 1000.0},
                                       "m0": {"tokens_per_second": 500.0}}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    return path


def test_a_calibrated_plan_prices_with_what_was_measured(tmp_path, tiny):
    calibrated = build_plan(load_preset("tiny"), calibrate=_report(tmp_path))
    assert calibrated.calibrated_on == "test device" and "calibrated by" in calibrated.assumptions["utilization"]
    rows = {s.stage: s for s in calibrated.stages}
    config = load_preset("tiny")
    # M_yx trains at the measured 1,000 tokens/s, M0 at 500
    assert rows["backward"].compute_seconds == pytest.approx(rows["backward"].tokens_read / 1000)
    assert rows["m0"].compute_seconds == pytest.approx(rows["m0"].tokens_read / 500)
    # self-augmentation: its prompts at 2,000 tokens/s, each step 50 ms as measured
    candidates = rows["candidates"]
    steps = math.ceil(candidates.examples / config.generate.batch_size) * config.generate.instruction_max_new_tokens
    assert candidates.compute_seconds == pytest.approx(candidates.tokens_read / 2000)
    assert candidates.decode_seconds == pytest.approx(steps * 0.05)
    # answers were not measured here: their steps stay priced by the assumptions, and the plan says so
    assert "answers assumed as uncalibrated" in calibrated.assumptions["utilization"]
    uncalibrated = {s.stage: s for s in tiny.stages}
    assert rows["eval"].decode_seconds == pytest.approx(uncalibrated["eval"].decode_seconds)


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
    assert sum(line.startswith("| ") for line in lines) == 1 + len(paper_full.stages) + 1


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


def test_the_plans_the_docs_show_are_what_the_code_prices_now(capsys):
    # docs/plans/*.md are written by `make plans` from docs/plans/PLANS; a change to the plan regenerates them
    folder = Path(__file__).resolve().parents[1] / "docs" / "plans"
    lines = (folder / "PLANS").read_text().splitlines()
    assert lines
    for line in lines:
        name, args = line.split("|")
        shown = (folder / f"{name}.md").read_text()
        assert main(["plan", *args.split(), "--markdown"]) == 0
        expected = f"<!-- written by make plans: humpback plan {args} --markdown -->\n" + capsys.readouterr().out
        assert shown == expected, f"docs/plans/{name}.md is stale: run `make plans`"


def test_the_plan_says_each_decoding_step_and_which_part_bounds_it():
    text = render_text(build_plan(load_preset("paper-7b")))
    lines = [line for line in text.splitlines() if line.strip().startswith("candidates: decoding (candidates):")]
    assert lines
    assert re.search(r"\d+ ms a step \(the longer of the device's [\d.]+ ms and the host's [\d.]+ ms\)", lines[0])


# -- --engine vllm -------------------------------------------------------------------------------------------------
TRAINING_STAGES = ("backward", "m0", "m1", "m2", "heldout")  # training, and held-out losses: the kit's own code


def test_vllm_prices_generation_below_the_kits_own_loops(paper, paper_vllm):
    local, vllm = ({s.stage: s for s in p.stages} for p in (paper, paper_vllm))
    hours = "; ".join(f"{name} local {local[name].gpu_hours:.2f} vllm {vllm[name].gpu_hours:.2f}" for name in local)
    for name in ("candidates", "rate_m0", "rate_m1", "eval"):  # self-augmentation, the generate rater, answers
        assert vllm[name].gpu_hours < local[name].gpu_hours, f"GPU-hours per stage: {hours}"
    for name in TRAINING_STAGES:
        assert vllm[name].gpu_hours == local[name].gpu_hours, f"GPU-hours per stage: {hours}"
        assert vllm[name].compute_seconds == local[name].compute_seconds
    # the same work, priced otherwise
    for key in ("tokens_read", "tokens_written", "flops", "model_runs", "judge_calls"):
        assert paper_vllm.totals[key] == pytest.approx(paper.totals[key])
    assert paper.engine == "local" and paper_vllm.engine == "vllm"


def test_vllms_decoding_and_prompt_reading_are_its_published_figures_scaled_to_the_model(paper_vllm):
    arch, _ = architecture(load_preset("paper-7b").model.name)
    size = VLLM_MODEL.weights / arch.weights  # 8B over 7B by parameter count
    assert VLLM_MODEL.weights / 1e9 == pytest.approx(8.03, abs=0.01)  # Llama-3-8B, as its config.json counts
    new = VLLM_DECODE_REQUESTS * VLLM_DECODE_NEW_TOKENS * size
    prefill = VLLM_PREFILL_REQUESTS * VLLM_PREFILL_PROMPT_TOKENS * size
    candidates = next(s for s in paper_vllm.stages if s.stage == "candidates")
    assert candidates.decode_seconds == pytest.approx(candidates.tokens_written / new)
    assert candidates.compute_seconds == pytest.approx(candidates.tokens_read / prefill)
    # another GPU: decoding by its memory bandwidth, prompt reading by its bf16 FLOP/s, against the H100's
    a100 = next(s for s in build_plan(load_preset("paper-7b"), gpu="a100", engine="vllm").stages
                if s.stage == "candidates")
    assert a100.decode_seconds == pytest.approx(candidates.decode_seconds * GPUS["h100"].bandwidth
                                                / GPUS["a100"].bandwidth)
    assert a100.compute_seconds == pytest.approx(candidates.compute_seconds * GPUS["h100"].flops / GPUS["a100"].flops)


def test_the_plan_names_the_published_vllm_figures_and_the_engine(paper, paper_vllm, capsys):
    text, markdown = render_text(paper_vllm), render_markdown(paper_vllm)
    for shown in (text, markdown):
        assert "inference by vLLM" in shown
        assert "github.com/vllm-project/vllm/pull/7117" in shown and "Throughput: 24.32 requests/s" in shown
        assert "github.com/vllm-project/vllm/pull/4600" in shown and "--input-len 1000 --output-len 100" in shown
        assert "scaled by parameter count" in shown
    said = paper_vllm.assumptions
    assert said["engine"].startswith("vllm: ") and "vLLM decoding" in said and "vLLM prompt reading" in said
    # the server's starts, counted where a training or held-out losses stopped it: the candidates follow
    # backward_check's instructions on the same server; each of the scaling analysis' 23 models trains, then answers
    notes = {s.stage: s.notes for s in paper_vllm.stages}
    assert "vLLM server: 1 start(s)" in " ".join(notes["backward_check"])
    assert not any("vLLM server" in note for note in notes["candidates"])
    assert "vLLM server: 23 start(s)" in " ".join(notes["scaling"])
    assert "inference by vLLM" not in render_text(paper) and "engine" not in paper.assumptions
    assert main(["plan", "--preset", "tiny", "--engine", "vllm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "vllm"
    assert main(["plan", "--preset", "tiny", "--json"]) == 0
    assert "engine" not in json.loads(capsys.readouterr().out)  # a local plan's JSON as it was
    # the default is the config's engine.kind
    assert build_plan(with_overrides(load_preset("tiny"), {"engine.kind": "vllm"})).engine == "vllm"


def _vllm_report(tmp_path, measured: bool = True):
    """A gpu-check report (as _report) with what it measured of vLLM, when `measured`."""
    path = _report(tmp_path)
    report = json.loads(path.read_text())
    if measured:
        report["vllm"] = {"device": "test GPU", "new_tokens_per_second": 3000.0, "prefill_tokens_per_second": 20000.0,
                          "prompts": 64}
    path.write_text(json.dumps(report))
    return path


def test_a_gpu_check_that_measured_vllm_prices_vllm_with_what_it_measured(tmp_path):
    plan = build_plan(load_preset("tiny"), calibrate=_vllm_report(tmp_path), engine="vllm")
    rows = {s.stage: s for s in plan.stages}
    candidates = rows["candidates"]
    assert candidates.decode_seconds == pytest.approx(candidates.tokens_written / 3000)
    assert candidates.compute_seconds == pytest.approx(candidates.tokens_read / 20000)
    assert rows["m0"].compute_seconds == pytest.approx(rows["m0"].tokens_read / 500)  # training: as measured
    assert "measured by gpu-check on test GPU (64 prompts" in plan.assumptions["engine"]
    assert "vLLM decoding" not in plan.assumptions  # no published figure in its place
    # a report without a vLLM measurement: the published figures stay, and the plan says so
    unmeasured = build_plan(load_preset("tiny"), calibrate=_vllm_report(tmp_path, measured=False), engine="vllm")
    assert "measured no vLLM: the published figures stay assumptions" in unmeasured.assumptions["engine"]
    assert "vLLM decoding" in unmeasured.assumptions
    # the kit's own loops ignore it
    local = build_plan(load_preset("tiny"), calibrate=_vllm_report(tmp_path))
    assert local.engine == "local" and "engine" not in local.assumptions


def test_an_unknown_engine_exits_2_with_one_line(capsys):
    assert main(["plan", "--preset", "tiny", "--engine", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown engine 'nonsense'; engines: local, vllm" in err
