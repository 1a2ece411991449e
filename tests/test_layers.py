"""Single-process tests of the BD-LoRA layer and of adapters injected into a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bdlora import (
    BDLoraConfig,
    BDLoraLinear,
    Role,
    apply_bdlora,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
)
from bdlora.layers import block_diag_matmul, expand_block_diag
from bdlora.model import bdlora_layers
from tests.conftest import COLUMN_LEAVES, logits, randomize_lora_b, tiny_model

# -- block-diagonal matmul ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lead", "nblocks", "n", "m"),
    [((5,), 1, 3, 4), ((5,), 2, 3, 4), ((2, 3), 4, 2, 5), ((2, 1, 3), 2, 6, 3), ((7,), 8, 1, 1)],
)
def test_block_diag_matmul_equals_dense_block_diag(lead, nblocks, n, m):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, nblocks * m, generator=gen, requires_grad=True)
    w = torch.randn(nblocks * n, m, generator=gen, requires_grad=True)
    out = block_diag_matmul(x, w, nblocks)
    expected = x @ torch.block_diag(*w.chunk(nblocks, 0)).T
    assert out.shape == (*lead, nblocks * n)
    assert_close(out, expected)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (x, w), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, w), grad_out)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


def test_expand_block_diag_places_blocks_on_the_diagonal():
    w = torch.arange(24.0).view(6, 4)  # 2 blocks of (3, 4)
    dense = expand_block_diag(w, 2)
    assert dense.shape == (6, 8)
    assert_close(dense[:3, :4], w[:3])
    assert_close(dense[3:, 4:], w[3:])
    assert not dense[:3, 4:].any() and not dense[3:, :4].any()


# -- one layer ---------------------------------------------------------------------------------

D_IN, D_OUT = 12, 8


def make_layer(
    role: Role, rank: int = 4, nblocks: int = 2, alpha: float = 6.0, dropout: float = 0.0, bias: bool = True
) -> BDLoraLinear:
    torch.manual_seed(0)
    layer = BDLoraLinear(nn.Linear(D_IN, D_OUT, bias=bias), role)
    layer.add_adapter("a", rank, nblocks, alpha / rank, dropout)
    fill_random(layer, "a", seed=1)
    return layer


@torch.no_grad()
def fill_random(layer: BDLoraLinear, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for factor in (layer.lora_A[name], layer.lora_B[name]):
        factor.copy_(torch.randn(factor.shape, generator=gen))


def dense_factors(layer: BDLoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as dense LoRA matrices, the packed factor expanded with torch.block_diag."""
    a, b, n = layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.local_nblocks[name]
    if layer.role is Role.COLUMN:
        return a, torch.block_diag(*b.chunk(n, 0))
    return torch.block_diag(*a.chunk(n, 0)), b


