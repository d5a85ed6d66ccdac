"""The model out of a run: one merged model that plain transformers loads (`humpback export`), and answers in a
terminal (`humpback chat`).

    humpback export --run-dir runs/demo --model m2 --to m2-merged
    echo "Name a whale that sings." | humpback chat --run-dir runs/demo --model m2

An exported folder holds safetensors weights (a LoRA adapter merged into its base, in the base's dtype; a
fully fine-tuned model as it is), config.json, generation_config.json and the tokenizer with the chat template
the kit trained with (the base's own, or the kit's base-model format), so that
`AutoTokenizer.from_pretrained(DIR).apply_chat_template(...)` gives the prompts the kit trained on and
generation stops where a turn ends. Nothing is written unless all of it is.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from humpback_nb.config import HumpbackConfig
from humpback_nb.infra.files import atomic_dir
from humpback_nb.pipeline import open_run
from humpback_nb.run import PipelineError, RunFiles


def trained_models(run_dir: str | Path) -> list[str]:
    """Names of the models a run has trained (models/<name> with its training log)."""
    from humpback_nb.infra.models import TRAIN_LOG

    folder = RunFiles(run_dir).path("models")
    return sorted(p.name for p in folder.iterdir() if (p / TRAIN_LOG).is_file()) if folder.is_dir() else []


def run_model(run_dir: str | Path, model: str, allow_base: bool = False) -> tuple[HumpbackConfig, Path | None]:
    """(the run's config, the folder of its model `model`); refused in one line when the run has no such model.
    With `allow_base`, "base" names the run's base model (folder None)."""
    folder = open_run(run_dir)
    config = folder.config()
    if allow_base and model == "base":
        return config, None
    have = trained_models(run_dir)
    if model not in have:
        raise PipelineError(f"{folder.path}: no trained model {model!r}; this run has: "
                            f"{', '.join(have) if have else 'none yet'}" + (" (and base)" if allow_base else ""))
    return config, folder.files.path("model", model)


def export(run_dir: str | Path, model: str, to: str | Path, say=print) -> Path:
    """Write model `model` of the run in `run_dir` to the folder `to` as one model plain transformers loads."""
    from humpback_nb.infra.models import load_tokenizer, resolve

    config, source = run_model(run_dir, model)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise PipelineError(f"{to}: exists and is not an empty folder; export writes a new folder")
    tokenizer = load_tokenizer(config.model)  # with the chat template the kit trained with
    adapter = (source / "adapter_config.json").is_file()
    if adapter and config.model.quantization == "4bit":
        say(f"{model} was trained on the 4-bit base (QLoRA): its adapter is merged into the unquantized base weights")
    with atomic_dir(to) as tmp:
        if adapter:
            merged = _merged(resolve(config.model.name), source)
            merged.save_pretrained(tmp, safe_serialization=True)
            generation = merged.generation_config
        else:  # full fine-tuning: the weights are the model
            from transformers import AutoConfig, GenerationConfig

            for weights in [*source.glob("*.safetensors"), *source.glob("*.safetensors.index.json")]:
                shutil.copyfile(weights, tmp / weights.name)
            AutoConfig.from_pretrained(source, trust_remote_code=False).save_pretrained(tmp)
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
        tokenizer.save_pretrained(tmp)
        _generation_config(generation, tokenizer, config).save_pretrained(tmp)
    what = f"its LoRA merged into {config.model.name}" if adapter else "full weights"
    say(f"exported {model} of {run_dir} to {to}: {what}, {_dtype_of(to)}")
    return to


def _merged(base_path: str, adapter: Path):
    """The base model in its own dtype, unquantized, with the LoRA adapter in `adapter` merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto", use_safetensors=True,
                                                trust_remote_code=False)
    with warnings.catch_warnings():  # peft asks transformers a question transformers renamed; the answer is the same
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _generation_config(generation, tokenizer, config: HumpbackConfig):
    """The run's sampling (generate: temperature, top_p, max_new_tokens), stopping at every id that ends a turn in
    the kit's format (the EOS, and ChatML's <|im_end|> where the template writes it)."""
    from humpback_nb.infra.chat import turn_end_ids

    settings = config.generate
    generation.eos_token_id = turn_end_ids(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.do_sample = settings.temperature > 0
    generation.temperature, generation.top_p = settings.temperature, settings.top_p
    generation.max_new_tokens = settings.max_new_tokens
    return generation


def _dtype_of(folder: Path) -> str | None:
    import json

    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return settings.get("dtype") or settings.get("torch_dtype")


def chat(run_dir: str | Path, model: str, tags: str | None = None, max_new_tokens: int | None = None,
         questions: TextIO | None = None, out: TextIO | None = None) -> int:
    """Answer each line of `questions` with model `model` of the run (or "base"), decoding as the evaluation
    does (the run's generate settings, the system prompt of `tags`, by default evaluate.inference_tags); each
    answer is followed by a blank line. `questions` and `out` default to stdin and stdout. Returns the number of
    questions answered."""
    from humpback_nb.infra.engines import LocalEngine
    from humpback_nb.infra.models import load_model, load_trained
    from humpback_nb.method.prompts import TAGS, forward_messages
    from humpback_nb.nb.quiet import quiet_libraries

    quiet_libraries()  # the answers only: no loading bars or the libraries' deprecation notices
    questions, out = questions or sys.stdin, out or sys.stdout  # read when called: a test or a pipe may swap them
    config, folder = run_model(run_dir, model, allow_base=True)
    tags = tags or config.evaluate.inference_tags
    if tags not in TAGS:
        raise PipelineError(f"--tags {tags!r}: unknown; tags: {', '.join(TAGS)}")
    settings = replace(config.generate, max_new_tokens=max_new_tokens or config.generate.max_new_tokens)
    engine = LocalEngine(*(load_model(config.model) if folder is None else load_trained(config.model, folder)))
    if questions.isatty():
        print(f"{model} of {run_dir}, system prompt {tags}: a question per line, Ctrl-D to end", file=sys.stderr)
    answered = 0
    for line in questions:
        question = line.strip()
        if not question:
            continue
        # as evaluate.answer asks: one prompt, the run's sampling and seed, the reply stripped
        request = [{"id": f"chat-{answered}", "messages": forward_messages(question, tags)}]
        reply = engine.generate(request, settings, settings.max_new_tokens, progress=False)[0]
        print(reply["text"].strip() + "\n", file=out, flush=True)
        answered += 1
    return answered
