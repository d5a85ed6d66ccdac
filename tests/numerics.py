"""Comparing two code paths that compute the same model: a tolerance from the dtype, and greedy text compared only
where the logits decide it.

Two paths over the same weights (plain transformers and the kit's loop, packed rows and one row alone, oneDNN's
packed weights and plain `linear`) sum in different orders, and the two CPU kinds CI runs on (a Xeon with AMX, an
EPYC without) round bf16 differently again. So logits are compared within `logit_tolerance`, and a greedy token is
compared only where the reference's top two logits are further apart than twice that: there both paths must pick
it on any CPU. After the first step that is closer than that, two correct paths may write different text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# How many of the dtype's epsilons (at the logits' largest magnitude) two paths' logits may part for a model of
# some 30 layers like the embedded one. float32: every layer sums products of ~500-1,500 terms in a different
# order, each sum off by ~sqrt(terms) roundings, compounding over the layers: 2^10 (measured: up to 26, kit
# against plain transformers on a 2-core Xeon with AMX). bfloat16: oneDNN accumulates in float32, so what differs
# is each layer's output rounded to bf16, a few roundings compounding over the layers: 2^3 (measured: up to 2.8).
EPSILONS = {torch.float32: 2**10, torch.bfloat16: 2**3}


def logit_tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """How far two code paths' logits for the same weights in `dtype` may part, at the scale of `logits`."""
    return EPSILONS[dtype] * torch.finfo(dtype).eps * float(logits.abs().max())


def margins(logits: torch.Tensor) -> torch.Tensor:
    """Each row's top logit minus its second."""
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def decided_steps(logits: torch.Tensor, tolerance: float) -> int:
    """How many steps of a greedy path come before its first near tie (a top-2 margin within 2 x `tolerance`):
    the steps that any path within `tolerance` of these logits writes alike."""
    close = (margins(logits) <= 2 * tolerance).nonzero()
    return int(close[0, 0]) if len(close) else len(logits)


def assert_same_greedy_path(theirs: Sequence[int], their_logits: torch.Tensor, kit_logits: torch.Tensor,
                            ours: Sequence[int], tolerance: float) -> int:
    """Check the kit's greedy tokens `ours` against a reference greedy path `theirs`.

    `their_logits[t]` are the reference's logits before token t, and `kit_logits[t]` the kit's logits after the
    same prefix (teacher-forced on `theirs`). The logits must agree within `tolerance`; the kit's argmax must be
    the reference's token at every step whose margin decides it; the kit's free-running tokens must equal the
    reference's up to the first near tie (and all of them, stop included, when there is none). Returns how many
    free-running tokens that compared.
    """
    their_logits, kit_logits = their_logits.float(), kit_logits.float()
    assert their_logits.shape == kit_logits.shape == (len(theirs), their_logits.shape[-1])
    worst = float((their_logits - kit_logits).abs().max())
    assert worst <= tolerance, f"logits part by {worst:.3g}, more than the tolerance {tolerance:.3g}"
    decided = (margins(their_logits) > 2 * tolerance).nonzero().flatten().tolist()
    picked = kit_logits.argmax(-1).tolist()
    assert all(picked[t] == theirs[t] for t in decided), [(t, picked[t], theirs[t]) for t in decided]
    steps = decided_steps(their_logits, tolerance)
    assert list(ours[:steps]) == list(theirs[:steps]), (steps, list(ours), list(theirs))
    if steps == len(theirs):
        assert list(ours) == list(theirs)
    return steps
