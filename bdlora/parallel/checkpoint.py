"""Sharded adapter checkpoints: each TP rank writes its own shard, no gather.

A directory holds ``adapter-tp{i}-of-{t}.safetensors`` for every TP rank ``i`` plus
``bdlora_shards.json`` (the config, ``t`` and the sharding mode). It reloads at any TP degree that
divides ``nblocks``: each factor is the concatenation of its shards along its shard dimension,
and the new rank keeps its own slice of that.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.fsutil import write_file_atomic
from bdlora.layers import factor_shard_dims
from bdlora.model import adapters_of, apply_bdlora, tp_state

META_NAME = "bdlora_shards.json"


def shard_file_name(rank: int, size: int) -> str:
    return f"adapter-tp{rank:03d}-of-{size:03d}.safetensors"


def local_adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """This rank's factors, keyed ``<module>.lora_A`` / ``<module>.lora_B``."""
    out = {}
    for m in adapters_of(model)[adapter_name].plan.modules:
        layer = model.get_submodule(m.name)
        out[f"{m.name}.lora_A"] = layer.lora_A[adapter_name].detach().contiguous().clone()
        out[f"{m.name}.lora_B"] = layer.lora_B[adapter_name].detach().contiguous().clone()
    return out


def save_sharded_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", write: bool = True
) -> None:
    """Write this TP rank's shard (``write=False`` on DP replicas that hold the same shard)."""
    if not write:
        return
    from safetensors.torch import save_file

    tp, sharding = tp_state(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = local_adapter_state(model, adapter_name)
    write_file_atomic(directory / shard_file_name(tp.rank, tp.size), lambda p: save_file(tensors, p))
    if tp.rank == 0:
        meta = {
            "tp": tp.size,
            "sharding": sharding,
            "adapter_name": adapter_name,
            "config": adapters_of(model)[adapter_name].config.to_dict(),
        }
        write_file_atomic(directory / META_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def read_shard_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a bdlora sharded adapter checkpoint")
    meta = json.loads(path.read_text())
    missing = [
        shard_file_name(r, meta["tp"])
        for r in range(meta["tp"])
        if not (Path(directory) / shard_file_name(r, meta["tp"])).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{directory}: incomplete sharded checkpoint, missing {missing}")
    return meta


@torch.no_grad()
def load_sharded_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Add ``adapter_name`` from a sharded checkpoint written at any TP degree dividing ``nblocks``."""
    meta = read_shard_meta(directory)
    _, sharding = tp_state(model)
    if meta["sharding"] != sharding:
        raise BDLoraConfigError(
            f"{directory} holds a {meta['sharding']!r}-sharded adapter; the model is sharded {sharding!r}"
        )
    apply_bdlora(model, BDLoraConfig.from_dict(meta["config"]), adapter_name, init=False)
    with ExitStack() as stack:
        shards = [
            stack.enter_context(safe_open(str(Path(directory) / shard_file_name(r, meta["tp"])), "pt"))
            for r in range(meta["tp"])
        ]
        for m in adapters_of(model)[adapter_name].plan.modules:
            layer = model.get_submodule(m.name)
            dims = factor_shard_dims(layer.role, layer.sharding)
            full = [_unshard(shards, f"{m.name}.{f}", d) for f, d in zip(("lora_A", "lora_B"), dims)]
            layer.set_factors(adapter_name, *full)


def _unshard(shards: list, key: str, dim: int | None) -> torch.Tensor:
    if dim is None:
        return shards[0].get_tensor(key)
    return torch.cat([s.get_tensor(key) for s in shards], dim)
