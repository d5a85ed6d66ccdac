"""AlpacaEval 1.0 as the paper ran it: alpaca_eval_gpt4's prompt, built as AlpacaEval builds it; its ranking
parser, read without evaluating the reply; both orders on AlpacaEval's preference scale; the win rate and
standard error of AlpacaEval's own metrics code; references matched by instruction; a scripted GPT-4."""

import json
import logging
import math
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import chat_reply, send_json

from humpback_nb.config import ConfigError, EvaluateConfig
from humpback_nb.infra.sources import fetch
from humpback_nb.method import alpaca_eval
from humpback_nb.method.alpaca_eval import (
    annotate_pair,
    endpoint_ask,
    evaluate,
    load_annotator,
    load_reference,
    match_reference,
    parse_ranking,
    protocol,
    render_prompt,
    switched,
    to_messages,
    win_rate,
)
from humpback_nb.method.judges import EndpointJudge

PAIRS = [  # (instruction, output_1, output_2): placeholders, quotes and braces inside the texts
    ("Name a sea mammal.", "A whale.", "A trout."),
    ('Explain {output_1} and """quotes""".', "It is {output_2}, {instruction}.", "Braces {} and\nnew lines."),
    ("Übersetze: 'bonjour' → ?", "Hallo", "<|im_end|> is a token"),
]


def ranking(first: str) -> str:
    """A reply in the annotator's output format that ranks `first` ("model_1" or "model_2") first."""
    second = "model_2" if first == "model_1" else "model_1"
    return f"[\n    {{'model': '{first}', 'rank': 1}},\n    {{'model': '{second}', 'rank': 2}}\n]"


# -- the annotator's prompt, settings and messages -------------------------------------------------------------
def test_the_annotator_is_alpaca_eval_1_as_pinned():
    annotator = load_annotator()
    assert (annotator.name, annotator.model, annotator.max_tokens, annotator.temperature, annotator.parser) == (
        "alpaca_eval_gpt4", "gpt-4", 100, 0.0, "ranking_parser")
    messages = to_messages(render_prompt(annotator.template, *PAIRS[0]))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "You are a helpful assistant, that ranks models by the quality of their answers."
    assert '"instruction": """Name a sea mammal.""",' in messages[1]["content"]
    assert messages[1]["content"].endswith("Please provide the ranking that the majority of humans would give.")


def test_a_placeholder_inside_a_value_is_filled_as_alpaca_eval_fills_it():
    prompt = render_prompt("I: {instruction} A: {output_1} B: {output_2}", "say {output_2}", "one", "two")
    assert prompt == "I: say two A: one B: {output_2}"  # first occurrences, one after the other


@pytest.mark.parametrize("pair", PAIRS)
def test_the_prompt_is_the_one_alpaca_eval_builds_for_the_pair(pair):
    pytest.importorskip("alpaca_eval.annotators")
    import pandas as pd
    from alpaca_eval import constants, utils
    from alpaca_eval.annotators.pairwise_evaluator import SinglePairwiseAnnotator

    template_file = fetch("alpaca_eval_gpt4_prompt")
    installed = constants.EVALUATORS_CONFIG_DIR / "alpaca_eval_gpt4" / "alpaca_eval.txt"
    assert installed.read_text(encoding="utf-8") == template_file.read_text(encoding="utf-8")
    theirs = SinglePairwiseAnnotator(prompt_template=str(template_file), fn_completion_parser="ranking_parser",
                                     fn_completions=lambda prompts, **_: {"completions": []},
                                     is_randomize_output_order=False, is_shuffle=False)
    frame = pd.DataFrame([dict(zip(("instruction", "output_1", "output_2"), pair, strict=True))])
    [their_prompt], _ = theirs._make_prompts(frame)
    ours = render_prompt(load_annotator().template, *pair)
    assert ours == their_prompt
    assert to_messages(ours) == utils.prompt_to_chatml(their_prompt)


