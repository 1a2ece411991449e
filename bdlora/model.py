"""Inject BD-LoRA adapters into a built model, and manage them (switch, merge, delete)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.layers import BDLoraLinear, init_factors
from bdlora.plan import ModulePlan, Plan, resolve_plan


@dataclass
class AdapterRecord:
    """What ``save_adapter`` needs to write an adapter back out."""

    config: BDLoraConfig
    plan: Plan


def adapters_of(model: nn.Module) -> dict[str, AdapterRecord]:
    return model.__dict__.setdefault("bdlora_adapters", {})


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
    plan = resolve_plan(model, config)
    for mp in plan.modules:
        _check_role(model.get_submodule(mp.name), mp)
    model.requires_grad_(False)
    for mp in plan.modules:
        layer = _wrap(model, mp)
        s = mp.settings
        layer.add_adapter(adapter_name, s.rank, config.nblocks, s.scale, s.dropout)
        if init:
            base_std = float(layer.weight.float().std())
            init_factors(layer.lora_A[adapter_name], layer.lora_B[adapter_name], s.init, base_std, mp.d_in)
        layer.set_adapter(layer.active_adapter)
    adapters_of(model)[adapter_name] = AdapterRecord(config, plan)
    return model


def _wrap(model: nn.Module, mp: ModulePlan) -> BDLoraLinear:
    module = model.get_submodule(mp.name)
    if isinstance(module, BDLoraLinear):
        return module
    parent_name, _, child = mp.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = BDLoraLinear(module, mp.role)
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
    for _, layer in bdlora_layers(model):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    del adapters_of(model)[adapter_name]


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the active (or named) adapter into the base weights; forward then skips it."""
    for _, layer in bdlora_layers(model):
        layer.merge(adapter_name)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in bdlora_layers(model):
        layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block."""
    layers = [layer for _, layer in bdlora_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
