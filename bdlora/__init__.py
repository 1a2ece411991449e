"""bdlora: block-diagonal LoRA trained sharded, in step with tensor-parallel base weights.

The public API. Each function's docstring says whether every rank must call it: on a model that
is not TP-sharded none of them issues a collective, so rank-0-only calls are safe; on a TP-sharded
model the ones that gather or change sharded state must run on every rank, and a call some ranks
skip fails on the others within ``BDLORA_CALL_TIMEOUT`` seconds instead of hanging.
"""

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.layers import BDLoraLinear
from bdlora.model import (
    apply_bdlora,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unmerge_adapter,
)
from bdlora.parallel import from_pretrained, no_sync, parallelize
from bdlora.peft_io import load_adapter, save_adapter
from bdlora.plan import Plan, resolve_plan
from bdlora.roles import Role
from bdlora.state import BDLoraState, SavePretrainedError, state_of

__all__ = [
    "BDLoraConfig",
    "BDLoraConfigError",
    "BDLoraLinear",
    "BDLoraState",
    "Plan",
    "Role",
    "SavePretrainedError",
    "apply_bdlora",
    "delete_adapter",
    "disable_adapters",
    "from_pretrained",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "no_sync",
    "parallelize",
    "resolve_plan",
    "save_adapter",
    "set_adapter",
    "state_of",
    "unmerge_adapter",
]
