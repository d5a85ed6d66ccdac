"""Settings of a Humpback run: small dataclasses, presets kept as YAML data, a stable hash.

A run is described by one `HumpbackConfig`, built in layers (`resolve_config`): the defaults below, then a
preset (`tiny`, `demo`, `paper-7b`, ...: YAML files in `humpback_nb/presets/`), then a user's YAML file, then
dotted overrides. A user's file names its base preset with a top-level `base:` key (default: demo), so a
file with one change is that preset with one change. Every value is checked for its type and range here.
Every number of the method lives here, never in a notebook.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).with_name("presets")


# Headers that mark site furniture, not content; matched as whole words, a plural "s" allowed
# (paper section 3.1 names the first four; the last four are Wikipedia's link lists).
NAVIGATION_HEADERS = (
    "advertisement", "forum", "quick link", "free newsletter", "newsletter", "subscribe", "sign up",
    "log in", "login", "navigation", "related post", "related article", "share this", "comment",
    "leave a reply", "contact us", "privacy policy", "terms of use", "cookie policy",
    "see also", "external link", "further reading", "reference",
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names where and why."""


@dataclass
class ModelConfig:
    """The base model every model of the method (M_yx, M0, M1, M2) starts from."""

    name: str = "smollm2-135m"  # embedded name, a local folder with safetensors, or a hub id
    quantization: Literal["none", "4bit"] = "none"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: see models.runtime()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    context_length: int = 2048  # tokens the model reads and writes at once: prompt + answer when generating
    # On a CPU, bitsandbytes unpacks the NF4 weights again for every matmul. With this on, a 4-bit model is
    # unpacked once after quantization: the same NF4 weights, computed in bf16 as before, about twice as
    # fast, with the memory of a bf16 model. GPUs always keep the packed weights and bitsandbytes' kernels.
    dequantize_on_cpu: bool = True


@dataclass
class DataConfig:
    """Seed pairs and unlabelled segments (paper sections 2.1 and 3.1)."""

    seed_source: str = "alpaca_en_demo"  # embedded name, "oasst1" (hub), or a JSON / JSONL / parquet file
    seed_size: int = 3200  # pairs used for training; the paper's 3,200
    # further seed pairs kept out of training: M_yx on unseen outputs, and Table 7's positives (50 in the paper)
    heldout_size: int = 50
    seed_lang: str = "en"  # oasst1: language of the first turn
    seed_min_quality: float = 0.5  # oasst1: the reply's human `quality` label at least this
    corpus_sources: list[str] = field(default_factory=lambda: ["c4_demo", "wiki_demo", "enwiki_sample"])
    num_segments: int = 502_133  # segments sampled after filtering; the paper's 502k
    min_chars: int = 600
    max_chars: int = 3000
    navigation_headers: list[str] = field(default_factory=lambda: list(NAVIGATION_HEADERS))
    repeated_sentence_jaccard: float = 0.8  # word n-gram Jaccard above which two sentences are one repeated
    repeated_sentence_ngram: int = 3
    near_duplicate_jaccard: float = 0.8  # estimated word n-gram Jaccard above which two segments are one
    near_duplicate_ngram: int = 5
    minhash_permutations: int = 128


