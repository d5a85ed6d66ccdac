"""Load the base model (full precision or 4-bit NF4), and attach, save and load LoRA adapters.

Device and dtype are chosen in one place, `runtime()`: CUDA when present, else the CPU; bf16 where
the hardware computes it natively, else fp16 (old GPUs) or fp32 (old CPUs). Models load from
safetensors only and never run code shipped with a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from humpback_nb.config import ModelConfig, TrainConfig
from humpback_nb.infra.attention import use_cpu_attention
from humpback_nb.infra.chat import BASE_TEMPLATE
from humpback_nb.infra.files import atomic_dir, exclusive
from humpback_nb.infra.guard import ModelError  # defined without torch, so that the CLI catches it cheaply
from humpback_nb.infra.sources import cache_dir, fetch

# bitsandbytes looks for a faster CPU 4-bit kernel on the hub when it is imported and warns when it cannot
# have one; its own kernel is used then, which is what runs offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Embedded model names -> the source (in sources.py) that holds their GGUF file.
EMBEDDED_MODELS = {"smollm2-135m": "smollm2-135m-gguf"}
# The same weights dressed as a base model such as LLaMA-2: no chat template, and an EOS (`<|endoftext|>`) that
# ChatML does not use. Runs on it take the base-model format, as a LLaMA run does (tests, `humpback gpu-check`).
EMBEDDED_VARIANTS = {"smollm2-135m-as-base": ("smollm2-135m", "<|endoftext|>")}
ADAPTER_FILE = "adapter_model.safetensors"
TRAIN_LOG = "train_log.json"  # beside the weights of every model the kit trains




@dataclass(frozen=True)
class Runtime:
    """Where the model runs and in which floating-point type it computes."""

    device: str
    dtype: torch.dtype


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 beats fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """The one place where device and dtype are decided for every model of the kit."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA device")
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if cpu_has_bf16() else "float32"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under a launcher
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return Runtime(device=device, dtype=getattr(torch, dtype))


def embedded_names() -> list[str]:
    """Names of the embedded models and their variants."""
    return [*EMBEDDED_MODELS, *EMBEDDED_VARIANTS]


def embedded_checkpoint(name: str = "smollm2-135m") -> Path:
    """A safetensors checkpoint of an embedded model, converted from its GGUF file once and cached."""
    if name not in embedded_names():
        raise ModelError(f"unknown embedded model {name!r}; embedded: {', '.join(embedded_names())}")
    target = cache_dir() / "models" / name

    def ready() -> bool:
        return (target / "config.json").is_file() and (target / "model.safetensors").is_file()

    if ready():
        return target
    # Two processes finding the cache empty (two test workers, a launch's processes) convert once: the second waits
    # and reads the first's folder, which replacing it with its own would pull from under the first's reads.
    with exclusive(target.with_name(f".{name}.lock")):
        if ready():
            return target
        if name in EMBEDDED_VARIANTS:
            original, eos = EMBEDDED_VARIANTS[name]
            with atomic_dir(target) as tmp:
                as_base_model(embedded_checkpoint(original), tmp, eos)
            return target
        gguf_path = fetch(EMBEDDED_MODELS[name])
        with atomic_dir(target) as tmp:
            convert_gguf(gguf_path, tmp)
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantize a GGUF checkpoint into a plain model and save it as safetensors with its tokenizer.

    transformers reads GGUF as a quantized model; to load it later in 4-bit through bitsandbytes
    the weights must be an ordinary checkpoint, so the dequantized state dict goes into a fresh
    model built from the config without its `quantization_config`.
    """
    from transformers import GgufConfig

    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name, "quantization_config": GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=dtype, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = loaded.state_dict()
    odd = sorted(k for k, v in state.items() if not v.is_floating_point())
    if odd:
        raise ModelError(f"{gguf_path}: tensors still packed after dequantizing: {odd[:3]}")
    model.load_state_dict(state, strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def as_base_model(checkpoint: str | Path, out_dir: str | Path, eos_token: str) -> None:
    """A copy of `checkpoint` that looks like a base model such as LLaMA-2: no chat template, no pad token, and
    `eos_token` as its EOS (in the tokenizer, the model config and the generation config). The weights are
    linked, not copied, where the file system allows."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token:
        raise ModelError(f"{checkpoint}: {eos_token!r} is not a token of this tokenizer")
    tokenizer.chat_template = None
    tokenizer.eos_token = eos_token
    tokenizer.pad_token = None
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((checkpoint / name).read_text(encoding="utf-8"))
        settings["eos_token_id"] = eos_id
        settings.pop("pad_token_id", None)
        (out_dir / name).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for weights in checkpoint.glob("*.safetensors"):
        try:
            os.link(weights, out_dir / weights.name)
        except OSError:
            shutil.copyfile(weights, out_dir / weights.name)


