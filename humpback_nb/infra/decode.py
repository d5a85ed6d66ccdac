"""The kit's own decoding loops, which the local engine (engines.LocalEngine) runs: nothing in the method calls them.

A batch of prompts (`generate_batch`, sorted by length by the engine) is decoded with `decode`: the prompts are
read a few rows at a time into a cache of blocks of rows of like length (`BlockCache`), rows that finish leave the
batch, and nucleus sampling sorts only the likely tokens. `logits_after_prefix` reads many prompts that open with one
shared prefix (its keys and values computed once, `shared_prefix`) for their next token's logits.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import Cache

from humpback_nb.config import GenerateConfig
from humpback_nb.infra.guard import refuse_compute
from humpback_nb.infra.linear import inference


def generate_batch(model, tokenizer, batch: list[list[int]], settings: GenerateConfig, max_new_tokens: int,
                   seed: int, greedy: bool, stops: list[int]) -> list[dict[str, Any]]:
    """{"text", "prompt_tokens", "new_tokens", "finished", "tokens"} of each prompt (token ids) of one batch: the
    new tokens ("tokens") without the stop token, as text and counted."""
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    rows = decode(model, input_ids, attention, max_new_tokens, stops,
                  temperature=settings.temperature, top_p=1.0 if greedy else settings.top_p,
                  greedy=greedy, generator=generator)
    results = []
    for ids, row in zip(batch, rows, strict=True):
        finished = bool(row) and row[-1] in stops
        new = row[:-1] if finished else row
        results.append({"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": len(ids),
                        "new_tokens": len(new), "finished": finished, "tokens": new})
    return results


# -- one forward pass: the next token's logits ---------------------------------------------------
def next_token_logits(model, rows: Sequence[Sequence[int]], pad_id: int, cache=None) -> torch.Tensor:
    """Logits of the token after each row of ids, for all rows in one forward pass (after `cache`, the keys
    and values of a prefix every row shares, when given).

    On a CPU the rows are packed one after another (`packed_logits`). Elsewhere they are padded on the right and
    need no attention mask: attention is causal, so no real token sees the pads after it. The vocabulary head, a
    fifth of a small model's work per token, runs at the rows' last positions only.
    """
    if cache is None and model.device.type == "cpu":
        return packed_logits(model, rows)
    ids, keep, where = _right_padded(rows, pad_id, model.device)
    with inference(model):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                       logits_to_keep=keep).logits
    return logits[torch.arange(len(rows), device=model.device), where]


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids padded on the right, each distinct last position once, which of them is each row's): a forward pass
    with `logits_to_keep=keep` then gives row i's next-token logits at [i, where[i]]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    keep, where = torch.unique(torch.tensor([len(r) - 1 for r in rows], device=device), return_inverse=True)
    return ids, keep, where


# -- many prompts packed into one sequence, after one shared prefix -------------------------------
def prefix_cache(model, prefix_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of a prefix, layer by layer, as `packed_logits` reads them."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with inference(model):
        model(input_ids=torch.tensor([list(prefix_ids)], device=model.device), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def packed_logits(model, rows: Sequence[Sequence[int]], prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  cache=None) -> torch.Tensor:
    """`next_token_logits` of each row, read packed: the rows one after another in one sequence, no padding, each
    attending causally to itself and to `prefix` (`prefix_cache`: keys and values every row sees, held once),
    the vocabulary head at each row's last token only. With `cache` (a transformers DynamicCache), the packed
    keys and values are kept there: row i's are at `cu_seq_lens[i]:cu_seq_lens[i + 1]`.

    Padding rows to one width cost a third more tokens for the kit's prompts, and a cache copied for every row
    with a mask over prefix and row, the usual way, spent more time in SDPA's kernel on a CPU than the whole
    model spent in its matrix products (`attention.packed_attention`).
    """
    from humpback_nb.infra import attention

    start = prefix[0][0].shape[2] if prefix else 0
    lengths = torch.tensor([len(r) for r in rows])
    bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    ids = torch.tensor([[token for row in rows for token in row]], device=model.device)
    position = torch.cat([torch.arange(start, start + n) for n in lengths.tolist()])[None].to(model.device)
    before = model.config._attn_implementation
    attention.prefix_layers[:] = prefix or []
    try:
        model.set_attn_implementation(attention.register_packed())
        with inference(model):
            logits = model(input_ids=ids, position_ids=position, past_key_values=cache, use_cache=cache is not None,
                           logits_to_keep=(bounds[1:] - 1).to(model.device), cu_seq_lens_q=bounds).logits
    finally:
        model.set_attn_implementation(before)
        attention.prefix_layers.clear()
    return logits[0]


def shared_prefix(model, prefix_ids: Sequence[int]):
    """The keys and values of a prefix many prompts share (the rater's rubric, the judge's opening), for
    `logits_after_prefix`: layer by layer for the CPU's packed attention, else a transformers cache that each batch
    copies for its rows."""
    if model.device.type == "cpu":
        return prefix_cache(model, prefix_ids)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(prefix_ids)], device=model.device), use_cache=True).past_key_values


def logits_after_prefix(model, prefix_ids: Sequence[int], rests: Sequence[Sequence[int]], prefix, pad_id: int
                        ) -> torch.Tensor:
    """Logits of the next token after each prompt `prefix_ids + rest`, in one batch: the rests read after `prefix`
    (`shared_prefix(model, prefix_ids)`), or each whole prompt when `prefix` is None."""
    if prefix is None:
        return next_token_logits(model, [list(prefix_ids) + list(r) for r in rests], pad_id)
    if isinstance(prefix, list):
        return packed_logits(model, rests, prefix)
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(len(rests))
    return next_token_logits(model, rests, pad_id, cache=cache)


# -- what decoding took: prompt reading and steps, for `humpback gpu-check` and the plan's calibration ------------
@dataclass
class DecodeTiming:
    """Wall-clock of `decode` calls: the prompts read (prefill) and the steps after, each step one new token for
    every row still writing (its forward pass, sampling and bookkeeping, up to the host's wait for the device)."""

    prompts: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    row_steps: int = 0  # rows fed, summed over the steps: new tokens written, the last token of each row aside
    context_steps: float = 0.0  # cache slots a step's attention reads per row (padding too), summed over the steps

    def to_dict(self) -> dict[str, float]:
        """The sums, and per step: seconds, rows and context; tokens a second of prompt reading and of writing."""
        steps = max(1, self.steps)
        return asdict(self) | {
            "seconds_per_step": self.step_seconds / steps, "rows_per_step": self.row_steps / steps,
            "context_per_step": self.context_steps / steps,
            "prefill_tokens_per_second": self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0,
            "new_tokens_per_second": self.row_steps / self.step_seconds if self.step_seconds else 0.0}


_timings: list[DecodeTiming] = []


@contextlib.contextmanager
def timing() -> Iterator[DecodeTiming]:
    """Sum the wall-clock of every `decode` call in this process while the block runs. Timed calls wait for the
    device after the prompts are read (one more synchronisation per batch); untimed calls do not."""
    record = DecodeTiming()
    _timings.append(record)
    try:
        yield record
    finally:
        _timings.remove(record)


def _record(**amounts: float) -> None:
    for record in _timings:
        for key, value in amounts.items():
            setattr(record, key, getattr(record, key) + value)


# -- the decoding loop ---------------------------------------------------------------------------
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           stop_ids: int | Sequence[int],
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           generator: torch.Generator | None = None, prefill_rows: int = 8) -> list[list[int]]:
    """New tokens of each left-padded row (ending with a stop id, an EOS or end-of-turn token, where the row
    finished).

    The prompts are read `prefill_rows` at a time, each group cut to its own longest prompt (long prompts
    in big batches cost more per token on a CPU). Their keys and values go into a `BlockCache`: the rows, longest
    prompt first, in a few blocks of like length, each padded to its own longest prompt only, with room for a few
    new tokens at a time, so a step writes one slot instead of copying the whole cache and reads little padding.
    Each step feeds one token per row still writing; finished rows leave the batch once a sixteenth of it has
    finished (`LEAVE`). Greedy decoding picks the argmax, as `model.generate(do_sample=False)` does; sampling keeps
    the nucleus of `sample_top_p`.
    """
    from humpback_nb.infra.attention import register_blocks

    refuse_compute("generation")
    greedy = greedy or temperature == 0  # temperature 0 is the limit of sampling: the most likely token
    rows, width = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(-1).tolist()
    order = sorted(range(rows), key=lambda i: -lengths[i])  # the engine's batches come sorted so: kept as they are
    prompts = [input_ids[i, width - lengths[i]:].tolist() for i in order]
    written: list[list[int]] = [[] for _ in range(rows)]
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=device)
    started = time.perf_counter()
    before = model.config._attn_implementation
    with inference(model):
        cache, logits = _prefill(model, prompts, prefill_rows)
        if _timings:
            float(logits[0, 0])  # wait for the device: the prompts are read
            _record(prompts=rows, prefill_tokens=sum(lengths), prefill_seconds=time.perf_counter() - started)
        started, steps, row_steps, context_steps = time.perf_counter(), 0, 0, 0
        position = torch.tensor([[len(p) - 1] for p in prompts], device=device)
        alive = torch.tensor(order, device=device)  # row of `written` for each row of the batch
        writing = torch.ones(rows, dtype=torch.bool, device=device)
        try:
            model.set_attn_implementation(register_blocks(model))
            for step in range(max_new_tokens):
                chosen = logits.argmax(-1) if greedy else sample_top_p(logits, temperature, top_p, generator)
                for row, token, live in zip(alive.tolist(), chosen.tolist(), writing.tolist(), strict=True):
                    if live:
                        written[row].append(token)
                writing &= ~torch.isin(chosen, stops)
                if step == max_new_tokens - 1 or not bool(writing.any()):
                    break
                if int((~writing).sum()) * LEAVE >= len(alive):  # drop the finished rows
                    keep = writing.nonzero().flatten()
                    cache.keep(keep)
                    alive, chosen, writing, position = alive[keep], chosen[keep], writing[keep], position[keep]
                position = position + 1
                logits = model(input_ids=chosen[:, None], attention_mask=cache.mask, position_ids=position,
                               past_key_values=cache, use_cache=True).logits[:, -1]
                steps, row_steps, context_steps = steps + 1, row_steps + len(alive), context_steps + cache.slots_read()
                cache.advance()
        finally:
            model.set_attn_implementation(before)
    if _timings:  # the last step's tokens were read back (`tolist`): the device is done
        _record(steps=steps, step_seconds=time.perf_counter() - started, row_steps=row_steps,
                context_steps=context_steps)
    return written


