import json
import statistics

import pytest

from humpback_nb.config import load_preset, with_overrides
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.method.curate import (
    agreement,
    parse_rate,
    parse_score,
    rate_logprob,
    sanity_pairs,
    select,
    threshold_counts,
)
from humpback_nb.nb.widgets import pair_explorer, pair_html, threshold_explorer


@pytest.mark.parametrize("reply, score", [
    ("The answer is complete and helpful.\nScore: 4", 4),
    ("Reasoning: the answer is off-topic.\n\nScore: 1\n", 1),
    ("It is perfect.\nscore:5", 5),
    ("Good structure, minor room to improve.\nScore: 4.", 4),
    ("**Score: 3**", 3),
    ("The answer looks like a forum post.", None),  # no score
    ("", None),
    ("Score: 3\nOn reflection it is better.\nScore: 4", None),  # two scores: never guess which one
    ("Score: 10502", None),  # the loose-regex bug of a public reimplementation
    ("Score: 0", None),
    ("Score: 6", None),
    ("Score: 4 because it is helpful", None),  # text after the score
    ("Score: 4\nThanks for asking!", None),  # the score is not on the last line
    ("Score: 4/5", None),
    ("Score: four", None),
    ("I would give it a 5 out of 5.", None),
    ("Score: 3.5", None),
])
def test_strict_score_parser(reply, score):
    assert parse_score(reply) == score


def test_parse_rate():
    assert parse_rate([{"score": 4}, {"score": None}, {"score": 2}, {"score": None}]) == 0.5


def test_A_k_with_a_real_threshold():
    candidates = [{"id": str(i), "instruction": "q", "output": "a"} for i in range(5)]
    scores = [{"id": "0", "score": 4.49}, {"id": "1", "score": 4.5}, {"id": "2", "score": 5.0},
              {"id": "3", "score": None}, {"id": "4", "score": 2.0}]
    assert [c["id"] for c in select(candidates, scores, 4.5)] == ["1", "2"]
    assert [c["score"] for c in select(candidates, scores, 4.5)] == [4.5, 5.0]
    assert [c["id"] for c in select(candidates, scores, 2)] == ["0", "1", "2", "4"]
    assert threshold_counts(scores, ks=(2, 4.49, 4.5, 5)) == {2: 4, 4.49: 3, 4.5: 2, 5: 1}


