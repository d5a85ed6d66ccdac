import subprocess
import sys

import pytest

from humpback_nb.config import (
    ConfigError,
    HumpbackConfig,
    config_hash,
    from_dict,
    load_config,
    load_preset,
    presets,
    save_config,
    with_overrides,
)


def test_presets_are_shipped():
    assert {"tiny", "demo", "paper-7b", "paper-7b-full"} <= set(presets())


@pytest.mark.parametrize("name", ["tiny", "demo", "paper-7b", "paper-7b-full"])
def test_yaml_round_trip(name, tmp_path):
    config = load_preset(name)
    path = save_config(config, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == config
    assert again.hash() == config.hash()


def test_the_full_fine_tuning_preset_carries_the_papers_hyperparameters():
    config = load_preset("paper-7b-full")
    assert config.train.method == "full" and config.model.quantization == "none"
    assert (config.train.learning_rate, config.train.final_learning_rate) == (1e-5, 9e-6)
    assert config.train.weight_decay == 0.1 and config.train.dropout == 0.1
    assert (config.generate.temperature, config.generate.top_p) == (0.7, 0.9)
    assert config.curate.threshold == 4.5 and config.curate.rater == "generate"
    assert config.data.seed_size == 3200 and (config.data.min_chars, config.data.max_chars) == (600, 3000)


def test_the_qlora_preset_differs_from_the_paper_only_in_how_it_trains():
    lora, full = load_preset("paper-7b"), load_preset("paper-7b-full")
    assert lora.train.method == "lora" and lora.model.quantization == "4bit"
    assert lora.train.learning_rate == 2e-4  # QLoRA's 7B rate (Dettmers et al. 2023)
    assert lora.train.final_learning_rate / lora.train.learning_rate == pytest.approx(0.9)  # the paper's decay
    for section in ("data", "generate", "curate", "evaluate"):
        assert lora.section(section) == full.section(section), section
    assert lora.model.name == full.model.name


def test_hash_is_stable_across_processes_and_key_order():
    config = load_preset("demo")
    code = "from humpback_nb.config import load_preset; print(load_preset('demo').hash())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == config.hash()
    data = config.to_dict()
    reordered = {key: data[key] for key in reversed(list(data))}
    assert config_hash(reordered) == config_hash(data)


def test_hash_follows_settings_not_the_label():
    config = load_preset("tiny")
    assert with_overrides(config, {"train.learning_rate": 3e-4}).hash() != config.hash()
    relabelled = from_dict({**config.to_dict(), "preset": "mine"})
    assert relabelled.hash() == config.hash()


def test_unknown_key_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'learning_rat' in section 'train'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: ten\n", "train.max_steps must be int or null"),
        ("model:\n  quantization: 8bit\n", "model.quantization must be one of"),
        ("data:\n  corpus_sources: c4_demo\n", "data.corpus_sources must be list"),
        ("random_seed: true\n", "random_seed must be int"),
        ("train: [1, 2]\n", "train. must be a mapping"),
        ("model: {name: x\n", "not valid YAML"),
    ],
)
def test_wrong_types_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(path)


def test_partial_config_overrides_defaults_and_ints_count_as_floats(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  learning_rate: 1\n")
    config = load_config(path)
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.model == HumpbackConfig().model


def test_overrides_refuse_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        with_overrides(HumpbackConfig(), {"train.nope": 1})