def _prefill(model, prompts: list[list[int]], prefill_rows: int) -> tuple[BlockCache, torch.Tensor]:
    """(a `BlockCache` holding every prompt, the logits after each prompt), the prompts (token ids) longest first.

    Each group of rows is read without padding or an attention mask: packed on a CPU (`packed_logits`; batches of
    long prompts read padded spent a third of their time on attention scores too large for the cache), padded on the
    right elsewhere (causal attention: no real token sees the pads after it). The keys and values then go into the
    cache, where decoding reads them."""
    from transformers import DynamicCache

    cache = BlockCache([len(p) for p in prompts])
    logits = []
    for start in range(0, len(prompts), prefill_rows):
        group = prompts[start : start + prefill_rows]
        part = DynamicCache(config=model.config)
        if model.device.type == "cpu":
            logits.append(packed_logits(model, group, cache=part))
            ends = list(itertools.accumulate(len(p) for p in group))
            spans = [(0, end - len(p), end) for p, end in zip(group, ends, strict=True)]  # (row, from, to) in part
        else:
            ids, keep, where = _right_padded(group, 0, model.device)
            out = model(input_ids=ids, past_key_values=part, use_cache=True, logits_to_keep=keep).logits
            logits.append(out[torch.arange(len(group), device=model.device), where])
            spans = [(j, 0, len(p)) for j, p in enumerate(group)]
        for number, filled in enumerate(part.layers):
            for i, (row, a, b) in enumerate(spans, start=start):
                cache.put(number, i, filled.keys[row, :, a:b], filled.values[row, :, a:b])
    cache.advance(0)
    return cache, torch.cat(logits)


