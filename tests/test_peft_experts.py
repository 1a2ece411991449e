"""Per-expert adapters written in PEFT's ``target_parameters`` format load into PEFT with equal logits.

The adapter directory is written by hand from ``bdlora.peft_experts`` (config + keys), loaded with
``PeftModel.from_pretrained``, and compared with the base model whose expert tensors got the delta
added directly: this pins the key names, PEFT's factor interleaving and the layouts of both
storage orientations (Mixtral ``(E, out, in)``, gpt-oss ``(E, in, out)``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from bdlora.peft_experts import dense_expert_factors, from_peft, peft_param_keys, to_peft

RANK, ALPHA = 4, 8
ROLES = {"gate_up_proj": "column", "down_proj": "row"}
ATOL = dict(atol=1e-5, rtol=0)
TINY = dict(
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=64,
    num_local_experts=4,
    num_experts_per_tok=2,
)
TARGETS = [("gate_up_proj",), ("down_proj",), ("gate_up_proj", "down_proj")]


def tiny_moe(model_type: str) -> nn.Module:
    """A seeded fp32 tiny MoE causal LM in eval mode."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def experts_of(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.experts")}


def storage_dims(param: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(E, d_out, d_in) of an expert tensor in either storage layout."""
    num_experts, p, q = param.shape
    return (num_experts, q, p) if transposed else (num_experts, p, q)


def random_factors(
    role: str, num_experts: int, d_out: int, d_in: int, nblocks: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """bdlora's canonical factors, the block-diagonal one packed, with a clearly nonzero delta."""
    shape_a = (num_experts, RANK, d_in // nblocks if role == "row" else d_in)
    shape_b = (num_experts, d_out, RANK // nblocks if role == "column" else RANK)
    return torch.randn(shape_a, generator=gen) * 0.3, torch.randn(shape_b, generator=gen) * 0.3


def reference_delta(a: torch.Tensor, b: torch.Tensor, role: str, nblocks: int) -> torch.Tensor:
    """``scale * B_e A_e`` per expert, by the definition (torch.block_diag): (E, d_out, d_in)."""
    out = []
    for a_e, b_e in zip(a, b):
        dense_a = torch.block_diag(*a_e.chunk(nblocks, 0)) if role == "row" else a_e  # (r, d_in)
        dense_b = torch.block_diag(*b_e.chunk(nblocks, 0)) if role == "column" else b_e  # (d_out, r)
        out.append(ALPHA / RANK * dense_b @ dense_a)
    return torch.stack(out)


def write_adapter(directory: Path, targets: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT adapter directory as bdlora would write it: plain LoRA on the expert parameters."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": [],
        "target_parameters": [f"mlp.experts.{p}" for p in targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("nblocks", [1, 2])
@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_peft_loads_expert_adapter_with_equal_logits(
    tmp_path: Path, model_type: str, targets: tuple[str, ...], nblocks: int
) -> None:
    base = tiny_moe(model_type)
    reference = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, experts in experts_of(base).items():
        transposed = bool(getattr(experts, "is_transposed", False))
        assert transposed == (model_type == "gpt_oss")
        for p_name in targets:
            num_experts, d_out, d_in = storage_dims(getattr(experts, p_name), transposed)
            a, b = random_factors(ROLES[p_name], num_experts, d_out, d_in, nblocks, gen)
            key_a, key_b = peft_param_keys(name, p_name, targets)
            tensors[key_a], tensors[key_b] = to_peft(a, b, ROLES[p_name], nblocks, transposed)
            delta = reference_delta(a, b, ROLES[p_name], nblocks)  # (E, d_out, d_in)
            with torch.no_grad():
                getattr(reference.get_submodule(name), p_name).add_(
                    delta.transpose(1, 2) if transposed else delta
                )
    write_adapter(tmp_path / "adapter", targets, tensors)

    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")

    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == tensors.keys()  # every key we wrote is one PEFT reads, and no more
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=gen)
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the delta is visible, so the comparison means something
    assert_close(adapted, reference(ids).logits, **ATOL)


def test_both_targets_nest_gate_up_innermost() -> None:
    a, b = peft_param_keys("model.layers.0.mlp.experts", "gate_up_proj", ["gate_up_proj", "down_proj"])
    assert a == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert b == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
    a, _ = peft_param_keys("model.layers.0.mlp.experts", "down_proj", ["gate_up_proj", "down_proj"])
    assert a == "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    a, _ = peft_param_keys("model.layers.0.mlp.experts", "gate_up_proj", ["gate_up_proj"])
    assert a == "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    with pytest.raises(ValueError):
        peft_param_keys("model.layers.0.mlp.experts", "down_proj", ["gate_up_proj"])


@pytest.mark.parametrize("peft_transposed", [None, False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("nblocks", [1, 2])
@pytest.mark.parametrize("role", ["column", "row"])
def test_round_trip_is_dense_expansion(
    role: str, nblocks: int, transposed: bool, peft_transposed: bool | None
) -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = random_factors(role, 3, 12, 8, nblocks, gen)
    lora_a, lora_b = to_peft(a, b, role, nblocks, transposed, peft_transposed=peft_transposed)
    got_a, got_b = from_peft(lora_a, lora_b, 3, transposed, peft_transposed=peft_transposed)
    want_a, want_b = dense_expert_factors(a, b, role, nblocks)
    assert_close(got_a, want_a, atol=0, rtol=0)
    assert_close(got_b, want_b, atol=0, rtol=0)


class _Experts(nn.Module):
    """A bare experts module, (E, d_out, d_in) or (E, d_in, d_out), optionally flagged for PEFT."""

    def __init__(self, shape: tuple[int, int, int], flag: bool | None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))
        if flag is not None:
            self.is_transposed = flag


@pytest.mark.parametrize("flag", [None, False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_peft_delta_matches_whatever_the_flag(transposed: bool, flag: bool | None) -> None:
    """A module whose ``is_transposed`` disagrees with its storage (Llama-4's experts have no flag
    but store (E, in, out)) still gets bdlora's delta, given ``peft_transposed``."""
    num_experts, d_out, d_in, nblocks = 3, 12, 8, 2
    shape = (num_experts, d_in, d_out) if transposed else (num_experts, d_out, d_in)
    parent = nn.Module()
    parent.experts = _Experts(shape, flag)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=["experts.w"])
    inject_adapter_in_model(config, parent)
    gen = torch.Generator().manual_seed(3)
    a, b = random_factors("column", num_experts, d_out, d_in, nblocks, gen)
    lora_a, lora_b = to_peft(a, b, "column", nblocks, transposed, peft_transposed=bool(flag))
    with torch.no_grad():
        parent.experts.lora_A["default"].weight.copy_(lora_a)
        parent.experts.lora_B["default"].weight.copy_(lora_b)
    delta = reference_delta(a, b, "column", nblocks)  # (E, d_out, d_in)
    want = delta.transpose(1, 2) if transposed else delta
    assert_close(parent.experts.get_delta_weight("default"), want, **ATOL)
