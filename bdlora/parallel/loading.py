"""Build a TP-sharded model without ever materialising the full weights on any rank.

The model is built on the meta device, ``bdlora.parallelize``d, allocated at its local size, and each
rank reads only its own slices of the safetensors files (``safe_open(...).get_slice``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bdlora.config import BDLoraConfig
from bdlora.layers import BDLoraLinear
from bdlora.model import apply_bdlora
from bdlora.parallel.mesh import on_all_ranks
from bdlora.parallel.parallelize import parallelize
from bdlora.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead
from bdlora.state import state_of


def from_pretrained(
    model_dir: str | Path,
    adapter_config: BDLoraConfig | None = None,
    *,
    mesh: DeviceMesh | None = None,
    dtype: torch.dtype = torch.float32,
    sharding: str = "bdlora",
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
    adapter_dir: str | Path | None = None,
    activation_checkpointing: bool = False,
    data_parallel: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A causal LM from a local Hugging Face directory (safetensors), parallelized over ``mesh``.

    The model is built on the meta device, ``bdlora.parallelize``d (``sharding``,
    ``vocab_parallel``, ``sequence_parallel``, ``activation_checkpointing``), allocated at its
    local size, and each rank reads only its own slices of the checkpoint (with ``vocab_parallel``,
    only its rows of the embedding and LM head). ``adapter_config`` adds a fresh adapter, seeded
    by ``seed`` so every TP degree draws the same factors; ``adapter_dir`` loads a PEFT-format
    adapter instead. Every check (paths, TP degree, the adapter's patterns) runs before any weight
    is read.

    Every rank must call it (with ``mesh=None``: one process).
    """
    layout = dict(
        sharding=sharding,
        vocab_parallel=vocab_parallel,
        sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing,
        data_parallel=data_parallel,
    )
    model = on_all_ranks(_build_meta, Path(model_dir), adapter_config, adapter_dir, mesh, dtype, layout)
    model.to_empty(device=device)
    on_all_ranks(_load_base, model, Path(model_dir), dtype)
    _reset_non_persistent_buffers(model, device)
    if adapter_dir is not None:
        from bdlora.peft_io import load_adapter

        load_adapter(model, adapter_dir)
    elif adapter_config is not None:
        torch.manual_seed(seed)
        apply_bdlora(model, adapter_config)
    return model


def _build_meta(model_dir: Path, adapter_config, adapter_dir, mesh, dtype, layout: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from bdlora.plan import resolve_plan

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    if not weight_files(model_dir):
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parallelize(model, mesh, **layout)  # validates TP against heads and dimensions first
    if adapter_dir is not None:
        from bdlora.peft_io import read_adapter_config

        adapter_config = read_adapter_config(adapter_dir)
    if adapter_config is not None:  # resolve now so a bad pattern fails before any read
        parallel = state_of(model).parallel
        parallel.check_plan(resolve_plan(model, parallel.adapter_config(adapter_config)))
    return model


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def _shard_dim(module: nn.Module, param_name: str) -> int | None:
    """Which dim of a checkpoint tensor this rank slices (None: it reads all of it)."""
    if not isinstance(module, BDLoraLinear) or module.tp_style is None:
        return None
    weight_dim, bias_dim = module.tp_style.base_dims[module.role]
    return weight_dim if param_name == "weight" else bias_dim


@torch.no_grad()
def _load_base(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
    """Copy each rank's slice of every base weight from the checkpoint into the local tensors.

    safetensors slices are views into an mmap of the whole file, and a column slice (rowwise layers)
    touches every page of its tensor; one handle per tensor unmaps those pages before the next read,
    so a rank's resident memory never holds more than one checkpoint tensor beyond its own shards.
    """
    where: dict[str, Path] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))  # noqa: SIM118  (safe_open has no iter)
    missing = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        if key not in where:
            if not _is_tied(model, key):
                missing.append(key)
            continue
        owner_name, _, p_name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        with safe_open(str(where[key]), framework="pt") as handle:
            if isinstance(owner, (VocabParallelEmbedding, VocabParallelLMHead)):
                local = owner.shard.take(handle.get_slice(key))  # padding rows stay zero
            else:
                local = _read_slice(handle, key, _shard_dim(owner, p_name), _tp_of(owner))
            tensor.data.copy_(local.to(dtype))
    if missing:
        raise KeyError(f"{model_dir}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.tie_weights()


def _is_tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _tp_of(module: nn.Module) -> tuple[int, int]:
    style = getattr(module, "tp_style", None)
    return (0, 1) if style is None else (style.tp.rank, style.tp.size)


def _read_slice(handle, key: str, dim: int | None, tp: tuple[int, int]) -> torch.Tensor:
    view = handle.get_slice(key)
    if dim is None:
        return view[:]
    rank, world = tp
    size = view.get_shape()[dim] // world
    start = rank * size
    return view[start : start + size] if dim == 0 else view[:, start : start + size]


def _reset_non_persistent_buffers(model: nn.Module, device) -> None:
    """Rotary tables are computed, not stored: rebuild them from the config on the real device."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=model.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf.to(device))
