"""Tiny mixture-of-experts checkpoints, and the checks each goes through at every parallel layout.

``test_moe.py`` runs ``check_layouts`` in process (TP 1), on two gloo ranks (TP 2 and EP 2, one
launch) and on four (EP 2 x TP 2), and compares what each returns with ``reference``:

1. the checkpoint (per-expert tensors for Mixtral, Qwen2/3-MoE and DeepSeek-V3, fused for gpt-oss)
   loads with a zero adapter to transformers' own logits;
2. a random adapter on attention, shared experts and every expert tensor (the same unsharded
   factors everywhere) gives the reference's loss, logits and adapter gradients;
3. the collectives of a forward and backward are the frozen base's, in count and bytes;
4. the adapter saved for PEFT loads into PEFT with the same logits.

gpt-oss's router bias keeps experts 2 and 3 from every token, so at EP 2 one rank routes nothing.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
from bdlora.experts import BDLoraExperts
from bdlora.model import bdlora_layers
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.checkpoint import load_sharded_adapter, save_sharded_adapter
from bdlora.parallel.mesh import ParallelDims, build_mesh

TINY = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=96,
    max_position_embeddings=64,
    initializer_range=0.2,  # logits of order 1, so that 1e-5 tolerances mean something
    pad_token_id=0,
)
ARCHS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}
# gpt-oss has no TP plan for its attention (its per-head sinks): at TP > 1 only experts are adapted
EXPERTS_ONLY = {"gpt_oss"}
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (2, 2)], 4: [(4, 2)]}  # world size -> (tp, ep)
TOL = dict(atol=1e-5, rtol=1e-5)


def save_tiny_models(root: Path, seed: int = 0) -> dict[str, str]:
    """One seeded fp32 checkpoint per architecture; gpt-oss's router never picks experts 2 and 3."""
    dirs = {}
    for arch, extra in ARCHS.items():
        torch.manual_seed(seed)
        config = AutoConfig.for_model(arch, **TINY, **extra)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if arch == "gpt_oss":
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.mlp.router.bias[2:] = -1e4
        model.save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


def is_per_expert(model_dir: str) -> bool:
    """Whether the checkpoint stores one tensor per expert (transformers fuses them at load)."""
    keys = load_file(str(Path(model_dir) / "model.safetensors")).keys()
    return any(".experts.0." in k for k in keys)


def batch() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


def adapter_config(arch: str) -> bdlora.BDLoraConfig:
    """Attention, shared experts, dense MLPs and every expert tensor (gpt-oss: its experts only)."""
    linears = [
        "q_proj",
        "q_b_proj",
        "kv_b_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    return bdlora.BDLoraConfig(
        rank=8,
        alpha=16,
        nblocks=4,
        target_modules=[] if arch in EXPERTS_ONLY else linears,
        target_parameters=["gate_up_proj", "down_proj"],
    )


def transformers_logits(model_dir: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=batch()).logits


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Nonzero B factors drawn unsharded (the same at every layout), each rank keeping its shard."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in bdlora_layers(model):
        a, b = layer.full_factors("default")
        layer.set_factors("default", a, torch.randn(b.shape, generator=generator) * std)


def gathered_grads(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, layer in bdlora_layers(model):
        grad_a, grad_b = layer.lora_A["default"].grad, layer.lora_B["default"].grad
        if layer.tp_style is not None:
            grad_a, grad_b = layer.tp_style.gather_pair(grad_a, grad_b)
        out[name] = (grad_a.clone(), grad_b.clone())
    return out


def routed_tokens(model: nn.Module, ids: torch.Tensor) -> list[int]:
    """Tokens routed to this rank's experts in each MoE layer, for one forward."""
    counts: list[int] = []

    def count(module: BDLoraExperts, args: tuple) -> None:
        local = args[1] - module.expert_offset
        counts.append(int(((local >= 0) & (local < module.num_local_experts)).sum()))

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, BDLoraExperts)]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return counts


def collectives(model: nn.Module, ids: torch.Tensor, group) -> dict:
    """Count and bytes of the collectives in one forward and backward through every block (the
    embedding's gradient asked for, so the first block's input gradient is summed too)."""
    model.get_input_embeddings().weight.requires_grad_(True)
    with CommCounter({"tp": group}) as comm:
        model(input_ids=ids, labels=ids).loss.backward()
    summary = comm.summary().get("tp", {"count": 0, "bytes": 0})
    return {"count": summary["count"], "bytes": summary["bytes"]}


def check_layout(arch: str, model_dir: str, adapter_root: str, tp: int, ep: int) -> dict[str, Any]:
    """Everything ``test_moe.py`` compares, for one architecture at (tp, ep)."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=tp)) if tp > 1 else None
    group = None if mesh is None else mesh.get_group("tp")
    config = adapter_config(arch)
    ids = batch()
    model = bdlora.from_pretrained(model_dir, config, mesh=mesh, ep=ep)
    out: dict[str, Any] = {"zero_logits": _logits(model, ids)}
    base = bdlora.from_pretrained(model_dir, mesh=mesh, ep=ep)  # the frozen base, no adapter
    out["base_comm"] = collectives(base, ids, group)
    randomize_adapter(model)
    out["routed"] = routed_tokens(model, ids)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out["loss"], out["grads"] = loss.detach(), gathered_grads(model)
    model.zero_grad()
    out["comm"] = collectives(model, ids, group)
    model.eval()
    out["logits"] = _logits(model, ids)
    adapter_dir = Path(adapter_root) / f"{arch}-tp{tp}-ep{ep}"
    bdlora.save_adapter(model, adapter_dir, format="peft-lora")
    save_sharded_adapter(model, sharded_dir(adapter_root, arch, tp, ep))  # dp = 1: every rank writes
    if group is None or dist.get_rank() == 0:  # PEFT's own refusal is a result, not a failure
        out["peft_logits"] = capture(peft_logits, model_dir, adapter_dir, ids)
    return out


def sharded_dir(adapter_root: str, arch: str, tp: int, ep: int) -> Path:
    return Path(adapter_root) / f"{arch}-tp{tp}-ep{ep}-sharded"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(model_dir: str, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits


def capture(fn, *args) -> dict | str:
    """``fn``'s result, or its traceback: one failing architecture does not hide the others."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001  (reported by the test that reads it)
        return traceback.format_exc()


def check_layouts(model_dirs: dict[str, str], adapter_root: str, world: int) -> dict[tuple, dict | str]:
    """(arch, tp, ep) -> ``check_layout``'s results or traceback, for every layout of ``world`` ranks."""
    torch.set_num_threads(1)
    return {
        (arch, tp, ep): capture(check_layout, arch, d, adapter_root, tp, ep)
        for tp, ep in LAYOUTS[world]
        for arch, d in model_dirs.items()
    }


def reference(arch: str, model_dir: str) -> dict:
    """One process, no mesh: the loss, logits and gradients every layout must reproduce."""
    config = adapter_config(arch)
    model = bdlora.from_pretrained(model_dir, config)
    randomize_adapter(model)
    ids = batch()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": gathered_grads(model), "logits": _logits(model, ids)}


def restored_logits(arch: str, model_dir: str, checkpoint: Path) -> torch.Tensor:
    """Logits at TP 1 of the base with an adapter restored from a checkpoint sharded at any layout."""
    model = bdlora.from_pretrained(model_dir)
    load_sharded_adapter(model, checkpoint)
    return _logits(model, batch())


def strip_key(path: Path, key: str) -> None:
    """Rewrite a safetensors file without ``key`` (a checkpoint with a missing expert)."""
    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})
