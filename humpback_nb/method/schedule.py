"""The paper's training schedule, as plain arithmetic (no torch): how many steps of which batch for N examples
(section 4.1's data-scaling runs), and the learning rate that decays linearly to its final value."""

from __future__ import annotations

import math

# The paper's data-scaling runs (section 4.1): examples N -> (batch size, steps).
PAPER_STEPS = {100: (8, 30), 800: (8, 300), 1600: (8, 600), 3200: (32, 500), 6400: (32, 600),
               12800: (32, 600), 25600: (32, 1200), 51200: (32, 1600)}


def paper_schedule(n: int) -> tuple[int, int]:
    """(batch size, steps) for n examples by the paper's rule: batch 8 below 3,000 examples, else 32;
    steps interpolated in log N between the paper's runs, held at the ends."""
    batch = 8 if n < 3000 else 32
    points = sorted(PAPER_STEPS.items())
    if n <= points[0][0]:
        return batch, points[0][1][1]
    for (n0, (_, s0)), (n1, (_, s1)) in zip(points, points[1:], strict=False):
        if n <= n1:
            t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return batch, round(s0 + t * (s1 - s0))
    return batch, points[-1][1][1]


def linear_to_final(total_steps: int, learning_rate: float, final_learning_rate: float):
    """Multiplier of the learning rate at each step: 1 at the first, final/initial at the last."""
    ratio = final_learning_rate / learning_rate
    last = max(1, total_steps - 1)

    def factor(step: int) -> float:
        return 1.0 - (1.0 - ratio) * min(step, last) / last

    return factor
