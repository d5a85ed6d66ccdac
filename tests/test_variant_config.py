"""The follow-ups' settings (config `variant`, `curate.sees`) and presets: what they change, what they leave alone
(a Humpback run's hashes), what they refuse, and what `humpback plan` counts for them."""

from __future__ import annotations

import dataclasses

import pytest

from humpback_nb import followups, pipeline
from humpback_nb.config import (
    NOT_HASHED,
    ConfigError,
    HumpbackConfig,
    VariantConfig,
    config_differences,
    config_hash,
    load_preset,
    with_overrides,
)

DEMO_PRESETS = {"bft": "bft-demo", "kun": "kun-demo", "alpagasus": "alpagasus-demo"}


# -- presets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(DEMO_PRESETS))
def test_demo_presets_are_the_demo_with_the_follow_up_s_settings(method):
    preset = load_preset(DEMO_PRESETS[method])
    assert preset.preset == DEMO_PRESETS[method]
    assert preset.variant.method == method
    assert config_differences(preset, with_overrides(load_preset("demo"), followups.VARIANT_SETTINGS[method])) == []


def test_a_preset_with_a_base_lays_its_keys_over_the_base():
    bft, paper = load_preset("bft-7b"), load_preset("paper-7b")
    changed = {key: new for key, _, new in config_differences(paper, bft)}
    assert changed == {"variant.method": "bft", "variant.model": "meta-llama/Llama-2-70b-chat-hf",
                       "variant.url": "http://127.0.0.1:8000/v1", "variant.max_new_tokens": 1024,
                       "variant.concurrency": 32}
    assert bft.variant.threshold == VariantConfig().threshold  # a key the preset does not name keeps the base's
    assert bft.model == paper.model and bft.train == paper.train


# -- hashes -----------------------------------------------------------------------------------------------------------
def hashed_before(config: HumpbackConfig, name: str):
    """What a stage's hash covered before the kit knew the follow-ups: no `variant` section, no `curate.sees`."""
    if name == "variant":
        return {}
    value = config.section(name)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in NOT_HASHED.get(name, ()) and k != "sees"}
    return value


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper-7b"])
def test_humpback_runs_keep_their_hashes(preset, tmp_path, monkeypatch):
    config = load_preset(preset)
    assert config.variant.method == "humpback" and config.curate.sees == "pair"
    assert config.hashed_section("variant") == {}
    assert "sees" not in config.hashed_section("curate")
    now = config.hash()
    folder = pipeline.open_run(tmp_path / "run", config)
    stage_hashes = {name: folder.stage_hash(name, config) for name in folder.stages}
    # the variant's own settings change nothing in a Humpback run
    other = with_overrides(config, {"variant.model": "elsewhere", "variant.threshold": 3.0,
                                    "variant.max_new_tokens": 9})
    assert other.hash() == now
    assert all(folder.stage_hash(name, other) == h for name, h in stage_hashes.items())
    # ... and every hash is the one the kit computed before it had them
    before = {name: hashed_before(config, name) for name in config.to_dict() if name != "preset"}
    assert now == config_hash({name: value for name, value in before.items() if value != {}})
    monkeypatch.setattr(HumpbackConfig, "hashed_section", hashed_before)
    assert {name: folder.stage_hash(name, config) for name in folder.stages} == stage_hashes


def test_a_follow_up_s_settings_are_hashed_in_its_own_run(tmp_path):
    bft = load_preset("bft-demo")
    assert bft.hashed_section("variant")["method"] == "bft"
    assert "concurrency" not in bft.hashed_section("variant")  # how many requests at once: not what they return
    assert with_overrides(bft, {"variant.concurrency": 2}).hash() == bft.hash()
    folder = pipeline.open_run(tmp_path / "run", bft)
    demo = pipeline.open_run(tmp_path / "demo", load_preset("demo"))
    humpback_stages = [name for name in demo.stages if name != "summary"]
    # Humpback's stages hash as in the demo's run: `humpback run --from runs/demo` links them
    assert all(folder.stage_hash(name, bft) == demo.stage_hash(name, load_preset("demo")) for name in humpback_stages)
    other = with_overrides(bft, {"variant.max_new_tokens": 100})
    assert folder.stage_hash("variant_pairs", other) != folder.stage_hash("variant_pairs", bft)
    assert folder.stage_hash("m1", other) == folder.stage_hash("m1", bft)


def test_curate_sees_instruction_changes_the_rating_stage_s_hash(tmp_path):
    config = load_preset("demo")
    alone = with_overrides(config, {"curate.sees": "instruction"})
    assert alone.hashed_section("curate")["sees"] == "instruction"
    assert alone.hash() != config.hash()
    folder = pipeline.open_run(tmp_path / "run", config)
    assert folder.stage_hash("rate_m0", alone) != folder.stage_hash("rate_m0", config)
    assert folder.stage_hash("m0", alone) == folder.stage_hash("m0", config)  # what does not read curate stays


# -- what is refused ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("variant.threshold", 6), ("variant.threshold", -0.5),
                                        ("variant.max_new_tokens", 0), ("variant.concurrency", 0)])
def test_out_of_range_is_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        with_overrides(load_preset("demo"), {key: value})


def test_threshold_ends_are_allowed():
    assert with_overrides(load_preset("demo"), {"variant.threshold": 5}).variant.threshold == 5
    assert with_overrides(load_preset("demo"), {"variant.threshold": 0}).variant.threshold == 0


@pytest.mark.parametrize("key, value", [("variant.method", "lima"), ("curate.sees", "output")])
def test_unknown_choices_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        with_overrides(load_preset("demo"), {key: value})


def test_follow_up_settings_name_known_keys():
    names = {f.name for f in dataclasses.fields(VariantConfig)}
    for settings in followups.VARIANT_SETTINGS.values():
        assert {key.split(".", 1)[1] for key in settings if key.startswith("variant.")} <= names


# -- the plan -----------------------------------------------------------------------------------------------------
def test_plan_lists_the_follow_up_s_stages():
    from humpback_nb.plan import build_plan, render_text

    plan = build_plan(load_preset("bft-7b"))
    rows = {row.stage: row for row in plan.stages}
    names = [row.stage for row in plan.stages]
    assert names[-4:] == ["variant_pairs", "bft", "variant_eval", "summary"]
    # the rewriter runs at its endpoint, on its own GPUs: noted, not priced on the run's
    assert rows["variant_pairs"].gpu_hours == 0
    assert any("Llama-2-70b-chat-hf" in note and "not counted" in note for note in rows["variant_pairs"].notes)
    assert rows["bft"].models == ["bft"] and rows["bft"].steps > 0 and rows["bft"].gpu_hours > 0
    assert rows["variant_eval"].judge_calls > 0
    text = render_text(plan)
    assert all(f"\n{name} " in text for name in ("variant_pairs", "bft", "variant_eval"))


def test_plan_prices_a_follow_up_the_run_s_own_gpus_do():
    from humpback_nb.plan import build_plan

    plan = build_plan(load_preset("kun-demo"))
    rows = {row.stage: row for row in plan.stages}
    assert [row.stage for row in plan.stages][-5:] == ["kun_rate", "variant_pairs", "kun", "variant_eval", "summary"]
    assert rows["kun_rate"].tokens_read > 0  # M0 rates every candidate's instruction
    assert rows["variant_pairs"].tokens_written > 0  # M0 polishes the kept segments, here
    assert rows["kun"].models == ["kun"]