def dense_forward(layer: BDLoraLinear, x: torch.Tensor, name: str = "a") -> torch.Tensor:
    """``W x + b + scale * B_dense A_dense x``."""
    w, bias = layer.base_layer.weight.detach(), layer.base_layer.bias
    a, b = dense_factors(layer, name)
    out = x @ w.T + layer.scaling[name] * (x @ a.T) @ b.T
    return out if bias is None else out + bias.detach()


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_formula(role, bias):
    layer = make_layer(role, bias=bias)
    shapes = {Role.COLUMN: ((4, D_IN), (D_OUT, 4 // 2)), Role.ROW: ((4, D_IN // 2), (D_OUT, 4))}
    assert (tuple(layer.lora_A["a"].shape), tuple(layer.lora_B["a"].shape)) == shapes[role]
    x = torch.randn(2, 5, D_IN)
    assert_close(layer(x), dense_forward(layer, x))
    a, b = dense_factors(layer, "a")
    assert_close(layer.delta_weight("a"), layer.scaling["a"] * b @ a)


def graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def fused_ran(out: torch.Tensor) -> bool:
    return any("_LoraLinear" in name for name in graph_nodes(out))


def forward_backward(layer: BDLoraLinear, x: torch.Tensor, input_grad: bool) -> list[torch.Tensor]:
    """Output, input gradient (if asked) and factor gradients of a squared-output loss."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    out = layer(x)
    out.square().sum().backward()
    grads = [layer.lora_A["a"].grad, layer.lora_B["a"].grad]
    return [out.detach(), *grads, *([x.grad] if input_grad else [])]


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
@pytest.mark.parametrize("nblocks", [1, 2, 4])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_forward_and_backward_equal_autograd_over_the_separate_ops(role, nblocks, input_grad):
    layer = make_layer(role, nblocks=nblocks)
    x = torch.randn(2, 5, D_IN)
    fused = forward_backward(layer, x, input_grad)
    assert fused_ran(layer(x)) == (nblocks == 1)  # more blocks: the packed bmm, not a dense expansion
    layer.fused = False
    reference = forward_backward(layer, x, input_grad)
    assert not fused_ran(layer(x))
    for got, want in zip(fused, reference, strict=True):  # fp32, summed in another order
        assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert_close(fused[0], dense_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_dropout_and_mixed_dtypes_take_the_general_path():
    layer = make_layer(Role.COLUMN, dropout=0.5)
    assert not fused_ran(layer(torch.randn(3, D_IN)))
    layer = make_layer(Role.ROW)
    x = torch.randn(3, D_IN)
    want = dense_forward(layer, x)
    layer.lora_A["a"].data = layer.lora_A["a"].data.double()
    layer.lora_B["a"].data = layer.lora_B["a"].data.double()
    out = layer(x)
    assert out.dtype == x.dtype and not fused_ran(out)
    assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
def test_merge_then_unmerge(role):
    layer = make_layer(role)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, D_IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged == ["a"]
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.merge()  # merging twice must not add the delta twice
    assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    assert layer.merged == []
    assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_several_adapters_on_one_layer():
    layer = make_layer(Role.COLUMN)
    layer.add_adapter("b", 8, 4, 0.5)
    fill_random(layer, "b", seed=2)
    x = torch.randn(3, D_IN)
    assert layer.active_adapter == "a"
    assert trainable(layer) == {"lora_A.a", "lora_B.a"}
    out_a = layer(x)
    layer.set_adapter("b")
    assert trainable(layer) == {"lora_A.b", "lora_B.b"}
    out_b = layer(x)
    assert not torch.allclose(out_a, out_b)
    assert_close(out_b, dense_forward(layer, x, "b"))
    with pytest.raises(KeyError, match="no adapter 'c'"):
        layer.set_adapter("c")
    with pytest.raises(ValueError, match="'b' already exists"):
        layer.add_adapter("b", 4, 2, 1.0)
    layer.delete_adapter("b")
    assert layer.active_adapter == "a" and list(layer.lora_A) == ["a"] and "b" not in layer.scaling
    assert trainable(layer) == {"lora_A.a", "lora_B.a"}
    assert_close(layer(x), out_a)


def test_deleting_a_merged_adapter_restores_the_base_weight():
    layer = make_layer(Role.ROW)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge("a")
    layer.delete_adapter("a")
    assert layer.active_adapter is None
    assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    x = torch.randn(2, D_IN)
    assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("role", [Role.COLUMN, Role.ROW])
def test_dropout_only_in_train_mode_and_only_on_the_adapter_input(role):
    layer = make_layer(role, dropout=0.5)
    x = torch.randn(4, 6, D_IN)
    layer.train()
    torch.manual_seed(7)
    out_train = layer(x)
    torch.manual_seed(7)
    x_dropped = F.dropout(x, 0.5, training=True)
    a, b = dense_factors(layer, "a")
    base = layer.base_layer(x)
    assert_close(out_train, base + layer.scaling["a"] * (x_dropped @ a.T) @ b.T)
    assert not torch.allclose(out_train, layer(x))  # a fresh mask
    layer.eval()
    assert_close(layer(x), dense_forward(layer, x))
    assert_close(layer(x), layer(x))


# -- adapters in a tiny model ------------------------------------------------------------------


@pytest.mark.parametrize("init", ["lora", "gaussian", "base_stats"])
def test_step0_logits_equal_the_base_model(init, input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig(init=init, rank=8, nblocks=2))
    assert_close(logits(model, input_ids), logits(tiny_model(), input_ids), atol=1e-6, rtol=0)
    for _, layer in bdlora_layers(model):
        assert not layer.lora_B["default"].any()
        assert layer.lora_A["default"].std() > 0


def fan_in_of_a(name: str, d_in: int, nblocks: int) -> int:
    return d_in if name.endswith(COLUMN_LEAVES) else d_in // nblocks


def test_base_stats_std_follows_the_documented_formula():
    """sigma = std(W) * sqrt(d_in / fan_in(A)); fan_in(A) is d_in (column) or d_in / N (row)."""
    model = apply_bdlora(tiny_model(), BDLoraConfig(init="base_stats", rank=32, nblocks=4))
    for name, layer in bdlora_layers(model):
        a = layer.lora_A["default"].detach()
        d_in = layer.base_layer.weight.shape[1]
        assert a.shape[1] == fan_in_of_a(name, d_in, 4)
        sigma = layer.base_layer.weight.std().item() * math.sqrt(d_in / a.shape[1])
        assert abs(a.std().item() / sigma - 1) < 0.15, name
        assert abs(a.mean().item()) < 0.25 * sigma, name


@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_peft_style_inits(init):
    rank = 16
    model = apply_bdlora(tiny_model(), BDLoraConfig(init=init, rank=rank, nblocks=2))
    for name, layer in bdlora_layers(model):
        a = layer.lora_A["default"].detach()
        if init == "lora":  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(a.shape[1])
            assert a.abs().max() <= bound
            assert abs(a.std().item() / (bound / math.sqrt(3)) - 1) < 0.15, name
        else:  # N(0, 1/r^2)
            assert abs(a.std().item() * rank - 1) < 0.15, name


def test_only_adapter_factors_get_gradients(input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig(rank=8, nblocks=2))
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any("embed_tokens" in n for n in names)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert param.requires_grad and param.grad is not None, name
            if ".lora_A." in name:  # B = 0 at step 0: no signal reaches A yet
                assert not param.grad.any(), name
            else:
                assert param.grad.any(), name
        else:
            assert not param.requires_grad and param.grad is None, name
    randomize_lora_b(model)
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_disable_adapters_gives_base_logits(input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig())
    randomize_lora_b(model)
    base, adapted = logits(tiny_model(), input_ids), logits(model, input_ids)
    assert not torch.allclose(base, adapted, atol=1e-3)
    with disable_adapters(model):
        assert_close(logits(model, input_ids), base, atol=1e-6, rtol=0)
    assert_close(logits(model, input_ids), adapted)


def test_disable_adapters_on_a_merged_model_gives_base_logits(input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig())
    randomize_lora_b(model)
    adapted = logits(model, input_ids)
    merge_adapter(model)
    with disable_adapters(model):
        assert_close(logits(model, input_ids), logits(tiny_model(), input_ids), atol=1e-5, rtol=0)
    assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    for _, layer in bdlora_layers(model):
        assert not layer.merged
    assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=0)


def adapter_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[-1]


def test_several_adapters_in_a_model(input_ids):
    model = apply_bdlora(tiny_model(), BDLoraConfig(rank=8))
    randomize_lora_b(model, seed=1)
    only_a = logits(model, input_ids)
    apply_bdlora(model, BDLoraConfig(rank=4, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    randomize_lora_b(model, seed=2, adapter="b")
    # the first adapter stays active, and trainable, everywhere
    a_factors = {n for n, _ in model.named_parameters() if adapter_of(n) == "default"}
    assert trainable(model) == a_factors
    assert_close(logits(model, input_ids), only_a)

    set_adapter(model, "b")
    b_layers = {n for n, layer in bdlora_layers(model) if "b" in layer.lora_A}
    assert b_layers == {n for n, _ in bdlora_layers(model) if n.endswith(("q_proj", "v_proj"))}
    expected = {
        n
        for n, _ in model.named_parameters()
        if adapter_of(n) == ("b" if n.split(".lora_")[0] in b_layers else "default")
    }
    assert trainable(model) == expected
    assert not torch.allclose(logits(model, input_ids), only_a, atol=1e-4)
    with pytest.raises(KeyError, match="no adapter 'c'"):
        set_adapter(model, "c")

    delete_adapter(model, "b")
    assert not any(adapter_of(n) == "b" for n in model.state_dict())
    assert trainable(model) == a_factors
    assert_close(logits(model, input_ids), only_a)
