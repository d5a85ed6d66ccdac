"""The follow-ups' functions (method/variants.py) on fake models: no model is loaded, nothing leaves the machine."""

from __future__ import annotations

import json
import threading

import pytest

from humpback_nb.config import GenerateConfig
from humpback_nb.method.prompts import ALPAGASUS_SYSTEM, rewrite_messages
from humpback_nb.method.variants import (
    ask,
    changes,
    overlap,
    parse_alpagasus_score,
    rate_alpagasus,
    rewrite,
    similarity,
)


class FakeEndpoint:
    """An OpenAI-compatible endpoint as variants.ask sees one (judges.EndpointJudge): `.chat`, no `.generate`.
    It answers `reply(messages)` and records what it was asked; with `together`, that many first requests wait for
    each other, so that they pass only when they are in flight at once."""

    def __init__(self, reply, together: int = 0):
        self.reply, self.calls, self.lock = reply, [], threading.Lock()
        self.barrier = threading.Barrier(together, timeout=10) if together else None

    def chat(self, messages, max_tokens, temperature=0.0):
        with self.lock:
            self.calls.append({"messages": messages, "max_tokens": max_tokens, "temperature": temperature})
            waits = self.barrier is not None and len(self.calls) <= self.barrier.parties
        if waits:
            self.barrier.wait()  # BrokenBarrierError after 10 s if the requests came one at a time
        return self.reply(messages)


