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


# -- layers: preset, then the user's file, then overrides ---------------------------------------------------
def test_a_file_with_one_change_is_its_base_preset_with_that_change(tmp_path):
    from humpback_nb.config import resolve_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {max_steps: 100}\n")
    config = resolve_config(config_file=mine)  # no base named: the demo preset, not the code's defaults
    demo = load_preset("demo")
    assert config.train.max_steps == 100 and config.preset == "demo"
    assert config.data == demo.data and config.model == demo.model
    mine.write_text("base: tiny\ntrain: {max_steps: 100}\n")
    assert resolve_config(config_file=mine).data == load_preset("tiny").data
    # --preset, then --config, then --set, in that order
    both = resolve_config("tiny", mine, {"train.max_steps": 7, "generate.temperature": 0.5})
    assert (both.train.max_steps, both.generate.temperature, both.data.seed_size) == (7, 0.5, 24)
    with pytest.raises(ConfigError, match="names base preset 'tiny', but preset 'demo' was given"):
        resolve_config("demo", mine)


def test_a_runs_own_config_file_reads_back_as_it_was(tmp_path):
    from humpback_nb.config import resolve_config

    tiny = with_overrides(load_preset("tiny"), {"train.max_steps": 3})
    path = save_config(tiny, tmp_path / "config.yaml")
    again = resolve_config(config_file=path)
    assert again.hash() == tiny.hash()


def test_config_shows_where_each_value_came_from_and_reads_back(tmp_path, capsys):
    from humpback_nb.cli import main

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\ntrain:\n  max_steps: 100\n")
    assert main(["config", "--config", str(mine), "--set", "generate.temperature=0.5"]) == 0
    text = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
    assert lines["max_steps"].endswith(f"# {mine}")
    assert lines["temperature"].endswith("# --set")
    assert lines["quantization"].endswith("# preset demo")
    assert lines["random_seed"].endswith("# default")
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    config = load_config(printed)
    assert (config.train.max_steps, config.generate.temperature, config.model.quantization) == (100, 0.5, "4bit")


@pytest.mark.parametrize("setting, message", [
    ("train.max_steps=-5", "train.max_steps must be in [1, inf]"),
    ("data.seed_size=0", "data.seed_size must be in [1, inf]"),
    ("curate.threshold=6", "curate.threshold must be in [1, 5]"),
    ("generate.temperature=-0.1", "generate.temperature must be in [0, inf]"),
    ("generate.top_p=0", "generate.top_p must be in (0, 1]"),
    ("evaluate.scaling_sizes=[4, -16]", "evaluate.scaling_sizes must be in [1, inf]"),
    ("data.min_chars=4000", "data.min_chars (4000) is above data.max_chars (3000)"),
])
def test_values_out_of_range_stop_in_one_line_naming_the_key(setting, message, capsys):
    from humpback_nb.cli import main

    assert main(["config", "--preset", "demo", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_top_p_zero_is_refused_but_one_is_allowed():
    with pytest.raises(ConfigError, match=r"generate.top_p must be in \(0, 1\]"):
        with_overrides(HumpbackConfig(), {"generate.top_p": 0.0})
    assert with_overrides(HumpbackConfig(), {"generate.top_p": 1.0}).generate.top_p == 1.0


def test_a_run_folder_that_is_a_file_stops_in_one_line(tmp_path, capsys):
    from humpback_nb.cli import main

    path = tmp_path / "run"
    path.write_text("not a folder")
    assert main(["run", "--preset", "tiny", "--run-dir", str(path)]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    assert path.read_text() == "not a folder"


# -- notebooks on a run folder: its own settings, or a stop that lists the differences ----------------------
def test_a_notebook_on_a_run_uses_its_settings_and_stops_when_its_own_differ(tmp_path):
    from humpback_nb.nb.notebooks import open_run
    from humpback_nb.run import RunFolder

    folder = RunFolder(tmp_path / "run", stages=())
    assert open_run(None, folder.path)[0] == load_preset("demo")  # an empty folder: the demo preset
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: tiny\ntrain: {max_steps: 5}\n")
    logged = []
    made = open_run(None, folder.path, mine)[0]
    folder.run(made, log=logged.append)
    before = folder.files.path("config").read_text()

    config, run = open_run(None, folder.path)  # nothing given: the run's own config, whatever made it
    assert config == made and run.path == folder.path
    assert open_run(None, folder.path, mine)[0] == made  # the same settings again: fine
    with pytest.raises(ConfigError) as stop:
        open_run("tiny", folder.path, overrides={"generate.temperature": 0.9})
    message = str(stop.value)
    assert "train.max_steps: 5 in the run, 2 here" in message
    assert "generate.temperature: 0.7 in the run, 0.9 here" in message
    assert "Nothing was changed" in message and "another run_dir" in message
    assert folder.files.path("config").read_text() == before

    folder.run(with_overrides(made, {"train.max_steps": 6}), log=logged.append)  # `humpback run` says what changed
    assert "changed     train.max_steps: 5 -> 6" in logged


def test_where_numbers_are_reported_changes_no_hash(tmp_path):
    from humpback_nb.pipeline import open_run

    config = load_preset("tiny")
    tracked = with_overrides(config, {"train.report_to": ["tensorboard"]})
    assert tracked.hash() == config.hash()
    folder = open_run(tmp_path / "run")
    assert all(folder.stage_hash(name, tracked) == folder.stage_hash(name, config) for name in folder.stages)
    assert with_overrides(config, {"train.lora_r": 8}).hash() != config.hash()
