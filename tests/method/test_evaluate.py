import json
import math
import socket

import pytest
from conftest import chat_reply, send_json

from humpback_nb.method.evaluate import alpaca_eval_prompts, mt_bench_prompts, write_model_outputs
from humpback_nb.method.judges import EndpointJudge, JudgeError, UnparsedReply, judge_both_orders
from humpback_nb.method.winrates import compare, fit_alpha, position_bias, precision_recall, win_rate


def test_win_rate_counts_ties_as_half_and_gives_a_standard_error():
    result = win_rate([1, 0.75, 0.5, 0])
    assert result["win_rate"] == 56.25 and (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    expected_se = math.sqrt(sum((o - 0.5625) ** 2 for o in [1, 0.75, 0.5, 0]) / 3) / 2
    assert result["se"] == pytest.approx(100 * expected_se, abs=0.01)
    assert win_rate([1, 1])["se"] == 0 and win_rate([])["win_rate"] is None and win_rate([1])["se"] is None


@pytest.mark.parametrize("x_as_a, y_as_a, outcome", [
    (1.0, 0.0, 1.0),   # a letter judge prefers x in both orders: a win
    (0.0, 1.0, 0.0),   # y in both orders: a loss
    (1.0, 1.0, 0.5),   # the judge always picks A: position bias, a tie
    (0.0, 0.0, 0.5),   # always B: a tie
    (0.5, 0.0, 0.75),  # even odds in one order, x preferred in the other
    (0.9, 0.2, 0.85),  # a judge with probabilities: the preference averaged over both orders
    (0.9, 0.9, 0.5),   # strong position bias cancels out
])
def test_each_pair_is_judged_in_both_orders(x_as_a, y_as_a, outcome):
    def judge(instruction, a, b):
        return x_as_a if a == "x" else y_as_a

    result = judge_both_orders(judge, "q", "x", "y")
    assert result["outcome"] == pytest.approx(outcome)
    assert result["x_as_a"] == x_as_a and result["x_as_b"] == pytest.approx(1 - y_as_a)


def test_compare_reports_per_dataset():
    answers_x = [{"id": str(i), "instruction": "q", "output": "long answer" if i < 3 else "x", "generator": "m2",
                  "dataset": "vicuna" if i < 2 else "koala"} for i in range(4)]
    answers_y = [dict(a, output="short", generator="m0") for a in answers_x]

    def prefers_longer(instruction, a, b):
        return 1.0 if len(a) > len(b) else 0.0

    result = compare(prefers_longer, answers_x, answers_y)
    assert (result["x"], result["y"]) == ("m2", "m0")
    assert result["per_dataset"]["vicuna"]["win_rate"] == 100.0
    assert result["per_dataset"]["koala"]["win_rate"] == 50.0  # one win, one loss
    assert result["overall"]["win_rate"] == 75.0 and len(result["judgments"]) == 4


def test_alpha_fit_recovers_known_points():
    ns = [100, 800, 1600, 3200, 6400]
    alpha, c = fit_alpha(ns, [6.95 * math.log(n) + 10.0 for n in ns])
    assert alpha == pytest.approx(6.95) and c == pytest.approx(10.0)
    with pytest.raises(ValueError):
        fit_alpha([100], [50.0])


def test_precision_recall():
    assert precision_recall({"a", "b", "c", "d"}, {"a", "e"}) == {"precision": 0.25, "recall": 0.5,
                                                                  "selected": 4, "positives": 2}


def test_evaluation_prompts_come_from_the_pinned_sources():
    prompts = alpaca_eval_prompts(805)
    assert len(prompts) == 805 and len({p["id"] for p in prompts}) == 805
    assert {p["dataset"] for p in prompts} == {"vicuna", "koala", "oasst", "selfinstruct", "helpful_base"}
    assert alpaca_eval_prompts(10, seed=1) == alpaca_eval_prompts(10, seed=1) != alpaca_eval_prompts(10, seed=2)
    questions = mt_bench_prompts(5)
    assert len(questions) == 5 and all(q["dataset"].startswith("mt_bench/") for q in questions)


def test_model_outputs_are_alpaca_eval_format(tmp_path):
    answers = [{"id": "alpaca_eval-3", "instruction": "Say hi", "output": "Hi!", "generator": "humpback-m2",
                "dataset": "vicuna"}]
    data = json.loads(write_model_outputs(tmp_path / "m2.json", answers).read_text())
    assert data == [{"instruction": "Say hi", "output": "Hi!", "generator": "humpback-m2", "dataset": "vicuna"}]


def whale_judge(seen: list):
    """An OpenAI-compatible chat endpoint that prefers the response containing the word 'whale'."""

    def respond(handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        seen.append((handler.path, handler.headers.get("Authorization"), body["model"]))
        a = body["messages"][0]["content"].split("Response A:")[1].split("Response B:")[0]
        send_json(handler, chat_reply("Neither." if "tie" in a else ("A" if "whale" in a else "B")))

    return respond


def test_endpoint_judge_against_a_loopback_server(monkeypatch, loopback):
    seen = []
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = EndpointJudge(loopback(whale_judge(seen)), "gpt-4-judge", api_key_env="JUDGE_KEY")
    assert judge.prefer_a("q", "a whale song", "a bird song") == 1.0
    assert judge.prefer_a("q", "a bird song", "a whale song") == 0.0
    with pytest.raises(UnparsedReply):  # "Neither." is no preference, not a tie
        judge.prefer_a("q", "a tie", "anything")
    assert judge_both_orders(judge.prefer_a, "q", "whales sing", "birds sing")["outcome"] == 1.0
    assert seen[0] == ("/v1/chat/completions", "Bearer secret", "gpt-4-judge")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    waits = []
    with pytest.raises(JudgeError, match="endpoint .* failed 2 tries"):
        EndpointJudge(f"http://127.0.0.1:{closed}/v1", "m", timeout=2, max_tries=2,
                      sleep=waits.append).prefer_a("q", "a", "b")
    assert len(waits) == 1  # a refused connection is tried again


def test_position_bias_is_the_mean_preference_for_the_answer_shown_first():
    assert position_bias([{"x_as_a": 0.9, "x_as_b": 0.1}, {"x_as_a": 0.7, "x_as_b": 0.3}]) == pytest.approx(0.8)
    assert position_bias([{"x_as_a": 0.8, "x_as_b": 0.8}]) == pytest.approx(0.5) and position_bias([]) is None
