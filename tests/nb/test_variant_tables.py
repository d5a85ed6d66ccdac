"""The follow-ups' tables (nb/tables.py) and their section of the report (report.py), on hand-made results in the
format of analyses/variant.json (followups.variant_eval)."""

import copy
import json

import pytest

from humpback_nb import report
from humpback_nb.config import load_preset
from humpback_nb.nb import tables
from humpback_nb.run import RunFiles


def difference(value, low, high):
    return {"n": 4, "tokens": 392, "difference": value, "interval": [low, high], "resolved": not low <= 0 <= high}


def overall(rate, se, n=6):
    return {"n": n, "win_rate": rate, "se": se, "wins": 3, "ties": 1, "losses": 2, "pairs": n, "unparsed": 0}


def spread(mean, std, n=10):
    return {"mean": mean, "std": std, "n": n}


CHANGES = {"pairs": 10, "original_chars": spread(2164.1, 690.3), "rewrite_chars": spread(101.3, 20.7),
           "from_original": spread(0.449, 0.371), "similarity": spread(0.07, 0.045)}


def check(separates=False):
    model = {"n": 6, "unparsed": 0, "real_preferred": 0.4986, "interval": [0.4919, 0.5038], "ties": 0.67,
             "orders_disagree": 1.0, "separates": separates}
    return {"separates": separates, "verdict": "the judge cannot separate real answers from shuffled ones",
            "bar": 0.6, "models": {"bft": model}}


def result(method="bft", win=(49.18, 0.88), loss=(-0.0011, -0.0086, 0.0042), judge=None):
    pairs = ({"method": method, "model": "smollm2-135m", "url": None, "pairs": 20, "rated": 18, "parse_rate": 0.9,
              "threshold": 4.5, "kept": 5, "examples": []} if method == "alpagasus" else
             {"method": method, "model": "m0" if method == "kun" else "smollm2-135m", "url": None,
              "selection": "A(1)_k, k >= 2.62", "asked": 10, "kept": 10, "empty": 0, "cut": 10,
              "max_new_tokens": 24, "changes": CHANGES})
    return {"method": method, "paper": "a paper", "model": method, "compared_with": ["m2", "m1", "m0", "base"],
            "pairs": pairs,
            "heldout": {"pairs": 4, "tokens": 392, "inference_tags": "S_a+S_w",
                        "loss": {method: 1.9568, "m2": 1.9579, "m1": 1.9579, "m0": 1.9595, "base": 1.9604},
                        "differences": {f"{method} - m2": difference(*loss), f"{method} - base":
                                        difference(-0.0035, -0.0065, -0.0003)}},
            "win_rates": {f"{method}_vs_m2": {"overall": overall(*win)},
                          f"{method}_vs_base": {"overall": overall(49.72, 0.31)}},
            "protocol": "local judge vs base model: not the paper's protocol", "judge": "local:base",
            "judge_check": check() if judge is None else judge,
            "answers_cut": {"cut": 6, "of": 6, "max_new_tokens": 24}}


def rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_the_variants_table_has_one_row_per_follow_up_with_intervals_and_says_noise():
    table = tables.variants({"bft": result("bft"), "alpagasus": result("alpagasus")})
    head, _, bft, alpagasus = rows(table)
    assert "held-out loss" in head and "95% interval" in head and "the judge's check" in head
    assert "| bft | seed pairs + 10 rewritten (A(1)_k, k >= 2.62) | -0.001 | -0.009 to +0.004 " in bft
    assert "no: noise at this size" in bft
    # the win rate with its interval (49.18 ± 1.96 x 0.88), noise because the judge fails its check
    assert "49.2% (47.5 to 50.9, n=6): noise, the judge fails its check" in bft
    assert "fails: real answers preferred 49.9%, 95% interval 49.2 to 50.4" in bft
    assert alpagasus.startswith("| alpagasus | 5 of 20 seed pairs (score >= 4.5) |")


def test_a_win_rate_counts_only_outside_50_and_with_a_judge_that_passes():
    passes = check(separates=True)
    inside = tables.variants({"bft": result(win=(52.0, 2.0), judge=passes)})
    assert "52.0% (48.1 to 55.9, n=6): noise, the interval holds 50%" in inside
    assert "passes: real answers preferred" in inside
    better = tables.variants({"bft": result(win=(70.0, 5.0), judge=passes)})
    assert "70.0% (60.2 to 79.8, n=6): better" in better
    unchecked = tables.variants({"bft": result(win=(30.0, 5.0), judge={"verdict": "no check", "models": {}})})
    assert "worse (the judge was not checked)" in unchecked and "| not checked |" in unchecked
    single = tables.variants({"bft": result(win=(55.0, None))})
    assert "55.0% (n=6, no interval): noise" in single


def test_a_resolved_loss_difference_names_the_better_model():
    table = tables.variants({"kun": result("kun", loss=(-0.02, -0.03, -0.01))})
    assert "| -0.020 | -0.030 to -0.010 | yes: kun better |" in table


