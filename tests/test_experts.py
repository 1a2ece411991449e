"""Adapters on MoE expert tensors in one process: the plan, the forward, merging (tier 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
from bdlora.config import BDLoraConfigError
from bdlora.experts import BDLoraExperts, ExpertLinear
from bdlora.model import bdlora_layers, merge_and_unload
from bdlora.plan import resolve_plan

TINY = dict(
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=64,
    initializer_range=0.2,
)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),  # stored transposed, with biases
}
EXPERTS = ["gate_up_proj", "down_proj"]


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY, **MOE[arch])).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def random_b(model: torch.nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in bdlora_layers(model):
            layer.lora_B["default"].normal_(0, 0.1)


def test_expert_tensors_are_planned_only_when_named():
    model = tiny("mixtral")
    plan = resolve_plan(model, bdlora.BDLoraConfig(rank=4))
    assert not any(m.experts for m in plan.modules)
    assert any("get no adapter" in note and "target_parameters" in note for note in plan.notes)
    plan = resolve_plan(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    gate_up = plan["model.layers.0.mlp.experts.gate_up_proj"]
    down = plan["model.layers.0.mlp.experts.down_proj"]
    assert (gate_up.role.value, down.role.value, gate_up.experts) == ("column", "row", 4)
    assert gate_up.params == 4 * 4 * (32 + 32 // 2)  # E r (d_in + d_out / N), d_out = 2I = 32
    assert down.params == 4 * 4 * (16 // 2 + 32)  # E r (d_in / N + d_out)


def test_a_pattern_cannot_change_an_expert_tensors_role():
    config = bdlora.BDLoraConfig(
        target_parameters=EXPERTS, patterns={"experts.down_proj": {"role": "column"}}
    )
    with pytest.raises(BDLoraConfigError, match=r"role is fixed: row"):
        resolve_plan(tiny("mixtral"), config)


@pytest.mark.parametrize("arch", list(MOE))
def test_adapter_equals_transformers_experts_with_the_delta_merged(arch):
    """bdlora's routed loop with the adapter = transformers' own experts on W + delta."""
    model = tiny(arch)
    reference = copy.deepcopy(model)
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    with torch.no_grad():
        assert torch.allclose(model(ids()).logits, reference(ids()).logits, atol=1e-6)  # B = 0
    random_b(model)
    with torch.no_grad():
        adapted = model(ids()).logits
    merged = merge_and_unload(copy.deepcopy(model))
    assert (
        type(merged.model.layers[0].mlp.experts).__name__
        == type(reference.model.layers[0].mlp.experts).__name__
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, adapted, atol=1e-5, rtol=1e-5)
        assert (adapted - reference(ids()).logits).abs().max() > 1e-2


def test_merge_then_unmerge_restores_the_expert_tensors():
    model = tiny("gpt_oss")
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    random_b(model)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    bdlora.merge_adapter(model)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    bdlora.unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_experts_without_a_routed_token_keep_the_input_in_the_graph():
    """A rank holding none of the routed experts returns zeros that still depend on its input (so
    the MoE block's f runs its backward there too) and zero, not missing, adapter gradients."""
    model = tiny("mixtral")
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, BDLoraExperts)
    experts.expert_offset, experts.num_local_experts = 4, 0  # as an EP rank with no routed expert
    x = torch.randn(6, 32, requires_grad=True)
    out = experts(x, torch.zeros(6, 2, dtype=torch.long), torch.ones(6, 2))
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.zeros_like(x))
    for layer in (experts.gate_up_proj, experts.down_proj):
        assert torch.equal(layer.lora_A["default"].grad, torch.zeros_like(layer.lora_A["default"]))


def test_an_expert_tensor_is_not_called_alone():
    model = tiny("mixtral")
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    layer = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(layer, ExpertLinear)
    with pytest.raises(TypeError, match="runs inside BDLoraExperts.forward"):
        layer(torch.zeros(1, 32))


def test_peft_bdlora_export_of_expert_adapters_is_refused_with_the_way_out(tmp_path):
    model = tiny("mixtral")
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=4, nblocks=2, target_parameters=EXPERTS))
    with pytest.raises(BDLoraConfigError, match=r"use_bdlora.*format='peft-lora'"):
        bdlora.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("arch", "router"), [("mixtral", "gate"), ("gpt_oss", "router")])
def test_a_router_named_in_target_modules_is_adapted_and_peft_loads_it(tmp_path, arch, router):
    """The router's own forward runs on W + delta; PEFT loads it as the target parameter
    ``<router>.weight`` with the same logits, and so does bdlora."""
    from peft import PeftModel

    model = tiny(arch)
    model.save_pretrained(tmp_path / "base")
    config = bdlora.BDLoraConfig(rank=4, nblocks=2, target_modules=[router], target_parameters=EXPERTS)
    model = bdlora.from_pretrained(tmp_path / "base", config)
    plan = bdlora.model.adapters_of(model)["default"].plan
    assert plan[f"model.layers.0.mlp.{router}"].role_source == "router"
    random_b(model)
    with torch.no_grad():
        adapted = model(ids()).logits
    bdlora.save_adapter(model, tmp_path / "adapter", format="peft-lora")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids()).logits
        reloaded = bdlora.from_pretrained(tmp_path / "base", adapter_dir=tmp_path / "adapter")(ids()).logits
        merged = merge_and_unload(model)(ids()).logits
    for other, what in ((peft_logits, "PEFT"), (reloaded, "bdlora reload"), (merged, "merged")):
        torch.testing.assert_close(other, adapted, atol=1e-5, rtol=1e-5, msg=lambda d, w=what: f"{w}: {d}")


def test_a_router_adapter_is_refused_at_tp_above_1():
    """Every rank holds the router whole, so its adapter's gradient would be a partial sum."""
    from bdlora.experts import experts_modules
    from bdlora.parallel.sharding import check_adapter_plan, check_model_tp
    from bdlora.parallel.styles import BDLoraTP

    model = tiny("mixtral")
    plan = resolve_plan(model, bdlora.BDLoraConfig(nblocks=2, target_modules=["gate", "q_proj"]))
    _, layouts = check_model_tp(model, 2)
    with pytest.raises(BDLoraConfigError, match=r"mlp\.gate'.* not sharded by the TP plan"):
        check_adapter_plan(plan, 2, BDLoraTP, layouts, dict(experts_modules(model)), 1)