@dataclass
class TrainConfig:
    """Fine-tuning of M_yx, M0, M1 and M2 (paper section 3.1)."""

    method: Literal["lora", "full"] = "lora"  # LoRA on a 4-bit base is QLoRA
    lora_r: int = 16
    lora_alpha: int = 32
    dropout: float = 0.1  # the paper's dropout 0.1: on the LoRA adapters (method lora), on attention (method full)
    lora_target: str = "all-linear"
    learning_rate: float = 1e-5
    final_learning_rate: float = 9e-6  # the learning rate itself at the last step, not a multiplier
    weight_decay: float = 0.1
    batch_size: int | None = None  # None: the paper's rule (8 below 3,000 examples, else 32)
    max_steps: int | None = None  # None: the paper's data-scaling table
    micro_batch_size: int = 8  # per forward pass; batch_size is reached by accumulation
    max_seq_length: int = 1024  # training sequences (prompt + completion) are cut to this many tokens
    tags: bool = True  # seed examples get S_a and augmented ones S_w (False: the paper's "no tags" ablation)
    random_seed: int = 42
    save_steps: int = 50  # a checkpoint every this many steps, from which an interrupted stage resumes (0: none)
    # experiment trackers the Trainer reports to, e.g. ["tensorboard"] (logs in the model's folder), ["wandb"]
    report_to: list[str] = field(default_factory=list)


@dataclass
class GenerateConfig:
    """Sampling for self-augmentation and for answers (paper section 3.1: T=0.7, p=0.9)."""

    temperature: float = 0.7  # 0: greedy decoding
    top_p: float = 0.9
    max_new_tokens: int = 512  # answers
    batch_size: int = 16
    random_seed: int = 42  # batch b samples with random_seed + b
    instruction_max_new_tokens: int = 128  # instructions written by M_yx (the paper's average 352 characters)
    max_instruction_chars: int = 1000  # longer generated instructions are degenerate
    # An instruction still being written when instruction_max_new_tokens ran out is cut off, not an instruction:
    # its candidate is dropped and counted with the other degenerate ones.
    drop_capped: bool = True


@dataclass
class CurateConfig:
    """Self-curation: the rater and the quality threshold k of A_k (paper section 2.3)."""

    # "generate" (the paper's), "logprob" (the kit's), or "endpoint": an OpenAI-compatible endpoint (`rater_url`,
    # model `rater_model`) rates every candidate with the paper's prompt and parser, in place of M0 and M1 (a class
    # whose own small model cannot rate gets an A_k that is a selection; both iterations then ask the endpoint)
    rater: Literal["logprob", "generate", "endpoint"] = "logprob"
    threshold: float = 4.5  # A_k keeps pairs scored >= k; the paper's A5 is ">= 4.5"
    # Instead of a fixed k, keep this share of the rated candidates, best first (k becomes the lowest score
    # kept). For raters whose scores sit on another scale than the paper's integer ones; the paper's A5 was
    # 41,821 of 502,133 candidates (8.3%), its A4 195,043 (38.8%).
    top_share: float | None = None
    rater_tag: Literal["S_a+S_w", "S_a", "S_w", "none"] = "S_a"  # system prompt while rating (M0 knows S_a)
    # What the rater reads: the pair, as the paper ("pair"), or the instruction alone, as Kun (arXiv 2401.06477)
    # ("instruction"; the rubric is ours: method/prompts.py KUN_INSTRUCTION_PROMPT says why)
    sees: Literal["pair", "instruction"] = "pair"
    max_new_tokens: int = 256  # for the `generate` rater's reasoning
    batch_size: int = 16
    compare_size: int = 48  # candidates rated by both raters to compare them (notebook 04)
    sanity_size: int = 48  # seed, candidate and shuffled pairs each, for the rater sanity check
    rater_url: str | None = None  # rater "endpoint": e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    rater_model: str | None = None  # the model the endpoint serves, e.g. gpt-4o
    rater_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the endpoint's key
    rater_concurrency: int = 8  # requests to the endpoint in flight at once
    # Self-curation iterations T: for t = 1..T, M_{t-1} rates every candidate, A(t)_k, and M_t is trained on the seed
    # pairs and A(t)_k. The paper's 2 (M2 is Humpback); at least 2, since Table 7 compares M0's and M1's selections.
    # It decides which stages a run has, not what any stage makes, so it is in no stage's hash.
    iterations: int = 2


