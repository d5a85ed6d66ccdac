"""Figure 3 / Table 3 and Table 7 computed as the paper computes them: random nested draws per quality set, the
alpha fit with its standard error, selectors judged by their own rule, people's labels read strictly."""

import json
import math
import random

import numpy as np
import pytest
from conftest import chat_reply, send_json

from humpback_nb.config import CurateConfig, load_preset
from humpback_nb.infra.files import RecordError
from humpback_nb.method.analysis import (
    LOG_BASE,
    pick_by_rating,
    quality_sets,
    read_labels,
    scaling_fit,
    scaling_sources,
    selector_quality,
    training_sample,
)
from humpback_nb.method.curate import rate_at_endpoint, selection_threshold
from humpback_nb.method.winrates import fit_alpha


def pool(n: int = 1000, seed: int = 1) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    candidates = [{"id": f"c{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(n)]
    return candidates, [{"id": c["id"], "score": rng.uniform(1, 5)} for c in candidates]


# -- Figure 3 / Table 3 ------------------------------------------------------------------------------------------
def test_a5_and_a4_models_train_on_different_pairs_at_equal_n():
    candidates, scores = pool()
    sources = scaling_sources(candidates, scores, rng_seed=42)
    a5, a4 = sources["top 8.3%"], sources["top 38.8%"]
    for n in (10, 40, 80):  # both sets hold more than N pairs (|A5| = 83, |A4| = 388)
        assert {c["id"] for c in a5[:n]} != {c["id"] for c in a4[:n]}
    assert {c["id"] for c in a5} < {c["id"] for c in a4}  # A5 lies inside A4, as in the paper


def test_each_sample_lies_within_its_own_quality_set():
    candidates, scores = pool()
    sources = scaling_sources(candidates, scores, rng_seed=42)
    by_id = {s["id"]: s["score"] for s in scores}
    for name, share in (("top 8.3%", 41821 / 502133), ("top 38.8%", 195043 / 502133)):
        k = selection_threshold(scores, CurateConfig(top_share=share))
        assert len(sources[name]) == math.ceil(share * len(candidates))
        assert all(by_id[c["id"]] >= k for c in sources[name][:50])
    assert len({c["id"] for c in sources["no curation"]}) == len(candidates)


def test_whole_number_scores_make_the_papers_a5_and_a4_ties_and_all():
    # The generate rater's scores are 1-5 as the paper's: 8% at 5 and 45% at 4 or more. "Top 8.3%" and "top 38.8%"
    # by share would both become the same 45% here (every tie at the cut is kept); the paper's sets are {5} and {>= 4}.
    candidates, _ = pool(100)
    whole = [5] * 8 + [4] * 37 + [3] * 30 + [2] * 15 + [1] * 10
    scores = [{"id": c["id"], "score": s} for c, s in zip(candidates, whole, strict=True)]
    assert len({c["id"] for c in scaling_sources(candidates, scores, 42)["top 8.3%"]}) == 45  # the old sets: one
    sources = scaling_sources(candidates, scores, rng_seed=42, rater="generate")
    assert list(sources) == ["A5", "A4", "no curation"]
    assert sorted(c["id"] for c in sources["A5"]) == sorted(f"c{i}" for i in range(8))
    assert sorted(c["id"] for c in sources["A4"]) == sorted(f"c{i}" for i in range(45))
    rules = {name: rule for name, (k, rule) in quality_sets("generate", scores).items()}
    assert rules == {"A5": "score 5 (the paper's A5)", "A4": "score >= 4 (the paper's A4)"}
    assert {name: k for name, (k, _) in quality_sets("generate", scores).items()} == {"A5": 5, "A4": 4}


def test_draws_are_nested_seeded_and_not_best_first():
    candidates, scores = pool()
    first, again = scaling_sources(candidates, scores, 42), scaling_sources(candidates, scores, 42)
    other = scaling_sources(candidates, scores, 7)
    for name, order in first.items():
        assert [c["id"] for c in order] == [c["id"] for c in again[name]]  # the same seed, the same samples
        assert [c["id"] for c in order] != [c["id"] for c in other[name]]  # another seed, other samples
        # nested: a model of size N trains on the first N, so the N=40 sample holds the N=10 one
        assert {c["id"] for c in order[:10]} <= {c["id"] for c in order[:40]}
    top = first["top 8.3%"]
    assert [c["score"] for c in top[:20]] != sorted((c["score"] for c in top), reverse=True)[:20]


def test_fit_alpha_recovers_a_known_alpha_and_its_standard_error_as_numpy_does():
    ns = [100, 800, 1600, 3200, 6400, 12800]
    noise = [0.8, -1.1, 0.3, 1.4, -0.9, -0.5]
    rates = [6.95 * math.log(n) + 10.0 + e for n, e in zip(ns, noise, strict=True)]
    alpha, c, se = fit_alpha(ns, rates, with_se=True)
    (np_alpha, np_c), cov = np.polyfit(np.log(ns), rates, 1, cov="unscaled")
    residuals = np.array(rates) - (np_alpha * np.log(ns) + np_c)
    by_hand = math.sqrt(residuals @ residuals / (len(ns) - 2) / np.sum((np.log(ns) - np.log(ns).mean()) ** 2))
    assert alpha == pytest.approx(np_alpha) and c == pytest.approx(np_c)
    assert se == pytest.approx(by_hand) == pytest.approx(math.sqrt(cov[0, 0] * residuals @ residuals / 4))
    assert abs(alpha - 6.95) < 3 * se
    exact = [6.95 * math.log(n) + 10.0 for n in ns]
    assert fit_alpha(ns, exact, with_se=True)[2] == pytest.approx(0, abs=1e-9)
    assert fit_alpha(ns[:2], exact[:2], with_se=True)[2] is None  # two points: a line fits them exactly
    assert fit_alpha(ns, exact) == pytest.approx((6.95, 10.0))  # without with_se: (alpha, C) as before
    assert LOG_BASE == "e"


def test_scaling_fit_leaves_out_unparsed_points_and_needs_two_sizes():
    points = [{"n": 2, "win_rate": 40.0}, {"n": 4, "win_rate": 45.0}, {"n": 8, "win_rate": None}]
    fit = scaling_fit(points)
    assert fit["alpha"] == pytest.approx(5 / math.log(2)) and fit["alpha_se"] is None and fit["fit_points"] == 2
    assert scaling_fit(points[:1]) == {"alpha": None, "C": None, "alpha_se": None, "fit_points": 1}


# -- Table 7 -----------------------------------------------------------------------------------------------------
def labelled(positive_scores: list[float], negative_scores: list[float]) -> tuple[list[dict], list[dict]]:
    pairs, scores = [], []
    for label, values in ((1, positive_scores), (0, negative_scores)):
        for i, score in enumerate(values):
            pairs.append({"id": f"{label}-{i}", "instruction": "q", "output": "a", "label": label})
            scores.append({"id": f"{label}-{i}", "score": score})
    return pairs, scores


def test_precision_and_recall_follow_the_selectors_own_k_and_can_differ():
    # 5 positives, 20 negatives; a cautious selector (k = 5) keeps 2 positives and 1 negative
    pairs, scores = labelled([5, 5, 4, 3, 2], [5] + [1] * 19)
    row = selector_quality(pairs, scores, k=4.5)
    assert (row["precision"], row["recall"], row["selected"]) == (2 / 3, 2 / 5, 3)
    assert row["k"] == 4.5 and row["parse_rate"] == 1.0
    loose = selector_quality(pairs, scores, k=2)
    assert (loose["precision"], loose["recall"]) == (5 / 6, 1.0)


def test_unparsed_ratings_are_never_selected_and_lower_the_parse_rate():
    pairs, scores = labelled([5, 5], [1, 1, 1, 1, 1, 1, 1, 1])
    scores[1]["score"] = None
    row = selector_quality(pairs, scores, k=4.5)
    assert (row["selected"], row["recall"], row["parse_rate"]) == (1, 0.5, 0.9)


def test_training_sample_is_a_seeded_random_draw_of_the_selection():
    selection = [{"id": f"c{i}", "score": 5 - i / 100} for i in range(300)]
    sample = training_sample(selection, 100, "42:m0")
    assert len(sample) == 100 and sample == training_sample(selection, 100, "42:m0")
    assert {c["id"] for c in sample} != {f"c{i}" for i in range(100)}  # not the best-scored 100
    assert len(training_sample(selection[:30], 100, 0)) == 30  # fewer picked: all of them


def test_pick_by_rating_rates_in_chunks_until_enough_are_picked():
    candidates = [{"id": f"c{i}", "instruction": "q", "output": "a"} for i in range(100)]
    asked = []

    def rate(chunk):
        asked.append(len(chunk))
        return [{"id": c["id"], "score": 5 if int(c["id"][1:]) % 4 == 0 else 2} for c in chunk]

    picked, rated = pick_by_rating(rate, candidates, k=4.5, size=10, rng_seed=0)
    assert len(picked) == 10 and all(int(c["id"][1:]) % 4 == 0 for c in picked)
    assert rated == sum(asked) < 100 and set(asked) == {10}
    few, rated = pick_by_rating(rate, candidates[:20], k=4.5, size=10, rng_seed=0)
    assert len(few) == 5 and rated == 20


def test_peoples_labels_are_read_and_bad_lines_named(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"instruction": "q1", "output": "a1", "label": 1}, {"instruction": "q2", "output": "a2", "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = read_labels(path)
    assert [(p["id"], p["label"]) for p in pairs] == [("labelled-1", 1), ("labelled-2", 0)]
    for bad, problem in (('{"instruction": "q", "output": "a", "label": 2}', "'label' must be 1"),
                         ('{"instruction": "q", "label": 1}', "'output' must be a non-empty string"),
                         ("{not json", "not valid JSON")):
        path.write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(RecordError, match=rf"labels.jsonl, line 2: {problem}"):
            read_labels(path)
    with pytest.raises(RecordError, match="no such file"):
        read_labels(tmp_path / "missing.jsonl")


def test_presets_size_table7_to_their_heldout_split():
    for name in ("tiny", "demo"):
        config = load_preset(name)
        assert config.evaluate.selection_positives <= config.data.heldout_size
        assert 0 < config.evaluate.selection_train_size < 100 and config.evaluate.selection_labels is None


def test_an_endpoint_rates_with_the_papers_prompt_and_its_replies_are_parsed_strictly(tmp_path, loopback):
    from humpback_nb.method.judges import EndpointJudge

    bodies = []

    def rater(handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        bodies.append(body)
        text = body["messages"][-1]["content"]
        send_json(handler, chat_reply("Clear and complete.\nScore: 5" if "qgood" in text else
                                      "Score: 10502" if "qodd" in text else "Score: 2"))

    url = loopback(rater)
    endpoint = EndpointJudge(url, "gpt-4")
    pairs = [{"id": "p", "instruction": "qgood question", "output": "x"},
             {"id": "n", "instruction": "a question", "output": "y"},
             {"id": "o", "instruction": "qodd one", "output": "z"}]
    scores = rate_at_endpoint(endpoint, pairs, 256, partial=tmp_path / "part.jsonl")
    assert [(s["id"], s["score"]) for s in scores] == [("p", 5), ("n", 2), ("o", None)]
    assert [m["role"] for m in bodies[0]["messages"]] == ["user"]  # the paper's prompt, no system prompt
    assert "5-point scale" in bodies[0]["messages"][0]["content"] and bodies[0]["max_tokens"] == 256
    assert rate_at_endpoint(endpoint, pairs, 256, partial=tmp_path / "part.jsonl") == scores
    assert len(bodies) == 3  # the ratings kept are not asked for again
    assert selector_quality([dict(p, label=int(p["id"] == "p")) for p in pairs], scores, k=4.5)["recall"] == 1

