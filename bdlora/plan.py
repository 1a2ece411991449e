"""Resolve a pattern config against a model: which module gets what, validated before any weight moves."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from torch import nn

from bdlora.config import BDLoraConfig, BDLoraConfigError, ModuleSettings
from bdlora.experts import EXPERT_PARAMS, expert_shape, experts_modules, is_experts, is_router, is_transposed
from bdlora.layers import is_adaptable, is_conv1d
from bdlora.roles import Role, UnsupportedTPStyle, plan_regexes, planned_role, role_of


@dataclass(frozen=True)
class ModulePlan:
    """One adapted module: its role, sizes and resolved settings."""

    name: str
    role: Role
    role_source: str
    d_in: int
    d_out: int
    settings: ModuleSettings
    global_nblocks: int  # blocks of the unsharded adapter (the config's nblocks)
    fan_in_fan_out: bool = False  # a transformers Conv1D: its checkpoint stores W as (d_in, d_out)
    experts: int = 0  # an expert tensor (``bdlora.experts``): one adapter per expert, this many

    @property
    def copies(self) -> int:
        return max(1, self.experts)

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def params(self) -> int:
        """BD-LoRA: r (d_in + d_out/N) for column layers, r (d_in/N + d_out) for row layers."""
        if self.role is Role.COLUMN:
            return self.copies * self.rank * (self.d_in + self.d_out // self.global_nblocks)
        return self.copies * self.rank * (self.d_in // self.global_nblocks + self.d_out)

    @property
    def lora_params(self) -> int:
        """Standard LoRA at the same rank: r (d_in + d_out) (per expert for expert tensors)."""
        return self.copies * self.rank * (self.d_in + self.d_out)

    def params_per_rank(self, tp: int) -> int:
        """Every factor splits evenly over TP ranks (A on r or its blocks, B on d_out or r)."""
        return self.params // tp


@dataclass
class Plan:
    """The resolved adapter layout of one model and config (sizes unsharded, as in the config)."""

    global_nblocks: int
    modules: list[ModulePlan]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> ModulePlan:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def lora_params(self) -> int:
        return sum(m.lora_params for m in self.modules)

    def to_dict(self) -> dict:
        """The resolved plan as plain data: what each adapted module got, and the totals."""
        return {
            "nblocks": self.global_nblocks,
            "params": self.params,
            "lora_params": self.lora_params,
            "modules": {
                m.name: {
                    "role": m.role.value,
                    "rank": m.rank,
                    "alpha": m.settings.alpha,
                    "dropout": m.settings.dropout,
                    "init": m.settings.init,
                    "pattern": m.settings.pattern,
                    "shape": [m.d_out, m.d_in],
                    "params": m.params,
                }
                for m in self.modules
            },
            "excluded": dict(self.excluded),
        }

    def format(self, tp: int = 1) -> str:
        """A table of adapted modules (layers with equal settings grouped), exclusions and totals."""
        header = ["module", "role", "role from", "block-diag", "rank", "alpha", "init", "pattern", "params"]
        if tp > 1:
            header.append(f"params/rank (tp={tp})")
        rows = [header]
        for group_name, members in _group_by_layer(self.modules):
            m = members[0]
            row = [
                group_name,
                m.role.value,
                m.role_source,
                f"{m.role.bd_factor} (N={self.global_nblocks})",
                str(m.rank),
                f"{m.settings.alpha:g}",
                m.settings.init,
                _shorten(m.settings.pattern or "-"),
                f"{sum(x.params for x in members):,}",
            ]
            if tp > 1:
                row.append(f"{sum(x.params_per_rank(tp) for x in members):,}")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for group_name, reasons in _group_excluded(self.excluded):
            lines.append(f"excluded  {group_name}  ({reasons})")
        ratio = self.params / self.lora_params if self.lora_params else 0.0
        lines.append(
            f"total: {len(self.modules)} modules, {self.params:,} BD-LoRA params vs "
            f"{self.lora_params:,} standard LoRA at the same ranks ({ratio:.3f}x)"
        )
        if tp > 1:
            lines.append(f"per TP rank (tp={tp}): {self.params // tp:,} params")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _shorten(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


_DIGITS = re.compile(r"\.(\d+)\.")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    numbers = sorted(set(numbers))
    spans, start, prev = [], numbers[0], numbers[0]
    for cur in numbers[1:] + [None]:
        if cur is None or cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
        prev = cur
    return ",".join(spans)


def _group_key(name: str) -> tuple[str, int | None]:
    match = _DIGITS.search(name)
    if not match:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end() :], int(match.group(1))


def _group_by_layer(modules: list[ModulePlan]) -> list[tuple[str, list[ModulePlan]]]:
    groups: dict[tuple, list[ModulePlan]] = {}
    for m in modules:
        template, _ = _group_key(m.name)
        groups.setdefault((template, m.role, m.settings, m.d_in, m.d_out), []).append(m)
    out = []
    for (template, *_), members in groups.items():
        layers = [_group_key(m.name)[1] for m in members]
        name = template if layers[0] is None else template.format("{" + _ranges(layers) + "}")
        out.append((name, members))
    return out


def _group_excluded(excluded: list[tuple[str, str]]) -> list[tuple[str, str]]:
    groups: dict[tuple[str, str], list[int | None]] = {}
    for name, reason in excluded:
        template, layer = _group_key(name)
        groups.setdefault((template, reason), []).append(layer)
    return [
        (t if layers[0] is None else t.format("{" + _ranges(layers) + "}"), reason)
        for (t, reason), layers in groups.items()
    ]


def _linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of the unsharded layer (a TP-sharded BDLoraLinear knows its global shape)."""
    if hasattr(module, "global_shape"):
        d_out, d_in = module.global_shape
        return d_in, d_out
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape  # Conv1D stores W^T
        return d_in, d_out
    return None


