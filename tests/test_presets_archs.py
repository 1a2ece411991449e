"""The real-size presets of newer architectures (tier 1): Gemma 3 27B, Qwen3 32B, Phi-3 medium, and
the mixture-of-experts Qwen3-30B-A3B, Mixtral 8x7B and gpt-oss-20b.

Each builds on the meta device with its model card's sizes, and ``bdlora plan`` gives the adapter
and per-rank numbers a closed form computes from those sizes, at every TP degree the heads allow
(MoE presets: at TP and expert-parallel degrees (tp, ep)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import pytest
import yaml
from torch import nn

from bdlora import BDLoraConfig
from bdlora.cli import main as cli_main
from bdlora.config import DEFAULT_TARGETS, BDLoraConfigError
from bdlora.memory import LAYOUTS, memory_plan, memory_plans
from bdlora.plan import resolve_plan
from bdlora.presets import build_model
from bdlora.roles import Role

COLUMN, ROW = Role.COLUMN, Role.ROW
SEQ_LEN = 4000  # a multiple of every TP degree below (2, 4, 5, 8, 10, 16)


class Linear(NamedTuple):
    d_in: int
    d_out: int
    role: Role
    block: str  # the parent module: self_attn or mlp


@dataclass(frozen=True)
class Sizes:
    """A model card's sizes, and the TP degrees its heads allow (dividing heads and KV heads)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    norms_per_layer: int  # RMSNorm weights of size hidden in each decoder layer
    qk_norm: bool  # per-head RMSNorm on q and k (head_dim each)
    fused: bool  # Phi-3's packed qkv_proj and gate_up_proj
    tp_degrees: tuple[int, ...]

    def linears(self) -> dict[str, Linear]:
        """Leaf name -> sizes, role and block of one decoder layer's projections."""
        d, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        attn, mlp = "self_attn", "mlp"
        if self.fused:
            return {
                "qkv_proj": Linear(d, q + 2 * kv, COLUMN, attn),
                "o_proj": Linear(q, d, ROW, attn),
                "gate_up_proj": Linear(d, 2 * i, COLUMN, mlp),
                "down_proj": Linear(i, d, ROW, mlp),
            }
        return {
            "q_proj": Linear(d, q, COLUMN, attn),
            "k_proj": Linear(d, kv, COLUMN, attn),
            "v_proj": Linear(d, kv, COLUMN, attn),
            "o_proj": Linear(q, d, ROW, attn),
            "gate_proj": Linear(d, i, COLUMN, mlp),
            "up_proj": Linear(d, i, COLUMN, mlp),
            "down_proj": Linear(i, d, ROW, mlp),
        }

    def placement(self, block: str) -> str:
        """The f/g line ``bdlora plan --tp`` prints for one block (whitespace collapsed)."""
        members = [(leaf, lin.role) for leaf, lin in self.linears().items() if lin.block == block]
        columns = ", ".join(leaf for leaf, role in members if role is COLUMN)
        (row,) = [leaf for leaf, role in members if role is ROW]
        return f"model.layers.{{0-{self.layers - 1}}}.{block} f -> {columns} g <- {row}"

    def linear_params(self) -> int:
        return self.layers * sum(lin.d_in * lin.d_out for lin in self.linears().values())

    def vocab_params(self, vocab_rows: int) -> int:
        return vocab_rows * self.hidden * (1 if self.tied else 2)

    def norm_params(self) -> int:
        per_layer = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layers * per_layer + self.hidden  # and the final norm

    def params(self) -> int:
        return self.linear_params() + self.vocab_params(self.vocab) + self.norm_params()

    def base_bytes_per_rank(self, tp: int, vocab_parallel: bool, itemsize: int = 2) -> int:
        """Every projection split over ``tp`` (no biases here), norms whole, the vocabulary whole or
        ``ceil(V/tp)`` rows."""
        rows = math.ceil(self.vocab / tp) if vocab_parallel else self.vocab
        return (self.linear_params() // tp + self.vocab_params(rows) + self.norm_params()) * itemsize


SIZES = {
    # google/gemma-3-27b-pt's text model: 32 x 128 query dims (4096), tied embeddings, sandwich norms
    "gemma-3-27b": Sizes(5376, 21504, 62, 32, 16, 128, 262208, True, 4, True, False, (2, 4, 8, 16)),
    "qwen3-32b": Sizes(5120, 25600, 64, 64, 8, 128, 151936, False, 2, True, False, (2, 4, 8)),
    # microsoft/Phi-3-medium-4k-instruct: head_dim = 5120 / 40
    "phi-3-medium": Sizes(5120, 17920, 40, 40, 10, 128, 32064, False, 2, False, True, (2, 5, 10)),
}
TP_CASES = [pytest.param(name, tp, id=f"{name}-tp{tp}") for name, s in SIZES.items() for tp in s.tp_degrees]


def adapter_counts(s: Sizes, rank: int, nblocks: int, targets=DEFAULT_TARGETS) -> tuple[int, int, int]:
    """(modules, BD-LoRA params, LoRA params) of an adapter on the ``targets`` of every layer:
    column ``r (d_in + d_out/N)``, row ``r (d_in/N + d_out)``, LoRA ``r (d_in + d_out)``."""
    modules = bd = lora = 0
    for leaf, (d_in, d_out, role, _) in s.linears().items():
        if leaf not in targets:
            continue
        modules += s.layers
        split_out, split_in = (nblocks, 1) if role is COLUMN else (1, nblocks)
        bd += s.layers * rank * (d_in // split_in + d_out // split_out)
        lora += s.layers * rank * (d_in + d_out)
    return modules, bd, lora


def tp_adapter(tp: int) -> tuple[int, int]:
    """(rank, nblocks) that split over ``tp``: whole blocks per rank, rank divisible by both."""
    nblocks = max(2, tp)
    return math.lcm(8, nblocks), nblocks


@cache
def meta_model(name: str) -> nn.Module:
    return build_model(name, device="meta")


def plan_output(capsys, *argv: str) -> str:
    assert cli_main(["plan", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def config_file(tmp_path, rank: int, nblocks: int, **extra) -> str:
    path = tmp_path / "adapter.yaml"
    path.write_text(yaml.safe_dump({"rank": rank, "nblocks": nblocks, **extra}))
    return str(path)


@pytest.mark.parametrize("name", list(SIZES))
def test_preset_builds_on_meta_with_the_model_card_sizes(name):
    s, model = SIZES[name], meta_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == s.params()
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (s.heads, s.kv_heads)
    assert getattr(config, "head_dim", None) in (None, s.head_dim)
    assert config.tie_word_embeddings is s.tied


@pytest.mark.parametrize("name", list(SIZES))
def test_plan_counts_the_default_adapter(capsys, name):
    modules, bd, lora = adapter_counts(SIZES[name], rank=8, nblocks=2)
    out = plan_output(capsys, "--model", name)
    assert f"total: {modules} modules, {bd:,} BD-LoRA params vs {lora:,} standard LoRA" in out


@pytest.mark.parametrize(("name", "tp"), TP_CASES)
def test_plan_at_tp_gives_the_per_rank_share_and_the_blocks(capsys, tmp_path, name, tp):
    s = SIZES[name]
    rank, nblocks = tp_adapter(tp)
    modules, bd, _ = adapter_counts(s, rank, nblocks)
    out = plan_output(
        capsys, "--model", name, "--tp", str(tp), "--config", config_file(tmp_path, rank, nblocks)
    )
    assert f"per TP rank (tp={tp}): {bd // tp:,} params" in out
    lines = {" ".join(line.split()) for line in out.splitlines()}
    assert {s.placement("self_attn"), s.placement("mlp")} <= lines


@pytest.mark.parametrize(("name", "tp"), TP_CASES)
def test_memory_plan_at_tp_gives_the_per_rank_base_and_adapter(capsys, tmp_path, name, tp):
    s = SIZES[name]
    rank, nblocks = tp_adapter(tp)
    modules, bd, _ = adapter_counts(s, rank, nblocks)
    argv = ["--model", name, "--tp", str(tp), "--memory", "--seq-len", str(SEQ_LEN)]
    out = plan_output(capsys, *argv, "--config", config_file(tmp_path, rank, nblocks))
    assert out.startswith(f"{name}: {modules} adapted modules, {bd // tp:,} adapter params/rank\n")
    plan = resolve_plan(meta_model(name), BDLoraConfig(rank=rank, nblocks=nblocks))
    for vocab_parallel in (False, True):
        mem = memory_plan(meta_model(name), plan, tp, SEQ_LEN, 1, "bfloat16", vocab_parallel=vocab_parallel)
        assert mem.base_weights == s.base_bytes_per_rank(tp, vocab_parallel)
        assert mem.adapter == mem.grads == bd // tp * 2


@pytest.mark.parametrize(
    ("name", "tp", "valid"),
    [
        ("gemma-3-27b", 32, "[1, 2, 4, 8, 16]"),
        ("qwen3-32b", 16, "[1, 2, 4, 8]"),
        ("phi-3-medium", 4, "[1, 2, 5, 10]"),
    ],
)
def test_plan_at_a_tp_the_heads_refuse_lists_the_valid_degrees(capsys, name, tp, valid):
    assert cli_main(["plan", "--model", name, "--tp", str(tp)]) == 2
    assert valid in capsys.readouterr().err


def test_phi3_packed_projections_are_adapted_only_when_targeted(capsys, tmp_path):
    """The default targets name q/k/v and gate/up separately, so Phi-3 gets o_proj and down_proj
    only; naming qkv_proj and gate_up_proj adapts them as the column layers of their blocks."""
    s, model = SIZES["phi-3-medium"], meta_model("phi-3-medium")
    default = resolve_plan(model, BDLoraConfig())
    assert {m.name.rsplit(".", 1)[1] for m in default.modules} == {"o_proj", "down_proj"}
    targets = list(s.linears())
    full = resolve_plan(model, BDLoraConfig(target_modules=targets))
    sources = {m.name.rsplit(".", 1)[1]: (m.role, m.role_source) for m in full.modules}
    assert sources == {
        "qkv_proj": (COLUMN, "tp_plan:colwise_gather_output"),
        "o_proj": (ROW, "tp_plan:rowwise_split_input"),
        "gate_up_proj": (COLUMN, "tp_plan:colwise_gather_output"),
        "down_proj": (ROW, "tp_plan:rowwise_split_input"),
    }
    modules, bd, _ = adapter_counts(s, 10, 10, targets)
    out = plan_output(
        capsys,
        "--model",
        "phi-3-medium",
        "--tp",
        "10",
        "--config",
        config_file(tmp_path, 10, 10, target_modules=targets),
    )
    assert f"total: {modules} modules, {bd:,} BD-LoRA params" in out
    assert f"per TP rank (tp=10): {bd // 10:,} params" in out


# -- mixture-of-experts presets ----------------------------------------------------------------------
@dataclass(frozen=True)
class MoeSizes:
    """A MoE model card's sizes. Every layer's MLP is ``experts`` routed experts (``top_k`` per
    token) of intermediate size ``inter``, fused as ``gate_up_proj`` (E, 2I, H) and ``down_proj``
    (E, H, I); routers are ``E x H``. gpt-oss adds biases (attention, experts, router), one attention
    sink per head, and a TP plan without the attention."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    inter: int
    qk_norm: bool
    gpt_oss: bool
    published: float  # total parameters on the model card
    layouts: tuple[tuple[int, int], ...]  # (tp, ep)

    def attention(self) -> tuple[int, int, int]:
        """(weights TP splits, biases TP splits, biases kept whole) of one layer's attention."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        weights = self.hidden * (q + 2 * kv) + q * self.hidden
        return weights, (q + 2 * kv) * self.gpt_oss, self.hidden * self.gpt_oss  # o's bias whole

    def expert_tensors(self) -> tuple[int, int]:
        """(gate_up + down + gate_up bias, down bias) of one layer's experts."""
        e, h, i = self.experts, self.hidden, self.inter
        return e * 3 * h * i + e * 2 * i * self.gpt_oss, e * h * self.gpt_oss

    def replicated(self) -> int:
        """Per layer: router (+ bias), two norms, q/k norms, sinks; and the final norm once."""
        per_layer = self.experts * (self.hidden + self.gpt_oss) + 2 * self.hidden
        per_layer += 2 * self.head_dim * self.qk_norm + self.heads * self.gpt_oss
        return self.layers * per_layer + self.hidden

    def params(self) -> int:
        return (
            self.layers * (sum(self.attention()) + sum(self.expert_tensors()))
            + self.replicated()
            + (2 * self.vocab * self.hidden)
        )

    def base_params_per_rank(self, tp: int, ep: int) -> int:
        """Attention 1/tp where the TP plan lists it (bias of o whole), experts: gate_up, down and
        gate_up's bias 1/tp (E/ep experts, each split tp/ep ways), down's bias 1/ep; the rest whole."""
        attn_w, attn_b, o_b = self.attention()
        attention = attn_w + attn_b + o_b if self.gpt_oss else (attn_w + attn_b) // tp + o_b
        split, down_bias = self.expert_tensors()
        return (
            self.layers * (attention + split // tp + down_bias // ep)
            + self.replicated()
            + (2 * self.vocab * self.hidden)
        )


MOE_SIZES = {
    # Qwen/Qwen3-30B-A3B: 4 KV heads allow TP 1, 2 and 4 only
    "qwen3-30b-a3b": MoeSizes(
        2048, 48, 32, 4, 128, 151936, 128, 8, 768, True, False, 30.5e9, ((4, 4), (4, 2))
    ),
    "mixtral-8x7b": MoeSizes(
        4096, 32, 32, 8, 128, 32000, 8, 2, 14336, False, False, 46.7e9, ((8, 8), (8, 4))
    ),
    "gpt-oss-20b": MoeSizes(2880, 24, 64, 8, 64, 201088, 32, 4, 2880, False, True, 20.9e9, ((8, 8), (8, 4))),
}
MOE_CASES = [
    pytest.param(name, tp, ep, id=f"{name}-tp{tp}-ep{ep}")
    for name, s in MOE_SIZES.items()
    for tp, ep in s.layouts
]
MOE_ADAPTER = dict(rank=8, target_parameters=["gate_up_proj", "down_proj"])


@pytest.mark.parametrize("name", list(MOE_SIZES))
def test_moe_preset_builds_on_meta_with_the_model_card_sizes(name):
    s, model = MOE_SIZES[name], meta_model(name)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == s.params()
    assert abs(total / s.published - 1) < 0.03, f"{total / 1e9:.2f}B vs {s.published / 1e9}B published"
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok) == (s.experts, s.top_k)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (
        s.heads,
        s.kv_heads,
        s.layers,
    )
    experts = model.get_submodule("model.layers.0.mlp.experts")
    stored = (s.experts, s.hidden, 2 * s.inter) if s.gpt_oss else (s.experts, 2 * s.inter, s.hidden)
    assert tuple(experts.gate_up_proj.shape) == stored


@pytest.mark.parametrize(("name", "tp", "ep"), MOE_CASES)
def test_moe_memory_plan_at_tp_and_ep(name, tp, ep):
    s, model = MOE_SIZES[name], meta_model(name)
    plan = resolve_plan(model, BDLoraConfig(nblocks=tp, **MOE_ADAPTER))
    assert sum(m.experts for m in plan.modules) == 2 * s.layers * s.experts
    plans = memory_plans(model, plan, tp, seq_len=SEQ_LEN, micro_batch=1, dtype="bfloat16", ep=ep)
    assert list(plans) == list(LAYOUTS)
    replicated = plans["replicated"]
    assert replicated.base_weights == 2 * s.base_params_per_rank(tp, ep)
    assert replicated.adapter == replicated.grads == 2 * (plan.params // tp)
    assert replicated.moe_layers == s.layers


def test_qwen3_30b_a3b_at_tp8_is_refused_by_its_kv_heads():
    model = meta_model("qwen3-30b-a3b")
    plan = resolve_plan(model, BDLoraConfig(nblocks=8, **MOE_ADAPTER))
    with pytest.raises(BDLoraConfigError, match="num_key_value_heads=4 is not divisible by the TP degree 8"):
        memory_plan(model, plan, 8, SEQ_LEN, 1, "bfloat16", ep=8)
