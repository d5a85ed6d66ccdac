"""Self-augmentation (paper section 2.2): the backward model M_yx writes an instruction for every segment.

Each unlabelled segment y becomes a candidate pair (x, y), x being what M_yx thinks y answers. A
backward model can fail in ways that no rating should have to catch, and public reimplementations
show them: it writes nothing, rambles on until the token limit cuts it off, echoes the start of the segment,
writes about the task itself ("Write the most likely question..."), writes back a system prompt or the template's
markup, or asks about the conversation itself ("Is there a user?"). Those candidates are dropped here, each with
its reason.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from humpback_nb.config import GenerateConfig
from humpback_nb.infra.chat import fit_text, prompt_ids
from humpback_nb.method.data.filters import words
from humpback_nb.method.prompts import S_A, S_W, backward_messages

# Instructions about the backtranslation task or about a text the instruction cannot show.
META_INSTRUCTION = re.compile(
    r"candidate answer|most likely question|great answer|"
    r"\b(?:write|generate|create|ask) (?:a|an|the) (?:question|instruction)s?(?![\w-])|"
    r"\b(?:the|this) (?:text|passage|paragraph|excerpt|article|answer|response) (?:below|above)\b|"
    r"\bthe (?:following|given|provided|above) (?:text|passage|paragraph|excerpt|article|answer|response)\b"
)
ECHO_WORDS = 8  # an instruction whose first words are the segment's first words echoes it
# A system prompt the model saw in pre-training or fine-tuning, written back ("You are a helpful AI assistant named
# SmolLM, trained by Hugging Face"): the start of a system prompt, not a user's instruction.
SYSTEM_PROMPT = re.compile(r"^(?:you are|you're|as) (?:a|an) (?:[\w-]+ ){0,4}(?:ai|assistant|chatbot|language model)\b")
# The markup of the kit's formats and ChatML, and the tags' system prompts: template text, not an instruction.
TEMPLATE_TEXT = ("### system:", "### user:", "### assistant:", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>",
                 S_A.lower(), S_W.lower())
# Questions about the conversation itself (who is there, who is speaking), which no web text answers.
ABOUT_THE_CONVERSATION = re.compile(
    r"^(?:is|are) (?:there|you) (?:a|an|the|any)? ?(?:user|human|assistant|ai|bot|person)s?\b|"
    r"^who (?:is|are) (?:the |this |my )?(?:user|assistant|speaker|you)\b|"
    r"\b(?:this|our|the) (?:conversation|chat|dialogue)\b"
)


def degeneracy(instruction: str, output: str, max_chars: int) -> str | None:
    """Why a generated instruction is unusable, or None when it is fine."""
    text = instruction.strip()
    if not any(c.isalnum() for c in text):
        return "empty"
    lower = text.lower()
    marker = next((m for m in TEMPLATE_TEXT if m in lower), None)
    if marker:
        return f"template text ({marker!r})"
    if SYSTEM_PROMPT.search(lower):
        return "a system prompt, not an instruction"
    conversation = ABOUT_THE_CONVERSATION.search(lower)
    if conversation:
        return f"about the conversation itself ({conversation.group(0)!r})"
    if len(text) > max_chars:
        return f"too long ({len(text)} > {max_chars} characters)"
    head, start = words(text), words(output)
    k = min(len(head), ECHO_WORDS)
    if k >= 3 and head[:k] == start[:k]:
        return "copies the start of the output"
    if len(text) >= 40 and f" {' '.join(head)} " in f" {' '.join(start)} ":
        return "copied from the output"
    meta = META_INSTRUCTION.search(lower)
    if meta:
        return f"meta-instruction ({meta.group(0)!r})"
    return None


def split_degenerate(candidates: list[dict[str, Any]], max_chars: int,
                     drop_capped: bool = True) -> tuple[list[dict], list[dict]]:
    """(kept, dropped); a dropped candidate carries its `reason`. With `drop_capped`, an instruction that did not
    end before the token limit (`finished` false: cut off, most often rambling) is dropped first of all."""
    kept, dropped = [], []
    for candidate in candidates:
        capped = drop_capped and not candidate.get("finished", True)
        reason = (f"hit the token cap ({candidate.get('new_tokens')} tokens)" if capped
                  else degeneracy(candidate["instruction"], candidate["output"], max_chars))
        (dropped if reason else kept).append({**candidate, "reason": reason} if reason else candidate)
    return kept, dropped


def backward_prompts(tokenizer, segments: list[dict[str, Any]], context_length: int,
                     max_new_tokens: int) -> list[dict]:
    """The prompt M_yx gets for each segment; a segment too long for the context is cut to fit."""
    room = context_length - max_new_tokens - len(prompt_ids(tokenizer, backward_messages("")))
    return [{"id": s["id"], "messages": backward_messages(fit_text(tokenizer, s["text"], room))} for s in segments]


def generation_settings(settings: GenerateConfig) -> dict[str, Any]:
    return {"temperature": settings.temperature, "top_p": settings.top_p, "random_seed": settings.random_seed,
            "max_new_tokens": settings.instruction_max_new_tokens}


def write_instructions(engine, texts: list[dict[str, Any]], settings: GenerateConfig, context_length: int,
                       partial=None) -> list[dict[str, Any]]:
    """M_yx's instruction for each {"id", "text"} (`engine` runs M_yx): generation records ("text" is the
    instruction)."""
    prompts = backward_prompts(engine.tokenizer, texts, context_length, settings.instruction_max_new_tokens)
    return engine.generate(prompts, settings, settings.instruction_max_new_tokens, partial=partial,
                           desc="self-augmentation")


def self_augment(engine, segments: list[dict[str, Any]], settings: GenerateConfig, context_length: int,
                 partial=None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(candidates, dropped, report): M_yx (run by `engine`) writes an instruction for every segment, and the
    degenerate ones are set aside with their reason (paper section 2.2)."""
    generated = write_instructions(engine, segments, settings, context_length, partial=partial)
    used = generation_settings(settings)
    candidates = [
        {"id": f"cand-{segment['id']}", "segment_id": segment["id"], "instruction": g["text"].strip(),
         "output": segment["text"], "source": segment["source"], "header": segment["header"],
         "finished": g["finished"], "new_tokens": g["new_tokens"], "generation": used}
        for segment, g in zip(segments, generated, strict=True)
    ]
    kept, dropped = split_degenerate(candidates, settings.max_instruction_chars, settings.drop_capped)
    report = {
        "segments": len(segments),
        "kept": len(kept),
        "dropped": dict(Counter(d["reason"].split(" (")[0] for d in dropped)),
        "unfinished": sum(not c["finished"] for c in candidates),
        # instructions still being written at generate.instruction_max_new_tokens: their share, and their fate
        "capped_share": round(sum(not c["finished"] for c in candidates) / max(1, len(segments)), 4),
        "drop_capped": settings.drop_capped,
        "generation": used,
        "new_tokens": sum(g["new_tokens"] for g in generated),
    }
    return kept, dropped, report
