"""Build a TP-sharded model without ever materialising the full weights on any rank.

The model is built on the meta device, ``bdlora.parallelize``d, allocated at its local size, and each
rank reads only its own slices of the safetensors files (``safe_open(...).get_slice``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bdlora.config import BDLoraConfig
from bdlora.experts import ExpertLinear
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
    tp_plan: dict[str, str] | None = None,
    ep: int = 1,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
    adapter_dir: str | Path | None = None,
    activation_checkpointing: bool = False,
    data_parallel: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A causal LM from a local Hugging Face directory (safetensors), parallelized over ``mesh``.

    The model is built with its parameters on the meta device, ``bdlora.parallelize``d
    (``sharding``, ``tp_plan``, ``vocab_parallel``, ``sequence_parallel``,
    ``activation_checkpointing``), allocated at its local size, and each rank reads only its own
    slices of the checkpoint (with ``vocab_parallel``, only its rows of the embedding and LM head).
    Buffers are computed by the modules themselves (rotary tables, embedding scales); a tensor
    neither read nor computed is an error naming it. ``adapter_config`` adds a fresh adapter, seeded
    by ``seed`` so every TP degree draws the same factors; ``adapter_dir`` loads a PEFT-format
    adapter instead. Every check (paths, TP degree, the adapter's patterns) runs before any weight
    is read.

    Every rank must call it (with ``mesh=None``: one process).
    """
    layout = dict(
        sharding=sharding,
        tp_plan=tp_plan,
        ep=ep,
        vocab_parallel=vocab_parallel,
        sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing,
        data_parallel=data_parallel,
    )
    model = on_all_ranks(_build_meta, Path(model_dir), adapter_config, adapter_dir, mesh, dtype, layout)
    computed = _materialize(model, device)
    loaded = on_all_ranks(_load_base, model, Path(model_dir), dtype)
    on_all_ranks(check_initialized, model, loaded | computed)
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
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parallelize(model, mesh, **layout)  # validates TP against heads and dimensions first
    if adapter_dir is not None:
        from bdlora.peft_io import check_adapter_tp, read_adapter_config

        adapter_config = read_adapter_config(adapter_dir)
        check_adapter_tp(model, adapter_config, adapter_dir)
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


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device and their buffers real.

    Parameters are read from the checkpoint later; buffers are computed by the modules' own
    constructors (rotary frequencies, embedding scales, masks), exactly as transformers computes
    them, whatever the model. Parameter initialisation then runs on meta tensors, at no cost.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module, device: str | torch.device) -> set[str]:
    """Allocate every meta tensor of ``model`` on ``device`` and keep the buffers its modules
    computed; returns the names of those buffers."""
    computed = {name: buf for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in computed:
                buf.copy_(computed[name])
    return set(computed)


def check_initialized(model: nn.Module, initialized: set[str]) -> None:
    """Refuse a model with a base tensor neither read from the checkpoint nor computed."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    left = [n for n in names if ".lora_" not in n and n not in initialized]
    if left:
        raise RuntimeError(
            f"{len(left)} tensor(s) of {type(model).__name__} were neither read from the checkpoint "
            f"nor computed by their module, so they hold uninitialised memory: {left[:5]}. The "
            f"checkpoint does not match the model its config builds"
        )


@torch.no_grad()
def _load_base(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> set[str]:
    """Copy each rank's slice of every base weight from the checkpoint into the local tensors;
    returns the names of the tensors read (tied ones included).

    safetensors slices are views into an mmap of the whole file, and a column slice (rowwise layers)
    touches every page of its tensor; one handle per tensor unmaps those pages before the next read,
    so a rank's resident memory never holds more than one checkpoint tensor beyond its own shards.
    """
    from bdlora.parallel.conversion import CheckpointIndex

    index = CheckpointIndex(model_dir, model)  # renames and fuses per-expert tensors, as transformers
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing, read = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = checkpoint_name(model, name)
        if ".lora_" in name or (key not in index and key in tied):
            continue
        if key not in index:
            missing.append(key)
            continue
        owner_name, _, p_name = name.replace(".base_layer.", ".").rpartition(".")
        with index.open(key) as source:
            local = _read_local(model.get_submodule(owner_name), p_name, source)
        if local.shape != tensor.shape:
            raise ValueError(
                f"{model_dir}: checkpoint tensor {key!r} gives this rank {tuple(local.shape)}, the "
                f"model holds {tuple(tensor.shape)}: the checkpoint does not match its config.json"
            )
        tensor.data.copy_(local.to(dtype))
        read.add(id(tensor))
    if missing:
        raise KeyError(f"{model_dir}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.tie_weights()
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in read}


def checkpoint_name(model: nn.Module, name: str) -> str:
    """transformers' name of state-dict entry ``name``: bdlora's wrappers hold a linear's base as
    ``<name>.base_layer.weight`` and an expert tensor as ``<experts>.gate_up_proj.base_layer.weight``."""
    key = name.replace(".base_layer.", ".")
    owner_name, _, p_name = key.rpartition(".")
    if ".experts." in key:
        owner = model.get_submodule(owner_name)
        if isinstance(owner, ExpertLinear):
            return owner.checkpoint_key(owner_name, p_name)
    return key


def _read_local(owner: nn.Module, p_name: str, source) -> torch.Tensor:
    """This rank's part of a checkpoint tensor (a lazy slice of it): its shard where ``owner``, the
    module holding it as ``p_name``, is sharded."""
    if isinstance(owner, (VocabParallelEmbedding, VocabParallelLMHead)):
        return owner.shard.take(source)  # padding rows stay zero
    style = getattr(owner, "tp_style", None)
    if style is None:
        return source[...]  # whole, 0-dim scalars included
    return style.read_base(owner, p_name, source)