def test_the_win_rates_of_a_follow_up_each_carry_an_interval():
    table = tables.variant_win_rates(result())
    assert len(rows(table)) == 4
    assert "| bft vs m2 | 49.2% (47.5 to 50.9, n=6): noise, the judge fails its check | 3 | 1 | 2 | 6 | 0 |" in table
    assert "| bft vs base | 49.7% (49.1 to 50.3, n=6)" in table


def test_what_the_rewrites_changed():
    table = tables.variant_changes({"Humpback": dict(CHANGES, rewrite_chars=CHANGES["original_chars"],
                                                     from_original=spread(1.0, 0.0), similarity=spread(1.0, 0.0)),
                                    "bft": CHANGES, "none": {"pairs": 0, **{k: spread(None, None, 0) for k in
                                                                           ("original_chars", "rewrite_chars",
                                                                            "from_original", "similarity")}}})
    _, _, humpback, bft, empty = rows(table)
    assert humpback == "| Humpback | 10 | 2,164 ± 690 | 2,164 ± 690 | 100 ± 0% | 100 ± 0% |"
    assert bft == "| bft | 10 | 2,164 ± 690 | 101 ± 21 | 45 ± 37% | 7 ± 4% |"
    assert empty == "| none | 0 | - | - | - | - |"


def test_alpagasus_ratings_beside_the_paper():
    pairs = dict(result("alpagasus")["pairs"], scores=[5.0, 4.5, None, 3.0, 5.0])
    table = tables.alpagasus_ratings(pairs)
    assert "| 20 | 18 (90%) | score >= 4.5 | 5 | 25.0% |" in table
    assert "| AlpaGasus: ChatGPT rates Alpaca | 52,002 | - | score >= 4.5 | 9,229 | 17.7% |" in table
    assert "| score | 3 | 4.5 | 5 | no score |" in table and "| pairs | 1 | 1 | 2 | 1 |" in table
    # the logprob rating's expected scores, kept by a top share: the k it made, and scores counted by halves
    shared = dict(pairs, rating="logprob", k=3.87, rule="the best 17.7% of the rated pairs (variant.top_share)",
                  scores=[3.87, 3.2, 3.9, 4.1])
    table = tables.alpagasus_ratings(shared)
    assert "rates the seed pairs, logprob rating |" in table
    assert "| score >= 3.87, the best 17.7% of the rated pairs (variant.top_share) |" in table
    assert "| score | 3 | 3.5 | 4 |" in table and "| pairs | 1 | 2 | 1 |" in table
    assert "seed pairs (score >= 3.87, the best" in tables.variants({"alpagasus": dict(
        result("alpagasus"), pairs=shared)})


def test_texts_side_by_side_are_shortened_and_escaped():
    table = tables.side_by_side([{"instruction": "a | b", "segment": "<script>x</script> *bold*\n\nnext",
                                  "rewrite": "word " * 200}], chars=60)
    head, _, row = rows(table)
    assert head == "| instruction | segment | rewrite |"
    assert "a \\| b" in row and "&lt;script&gt;" in row and "\\*bold\\*" in row and "\n" not in row
    assert row.count("[...]") == 1 and len(row) < 200
    assert tables.side_by_side([]) == "(no pairs)"


def test_each_paper_beside_ours_and_one_line_of_differences():
    results = {"bft": result("bft"), "kun": result("kun"), "alpagasus": result("alpagasus")}
    table = tables.variant_headlines(results)
    assert len(rows(table)) == 5
    assert "9,229 of Alpaca's 52,002" in table and "5 of 20 seed pairs kept (25.0%)" in table
    assert "noise, the interval holds 0" in table
    line = tables.variant_differences(load_preset("demo"), results)
    assert line.startswith("*What differs from the papers:*") and "\n" not in line
    assert "smollm2-135m (4bit" in line and "where in the paper Llama-2-70B-chat" in line and "ChatGPT" in line
    assert "kun's polisher this run's M0" in line and "the base model as a local judge" in line
    assert "120 seed pairs of alpaca_en_demo" in line


def test_the_report_shows_the_variants_table_only_when_a_follow_up_is_beside_the_run(tmp_path):
    run_dir = tmp_path / "demo"
    assert report.variant_results(run_dir) == {}
    beside = RunFiles(tmp_path / "demo-kun").path("analysis", "variant")
    beside.parent.mkdir(parents=True)
    hostile = copy.deepcopy(result("kun"))
    hostile["pairs"]["selection"] = "<img src=x onerror=alert(1)>"
    beside.write_text(json.dumps(hostile))
    found = report.variant_results(run_dir)
    assert list(found) == ["kun"]
    page = report.variants_html(found, load_preset("demo"))
    assert "<table>" in page and "What differs from the papers:" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.slow
def test_a_report_of_a_finished_run_with_a_follow_up_beside_it(finished_tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run_dir)
    assert 'id="variants"' not in report.build_report(run_dir)
    beside = RunFiles(tmp_path / "run-bft").path("analysis", "variant")
    beside.parent.mkdir(parents=True)
    beside.write_text(json.dumps(result("bft")))
    page = report.build_report(run_dir)
    assert 'id="variants"' in page and 'href="#variants"' in page and "seed pairs + 10 rewritten" in page
