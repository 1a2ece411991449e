"""bdlora: block-diagonal LoRA trained sharded, in step with tensor-parallel base weights.

The public API. Each function's docstring says whether every rank must call it: on a model that
is not TP-sharded none of them issues a collective, so rank-0-only calls are safe; on a TP-sharded
model the ones that gather or change sharded state must run on every rank, and a call some ranks
skip fails on the others within ``BDLORA_CALL_TIMEOUT`` seconds instead of hanging.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bdlora.combine import combine_adapters
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

# Names load on first use, so ``import bdlora.serve.vllm_plugin`` inside a vLLM process (whose
# environment pins another transformers) does not import the training stack.
_EXPORTS = {
    "BDLoraConfig": "bdlora.config",
    "BDLoraConfigError": "bdlora.config",
    "BDLoraLinear": "bdlora.layers",
    "BDLoraState": "bdlora.state",
    "Plan": "bdlora.plan",
    "Role": "bdlora.roles",
    "SavePretrainedError": "bdlora.state",
    "apply_bdlora": "bdlora.model",
    "combine_adapters": "bdlora.combine",
    "delete_adapter": "bdlora.model",
    "disable_adapters": "bdlora.model",
    "from_pretrained": "bdlora.parallel",
    "load_adapter": "bdlora.peft_io",
    "merge_adapter": "bdlora.model",
    "merge_and_unload": "bdlora.model",
    "no_sync": "bdlora.parallel",
    "parallelize": "bdlora.parallel",
    "resolve_plan": "bdlora.plan",
    "save_adapter": "bdlora.peft_io",
    "set_adapter": "bdlora.model",
    "state_of": "bdlora.state",
    "unmerge_adapter": "bdlora.model",
}


__all__ = [
    "BDLoraConfig",
    "BDLoraConfigError",
    "BDLoraLinear",
    "BDLoraState",
    "Plan",
    "Role",
    "SavePretrainedError",
    "apply_bdlora",
    "combine_adapters",
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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bdlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
