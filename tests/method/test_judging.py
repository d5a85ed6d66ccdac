"""Judging that survives: endpoint errors tried again within bounds, judgments kept as they come and resumed
after a crash, and replies that name no letter kept as text and left out of the win rates."""

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import chat_reply, send_json

from humpback_nb.infra.batches import read_partial
from humpback_nb.method.judges import EndpointJudge, JudgeError, parse_choice, retry_after
from humpback_nb.method.winrates import compare, position_bias

STALL = "stall"  # a step of the script: answer nothing for longer than the client waits
JUDGE = "judge"  # a step of the script: answer as the default judge does


class Endpoint:
    """A scripted OpenAI-compatible chat endpoint on 127.0.0.1. Each request takes the next step of `script`:
    (status, content or error body, headers), STALL or JUDGE; once the script is done, it judges: it prefers
    the response that mentions a whale."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
            step = self.script.pop(0) if self.script else JUDGE
        if step == STALL:
            time.sleep(1.0)
            return
        if step == JUDGE:
            prompt = body["messages"][0]["content"]
            shown_first = prompt.split("Response A:")[1].split("Response B:")[0]
            step = (200, "A" if "whale" in shown_first else "B", {})
        status, content, headers = step
        send_json(handler, chat_reply(content) if status == 200 else content, status, headers)


@pytest.fixture
def endpoint(loopback):
    served = Endpoint()
    served.url = loopback(served.respond)
    return served


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "test"}}


def answers(outputs: list[str], generator: str) -> list[dict]:
    return [{"id": f"p{i}", "instruction": f"question {i}", "output": output, "generator": generator,
             "dataset": "vicuna" if i % 2 else "koala"} for i, output in enumerate(outputs)]


# -- tries -------------------------------------------------------------------------------------------------------
def test_rate_limits_and_server_errors_are_tried_again_after_backoff_and_retry_after(endpoint):
    endpoint.script = [(429, error("slow down"), {"Retry-After": "7"}), (503, error("overloaded"), {})]
    waits = []
    judge = EndpointJudge(endpoint.url, "judge", backoff=2.0, sleep=waits.append)
    assert judge.prefer_a("q", "a whale song", "a bird song") == 1.0  # one judgment
    assert len(endpoint.requests) == 3
    assert waits[0] == 7.0  # the server's Retry-After
    assert 2.0 <= waits[1] <= 4.0  # the second wait: twice the first backoff, with jitter


def test_retry_after_in_seconds_or_as_a_date_up_to_the_longest_wait(endpoint):
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= retry_after(in_30s) <= 30
    assert retry_after("12") == 12.0 and retry_after(None) is None and retry_after("soon") is None
    endpoint.script = [(429, error("slow down"), {"Retry-After": "3600"})]
    waits = []
    assert EndpointJudge(endpoint.url, "judge", max_wait=5.0, sleep=waits.append).prefer_a("q", "whale", "b") == 1.0
    assert waits == [5.0]  # an hour asked for, the longest wait taken


def test_a_timeout_is_tried_again(endpoint):
    endpoint.script = [STALL]
    waits = []
    judge = EndpointJudge(endpoint.url, "judge", timeout=0.3, sleep=waits.append)
    assert judge.prefer_a("q", "a bird song", "a whale song") == 0.0
    assert len(endpoint.requests) == 2 and len(waits) == 1


def test_an_unauthorised_request_fails_at_once_naming_the_endpoint_and_status(endpoint):
    endpoint.script = [(401, error("Incorrect API key provided"), {})]
    waits = []
    with pytest.raises(JudgeError) as failure:
        EndpointJudge(endpoint.url, "judge", sleep=waits.append).prefer_a("q", "a", "b")
    message = str(failure.value)
    assert "\n" not in message and endpoint.url in message
    assert "HTTP 401" in message and "Incorrect API key provided" in message
    assert len(endpoint.requests) == 1 and waits == []


def test_a_reply_without_a_chat_completion_fails_at_once(endpoint):
    endpoint.script = [(201, {"object": "list"}, {})]
    with pytest.raises(JudgeError, match="sent no chat completion"):
        EndpointJudge(endpoint.url, "judge", sleep=lambda s: None).prefer_a("q", "a", "b")
    assert len(endpoint.requests) == 1


def test_when_every_try_fails_the_error_says_how_many_and_the_last_failure(endpoint):
    endpoint.script = [(503, error("overloaded"), {})] * 3
    waits = []
    with pytest.raises(JudgeError, match=r"failed 3 tries; the last: HTTP 503: overloaded"):
        EndpointJudge(endpoint.url, "judge", max_tries=3, sleep=waits.append).prefer_a("q", "a", "b")
    assert len(endpoint.requests) == 3 and len(waits) == 2
    assert waits[0] <= 2.0 and waits[1] <= 4.0  # bounded, doubling


# -- resumed judging ---------------------------------------------------------------------------------------------
def test_a_crash_while_judging_loses_only_the_pair_in_progress(endpoint, tmp_path):
    xs = answers(["a whale song", "a bird song", "whales", "birds", "a whale", "cats"], "m2")
    ys = answers(["a bird song", "a whale song", "birds", "whales", "dogs", "a whale"], "m0")
    judge = EndpointJudge(endpoint.url, "judge", sleep=lambda s: None).prefer_a
    uninterrupted = compare(judge, xs, ys)
    assert len(endpoint.requests) == 12

    partial = tmp_path / "eval.judge_m2_vs_m0.abc.partial"
    endpoint.requests.clear()
    endpoint.script = [JUDGE] * 5 + [(400, error("the endpoint breaks"), {})]  # pair 3 fails in its 2nd order
    with pytest.raises(JudgeError, match="HTTP 400"):
        compare(judge, xs, ys, partial=partial)
    assert len(read_partial(partial)) == 2 and len(endpoint.requests) == 6

    endpoint.requests.clear()
    resumed = compare(judge, xs, ys, partial=partial)
    assert len(endpoint.requests) == 8  # the 4 pairs not yet judged, each in both orders
    asked = {r["messages"][0]["content"].split("Instruction:\n")[1].split("\n")[0] for r in endpoint.requests}
    assert asked == {"question 2", "question 3", "question 4", "question 5"}
    assert resumed == uninterrupted

    endpoint.requests.clear()
    assert compare(judge, xs, ys, partial=partial) == uninterrupted and endpoint.requests == []
    changed = [dict(x, output="a whale and a bird") if x["id"] == "p1" else x for x in xs]
    compare(judge, changed, ys, partial=partial)
    assert len(endpoint.requests) == 2  # a stored judgment is never read for other answers


def test_a_judge_that_raises_on_a_call_resumes_where_it_stopped(tmp_path):
    xs, ys = answers(["long answer", "x", "long answer", "y"], "m2"), answers(["short"] * 4, "m0")
    calls, dies_on = [], {5}

    def prefers_longer(instruction, a, b):
        calls.append(instruction)
        if len(calls) in dies_on:
            raise ConnectionError("the judge died")
        return 1.0 if len(a) > len(b) else 0.0

    partial = tmp_path / "judge.partial"
    with pytest.raises(ConnectionError):
        compare(prefers_longer, xs, ys, partial=partial)
    calls.clear()
    dies_on.clear()
    result = compare(prefers_longer, xs, ys, partial=partial)
    assert calls == ["question 2", "question 2", "question 3", "question 3"]
    calls.clear()
    assert result == compare(prefers_longer, xs, ys)
    assert [j["id"] for j in result["judgments"]] == ["p0", "p1", "p2", "p3"]


# -- replies that name no letter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, choice", [
    ("A", "A"), ("B", "B"), ("(A)", "A"), ("Response A", "A"), ("**B**", "B"), ("A.", "A"), (" B\n", "B"),
    ("Better response: B", "B"), ("Answer: (A)", "A"), ("`A`", "A"), ("**Response B", "B"),
    ("Both", None), ("Both are good", None), ("Neither", None), ("A or B", None), ("", None), ("AB", None),
    ("A/B", None), ("A\nB", None), ("a", None), ("Response", None), ("B is better", None), ("N/A", None),
    ("__import__('os')", None),
])
def test_a_reply_must_name_exactly_one_letter(reply, choice):
    assert parse_choice(reply) == choice


def test_unparsed_replies_are_kept_counted_and_left_out_of_the_win_rate(endpoint):
    xs, ys = answers(["x0", "x1", "x2", "x3"], "m2"), answers(["y0", "y1", "y2", "y3"], "m0")
    endpoint.script = [(200, reply, {}) for reply in ["A", "B",               # p0: x wins in both orders
                                                      "Both are good", "A",   # p1: unparsed shown first
                                                      "B", "",                # p2: unparsed shown second
                                                      "Response B", "(A)"]]   # p3: y wins in both orders
    result = compare(EndpointJudge(endpoint.url, "judge", sleep=lambda s: None).prefer_a, xs, ys)
    judgments = {j["id"]: j for j in result["judgments"]}
    assert judgments["p1"]["outcome"] is None and judgments["p1"]["unparsed"] == {"x_as_a": "Both are good"}
    assert judgments["p1"]["x_as_b"] == 0.0  # the parsed order is kept too
    assert judgments["p2"]["outcome"] is None and judgments["p2"]["unparsed"] == {"x_as_b": ""}
    assert "unparsed" not in judgments["p0"] and judgments["p0"]["outcome"] == 1.0
    overall = result["overall"]
    assert (overall["pairs"], overall["unparsed"], overall["n"]) == (4, 2, 2)
    assert overall["win_rate"] == 50.0 and (overall["wins"], overall["ties"], overall["losses"]) == (1, 0, 1)
    assert result["per_dataset"]["vicuna"]["unparsed"] == 1 and result["per_dataset"]["vicuna"]["n"] == 1
    assert position_bias(result["judgments"]) == 0.5  # over the two parsed pairs only


def test_all_unparsed_gives_no_win_rate(endpoint):
    endpoint.script = [(200, "Neither", {})] * 2
    result = compare(EndpointJudge(endpoint.url, "judge").prefer_a, answers(["x"], "m2"), answers(["y"], "m0"))
    assert result["overall"]["win_rate"] is None and result["overall"]["unparsed"] == 1
    assert position_bias(result["judgments"]) is None


def test_the_shared_prefix_of_judge_prompts_leaves_a_token_of_each():
    from humpback_nb.infra.engines import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a row that is all prefix keeps its last token
    assert shared_prefix_length([[1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [7]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_an_endpoint_rater_needs_its_url_model_and_key_before_the_run_starts(monkeypatch):
    from humpback_nb.config import load_preset, with_overrides
    from humpback_nb.run import PipelineError
    from humpback_nb.stages import rater_ready

    tiny = load_preset("tiny")
    rater_ready(tiny)  # the run's own models rate: nothing to check
    with pytest.raises(PipelineError, match="curate.rater_url and curate.rater_model"):
        rater_ready(with_overrides(tiny, {"curate.rater": "endpoint"}))
    remote = with_overrides(tiny, {"curate.rater": "endpoint", "curate.rater_url": "https://api.example.com/v1",
                                   "curate.rater_model": "big", "curate.rater_key_env": "HUMPBACK_TEST_KEY"})
    monkeypatch.delenv("HUMPBACK_TEST_KEY", raising=False)
    with pytest.raises(PipelineError, match=r"needs a key, and \$HUMPBACK_TEST_KEY \(curate.rater_key_env\)"):
        rater_ready(remote)
    monkeypatch.setenv("HUMPBACK_TEST_KEY", "sk-test")
    rater_ready(remote)
    rater_ready(with_overrides(remote, {"curate.rater_url": "http://127.0.0.1:8000/v1"}))  # loopback: no key
    # the number of requests in flight changes no score: a run is not made stale by it
    assert with_overrides(remote, {"curate.rater_concurrency": 2}).hash() == remote.hash()