def _is_fan_in_fan_out(module: nn.Module) -> bool:
    return getattr(module, "fan_in_fan_out", False) or is_conv1d(module)


def resolve_plan(model: nn.Module, config: BDLoraConfig) -> Plan:
    """Match every module of ``model`` against ``config``; all validation errors raise here."""
    tp_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    plan = Plan(global_nblocks=config.nblocks, modules=[])
    targeted: list[str] = []
    for name, module in model.named_modules():
        if is_experts(module):
            _expert_plans(plan, name, module, config, targeted)
            continue
        if not name or not config.is_target(name) or _is_adapter_part(name) or _in_experts(model, name):
            continue
        if is_router(model, name, module):  # RouterLinear too: its weight is the router's
            _router_plan(plan, name, module, config, targeted)
            continue
        sizes = _linear_sizes(module)
        if sizes is None:
            if not any(True for _ in module.children()):
                raise BDLoraConfigError(
                    f"module {name!r} matches target_modules but is a {type(module).__name__}; "
                    f"bdlora adapts nn.Linear and transformers Conv1D modules only: narrow "
                    f"target_modules or map it to None in patterns"
                )
            continue
        targeted.append(name)
        key, settings = config.match(name)
        if settings is None:
            plan.excluded.append((name, f"pattern {key!r} -> None"))
            continue
        plan.modules.append(_module_plan(name, module, sizes, settings, config.nblocks, tp_plan))
    _check_patterns_used(config, targeted, plan)
    _warn_roles_against_plan(plan, tp_plan)
    _note_unadapted_experts(model, plan)
    if not plan.modules:
        raise BDLoraConfigError(_nothing_to_adapt(model, config, len(targeted), len(plan.excluded), tp_plan))
    if not tp_plan:
        plan.notes.append("the model config has no base_model_tp_plan: roles inferred from names")
    return plan


def _router_plan(plan: Plan, name: str, module: nn.Module, config: BDLoraConfig, targeted: list[str]) -> None:
    """A MoE router named in ``target_modules``: adapted like a column layer over its (E, H) weight."""
    targeted.append(name)
    key, settings = config.match(name)
    if settings is None:
        plan.excluded.append((name, f"pattern {key!r} -> None"))
        return
    if settings.dropout:
        raise BDLoraConfigError(
            f"router {name!r}: dropout {settings.dropout}; a router's adapter is folded into its weight "
            f"for its own forward, which leaves no input to drop out: give it dropout 0 in patterns"
        )
    d_out, d_in = module.weight.shape
    mp = _module_plan(name, module, (d_in, d_out), replace(settings, role=Role.COLUMN), config.nblocks, None)
    plan.modules.append(replace(mp, role_source="router"))


def _in_experts(model: nn.Module, name: str) -> bool:
    """A tensor module inside a MoE experts module: planned by ``_expert_plans``, not as a linear."""
    parent = name.rpartition(".")[0]
    return bool(parent) and is_experts(model.get_submodule(parent))


