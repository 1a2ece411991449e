"""Shard a built model's base weights and adapters over a TP group, Megatron-style.

``shard_model_`` is the one function that applies the parallel plan: every linear layer listed in
the model config's ``base_model_tp_plan`` keeps only its shard (colwise: output rows, rowwise: input
columns) and its adapters' shards (``bdlora.layers.factor_shard_dims``). Communication per block
(attention or MLP) is Megatron's: ``copy_to_tp`` ("f") once on the block's input, and one
``reduce_from_tp`` ("g") in its row-parallel output layer. BD-LoRA adds nothing to either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.layers import BDLoraLinear, base_shard_dims, factor_shard_dims, take_shard
from bdlora.model import adapters_of, tp_state, wrap_linear
from bdlora.parallel.comm import TPGroup, average_, copy_to_tp, gather_along
from bdlora.plan import check_plan_tp
from bdlora.roles import Role, plan_regexes, planned_role


def tp_linears(model: nn.Module) -> list[tuple[str, Role]]:
    """(name, role) of every linear layer the model's ``base_model_tp_plan`` shards."""
    tp_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not tp_plan:
        raise BDLoraConfigError(
            f"{type(model).__name__} has no base_model_tp_plan in its config: bdlora reads the TP "
            f"layout from it (Llama, Mistral, Qwen2 and SmolLM2 have one)"
        )
    regexes = plan_regexes(tp_plan)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, BDLoraLinear)) or name.endswith("base_layer"):
            continue
        planned = planned_role(name, regexes)
        if planned is not None:
            out.append((name, planned[0]))
    return out


def check_model_tp(model: nn.Module, tp: int, sharding: str = "bdlora") -> list[tuple[str, Role]]:
    """Validate that ``model`` (and its adapters) shard evenly over ``tp`` ranks; returns tp_linears."""
    config = model.config
    for key in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, key, None)
        if value is not None and value % tp:
            raise BDLoraConfigError(
                f"TP degree {tp} does not divide {key}={value}: each rank must hold whole heads. "
                f"Valid TP degrees: {[d for d in range(1, value + 1) if value % d == 0]}"
            )
    linears = tp_linears(model)
    for name, role in linears:
        d_out, d_in = _global_shape(model.get_submodule(name))
        split_name, split = ("d_out", d_out) if role is Role.COLUMN else ("d_in", d_in)
        if split % tp:
            raise BDLoraConfigError(
                f"module {name!r} ({role.value}-parallel): {split_name}={split} is not divisible by the "
                f"TP degree {tp}"
            )
        layer = model.get_submodule(name)
        if (
            sharding == "slora"
            and isinstance(layer, BDLoraLinear)
            and any(n > 1 for n in layer.nblocks.values())
        ):
            raise BDLoraConfigError(
                f"module {name!r} holds block-diagonal adapters (nblocks > 1); sharding='slora' trains "
                f"dense LoRA: add the adapter with nblocks=1, or after sharding"
            )
        if isinstance(layer, BDLoraLinear) and layer.lora_A and layer.role is not role:
            raise BDLoraConfigError(
                f"module {name!r} is {role.value}-parallel in the TP plan but its adapter makes "
                f"{layer.role.bd_factor} block-diagonal ({layer.role.value} role); drop the 'role' override"
            )
    for record in adapters_of(model).values():
        check_plan_tp(record.plan, tp, sharding)
    return linears


def _global_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, BDLoraLinear):
        return module.global_shape
    return tuple(module.weight.shape)


def shard_model_(model: nn.Module, tp: TPGroup, sharding: str = "bdlora") -> nn.Module:
    """Shard ``model`` in place over ``tp``: base shards, adapter shards, f/g collectives."""
    if tp_state(model)[0].size > 1:
        raise ValueError("model is already TP-sharded")
    linears = check_model_tp(model, tp.size, sharding)
    for name, role in linears:
        _shard_linear(model, name, role, tp, sharding)
    blocks = {name.rpartition(".")[0] for name, role in linears if role is Role.COLUMN}
    for block in sorted(blocks):
        model.get_submodule(block).register_forward_pre_hook(_copy_hook(tp), with_kwargs=True)
    model.__dict__["bdlora_tp"] = (tp, sharding)
    return model


def _shard_linear(model: nn.Module, name: str, role: Role, tp: TPGroup, sharding: str) -> None:
    module = wrap_linear(model, name, role)
    module.tp, module.sharding, module.role = tp, sharding, role
    base = module.base_layer
    weight_dim, bias_dim = base_shard_dims(role)
    base.weight = nn.Parameter(take_shard(base.weight.data, weight_dim, tp).clone(), requires_grad=False)
    if base.bias is not None:
        base.bias = nn.Parameter(take_shard(base.bias.data, bias_dim, tp).clone(), requires_grad=False)
    dim_a, dim_b = factor_shard_dims(role, sharding)
    for adapter in module.lora_A:
        for store, dim in ((module.lora_A, dim_a), (module.lora_B, dim_b)):
            full = store[adapter]
            store[adapter] = nn.Parameter(
                take_shard(full.data, dim, tp).clone(), requires_grad=full.requires_grad
            )
        if sharding == "bdlora":  # S-LoRA's dense factors have no blocks to split
            module.nblocks[adapter] //= tp.size


def _copy_hook(tp: TPGroup):
    """Megatron's "f" on a block's input: identity forward, all-reduce of grad_x backward."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = copy_to_tp(kwargs["hidden_states"], tp)
        else:
            args = (copy_to_tp(args[0], tp), *args[1:])
        return args, kwargs

    return hook


def gather_factors(layer: BDLoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded (A, B) of ``adapter``, all-gathered over the layer's TP group (a copy)."""
    dim_a, dim_b = factor_shard_dims(layer.role, layer.sharding)
    return gather_along(layer.lora_A[adapter], dim_a, layer.tp), gather_along(
        layer.lora_B[adapter], dim_b, layer.tp
    )


def allreduce_adapter_grads(model: nn.Module, dp_group: dist.ProcessGroup | None) -> None:
    """Average trainable (adapter) gradients over the DP group in one flat all-reduce."""
    average_([p.grad for p in model.parameters() if p.requires_grad and p.grad is not None], dp_group)