# -- the parser -------------------------------------------------------------------------------------------------
ACCEPTED = [
    (ranking("model_1"), 1),
    (ranking("model_2"), 2),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", 1),
    ('[{"model": "model_1", "rank": 2}, {"model": "model_2", "rank": 1}]', 2),  # JSON is a Python literal too
    ("{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}", 1),  # a tuple without brackets
    ("({'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2.0},)", 2),
    ("# my ranking\n[{'model': 'model_1', 'rank': 1},  # best\n {'model': 'model_2', 'rank': 2},]\n", 1),
    ("  [{'model': 'model_1', 'rank': 1, 'why': 'more \\'precise\\'\\n'}]", 1),
    ("[{'model': 'model_1', 'rank': True}]", 1),  # True == 1 in Python, so AlpacaEval takes it
    ("[{'model': 'mod' 'el\\x5f1', 'rank': +2}]", 2),
    ("[{'model': 'model_1', 'rank': 1, 'rank': 2}]", 2),  # the last of a repeated key, as in a dict literal
]
REJECTED = [
    "",
    "Model 1 is better.",
    "```python\n[{'model': 'model_1', 'rank': 1}]\n```",  # a fenced reply is not a literal
    "[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]",  # a rank other than 1 or 2
    "[{'model': 'model_1', 'rank': '1'}]",  # a string is not a rank
    "[{'model': 'model_2', 'rank': 1}]",  # no entry for model_1
    "[{'model': 'model_1'}]",  # no rank
    "{'model': 'model_1', 'rank': 1}",  # valid Python, the wrong shape: a dict alone is iterated by its keys
    "[1, 2]",  # valid Python, the wrong shape
    "[{'model': 'model_1', 'rank': 1}, 'model_2']",  # every item must be a dict with a model
    "[{'model': 'model_1', 'rank': 1}] [{'model': 'model_2', 'rank': 1}]",
    "[{'model': 'model_1', 'rank': 1}]\n  ",  # an indented last line: Python refuses it
    "[{'model': 'model_1', 'rank': 1}]\\\n",  # a line continuation into nothing
    "[{'model': 'model_1', 'rank': 1, ['a']: 2}]",  # an unhashable key
    "[{'model': 'model_1', 'rank': 1}\x00]",
    "[" * 150 + "]" * 150,
]
STRICTER = [  # literals AlpacaEval reads and the kit does not: left unparsed, never another preference
    "[{'model': 'model_1', 'rank': 0x1}]",
    "[{'model': b'x'}, {'model': 'model_1', 'rank': 1}]",
    "[{'model': '''model_1''', 'rank': 2}]",
]


@pytest.mark.parametrize(("reply", "preference"), ACCEPTED)
def test_a_ranking_in_the_annotators_format_is_read(reply, preference):
    assert parse_ranking(reply) == preference


@pytest.mark.parametrize("reply", REJECTED + STRICTER)
def test_anything_else_is_left_unparsed(reply):
    assert parse_ranking(reply) is None


def test_a_reply_that_would_run_code_is_rejected_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    payloads = [f"__import__('pathlib').Path({str(marker)!r}).touch()",
                f"[{{'model': 'model_1', 'rank': __import__('pathlib').Path({str(marker)!r}).touch() or 1}}]",
                f"[{{'model': 'model_1', 'rank': (lambda: open({str(marker)!r}, 'w'))() and 1}}]"]
    assert [parse_ranking(p) for p in payloads] == [None, None, None]
    assert not marker.exists()


def test_the_parser_agrees_with_alpaca_evals_wherever_it_reads_a_reply():
    pytest.importorskip("alpaca_eval.completion_parsers")
    from alpaca_eval.completion_parsers import ranking_parser

    def theirs(reply: str):
        try:
            value = ranking_parser(reply)[0]
        except (ValueError, SyntaxError):
            return None
        return None if isinstance(value, float) and math.isnan(value) else int(value)

    logging.disable(logging.ERROR)  # their parser logs every reply it cannot read
    try:
        assert [theirs(r) for r, _ in ACCEPTED] == [p for _, p in ACCEPTED]
        assert [theirs(r) for r in REJECTED] == [None] * len(REJECTED)
        assert all(theirs(r) is not None for r in STRICTER)  # the known, documented differences
    finally:
        logging.disable(logging.NOTSET)


