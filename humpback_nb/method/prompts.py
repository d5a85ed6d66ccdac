"""Every prompt of the method, each with its source, and the two training formats built from them.

Forward (instruction -> output), used by M0, M1, M2 and for answers: a chat with the tag as the system
message, the instruction as the user turn, the output as the assistant turn. Backward (output ->
instruction), used by M_yx: the user turn holds BACKWARD_PROMPT and the output, the assistant turn the
instruction. How a chat becomes token ids (the tokenizer's chat template, or BASE_TEMPLATE for a base model
without one; `prompt_ids`, `turn_end_ids`, `fit_text`) is the chat format in `humpback_nb.infra.chat`.
"""

from __future__ import annotations

from humpback_nb.infra.chat import Message

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

def forward_messages(instruction: str, tag: str) -> list[Message]:
    """The prompt of a forward example: the system prompt of `tag` (a key of TAGS) and the instruction."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; tags: {', '.join(TAGS)}")
    system = TAGS[tag]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]


def backward_messages(output: str) -> list[Message]:
    """The prompt of a backward example: the output M_yx should write an instruction for."""
    return [{"role": "user", "content": f"{BACKWARD_PROMPT}\n\n{output}"}]


# Li et al. 2023, Table 1 (v1; Table 19 in v3): the self-curation prompt, verbatim. The model rates a
# candidate (instruction, output) pair on a 5-point scale. "<generated instruction>" and "<output>" are
# the places the pair goes.
CURATION_PROMPT = """Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

<generated instruction>
<output>"""  # noqa: E501 (verbatim)


def curation_messages(instruction: str, output: str, tag: str = "S_a") -> list[Message]:
    """The rating prompt for one candidate pair, with the system prompt of `tag` (M0 was trained on S_a)."""
    text = CURATION_PROMPT.replace("<generated instruction>\n<output>", f"{instruction}\n{output}")
    system = TAGS[tag]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
