"""Tiny configs of the dense transformers architectures, and the checks each one goes through.

``test_architectures.py`` runs ``check_archs`` once in process (TP 1) and once on two gloo ranks
(TP 2, one launch for every architecture) and compares what it returns with ``reference``:

1. a zero adapter (B = 0, as ``bdlora.from_pretrained`` adds it) leaves transformers' logits alone;
2. a random adapter, the same unsharded factors at every TP degree, gives the reference's loss,
   logits and adapter gradients (gathered to unsharded shape by ``gathered_grads``);
3. the adapter ``bdlora.save_adapter`` writes loads into PEFT with the same logits.

Each architecture's outcome is a dict of tensors, or the traceback that stopped it, so one failing
architecture is reported without hiding the others.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import bdlora
from bdlora.model import bdlora_layers
from bdlora.parallel.mesh import ParallelDims, build_mesh

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # logits of order 1, so that 1e-5 tolerances mean something
)
# model_type -> what it needs beyond TINY: windows shorter than the batch's 12 tokens next to full
# attention layers, and the scalings left away from 1 so that they are exercised
ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "cohere": dict(logit_scale=1.0),
    "granite": dict(
        embedding_multiplier=2.0, attention_multiplier=0.25, residual_multiplier=0.5, logits_scaling=2.0
    ),
    "starcoder2": {},
    "phi": {},
    "phi3": {},
    "glm4": {},
    "olmo2": {},
    "smollm3": {},
    "exaone4": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    # multi-head latent attention: q and kv down-projections kept whole on every rank
    # (mla_kv_a_proj), their up-projections column-parallel; both layers dense (experts: MoE)
    "deepseek_v3": dict(
        q_lora_rank=32,
        kv_lora_rank=16,
        num_key_value_heads=4,  # MLA: as many as heads
        head_dim=8,  # = qk_rope_head_dim, which the rotary table is sized by
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=2,
    ),
}
ADAPTER_SEED = 0  # from_pretrained's default seed, which draws A
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(model_type: str) -> PretrainedConfig:
    return AutoConfig.for_model(model_type, **{**TINY, **ARCHS[model_type]})


def adapter_config(model_dir: str) -> bdlora.BDLoraConfig:
    """Every linear layer the TP plan shards, whatever the architecture names it (c_fc, qkv_proj...)."""
    plan = AutoConfig.from_pretrained(model_dir).base_model_tp_plan
    linear = [key for key, style in plan.items() if "colwise" in style or "rowwise" in style]
    leaves = sorted({key.rsplit(".", 1)[-1] for key in linear})
    return bdlora.BDLoraConfig(rank=8, alpha=16, nblocks=2, target_modules=leaves)


def save_tiny_models(root: Path, seed: int = 0) -> dict[str, str]:
    """One seeded fp32 checkpoint per architecture under ``root``; returns model_type -> directory."""
    dirs = {}
    for model_type in ARCHS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
        model.save_pretrained(root / model_type)
        dirs[model_type] = str(root / model_type)
    return dirs


def batch() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def transformers_model(model_dir: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@torch.no_grad()
def eval_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Random B factors, equal at every TP degree: drawn at unsharded shape, each rank keeps its shard.

    On a TP-sharded model every rank must call it (``full_factors`` gathers).
    """
    gen = torch.Generator().manual_seed(seed)
    for _, layer in bdlora_layers(model):
        for adapter in layer.lora_A:
            a_full, b_full = layer.full_factors(adapter)
            layer.set_factors(adapter, a_full, torch.randn(b_full.shape, generator=gen) * std)


def gathered_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter gradient at unsharded shape; on a TP-sharded model every rank must call it.

    The one place that asks a layer's TP style how its factor shards join (``gather_pair``).
    """
    out = {}
    for name, layer in bdlora_layers(model):
        for adapter in layer.lora_A:
            grads = layer.lora_A[adapter].grad, layer.lora_B[adapter].grad
            if layer.tp_style is not None:
                grads = layer.tp_style.gather_pair(*grads)
            out[f"{name}.lora_A.{adapter}"], out[f"{name}.lora_B.{adapter}"] = (g.clone() for g in grads)
    return out


def train_forward(model: nn.Module, ids: torch.Tensor) -> dict:
    """Loss, logits and adapter gradients of one train-mode forward and backward (dropout 0)."""
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"loss": out.loss.item(), "logits": out.logits.detach(), "grads": gathered_grads(model)}


def transformers_logits(model_dir: str) -> torch.Tensor:
    return eval_logits(transformers_model(model_dir), batch())


def reference(model_dir: str) -> dict:
    """Single process, no meta device: transformers' model with the same adapter added in place."""
    model = transformers_model(model_dir)
    torch.manual_seed(ADAPTER_SEED)
    bdlora.apply_bdlora(model, adapter_config(model_dir))
    randomize_adapter(model)
    return train_forward(model, batch())


def check_arch(model_dir: str, adapter_dir: str, mesh=None) -> dict:
    """On every rank: zero-adapter logits, then a random adapter's loss/logits/grads, saved for PEFT."""
    ids = batch()
    model = bdlora.from_pretrained(model_dir, adapter_config(model_dir), mesh=mesh, seed=ADAPTER_SEED)
    result = {"zero_logits": eval_logits(model, ids)}
    randomize_adapter(model)
    result |= train_forward(model, ids)
    result["eval_logits"] = eval_logits(model, ids)
    bdlora.save_adapter(model, adapter_dir)
    return result | {"adapter_dir": adapter_dir}


def capture(fn, *args) -> Any:
    """``fn(*args)``, or the traceback of what it raised, so that one architecture's failure is its own."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001  (reported by that architecture's tests)
        return traceback.format_exc()


def check_archs(model_dirs: dict[str, str], adapter_root: str, mesh=None) -> dict[str, dict | str]:
    """``check_arch`` for every architecture, each one's failure kept as its traceback."""
    root = Path(adapter_root)
    return {arch: capture(check_arch, d, str(root / arch), mesh) for arch, d in model_dirs.items()}


def check_archs_tp(model_dirs: dict[str, str], adapter_root: str, tp: int) -> dict[str, dict | str]:
    """The rank function for ``run_distributed``: every architecture on one TP mesh."""
    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=tp))
    return check_archs(model_dirs, adapter_root, mesh)


def peft_logits(model_dir: str, adapter_dir: str) -> torch.Tensor:
    """Logits of transformers' model with the saved adapter loaded by PEFT."""
    from peft import PeftModel

    return eval_logits(PeftModel.from_pretrained(transformers_model(model_dir), adapter_dir), batch())
