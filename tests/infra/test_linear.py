"""Linear layers with their bf16 weights packed for oneDNN (infra/linear.py): the same products as nn.Linear, used
only inside the kit's inference scopes and without gradients, and packed anew when a weight changes; a gated SiLU
MLP's products with its activation and gating fused into them, the same MLP as its own forward."""

import weakref

import pytest
import torch
from torch import nn

from humpback_nb.config import ModelConfig
from humpback_nb.infra import linear
from humpback_nb.infra.decode import next_token_logits
from humpback_nb.infra.linear import GatedMLP, PackedLinear, inference, packing, use_packed_linear
from humpback_nb.infra.models import load_model

pytestmark = pytest.mark.skipif(not linear._supported(), reason="this torch has no oneDNN packed-linear ops")


def bf16_tolerance(reference: torch.Tensor) -> dict[str, float]:
    """assert_close's tolerance for two bf16 products of the same numbers by different kernels: each sums in float32
    in its own order and rounds to bf16, so outputs may part by a bf16 rounding (rtol) and, near zero, by float32
    sums of large terms in another order (atol: bf16's epsilon at the outputs' scale). A stale or wrong pack parts
    by the outputs' own size."""
    return {"rtol": 1.6e-2, "atol": torch.finfo(torch.bfloat16).eps * float(reference.abs().max())}


def layer(bias: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 160, bias=bias, dtype=torch.bfloat16))
    use_packed_linear(model)
    return model


def gated_mlp(act: str = "silu", seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=96, intermediate_size=160, hidden_act=act)).to(torch.bfloat16)
    for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        nn.init.normal_(projection.weight, std=0.1)
    return mlp


def zero_pack(module: nn.Module) -> None:
    """A pack of zeros in place of `module`'s real one: where the pack is used, the products are zeros."""
    mark, _ = linear._packs[module]
    linear._packs[module] = mark, torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(module.weight), 64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (3, 70, 96)])
def test_packed_products_equal_nn_linear(bias, shape):
    model = layer(bias)
    assert type(model[0]) is PackedLinear
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = nn.functional.linear(x, model[0].weight, model[0].bias)
        with packing(model):
            packed = model(x)
    assert model[0] in linear._packs
    assert packed.shape == plain.shape
    torch.testing.assert_close(packed, plain, **bf16_tolerance(plain))


@pytest.mark.parametrize("make, zeroed", [(layer, lambda model: model[0]), (gated_mlp, lambda mlp: mlp.up_proj)],
                         ids=["linear", "fused mlp"])
def test_the_pack_is_used_inside_the_scope_only_and_never_with_gradients(make, zeroed):
    model = make()
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with inference(model):
        model(x)
    zero_pack(zeroed(model))  # the MLP's fused products: up's pack gates every value
    with torch.inference_mode():
        with packing(model):
            assert not model(x).any()  # used in the scope
        assert model(x).any()  # not outside it
    with packing(model):
        out = model(x.requires_grad_())  # gradients wanted: the module's own forward
    assert out.any() and out.requires_grad
    out.float().sum().backward()
    assert x.grad is not None and x.grad.any()


@pytest.mark.parametrize("change", ["merge through .data", "in-place op on inner rows", "new tensor"])
def test_a_weight_changed_after_packing_is_packed_anew(change):
    model = layer()
    weight = model[0].weight
    x = torch.randn(6, 96, dtype=torch.bfloat16)
    with inference(model):
        model(x)
    if change == "merge through .data":  # how peft merges a LoRA adapter: no version counter sees it
        weight.data += torch.randn(160, 4, dtype=torch.bfloat16) @ torch.randn(4, 96, dtype=torch.bfloat16)
    elif change == "in-place op on inner rows":
        with torch.no_grad():
            weight[40:50].mul_(3)
    else:
        model[0].weight = nn.Parameter(torch.randn(160, 96, dtype=torch.bfloat16))
    with inference(model):
        plain = nn.functional.linear(x, model[0].weight)
        torch.testing.assert_close(model(x), plain, **bf16_tolerance(plain))


def test_a_scope_packs_its_own_model_only():
    one, other = layer(seed=1), layer(seed=2)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with inference(other):
        other(x)
    zero_pack(other[0])
    with inference(one):
        assert other(x).any()  # another model's pack (here a wrong one) is not used in this model's scope
        with inference(other):
            assert not other(x).any()


def test_only_plain_bf16_linear_layers_are_packed():
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16), nn.Linear(8, 8), nn.Embedding(4, 8))
    use_packed_linear(model)
    assert [type(m).__name__ for m in model] == ["PackedLinear", "Linear", "Embedding"]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]


