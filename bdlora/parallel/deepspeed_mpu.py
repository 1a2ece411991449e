"""The mesh as DeepSpeed's "model parallel unit", and the marks its gradient clipping needs.

``deepspeed.initialize(mpu=MeshMPU(mesh))`` tells DeepSpeed which ranks hold TP shards of one model
and which are DP replicas. Without it DeepSpeed takes every rank for a DP replica: it broadcasts TP
rank 0's shards over the other TP ranks at start-up and averages different shards' gradients,
silently. ``mark_tp_sharded`` sets ``tensor_model_parallel`` on every TP-sharded trainable
parameter, which DeepSpeed's clip norm sums over TP (unmarked ones it counts once): without it the
norm, and so the clipping, is silently wrong.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bdlora.layers import BDLoraLinear


class MeshMPU:
    """Answers DeepSpeed's ``get_{model,tensor_model,data}_parallel_{rank,world_size,group}``."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self._tp, self._dp = mesh.get_group("tp"), mesh.get_group("dp")

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._tp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    # DeepSpeed prefers these names where they exist
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def mark_tp_sharded(model: nn.Module) -> int:
    """Set ``tensor_model_parallel`` on TP-sharded trainable parameters; returns how many."""
    marked = 0
    for module in model.modules():
        if not isinstance(module, BDLoraLinear) or module.tp_style is None:
            continue
        for store, sharded in zip((module.lora_A, module.lora_B), module.tp_style.sharded_factors()):
            for param in store.values():
                param.tensor_model_parallel = sharded
                marked += sharded
    return marked
