"""What a run costs before anyone pays for it: every stage of a config, as arithmetic over token counts.

For each stage of a run (pipeline.py), in its order, as the stage's own cost declaration counts it (`Stage.cost`, a
function of `Work`, beside the stage): the models it trains (with the paper's schedule where the config leaves
steps open), the tokens it reads and writes, its FLOPs, GPU-hours, judge calls and disk; with N GPUs the wall-clock
time and whether training fits the GPUs' memory. Nothing here loads model weights: token counts come
from the configured tokenizer on a sample of the configured data when both are at hand, else from the paper's
lengths (Li et al. 2023, arXiv 2308.06259, Table 2) at the characters per token of the tokenizer at hand, and
every number says which. FLOPs follow `train.training_flops` (PaLM's count, Chowdhery et al. 2022, appendix B).
With `engine` vllm (`--engine vllm`), generation and the rater's and the judge's prompt reading are priced at vLLM's
published throughput, or at what a gpu-check measured of it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from humpback_nb.config import ConfigError, HumpbackConfig
from humpback_nb.method.analysis import PAPER_SHARES  # Table 2: |A5|, |A4| over all candidates
from humpback_nb.method.schedule import paper_schedule
from humpback_nb.pipeline import pipeline
from humpback_nb.run import PipelineError


# -- the hardware ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    """One accelerator: dense bf16 tensor-core peak (no sparsity), memory, memory bandwidth."""

    label: str
    flops: float  # FLOP/s
    memory: float  # bytes
    bandwidth: float  # bytes/s


# Vendor datasheets: NVIDIA H100 Tensor Core GPU (SXM5), H200 (SXM), A100 80GB / 40GB (SXM), L40S, A10,
# and the Ada Lovelace architecture whitepaper (RTX 4090, bf16 with fp32 accumulate). Sparse figures are twice these.
GPUS = {
    "h100": Gpu("H100 SXM 80GB", 989e12, 80e9, 3.35e12),
    "h200": Gpu("H200 SXM 141GB", 989e12, 141e9, 4.8e12),
    "a100": Gpu("A100 SXM 80GB", 312e12, 80e9, 2.039e12),
    "a100-40gb": Gpu("A100 SXM 40GB", 312e12, 40e9, 1.555e12),
    "l40s": Gpu("L40S 48GB", 362e12, 48e9, 0.864e12),
    "a10": Gpu("A10 24GB", 125e12, 24e9, 0.6e12),
    "rtx4090": Gpu("RTX 4090 24GB", 165.2e12, 24e9, 1.008e12),
}
# Model FLOPs utilization for training, prompt reading (prefill) and forward-only scoring: an assumption, below
# the 46.2% PaLM reached (Chowdhery et al. 2022, arXiv 2204.02311, Table 3); `--calibrate` replaces it.
MFU = 0.40

# Decoding, as the kit decodes: eager transformers, one token per row still writing per step (infra/decode.py).
# A step takes the longer of the device's work and the host's, which overlap until the step's tokens are read back:
# - device: every byte it reads over the datasheet bandwidth (a floor: real kernels reach less). With NF4 weights
#   and more than one row, bitsandbytes' Linear4bit dequantizes each weight matrix to bf16 and multiplies by that:
#   it reads the packed weight, writes the bf16 copy and reads it again (0.516 + 2 + 2 bytes a weight, not 0.516;
#   its one-row kernel, gemv_4bit, reads the packed weight only). Then the vocabulary head and the KV cache.
# - host: the operators a step dispatches, each at HOST_SECONDS_PER_OP. OPS_PER_LAYER and OPS_PER_STEP are counted
#   on transformers' LLaMA in the kit's own loop (tests/test_plan.py counts them again; benchmarks/host_overhead.py
#   prints them with the seconds this machine spends on each).
OPS_PER_LAYER = 60  # norms, projections, rotary embedding, attention, MLP, residuals, the cache's writes
OPS_PER_STEP = 70  # embedding, final norm, head, sampling, the loop's bookkeeping
OPS_PER_NF4_LINEAR = 4  # an assumption: bitsandbytes' dequantize_4bit, the cast and transpose, its input cast
# An assumption: some 6 us of Python and dispatch an operator (benchmarks/host_overhead.py: 6.2 on a 2-core Xeon),
# less on a faster host, and ~3 us to launch a CUDA kernel. `humpback gpu-check` measures the whole step.
HOST_SECONDS_PER_OP = 8e-6


# -- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """The shape of a LLaMA-style decoder (what the FLOPs and bytes depend on)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False  # input embedding shared with the vocabulary head
    head_dim: int = 0  # 0: hidden // heads

    @property
    def width(self) -> int:
        """Attention width: heads x head dimension."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def layer_weights(self) -> int:
        """Weights of the linear layers of one block (q, k, v, o, gate, up, down), as train.training_flops counts."""
        kv = self.kv_heads * (self.head_dim or self.hidden // self.heads)
        return 2 * self.hidden * self.width + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def embedding_weights(self) -> int:
        """Input embedding plus vocabulary head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def weights(self) -> int:
        """All weights, norms aside (a few thousand per layer)."""
        return self.layers * self.layer_weights + self.embedding_weights

    def lora_weights(self, r: int) -> int:
        """LoRA's weights with rank r on every linear layer of every block ("all-linear" leaves the head out)."""
        kv = self.kv_heads * (self.head_dim or self.hidden // self.heads)
        shapes = [(self.hidden, self.width), (self.hidden, kv), (self.hidden, kv), (self.width, self.hidden),
                  (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]
        return self.layers * r * sum(a + b for a, b in shapes)

    def kv_bytes_per_token(self, value_bytes: int = 2) -> int:
        """Bytes of keys and values one token leaves in the cache (bf16)."""
        return 2 * self.layers * self.kv_heads * (self.head_dim or self.hidden // self.heads) * value_bytes

    def forward_flops(self, tokens: float, context: float, head_tokens: float) -> float:
        """Forward FLOPs for `tokens` tokens attending over `context` positions each, the vocabulary head computed
        for `head_tokens` of them (train.training_flops' count, forward only: 2 per weight, 4 x width x context)."""
        return (2 * self.layers * self.layer_weights * tokens + 4 * self.layers * self.width * context * tokens
                + 2 * self.vocab * self.hidden * head_tokens)

    def training_flops(self, examples: float, length: float, learned: float, full: bool, lora: int) -> float:
        """train.training_flops for `examples` examples of `length` tokens with `learned` of them in the loss."""
        per_weight = 6 if full else 4
        return examples * ((per_weight * self.layers * self.layer_weights + 6 * lora) * length
                           + 12 * self.layers * self.width * length * length
                           + per_weight * self.vocab * self.hidden * learned)


# Published configs (config.json of each checkpoint on the hub; LLaMA-1 as converted by transformers, e.g.
# huggyllama/*, the 33B also called 30B). None ties its embeddings; LLaMA-2 70B uses grouped-query attention.
KNOWN_MODELS = {
    "llama-7b": Architecture(4096, 32, 32, 32, 11008, 32000),
    "llama-13b": Architecture(5120, 40, 40, 40, 13824, 32000),
    "llama-33b": Architecture(6656, 60, 52, 52, 17920, 32000),
    "llama-65b": Architecture(8192, 80, 64, 64, 22016, 32000),
    "llama-2-7b": Architecture(4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": Architecture(5120, 40, 40, 40, 13824, 32000),
    "llama-2-70b": Architecture(8192, 80, 64, 8, 28672, 32000),
}


# -- vLLM, as published -------------------------------------------------------------------------------------
# `--engine vllm` prices generation and the rater's and the local judge's prompt reading at vLLM's throughput: two
# runs of vLLM's own benchmark (benchmarks/benchmark_throughput.py: the offline engine, every prompt at once, the
# batch as vLLM schedules it) by its maintainers, on one H100 with a bf16 Llama-3-8B, each counted whole as one kind
# of work (the other kind's tokens included: a floor on each rate). Scaled to the plan's model by parameter count
# and to its GPU by memory bandwidth (decoding) or bf16 FLOP/s (prompt reading); `--calibrate` with a gpu-check
# report that measured vLLM replaces both.
ENGINES = ("local", "vllm")
VLLM_MODEL = Architecture(4096, 32, 32, 8, 14336, 128256)  # Meta-Llama-3-8B (its published config.json)
VLLM_GPU = "h100"
# Decoding: vLLM pull request 7117 (github.com/vllm-project/vllm/pull/7117, 2024-08-04), "On H100: python
# benchmarks/benchmark_throughput.py --input-len 256 --output-len 256 --model meta-llama/Meta-Llama-3-8B", main branch,
# the first of three trials: "Throughput: 24.32 requests/s, 12453.04 tokens/s" (prompt and output tokens together).
VLLM_DECODE_REQUESTS = 24.32  # a second, each 256 prompt tokens and 256 new ones
VLLM_DECODE_NEW_TOKENS = 256
# Prompt reading: vLLM pull request 4600 (github.com/vllm-project/vllm/pull/4600, "bump version to v0.4.2",
# 2024-05-04), on one H100, "python benchmark_throughput.py --input-len 1000 --output-len 100 --model
# meta-llama/Meta-Llama-3-8B-Instruct", v0.4.1, 8B: "Throughput: 20.72 r" (the stored copy read for this stops
# there; the script prints requests/s first).
VLLM_PREFILL_REQUESTS = 20.72  # a second, each 1,000 prompt tokens and 100 new ones
VLLM_PREFILL_PROMPT_TOKENS = 1000


@dataclass(frozen=True)
class EngineRates:
    """What one GPU's vLLM server does a second: new tokens written (decoding) and prompt tokens read, and where the
    two numbers came from."""

    new_tokens_per_second: float
    prefill_tokens_per_second: float
    source: str


def published_vllm_rates(arch: Architecture, gpu: Gpu) -> EngineRates:
    """vLLM's published throughput (the constants above) for a model of shape `arch` on `gpu`: scaled by parameter
    count, and by the GPU's memory bandwidth (decoding) or bf16 FLOP/s (prompt reading) against the H100's."""
    reference = GPUS[VLLM_GPU]
    size = VLLM_MODEL.weights / arch.weights
    new = VLLM_DECODE_REQUESTS * VLLM_DECODE_NEW_TOKENS * size * gpu.bandwidth / reference.bandwidth
    prefill = VLLM_PREFILL_REQUESTS * VLLM_PREFILL_PROMPT_TOKENS * size * gpu.flops / reference.flops
    return EngineRates(new, prefill, "published")


def known_model(name: str) -> str | None:
    """The key of KNOWN_MODELS a hub id names (meta-llama/Llama-2-7b-hf -> llama-2-7b), or None."""
    base = name.lower().split("/")[-1]
    match = re.match(r"(?:llama-?(2)-?|llama-)(\d+)b", base)
    if not match:
        return None
    size = {"30": "33"}.get(match.group(2), match.group(2))
    key = f"llama-{'2-' if match.group(1) else ''}{size}b"
    return key if key in KNOWN_MODELS else None


def local_model(model_name: str) -> Path | None:
    """The folder of an embedded model or a local folder; None for a hub id (never fetched here)."""
    from humpback_nb.infra.models import ModelError, resolve

    try:
        source = Path(resolve(model_name))
    except ModelError as err:
        raise ConfigError(f"model.name: {err}") from None
    return source if source.is_dir() else None


def architecture(model_name: str) -> tuple[Architecture, str]:
    """(architecture, where it came from): config.json of the embedded or a local model, else the known table."""
    folder = local_model(model_name)
    if folder is not None and (folder / "config.json").is_file():
        c = json.loads((folder / "config.json").read_text())
        arch = Architecture(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                            c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                            c["vocab_size"], bool(c.get("tie_word_embeddings", False)), c.get("head_dim") or 0)
        return arch, f"config.json of {model_name}"
    key = known_model(model_name)
    if key is None:
        raise ConfigError(f"model.name {model_name!r}: not at hand and not in the table of known models "
                          f"({', '.join(KNOWN_MODELS)}); point model.name at a local folder with its config.json")
    return KNOWN_MODELS[key], f"table of known models ({key}, its published config.json)"


# -- token counts -------------------------------------------------------------------------------
# Table 2 of the paper (v1), mean characters of instruction and output.
PAPER_CHARS = {"seed": (148, 1072), "A5": (115, 1663), "A4": (206, 1985), "augmented": (352, 1722)}
SAMPLE = 200  # records per data source whose tokens are counted
SCAN_DOCUMENTS = 5000  # documents read per corpus to sample and count segments (a plan takes seconds)
NF4_BYTES = 4.127 / 8  # NF4 with double quantization: 4 + 0.127 bits a weight (Dettmers et al. 2023, section 3)


@dataclass
class Lengths:
    """Mean tokens of each kind of text, the prompts' own tokens, and where each number came from."""

    chars_per_token: float
    seed: list[tuple[float, float]]  # (instruction, output) of each sampled pair, or the paper's means
    segments: list[float]  # each sampled unlabelled segment (a candidate's output), or the paper's mean
    instruction: float  # an instruction M_yx writes
    curated: dict[str, list[tuple[float, float]]]  # A_k and the scaling pools: (instruction, output)
    eval_prompt: float
    eval_prompts: int  # how many evaluation prompts each answering model gets
    backward_overhead: int
    rubric: int
    forward_overhead: dict[str, int]  # by tag
    judge_overhead: int
    alpaca_eval_overhead: int = 0  # AlpacaEval's annotator prompt without its three texts
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def seed_mean(self) -> tuple[float, float]:
        return (sum(i for i, _ in self.seed) / len(self.seed), sum(o for _, o in self.seed) / len(self.seed))

    @property
    def segment(self) -> float:
        return sum(self.segments) / len(self.segments)


def _tokenizer(config: HumpbackConfig) -> tuple[Any, str]:
    """(tokenizer, what it is): the model's own when it is at hand (embedded or a local folder), else the embedded
    one in the kit's format for base models (the format a LLaMA base model gets: it has no chat template)."""
    from humpback_nb.infra.chat import BASE_TEMPLATE
    from humpback_nb.infra.models import load_tokenizer

    if local_model(config.model.name) is not None:
        return load_tokenizer(config.model), f"{config.model.name}'s own tokenizer"
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.chat_template = BASE_TEMPLATE
    return tokenizer, (f"stand-in: the embedded smollm2-135m tokenizer in the base-model format "
                       f"({config.model.name} is not at hand)")


def _count(tokenizer, texts: list[str]) -> float:
    return sum(_tokens(tokenizer, texts)) / max(1, len(texts))


def _tokens(tokenizer, texts: list[str]) -> list[float]:
    return [float(len(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts]


def _local_seed(config: HumpbackConfig) -> list[dict] | None:
    from humpback_nb.infra.sources import SOURCES
    from humpback_nb.method.data.seed import load_seed

    source = config.data.seed_source
    if source not in SOURCES and not Path(source).expanduser().is_file():
        return None
    return load_seed(config.data)[0][:SAMPLE]


def _local_segments(config: HumpbackConfig) -> tuple[list[str], int | None] | None:
    """(a sample of segment texts, how many segments of the right length the corpora hold, or None when a corpus
    is longer than the documents read here) when every corpus is at hand."""
    from itertools import islice

    from humpback_nb.infra.sources import SOURCES
    from humpback_nb.method.data.segments import read_documents, segment_documents

    data = config.data
    if not data.corpus_sources or any(s not in SOURCES and not Path(s).expanduser().exists()
                                      for s in data.corpus_sources):
        return None
    sample, count, whole = [], 0, True
    for source in data.corpus_sources:
        taken, documents = 0, 0

        def counted(source=source):
            nonlocal documents
            for document in islice(read_documents(source), SCAN_DOCUMENTS):
                documents += 1
                yield document

        for segment in segment_documents(counted(), data.max_chars):
            if data.min_chars <= len(segment["text"]) <= data.max_chars:
                count += 1
                if taken < SAMPLE:
                    sample.append(segment["text"])
                    taken += 1
        whole = whole and documents < SCAN_DOCUMENTS
    return sample, count if whole else None


def measure_lengths(config: HumpbackConfig) -> tuple[Lengths, int]:
    """Token counts for `config`, and how many segments the run has (num_segments, or fewer when the local corpora
    hold fewer of the right length; the other filters drop more, so this is an upper bound)."""
    from humpback_nb.infra.chat import prompt_ids
    from humpback_nb.infra.sources import fetch
    from humpback_nb.method.evaluate import eval_prompts
    from humpback_nb.method.judges import ANSWER_PREFIX, JUDGE_PROMPT
    from humpback_nb.method.prompts import TAGS, backward_messages, curation_messages, forward_messages

    tokenizer, which = _tokenizer(config)
    reference = [r["output"] for r in json.loads(fetch("alpaca_en_demo").read_text()) if r["output"]][:500]
    cpt = sum(map(len, reference)) / sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in reference)
    sources = {"tokenizer": which,
               "chars_per_token": f"{cpt:.2f}, the tokenizer on 500 outputs of the embedded alpaca_en_demo"}

    def paper(kind: str) -> tuple[float, float]:
        return PAPER_CHARS[kind][0] / cpt, PAPER_CHARS[kind][1] / cpt

    seed = _local_seed(config)
    if seed:
        seed_lengths = list(zip(_tokens(tokenizer, [r["instruction"] for r in seed]),
                                _tokens(tokenizer, [r["output"] for r in seed]), strict=True))
        sources["seed"] = f"measured: {len(seed)} pairs of {config.data.seed_source}"
    else:
        seed_lengths = [paper("seed")]
        sources["seed"] = "paper: Table 2 seed means (148, 1,072 characters) over chars_per_token"
    local = _local_segments(config)
    segments = config.data.num_segments
    instruction = min(paper("augmented")[0], config.generate.instruction_max_new_tokens)
    sources["instruction"] = ("paper: Table 2 augmented instruction mean (352 characters) over chars_per_token, "
                              "at most generate.instruction_max_new_tokens")
    if local:
        sample, available = local
        segment = _tokens(tokenizer, sample)
        segments = min(segments, available) if available is not None else segments
        pairs = [(instruction, tokens) for tokens in segment]
        curated = {kind: pairs for kind in ("A", "top A5 share", "top A4 share", "no curation")}
        sources["segments"] = (f"measured: {len(sample)} segments of {', '.join(config.data.corpus_sources)} "
                               f"(the first {SAMPLE} of each of {config.data.min_chars}-{config.data.max_chars} "
                               "characters); the curated sets alike")
    else:
        segment = [paper("augmented")[1]]
        curated = {"A": [paper("A5")], "top A5 share": [paper("A5")], "top A4 share": [paper("A4")],
                   "no curation": [paper("augmented")]}
        sources["segments"] = ("paper: Table 2 means over chars_per_token: candidates 1,722 characters, A_k and A5 "
                               "(the logprob rater's top 8.3%) at A5's (115, 1,663), A4 (its top 38.8%) at A4's (206, "
                               "1,985)")
    prompts = eval_prompts(config.evaluate)
    sources["eval_prompt"] = f"measured: the {len(prompts)} evaluation prompts of the config"
    sources["prompt overheads"] = "measured: the kit's own prompts through the chat template"
    judge_text = JUDGE_PROMPT.format(instruction="", a="", b="")
    judge = len(prompt_ids(tokenizer, [{"role": "user", "content": judge_text}])) + len(
        tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"])
    alpaca = 0
    if config.evaluate.annotator == "alpaca_eval_gpt4":
        from humpback_nb.method.alpaca_eval import load_annotator, render_prompt

        alpaca = _count(tokenizer, [render_prompt(load_annotator().template, "", "", "")])
        sources["AlpacaEval's prompt"] = ("measured: alpaca_eval_gpt4's template without its texts, ChatML markers "
                                          "and all, counted with this tokenizer (GPT-4's own tokenizer counts "
                                          "otherwise)")
    lengths = Lengths(
        chars_per_token=cpt, seed=seed_lengths, segments=segment, instruction=instruction, curated=curated,
        eval_prompt=_count(tokenizer, [p["instruction"] for p in prompts]), eval_prompts=len(prompts),
        backward_overhead=len(prompt_ids(tokenizer, backward_messages(""))),
        rubric=len(prompt_ids(tokenizer, curation_messages("", "", config.curate.rater_tag))),
        forward_overhead={tag: len(prompt_ids(tokenizer, forward_messages("", tag))) for tag in TAGS},
        judge_overhead=judge, alpaca_eval_overhead=alpaca, sources=sources,
    )
    return lengths, segments


# -- the schedule -------------------------------------------------------------------------------------
def training_schedule(n: int, train, max_steps: int | None = None) -> tuple[int, int]:
    """(batch, steps) of a model trained on n examples, as train.training_plan fills them in; `max_steps` (the
    scaling analysis' evaluate.scaling_steps) takes the place of train.max_steps when set."""
    batch, steps = paper_schedule(n)
    return train.batch_size or batch, max_steps or train.max_steps or steps


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One stage's work: models it trains, passes it makes, tokens, FLOPs, time, judge calls and disk."""

    stage: str
    models: list[str] = field(default_factory=list)  # models trained
    model_runs: int = 0  # models trained, plus models loaded to generate, rate or judge
    examples: int = 0  # training examples seen (steps x batch), plus items generated, rated or judged
    steps: int = 0  # optimizer steps
    tokens_read: float = 0.0  # prompt and training tokens
    tokens_written: float = 0.0  # generated tokens
    flops: float = 0.0
    compute_seconds: float = 0.0  # training, prefill, scoring: FLOPs at MFU
    decode_seconds: float = 0.0  # decoding: bytes over bandwidth (or FLOPs at MFU if longer)
    judge_calls: int = 0
    judge_prompt_tokens: float = 0.0
    judge_reply_tokens: float = 0.0
    disk_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return (self.compute_seconds + self.decode_seconds) / 3600


@dataclass
class MemoryCheck:
    """Whether training fits one GPU: per-GPU bytes of weights and optimizer state, and of activations."""

    method: str
    state_bytes: float
    activation_bytes_mean: float  # a micro-batch of mean-length examples
    activation_bytes_worst: float  # a micro-batch of max_seq_length examples
    gpu_bytes: float
    verdict: str  # fits (even the worst case), tight (the mean case only), no
    how: str
    generation_bytes: float = 0.0  # per process: the whole model and a full KV cache of the largest batch
    generation_verdict: str = ""  # fits or no


@dataclass
class Plan:
    """The cost of a run: one row per stage, totals, and what every number rests on."""

    preset: str
    model: str
    gpu: str
    gpus: int
    stages: list[StagePlan]
    memory: MemoryCheck
    assumptions: dict[str, str]
    calibrated_on: str | None = None  # the device a gpu-check measured, when the plan is calibrated
    judge_price: tuple[float, float] | None = None  # US dollars per million prompt and reply tokens
    engine: str = "local"  # what priced generation and scoring: the kit's own loops (local) or vLLM's server

    @property
    def judge_dollars(self) -> float | None:
        """What the judge's tokens cost at `judge_price`."""
        if self.judge_price is None:
            return None
        totals = self.totals
        return (totals["judge_prompt_tokens"] * self.judge_price[0]
                + totals["judge_reply_tokens"] * self.judge_price[1]) / 1e6

    @property
    def totals(self) -> dict[str, float]:
        keys = ("model_runs", "examples", "steps", "tokens_read", "tokens_written", "flops", "judge_calls",
                "judge_prompt_tokens", "judge_reply_tokens", "disk_bytes")
        totals = {k: sum(getattr(s, k) for s in self.stages) for k in keys}
        totals["models_trained"] = sum(len(s.models) for s in self.stages)
        totals["gpu_hours"] = sum(s.gpu_hours for s in self.stages)
        totals["wall_hours"] = totals["gpu_hours"] / self.gpus
        return totals

    def to_dict(self) -> dict[str, Any]:
        stages = [asdict(s) | {"gpu_hours": s.gpu_hours, "wall_hours": s.gpu_hours / self.gpus} for s in self.stages]
        engine = {"engine": self.engine} if self.engine != "local" else {}  # a local plan's JSON as before
        return {"preset": self.preset, "model": self.model, "gpu": self.gpu, "gpus": self.gpus, **engine,
                "calibrated_on": self.calibrated_on, "stages": stages, "totals": self.totals,
                "judge_price": self.judge_price, "judge_dollars": self.judge_dollars, "memory": asdict(self.memory),
                "assumptions": self.assumptions}


@dataclass(frozen=True)
class Calibration:
    """What `humpback gpu-check` measured (its report's `timings`), priced in place of the plan's assumptions."""

    source: str  # the file it was read from
    device: str
    step_seconds: dict[str, float]  # seconds a decoding step, by kind: candidates, rate, answers
    step_rows: dict[str, float]  # rows a step wrote at, by kind
    prefill_tokens_per_second: float  # prompts read (and forward-only scoring)
    training_tokens_per_second: dict[str, float]  # backward (M_yx), forward (M0 and every other forward model)
    vllm: EngineRates | None = None  # the report's vLLM measurement (its "vllm"), when it made one


DECODING_KINDS = {"candidates": "candidates", "rate": "rate_m0", "answers": "answers"}  # kind -> gpu-check's stage


def load_calibration(path: str | Path, config: HumpbackConfig) -> Calibration:
    """The timings of a gpu-check report for `config`'s model; one ConfigError line naming the file otherwise."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        timings = report["timings"]
        decoding, training = timings["decoding"], timings["training"]
        measured = (timings["model"], timings["quantization"])
        steps = {kind: float(decoding[stage]["seconds_per_step"]) for kind, stage in DECODING_KINDS.items()
                 if stage in decoding}
        rows = {kind: float(decoding[stage]["rows_per_step"]) for kind, stage in DECODING_KINDS.items()
                if stage in decoding}
        read = sum(float(d["prefill_tokens"]) for d in decoding.values())
        seconds = sum(float(d["prefill_seconds"]) for d in decoding.values())
        trained = {"backward": float(training["backward"]["tokens_per_second"]),
                   "forward": float(training["m0"]["tokens_per_second"])}
        vllm = vllm_measured(report.get("vllm"), path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (humpback gpu-check writes it in its run folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a gpu-check report with timings ({type(error).__name__}: {error})") from None
    if measured != (config.model.name, config.model.quantization):
        raise ConfigError(f"{path}: measured {measured[0]} (quantization {measured[1]}), but this plan's model is "
                          f"{config.model.name} (quantization {config.model.quantization}): run `humpback gpu-check "
                          f"--model {config.model.name}` on your GPU, or plan the model it measured")
    if not steps or not seconds or min(steps.values()) <= 0 or min(trained.values()) <= 0:
        raise ConfigError(f"{path}: its timings hold no decoding steps or no training tokens")
    return Calibration(str(path), str(timings["device"]), steps, rows, read / seconds, trained, vllm)


def vllm_measured(measured: dict | None, path: Path) -> EngineRates | None:
    """The rates of a gpu-check report's "vllm" section ({"device", "new_tokens_per_second",
    "prefill_tokens_per_second", "prompts"}), or None when it has none. Raises what load_calibration turns into one
    line."""
    if measured is None:
        return None
    rates = EngineRates(float(measured["new_tokens_per_second"]), float(measured["prefill_tokens_per_second"]),
                        f"measured by gpu-check on {measured['device']} ({int(measured['prompts']):,} prompts, {path})")
    if min(rates.new_tokens_per_second, rates.prefill_tokens_per_second) <= 0:
        raise ValueError("its vllm section holds a rate of 0 or less")
    return rates


class _Costing:
    """Adds work to a stage row: training, generation, forward-only scoring, judging; priced by the assumptions
    above, or by what a gpu-check measured (`calibration`); with `vllm` (its rates), generation and the rater's and
    the judge's scoring as vLLM's server does them, and the server's starts counted (`starts`, by stage)."""

    def __init__(self, config: HumpbackConfig, arch: Architecture, lengths: Lengths, gpu: Gpu,
                 calibration: Calibration | None = None, vllm: EngineRates | None = None):
        self.config, self.arch, self.lengths, self.gpu, self.calibration = config, arch, lengths, gpu, calibration
        self.vllm, self.serving, self.starts = vllm, False, {}
        self.full = config.train.method == "full"
        self.lora = 0 if self.full else arch.lora_weights(config.train.lora_r)
        self.weight_bytes = weight_bytes(config, arch)
        value = 4 if config.model.dtype == "float32" else 2
        self.model_bytes = arch.weights * value if self.full else self.lora * 4  # saved: bf16 model, fp32 adapter

    def compute(self, flops: float, tokens: float, training: str | None = None) -> float:
        """Seconds of `flops` of training (`training`: backward or forward) or of reading `tokens` tokens at once."""
        if self.calibration is None:
            return flops / (self.gpu.flops * MFU)
        if training:
            return tokens / self.calibration.training_tokens_per_second[training]
        return tokens / self.calibration.prefill_tokens_per_second

    def step_seconds(self, kind: str, rows: int, context: float) -> float:
        """Seconds of one eager decoding step of `rows` rows attending over `context` positions (see OPS_PER_LAYER),
        or the step gpu-check measured for this kind of work."""
        if self.calibration is not None and kind in self.calibration.step_seconds:
            return self.calibration.step_seconds[kind]
        return max(self.step_parts(rows, context))

    def step_parts(self, rows: int, context: float) -> tuple[float, float]:
        """(device seconds, host seconds) of one eager decoding step: the device's bytes over its bandwidth, and the
        host's operators at HOST_SECONDS_PER_OP; a step takes the longer of the two."""
        arch, nf4 = self.arch, self.config.model.quantization == "4bit"
        value = 4 if self.config.model.dtype == "float32" and not nf4 else 2
        # NF4: packed weights read once at one row; dequantized, written and read again at more (bitsandbytes)
        layers = arch.layers * arch.layer_weights * ((NF4_BYTES + (4 if rows > 1 else 0)) if nf4 else value)
        head = arch.vocab * arch.hidden * value  # the input embedding is a lookup of one row a token
        device = (layers + head + rows * context * arch.kv_bytes_per_token()) / self.gpu.bandwidth
        ops = OPS_PER_STEP + arch.layers * (OPS_PER_LAYER + (7 * OPS_PER_NF4_LINEAR if nf4 and rows > 1 else 0))
        return device, ops * HOST_SECONDS_PER_OP

    def train(self, row: StagePlan, name: str, groups: list[tuple[list[tuple[float, float]], int]], overhead: int,
              backward: bool = False, max_steps: int | None = None) -> None:
        """Model `name` trained on examples of each group (token counts of (instruction, output) pairs, and how many
        such examples there are), each with a prompt of `overhead` tokens besides its texts."""
        n = sum(count for _, count in groups)
        batch, steps = training_schedule(n, self.config.train, max_steps)
        length, learned = example_lengths(groups, overhead, self.config.train.max_seq_length, backward)
        examples = batch * steps
        flops = self.arch.training_flops(examples, length, learned, self.full, self.lora)
        row.models.append(name)
        row.model_runs += 1
        row.examples += examples
        row.steps += steps
        row.tokens_read += examples * length
        row.flops += flops
        row.compute_seconds += self.compute(flops, examples * length, "backward" if backward else "forward")
        row.disk_bytes += self.model_bytes
        self.serving = False  # the kit stops its vLLM server to train (the GPU is the trainer's)

    def generate(self, row: StagePlan, kind: str, items: int, prompts: list[float], written: float, cap: int,
                 batch: int) -> None:
        """`items` prompts, each as long as one of `prompts` (token counts of a sample) but cut to leave `cap` tokens
        of the context free; `written` tokens written each; a batch decodes `cap` steps at most. `kind` (candidates,
        rate, answers) names the work, for a calibration."""
        prompt = capped_mean(prompts, self.config.model.context_length - cap)
        prefill = self.arch.forward_flops(items * prompt, prompt, items)
        decode = self.arch.forward_flops(items * written, prompt + written / 2, items * written)
        if self.vllm is not None:  # continuous batching: each row writes its own tokens, none waits for the longest
            self.serve(row)
            row.examples += items
            row.tokens_read += items * prompt
            row.tokens_written += items * written
            row.flops += prefill + decode
            row.compute_seconds += items * prompt / self.vllm.prefill_tokens_per_second
            row.decode_seconds += items * written / self.vllm.new_tokens_per_second
            return
        steps = math.ceil(items / batch) * cap  # a batch runs until its longest row is done: at most `cap` steps
        step = self.step_seconds(kind, min(batch, items), prompt + cap / 2)
        if items and not any(note.startswith(f"decoding ({kind})") for note in row.notes):
            if self.calibration is not None and kind in self.calibration.step_seconds:
                why = "as gpu-check measured it"
            else:
                device, host = self.step_parts(min(batch, items), prompt + cap / 2)
                why = f"the longer of the device's {device * 1e3:.1f} ms and the host's {host * 1e3:.1f} ms"
            row.notes.append(f"decoding ({kind}): {steps:,} steps of {min(batch, items)} rows, {step * 1e3:.1f} ms a "
                             f"step ({why})")
        row.examples += items
        row.tokens_read += items * prompt
        row.tokens_written += items * written
        row.flops += prefill + decode
        row.compute_seconds += self.compute(prefill, items * prompt)
        row.decode_seconds += max(steps * step, decode / (self.gpu.flops * MFU) if self.calibration is None else 0)

    def score(self, row: StagePlan, items: int, tokens: float, context: float, losses: bool = False) -> None:
        """One forward pass over `tokens` tokens per item, each attending over `context`, logits at every one.
        `losses`: held-out losses, read by the kit's own forward pass whatever the engine (infra/engines.py says
        why); else the rater's or the judge's pass, vLLM's prompt reading with `vllm`."""
        flops = self.arch.forward_flops(items * tokens, context, items * tokens)
        row.examples += items
        row.tokens_read += items * tokens
        row.flops += flops
        if self.vllm is not None and not losses:
            self.serve(row)
            row.compute_seconds += items * tokens / self.vllm.prefill_tokens_per_second
            return
        if losses:
            self.serving = False  # the kit stops its vLLM server to read held-out losses
        row.compute_seconds += self.compute(flops, items * tokens)

    def serve(self, row: StagePlan) -> None:
        """The kit's vLLM server serves this work: started, if a training or held-out losses stopped it (or nothing
        started it yet); the runtime adapters of the run's models need no new start."""
        if not self.serving:
            self.serving = True
            self.starts[row.stage] = self.starts.get(row.stage, 0) + 1

    def versus_reference(self, row: StagePlan, models: int) -> None:
        """`models` models' answers judged as the run judges them (stages.versus_reference): by AlpacaEval's
        annotator against its reference, or by the kit's judge against the base model's answers."""
        if self.config.evaluate.annotator == "alpaca_eval_gpt4":
            self.alpaca_eval(row, models)
        else:
            self.judge(row, models, self.lengths.eval_prompts)

    def alpaca_eval(self, row: StagePlan, models: int) -> None:
        """AlpacaEval 1.0: one call per model and AlpacaEval prompt (two with evaluate.both_orders), its template
        around the instruction, the model's answer and the reference's (each up to generate.max_new_tokens), and a
        reply of up to the annotator's max_tokens."""
        from humpback_nb.method.alpaca_eval import load_annotator

        settings, lengths = self.config.evaluate, self.lengths
        calls = models * settings.alpaca_eval_prompts * (2 if settings.both_orders else 1)
        answer = self.config.generate.max_new_tokens
        row.judge_calls += calls
        row.judge_prompt_tokens += calls * (lengths.alpaca_eval_overhead + lengths.eval_prompt + 2 * answer)
        row.judge_reply_tokens += calls * load_annotator().max_tokens
        row.disk_bytes += models * settings.alpaca_eval_prompts * JSON_BYTES["judgment"]

    def judge(self, row: StagePlan, comparisons: int, prompts: int) -> None:
        """The kit's judge: `comparisons` x `prompts` x 2 orders: forward passes of the base model, or calls to the
        endpoint (a one-letter reply, EndpointJudge's max_tokens of 4)."""
        settings, lengths = self.config.evaluate, self.lengths
        calls = comparisons * prompts * 2
        answer = self.config.generate.max_new_tokens
        if settings.judge_url:
            tokens = lengths.judge_overhead + lengths.eval_prompt + 2 * answer
            row.judge_calls += calls
            row.judge_prompt_tokens += calls * tokens
            row.judge_reply_tokens += calls * 4  # max_tokens of EndpointJudge
        else:
            answer = min(answer, 2000 / lengths.chars_per_token)  # LocalJudge cuts each answer at 2,000 characters
            tokens = lengths.judge_overhead + lengths.eval_prompt + 2 * answer
            self.score(row, calls, tokens, tokens)  # the judge's pass: vLLM's with --engine vllm
            row.judge_calls += calls
            row.judge_prompt_tokens += calls * tokens
            row.model_runs += row.stage != "eval"  # tags and scaling load the base model to judge; eval has it
        row.disk_bytes += comparisons * prompts * JSON_BYTES["judgment"]

    def answers(self, row: StagePlan, models: int, prompts: int) -> None:
        """`models` models answer the evaluation prompts (up to generate.max_new_tokens each)."""
        settings, lengths = self.config.generate, self.lengths
        prompt = lengths.forward_overhead[self.config.evaluate.inference_tags] + lengths.eval_prompt
        for _ in range(models):
            self.generate(row, "answers", prompts, [prompt], settings.max_new_tokens, settings.max_new_tokens,
                          settings.batch_size)
        row.model_runs += models
        chars = (settings.max_new_tokens + lengths.eval_prompt) * lengths.chars_per_token
        row.disk_bytes += models * prompts * (2 * chars + JSON_BYTES["answer"])


class Work:
    """What a stage's cost declaration (`Stage.cost`, beside the stage in stages.py and analyses.py) counts its work
    with: the config, the measured lengths, how many candidates and A_k pairs the plan expects, and one method per
    kind of work, each added to the stage's row."""

    def __init__(self, cost: _Costing, row: StagePlan, candidates: int):
        self.cost, self.row, self.candidates = cost, row, candidates
        self.config, self.lengths = cost.config, cost.lengths
        self.a_k = a_k_size(cost.config, candidates)

    def train(self, name: str, groups: list[tuple[list[tuple[float, float]], int]], overhead: int,
              backward: bool = False, max_steps: int | None = None) -> None:
        self.cost.train(self.row, name, groups, overhead, backward, max_steps)

    def generate(self, kind: str, items: int, prompts: list[float], written: float, cap: int, batch: int) -> None:
        self.cost.generate(self.row, kind, items, prompts, written, cap, batch)

    def score(self, items: int, tokens: float, context: float, losses: bool) -> None:
        """A forward pass over `items` prompts a stage counts itself: held-out losses (`losses`: the kit's own forward
        pass whatever the engine), or the logprob rater's pass (the raters' comparison)."""
        self.cost.score(self.row, items, tokens, context, losses=losses)

    def answers(self, models: int) -> None:
        """`models` models answer every evaluation prompt."""
        self.cost.answers(self.row, models, self.lengths.eval_prompts)

    def judge(self, comparisons: int, prompts: int | None = None) -> None:
        """The kit's judge on `comparisons` comparisons of `prompts` prompts (every evaluation prompt) each."""
        self.cost.judge(self.row, comparisons, self.lengths.eval_prompts if prompts is None else prompts)

    def alpaca_eval(self, models: int) -> None:
        self.cost.alpaca_eval(self.row, models)

    def versus_reference(self, models: int) -> None:
        self.cost.versus_reference(self.row, models)

    def rate(self, items: int, pairs: list[float]) -> None:
        """The run's rater (curate.rater) rates `items` pairs as long as one of `pairs` (token counts)."""
        settings = self.config.curate
        if settings.rater == "endpoint":
            self.endpoint_rating(items, sum(pairs) / len(pairs))
            self.note(f"endpoint rater ({settings.rater_model} at {settings.rater_url}): one call a pair, up to "
                      f"{settings.max_new_tokens} tokens of reasoning, counted with the judge's calls")
        elif settings.rater == "generate":
            self.generate("rate", items, [self.lengths.rubric + p for p in pairs], settings.max_new_tokens,
                          settings.max_new_tokens, settings.batch_size)
        else:
            pair = capped_mean(pairs, self.config.model.context_length - self.lengths.rubric - 8)  # its reserve
            self.cost.score(self.row, items, pair, self.lengths.rubric + pair)

    def endpoint_rating(self, calls: int, pair: float) -> None:
        """Calls to a rating endpoint (the rater "endpoint", or Table 7's endpoint row): the paper's rubric around a
        pair of `pair` tokens, a reply of up to curate.max_new_tokens; counted with the judge's calls (priced at the
        same rate)."""
        row = self.row
        row.judge_calls += calls
        row.judge_prompt_tokens += calls * (self.lengths.rubric + pair)
        row.judge_reply_tokens += calls * self.config.curate.max_new_tokens

    def loads(self, models: int) -> None:
        """Models loaded besides those trained or answering (to rate, to read losses)."""
        self.row.model_runs += models

    def records(self, kind: str, count: float, tokens: float) -> None:
        """`count` JSONL records of `kind` (a key of JSON_BYTES) holding `tokens` tokens of text each, on disk."""
        self.row.disk_bytes += count * (tokens * self.lengths.chars_per_token + JSON_BYTES[kind])

    def note(self, text: str) -> None:
        if text not in self.row.notes:
            self.row.notes.append(text)


def capped_mean(values: list[float], cap: float) -> float:
    """Mean of `values`, each cut to `cap` (as prompts are cut to fit the context)."""
    return sum(min(v, cap) for v in values) / len(values)


def example_lengths(groups: list[tuple[list[tuple[float, float]], int]], overhead: int, max_length: int,
                    backward: bool = False) -> tuple[float, float]:
    """Mean (tokens, learned tokens) of training examples cut to `max_length` as train.encode cuts them: a forward
    example learns the output and its end of turn; a backward one learns the instruction after an output cut to
    leave it room (train.backward_example)."""
    total = length = learned = 0.0
    for pairs, count in groups:
        for instruction, output in pairs:
            if backward:
                output = min(output, max_length - overhead - max(16, max_length // 8))
                prompt, answer = overhead + output, instruction + 1
            else:
                prompt, answer = overhead + instruction, output + 1
            length += count / len(pairs) * min(prompt + answer, max_length)
            learned += count / len(pairs) * max(0.0, min(answer, max_length - prompt))
        total += count
    return length / total, learned / total


# Bytes of one JSONL record besides its texts, measured on a demo run's files (mean bytes of a line less the
# characters of its texts, rounded up to 5); an answer counts twice: its JSONL line and AlpacaEval's copy. A score
# of the generate rater holds its reasoning and `finished` in place of the logprob rater's distribution.
JSON_BYTES = {"seed": 115, "segment": 120, "candidate": 285, "score": 185, "score_generate": 120, "curated": 295,
              "answer": 235, "judgment": 105}


def build_plan(config: HumpbackConfig, gpu: str = "h100", gpus: int = 1, calibrate: str | Path | None = None,
               judge_price: tuple[float, float] | None = None, engine: str | None = None) -> Plan:
    """The cost of every stage of a run of `config` on `gpus` GPUs of kind `gpu` (a key of GPUS); with `calibrate`
    (a gpu-check report), at the times it measured; with `judge_price` (US dollars per million prompt and reply
    tokens), the judge's cost in money; generation and scoring as `engine` (local or vllm; default: the config's
    engine.kind) runs them."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; GPUs: {', '.join(GPUS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    engine = config.engine.kind if engine is None else engine
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    arch, arch_source = architecture(config.model.name)
    lengths, segments = measure_lengths(config)
    calibration = load_calibration(calibrate, config) if calibrate else None
    vllm = None
    if engine == "vllm":
        vllm = calibration.vllm if calibration and calibration.vllm else published_vllm_rates(arch, GPUS[gpu])
    cost = _Costing(config, arch, lengths, GPUS[gpu], calibration, vllm)
    rows = []
    # the stages `humpback run` runs, each with its cost declaration
    for stage in pipeline(config.curate.iterations, config.variant.method):
        if stage.cost is None:
            raise PipelineError(f"stage {stage.name!r} declares no cost: `humpback plan` cannot count it (give it "
                                "`cost=`, a function of plan.Work, beside its declaration)")
        rows.append(StagePlan(stage.name))
        stage.cost(Work(cost, rows[-1], segments))
        if cost.starts.get(stage.name):
            rows[-1].notes.append(f"vLLM server: {cost.starts[stage.name]} start(s), not priced (an assumption: see "
                                  "vLLM server below)")
    cpt = lengths.chars_per_token
    seed = lengths.seed_mean
    tokens = (f"seed instruction {seed[0]:.0f}, output {seed[1]:.0f}; segment {lengths.segment:.0f}; "
              f"written instruction {lengths.instruction:.0f}; evaluation prompt {lengths.eval_prompt:.0f}; prompts "
              f"without their texts: backward {lengths.backward_overhead}, rating rubric {lengths.rubric}, forward "
              f"{lengths.forward_overhead['S_a']} (with S_a), judge {lengths.judge_overhead}")
    assumptions = {
        "architecture": arch_source,
        **lengths.sources,
        "mean tokens": tokens,
        "candidates": f"{segments:,}: every segment kept (an upper bound: degenerate instructions are dropped)",
        "A_k": _a_k_rule(config),
        "utilization": utilization(config, calibration, vllm is not None),
        "decoding steps": ("vLLM batches continuously: each row writes its own tokens, none waits for its batch's "
                           "longest row" if vllm else
                           "a batch decodes until its longest row is done: max_new_tokens steps (an upper bound)"),
        "answers": "generate.max_new_tokens tokens each (an upper bound)",
        "judge": judge_rule(config),
        **(vllm_rules(config, vllm, calibration, GPUS[gpu], arch) if vllm else {}),
        "wall clock": f"GPU-hours over {gpus} GPU(s): every stage splits its batches or micro-batches evenly; "
                      "models load and save, and processes wait for the slowest, on top",
        "disk": (f"models as saved ({'bf16 weights' if cost.full else 'fp32 LoRA adapters'}), JSONL at {cpt:.2f} "
                 "characters a token; not counted: the segments the filters drop (their number depends on your "
                 "corpus) and a training checkpoint (weights and AdamW state), which lives only while its model "
                 "trains"),
    }
    seed_n, a_k = config.data.seed_size, a_k_size(config, segments)
    batch, _ = training_schedule(seed_n + a_k, config.train)
    length, _ = example_lengths([(lengths.seed, seed_n), (lengths.curated["A"], a_k)],
                                lengths.forward_overhead["S_a"], config.train.max_seq_length)
    return Plan(config.preset, config.model.name, gpu, gpus, rows,
                memory_check(config, arch, length, GPUS[gpu], gpus, batch), assumptions,
                calibration.device if calibration else None, judge_price, engine)


def vllm_rules(config: HumpbackConfig, rates: EngineRates, calibration: Calibration | None, gpu: Gpu,
               arch: Architecture) -> dict[str, str]:
    """The assumptions of a plan priced with `--engine vllm`: what vLLM prices, at which rates, and from where."""
    if rates.source == "published":
        scaled = (f"an 8B figure, scaled by parameter count (Llama-3-8B's {VLLM_MODEL.weights / 1e9:.2f}B weights over "
                  f"this model's {arch.weights / 1e9:.2f}B)")
        against = "" if gpu == GPUS[VLLM_GPU] else f" and to the {gpu.label}"
        where = ("vLLM's published throughput for Llama-3-8B on one H100, the two lines below, scaled to this model"
                 + against + ("; the gpu-check report measured no vLLM: the published figures stay assumptions"
                              if calibration is not None else ""))
        figures = {
            "vLLM decoding": (
                "vLLM pull request 7117 (github.com/vllm-project/vllm/pull/7117, 2024-08-04), one H100: "
                "benchmark_throughput.py --input-len 256 --output-len 256 --model meta-llama/Meta-Llama-3-8B, "
                f"\"Throughput: {VLLM_DECODE_REQUESTS} requests/s, 12453.04 tokens/s\": {VLLM_DECODE_REQUESTS} x "
                f"{VLLM_DECODE_NEW_TOKENS} new tokens a second, the whole run counted as decoding (a floor); {scaled}"
                + (f", times the {gpu.label}'s memory bandwidth over the H100's" if against else "")
                + f": {rates.new_tokens_per_second:,.0f} new tokens a second"),
            "vLLM prompt reading": (
                "vLLM pull request 4600 (github.com/vllm-project/vllm/pull/4600, bump to v0.4.2, 2024-05-04), one "
                "H100: benchmark_throughput.py --input-len 1000 --output-len 100 --model "
                f"meta-llama/Meta-Llama-3-8B-Instruct, v0.4.1: {VLLM_PREFILL_REQUESTS} requests a second: "
                f"{VLLM_PREFILL_REQUESTS} x {VLLM_PREFILL_PROMPT_TOKENS:,} prompt tokens a second, the whole run "
                f"counted as prompt reading (a floor); {scaled}"
                + (f", times the {gpu.label}'s bf16 FLOP/s over the H100's" if against else "")
                + f": {rates.prefill_tokens_per_second:,.0f} prompt tokens a second"),
        }
    else:
        where, figures = f"{rates.source}, in place of vLLM's published figures", {}
    nf4 = config.model.quantization == "4bit"
    if config.train.method == "full":
        served = ("each model from its own folder, one at a time (train.method full): a start for each model it "
                  "serves, counted here only where a training or held-out losses stopped it (a lower bound)")
    else:
        served = ("the base model with LoRA enabled" + (", NF4 weights through bitsandbytes" if nf4 else "")
                  + ", the run's adapters loaded at run time, without a new start")
    unpriced = [kind for kind, used in (("LoRA", config.train.method != "full"), ("NF4", nf4)) if used]
    published = rates.source == "published" and unpriced
    return {
        "engine": (
            "vllm: generation (self-augmentation, the generate rater and the raters' comparison, answers) and the "
            "logprob rater's and the kit's local judge's prompts as vLLM's server runs them on each GPU, at "
            f"{rates.new_tokens_per_second:,.0f} new and {rates.prefill_tokens_per_second:,.0f} prompt tokens a "
            f"second ({where}); prompts as the plan counts them (a shared rubric in each, which vLLM's prefix cache "
            "reads once: an upper bound); training and held-out losses on the kit's own code, as today, whatever the "
            "engine"),
        **figures,
        "vLLM server": (
            f"{served}"
            + (f"; the published figures ran bf16 weights without adapters: what {' and '.join(unpriced)} cost vLLM "
               "is not priced" if published else "")
            + ". The kit stops it to train and to read held-out losses and starts it again for the next work it "
            "serves: those starts are counted in each stage's notes (an assumption) and, like model loads, not "
            "priced"),
    }


def utilization(config: HumpbackConfig, calibration: Calibration | None, vllm: bool = False) -> str:
    """How the plan turns work into time: its assumptions, or what a gpu-check measured; with `vllm`, for what the
    kit's own code still runs (training, held-out losses)."""
    if vllm:
        if calibration is None:
            return (f"training and held-out losses at {MFU:.0%} of the dense bf16 peak (an assumption, below PaLM's "
                    "46.2%); generation and scoring as the engine line says")
        trained = calibration.training_tokens_per_second
        return (f"calibrated by {calibration.source} (measured on {calibration.device}): training at "
                f"{trained['backward']:,.0f} (M_yx) and {trained['forward']:,.0f} (forward models) tokens/s, held-out "
                f"losses at {calibration.prefill_tokens_per_second:,.0f} tokens/s; generation and scoring as the "
                "engine line says")
    if calibration is not None:
        steps = ", ".join(f"{kind} {1000 * seconds:.1f} ms at {calibration.step_rows[kind]:.0f} rows"
                          for kind, seconds in calibration.step_seconds.items())
        missing = [kind for kind in DECODING_KINDS if kind not in calibration.step_seconds]
        trained = calibration.training_tokens_per_second
        return (f"calibrated by {calibration.source} (measured on {calibration.device}): a decoding step takes what "
                f"it took there ({steps}; at the plan's batch sizes and lengths as measured"
                + (f"; {', '.join(missing)} assumed as uncalibrated" if missing else "") + "); prompts and scoring at "
                f"{calibration.prefill_tokens_per_second:,.0f} tokens/s, training at "
                f"{trained['backward']:,.0f} (M_yx) and {trained['forward']:,.0f} (forward models) tokens/s")
    nf4 = config.model.quantization == "4bit"
    return (f"training, prompt reading and scoring at {MFU:.0%} of the dense bf16 peak (an assumption, below "
            "PaLM's 46.2%); decoding as the kit decodes, eager transformers: a step takes the longer of the device's "
            "bytes over the datasheet bandwidth (a floor) "
            + ("- NF4 weights dequantized to bf16 at every step, 4.5 bytes a weight, " if nf4 else "- the weights, ")
            + "the head and the KV cache at the configured batch size - and the host's operators "
            f"({OPS_PER_STEP} a step and {OPS_PER_LAYER}{f' + 7 x {OPS_PER_NF4_LINEAR}' if nf4 else ''} a layer, "
            f"{1e6 * HOST_SECONDS_PER_OP:.0f} us each, an assumption); `humpback gpu-check` measures them and "
            "`humpback plan --calibrate` prices with what it measured")


def judge_rule(config: HumpbackConfig) -> str:
    """What the plan counts as the judge's work."""
    settings = config.evaluate
    if settings.annotator == "alpaca_eval_gpt4":
        orders = ("both orders (evaluate.both_orders, an addition)" if settings.both_orders
                  else "one order, as AlpacaEval")
        return (f"AlpacaEval 1.0 as alpaca_eval runs it: one call per model and AlpacaEval prompt in {orders}, its "
                "annotator's template around the instruction, the model's answer and text-davinci-003's (both "
                "counted at generate.max_new_tokens, an upper bound), a reply of up to its max_tokens (100; a ranking "
                "is some 30); MT-bench's prompts by the kit's judge in both orders, a one-letter reply (4 tokens): "
                "the 4 comparisons, and each model against its own shuffled answers (the judge's check)")
    where = f"at {settings.judge_url}" if settings.judge_url else "on the base model (GPU time, no calls)"
    return (f"the kit's judge {where}: every evaluation prompt in both orders, for the comparisons and for the "
            "judge's check (each model against its own shuffled answers), both answers at "
            "generate.max_new_tokens (an upper bound)" + (", a reply of 4 tokens" if settings.judge_url else ""))


def _a_k_rule(config: HumpbackConfig) -> str:
    if config.curate.top_share is not None:
        return f"the best {config.curate.top_share:.1%} of the candidates (curate.top_share; ties aside)"
    return (f"score >= {config.curate.threshold:g}: the share the paper's A5 (>= 4.5) or A4 (>= 3.5) had of its "
            "candidates (Table 2), or every candidate below 3.5")


def a_k_size(config: HumpbackConfig, candidates: int) -> int:
    """Expected |A_k|: top_share of the candidates, or the paper's share for the threshold."""
    curate = config.curate
    if curate.top_share is not None:
        return max(1, math.ceil(curate.top_share * candidates))
    if curate.threshold >= 4.5:
        return round(PAPER_SHARES["A5"] * candidates)
    if curate.threshold >= 3.5:
        return round(PAPER_SHARES["A4"] * candidates)
    return candidates


# -- memory -------------------------------------------------------------------------------------
def memory_check(config: HumpbackConfig, arch: Architecture, length: float, gpu: Gpu, gpus: int,
                 batch: int) -> MemoryCheck:
    """Per-GPU bytes of training M2 (the run's largest training set) and whether they fit `gpu`'s memory."""
    train = config.train
    micro = max(1, min(train.micro_batch_size, batch // gpus))
    if train.method == "full":
        sharded = gpus if gpus > 1 else 1
        state = 16 * arch.weights / sharded
        how = ("AdamW in mixed precision holds 16 bytes a weight (Rajbhandari et al. 2019, arXiv 1910.02054, section "
               "3.1: bf16 weights and gradients, fp32 master weights and two moments; fp32 weights and gradients "
               "sharded by FSDP come to the same)"
               + (f", sharded over {gpus} GPUs with FSDP" if gpus > 1 else ", on one GPU"))
    else:
        if config.model.quantization == "4bit":
            # prepare_model_for_kbit_training casts what is not quantized (embeddings, head, norms) to fp32
            base = arch.layers * arch.layer_weights * NF4_BYTES + arch.embedding_weights * 4
            kind = "NF4 base (4.127 bits a weight; embeddings and head in fp32)"
        else:
            base = arch.weights * (4 if config.model.dtype == "float32" else 2)
            kind = "bf16 base"
        state = base + 16 * arch.lora_weights(train.lora_r)
        how = (f"{kind} plus LoRA r={train.lora_r} at 16 bytes a weight (fp32 weights, gradients, two AdamW moments); "
               "every GPU holds the whole model (DDP)")

    def activations(tokens: float) -> float:
        # 34 x tokens x width bytes per layer (Korthikanti et al. 2022, arXiv 2205.05198, section 4.1, less the
        # attention scores fused kernels do not keep), and the logits in bf16 plus the loss's fp32 copy
        return micro * tokens * (34 * arch.hidden * arch.layers + 6 * arch.vocab)

    mean, worst = activations(length), activations(train.max_seq_length)
    verdict = "fits" if state + worst <= gpu.memory else "tight" if state + mean <= gpu.memory else "no"
    rows = max(config.generate.batch_size, config.curate.batch_size)
    generation = weight_bytes(config, arch) + rows * config.model.context_length * arch.kv_bytes_per_token()
    how += (f"; activations of a micro-batch of {micro} without recomputation, at the mean length ({length:.0f} "
            f"tokens) and at train.max_seq_length ({train.max_seq_length}); CUDA context aside. fits: even the "
            "longest micro-batch; tight: the mean one only; no: not even that")
    return MemoryCheck(train.method, state, mean, worst, gpu.memory, verdict, how, generation,
                       "fits" if generation <= gpu.memory else "no")


def weight_bytes(config: HumpbackConfig, arch: Architecture) -> float:
    """Bytes of the model's weights as loaded for generation: NF4 blocks (bitsandbytes' kernels read them packed)
    and bf16 embeddings and head, or every weight in the model's dtype."""
    if config.model.quantization == "4bit":
        return arch.layers * arch.layer_weights * NF4_BYTES + arch.embedding_weights * 2
    return arch.weights * (4 if config.model.dtype == "float32" else 2)


# -- output -------------------------------------------------------------------------------------
def _number(x: float) -> str:
    """12, 3.4k, 5.6M, 7.8B, 9.0e18: short and exact enough for a plan."""
    if abs(x) >= 1e12:
        return f"{x:.2e}"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for size, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f} B"


def _hours(x: float) -> str:
    return "0" if x == 0 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table_rows(plan: Plan) -> list[list[str]]:
    """Header, one row per stage and the totals, as text cells (the same for the terminal and Markdown)."""
    header = ["stage", "models trained", "model runs", "examples", "steps", "tokens read", "tokens written",
              "FLOPs", "GPU-hours"] + (["wall hours"] if plan.gpus > 1 else []) + ["judge calls", "disk"]

    def cells(name: str, models: str, v: dict[str, float]) -> list[str]:
        return ([name, models, f"{v['model_runs']:.0f}", _number(v["examples"]), f"{v['steps']:,.0f}",
                 _number(v["tokens_read"]), _number(v["tokens_written"]), f"{v['flops']:.2e}",
                 _hours(v["gpu_hours"])] + ([_hours(v["gpu_hours"] / plan.gpus)] if plan.gpus > 1 else [])
                + [f"{v['judge_calls']:,.0f}", _bytes(v["disk_bytes"])])

    rows = [header]
    for s in plan.stages:
        models = ", ".join(s.models) if len(s.models) <= 2 else f"{len(s.models)} models"
        rows.append(cells(s.stage, models, asdict(s) | {"gpu_hours": s.gpu_hours}))
    totals = plan.totals
    rows.append(cells("total", f"{totals['models_trained']:.0f} models", totals))
    return rows


def _footer(plan: Plan) -> list[str]:
    t, m = plan.totals, plan.memory
    gpu = GPUS[plan.gpu]
    on = (f"{plan.calibrated_on} (calibrated)" if plan.calibrated_on else
          f"{gpu.label} ({gpu.flops / 1e12:.0f} TFLOP/s bf16 dense, {gpu.bandwidth / 1e12:.2f} TB/s)")
    money = (f" = ${plan.judge_dollars:,.0f} at ${plan.judge_price[0]:g} / ${plan.judge_price[1]:g} per million "
             "prompt / reply tokens" if plan.judge_price else "")
    engine = ", inference by vLLM" if plan.engine == "vllm" else ""
    lines = [f"{plan.preset}: {plan.model} on {plan.gpus} x {on}{engine}: {t['gpu_hours']:.1f} GPU-hours, "
             f"{t['wall_hours']:.1f} hours of wall clock, {t['judge_calls']:,.0f} judge calls "
             f"({_number(t['judge_prompt_tokens'])} prompt tokens, {_number(t['judge_reply_tokens'])} reply tokens"
             f"{money}), {_bytes(t['disk_bytes'])} on disk.",
             f"Training memory per GPU: {m.verdict} ({_bytes(m.state_bytes)} weights and optimizer state + "
             f"{_bytes(m.activation_bytes_mean)}-{_bytes(m.activation_bytes_worst)} activations of "
             f"{_bytes(m.gpu_bytes)}): {m.how}.",
             f"Generation memory per GPU: {m.generation_verdict} ({_bytes(m.generation_bytes)}: every process holds "
             "the whole model and a KV cache of its largest batch at model.context_length)."]
    return lines + [f"{key}: {value}." for key, value in plan.assumptions.items()]


def render_text(plan: Plan) -> str:
    """The plan as an aligned table and its assumptions, for a terminal."""
    rows = table_rows(plan)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    notes = [f"  {s.stage}: {note}" for s in plan.stages for note in s.notes]
    return "\n".join(lines + ([""] + notes if notes else []) + [""] + _footer(plan)) + "\n"


def render_markdown(plan: Plan) -> str:
    """The plan as a Markdown table, then its totals and assumptions as a list."""
    rows = table_rows(plan)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:-1]]
    lines.append("| " + " | ".join(f"**{c}**" for c in rows[-1]) + " |")
    return "\n".join(lines + [""] + [f"- {line}" for line in _footer(plan)]) + "\n"
