"""The judge's and the rater's checks: bootstrap intervals, shuffled answers, verdicts."""

import math
import random
import statistics

import pytest

from humpback_nb.method.sanity import (
    JUDGE_SEPARATION,
    bootstrap_interval,
    judge_check,
    judge_verdict,
    loss_difference,
    paired_difference,
    rater_check,
    resolved,
    shuffled_answers,
)


def test_the_bootstrap_interval_is_the_exact_one_on_a_small_sample():
    # [0, 0, 0, 1]: a resample's mean is k / 4 with k ~ Binomial(4, 1/4); P(k <= 2) = 0.949 and P(k <= 3) = 0.996,
    # so the exact 2.5% and 97.5% quantiles of the bootstrap distribution are 0 and 0.75
    assert bootstrap_interval([0, 0, 0, 1], draws=4000) == (0, 0.75)
    assert bootstrap_interval([2.0]) is None


def test_the_bootstrap_interval_agrees_with_the_normal_one_on_a_large_sample():
    rng = random.Random(1)
    values = [rng.gauss(3.0, 2.0) for _ in range(400)]
    low, high = bootstrap_interval(values, draws=4000)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    assert low == pytest.approx(statistics.fmean(values) - half, abs=0.1 * half)
    assert high == pytest.approx(statistics.fmean(values) + half, abs=0.1 * half)


def test_a_paired_difference_resamples_the_pairs_together():
    a = [0.3, 1.7, 2.2, 5.0, 0.1]
    same_shift = paired_difference([x + 1 for x in a], a)
    assert same_shift["difference"] == pytest.approx(1) and same_shift["interval"] == pytest.approx([1, 1])
    assert resolved(same_shift)
    noise = paired_difference([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1])
    assert noise["difference"] == 0 and not resolved(noise)
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_shuffled_answers_are_the_same_models_answers_to_other_prompts_of_the_same_set():
    answers = [{"id": f"{d}-{i}", "dataset": d, "instruction": f"q{d}{i}", "output": f"a{d}{i}", "generator": "m2"}
               for d in ("alpaca", "mt") for i in range(3)]
    shuffled = shuffled_answers(answers)
    assert [s["id"] for s in shuffled] == [a["id"] for a in answers]
    assert [s["instruction"] for s in shuffled] == [a["instruction"] for a in answers]
    for real, other in zip(answers, shuffled, strict=True):
        assert other["output"] != real["output"] and other["output"][1:].startswith(real["dataset"])
    assert sorted(s["output"] for s in shuffled) == sorted(a["output"] for a in answers)


def _judgments(outcomes):
    return [{"outcome": o, "x_as_a": o, "x_as_b": o} for o in outcomes]


def test_a_judge_that_always_answers_one_half_cannot_separate():
    check = judge_check(_judgments([0.5] * 40))
    assert check["real_preferred"] == 0.5 and check["interval"] == [0.5, 0.5] and check["ties"] == 1.0
    assert not check["separates"]
    verdict = judge_verdict({"m2": check, "m0": judge_check(_judgments([1.0] * 40))})
    assert not verdict["separates"] and "cannot separate" in verdict["verdict"] and "m2's answers" in verdict["verdict"]


def test_a_judge_that_reads_the_answers_separates_and_the_bar_is_the_intervals_lower_end():
    good = judge_check(_judgments([1.0] * 36 + [0.0] * 4))
    assert good["separates"] and good["interval"][0] >= JUDGE_SEPARATION
    weak = judge_check(_judgments([1.0] * 24 + [0.0] * 16))  # 60% on the mean, below it at the interval's low end
    assert weak["real_preferred"] == pytest.approx(0.6) and not weak["separates"]
    assert judge_verdict({"m2": good})["separates"] and not judge_verdict({})["separates"]


def test_orders_that_disagree_are_counted():
    check = judge_check([{"outcome": 0.5, "x_as_a": 0.9, "x_as_b": 0.1}, {"outcome": 1.0, "x_as_a": 1.0, "x_as_b": 1.0},
                         {"outcome": None, "x_as_a": None, "x_as_b": 0.5}])
    assert check["orders_disagree"] == 0.5 and check["unparsed"] == 1 and check["n"] == 2


def test_the_rater_check_pairs_each_instruction_and_gives_a_verdict():
    tells = rater_check([5, 4, 5, 4, 5, 5], [1, 2, 1, 1, 2, 1])
    assert tells["tells_apart"] and tells["difference"] == pytest.approx(20 / 6)
    assert "scores matched pairs above mismatched ones" in tells["verdict"]
    blind = rater_check([3.4, 3.5, 3.3, 3.4], [3.5, 3.3, 3.4, 3.4])
    assert not blind["tells_apart"] and "cannot tell matched from mismatched pairs" in blind["verdict"]
    unread = rater_check([5, None, 4], [1, 2, None])  # a pair with an unreadable score is left out
    assert unread["n"] == 1 and not unread["tells_apart"]


