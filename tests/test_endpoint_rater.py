"""A_k from a capable rater: `curate.rater: endpoint` sends every candidate to an OpenAI-compatible endpoint with
the paper's prompt and parser, several requests at once, kept as they come (a rerun asks only for the rest). The
endpoint here is a scripted loopback stand-in for a model that can rate: it knows which output each instruction
was written for, so the rater's check must find matched pairs above shuffled ones, where the run's own 135M model
cannot tell them apart."""

import json
import shutil
import threading
import time

import pytest
from conftest import chat_reply, send_json

from humpback_nb.config import load_preset, with_overrides
from humpback_nb.pipeline import open_run
from humpback_nb.run import RunFiles

pytestmark = pytest.mark.slow


class Oracle:
    """Rates like a capable model that knows the run's pairs: an instruction over the output it was written for
    scores 5 (3 when the instruction has fewer than four words: vague), any other pairing 1. Counts requests and how
    many were in flight at once; after `fail_after` requests it answers 400 (a refused request fails at once)."""

    def __init__(self, pairs: list[dict], fail_after: int | None = None):
        self.known = [f"{p['instruction']}\n{p['output']}" for p in pairs]
        self.short = {text for text, p in zip(self.known, pairs, strict=True) if len(p["instruction"].split()) < 4}
        self.fail_after, self.requests, self.in_flight, self.most_at_once = fail_after, 0, 0, 0
        self.lock = threading.Lock()

    def __call__(self, handler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests += 1
            refused = self.fail_after is not None and self.requests > self.fail_after
            self.in_flight += 1
            self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            if refused:
                send_json(handler, {"error": {"message": "quota exceeded"}}, status=400)
                return
            time.sleep(0.05)  # a remote model takes a while: requests overlap when several are sent at once
            text = body["messages"][-1]["content"]
            matched = next((known for known in self.known if known in text), None)
            score = 1 if matched is None else 3 if matched in self.short else 5
            send_json(handler, chat_reply(f"The answer {'fits' if matched else 'does not fit'} the question.\n"
                                          f"Score: {score}"))
        finally:
            with self.lock:
                self.in_flight -= 1


def test_an_endpoint_rater_curates_a_k_concurrently_resumably_and_passes_the_raters_check(finished_tiny_run,
                                                                                             tmp_path, loopback):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run_dir, ignore=shutil.ignore_patterns("notebooks"))
    files = RunFiles(run_dir)
    pairs = files.candidates() + files.seed_pairs("heldout") + files.seed_pairs("train")

    def settings(url: str):
        return with_overrides(load_preset("tiny"), {"curate.rater": "endpoint", "curate.rater_url": url,
                                                    "curate.rater_model": "oracle", "curate.rater_concurrency": 4,
                                                    "curate.compare_size": 0})  # M0's own raters: not asked here

    # the endpoint refuses after 10 requests: the stage fails, keeping the ratings it has
    oracle = Oracle(pairs, fail_after=10)
    config = settings(loopback(oracle))
    with pytest.raises(Exception, match="quota exceeded"):
        open_run(run_dir).run(config, until="A1", log=lambda line: None)
    assert files.manifest("rate_m0") is None  # not done

    oracle.fail_after, oracle.requests = None, 0  # the quota is back: the same endpoint, the same settings
    open_run(run_dir).run(config, until="A1", log=lambda line: None)
    report = files.manifest("rate_m0")["report"]
    rated = len(files.candidates()) + len(report["sanity_scores"]["seed"]) + len(report["sanity_scores"]["shuffled"])
    assert rated - 10 <= oracle.requests < rated  # the kept ratings were not asked for again
    assert oracle.most_at_once > 1  # several requests in flight

    scores = files.scores("m0")
    assert {s["rater"] for s in scores} == {"endpoint"} and all(s["score"] in (3, 5) for s in scores)
    assert all(s["reasoning"].startswith("The answer fits") for s in scores)
    check = report["rater_check"]
    assert check["tells_apart"], check["verdict"]  # matched 3-5 against shuffled 1: curation selects
    a1 = files.curated(1)
    assert a1.info["rater"] == "endpoint" and a1.records
    kept = {s["id"]: s["score"] for s in scores}
    assert all(kept[r["id"]] >= a1.k for r in a1.records)
