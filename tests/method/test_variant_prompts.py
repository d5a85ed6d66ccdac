"""The follow-ups' prompts (method/prompts.py) against their sources (tests/data/prompt_sources/): each published
prompt is found in its source's text, character for character, once the source's Python string literal is read as
Python reads it; the prompts the kit wrote say so, and the message builders put each text where its template says."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from humpback_nb.method import prompts
from humpback_nb.method.curate import rating_messages
from humpback_nb.method.prompts import (
    ALPAGASUS_SYSTEM,
    ALPAGASUS_TRIPLET,
    ALPAGASUS_USER,
    BACKWARD_PROMPT,
    BFT_REWRITE_PROMPT,
    CURATION_PROMPT,
    KUN_INSTRUCTION_PROMPT,
    KUN_POLISH_ENGLISH,
    KUN_POLISH_PROMPT,
    KUN_POLISH_PUBLISHED,
    KUN_SCORER_PUBLISHED,
    S_A,
    alpagasus_messages,
    instruction_messages,
    rewrite_messages,
)

SOURCES = Path(__file__).resolve().parents[1] / "data" / "prompt_sources"
# Kun's f-strings name the pair's fields as its code does; the kit's templates name them as str.format does.
KUN_FIELDS = {"{ques['output']}": "{output}", "{ques['instruction']}": "{instruction}",
              "{truncated_instruction}": "{instruction}"}


def source(name: str) -> str:
    """A source file's excerpt: its text after the header (its first lines that start with "# ")."""
    lines = (SOURCES / name).read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "".join(lines)


def literal(name: str, assigned: str) -> str:
    """The string `assigned = "..."` holds in the source `name`, read as Python reads it (escapes decoded; a
    method called on it, such as `.format_map(...)`, left out)."""
    line = next(line for line in source(name).splitlines() if line.strip().startswith(f"{assigned} = "))
    node = ast.parse(line.strip()).body[0].value
    while isinstance(node, ast.Call):  # "...".format_map(record)
        node = node.func.value
    return ast.literal_eval(node)


def f_strings(name: str) -> list[str]:
    """Every f-string of the source `name`, as its template: the text, with each placeholder as it is written."""
    found = []
    for node in ast.walk(ast.parse(source(name))):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(part.value if isinstance(part, ast.Constant)
                                 else "{" + ast.unparse(part.value) + "}" for part in node.values))
    return found


def kun_templates() -> list[str]:
    """Kun's f-strings with their placeholders named as the kit's templates name them."""
    templates = []
    for text in f_strings("kun_common.txt"):
        for written, ours in KUN_FIELDS.items():
            text = text.replace(written, ours)
        templates.append(text)
    return templates


# -- the published prompts, verbatim -------------------------------------------------------------------------------
def test_the_sources_hold_their_headers_and_excerpts():
    for name, needles in {"alpagasus_chatgpt_rating.txt": ("gpt4life/alpagasus", "rating/chatgpt_rating.py"),
                          "kun_common.txt": ("Zheng0428/COIG-Kun", "evaluation/common.py",
                                             "454528fd074e777d318ed3b250dd3e06b924175d"),
                          "humpback_curation.txt": ("2308.06259", "Table 1"),
                          "backward_prompt_quote.txt": ("2408.04614",)}.items():
        text = (SOURCES / name).read_text(encoding="utf-8")
        header = "".join(line for line in text.splitlines(keepends=True)[:3] if line.startswith("# "))
        assert all(needle in header for needle in needles), name
        assert source(name).strip(), name


@pytest.mark.parametrize("constant, assigned", [
    (ALPAGASUS_SYSTEM, "system_prompt"),
    (ALPAGASUS_USER, "user_prompt"),
    (ALPAGASUS_TRIPLET, "triplet"),
])
def test_alpagasus_prompts_are_its_code_s(constant, assigned):
    assert constant == literal("alpagasus_chatgpt_rating.txt", assigned)


def test_alpagasus_reads_the_accuracy_rating_not_the_commented_helpfulness_one():
    assert "accuracy" in ALPAGASUS_USER and "helpfulness" not in ALPAGASUS_USER
    assert ALPAGASUS_USER.endswith(" \n\n")  # the space before the blank line is the source's


def test_kun_scorer_prompt_is_its_point_branch():
    assert KUN_SCORER_PUBLISHED in kun_templates()
    # an ASCII colon follows 指令, a full-width one ends it
    assert KUN_SCORER_PUBLISHED == "指令: 【{instruction}】 回复："


@pytest.mark.parametrize("constant", [KUN_POLISH_PUBLISHED, KUN_POLISH_ENGLISH])
def test_kun_polishment_prompts_are_its_answer_branch(constant):
    assert constant in kun_templates()


def test_kun_polishment_is_its_english_line_with_the_instruction_placed_as_in_its_chinese_prompt():
    published, english = KUN_POLISH_PUBLISHED, KUN_POLISH_ENGLISH
    head, separator, tail = published.partition("请回答")  # "{output}," + "请回答" + ":{instruction}"
    assert separator and tail == ":{instruction}" and english.startswith(head)
    assert english + tail == KUN_POLISH_PROMPT


def test_curation_prompt_is_the_paper_s_table_1():
    assert source("humpback_curation.txt").rstrip("\n") == CURATION_PROMPT


def test_backward_prompt_is_the_quoted_one():
    quote = re.search(r'"([^"]*)"', " ".join(source("backward_prompt_quote.txt").split())).group(1)
    assert quote == BACKWARD_PROMPT  # the quote's lines joined by one space; the prompt itself is not normalised