def test_a_loss_difference_is_per_token_and_its_interval_the_exact_bootstrap_one():
    # two pairs of 2 tokens: model a loses 2.0 more on the first, nothing more on the second: +0.5 a token. A
    # resample holds the first twice (1/4: +1.0), once (1/2: +0.5) or never (1/4: 0): the 95% interval is 0 to 1
    d = loss_difference([(3.0, 2), (1.0, 2)], [(1.0, 2), (1.0, 2)], draws=4000)
    assert d["difference"] == 0.5 and d["tokens"] == 4 and d["interval"] == [0.0, 1.0] and not resolved(d)
    better = loss_difference([(1.0, 10)] * 8, [(3.0, 10)] * 8)  # a is better on every pair
    assert better["difference"] == pytest.approx(-0.2) and resolved(better)
    assert better["interval"] == pytest.approx([-0.2, -0.2])


def test_what_a_run_can_show_follows_its_checks():
    from humpback_nb.nb.tables import can_show

    resolved_better = {"difference": -0.05, "interval": [-0.08, -0.02], "resolved": True}
    noise = {"difference": -0.002, "interval": [-0.01, 0.006], "resolved": False}
    blind_judge = judge_verdict({"m2": judge_check(_judgments([0.5] * 20))})
    summary = {"heldout": {"differences": {"m0 - base": resolved_better, "m2 - m0": resolved_better,
                                           "m2 - m1": noise}},
               "judge_check": blind_judge, "rater_checks": {"m0": rater_check([3.4, 3.5, 3.3], [3.5, 3.3, 3.4])},
               "answers_cut": {"m0": {"cut": 20, "of": 24, "max_new_tokens": 48}},
               "figure3_scaling": {"sources": {"A5": {"points": [{}, {}]}}}}
    lines = can_show(summary).splitlines()[1:]  # the first: M0 against the base model
    assert "M2 (Humpback) fits held-out human answers better than M0" in lines[0] and lines[0].endswith(
        "yes, and it does.")
    assert "the second iteration helps" in lines[1] and "not at this size" in lines[1]
    assert "no: the judge cannot separate" in lines[2]
    assert "no: M0 cannot tell matched from mismatched pairs" in lines[3]
    assert "cut off m0 20/24" in lines[4] and "mostly cut-off answers" in lines[4]
    assert "fewer than three sizes" in lines[5]
    good = summary | {"judge_check": judge_verdict({"m2": judge_check(_judgments([1.0] * 20))})}
    assert "yes: the judge separates" in can_show(good)


def test_what_a_run_can_show_starts_with_the_backward_models_held_out_loss():
    from humpback_nb.nb.tables import backward_check, can_show

    learned = {"n": 4, "tokens": 40, "difference": -0.4, "interval": [-0.6, -0.2], "resolved": True}
    first = can_show({"backward_heldout": {"difference": learned}}).splitlines()[0]
    assert "M_yx better than the base model" in first and first.endswith("yes, and it does.")
    check = {"pairs": 4, "tokens": 40, "loss": {"base": 3.1, "backward": 2.7}, "difference": learned}
    assert "| M_yx - base | -0.400 | -0.600 to -0.200 | yes: M_yx better |" in backward_check(check)


def test_the_two_raters_side_by_side_say_when_they_cannot_be_ranked():
    from humpback_nb.nb.tables import rater_comparison

    comparison = {"pairs": 4, "max_new_tokens": 24, "logprob": {"per_second": 8.0, "scores": [3.1, 3.3, 2.9, 3.0]},
                  "generate": {"per_second": 0.5, "parse_rate": 0.0, "scores": [None] * 4},
                  "agreement": {"pairs": 0, "spearman": None, "same_rounded_score": None}}
    table = rater_comparison(comparison)
    assert "| logprob | 8.00 | 100% | 3.08 |" in table and "| generate | 0.50 | 0% | - |" in table
    assert "Agreement on the 0 pairs both scored" in table and "not computed" in table


def test_table8_and_figure3_carry_their_models_held_out_losses_with_intervals():
    from humpback_nb.nb.tables import scaling, tags

    better = {"n": 4, "tokens": 60, "difference": -0.12, "interval": [-0.2, -0.05], "resolved": True}
    noise = {"n": 4, "tokens": 60, "difference": 0.01, "interval": [-0.03, 0.05], "resolved": False}
    table8 = {"S_a+S_w": {"win_rate": 50.0, "se": 5.0, "wins": 3, "ties": 0, "losses": 3, "n": 6, "paper": 66.5},
              "heldout": {"m2 - m2_untagged": noise, "prompted": {"m2": "S_a+S_w", "m2_untagged": "none"}}}
    shown = tags(table8)
    assert "| m2 - m2_untagged | +0.010 | -0.030 to +0.050 | no: noise at this size |" in shown
    assert "the untagged model with none" in shown
    sources = {"A5": {"rule": "score 5", "available": 9, "alpha": None, "alpha_se": None,
                      "points": [{"n": 2, "heldout_loss": 2.1}, {"n": 4, "heldout_loss": 2.0}],
                      "heldout_vs_no_curation": {"2": noise, "4": better}},
               "no curation": {"rule": "every candidate", "available": 20, "alpha": None, "alpha_se": None,
                               "points": [{"n": 2, "heldout_loss": 2.09}, {"n": 4, "heldout_loss": 2.12}]}}
    shown = scaling(sources, {"Humpback": 6.95})
    assert "| data | N=2 | N=4 |" in shown and "| A5 | 2.100 | 2.000 |" in shown
    assert "| A5 - no curation, N=4 | -0.120 | -0.200 to -0.050 | yes: A5 better |" in shown
    assert "held-out" not in tags({"S_a+S_w": table8["S_a+S_w"]})  # a run made before the kit measured it