def _expert_plans(
    plan: Plan, name: str, module: nn.Module, config: BDLoraConfig, targeted: list[str]
) -> None:
    """Plan the expert tensors of experts module ``name`` that ``target_parameters`` names."""
    for p_name, role in EXPERT_PARAMS.items():
        full = f"{name}.{p_name}"
        if not config.is_target_parameter(full):
            continue
        targeted.append(full)
        key, settings = config.match(full)
        if settings is None:
            plan.excluded.append((full, f"pattern {key!r} -> None"))
            continue
        if settings.role is not None and settings.role is not role:
            raise BDLoraConfigError(
                f"patterns[{settings.pattern!r}] gives expert tensor {full!r} the {settings.role.value} "
                f"role; its role is fixed: {role.value} (gate_up_proj column, down_proj row). Drop 'role'"
            )
        num_experts, d_out, d_in = expert_shape(module, p_name)
        mp = _module_plan(full, module, (d_in, d_out), replace(settings, role=role), config.nblocks, None)
        plan.modules.append(
            replace(
                mp, role_source="expert tensor", experts=num_experts, fan_in_fan_out=is_transposed(module)
            )
        )


def _warn_roles_against_plan(plan: Plan, tp_plan) -> None:
    """A role a pattern gives against the TP plan's: such an adapter cannot be BD-LoRA-sharded.

    The usual cause is a PEFT ``use_bdlora`` config with its two lists swapped: PEFT's per-field
    help text says the reverse of its class docstring (``target_modules_bd_a`` names the
    row-parallel layers, whose A is block-diagonal; ``target_modules_bd_b`` the column-parallel ones).
    """
    if not tp_plan:
        return
    regexes = plan_regexes(tp_plan)
    against = []
    for m in plan.modules:
        if m.settings.role is None or m.experts or m.role_source == "router":
            continue
        try:
            planned = planned_role(m.name, regexes)
        except UnsupportedTPStyle:  # refused where the model is sharded, with its own message
            continue
        if planned is not None and planned[0] is not m.role:
            against.append((m.name, m.role.value, planned[1]))
    if not against:
        return
    names = ", ".join(f"{n!r} ({role}; plan: {style})" for n, role, style in against[:4])
    warnings.warn(
        f"{len(against)} module(s) get a role against the model's TP plan: {names}. Adapted this way "
        f"they cannot be BD-LoRA-sharded. From a PEFT use_bdlora config: target_modules_bd_a lists the "
        f"row-parallel layers (o, down: block-diagonal A) and target_modules_bd_b the column-parallel "
        f"ones (q, k, v, gate, up: block-diagonal B), as PEFT's class docstring says (its per-field "
        f"help says the reverse); swap the two lists",
        stacklevel=3,
    )
    plan.notes.append(f"{len(against)} module(s) with a role against the TP plan (a warning said which)")


def _note_unadapted_experts(model: nn.Module, plan: Plan) -> None:
    adapted = {m.name.rpartition(".")[0] for m in plan.modules if m.experts}
    idle = [name for name, _ in experts_modules(model) if name not in adapted]
    if idle:
        plan.notes.append(
            f"{len(idle)} MoE experts module(s) get no adapter (e.g. {idle[0]!r}), nearly all of the "
            f"model's weights: adapt them with target_parameters=['gate_up_proj', 'down_proj']"
        )


def _is_adapter_part(name: str) -> bool:
    return ".lora_" in name or name.endswith(".base_layer")


def _module_plan(
    name: str, module: nn.Module, sizes: tuple[int, int], settings: ModuleSettings, nblocks: int, tp_plan
) -> ModulePlan:
    d_in, d_out = sizes
    if settings.role is not None:
        role, source = settings.role, f"pattern {settings.pattern!r}"
    else:
        try:
            role, source = role_of(name, tp_plan)
        except ValueError as err:
            raise BDLoraConfigError(str(err)) from None
    split_name, split = ("d_out", d_out) if role is Role.COLUMN else ("d_in", d_in)
    if split % nblocks:
        raise BDLoraConfigError(
            f"module {name!r} ({role.value}-parallel, d_in={d_in}, d_out={d_out}): {split_name}={split} "
            f"is not divisible by nblocks={nblocks}; its block-diagonal {role.bd_factor} needs "
            f"{split_name} % nblocks == 0. Pick nblocks dividing {split} or exclude the module."
        )
    return ModulePlan(name, role, source, d_in, d_out, settings, nblocks, _is_fan_in_fan_out(module))


