"""Shard a built model's base weights and adapters over a TP group, Megatron-style.

``shard_tp_`` applies the model config's ``base_model_tp_plan``: every linear layer it lists keeps
only its shard (colwise: output rows, rowwise: input columns), its adapters keep their shards
(``styles.BDLoraTP.factor_dims``), and each layer gets a TP style that runs f or g for its block
(``placement``). ``bdlora.parallelize`` is the public entry point.
"""

from __future__ import annotations

import math

from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.layers import BDLoraLinear
from bdlora.model import adapters_of, wrap_linear
from bdlora.parallel.comm import TPGroup
from bdlora.parallel.placement import BlockSpec, TPBlock, plan_blocks
from bdlora.parallel.styles import BDLoraTP, take_shard
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


def check_model_tp(model: nn.Module, tp: int, sharding: type[BDLoraTP] = BDLoraTP) -> list[BlockSpec]:
    """Validate that ``model`` (and its adapters) shard evenly over ``tp`` ranks and that every
    f/g operator has one place; returns the blocks."""
    heads = {k: getattr(model.config, k, None) for k in ("num_attention_heads", "num_key_value_heads")}
    heads = {k: v for k, v in heads.items() if v is not None}
    for key, value in heads.items():
        if value % tp:
            common = math.gcd(*heads.values())
            raise BDLoraConfigError(
                f"TP degree {tp} does not divide {key}={value}: each rank must hold whole heads. "
                f"Valid TP degrees (dividing {' and '.join(f'{k}={v}' for k, v in heads.items())}): "
                f"{[d for d in range(1, common + 1) if common % d == 0]}"
            )
    linears = tp_linears(model)
    for name, role in linears:
        _check_linear(model.get_submodule(name), name, role, tp, sharding)
    for record in adapters_of(model).values():
        sharding.check_plan(record.plan, tp)
    return plan_blocks(linears)


def _check_linear(layer: nn.Module, name: str, role: Role, tp: int, sharding: type[BDLoraTP]) -> None:
    d_out, d_in = layer.global_shape if isinstance(layer, BDLoraLinear) else tuple(layer.weight.shape)
    split_name, split = ("d_out", d_out) if role is Role.COLUMN else ("d_in", d_in)
    if split % tp:
        raise BDLoraConfigError(
            f"module {name!r} ({role.value}-parallel): {split_name}={split} is not divisible by the "
            f"TP degree {tp}"
        )
    if not isinstance(layer, BDLoraLinear) or not layer.lora_A:
        return
    if layer.role is not role:
        raise BDLoraConfigError(
            f"module {name!r} is {role.value}-parallel in the TP plan but its adapter makes "
            f"{layer.role.bd_factor} block-diagonal ({layer.role.value} role); drop the 'role' override"
        )
    sharding.check_layer(name, layer)


def shard_tp_(
    model: nn.Module, tp: TPGroup, sharding: type[BDLoraTP], blocks: list[BlockSpec]
) -> list[TPBlock]:
    """Shard ``model`` in place over ``tp`` (validated by ``check_model_tp``); returns the run-time blocks."""
    live = []
    for spec in blocks:
        block = TPBlock(spec, tp)
        live.append(block)
        for name in (*spec.columns, spec.row):
            _shard_linear(model, name, sharding(name, tp, block))
    return live


def _shard_linear(model: nn.Module, name: str, style: BDLoraTP) -> None:
    role = Role.ROW if name == style.block.spec.row else Role.COLUMN
    module = wrap_linear(model, name, role)
    base, tp = module.base_layer, style.tp
    weight_dim, bias_dim = style.base_dims[role]
    base.weight = nn.Parameter(take_shard(base.weight.data, weight_dim, tp).clone(), requires_grad=False)
    if base.bias is not None:
        base.bias = nn.Parameter(take_shard(base.bias.data, bias_dim, tp).clone(), requires_grad=False)
    for adapter in module.lora_A:
        a_local, b_local = style.shard_factors(
            module, module.lora_A[adapter].data, module.lora_B[adapter].data
        )
        for store, local in ((module.lora_A, a_local), (module.lora_B, b_local)):
            store[adapter] = nn.Parameter(local.clone(), requires_grad=store[adapter].requires_grad)
        module.local_nblocks[adapter] = style.local_nblocks(module.local_nblocks[adapter])
    module.tp_style = style