# -- both orders and the win rate ---------------------------------------------------------------------------------
def test_both_orders_map_onto_alpaca_evals_preference_scale():
    # evaluate.both_orders: the kit's addition to AlpacaEval's protocol
    annotator = load_annotator()

    def judge_preferring(text: str, first_shown: bool = False):
        def ask(messages):
            user = messages[1]["content"]
            answer_1 = user.split('"model_1",\n        "answer": """')[1].split('"""')[0]
            return ranking("model_1" if first_shown or text in answer_1 else "model_2")
        return ask

    both = annotate_pair(judge_preferring("whale"), annotator, "q", "a trout", "a whale", True)
    assert (both["reference_first"], both["output_first"], both["preference"]) == (2, 2, 2.0)
    lost = annotate_pair(judge_preferring("trout"), annotator, "q", "a trout", "a whale", True)
    assert lost["preference"] == 1.0
    biased = annotate_pair(judge_preferring("x", first_shown=True), annotator, "q", "a trout", "a whale", True)
    assert (biased["reference_first"], biased["output_first"], biased["preference"]) == (1, 2, 1.5)
    same = annotate_pair(lambda m: pytest.fail("identical outputs are not sent"), annotator, "q", "a", "a")
    assert same["preference"] == 1.5
    unread = annotate_pair(lambda m: "Model 2.", annotator, "q", "a trout", "a whale", True)
    assert unread["preference"] is None and unread["unparsed"] == {"reference_first": "Model 2.",
                                                                   "output_first": "Model 2."}


def test_one_order_per_instruction_drawn_as_alpaca_evals_own_annotator_draws_it():
    # AlpacaEval 1.0's protocol: each pair shown once, the order drawn from the instruction by alpaca_eval 0.6.6's
    # RandomSwitchTwoColumnsProcessor, as its PairwiseAnnotator for alpaca_eval_gpt4 builds it (seed 0)
    pytest.importorskip("alpaca_eval.annotators")
    import pandas as pd
    from alpaca_eval.annotators import PairwiseAnnotator

    from humpback_nb.method.evaluate import alpaca_eval_prompts

    instructions = [p["instruction"] for p in alpaca_eval_prompts(805, 0)]
    assert len(set(instructions)) == 805
    [single] = PairwiseAnnotator(annotators_config="alpaca_eval_gpt4").annotators.values()
    [processor] = [p for p in single.processors if type(p).__name__ == "RandomSwitchTwoColumnsProcessor"]
    frame = pd.DataFrame({"instruction": instructions, "output_1": "reference", "output_2": "model"})
    theirs = processor.preprocess(frame)["is_switched_outputs"].tolist()
    assert [switched(i) for i in instructions] == theirs  # 805 of 805
    assert 300 < sum(theirs) < 505  # both orders drawn

    annotator, asked = load_annotator(), []

    def first_shown(messages):  # a judge that always prefers what it is shown first
        asked.append(messages)
        return ranking("model_1")

    for instruction in instructions[:6]:
        record = annotate_pair(first_shown, annotator, instruction, "a trout", "a whale")
        assert record["preference"] == (2 if switched(instruction) else 1)  # the model wins where it came first
        assert list(record["replies"]) == ["output_first" if switched(instruction) else "reference_first"]
    assert len(asked) == 6  # once each


PREFERENCES = [2.0, 2.0, 1.5, 1.0, 2.0, 1.5, 1.0, 2.0, 2.0, 1.0, 1.5]


def test_win_rate_and_standard_error_by_hand():
    result = win_rate([1.0, 2.0, 1.5, 2.0])
    assert result["win_rate"] == pytest.approx(62.5)
    assert result["standard_error"] == pytest.approx(100 * math.sqrt(0.6875 / 3) / 2)  # squares around 0.625
    assert (result["n_wins"], result["n_wins_base"], result["n_draws"], result["n_total"]) == (2, 1, 1, 4)
    assert win_rate([2.0])["standard_error"] is None and win_rate([])["win_rate"] is None


