"""Every prompt of the method, each with its source, and the two training formats built from them.

Forward (instruction -> output), used by M0, M1, M2 and for answers: a chat with the tag as the system
message, the instruction as the user turn, the output as the assistant turn. Backward (output ->
instruction), used by M_yx: the user turn holds BACKWARD_PROMPT and the output, the assistant turn the
instruction. Both are rendered with the tokenizer's chat template; a tokenizer without one (a base
LLaMA) gets CHATML_TEMPLATE.
"""

from __future__ import annotations

# Li et al. 2023, section 2.3 ("tagged back-translation"): the system prompts that mark where an
# example came from. Seed examples carry S_a, augmented (web) examples S_w; S_a + S_w at inference.
S_A = "Answer in the style of an AI Assistant."
S_W = "Answer with knowledge from web search."

# Which system prompt each `tags` setting stands for (config: evaluate.inference_tags).
TAGS = {"S_a": S_A, "S_w": S_W, "S_a+S_w": f"{S_A} {S_W}", "none": None}

# The backward prompt as quoted by a follow-up from the same lab (Yu et al. 2024, arXiv 2408.04614);
# Li et al. 2023 fine-tune M_yx on (output -> instruction) pairs without printing a prompt.
BACKWARD_PROMPT = (
    "Below is a candidate answer to a question or instruction from an user. "
    "Write the most likely question to which the text below would be a great answer."
)

# ChatML, for tokenizers that come without a chat template (base models such as LLaMA-2-7B).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]


def forward_messages(instruction: str, tag: str) -> list[Message]:
    """The prompt of a forward example: the system prompt of `tag` (a key of TAGS) and the instruction."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; tags: {', '.join(TAGS)}")
    system = TAGS[tag]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]


def backward_messages(output: str) -> list[Message]:
    """The prompt of a backward example: the output M_yx should write an instruction for."""
    return [{"role": "user", "content": f"{BACKWARD_PROMPT}\n\n{output}"}]


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a prompt, ending where the assistant's answer begins: the same in training and generation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=True)["input_ids"]