def _check_patterns_used(config: BDLoraConfig, targeted: Iterable[str], plan: Plan) -> None:
    if config.on_unmatched_pattern == "ignore":
        return
    unused = config.unmatched_patterns(targeted)
    if not unused:
        return
    message = (
        f"pattern(s) {', '.join(repr(k) for k in unused)} match no targeted module "
        f"(targets: {config.target_modules})"
    )
    if config.on_unmatched_pattern == "error":
        raise BDLoraConfigError(message + "; fix the regex or set on_unmatched_pattern='warn'")
    warnings.warn(message, stacklevel=3)
    plan.notes.append(message)


def _nothing_to_adapt(model: nn.Module, config: BDLoraConfig, targeted: int, excluded: int, tp_plan) -> str:
    """The "no module left to adapt" error: the model's linear layer names and a target list to paste."""
    message = (
        f"no module left to adapt in {type(model).__name__}: target_modules={config.target_modules} "
        f"matched {targeted} linear modules and patterns excluded {excluded}. "
    )
    if targeted:
        return message + "Map fewer of them to None in patterns."
    leaves, known = _linear_leaves(model, tp_plan)
    message += f"Its nn.Linear / Conv1D layers are named {leaves or '<none>'}. "
    if known:
        message += f"bdlora knows the TP roles of {known}: pass target_modules={known}. "
    return message + (
        "To adapt a layer bdlora has no role for, target it and give its role: "
        "target_modules=[..., 'NAME'], patterns={'NAME': {'role': 'column'}} (column: output split, "
        "q/k/v/up-like; row: input split, o/down-like)."
    )


def _linear_leaves(model: nn.Module, tp_plan) -> tuple[list[str], list[str]]:
    """(leaf names of every adaptable layer, those whose role the TP plan or the name gives)."""
    leaves: dict[str, bool] = {}
    for name, module in model.named_modules():
        if name and is_adaptable(getattr(module, "base_layer", module)) and not _is_adapter_part(name):
            leaf = name.rsplit(".", 1)[-1]
            leaves[leaf] = leaves.get(leaf, False) or _has_role(name, tp_plan)
    return list(leaves), [leaf for leaf, known in leaves.items() if known]


def _has_role(name: str, tp_plan) -> bool:
    try:
        role_of(name, tp_plan)
    except ValueError:
        return False
    return True


def check_plan_tp(plan: Plan, tp: int, whole_blocks: bool = True) -> None:
    """Every adapter factor must split evenly over ``tp`` ranks; with ``whole_blocks`` (BD-LoRA)
    each rank holds whole blocks, aligned with its base shard."""
    if tp == 1:
        return
    if whole_blocks:
        _check_whole_blocks(plan.global_nblocks, tp)
    for m in plan.modules:
        if m.rank % tp:
            raise BDLoraConfigError(
                f"module {m.name!r}: rank {m.rank} (pattern {m.settings.pattern or '-'}) is not divisible "
                f"by the TP degree {tp}"
            )


def _check_whole_blocks(nblocks: int, tp: int) -> None:
    """Each rank holds whole blocks: ``nblocks`` a multiple of ``tp``; dense LoRA (one block) never is."""
    if tp == 1 or nblocks % tp == 0:
        return
    if nblocks == 1:
        what = f"nblocks=1 is dense LoRA (no block-diagonal factor); at the TP degree {tp} a BD-LoRA-sharded "
        what, there = what + "model holds whole blocks per rank, which a dense factor has not", "at TP 1"
    else:
        what = f"nblocks={nblocks} is not divisible by the TP degree {tp}: a BD-LoRA-sharded model holds "
        what, there = what + "whole blocks per rank", f"at a TP degree dividing nblocks={nblocks}"
    raise BDLoraConfigError(
        f"{what}. A new adapter: nblocks among multiples of {tp} (e.g. {tp}, {2 * tp}), or dense LoRA "
        f"with sharding='slora'. A saved one: load it on a model sharded the S-LoRA way, "
        f"bdlora.from_pretrained(..., sharding='slora', adapter_dir=DIR) (a block-diagonal factor "
        f"expanded to the dense one it equals; its forward adds S-LoRA's (tokens, r) collectives), or "
        f"{there}"
    )
