"""Inject BD-LoRA adapters into a built model, and manage them (switch, merge, delete).

On a model that is not TP-sharded none of these issue a collective, so they may run on one rank
alone. On a TP-sharded model (``bdlora.parallelize``) every rank must make the same calls in the
same order (``bdlora.parallel.mesh.check_in`` says what happens when they do not).

The base weights hold at most one adapter: the active one, once merged. Activating or merging
another adapter unmerges the merged one first, with a warning (as PEFT does).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.experts import BDLoraExperts, RouterLinear, is_experts, is_router, wrap_experts
from bdlora.layers import BDLoraLinear
from bdlora.mixed_batch import install_mixed_batch
from bdlora.plan import ModulePlan, resolve_plan
from bdlora.roles import Role
from bdlora.state import AdapterRecord, on_every_rank, release_, state_of


def adapters_of(model: nn.Module) -> dict[str, AdapterRecord]:
    """Adapter name -> config and plan (empty for a model without bdlora adapters)."""
    return state_of(model).adapters


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
    Factors are drawn unsharded from the torch RNG and each rank keeps its shard, so equal seeds
    give the same adapter at every TP degree.

    Every rank: only on a TP-sharded model (``base_stats`` init all-reduces weight statistics).

    The model then also runs mixed batches, as PEFT's ``PeftModel`` does: ``model(input_ids,
    adapter_names=[...])`` and ``model.generate(input_ids, adapter_names=[...])``, one adapter name
    per row (``"__base__"``: the base model alone), in eval mode (``bdlora.mixed_batch``).
    """
    return on_every_rank(model, "apply_bdlora", add_adapter_, model, config, adapter_name, init)


def add_adapter_(model: nn.Module, config: BDLoraConfig, adapter_name: str, init: bool = True) -> nn.Module:
    """``apply_bdlora`` without the every-rank check, for callers already inside one."""
    state = state_of(model)
    if adapter_name in state.adapters:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name")
    if state.parallel is not None:
        config = state.parallel.adapter_config(config)
    plan = resolve_plan(model, config)
    if state.parallel is not None:
        state.parallel.check_plan(plan)
    for mp in plan.modules:
        if not mp.experts:  # an expert tensor's role is fixed
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
    state_of(model, create=True).adapters[adapter_name] = AdapterRecord(config, plan)
    install_mixed_batch(model)
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
    shape_a, shape_b = layer.factor_shapes(mp.rank, mp.global_nblocks)
    w = layer.weight
    a_full = torch.empty(shape_a, dtype=w.dtype, device=w.device)
    b_full = torch.empty(shape_b, dtype=w.dtype, device=w.device)
    base_std = layer.weight_std() if mp.settings.init == "base_stats" else 0.0
    layer.init_full(a_full, b_full, mp.settings.init, base_std, mp.d_in)
    layer.set_factors(adapter_name, a_full, b_full)


def wrap_linear(model: nn.Module, name: str, role: Role) -> BDLoraLinear:
    """The BDLoraLinear at ``name``, replacing a plain nn.Linear there on first use."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if is_experts(parent):  # an expert tensor: its experts module becomes a BDLoraExperts
        state_of(model, create=True)
        return getattr(wrap_experts(model, parent_name), child)
    module = model.get_submodule(name)
    if isinstance(module, BDLoraLinear):
        return module
    layer = RouterLinear(module, role) if is_router(model, name, module) else BDLoraLinear(module, role)
    setattr(parent, child, layer)
    state_of(model, create=True)
    return layer


def _check_role(module: nn.Module, mp: ModulePlan) -> None:
    if isinstance(module, BDLoraLinear) and module.role is not mp.role:
        raise ValueError(
            f"module {mp.name!r} is already {module.role.value}-parallel for adapter(s) "
            f"{list(module.lora_A)}; a second adapter cannot make it {mp.role.value}-parallel"
        )


def _known(model: nn.Module, adapter_name: str) -> None:
    adapters = adapters_of(model)
    if adapter_name not in adapters:
        raise KeyError(f"no adapter {adapter_name!r}; have: {', '.join(adapters) or 'none'}")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Activate ``adapter_name`` on every layer that has it (others keep their active adapter).

    An adapter merged into those layers is unmerged first, with a warning (PEFT's behaviour):
    forward then adds ``adapter_name`` alone; ``merge_adapter`` merges it.

    Every rank: only on a TP-sharded model.
    """
    _known(model, adapter_name)
    layers = [layer for _, layer in bdlora_layers(model) if adapter_name in layer.lora_A]
    unmerged = _merged_besides(layers, adapter_name)

    def activate() -> None:
        for layer in layers:
            layer.set_adapter(adapter_name)

    on_every_rank(model, "set_adapter", activate)
    if unmerged:
        warnings.warn(
            f"set_adapter({adapter_name!r}): adapter(s) {unmerged} were merged into the base weights, "
            f"which hold one adapter at a time; unmerged them first, as PEFT does. Call "
            f"bdlora.merge_adapter(model) to merge {adapter_name!r}.",
            stacklevel=2,
        )


