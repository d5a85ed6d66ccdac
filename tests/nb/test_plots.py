"""The figures' axes start where a reader expects: a learning rate from 0 (the paper's decay to 0.9 of the start
looks as small as it is), scores on the rubric's whole 1-5 scale, win rates on 0-100% with 50% marked."""

import matplotlib

matplotlib.use("Agg")

from humpback_nb.nb import plots  # noqa: E402 (after the backend is chosen)


def test_the_learning_rate_axis_starts_at_zero():
    steps = [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 2e-4 - 2e-5 * s / 3} for s in range(1, 4)]
    fig = plots.loss_curves({"M0": {"steps": steps}})
    rate = fig.axes[1]
    assert rate.get_ylim()[0] == 0 and rate.get_ylim()[1] >= max(s["lr"] for s in steps)


def test_scores_are_drawn_on_the_whole_scale_and_win_rates_on_0_to_100():
    fig = plots.score_distributions({"seed": [3.1, 3.2], "shuffled": [3.0, None]})
    assert fig.axes[0].get_xlim() == (1, 5)
    points = [{"n": 4, "win_rate": 48.0, "se": 3.0}, {"n": 16, "win_rate": 52.0, "se": 3.0}]
    fig = plots.scaling_curves({"A5": {"points": points, "alpha": 2.9, "C": 44.0}})
    assert fig.axes[0].get_ylim() == (0, 100)
    assert any(list(line.get_ydata()) == [50, 50] for line in fig.axes[0].get_lines())
