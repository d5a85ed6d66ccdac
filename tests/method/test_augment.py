import pytest

from humpback_nb.method.augment import degeneracy, split_degenerate

SEGMENT = ("Humpback whales migrate up to 8,000 kilometres each year between polar feeding grounds and "
           "tropical breeding grounds, and males sing complex songs that change from season to season.")


@pytest.mark.parametrize("instruction, reason", [
    ("", "empty"),
    ("  ?! ", "empty"),
    ("Why " + "really " * 300 + "?", "too long"),
    ("Humpback whales migrate up to 8,000 kilometres each year", "copies the start of the output"),
    ("males sing complex songs that change from season to season.", "copied from the output"),
    ("Write the most likely question to which the text below would be a great answer.", "meta-instruction"),
    ("Summarize the text below in two sentences.", "meta-instruction"),
    ("Generate a question for this passage.", "meta-instruction"),
    ("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "a system prompt"),
    ("You are an assistant. Answer briefly.", "a system prompt"),
    ("### User:\nWhy do whales sing?", "template text"),
    ("Why do whales sing?<|im_end|>", "template text"),
    ("Answer in the style of an AI Assistant.", "template text"),
    ("Is there a user?", "about the conversation itself"),
    ("Are you an AI?", "about the conversation itself"),
    ("Who is the user?", "about the conversation itself"),
    ("What did I say earlier in this conversation?", "about the conversation itself"),
])
def test_degenerate_instructions_are_dropped_with_their_reason(instruction, reason):
    assert (degeneracy(instruction, SEGMENT, max_chars=1000) or "").startswith(reason)


@pytest.mark.parametrize("instruction", [
    "How far do humpback whales migrate, and why do males sing?",
    "Explain the migration of humpback whales.",
    "Humpback whales: where do they breed?",  # shares two words with the start, not a copy
    "Write a question-and-answer guide about whale songs for children.",
    "What is the text of the Declaration of Independence about?",
    "How do I add a user to a Linux group?",
    "You are planning a trip to Norway in winter: what should you pack?",
    "Is there a difference between a whale's song and its call?",
    "Write a system prompt for a customer-service chatbot.",
])
def test_good_instructions_are_kept(instruction):
    assert degeneracy(instruction, SEGMENT, max_chars=1000) is None


def test_split_counts_and_keeps_order():
    candidates = [{"id": str(i), "instruction": text, "output": SEGMENT}
                  for i, text in enumerate(["Explain whale migration.", "", "Why do whales sing?"])]
    kept, dropped = split_degenerate(candidates, max_chars=1000)
    assert [c["id"] for c in kept] == ["0", "2"] and dropped[0]["reason"] == "empty"


def test_an_instruction_cut_off_at_the_token_cap_is_dropped_and_counted():
    candidates = [{"id": "ended", "instruction": "Why do whales sing?", "output": SEGMENT, "finished": True,
                   "new_tokens": 6},
                  {"id": "cut", "instruction": "Why do whales sing so long and so", "output": SEGMENT,
                   "finished": False, "new_tokens": 16}]
    kept, dropped = split_degenerate(candidates, max_chars=1000)
    assert [c["id"] for c in kept] == ["ended"] and dropped[0]["reason"] == "hit the token cap (16 tokens)"
    kept, dropped = split_degenerate(candidates, max_chars=1000, drop_capped=False)  # the tiny preset's choice
    assert len(kept) == 2 and not dropped


def test_the_report_counts_the_instructions_cut_off_at_the_cap_and_says_what_became_of_them(monkeypatch):
    from humpback_nb.config import GenerateConfig
    from humpback_nb.method import augment

    segments = [{"id": str(i), "text": SEGMENT, "source": "s", "header": "h"} for i in range(4)]
    written = [{"text": "Why do whales sing?", "finished": True, "new_tokens": 6}] * 3 + [
        {"text": "Why do whales sing so long and so", "finished": False, "new_tokens": 16}]
    monkeypatch.setattr(augment, "write_instructions", lambda *args, **kwargs: written)
    for drop in (True, False):
        settings = GenerateConfig(instruction_max_new_tokens=16, drop_capped=drop)
        kept, dropped, report = augment.self_augment(None, segments, settings, 512)
        assert report["unfinished"] == 1 and report["capped_share"] == 0.25 and report["drop_capped"] is drop
        assert len(kept) == (3 if drop else 4) and report["generation"]["max_new_tokens"] == 16