def test_a_changed_character_is_caught():
    """The checks compare whole strings: a prompt that differs by one character from its source fails them."""
    changed = ALPAGASUS_USER.replace("a score", "an score")  # the commented-out prompt's wording
    assert changed != literal("alpagasus_chatgpt_rating.txt", "user_prompt")
    assert KUN_SCORER_PUBLISHED.replace("：", ":") not in kun_templates()
    assert re.search(r'"([^"]*)"', " ".join(source("backward_prompt_quote.txt").split()))[1] != BACKWARD_PROMPT + " "


# -- the kit's own prompts, said to be ours -----------------------------------------------------------------------
def comment_above(name: str) -> str:
    """The comment lines right above the assignment of `name` in prompts.py (and any that run on before it)."""
    lines = inspect.getsource(prompts).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
    above = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        above.insert(0, line)
    return "\n".join(above)


@pytest.mark.parametrize("name", ["KUN_INSTRUCTION_PROMPT", "BFT_REWRITE_PROMPT"])
def test_the_kit_s_own_prompts_say_they_are_ours(name):
    comment = comment_above(name)
    assert "Ours" in comment, comment
    assert "docs/variants.md" in comment or "not Kun's" in comment


def test_the_kit_s_own_prompts_are_in_no_source():
    texts = [source(p.name) for p in SOURCES.iterdir()]
    for ours in (KUN_INSTRUCTION_PROMPT, BFT_REWRITE_PROMPT):
        assert not any(ours.splitlines()[0] in text for text in texts)


# -- what the builders send --------------------------------------------------------------------------------------
INSTRUCTION = "How do I keep basil alive indoors?"
TEXT = "Basil likes sun.\n\nWater it when the soil is dry; pinch the flowers off."


def test_alpagasus_messages_are_a_system_message_then_the_triplet_and_the_request():
    messages = alpagasus_messages(INSTRUCTION, TEXT, "in a flat")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == ALPAGASUS_SYSTEM
    expected = ("###Instruction:\n" + INSTRUCTION + "\n\n### Input:\nin a flat\n\n### Response:\n" + TEXT + "\n\n"
                + ALPAGASUS_USER)
    assert messages[1]["content"] == expected
    # an Alpaca pair without input: the Input section stays, empty, as the source's format_map leaves it
    assert "### Input:\n\n\n### Response:\n" in alpagasus_messages(INSTRUCTION, TEXT)[1]["content"]


def test_alpagasus_messages_equal_the_source_s_format_map():
    record = {"instruction": INSTRUCTION, "input": "", "output": TEXT}
    triplet = literal("alpagasus_chatgpt_rating.txt", "triplet").format_map(record)
    assert alpagasus_messages(INSTRUCTION, TEXT)[1]["content"] == triplet + literal(
        "alpagasus_chatgpt_rating.txt", "user_prompt")


def test_alpagasus_messages_keep_braces_in_the_pair():
    messages = alpagasus_messages("Write {name} in JSON", '{"a": 1}')
    assert "Write {name} in JSON" in messages[1]["content"] and '{"a": 1}' in messages[1]["content"]


def test_kun_rewrite_puts_the_text_first_and_the_instruction_after_the_request():
    messages = rewrite_messages("kun", INSTRUCTION, TEXT)
    assert messages == [{"role": "user", "content":
                         f"{TEXT},Combining the above information. Please answer the question:{INSTRUCTION}"}]


def test_bft_rewrite_holds_the_instruction_then_the_web_text():
    [message] = rewrite_messages("bft", INSTRUCTION, TEXT)
    assert message["role"] == "user"
    content = message["content"]
    assert content == BFT_REWRITE_PROMPT.format(instruction=INSTRUCTION, output=TEXT)
    assert content.endswith(f"Instruction:\n{INSTRUCTION}\n\nText:\n{TEXT}")
    assert content.index(INSTRUCTION) < content.index(TEXT)
    assert "{" not in content.replace(TEXT, "")  # every placeholder filled


def test_rewrite_of_an_unknown_method_is_refused():
    with pytest.raises(KeyError):
        rewrite_messages("alpagasus", INSTRUCTION, TEXT)


def test_instruction_messages_rate_the_instruction_alone():
    messages = instruction_messages(INSTRUCTION)
    assert messages[0] == {"role": "system", "content": S_A}
    assert messages[1]["content"] == KUN_INSTRUCTION_PROMPT.replace("<generated instruction>", INSTRUCTION)
    assert messages[1]["content"].endswith(f'in the last line.\n\n{INSTRUCTION}')
    assert [m["role"] for m in instruction_messages(INSTRUCTION, "none")] == ["user"]


def test_rating_messages_follow_curate_sees():
    from humpback_nb.config import CurateConfig

    pair = rating_messages(INSTRUCTION, TEXT, CurateConfig())
    alone = rating_messages(INSTRUCTION, TEXT, CurateConfig(sees="instruction"))
    assert pair[-1]["content"].endswith(f"{INSTRUCTION}\n{TEXT}")
    assert alone == instruction_messages(INSTRUCTION)
    assert TEXT not in alone[-1]["content"]
    # both rubrics end as the paper's does, so that both raters read them the same way
    last = 'write "Score: <rating>" in the last line.'
    assert last in CURATION_PROMPT and last in KUN_INSTRUCTION_PROMPT
