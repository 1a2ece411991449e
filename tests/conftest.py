"""Shared fixtures: seeded tiny models, token batches, and a helper that makes B factors nonzero."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bdlora.presets import build_model
from bdlora.roles import Role

# Tiny models gain nothing from intra-op threads, and idle threads spin on a busy CPU.
torch.set_num_threads(1)
# DeepSpeed on CPU: its communication op is compiled once into the virtual environment (``make
# setup`` does it) and reused by every later run, the subprocesses the tests start included.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY_MODELS = ("tiny-llama", "tiny-qwen2")
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMN_LEAVES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def tiny_model(name: str = "tiny-llama", seed: int = 0) -> nn.Module:
    """A fresh fp32 tiny causal LM in eval mode; equal seeds give equal weights."""
    return build_model(name, seed=seed)


@torch.no_grad()
def randomize_lora_b(model: nn.Module, seed: int = 1, std: float = 0.1, adapter: str | None = None) -> None:
    """Fill LoRA B factors (bdlora or PEFT; all adapters or one) with N(0, std^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if f"lora_B.{adapter or ''}" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the transformer blocks (lm_head left out)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.")]


def peft_layout(peft_model: nn.Module, adapter: str = "default") -> dict[str, tuple]:
    """Module -> (rank, alpha, role of PEFT's block-diagonal factor or None) as PEFT built it."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import BlockDiagonalLinear

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            role = None
            if isinstance(module.lora_A[adapter], BlockDiagonalLinear):
                role = Role.ROW
            elif isinstance(module.lora_B[adapter], BlockDiagonalLinear):
                role = Role.COLUMN
            out[name.removeprefix("base_model.model.")] = (
                module.r[adapter],
                float(module.lora_alpha[adapter]),
                role,
            )
    return out


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(123))


@pytest.fixture
def tiny_llama() -> nn.Module:
    return tiny_model("tiny-llama")