def test_sanity_pairs_shuffle_outputs_between_candidates():
    candidates = [{"id": f"c{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    sets = sanity_pairs([{"id": "s", "instruction": "q", "output": "a"}], candidates, n=4, rng_seed=1)
    assert len(sets["augmented"]) == len(sets["shuffled"]) == 4 and len(sets["seed"]) == 1
    for pair in sets["shuffled"]:
        assert pair["instruction"][1:] != pair["output"][1:]


def test_agreement():
    a = [{"id": str(i), "score": float(i)} for i in range(1, 6)]
    b = [{"id": str(i), "score": float(i) + 0.2} for i in range(1, 6)] + [{"id": "9", "score": None}]
    result = agreement(a, b)
    assert result["pairs"] == 5 and result["spearman"] == pytest.approx(1.0) and result["same_rounded_score"] == 1.0


def test_explorer_html_escapes_web_text():
    record = {"id": "cand-1", "source": "c4_demo:3", "instruction": "Say <b>hi</b>",
              "output": "<script>alert('x')</script> & more"}
    text = pair_html(record, 4.2, "<img src=x onerror=alert(1)>")
    assert "<script>" not in text and "&lt;script&gt;" in text and "&amp; more" in text
    assert "<img" not in text and "&lt;b&gt;hi&lt;/b&gt;" in text
    scores = [{"id": "cand-1", "score": 4.2, "reasoning": "<script>x</script>"}]
    explorer = pair_explorer([record], scores)
    assert "<script>" not in explorer.children[-1].value and "&lt;script&gt;" in explorer.children[-1].value
    slider = threshold_explorer([record], scores, k=4.0)
    assert "|A_k| = 1</b>" in slider.children[1].value
    slider.children[0].value = 4.5
    assert "|A_k| = 0</b>" in slider.children[1].value
    assert "<script>" not in slider.children[2].children[1].value


@pytest.mark.slow
def test_logprob_rater_on_the_embedded_model(embedded_checkpoint, tmp_path):
    from humpback_nb.infra.models import load_model
    from humpback_nb.infra.sources import fetch

    # float32, so that reusing the rubric's keys and values gives exactly the scores of whole prompts
    config = with_overrides(load_preset("tiny"), {"model.dtype": "float32"})
    model, tokenizer = load_model(config.model)
    data = json.loads(fetch("alpaca_en_demo").read_text())
    good = [{"id": f"good{i}", "instruction": d["instruction"], "output": d["output"]}
            for i, d in enumerate(data[:40]) if not d["input"] and 200 < len(d["output"]) < 1200][:8]
    shuffled = [{"id": f"shuffled{i}", "instruction": a["instruction"], "output": b["output"]}
                for i, (a, b) in enumerate(zip(good, good[1:] + good[:1], strict=True))]
    engine = LocalEngine(model, tokenizer)
    scores = rate_logprob(engine, good + shuffled, config.curate, config.model.context_length, progress=False)
    for record in scores:
        assert sum(record["distribution"]) == pytest.approx(1.0, abs=1e-5)
        assert 1.0 <= record["score"] <= 5.0 and 0 < record["digit_mass"] <= 1
    by_id = {s["id"]: s["score"] for s in scores}
    assert statistics.mean(by_id[p["id"]] for p in good) > statistics.mean(by_id[p["id"]] for p in shuffled)
    whole = rate_logprob(LocalEngine(model, tokenizer, shared_prefix=False), good[:3], config.curate,
                         config.model.context_length, progress=False)
    assert [s["score"] for s in whole] == pytest.approx([by_id[p["id"]] for p in good[:3]], abs=1e-3)

    # a crash after one line of a batch: the rerun rates the whole batch again and keeps the missing rows
    small = with_overrides(config, {"curate.batch_size": 4})
    pairs = good + shuffled
    reference = rate_logprob(engine, pairs, small.curate, small.model.context_length, progress=False)
    partial = tmp_path / "scores.partial"
    partial.write_text(json.dumps(reference[0]) + "\n")
    resumed = rate_logprob(engine, pairs, small.curate, small.model.context_length, partial=partial, progress=False)
    assert resumed == reference
    assert [json.loads(line)["id"] for line in partial.read_text().splitlines()].count(reference[0]["id"]) == 1


def test_top_share_picks_k_from_the_scores():
    from humpback_nb.config import CurateConfig
    from humpback_nb.method.curate import selection_threshold

    scores = [{"id": str(i), "score": s} for i, s in enumerate([3.1, 2.9, 3.4, 3.3, None, 2.5])]
    assert selection_threshold(scores, CurateConfig(threshold=4.5)) == 4.5
    assert selection_threshold(scores, CurateConfig(top_share=0.4)) == 3.3  # the best 2 of 5 rated
    assert selection_threshold(scores, CurateConfig(top_share=1.0)) == 2.5


def test_a_curated_set_carries_the_k_that_made_it_and_how_k_was_chosen():
    from humpback_nb.config import CurateConfig
    from humpback_nb.method.curate import curated_set

    candidates = [{"id": str(i), "instruction": "q", "output": "a"} for i in range(5)]
    scores = [{"id": str(i), "score": s} for i, s in enumerate([3.1, 2.9, 3.4, 3.3, None])]
    chosen, info = curated_set(candidates, scores, CurateConfig(top_share=0.5))
    assert [c["id"] for c in chosen] == ["2", "3"] and info["k"] == 3.3
    assert info["rule"].startswith("the best 50.0%") and (info["rated"], info["candidates"]) == (4, 5)
    chosen, info = curated_set(candidates, scores, CurateConfig(threshold=3.0))
    assert len(chosen) == 3 and info["k"] == 3.0 and info["rule"] == "score >= 3 (curate.threshold)"


def test_agreement_with_a_rater_that_gives_every_pair_one_score_has_no_rank_correlation():
    from humpback_nb.method.curate import agreement

    varied = [{"id": str(i), "score": s} for i, s in enumerate([1.0, 2.0, 3.0, 4.0])]
    constant = [{"id": str(i), "score": 3.0} for i in range(4)]
    result = agreement(varied, constant)
    assert result["spearman"] is None and result["same_rounded_score"] == 0.25
    assert agreement(varied, varied)["spearman"] == 1.0