def test_win_rate_and_standard_error_equal_alpaca_evals_own_metrics():
    pytest.importorskip("alpaca_eval.metrics")
    from alpaca_eval.metrics import pairwise_to_winrate

    ours, theirs = win_rate(PREFERENCES), pairwise_to_winrate(PREFERENCES)
    assert round(ours["win_rate"], 10) == round(float(theirs["win_rate"]), 10)
    assert round(ours["standard_error"], 10) == round(float(theirs["standard_error"]), 10)
    assert [ours[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_total")] == [
        int(theirs[k]) for k in ("n_wins", "n_wins_base", "n_draws", "n_total")]


# -- reference answers --------------------------------------------------------------------------------------------
def reference_file(tmp_path, rows):
    path = tmp_path / "reference.json"
    path.write_text(json.dumps([{"instruction": i, "output": o, "generator": "text_davinci_003",
                                 "dataset": "helpful_base"} for i, o in rows]))
    return path


def answers(rows, generator="m2"):
    return [{"id": f"alpaca_eval-{k}", "instruction": i, "output": o, "generator": generator,
             "dataset": "helpful_base"} for k, (i, o) in enumerate(rows)]


def test_references_are_matched_by_instruction_and_the_unmatched_reported(tmp_path):
    reference = load_reference(reference_file(tmp_path, [("q1", "r1"), ("q2", "r2"), ("q1", "later r1")]))
    ours = answers([("q2", "a2"), ("q1", "a1"), ("q3 (not in the reference)", "a3")])
    matched, unmatched = match_reference(ours, reference)
    assert [(a["instruction"], ref) for a, ref in matched] == [("q2", "r2"), ("q1", "r1")]
    assert [a["id"] for a in unmatched] == ["alpaca_eval-2"]
    result = evaluate(lambda m: ranking("model_2"), load_annotator(), ours, reference)
    assert result["unmatched"] == ["alpaca_eval-2"] and result["pairs"] == 2 and result["n_total"] == 2
    assert result["reference"] == "text_davinci_003" and result["generator"] == "m2"


def test_a_reference_file_in_another_format_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"instruction": "q", "output": "r"}))
    with pytest.raises(ValueError, match="not AlpacaEval model outputs"):
        load_reference(path)


def test_the_hub_reference_is_text_davinci_003s_file_of_the_alpaca_eval_dataset(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    local = reference_file(tmp_path, [("q1", "r1")])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *args, **kwargs: asked.append((args, kwargs)) or str(local))
    assert load_reference("tatsu-lab/alpaca_eval")[0]["output"] == "r1"
    assert asked == [(("tatsu-lab/alpaca_eval", "alpaca_eval.json"), {"repo_type": "dataset"})]


def test_the_protocol_label_and_settings_that_mix_protocols():
    assert protocol(EvaluateConfig()) == "local judge vs base model: not the paper's protocol"
    paper = EvaluateConfig(annotator="alpaca_eval_gpt4", judge="gpt-4", judge_url="http://127.0.0.1:1/v1",
                           reference="tatsu-lab/alpaca_eval")
    assert protocol(paper) == "AlpacaEval 1.0 (alpaca_eval_gpt4 annotator, gpt-4 judge, text-davinci-003 reference)"
    with pytest.raises(ConfigError, match="needs evaluate.judge_url"):
        protocol(EvaluateConfig(annotator="alpaca_eval_gpt4", reference="tatsu-lab/alpaca_eval"))
    with pytest.raises(ConfigError, match="needs evaluate.annotator"):
        protocol(EvaluateConfig(reference="tatsu-lab/alpaca_eval"))


# -- a scripted GPT-4 behind an OpenAI-compatible endpoint --------------------------------------------------------
class Gpt4:
    """Prefers the answer that mentions a whale, in the annotator's format; replies in prose for one instruction."""

    def __init__(self):
        self.requests, self.lock = [], threading.Lock()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
        user = body["messages"][-1]["content"]
        if "Response A:" in user:  # the kit's own judging prompt (MT-bench)
            self.reply(handler, "A" if "whale" in user.split("Response A:")[1].split("Response B:")[0] else "B")
            return
        answer_1 = re.search(r'"model_1",\s*"answer": """(.*?)"""', user, re.S).group(1)
        answer_2 = re.search(r'"model_2",\s*"answer": """(.*?)"""', user, re.S).group(1)
        if "prose" in user:
            content = "Model 1 is better."
        elif ("whale" in answer_1) == ("whale" in answer_2):
            content = ranking("model_1")  # no whale either way: the first shown wins
        else:
            content = ranking("model_1" if "whale" in answer_1 else "model_2")
        self.reply(handler, content)

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, content: str) -> None:
        send_json(handler, chat_reply(content))


@pytest.fixture
def gpt4(loopback):
    served = Gpt4()
    served.url = loopback(served.respond)
    return served


