"""bdlora: block-diagonal LoRA trained sharded, in step with tensor-parallel base weights."""

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.layers import BDLoraLinear
from bdlora.model import (
    apply_bdlora,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
)
from bdlora.peft_io import load_adapter, save_adapter
from bdlora.plan import Plan, resolve_plan
from bdlora.roles import Role

__all__ = [
    "BDLoraConfig",
    "BDLoraConfigError",
    "BDLoraLinear",
    "Plan",
    "Role",
    "apply_bdlora",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge_adapter",
    "resolve_plan",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