@dataclass
class EvaluateConfig:
    """Evaluation prompts and the judge (paper section 4)."""

    alpaca_eval_prompts: int = 805
    mt_bench_prompts: int = 80
    judge: str = "local"  # "local" (the base model), or the model name at `judge_url`
    judge_url: str | None = None  # an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    judge_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the endpoint's key
    judge_concurrency: int = 8  # requests to `judge_url` in flight at once
    # Who judges, against what. "kit": our one-letter judging prompt (the local base model, or `judge_url`)
    # against the base model's answers: not the paper's protocol. "alpaca_eval_gpt4": AlpacaEval 1.0 as the paper
    # ran it (Table 4): that annotator's prompt and parser, sent to `judge_url` (model `judge`, e.g. gpt-4), against
    # `reference`, which is then an AlpacaEval model-outputs JSON file or "tatsu-lab/alpaca_eval" (text-davinci-003).
    annotator: Literal["kit", "alpaca_eval_gpt4"] = "kit"
    # alpaca_eval_gpt4 only: AlpacaEval shows each pair once, in an order it draws from the instruction. True asks
    # both orders and averages them (position bias washed out, twice the judge's calls): an addition to AlpacaEval's
    # protocol, named in the protocol line. The kit's own judge always asks both orders.
    both_orders: bool = False
    reference: str = "base"  # "base": the base model's answers (annotator "kit" only)
    inference_tags: Literal["S_a+S_w", "S_a", "S_w", "none"] = "S_a+S_w"
    random_seed: int = 42  # which evaluation prompts are sampled
    # Figure 3 / Table 3: models trained on N augmented pairs of each quality (the paper's sizes); [] skips it.
    scaling_sizes: list[int] = field(default_factory=lambda: [100, 800, 1600, 3200, 6400, 12800, 25600, 51200])
    scaling_steps: int | None = None  # None: the paper's rule for N; a number caps the cost of each model
    # Table 7: labelled positives, held-out seed pairs, beside 4 negatives each (the paper: 50 of 250 candidates);
    # data.heldout_size must be at least this.
    selection_positives: int = 50
    # Table 7 with people's labels: a JSONL file of {"instruction", "output", "label"} (label 1 good, 0 not), in
    # place of the labels by construction (None).
    selection_labels: str | None = None
    # Table 7's win rates: a model trained on this many of the pairs each selector picks (the paper: 100).
    selection_train_size: int = 100


@dataclass
class EngineConfig:
    """Who runs inference (generation, the logprob rater, the local judge, held-out losses): the kit's own loops
    (`local`), or vLLM's OpenAI-compatible server (`vllm`), the engine to use at paper scale. How, not what: in no
    stage's hash (a run may switch engines; stages already done are kept)."""

    kind: Literal["local", "vllm"] = "local"
    # vllm: servers you run (one per GPU or node, each serving the base model as "base" with LoRA enabled and
    # runtime adapter loading, see docs/vllm.md); requests are spread over them. Empty: the kit starts its own.
    urls: list[str] = field(default_factory=list)
    # The kit's own server: the Python of an environment with vLLM (the one `make vllm` makes), and extra arguments
    # for `vllm.entrypoints.openai.api_server` (e.g. ["--tensor-parallel-size", "8"]).
    python: str = ".venv-vllm/bin/python"
    args: list[str] = field(default_factory=list)
    port: int = 8311  # the kit's server listens on 127.0.0.1 at this port
    kv_cache_gib: int = 2  # vLLM's CPU build: GiB for keys and values (VLLM_CPU_KVCACHE_SPACE)
    # The largest LoRA rank the kit's server takes: at least train.lora_r. vLLM prepares its LoRA kernels for this
    # rank: on its CPU build the first LoRA request took ~20 s at 8 and ~170 s at 64 (the tiny run's adapters).
    max_lora_rank: int = 16
    start_timeout: float = 600.0  # seconds the kit waits for its server to answer /health
    concurrency: int = 8  # requests in flight at once, each one batch of prompts
    request_timeout: float = 600.0  # seconds one request may take
    # Send each batch's seed (generate.random_seed + batch) with its request: sampling then repeats run to run.
    # vLLM's CPU build refuses per-request seeds; its server is started with --seed generate.random_seed instead.
    request_seeds: bool = False