def test_alpaca_eval_1_against_a_scripted_gpt4_in_both_orders_resumes_and_matches_alpaca_eval(gpt4, tmp_path):
    annotator = load_annotator()
    reference = load_reference(reference_file(tmp_path, [("q1", "a fish"), ("q2", "a whale"), ("q3", "a bird"),
                                                         ("q4", "a cat"), ("q5 in prose", "a dog")]))
    ours = answers([("q1", "a whale"), ("q2", "a fish"), ("q3", "a bird"), ("q4", "a dog"),
                    ("q5 in prose", "a whale"), ("q6", "a whale")])
    ask = endpoint_ask(EndpointJudge(gpt4.url, "gpt-4", sleep=lambda s: None), annotator)
    partial = tmp_path / "eval.judge_m2_vs_reference.abc.partial"
    result = evaluate(ask, annotator, ours, reference, partial=partial, both_orders=True)

    # q1 won in both orders (2), q2 lost in both (1), q3 identical outputs (1.5, never sent), q4 the judge picks
    # whatever is shown first (1.5), q5 unparsed, q6 not in the reference
    assert [a["preference"] for a in result["annotations"]] == [2.0, 1.0, 1.5, 1.5, None]
    assert result["unparsed"] == 1 and result["unmatched"] == ["alpaca_eval-5"]
    assert result["annotations"][4]["unparsed"] == {"reference_first": "Model 1 is better.",
                                                    "output_first": "Model 1 is better."}
    assert result["win_rate"] == pytest.approx(50.0) and result["n_total"] == 4
    assert len(gpt4.requests) == 8  # 4 pairs sent, in both orders
    sent = gpt4.requests[0]
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("gpt-4", 100, 0.0)
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["content"] == to_messages(render_prompt(annotator.template, "q1", "a fish",
                                                                       "a whale"))[1]["content"]

    again = evaluate(ask, annotator, ours, reference, partial=partial, both_orders=True)  # resumed: nothing asked
    assert len(gpt4.requests) == 8 and again["win_rate"] == result["win_rate"]

    pytest.importorskip("alpaca_eval.metrics")
    from alpaca_eval.metrics import pairwise_to_winrate

    theirs = pairwise_to_winrate([a["preference"] for a in result["annotations"] if a["preference"] is not None])
    assert round(result["win_rate"], 10) == round(float(theirs["win_rate"]), 10)
    assert round(result["standard_error"], 10) == round(float(theirs["standard_error"]), 10)


def test_alpaca_eval_1_against_a_scripted_gpt4_in_its_own_order_matches_alpaca_eval(gpt4, tmp_path):
    # the default: one judgement a pair, in AlpacaEval's order; q4's judge picks whatever it is shown first
    annotator = load_annotator()
    reference = load_reference(reference_file(tmp_path, [("q1", "a fish"), ("q2", "a whale"), ("q3", "a bird"),
                                                         ("q4", "a cat"), ("q5 in prose", "a dog")]))
    ours = answers([("q1", "a whale"), ("q2", "a fish"), ("q3", "a bird"), ("q4", "a dog"),
                    ("q5 in prose", "a whale")])
    ask = endpoint_ask(EndpointJudge(gpt4.url, "gpt-4", sleep=lambda s: None), annotator)
    result = evaluate(ask, annotator, ours, reference)
    q4 = 2.0 if switched("q4") else 1.0
    assert [a["preference"] for a in result["annotations"]] == [2.0, 1.0, 1.5, q4, None]
    assert len(gpt4.requests) == 4  # q1, q2, q4, q5 once each; q3's identical outputs are never sent
    pytest.importorskip("alpaca_eval.metrics")
    from alpaca_eval.metrics import pairwise_to_winrate

    theirs = pairwise_to_winrate([2.0, 1.0, 1.5, q4])
    assert round(result["win_rate"], 10) == round(float(theirs["win_rate"]), 10)
    assert round(result["standard_error"], 10) == round(float(theirs["standard_error"]), 10)
    assert "both orders" not in protocol(EvaluateConfig(annotator="alpaca_eval_gpt4", judge="gpt-4",
                                                        judge_url=gpt4.url, reference="tatsu-lab/alpaca_eval"))
    assert "an addition" in protocol(EvaluateConfig(annotator="alpaca_eval_gpt4", judge="gpt-4", judge_url=gpt4.url,
                                                    reference="tatsu-lab/alpaca_eval", both_orders=True))


