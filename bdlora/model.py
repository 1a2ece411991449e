"""Inject BD-LoRA adapters into a built model, and manage them (switch, merge, delete)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.layers import BDLoraLinear, init_factors
from bdlora.parallel.comm import TPGroup, sum_over
from bdlora.plan import ModulePlan, Plan, check_plan_tp, resolve_plan
from bdlora.roles import Role


@dataclass
class AdapterRecord:
    """What ``save_adapter`` needs to write an adapter back out."""

    config: BDLoraConfig
    plan: Plan


def adapters_of(model: nn.Module) -> dict[str, AdapterRecord]:
    return model.__dict__.setdefault("bdlora_adapters", {})


def tp_state(model: nn.Module) -> tuple[TPGroup, str]:
    """The TP group a model is sharded over and its sharding mode (``bdlora`` or ``slora``)."""
    return model.__dict__.get("bdlora_tp", (TPGroup(None), "bdlora"))


def bdlora_layers(model: nn.Module) -> Iterator[tuple[str, BDLoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, BDLoraLinear):
            yield name, module


def apply_bdlora(
    model: nn.Module, config: BDLoraConfig, adapter_name: str = "default", init: bool = True
) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return it.

    The whole config is resolved and validated first; no module changes if anything is wrong.
    All non-adapter parameters are frozen. With ``init=False`` the factors are left for a loader
    to fill. Calling it again with another name adds a second adapter (the first stays active).
    """
    if adapter_name in adapters_of(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name")
    tp, sharding = tp_state(model)
    if sharding == "slora":  # the baseline trains dense LoRA
        config = replace(config, nblocks=1)
    plan = resolve_plan(model, config)
    check_plan_tp(plan, tp.size, sharding)
    for mp in plan.modules:
        _check_role(model.get_submodule(mp.name), mp)
    model.requires_grad_(False)
    try:
        for mp in plan.modules:
            layer = wrap_linear(model, mp.name, mp.role)
            s = mp.settings
            layer.add_adapter(adapter_name, s.rank, config.nblocks, s.scale, s.dropout)
            if init:
                _init_adapter(layer, adapter_name, mp)
    except BaseException:
        _remove_from_layers(model, adapter_name)
        raise
    finally:
        _thaw_active(model)
    adapters_of(model)[adapter_name] = AdapterRecord(config, plan)
    return model


def _thaw_active(model: nn.Module) -> None:
    """Re-enable the active adapters that ``model.requires_grad_(False)`` froze."""
    for _, layer in bdlora_layers(model):
        if layer.active_adapter is not None:
            layer.set_adapter(layer.active_adapter)


def _remove_from_layers(model: nn.Module, adapter_name: str) -> None:
    for _, layer in bdlora_layers(model):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)


def _init_adapter(layer: BDLoraLinear, adapter_name: str, mp: ModulePlan) -> None:
    """Initialise the unsharded factors, then keep this rank's shard: the same RNG draws at any TP."""
    (shape_a, shape_b), _ = layer.factor_shapes(mp.rank, mp.nblocks)
    w = layer.weight
    a_full = torch.empty(shape_a, dtype=w.dtype, device=w.device)
    b_full = torch.empty(shape_b, dtype=w.dtype, device=w.device)
    base_std = global_std(w, layer.tp) if mp.settings.init == "base_stats" else 0.0
    init_factors(a_full, b_full, mp.settings.init, base_std, mp.d_in)
    layer.set_factors(adapter_name, a_full, b_full)


def global_std(w_local: torch.Tensor, tp: TPGroup) -> float:
    """Standard deviation of the unsharded weight from its shards (one all-reduce at TP > 1)."""
    w = w_local.detach().double()
    stats = torch.stack([w.sum(), (w * w).sum(), w.new_tensor(float(w.numel()))])
    total, sq, n = sum_over(stats, tp.group).tolist()
    return math.sqrt(max(sq - total * total / n, 0.0) / (n - 1))


def wrap_linear(model: nn.Module, name: str, role: Role) -> BDLoraLinear:
    """The BDLoraLinear at ``name``, replacing a plain nn.Linear there on first use."""
    module = model.get_submodule(name)
    if isinstance(module, BDLoraLinear):
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = BDLoraLinear(module, role)
    setattr(parent, child, layer)
    return layer


def _check_role(module: nn.Module, mp: ModulePlan) -> None:
    if isinstance(module, BDLoraLinear) and module.role is not mp.role:
        raise ValueError(
            f"module {mp.name!r} is already {module.role.value}-parallel for adapter(s) "
            f"{list(module.lora_A)}; a second adapter cannot make it {mp.role.value}-parallel"
        )


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Activate ``adapter_name`` on every layer that has it (others keep their active adapter)."""
    if adapter_name not in adapters_of(model):
        raise KeyError(f"no adapter {adapter_name!r}; have: {', '.join(adapters_of(model))}")
    for _, layer in bdlora_layers(model):
        if adapter_name in layer.lora_A:
            layer.set_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapters_of(model):
        raise KeyError(f"no adapter {adapter_name!r}; have: {', '.join(adapters_of(model))}")
    _remove_from_layers(model, adapter_name)
    del adapters_of(model)[adapter_name]


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the active (or named) adapter into the base weights; forward then skips it."""
    if adapter_name is not None and adapter_name not in adapters_of(model):
        raise KeyError(f"no adapter {adapter_name!r}; have: {', '.join(adapters_of(model))}")
    for _, layer in bdlora_layers(model):
        if adapter_name is None or adapter_name in layer.lora_A:
            layer.merge(adapter_name)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in bdlora_layers(model):
        layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block; merged adapters are unmerged, then merged back."""
    layers = [layer for _, layer in bdlora_layers(model)]
    merged = [list(layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield
    finally:
        for layer, names in zip(layers, merged):
            layer.disabled = False
            for name in names:
                layer.merge(name)


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