@dataclass
class VariantConfig:
    """Which method the run's data is made by: Humpback (Li et al. 2023), or one of its follow-ups on the same
    stages (docs/variants.md). A follow-up's run holds Humpback's stages (shared with a Humpback run by hash, linked
    from it with `humpback run --from`) and adds its own: its pairs, its model, and its evaluation beside Humpback's.

    bft:        back-and-forth translation (Nguyen et al. 2024, arXiv 2408.04614): `model` rewrites each pair of
                A(1)_k from (generated instruction, original segment); the model trains on the seed pairs and the
                rewritten pairs.
    kun:        Kun (Zheng et al. 2024, arXiv 2401.06477): M0 rates each candidate's instruction alone; `model` (M0,
                as in Kun) polishes the segments of the ones kept (curate.top_share or curate.threshold) into answers.
    alpagasus:  AlpaGasus (Chen et al. 2023, arXiv 2307.08701): `model` rates the seed pairs with AlpaGasus's prompt
                (0-5); the pairs scored >= `threshold` train the model, alone."""

    method: Literal["humpback", "bft", "kun", "alpagasus"] = "humpback"
    # The model the follow-up asks: the rewriter (bft; the paper's Llama-2-70B-chat), the polisher (kun: "m0", the
    # run's own M0, as in Kun), or the rater (alpagasus; the paper's ChatGPT). An embedded name, a local folder or
    # a hub id, loaded or served by the run's engine, or "m0"; with `url`, the model an OpenAI-compatible endpoint
    # serves.
    model: str = "smollm2-135m"
    url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (a vLLM server of the 70B chat model) or an API
    key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the endpoint's key
    concurrency: int = 8  # requests to `url` in flight at once
    max_new_tokens: int = 512  # a rewrite (bft, kun), or the rater's reply (alpagasus)
    threshold: float = 4.5  # alpagasus: pairs rated >= this on its 0-5 scale are kept (the paper's 4.5)
    # alpagasus: how the model rates: "generate", as AlpaGasus (its reply's first line is the score), or "logprob"
    # (the score expected from the probabilities of "0".."5" as the reply's first token: for a model too small to
    # follow the prompt, as the kit's logprob rater)
    rating: Literal["generate", "logprob"] = "generate"
    # alpagasus: instead of `threshold`, keep this share of the rated pairs, best first (the paper's 4.5 kept 9,229
    # of Alpaca's 52,002 pairs, 17.7%); for scores on another scale than the paper's rater gives
    top_share: float | None = None
    # alpagasus: the pairs it curates: the run's seed pairs ("seed": data.seed_source), or an Alpaca-format JSON /
    # JSONL file of (instruction, input, output) records
    pairs: str = "seed"


@dataclass
class HumpbackConfig:
    """Everything one run of the method needs; `preset` records where it came from."""

    preset: str = "custom"
    random_seed: int = 42  # sampling of segments and of the analyses' data; not the seed pairs (data.seed_*)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """One section (`model`, `data`, ...) as a plain dict, or a top-level value."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    def hashed_section(self, name: str) -> Any:
        """`section(name)` without the settings that change no output (NOT_HASHED): what a stage's hash covers."""
        value = self.section(name)
        if name == "variant" and value["method"] == "humpback":
            return {}  # a follow-up's settings change nothing in a Humpback run: its hashes stay as they were
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_HASHED.get(name, ())
                     and (k, v) not in ADDED_SETTINGS.get(name, {}).items()}
        return value

    def hash(self) -> str:
        """A stable short hash of the settings (the `preset` label and NOT_HASHED settings do not count)."""
        hashed = {name: self.hashed_section(name) for name in self.to_dict() if name != "preset"}
        return config_hash({name: value for name, value in hashed.items() if value != {}})  # engine: how, not what