def _merged_besides(layers: Iterable[BDLoraLinear], keep: str | None) -> list[str]:
    """The adapters merged into ``layers`` other than ``keep`` (``None``: each layer's active one)."""
    return sorted({n for layer in layers for n in layer.merged if n != (keep or layer.active_adapter)})


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` (unmerging it first if merged). Every rank: only on a TP-sharded model."""
    _known(model, adapter_name)

    on_every_rank(model, "delete_adapter", remove_adapter_, model, adapter_name)


def remove_adapter_(model: nn.Module, adapter_name: str) -> None:
    """``delete_adapter`` without the every-rank check, for callers already inside one."""
    _remove_from_layers(model, adapter_name)
    adapters_of(model).pop(adapter_name, None)


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the active (or named) adapter into the base weights; forward then skips it.

    A named adapter becomes the active one on the layers that have it. The base weights hold one
    adapter at a time: another merged adapter is unmerged first, with a warning.

    On a TP-sharded model each rank merges its own shard (no communication); every rank must call it.
    """
    if adapter_name is not None:
        _known(model, adapter_name)
    layers = [
        layer for _, layer in bdlora_layers(model) if adapter_name is None or adapter_name in layer.lora_A
    ]
    unmerged = _merged_besides(layers, adapter_name)

    def merge() -> None:
        for layer in layers:
            layer.merge(adapter_name)

    on_every_rank(model, "merge_adapter", merge)
    if unmerged:
        warnings.warn(
            f"merge_adapter: adapter(s) {unmerged} were merged into the base weights, which hold one "
            f"adapter at a time; unmerged them first.",
            stacklevel=2,
        )


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights. Every rank: only on a TP-sharded model."""

    def unmerge() -> None:
        for _, layer in bdlora_layers(model):
            layer.unmerge()

    on_every_rank(model, "unmerge_adapter", unmerge)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block; merged adapters are unmerged, then merged back.

    Every rank: only on a TP-sharded model (entering the block is the call).
    """
    layers = [layer for _, layer in bdlora_layers(model)]
    merged = [list(layer.merged) for layer in layers]

    def disable() -> None:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True

    on_every_rank(model, "disable_adapters", disable)
    try:
        yield
    finally:
        for layer, names in zip(layers, merged):
            layer.disabled = False
            for name in names:
                layer.merge(name)


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter (only it: the weights hold one adapter at a time) into the base
    weights and put the plain linear layers back.

    What remains is the transformers model alone: ``save_pretrained`` writes it under its original
    weight names and ``from_pretrained`` loads it. Not on a TP-sharded model, whose weights are
    shards (``bdlora export --format merged`` merges a trained run without gathering it). One
    process; issues no collective.
    """
    state = state_of(model)
    if state.sharded:
        raise ValueError(
            "merge_and_unload needs the full weights; the model is TP-sharded. Save the adapter with "
            "bdlora.save_adapter and merge at TP 1, or use `bdlora export RUN_DIR --format merged`"
        )
    for name, layer in list(bdlora_layers(model)):
        layer.merge()
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if not isinstance(owner, BDLoraExperts):
            setattr(owner, child, layer.base_layer)
    for name, experts in [(n, m) for n, m in model.named_modules() if isinstance(m, BDLoraExperts)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, experts.base_module())
    release_(model)
    return model