LEAVE = 16  # finished rows leave the batch once 1 / LEAVE of it has finished (blocks without them are not copied)
GROW = 32  # new-token slots a block gets at a time: a step reads at most this many not yet written
BLOCK_COST = 2048  # what a block of its own costs a step's attention, in slots of one row read (docs/performance.md)


class BlockCache(Cache):
    """Keys and values of a decoding batch whose rows are sorted by prompt length, longest first: the rows in a few
    blocks of like length, each block's keys (and values) one tensor of (rows, key/value heads, slots, head size),
    its prompts left-padded to its own longest, then slots for the new tokens, `GROW` at a time.

    A step's attention reads all of a block's slots (`attention.block_attention`), masked by `mask`: torch's
    batched product reads a contiguous tensor at twice the speed of a slice of one, so a block holds no more slots
    than it reads. One tensor for the whole batch, left-padded to its longest prompt with every new token's slot
    ahead, read a third padding for the kit's backward prompts (189 to 807 tokens).
    The blocks are cut where the padding saved pays for another block's products (`blocks`).
    """

    def __init__(self, lengths: Sequence[int]):
        super().__init__(layers=[])
        self.lengths = list(lengths)
        self.spans = blocks(self.lengths, BLOCK_COST)  # (first row, end) of each block
        self.widths = [self.lengths[a] for a, _ in self.spans]  # each block's longest prompt: its first row's
        self.room = GROW  # slots for new tokens in each block
        self.written = 0  # new tokens in the cache, the same for every row
        self.keys: list[list[torch.Tensor]] = []  # by layer, then by block
        self.values: list[list[torch.Tensor]] = []
        self.mask: torch.Tensor | None = None  # (rows, 1, 1, slots): the slots each row's next token sees

    def put(self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prompt's keys and values, (key/value heads, its length, head size), for one layer."""
        if layer == len(self.keys):
            shape = [[e - a, keys.shape[0], w + self.room, keys.shape[-1]]
                     for (a, e), w in zip(self.spans, self.widths, strict=True)]
            self.keys.append([keys.new_zeros(s) for s in shape])  # zeros, not garbage: a padding slot's weight is 0
            self.values.append([values.new_zeros(s) for s in shape])
        block = next(b for b, (a, e) in enumerate(self.spans) if a <= row < e)
        first, width = self.spans[block][0], self.widths[block]
        self.keys[layer][block][row - first, :, width - keys.shape[1]:width] = keys
        self.values[layer][block][row - first, :, width - keys.shape[1]:width] = values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Write a step's keys and values (rows, key/value heads, 1, head size) into the next slot of each block;
        (keys, values) of the layer, a tensor per block."""
        for (a, e), width, keys, values in zip(self.spans, self.widths, self.keys[layer_idx], self.values[layer_idx],
                                               strict=True):
            keys[:, :, width + self.written] = key_states[a:e, :, 0]
            values[:, :, width + self.written] = value_states[a:e, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, tokens: int = 1) -> None:
        """After a step: `tokens` more written; make room for the next (`GROW` slots more where none is left), and
        the mask of what it sees."""
        self.written += tokens
        if self.written == self.room:
            self.room += GROW
            for layer in (*self.keys, *self.values):
                layer[:] = [torch.cat([t, t.new_zeros(*t.shape[:2], GROW, t.shape[3])], dim=2) for t in layer]
        self._mask()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices of the batch, in order) in every block; blocks left empty go."""
        kept = rows.tolist()
        chosen = [[r - a for r in kept if a <= r < e] for a, e in self.spans]
        live = [b for b, c in enumerate(chosen) if c]
        for layer in (*self.keys, *self.values):  # a block that keeps all its rows is not copied
            layer[:] = [layer[b] if len(chosen[b]) == len(layer[b]) else
                        layer[b][torch.tensor(chosen[b], device=layer[b].device)] for b in live]
        counts = [len(chosen[b]) for b in live]
        ends = list(itertools.accumulate(counts))
        self.spans = [(end - n, end) for n, end in zip(counts, ends, strict=True)]
        self.widths = [self.widths[b] for b in live]
        self.lengths = [self.lengths[r] for r in kept]
        self._mask()

    def slots_read(self) -> float:
        """Slots a step's attention reads, per row (padding and the slots not yet written included)."""
        rows = sum(e - a for a, e in self.spans)
        return sum((e - a) * (w + self.room) for (a, e), w in zip(self.spans, self.widths, strict=True)) / rows

    def _mask(self) -> None:
        device = self.keys[0][0].device
        width = torch.tensor([w for (a, e), w in zip(self.spans, self.widths, strict=True) for _ in range(a, e)],
                             device=device)
        first = width - torch.tensor(self.lengths, device=device)
        slot = torch.arange(max(self.widths) + self.room, device=device)
        self.mask = ((slot >= first[:, None]) & (slot <= (width + self.written)[:, None]))[:, None, None]


def blocks(lengths: Sequence[int], cost: int) -> list[tuple[int, int]]:
    """(first, end) of each block of rows, the rows' `lengths` sorted longest first: the cut that reads the fewest
    slots, each block costing `cost` slots more (a block's slots: its rows times its longest prompt)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[e]: the cheapest blocks of rows :e
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(end):
            value = best[first] + (end - first) * lengths[first] + cost
            if value < best[end]:
                best[end], cut[end] = value, first
    spans, end = [], n
    while end:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, token ids) of each row's nucleus: the fewest most likely tokens whose probability reaches
    `top_p`, as transformers' top-p sampling keeps it; the other weights are 0, and columns past the widest
    nucleus are dropped.

    Only the `candidates` most likely tokens are sorted; where they hold less than `top_p` of a row's mass, 16
    times as many, and then the whole vocabulary, so the nucleus is exact either way.
    """
    vocabulary = probs.shape[-1]
    for k in (candidates, 16 * candidates, vocabulary):
        top, index = probs.topk(min(k, vocabulary), dim=-1)
        if k >= vocabulary or not bool((top.sum(-1) < top_p).any()):
            break
    weights = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)  # drop tokens once likelier ones reach top_p
    width = max(1, int((weights > 0).sum(-1).max()))  # sorted: each row's nucleus is a prefix of its columns
    return weights[:, :width], index[:, :width]


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, sampled at `temperature` from the nucleus of `top_p` (all tokens when top_p = 1)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    weights, index = nucleus(probs, top_p)
    return index.gather(-1, torch.multinomial(weights, 1, generator=generator)).squeeze(-1)