# Settings that change no output of the method, only where its numbers are reported or how many requests go out
# at once, or which engine runs inference: left out of every hash, so that turning on TensorBoard or moving to vLLM
# does not make a finished run stale.
NOT_HASHED: dict[str, tuple[str, ...]] = {"train": ("report_to",), "curate": ("rater_concurrency", "iterations"),
                                          "evaluate": ("judge_concurrency",), "variant": ("concurrency",),
                                          "engine": tuple(f.name for f in dataclasses.fields(EngineConfig))}

# Settings added after runs were made, with the value that does what the kit did before them: at that value a
# setting is left out of the hashes, so that a finished run stays done when the kit learns a new setting.
ADDED_SETTINGS: dict[str, dict[str, Any]] = {"curate": {"sees": "pair"}}


def config_hash(value: Any) -> str:
    """sha256 of the canonical JSON of `value`, first 12 hex digits: equal settings, equal hash."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_PRESET = "demo"  # the base of a user's config file that names none, and of the CLI without --preset


def presets() -> list[str]:
    """Names of the presets shipped with the kit."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> HumpbackConfig:
    """The defaults overridden by the preset `name` (tiny, demo, paper-7b)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(presets())}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)  # a preset may be another one with a few changes (bft-demo: demo, a follow-up)
    config = _merge(load_preset(base), raw, str(path)) if base else from_dict(raw, source=str(path))
    config.preset = name
    return config


def load_config(path: str | Path) -> HumpbackConfig:
    """Read a config YAML over the code's defaults: a full dump (a run's own config file) reads back as it was.
    A user's partial file is better read with `resolve_config(config_file=path)`, which lays it over its base."""
    raw = _read_yaml(Path(path))
    raw.pop("base", None)
    return from_dict(raw, source=str(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: no permission to read it") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections, got {type(raw).__name__}")
    return raw


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> HumpbackConfig:
    """The config of layers, each over the one before: defaults, preset, the user's file, dotted overrides.

    The preset is `preset`, else the one the file names with `base:`, else `demo`; the file and `preset` may not
    name two different ones. The result's `preset` label is that preset's name."""
    return _layers(preset, config_file, overrides)[0]


def explain_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> tuple[HumpbackConfig, dict[str, str]]:
    """`resolve_config`, and for every dotted key the layer its value came from: "default", "preset demo",
    the file's path, or "--set"."""
    return _layers(preset, config_file, overrides)


def _layers(preset: str | None, config_file: str | Path | None,
            overrides: dict[str, Any] | None) -> tuple[HumpbackConfig, dict[str, str]]:
    raw_file: dict[str, Any] = {}
    if config_file is not None:
        raw_file = _read_yaml(Path(config_file))
        base = raw_file.pop("base", None)
        raw_file.pop("preset", None)  # a run's own config file records its preset as a label: the file's values count
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{config_file}: base must be a preset name ({', '.join(presets())}), got {base!r}")
        if base and preset and base != preset:
            raise ConfigError(f"{config_file}: names base preset {base!r}, but preset {preset!r} was given; "
                              "give one of them")
        preset = preset or base
    preset = preset or DEFAULT_PRESET
    config = load_preset(preset)
    defaults = _flatten(HumpbackConfig().to_dict())
    layer = _flatten(config.to_dict())
    sources = {key: "default" if layer[key] == defaults.get(key) else f"preset {preset}" for key in layer}
    if config_file is not None:
        config = _merge(config, raw_file, str(config_file))
        sources.update({key: str(config_file) for key in _flatten(raw_file, leaves_only=True)})
    if overrides:
        config = with_overrides(config, overrides)
        sources.update({key: "--set" for key in overrides})
    config.preset = preset
    sources.pop("preset", None)
    return config, sources


def _merge(config: HumpbackConfig, raw: dict[str, Any], source: str) -> HumpbackConfig:
    """`config` with the sections and keys of `raw` laid over it (a section lists only what it changes)."""
    data = config.to_dict()
    for name, value in raw.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return from_dict(data, source=source)


def _flatten(data: dict[str, Any], prefix: str = "", leaves_only: bool = False) -> dict[str, Any]:
    """{"train": {"max_steps": 2}} -> {"train.max_steps": 2}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}.", leaves_only))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: HumpbackConfig, new: HumpbackConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs; the `preset` label does not count."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [(key, a.get(key), b.get(key)) for key in a | b if key != "preset" and a.get(key) != b.get(key)]


def render_config(config: HumpbackConfig, sources: dict[str, str] | None = None) -> str:
    """The config as YAML; with `sources`, each value followed by a comment naming the layer it came from.
    The text reads back with `load_config` as the same config."""
    if not sources:
        return config_yaml(config)
    lines = [f"preset: {config.preset}"]
    for name, value in config.to_dict().items():
        if name == "preset":
            continue
        if not isinstance(value, dict):
            lines.append(f"{name}: {_scalar(value)}  # {sources.get(name, 'default')}")
            continue
        lines.append(f"{name}:")
        for key, item in value.items():
            text = f"  {key}: {_scalar(item)}"
            lines.append(f"{text:<44}  # {sources.get(f'{name}.{key}', 'default')}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def config_yaml(config: HumpbackConfig) -> str:
    """The full config as YAML, as a run folder keeps it; `load_config` reads it back as the same config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def save_config(config: HumpbackConfig, path: str | Path) -> Path:
    """Write the full config as YAML, atomically: to a `.tmp-` name beside `path` (the leftover of an interrupted
    write that `infra.files.clean_temporaries` removes), flushed, then renamed into place. This module imports no
    other module of the kit, so `infra.files.discard_writes` does not see this write: where it must, write
    `config_yaml(config)` with `infra.files.atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(config_yaml(config))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# The range of every number that has one: (lowest, highest, ends), ends "[]" both allowed, "(]" the lowest not.
# None: unbounded.
_POSITIVE = (0, None, "()")
_AT_LEAST_1 = (1, None, "[]")
_NOT_NEGATIVE = (0, None, "[]")
_SHARE = (0, 1, "[]")
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "model.context_length": _AT_LEAST_1,
    "data.seed_size": _AT_LEAST_1, "data.heldout_size": _NOT_NEGATIVE, "data.seed_min_quality": _SHARE,
    "data.num_segments": _AT_LEAST_1, "data.min_chars": _NOT_NEGATIVE, "data.max_chars": _AT_LEAST_1,
    "data.repeated_sentence_jaccard": (0, 1, "(]"), "data.repeated_sentence_ngram": _AT_LEAST_1,
    "data.near_duplicate_jaccard": (0, 1, "(]"), "data.near_duplicate_ngram": _AT_LEAST_1,
    "data.minhash_permutations": _AT_LEAST_1,
    "train.lora_r": _AT_LEAST_1, "train.lora_alpha": _POSITIVE, "train.dropout": (0, 1, "[)"),
    "train.learning_rate": _POSITIVE, "train.final_learning_rate": _NOT_NEGATIVE, "train.weight_decay": _NOT_NEGATIVE,
    "train.batch_size": _AT_LEAST_1, "train.max_steps": _AT_LEAST_1, "train.micro_batch_size": _AT_LEAST_1,
    "train.max_seq_length": _AT_LEAST_1, "train.save_steps": _NOT_NEGATIVE,
    "generate.temperature": _NOT_NEGATIVE, "generate.top_p": (0, 1, "(]"), "generate.max_new_tokens": _AT_LEAST_1,
    "generate.batch_size": _AT_LEAST_1, "generate.instruction_max_new_tokens": _AT_LEAST_1,
    "generate.max_instruction_chars": _AT_LEAST_1,
    "curate.threshold": (1, 5, "[]"), "curate.top_share": (0, 1, "(]"), "curate.max_new_tokens": _AT_LEAST_1,
    "curate.batch_size": _AT_LEAST_1, "curate.compare_size": _NOT_NEGATIVE, "curate.sanity_size": _NOT_NEGATIVE,
    "curate.rater_concurrency": _AT_LEAST_1, "evaluate.judge_concurrency": _AT_LEAST_1,
    "curate.iterations": (2, 20, "[]"),
    "variant.concurrency": _AT_LEAST_1, "variant.max_new_tokens": _AT_LEAST_1, "variant.threshold": (0, 5, "[]"),
    "variant.top_share": (0, 1, "(]"),
    "engine.port": (1, 65535, "[]"), "engine.kv_cache_gib": _AT_LEAST_1, "engine.start_timeout": _POSITIVE,
    "engine.concurrency": _AT_LEAST_1, "engine.max_lora_rank": _AT_LEAST_1, "engine.request_timeout": _POSITIVE,
    "evaluate.alpaca_eval_prompts": _AT_LEAST_1, "evaluate.mt_bench_prompts": _NOT_NEGATIVE,
    "evaluate.scaling_sizes": _AT_LEAST_1, "evaluate.scaling_steps": _AT_LEAST_1,
    "evaluate.selection_positives": _AT_LEAST_1, "evaluate.selection_train_size": _AT_LEAST_1,
}


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> HumpbackConfig:
    """Build a config from nested dicts, checking every key, type and range against the dataclasses."""
    config = _build(HumpbackConfig, raw, source, prefix="")
    _check_ranges(config, source)
    return config


def _check_ranges(config: HumpbackConfig, source: str) -> None:
    flat = _flatten(config.to_dict())
    for key, (low, high, ends) in RANGES.items():
        values = flat[key] if isinstance(flat[key], list) else [flat[key]]
        for value in values:
            if value is None:
                continue
            below = low is not None and (value < low if ends[0] == "[" else value <= low)
            above = high is not None and (value > high if ends[1] == "]" else value >= high)
            if below or above:
                shown = f"{ends[0]}{low}, {'inf' if high is None else high}{ends[1]}"
                raise ConfigError(f"{source}: {key} must be in {shown}, got {value!r}")
    # settings that must agree with each other
    if flat["data.min_chars"] > flat["data.max_chars"]:
        raise ConfigError(f"{source}: data.min_chars ({flat['data.min_chars']}) is above data.max_chars "
                          f"({flat['data.max_chars']})")
    engine, train = config.engine, config.train
    if engine.kind == "vllm" and train.method == "lora" and train.lora_r > engine.max_lora_rank:
        raise ConfigError(f"{source}: train.lora_r ({config.train.lora_r}) is above engine.max_lora_rank "
                          f"({config.engine.max_lora_rank}): vLLM would refuse the run's adapters; raise it")


def with_overrides(config: HumpbackConfig, overrides: dict[str, Any]) -> HumpbackConfig:
    """A copy of `config` with dotted overrides applied, e.g. {"train.learning_rate": 2e-5}."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: unknown key {leaf!r}")
        node[leaf] = value
    return from_dict(data, source="overrides")


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'the config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f" in section {prefix[:-1]!r}" if prefix else ""
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{where}; known keys: {', '.join(sorted(names))}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, prefix=f"{prefix}{name}.")
        else:
            values[name] = _check(value, hint, source, f"{prefix}{name}")
    return cls(**values)


def _check(value: Any, hint: Any, source: str, key: str) -> Any:
    """Return `value` if it fits `hint` (ints are accepted for floats), else raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg, source, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
    elif origin is list:
        if isinstance(value, list):
            return [_check(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
