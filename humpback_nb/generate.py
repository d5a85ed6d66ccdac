"""Text generation with the kit's models."""

from __future__ import annotations

import torch

from humpback_nb.config import GenerationConfig


def chat(model, tokenizer, message: str, system: str | None = None,
         settings: GenerationConfig | None = None, greedy: bool = False) -> str:
    """The model's reply to one user message, through the tokenizer's chat template.

    Sampling follows `settings` (nucleus sampling, seeded); `greedy=True` decodes greedily.
    """
    settings = settings or GenerationConfig()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    sampling = {} if greedy else {"temperature": settings.temperature, "top_p": settings.top_p}
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=not greedy,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