class FakeEngine:
    """An engine as variants.ask sees one: `.generate` (and no tokenizer: the prompts are not cut)."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, prompts, settings, max_new_tokens, partial=None, greedy=False, desc=""):
        self.calls.append({"prompts": prompts, "settings": settings, "max_new_tokens": max_new_tokens,
                           "partial": partial, "greedy": greedy, "desc": desc})
        return [{"id": p["id"], **self.reply(p)} for p in prompts]


def prompts_of(n: int) -> list[dict]:
    return [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(n)]


def question(messages) -> str:
    return messages[-1]["content"]


# -- AlpaGasus's score ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, score", [
    ("4.5", 4.5),
    ("4.5\n\nThe response is accurate, but it could say more.", 4.5),  # AlpaGasus's own example reply
    ("Score: 5", 5.0),
    ("score: 3\nIt misses the input.", 3.0),
    ("4.5/5", 4.5),
    ("5.", 5.0),
    ("**4**\nClear and correct.", 4.0),
    ("\n\n  3  \nbecause", 3.0),  # the first non-empty line
    ("0", 0.0),
    ("6", None),  # outside the 0-5 scale
    ("5.5", None),
    ("The response is accurate and complete.\nScore: 5", None),  # reasoning first: the first line is no score
    ("4 out of 5", None),
    ("four", None),
    ("", None),
    ("   \n ", None),
])
def test_parse_alpagasus_score(reply, score):
    assert parse_alpagasus_score(reply) == score


# -- what a rewrite changed -------------------------------------------------------------------------------------------
def test_overlap():
    source = "Basil likes full sun and water when the soil is dry."
    assert overlap(source, source) == 1.0
    assert overlap("Basil likes full sun.", source) == 1.0  # every 3-gram is in the source; case and punctuation aside
    assert overlap("Tomatoes need deep pots and warm nights.", source) == 0.0
    # "basil likes full" is in the source, "likes full shade" is not
    assert overlap("basil likes full shade", source) == pytest.approx(1 / 2)
    assert overlap("too short", source) is None  # fewer words than n: no 3-gram to count
    assert overlap("too short", source, n=2) == 0.0


def test_similarity():
    assert similarity("Basil likes the sun.", "basil likes the SUN") == 1.0  # words, not case or punctuation
    assert similarity("basil likes sun", "tomatoes need pots") == 0.0
    assert similarity("a b c d", "a b x y") == pytest.approx(0.5)  # difflib: 2 * 2 matches / 8 words
    assert similarity("", "") == 1.0


def test_changes():
    pairs = [{"output": "aaaa", "original": "aa bb cc dd"}, {"output": "x y z w", "original": "x y z w"},
             {"output": "no original"}]
    found = changes(pairs)
    assert found["pairs"] == 2  # a pair without its original is not counted
    assert found["original_chars"] == {"mean": 9.0, "std": pytest.approx(2 ** 0.5 * 2), "n": 2}
    assert found["rewrite_chars"]["mean"] == 5.5
    assert found["from_original"]["n"] == 1  # "aaaa" has no 3-gram: left out of the mean
    assert found["from_original"]["mean"] == 1.0 and found["from_original"]["std"] is None
    assert found["similarity"]["mean"] == pytest.approx(0.5)  # 0.0 and 1.0


def test_changes_of_nothing():
    found = changes([])
    assert found["pairs"] == 0
    assert found["rewrite_chars"] == {"mean": None, "std": None, "n": 0}


# -- asking a model -------------------------------------------------------------------------------------------------
def test_ask_an_endpoint_several_requests_at_once():
    endpoint = FakeEndpoint(lambda messages: f"answer to {question(messages)}", together=3)
    settings = GenerateConfig(temperature=0.7)
    replies = ask(endpoint, prompts_of(7), settings, max_new_tokens=64, greedy=False, workers=3)
    assert [r["id"] for r in replies] == [f"p{i}" for i in range(7)]  # the prompts' order, whatever finished first
    assert [r["text"] for r in replies] == [f"answer to question {i}" for i in range(7)]
    assert all(r["finished"] is None for r in replies)  # an endpoint does not say whether it was cut
    assert len(endpoint.calls) == 7
    assert {c["max_tokens"] for c in endpoint.calls} == {64}
    assert {c["temperature"] for c in endpoint.calls} == {0.7}


def test_ask_an_endpoint_greedy_is_temperature_zero():
    endpoint = FakeEndpoint(lambda messages: "ok")
    ask(endpoint, prompts_of(2), GenerateConfig(temperature=0.7), max_new_tokens=8, greedy=True)
    assert {c["temperature"] for c in endpoint.calls} == {0.0}


def test_ask_an_endpoint_resumes_from_its_partial_file(tmp_path):
    partial = tmp_path / "variant_pairs.jsonl.partial"
    earlier = [{"id": "p0", "text": "kept from before", "finished": None},
               {"id": "p2", "text": "also kept", "finished": None}]
    partial.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"id": "p3", "te')  # cut by a crash
    endpoint = FakeEndpoint(lambda messages: f"new {question(messages)}")
    replies = ask(endpoint, prompts_of(5), GenerateConfig(), max_new_tokens=8, greedy=True, partial=partial,
                  workers=3)
    assert sorted(question(c["messages"]) for c in endpoint.calls) == ["question 1", "question 3", "question 4"]
    assert [r["text"] for r in replies] == ["kept from before", "new question 1", "also kept", "new question 3",
                                           "new question 4"]
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == [f"p{i}" for i in range(5)]  # each once; the cut line is gone
    again = ask(FakeEndpoint(lambda messages: pytest.fail("asked again")), prompts_of(5), GenerateConfig(),
                max_new_tokens=8, greedy=True, partial=partial)
    assert again == replies


def test_ask_an_engine_hands_it_the_batch():
    engine = FakeEngine(lambda p: {"text": "generated", "finished": True})
    settings = GenerateConfig(temperature=0.9, top_p=0.8)
    replies = ask(engine, prompts_of(3), settings, max_new_tokens=16, greedy=False, partial=None, desc="here")
    assert [r["text"] for r in replies] == ["generated"] * 3
    [call] = engine.calls
    assert call["settings"] is settings and call["max_new_tokens"] == 16 and not call["greedy"]
    assert call["desc"] == "here"


# -- rewriting ----------------------------------------------------------------------------------------------------
PAIRS = [{"id": f"c{i}", "instruction": f"instruction {i}", "output": f"web text {i} about basil and sun",
          "split": "train"} for i in range(4)]


@pytest.mark.parametrize("method", ["bft", "kun"])
def test_rewrite_drops_an_empty_rewrite_and_counts_it(method):
    def reply(prompt):
        number = prompt["id"][1:]
        if number == "1":
            return {"text": "  \n", "finished": True}  # nothing written
        return {"text": f"  rewritten {number}\n", "finished": number != "3"}  # c3 ran out of tokens

    engine = FakeEngine(reply)
    settings = GenerateConfig(temperature=1.0, top_p=0.9)
    kept, report = rewrite(engine, PAIRS, method, settings, max_new_tokens=32, context_length=2048)
    assert [p["id"] for p in kept] == ["c0", "c2", "c3"]
    assert [p["output"] for p in kept] == ["rewritten 0", "rewritten 2", "rewritten 3"]  # stripped
    assert [p["original"] for p in kept] == ["web text 0 about basil and sun", "web text 2 about basil and sun",
                                            "web text 3 about basil and sun"]
    assert [p["finished"] for p in kept] == [True, True, False]
    assert all(p["instruction"] == f"instruction {p['id'][1:]}" and p["split"] == "train" for p in kept)
    assert report == {"method": method, "asked": 4, "kept": 3, "empty": 1, "cut": 1, "max_new_tokens": 32}
    [call] = engine.calls
    assert call["settings"] is settings and not call["greedy"]  # sampled with the run's T and p
    assert [p["messages"] for p in call["prompts"]] == [
        rewrite_messages(method, p["instruction"], p["output"]) for p in PAIRS]  # the text whole: no tokenizer
    assert PAIRS[0]["output"] == "web text 0 about basil and sun"  # the pairs given are not changed


def test_rewrite_at_an_endpoint():
    endpoint = FakeEndpoint(lambda messages: "" if "instruction 2" in question(messages) else "an answer")
    kept, report = rewrite(endpoint, PAIRS, "bft", GenerateConfig(), max_new_tokens=32, context_length=2048,
                           workers=2)
    assert [p["id"] for p in kept] == ["c0", "c1", "c3"]
    assert report["empty"] == 1 and report["cut"] == 0  # an endpoint's "finished" is None: not counted as cut
    assert all(p["finished"] is None for p in kept)


# -- AlpaGasus's rating -----------------------------------------------------------------------------------------------
def test_rate_alpagasus_at_an_endpoint():
    replies = {"instruction 0": "5\nAccurate.", "instruction 1": "3.5\n\nMisses a step.",
               "instruction 2": "The answer is fine.\nScore: 4", "instruction 3": "4.5/5"}

    def reply(messages):
        return next(text for key, text in replies.items() if f"###Instruction:\n{key}\n" in question(messages))

    endpoint = FakeEndpoint(reply)
    pairs = [dict(p, input="in a flat" if p["id"] == "c1" else "") for p in PAIRS]
    scores = rate_alpagasus(endpoint, pairs, max_new_tokens=32, context_length=2048, workers=2)
    assert [s["id"] for s in scores] == ["c0", "c1", "c2", "c3"]
    assert [s["score"] for s in scores] == [5.0, 3.5, None, 4.5]
    assert scores[1]["review"] == "3.5\n\nMisses a step."
    assert {c["temperature"] for c in endpoint.calls} == {0.0}  # greedy, as AlpaGasus's temperature 0.0
    assert {c["max_tokens"] for c in endpoint.calls} == {32}
    sent = {question(c["messages"]).split("\n")[1]: c["messages"] for c in endpoint.calls}
    assert all(m[0] == {"role": "system", "content": ALPAGASUS_SYSTEM} for m in sent.values())
    assert "### Input:\nin a flat\n\n### Response:\nweb text 1" in question(sent["instruction 1"])
    assert "### Input:\n\n\n### Response:\nweb text 0" in question(sent["instruction 0"])


def test_rate_alpagasus_with_an_engine_is_greedy():
    engine = FakeEngine(lambda p: {"text": "4\nGood.", "finished": True})
    scores = rate_alpagasus(engine, PAIRS[:2], max_new_tokens=16, context_length=2048)
    assert [s["score"] for s in scores] == [4.0, 4.0]
    assert engine.calls[0]["greedy"] and engine.calls[0]["max_new_tokens"] == 16