def _hub(name: str, source: str):
    """Loading from a hub id: a failure is one line (infra.sources.from_hub); from a local folder, as it is."""
    from humpback_nb.infra.sources import from_hub

    if Path(source).is_dir():
        return contextlib.nullcontext()
    return from_hub(name, "model.name", "an embedded name or a local folder with safetensors")


def resolve(name: str) -> str:
    """Where `name` loads from: the embedded checkpoint, a local folder, or a hub id."""
    if name in embedded_names():
        return str(embedded_checkpoint(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"{path}: no *.safetensors file; the kit loads safetensors checkpoints only")
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.suffix
    if looks_like_hub_id:
        return name
    raise ModelError(
        f"model {name!r} is neither an embedded model ({', '.join(embedded_names())}), "
        "an existing folder, nor a hub id of the form 'org/name'"
    )


def load_model(
    spec: ModelConfig | str = "smollm2-135m",
    quantization: str | None = None,
    adapter: str | Path | None = None,
    merge: bool = True,
    attention_dropout: float | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) for a model spec, in full precision or 4-bit NF4, with an optional adapter.

    `spec` is a `ModelConfig` or a model name; `quantization` ("none" or "4bit") overrides the
    config's. The tokenizer pads on the left, as batched generation needs. An adapter on dense weights is
    merged into them (`merge`), which makes inference cheaper; on packed 4-bit weights it stays apart.
    `attention_dropout` goes into the model's config before the model is built: LLaMA's attention layers copy
    it when they are made, so setting it afterwards changes nothing.
    """
    config = ModelConfig(name=spec) if isinstance(spec, str) else spec
    quantization = quantization or config.quantization
    where = runtime(config.device, config.dtype)
    source = resolve(config.name)
    kwargs: dict = {"dtype": where.dtype, "use_safetensors": True, "trust_remote_code": False}
    if attention_dropout is not None:
        from transformers import AutoConfig

        with _hub(config.name, source):
            settings = AutoConfig.from_pretrained(source, trust_remote_code=False)
        if not hasattr(settings, "attention_dropout"):
            raise ModelError(f"{config.name}: its config ({settings.model_type}) has no attention_dropout, so "
                             "train.dropout cannot apply to full fine-tuning; set train.dropout: 0")
        settings.attention_dropout = attention_dropout
        kwargs["config"] = settings
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=where.dtype,
        )
        kwargs["device_map"] = {"": where.device if where.device == "cpu" else torch.device(where.device).index or 0}
    elif quantization != "none":
        raise ModelError(f"quantization must be 'none' or '4bit', got {quantization!r}")
    unpacked = quantization == "4bit" and where.device == "cpu" and config.dequantize_on_cpu
    kept = where.device == "cpu" and (unpacked or quantization == "none")
    key = _kept_key(source, where.dtype, quantization, attention_dropout) if kept else None
    copied = key is not None and key in _KEPT
    if copied:
        model = copy.deepcopy(_KEPT[key])
    else:
        with _hub(config.name, source):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if quantization == "none":
            model.to(where.device)
        elif unpacked:
            model = model.dequantize()  # NF4 values kept, unpacked once (see ModelConfig.dequantize_on_cpu)
        if key is not None and model.get_memory_footprint() <= KEPT_BYTES:
            _KEPT.clear()  # one base model at a time
            _KEPT[key] = copy.deepcopy(model)
    if where.device == "cpu":
        use_cpu_attention(model)  # causal attention as two matrix products: a third of SDPA's time on a CPU
    tokenizer = load_tokenizer(config)
    if adapter is not None:
        merging = merge and not is_4bit(model)
        if merging and where.device == "cpu" and quantization == "none" and not copied:
            _copy_out_of_the_file(model)
        model = load_adapter(model, adapter)
        if merging:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def _copy_out_of_the_file(model) -> None:
    """Weights loaded from safetensors on a CPU stay mapped from the file, and the first write to each page of them
    (a LoRA merge writes every weight it touches) faults it in copy-on-write, page by page: merging an adapter into
    the tiny preset's model took 1.3 s so, 0.2 s after one copy of the weights (0.1 s; a 2-core Xeon). Tied weights
    stay tied: each parameter is copied once, in place."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()


# A base model kept once per process on a CPU, and copied at each load after the first: the method loads its base
# model some forty times (every training, every model that answers or rates). Quantized to NF4 and unpacked, quantizing
# takes ten times as long as loading; in full precision, a load of the tiny preset's model takes 0.54 -> 0.23 s with
# a copy (docs/performance.md, "Loading"), which is out of the file already, ready to merge an adapter into. A copy of
# the kept model is what loading again would give, value for value.
_KEPT: dict[tuple, PreTrainedModel] = {}
KEPT_BYTES = 2 * 2**30


def _kept_key(source: str, dtype: torch.dtype, quantization: str, attention_dropout: float | None) -> tuple | None:
    """What identifies a kept base model: its folder, weight files (name, size, time), dtype and the settings it was
    built with; None for a hub id, whose files the kit does not see."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors")))
    return str(folder.resolve()), files, str(dtype), quantization, attention_dropout


def load_tokenizer(spec: ModelConfig | str = "smollm2-135m"):
    """The model's tokenizer, padding on the left (as batched generation needs), with a chat template: its own,
    or for a base model (LLaMA-2 has none) the base-model format, whose assistant turns end with the EOS.

    A tokenizer without a pad token pads with its unknown token, else with its EOS. Padding is never told apart
    by its id anywhere in the kit (attention masks and labels mark it), so an EOS that is also the pad token is
    still learned and still stops generation.
    """
    config = ModelConfig(name=spec) if isinstance(spec, str) else spec
    source = resolve(config.name)
    with _hub(config.name, source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise ModelError(f"{config.name}: the tokenizer has neither a chat template nor an EOS token, so a "
                             "trained model could not mark where its answer ends")
        tokenizer.chat_template = BASE_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def is_4bit(model: torch.nn.Module) -> bool:
    """True while the model holds packed bitsandbytes 4-bit weights."""
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def attach_lora(model: PreTrainedModel, train: TrainConfig, gradient_checkpointing: bool = False):
    """Wrap `model` with fresh trainable LoRA adapters (QLoRA when the base is 4-bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_4bit(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.dropout,
        target_modules=train.lora_target,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def save_adapter(model, path: str | Path) -> Path:
    """Save a model's LoRA adapter as safetensors into `path`, atomically (the whole folder or nothing)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / ADAPTER_FILE).is_file():
            raise ModelError(f"saving the adapter wrote no {ADAPTER_FILE}; is this a peft model?")
    return path


def load_adapter(model: PreTrainedModel, path: str | Path, trainable: bool = False,
                 gradient_checkpointing: bool = False):
    """Put the LoRA adapter saved in `path` (safetensors) on `model`.

    `trainable=True` prepares the model exactly as `attach_lora` does, to go on training it.
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    path = Path(path)
    if not (path / ADAPTER_FILE).is_file():
        raise ModelError(f"{path}: no {ADAPTER_FILE}; the kit loads adapters saved as safetensors only")
    if trainable and is_4bit(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return PeftModel.from_pretrained(model, path, is_trainable=trainable)


def load_trained(base: ModelConfig, path: str | Path, merge: bool = True) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) of a model the kit trained: `base` with the LoRA adapter saved in `path`, or the full
    checkpoint in `path` (loaded with the settings of `base`)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return load_model(base, adapter=path, merge=merge)
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: neither a LoRA adapter nor a safetensors checkpoint; has its stage run?")
    return load_model(replace(base, name=str(path)))


def read_train_log(path: str | Path) -> dict:
    """The training log saved beside a trained model's weights: the plan, and the loss and learning rate per step."""
    return json.loads((Path(path) / TRAIN_LOG).read_text(encoding="utf-8"))