@pytest.mark.parametrize("shape", [(1, 96), (2, 37, 96), (1, 600, 96)])
def test_a_gated_mlp_with_fused_products_equals_its_own_forward(shape):
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = gated_mlp()
    activations = []
    mlp.act_fn.register_forward_hook(lambda *args: activations.append(args))
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = mlp(x)  # transformers' forward: three products, SiLU and the product with up apart
        with packing(mlp):
            fused = mlp(x)
    assert len(activations) == 1  # SiLU ran apart once, for the plain forward; inside the scope oneDNN applied it
    assert isinstance(mlp, GatedMLP) and isinstance(mlp, LlamaMLP)
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert fused.shape == plain.shape
    torch.testing.assert_close(fused, plain, **bf16_tolerance(plain))


def test_only_gated_silu_mlps_of_packed_layers_are_fused():
    gelu = gated_mlp(act="gelu")
    use_packed_linear(gelu)
    assert type(gelu.gate_proj) is PackedLinear and not isinstance(gelu, GatedMLP)  # not SiLU: its own forward
    fp32 = gated_mlp().float()
    use_packed_linear(fp32)
    assert not isinstance(fp32, GatedMLP)  # its layers stay nn.Linear
    wrapped = gated_mlp()
    wrapped.gate_proj = nn.Sequential(wrapped.gate_proj)  # as an adapter wraps a layer
    use_packed_linear(wrapped)
    assert not isinstance(wrapped, GatedMLP)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with inference(wrapped):  # its own forward, with its layers' packs
        assert torch.equal(wrapped(x), wrapped.down_proj(torch.nn.functional.silu(wrapped.gate_proj(x))
                                                         * wrapped.up_proj(x)))


@pytest.mark.slow
def test_a_bf16_model_reads_and_merges_as_without_packs(embedded_checkpoint, monkeypatch):
    # The embedded model in bf16, as the kit runs it on a CPU: next-token logits with the packs are those without
    # within bf16's tolerance (oneDNN's packed product and torch's linear sum in their own orders, which differ by
    # CPU), and the same argmax wherever the margin decides it. After a LoRA adapter is merged into the weights, the
    # packs follow the merged weights: the logits are, bit for bit, those of packs made afresh from them.
    from numerics import logit_tolerance, margins
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(ModelConfig(dtype="bfloat16"))
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # a model that only trains stays as it is
    rows = [tokenizer(t)["input_ids"] for t in ("Whales sing", "The song of the humpback whale carries far")]

    def without_packs() -> torch.Tensor:
        with monkeypatch.context() as m:  # no pack is made, so none is found
            m.setattr(linear, "_packs", weakref.WeakKeyDictionary())
            m.setattr(linear, "_refresh", lambda module: None)
            return next_token_logits(model, rows, tokenizer.pad_token_id)

    def assert_alike(packed: torch.Tensor, plain: torch.Tensor) -> float:
        tolerance = logit_tolerance(torch.bfloat16, plain)
        assert float((packed.float() - plain.float()).abs().max()) <= tolerance
        decided = margins(plain) > 2 * tolerance
        assert torch.equal(packed.argmax(-1)[decided], plain.argmax(-1)[decided])
        return tolerance

    packed = next_token_logits(model, rows, tokenizer.pad_token_id)
    assert_alike(packed, without_packs())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers + 1
    assert all(isinstance(layer.mlp, GatedMLP) for layer in model.model.layers)  # SiLU and gating fused
    assert all(m in linear._packs for m in model.modules() if isinstance(m, PackedLinear))
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model = lora.merge_and_unload()
    merged = next_token_logits(model, rows, tokenizer.pad_token_id)
    tolerance = assert_alike(merged, without_packs())
    assert float((merged.float() - packed.float()).abs().max()) > 2 * tolerance  # the merge moved the logits
    linear._packs.clear()  # every pack made anew from the merged weights: the same kernel on the same numbers
    assert torch.equal(next_token_logits(model, rows, tokenizer.pad_token_id), merged)


def test_a_layer_cast_or_moved_after_loading_runs_as_nn_linear():
    model = layer()
    x = torch.randn(3, 96)
    with inference(model):
        model(x.bfloat16())
        assert model[0] in linear._packs
    model.float()
    with inference(model):
        torch.testing.assert_close(model(x), nn.functional.linear(x, model[0].weight))
    assert model[0] not in linear._packs
