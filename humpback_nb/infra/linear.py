"""Linear layers on a CPU with their bf16 weights packed once for oneDNN, for the kit's inference loops.

torch's bf16 `linear` on a CPU hands oneDNN each weight in its plain (out, in) layout, and oneDNN reorders it into
its own blocked layout at every call: for the few rows of a decoding step that costs nearly as much as the product.
Packed once (`torch.ops.mkldnn._reorder_linear_weight`, as torch.compile's CPU backend packs frozen weights), the
211 matrix products of a decoding step of the demo model took 35 -> 24 ms for 24 rows, 62 -> 50 ms for 64 and
352 -> 332 ms for 512 (weights from memory, not from the cache), with the same values. Whole loops on a 2-core AMD
EPYC VM, interleaved in one process: 24 demo answers of M2 5.40 -> 4.74 s (medians of 3), the instructions of 64
segments 34.5 -> 32.0 s (medians of 2), the same text; prompts read without decoding (rater, judge) gain nothing.

Every inference loop of the kit runs inside `inference(model)`, which makes the model's bf16 linear layers on the CPU
`PackedLinear`s (their weights and state dict unchanged) and uses their packs there only, never with gradients.
fp32 and GPUs keep `nn.Linear`, and so does a model that only trains: with the subclass its steps ran a few percent
slower (4-step trainings interleaved in one process: 357 against 383 tokens/s, medians of 3; 386 against 398,
medians of 5), and a pack saved only 3-4% of the products at training's shapes, forward and backward.

On entering, each pack is checked against its weight: where it lives, its version (an optimizer step, any in-place
torch op) and the sums of its first and last rows (a LoRA merge writes through `.data`, which no version sees); a
weight that changed is packed anew. A write through `.data` that leaves both sums as they were is the one change it
cannot see.

A gated MLP (LLaMA's `down(silu(gate(x)) * up(x))`) multiplies by its packs with the SiLU and the product with `up`
done by oneDNN as it writes each product's output (`GatedMLP`): reading 64 backward prompts of the demo model in
groups of 8 (~4,200 tokens a group) took 25.6 s instead of 27.4 (medians of 4, interleaved in one process, AMD
EPYC VM), the activation's and the product's passes over 4,200 x 1,536 values no longer going through memory. A
decoding step's 64 rows and 512-row blocks run as fast either way.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

import torch
from torch import nn

_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PackedLinear -> (fingerprint, packed weight)
_depth: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PackedLinear -> `packing` scopes it is inside
ROWS_HINT = 64  # oneDNN packs for this many rows; 24, 64 and 512 gave times within 5% at every batch size


class PackedLinear(nn.Linear):
    """`nn.Linear` that multiplies by its packed weight inside `packing`, without gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = _live_pack(self)
        if pack is None or torch.is_grad_enabled() or x.dtype != torch.bfloat16:
            return super().forward(x)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), pack, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def _live_pack(layer: nn.Module) -> torch.Tensor | None:
    """`layer`'s packed weight while a `packing` scope of its model is open, else None."""
    pack = _packs.get(layer) if _depth.get(layer) else None
    return None if pack is None else pack[1]


# transformers' MLPs that compute down(act_fn(gate(x)) * up(x)), with SiLU as their act_fn in LLaMA-family configs
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class GatedMLP(nn.Module):
    """A gated SiLU MLP whose three products, inside `packing` and without gradients, take their packed weights, with
    SiLU fused into the gate's product and the product with the gate fused into up's (oneDNN post-ops); elsewhere
    the MLP's own forward. Mixed into the MLP's class (`use_packed_linear`)."""

    gate_proj: PackedLinear
    up_proj: PackedLinear
    down_proj: PackedLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = [_live_pack(layer) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
        if None in packs or torch.is_grad_enabled() or x.dtype != torch.bfloat16:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        gate = torch.ops.mkldnn._linear_pointwise(flat, packs[0], self.gate_proj.bias, "swish", [], "")  # silu
        hidden = torch.ops.mkldnn._linear_pointwise.binary(flat, gate, packs[1], self.up_proj.bias, "mul")
        out = torch.ops.mkldnn._linear_pointwise(hidden, packs[2], self.down_proj.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def use_packed_linear(model: nn.Module) -> None:
    """Make the bf16 `nn.Linear` layers of a CPU model `PackedLinear`s, and its gated SiLU MLPs `GatedMLP`s (their
    weights and state dict unchanged); `packing` does it on entering."""
    if not _supported():
        return
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.bfloat16:
            module.__class__ = PackedLinear
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            module.__class__ = _gated(type(module))


@functools.cache
def _gated(cls: type) -> type:
    """`cls` with `GatedMLP`'s forward, one class for all its modules."""
    return type(f"Packed{cls.__name__}", (GatedMLP, cls), {"__module__": __name__})


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ in GATED_MLPS and cls.__module__.startswith("transformers.models.")
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(type(getattr(module, name, None)) is PackedLinear for name in ("gate_proj", "up_proj",
                                                                                   "down_proj")))


@contextmanager
def packing(model: nn.Module):
    """Within this, `model`'s `PackedLinear`s multiply by packed weights (packed or packed anew on entering), and
    no other model's."""
    use_packed_linear(model)
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    for module in layers:
        if not _depth.get(module):
            _refresh(module)
        _depth[module] = _depth.get(module, 0) + 1
    try:
        yield
    finally:
        for module in layers:
            _depth[module] -= 1


@contextmanager
def inference(model: nn.Module):
    """`torch.inference_mode()` with `model`'s packed weights: how the kit runs a model without gradients."""
    with torch.inference_mode(), packing(model):
        yield


def _fingerprint(weight: torch.Tensor) -> tuple:
    with torch.no_grad():
        ends = weight[[0, -1]].sum(-1, dtype=torch.float32).tolist()
    return weight.data_ptr(), weight._version, tuple(weight.shape), *ends


def _refresh(module: PackedLinear) -> None:
    weight = module.weight.data
    if type(weight) is not torch.Tensor or weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        _packs.pop(module, None)  # sharded (FSDP's DTensor), moved or cast since: nn.Linear's own forward
        return
    mark = _fingerprint(module.weight)  # the parameter: `.data` is an alias with a version counter of its own
    pack = _packs.get(module)
    if pack is None or pack[0] != mark:
        _packs[module] = mark, torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)


@functools.cache
def _supported() -> bool:
    """torch has oneDNN with its packed-linear ops (a CPU build with mkldnn, as the kit's pinned torch is)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
