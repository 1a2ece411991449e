"""The real-size presets of newer architectures (tier 1): Gemma 3 27B, Qwen3 32B, Phi-3 medium.

Each builds on the meta device with its model card's sizes, and ``bdlora plan`` gives the adapter
and per-rank numbers a closed form computes from those sizes, at every TP degree the heads allow.
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
from bdlora.config import DEFAULT_TARGETS
from bdlora.memory import memory_plan
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
