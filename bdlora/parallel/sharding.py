"""Shard a built model's base weights and adapters over a TP group, Megatron-style.

``shard_tp_`` applies the model's TP plan (``base_model_tp_plan``, or one the caller gives): every
linear layer it lists keeps only its shard (``styles.LinearLayout``), its adapters keep theirs (the
sharding scheme's placement, ``styles.TPSharding``), and each block gets one boundary that runs f
and g (``placement.BlockBoundary``). ``bdlora.parallelize`` is the public entry point.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.experts import ExpertLinear, experts_modules, wrap_experts
from bdlora.layers import BDLoraLinear, is_adaptable
from bdlora.model import adapters_of, wrap_linear
from bdlora.parallel.comm import TPGroup
from bdlora.parallel.experts import check_expert_plan, check_experts_tp, shard_experts_
from bdlora.parallel.placement import BlockBoundary, BlockSpec, plan_blocks
from bdlora.parallel.styles import PLAN_STYLES, BDLoraTP, LinearLayout, TPSharding, keep_local_shards_
from bdlora.plan import Plan
from bdlora.roles import REPLICATED_STYLES, Role, name_role, plan_regexes


def tp_plan_of(model: nn.Module) -> dict[str, str]:
    tp_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not tp_plan:
        suggested = json.dumps(suggest_tp_plan(model)) or "{}"
        raise BDLoraConfigError(
            f"{type(model).__name__} has no TP plan: its config has no base_model_tp_plan. Give one with "
            f"tp_plan= (trainer: parallel.tp_plan), module pattern -> style "
            f"({', '.join(sorted(PLAN_STYLES))}). "
            f"From its layers' names: {suggested}. Each block (the parent of its column layers and its "
            f"one row layer) must return exactly the row layer's output, and its attention must size "
            f"heads from its input (as transformers' Llama does)"
        )
    return tp_plan


def suggest_tp_plan(model: nn.Module) -> dict[str, str]:
    """A TP plan from the linear layers whose names say their role (q_proj, o_proj, fc1, ...)."""
    prefix = getattr(model, "base_model_prefix", "model") + "."
    plan = {}
    for name, module in model.named_modules():
        role = name_role(name) if is_adaptable(module) else None
        if role is not None:
            key = re.sub(r"\.\d+\.", ".*.", name.removeprefix(prefix))
            plan[key] = "colwise" if role is Role.COLUMN else "rowwise"
    return plan


def tp_layouts(model: nn.Module) -> dict[str, LinearLayout]:
    """LinearLayout of every linear layer the model's TP plan shards (layers it keeps whole left out)."""
    regexes = plan_regexes(tp_plan_of(model))
    out = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer") or not (is_adaptable(module) or isinstance(module, BDLoraLinear)):
            continue
        if isinstance(module, ExpertLinear):  # split with its experts (``parallel.experts``)
            continue
        for regex, key, style in regexes:
            if regex.fullmatch(name):
                if style in REPLICATED_STYLES:  # whole on every rank; f sums its input gradient
                    break
                if style not in PLAN_STYLES:
                    raise BDLoraConfigError(
                        f"module {name!r} has TP style {style!r} (plan key {key!r}), which bdlora cannot "
                        f"shard; supported: {', '.join(sorted(PLAN_STYLES))}"
                    )
                if not isinstance(_base(module), nn.Linear):
                    raise BDLoraConfigError(
                        f"module {name!r} is a {type(_base(module)).__name__}; bdlora TP-shards nn.Linear "
                        f"layers only (train it at TP 1)"
                    )
                out[name] = LinearLayout.from_style(style)
                break
    return out


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, BDLoraLinear) else module


def check_model_tp(
    model: nn.Module, tp: int, sharding: type[TPSharding] = BDLoraTP, ep: int = 1
) -> tuple[list[BlockSpec], dict[str, LinearLayout]]:
    """Validate that ``model`` (and its adapters) shard evenly over ``tp`` ranks, its MoE experts
    at expert-parallel degree ``ep``, and that every f/g operator has one place; returns the blocks
    and the linear layers' layouts."""
    _check_heads(model, tp)
    experts = dict(experts_modules(model))
    layouts = {**tp_layouts(model), **_moe_linear_layouts(model, experts)}
    for name, layout in layouts.items():
        _check_linear(model.get_submodule(name), name, layout, tp, sharding)
    for name, module in experts.items():
        check_experts_tp(name, module, tp, ep, [])
    for record in adapters_of(model).values():
        check_adapter_plan(record.plan, tp, sharding, layouts, experts, ep)
    moe_blocks = {name.rpartition(".")[0]: name for name in experts}
    return plan_blocks([(name, layout.role) for name, layout in layouts.items()], moe_blocks), layouts


def check_adapter_plan(
    plan: Plan,
    tp: int,
    sharding: type[TPSharding],
    layouts: dict[str, LinearLayout],
    experts: dict[str, nn.Module],
    ep: int,
) -> None:
    """An adapter plan suits the model's sharding: its linear layers by ``sharding``, its expert
    tensors by the experts' (``parallel.experts``)."""
    sharding.check_plan(replace(plan, modules=[m for m in plan.modules if not m.experts]), tp, layouts)
    check_expert_plan(plan, experts, tp, ep, sharding.name)


def _moe_linear_layouts(model: nn.Module, experts: dict[str, nn.Module]) -> dict[str, LinearLayout]:
    """Layouts of the shared-expert linears inside MoE blocks that the TP plan does not list: their
    roles from their names (gate/up column, down row); a linear with no such name (a shared-expert
    gate, a router) stays whole on every rank."""
    planned = tp_layouts(model)
    blocks = {name.rpartition(".")[0] + "." for name in experts}
    out = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(b) for b in blocks) and not any(name.startswith(e) for e in experts)
        if not inside or name in planned or name.endswith("base_layer"):
            continue
        if is_adaptable(module) or isinstance(module, BDLoraLinear):  # expert tensors are left out above
            role = name_role(name)
            if role is not None:
                out[name] = LinearLayout(role)
    return out


def _check_heads(model: nn.Module, tp: int) -> None:
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


def _check_linear(
    layer: nn.Module, name: str, layout: LinearLayout, tp: int, sharding: type[TPSharding]
) -> None:
    role = layout.role
    d_out, d_in = layer.global_shape if isinstance(layer, BDLoraLinear) else tuple(layer.weight.shape)
    split_name, split = ("d_out", d_out) if role.value == "column" else ("d_in", d_in)
    if split % (tp * layout.segments):
        packed = f" in {layout.segments} packed segments" if layout.segments > 1 else ""
        raise BDLoraConfigError(
            f"module {name!r} ({role.value}-parallel): {split_name}={split} is not divisible by the "
            f"TP degree {tp}{packed}"
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
    model: nn.Module,
    tp: TPGroup,
    sharding: type[TPSharding],
    blocks: list[BlockSpec],
    layouts: dict[str, LinearLayout],
    ep: int = 1,
) -> list[BlockBoundary]:
    """Shard ``model`` in place over ``tp`` (validated by ``check_model_tp``); returns the boundaries."""
    boundaries = []
    for spec in blocks:
        for name in (*spec.columns, *spec.rows):
            _shard_linear(model, name, sharding(name, tp, layouts[name]))
        if spec.experts is not None:
            shard_experts_(wrap_experts(model, spec.experts), spec.experts, tp, ep)
        boundaries.append(BlockBoundary(spec, model, tp))
    return boundaries


def _shard_linear(model: nn.Module, name: str, style: TPSharding) -> None:
    keep_local_shards_(wrap_linear(model, name, style.layout.role), style)
