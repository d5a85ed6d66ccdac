"""Causal attention on a CPU as two matrix products, for the kit's models there (`load_model` sets it).

torch's fused attention kernel for the CPU runs a 135M model's attention (64-wide heads, a few hundred tokens) at
some 20-70 GFLOP/s, where its matrix products run at 500+: attention took a quarter of a training step and a
third of a prompt's reading for a twentieth of the FLOPs. Written as QK^T, softmax and PV in bf16, as transformers'
own eager attention computes them (scores in the model's dtype, softmax accumulated in float32), with the query
heads of a key/value head stacked so that keys and values are never copied per head, forward and backward take a
third of the time. Causal attention without a mask, dropout or cache takes this path (training, and prompts
read padded on the right), and so does a decoding step (one query per row against its cached keys, a padding mask
at most); everything else goes to SDPA as before. `packed_attention` reads rows packed into one sequence, after a
prefix whose keys and values every row shares (the rater's rubric), a row at a time (`decode.packed_logits`).
`block_attention` is the kit's decoding step, a block of rows at a time over `decode.BlockCache`.
"""

from __future__ import annotations

import itertools

import torch

NAME = "humpback_cpu"
PACKED = "humpback_packed"  # rows packed into one sequence, after a prefix whose keys and values are held once
BLOCKS = "humpback_blocks"  # a decoding step over a cache of blocks of rows (decode.BlockCache)
prefix_layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # that prefix's (keys, values) by layer, while it runs
QUERY_BLOCK = 256  # packed_attention: a long row's queries this many at a time (256 beat 128 and whole rows)
MAX_LENGTH = 2048  # longer sequences go to SDPA's kernel: the scores would take length^2 memory per head
_masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: (output (batch, length, heads, head size), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, size = query.shape
    if length == 1 and dropout == 0 and query.device.type == "cpu" and _is_padding_mask(attention_mask, rows):
        return _one_query(query, key, value, attention_mask, scaling)
    if (attention_mask is not None or dropout > 0 or key.shape[2] != length or length > MAX_LENGTH
            or not getattr(module, "is_causal", True) or query.device.type != "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = heads // key.shape[1]  # query heads per key/value head
    scale = scaling if scaling is not None else size**-0.5
    stacked = (query * scale).reshape(rows, key.shape[1], groups * length, size)  # a group's heads one after another
    scores = torch.matmul(stacked, key.transpose(-1, -2)).view(rows, key.shape[1], groups, length, length)
    weights = torch.softmax(scores + _causal_mask(length, scores.dtype, scores.device), dim=-1)
    out = torch.matmul(weights.view(rows, key.shape[1], groups * length, length), value)
    return out.view(rows, heads, length, size).transpose(1, 2).contiguous(), None


def _is_padding_mask(mask: torch.Tensor | None, rows: int) -> bool:
    """True for no mask or a boolean (rows or 1, 1, 1, keys) mask: which cached keys each row may see."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
                            and mask.shape[0] in (1, rows))


def _one_query(query, key, value, attention_mask, scaling):
    """A decoding step: one new query per row against its cached keys, a query head group at a time."""
    rows, heads, _, size = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else size**-0.5
    scores = torch.matmul((query * scale).view(rows, kv_heads, heads // kv_heads, size), key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (rows, key/value heads, group, size)
    return out.view(rows, 1, heads, size), None


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, products=True, **kwargs):
    """A decoding step over `decode.BlockCache`: one query per row, each block of rows against its own keys and
    values (`key` and `value` are lists, a tensor per block, the rows one block after another), `attention_mask`
    the slots each row sees, (rows, 1, 1, the widest block's slots). With `products`, as two matrix products on the
    CPU (`_one_query`); else with SDPA's kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q, k, v, mask):
        if products and q.device.type == "cpu":
            return _one_query(q, k, v, mask, scaling)[0]
        return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)[0]

    if len(key) == 1:  # one block, as wide as the mask
        return attend(query, key[0], value[0], attention_mask), None
    rows, heads, _, size = query.shape
    out = query.new_empty(rows, 1, heads, size)
    first = 0
    for keys, values in zip(key, value, strict=True):
        end = first + keys.shape[0]
        out[first:end] = attend(query[first:end], keys, values, attention_mask[first:end, ..., : keys.shape[2]])
        first = end
    return out, None


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (length, dtype)
    if key not in _masks:
        if len(_masks) > 64:
            _masks.clear()
        _masks[key] = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
    return _masks[key]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     **kwargs):
    """Attention of rows packed one after another into one sequence (`decode.packed_logits`), the boundaries in
    `cu_seq_lens_q` as flash attention reads packed rows: each row's queries meet the keys of the prefix in
    `prefix_layers`, when there is one (held once for all rows), and causally their own; both sets of scores are
    normalised together, each as a matrix product in the model's dtype.

    A row at a time: a batch's scores at once (rows x heads x length x prefix + length) are a hundred megabytes
    after a 500-token rubric, and writing, masking and normalising them from memory took twice as long as a row's
    scores, which stay in the cache. Packed rows waste nothing on padding. A long row's queries go `QUERY_BLOCK` at a
    time, each block against the keys up to its own end only: the scores above the diagonal, which the causal mask
    would zero, are never computed (a 700-token prompt's attention in three blocks instead of one square)."""
    _, heads, _, size = query.shape
    kv_heads, groups = key.shape[1], heads // key.shape[1]
    prefix_keys, prefix_values = prefix_layers[module.layer_idx] if prefix_layers else (None, None)
    start = prefix_keys.shape[2] if prefix_keys is not None else 0
    scale = scaling if scaling is not None else size**-0.5
    spans = list(itertools.pairwise(cu_seq_lens_q.tolist()))  # (first, end) of each row
    causal = _causal_mask(min(QUERY_BLOCK, max(b - a for a, b in spans)), query.dtype, query.device)
    out = torch.empty_like(query[0])  # (heads, length, size)
    for a, b in spans:
        for first in range(a, b, QUERY_BLOCK):  # queries first:end of the row a:b see its keys a:end
            end = min(b, first + QUERY_BLOCK)
            n, seen = end - first, end - a
            stacked = (query[0, :, first:end] * scale).reshape(kv_heads, groups * n, size)  # by key/value head
            scores = query.new_empty(kv_heads, groups * n, start + seen)
            if start:
                torch.matmul(stacked, prefix_keys[0].transpose(-1, -2), out=scores[..., :start])
            torch.matmul(stacked, key[0, :, a:end].transpose(-1, -2), out=scores[..., start:])
            scores.view(kv_heads, groups, n, start + seen)[..., start + seen - n:] += causal[:n, :n]  # the diagonal
            weights = torch.softmax(scores, dim=-1)
            block = torch.matmul(weights[..., start:], value[0, :, a:end])
            if start:
                block += torch.matmul(weights[..., :start], prefix_values[0])
            out[:, first:end] = block.view(heads, n, size)
    return out.transpose(0, 1)[None].contiguous(), None


def _register(name: str, attention, mask) -> str:
    """Make `name` an attention implementation transformers' models can be set to; returns `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    return name


def register_packed() -> str:
    """The name of `packed_attention`, registered (no mask: each row causal by construction)."""
    return _register(PACKED, packed_attention, lambda *args, **kwargs: None)


def register_blocks(model) -> str:
    """The name of `block_attention` for `model`'s decoding steps, registered: with two matrix products where the
    model computes its attention as `causal_attention` does, else with SDPA's kernel (its mask comes from the
    cache, a 4D tensor the model passes on as it is)."""
    from functools import partial

    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation == NAME:
        return _register(BLOCKS, block_attention, sdpa_mask)
    return _register(f"{BLOCKS}_sdpa", partial(block_attention, products=False), sdpa_mask)


def use_cpu_attention(model) -> None:
    """Let `model` (on the CPU, with SDPA attention) compute causal attention as `causal_attention` does."""
    from transformers.masking_utils import sdpa_mask

    _register(NAME, causal_attention, sdpa_mask)  # the masks SDPA gets: none where causal alone will do
    if model.device.type == "cpu" and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
