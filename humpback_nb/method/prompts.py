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

# The backward prompt as quoted by a follow-up from the same lab (Nguyen et al. 2024, arXiv 2408.04614);
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


# -- The follow-ups' prompts (config `variant`, docs/variants.md) -------------------------------------------------
# Each is the published text where its authors published one, with where it comes from; where they did not, ours,
# said so. tests/method/test_variant_prompts.py checks the published ones against their sources' text
# (tests/data/prompt_sources/).

# AlpaGasus (Chen et al. 2023, arXiv 2307.08701, Figure 3), verbatim from its code (github.com/gpt4life/alpagasus,
# rating/chatgpt_rating.py, the "accuracy" rating it used): a system message, then the pair as an Alpaca triplet
# followed by the request. Its scale is 0 to 5; the paper keeps the pairs rated >= 4.5.
ALPAGASUS_SYSTEM = ("We would like to request your feedback on the performance of AI assistant in response to the "
                    "instruction and the given input displayed following.")
ALPAGASUS_TRIPLET = "###Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}\n\n"
ALPAGASUS_USER = ("Please rate according to the accuracy of the response to the instruction and the input. Each "
                  "assistant receives a score on a scale of 0 to 5, where a higher score indicates higher level of "
                  "the accuracy. Please first output a single line containing value indicating the scores. In the "
                  "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
                  "potential bias. \n\n")


def alpagasus_messages(instruction: str, output: str, input: str = "") -> list[Message]:
    """AlpaGasus's rating request for one pair, as its code sends it."""
    triplet = ALPAGASUS_TRIPLET.format(instruction=instruction, input=input, output=output)
    return [{"role": "system", "content": ALPAGASUS_SYSTEM}, {"role": "user", "content": triplet + ALPAGASUS_USER}]


# Kun (Zheng et al. 2024, arXiv 2401.06477), from its code (github.com/Zheng0428/COIG-Kun, evaluation/common.py,
# `load_questions`). Answer polishment: the chat model M0 reads the raw text, then the instruction after
# ",请回答:" ("please answer:"); the same function budgets the prompt's tokens with the English
# "<text>,Combining the above information. Please answer the question". The kit's data are English: the English
# sentence is the request, the instruction after it as in the Chinese prompt.
KUN_POLISH_PUBLISHED = "{output},请回答:{instruction}"
KUN_POLISH_ENGLISH = "{output},Combining the above information. Please answer the question"
KUN_POLISH_PROMPT = KUN_POLISH_ENGLISH + ":{instruction}"
# Kun's instruction scoring: its scorer is a model fine-tuned to rate instructions, prompted with this template
# alone (no rubric), which a chat model the kit has not fine-tuned for it cannot follow.
KUN_SCORER_PUBLISHED = "指令: 【{instruction}】 回复："
# Ours, therefore (not Kun's): the paper's self-curation rubric turned to the instruction alone, so that both of
# the kit's raters (generate: "Score: N" parsed strictly; logprob: the probabilities of "1".."5") read it as they
# read the paper's.
KUN_INSTRUCTION_PROMPT = """Below is an instruction from an user. Evaluate whether or not it is a good example of an instruction a user would give an AI Assistant. Please assign a score using the following 5-point scale:
1: It means the instruction is not an instruction: it is a fragment, a title, navigation or promotional text, or it cannot be understood.
2: It means the instruction can be understood but asks for very little, or for something only the text's author could know.
3: It means the instruction is a clear request, but vague, too broad, or depends on a context it does not give.
4: It means the instruction is a clear, self-contained request an AI Assistant can answer helpfully.
5: It means it is a perfect instruction: clear, specific, self-contained and worth a detailed, expert answer.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

<generated instruction>"""  # noqa: E501 (one line a score, as the paper's rubric)

# Back-and-forth translation (Nguyen et al. 2024, arXiv 2408.04614, section 2): an aligned chat model rewrites the
# response "conditioned on the generated instructions and the initial web texts". Ours: the paper's own rewriting
# prompt was not in any source this kit could read, so this one is written from that description; replace it with
# the paper's when you have it (docs/variants.md).
BFT_REWRITE_PROMPT = """Below is an instruction from a user and a text from the web that answers it. Rewrite the text into the response an AI Assistant should give to the instruction: keep the text's information, facts and details, leave out what does not serve the instruction (navigation, promotion, personal asides, other people's comments), and write it as a helpful, well-organized answer. Write the response only.

Instruction:
{instruction}

Text:
{output}"""  # noqa: E501


def rewrite_messages(method: str, instruction: str, output: str) -> list[Message]:
    """The rewriting request of a follow-up for one pair (instruction, web text): back-and-forth translation's
    ("bft") or Kun's answer polishment ("kun")."""
    template = {"bft": BFT_REWRITE_PROMPT, "kun": KUN_POLISH_PROMPT}[method]
    return [{"role": "user", "content": template.format(instruction=instruction, output=output)}]


def instruction_messages(instruction: str, tag: str = "S_a") -> list[Message]:
    """The rating prompt for an instruction alone (Kun's scoring, our rubric), with the system prompt of `tag`."""
    text = KUN_INSTRUCTION_PROMPT.replace("<generated instruction>", instruction)
    system = TAGS[tag]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
