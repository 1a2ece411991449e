"""Sharded checkpoints: each TP rank writes its own shard, no gather.

A directory holds ``adapter-tp{i}-of-{t}.safetensors`` for every TP rank ``i`` plus
``bdlora_shards.json`` (the config, ``t`` and the sharding mode); the trainer adds optimizer state
as ``optim-tp{i}-of-{t}.safetensors`` the same way. It reloads at any TP degree that divides
``nblocks``: each factor is joined from its shards by the sharding that split it
(``bdlora.parallel.styles``; packed layers' segments are recorded), and the new rank keeps its own
slice of that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.experts import ExpertLinear
from bdlora.fsutil import write_file_atomic
from bdlora.layers import BDLoraLinear
from bdlora.model import adapters_of, add_adapter_, remove_adapter_
from bdlora.parallel.experts import ExpertLayout
from bdlora.parallel.parallelize import sharding_of, tp_of
from bdlora.parallel.styles import LinearLayout, TPSharding, sharding_class

META_NAME = "bdlora_shards.json"
FACTORS = ("lora_A", "lora_B")


def shard_file_name(stem: str, rank: int, size: int) -> str:
    return f"{stem}-tp{rank:03d}-of-{size:03d}.safetensors"


def save_shard_file(
    directory: Path, stem: str, tensors: dict[str, torch.Tensor], rank: int, size: int
) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file_atomic(directory / shard_file_name(stem, rank, size), lambda p: save_file(tensors, p))


@contextmanager
def open_shards(directory: Path, stem: str, size: int) -> Iterator[list]:
    missing = [
        shard_file_name(stem, r, size)
        for r in range(size)
        if not (directory / shard_file_name(stem, r, size)).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{directory}: incomplete sharded checkpoint, missing {missing}")
    with ExitStack() as stack:
        yield [
            stack.enter_context(safe_open(str(directory / shard_file_name(stem, r, size)), "pt"))
            for r in range(size)
        ]


def packed_segments(model: nn.Module, adapter_name: str) -> dict[str, int]:
    """Module -> packed segments, for the adapted modules whose shards are slices of each segment."""
    out = {}
    for m in adapters_of(model)[adapter_name].plan.modules:
        style = model.get_submodule(m.name).tp_style
        if style is not None and style.layout.segments > 1:
            out[m.name] = style.layout.segments
    return out


def expert_layouts(model: nn.Module, adapter_name: str) -> dict[str, dict]:
    """Expert tensor -> how its shards split (gate/up segments, expert-parallel degree)."""
    out = {}
    for m in adapters_of(model)[adapter_name].plan.modules:
        style = model.get_submodule(m.name).tp_style
        if m.experts and style is not None:
            out[m.name] = {"segments": style.layout.segments, "ep": style.layout.ep}
    return out


def saved_layout(meta: dict, name: str, layer: BDLoraLinear) -> LinearLayout | ExpertLayout:
    """How module ``name``'s shards were split when the checkpoint ``meta`` describes was written."""
    if isinstance(layer, ExpertLinear):
        saved = meta.get("experts", {}).get(name, {})
        return ExpertLayout(layer.role, saved.get("segments", 1), saved.get("ep", 1))
    return LinearLayout(layer.role, meta.get("packed_segments", {}).get(name, 1))


def layer_layout(layer: BDLoraLinear) -> LinearLayout:
    return layer.tp_style.layout if layer.tp_style is not None else LinearLayout(layer.role)


def full_factors(
    shards: list, key: str, layout: LinearLayout | ExpertLayout, sharding: type[TPSharding], suffix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Module ``key``'s unsharded (A, B), or factor-shaped state (``suffix``: ``.exp_avg``), read
    from every rank's shard file."""
    a_parts = [s.get_tensor(f"{key}.lora_A{suffix}") for s in shards]
    b_parts = [s.get_tensor(f"{key}.lora_B{suffix}") for s in shards]
    if isinstance(layout, ExpertLayout):
        return layout.unshard(a_parts, b_parts)
    return sharding.unshard_factors(layout, a_parts, b_parts)


def adapter_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, BDLoraLinear]]:
    """(module name, layer) for every module an adapter adapts."""
    for m in adapters_of(model)[adapter_name].plan.modules:
        yield m.name, model.get_submodule(m.name)


def save_sharded_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", write: bool = True
) -> None:
    """Write this TP rank's shard (``write=False`` on DP replicas that hold the same shard)."""
    if not write:
        return
    tp, sharding = tp_of(model), sharding_of(model).name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{factor}": getattr(layer, factor)[adapter_name]
        for name, layer in adapter_layers(model, adapter_name)
        for factor in FACTORS
    }
    save_shard_file(directory, "adapter", tensors, tp.rank, tp.size)
    if tp.rank == 0:
        meta = {
            "tp": tp.size,
            "sharding": sharding,
            "packed_segments": packed_segments(model, adapter_name),
            "experts": expert_layouts(model, adapter_name),
            "tp_plan": getattr(model.config, "base_model_tp_plan", None),  # the roles it was trained with
            "adapter_name": adapter_name,
            "config": adapters_of(model)[adapter_name].config.to_dict(),
        }
        write_file_atomic(directory / META_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def read_shard_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a bdlora sharded adapter checkpoint")
    return json.loads(path.read_text())


@torch.no_grad()
def restore_adapter_(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Overwrite the factors of an existing adapter from a sharded checkpoint (any TP degree)."""
    meta = read_shard_meta(directory)
    _check_sharding(meta, model, directory)
    live = adapters_of(model)[adapter_name].config.to_dict()
    saved = {**BDLoraConfig().to_dict(), **meta["config"]}  # fields added since: their defaults
    changed = sorted(k for k in live if live[k] != saved.get(k))
    if changed:
        raise BDLoraConfigError(
            f"{directory} was saved with a different adapter config: "
            + ", ".join(f"{k}={meta['config'].get(k)!r} (now {live[k]!r})" for k in changed)
            + "; resume with the checkpoint's settings"
        )
    sharding = sharding_class(meta["sharding"])
    with open_shards(Path(directory), "adapter", meta["tp"]) as shards:
        for name, layer in adapter_layers(model, adapter_name):
            layout = saved_layout(meta, name, layer)
            layer.set_factors(adapter_name, *full_factors(shards, name, layout, sharding))


def _check_sharding(meta: dict, model: nn.Module, directory) -> None:
    sharding = sharding_of(model).name
    if meta["sharding"] != sharding:
        raise BDLoraConfigError(
            f"{directory} holds a {meta['sharding']!r}-sharded adapter; the model is sharded {sharding!r}"
        )


def load_sharded_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Add ``adapter_name`` from a sharded checkpoint written at any TP degree dividing ``nblocks``."""
    meta = read_shard_meta(directory)
    _check_sharding(meta, model, directory)
    add_adapter_(model, BDLoraConfig.from_dict(meta["config"]), adapter_name, init=False)
    try:
        restore_adapter_(model, directory, adapter_name)
    except BaseException:  # leave no adapter of uninitialised factors behind
        remove_adapter_(model, adapter_name)
        raise