def run_eval_stage(tmp_path, monkeypatch, settings: EvaluateConfig):
    """The eval stage on canned answers (m2 mentions a whale, the others do not); the run's files."""
    from humpback_nb import pipeline, stages
    from humpback_nb.config import HumpbackConfig
    from humpback_nb.run import RunFiles, StageConfig, StageRun

    class Unused:  # no model is read: the answers are canned
        def close(self):
            pass

    def canned(run, engine, prompts, name, tags, partial):
        return [{"instruction": p["instruction"], "output": "a whale" if name == "m2" else f"{name}: a fish",
                 "generator": name, "dataset": p["dataset"], "id": p["id"]} for p in prompts]

    monkeypatch.setattr(stages, "open_engine", lambda run, name, losses=False: Unused())
    monkeypatch.setattr(stages, "answer", canned)
    config = HumpbackConfig()
    config.evaluate = settings
    stage = next(s for s in pipeline.STAGES if s.name == "eval")
    files = RunFiles(tmp_path / "run")
    stages.evaluate(StageRun(files, StageConfig(config, stage), stage, "h", {}), iterations=2)
    return files


def test_the_eval_stage_reports_alpaca_eval_1_with_its_protocol_and_mt_bench_on_its_own(gpt4, tmp_path,
                                                                                         monkeypatch):
    from humpback_nb.method.evaluate import alpaca_eval_prompts

    sampled = alpaca_eval_prompts(3, 42)
    reference = reference_file(tmp_path, [(p["instruction"], "a trout") for p in sampled[:2]])
    files = run_eval_stage(tmp_path, monkeypatch, EvaluateConfig(
        alpaca_eval_prompts=3, mt_bench_prompts=2, annotator="alpaca_eval_gpt4", judge="gpt-4", judge_url=gpt4.url,
        reference=str(reference)))

    report = json.loads(files.path("win_rates").read_text())
    assert report["protocol"] == "AlpacaEval 1.0 (alpaca_eval_gpt4 annotator, gpt-4 judge, reference.json reference)"
    assert report["m2_vs_reference"]["win_rate"] == pytest.approx(100.0)  # a whale wins in either order
    # no whale either way: the judge picks what it is shown first, m0 where AlpacaEval shows it first
    first = [100.0 if switched(p["instruction"]) else 0.0 for p in sampled[:2]]
    assert report["m0_vs_reference"]["win_rate"] == pytest.approx(sum(first) / 2)
    assert report["m2_vs_reference"]["unmatched"] == [sampled[2]["id"]] and report["m2_vs_reference"]["pairs"] == 2
    mt_bench = {k: v for k, v in report.items() if k.startswith("mt_bench_")}
    assert set(mt_bench) == {"mt_bench_m2_vs_m0", "mt_bench_m1_vs_m0", "mt_bench_m0_vs_base", "mt_bench_m2_vs_base"}
    assert mt_bench["mt_bench_m2_vs_m0"]["overall"]["n"] == 2 and "m2_vs_m0" not in report
    assert all(d.startswith("mt_bench/") for d in mt_bench["mt_bench_m2_vs_m0"]["per_dataset"])
    assert [a["preference"] for a in files.judgments("m2_vs_reference")] == [2.0, 2.0]


def test_the_eval_stage_labels_the_kits_judge_as_not_the_papers_protocol(gpt4, tmp_path, monkeypatch):
    files = run_eval_stage(tmp_path, monkeypatch, EvaluateConfig(alpaca_eval_prompts=2, mt_bench_prompts=1,
                                                                 judge="gpt-4", judge_url=gpt4.url))
    report = json.loads(files.path("win_rates").read_text())
    assert report["protocol"] == "gpt-4 judge with the kit's prompt vs base model: not the paper's protocol"
    assert report["m2_vs_m0"]["overall"]["win_rate"] == pytest.approx(100.0)
    assert report["m2_vs_m0"]["overall"]["pairs"] == 3  # AlpacaEval and MT-bench prompts together, as before
    assert {"m2_vs_m0", "m1_vs_m0", "m0_vs_base", "m2_vs_base"} <= set(report)


def test_the_module_never_evaluates_a_reply():
    text = Path(alpaca_eval.__file__).read_text(encoding="utf-8")
    assert "literal_eval(" not in text and "eval(" not in text.replace("literal_eval", "")
