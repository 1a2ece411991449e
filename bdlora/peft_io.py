"""Adapters in PEFT's own on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft-bdlora`` writes a ``LoraConfig`` with ``use_bdlora`` and the block-diagonal factor packed
``(out, in / N)`` exactly as PEFT stores it; ``peft-lora`` expands it to a dense factor so any
LoRA consumer loads it. Per-module ranks and alphas go to ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.experts import EXPERT_PARAMS, experts_modules
from bdlora.fsutil import write_file_atomic
from bdlora.layers import dense_factors, global_factor_shapes, is_adaptable
from bdlora.model import adapters_of, add_adapter_, remove_adapter_
from bdlora.peft_experts import from_peft, peft_param_keys, to_peft
from bdlora.plan import ModulePlan, Plan
from bdlora.roles import Role
from bdlora.state import on_every_rank, state_of

FORMATS = ("peft-bdlora", "peft-lora")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _targets(plan: Plan, linear_names: list[str]) -> tuple[list[str], list[str]]:
    """(target_modules, exclude_modules): leaf names, minus the linear modules the plan leaves out."""
    names = [m.name for m in plan.modules if not _is_parameter_target(m)]
    leaves = sorted({_leaf(n) for n in names})
    adapted = set(names)
    excluded = sorted(n for n in linear_names if _leaf(n) in leaves and n not in adapted)
    return leaves, excluded


def _pattern(plan: Plan, value_of, default) -> dict[str, Any]:
    """PEFT ``rank_pattern`` / ``alpha_pattern``: per-leaf keys where a leaf agrees, else full names."""
    by_leaf: dict[str, set] = {}
    for m in plan.modules:
        by_leaf.setdefault(_leaf(m.name), set()).add(value_of(m))
    full, leaf = {}, {}
    for m in plan.modules:
        values = by_leaf[_leaf(m.name)]
        if len(values) == 1 and value_of(m) != default:
            leaf[re.escape(_leaf(m.name))] = value_of(m)
        elif len(values) > 1 and value_of(m) != default:
            full[re.escape(m.name)] = value_of(m)
    return {**full, **leaf}


def _bd_lists(plan: Plan) -> tuple[list[str], list[str]]:
    """Substrings for PEFT's ``target_modules_bd_a`` (row) / ``_bd_b`` (column)."""
    sides = {
        Role.ROW: sorted({_leaf(m.name) for m in plan.modules if m.role is Role.ROW}),
        Role.COLUMN: sorted({_leaf(m.name) for m in plan.modules if m.role is Role.COLUMN}),
    }
    for m in plan.modules:
        other = Role.COLUMN if m.role is Role.ROW else Role.ROW
        if any(s in m.name for s in sides[other]):  # PEFT matches by substring
            sides = {role: sorted(n.name for n in plan.modules if n.role is role) for role in Role}
            break
    return sides[Role.ROW], sides[Role.COLUMN]


def _is_causal_lm(model: nn.Module) -> bool:
    """A causal LM class, by transformers' own list (GPT-2's is ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def peft_config_dict(model: nn.Module, adapter_name: str, fmt: str) -> dict[str, Any]:
    """The ``LoraConfig`` fields that reproduce adapter ``adapter_name`` in PEFT."""
    from peft import BdLoraConfig, LoraConfig  # noqa: PLC0415  (heavy import, only when saving)

    record = adapters_of(model)[adapter_name]
    plan, config = record.plan, record.config
    rank = Counter(m.rank for m in plan.modules).most_common(1)[0][0]
    alpha = Counter(m.settings.alpha for m in plan.modules).most_common(1)[0][0]
    linear_names = [
        n
        for n, m in model.named_modules()
        if is_adaptable(getattr(m, "base_layer", m)) and not n.endswith("base_layer")
    ]
    targets, excluded = _targets(plan, linear_names)
    if any(_is_parameter_target(m) for m in plan.modules):
        _check_expert_export(plan, fmt)
    _warn_peft_moe_renaming(model, targets, adapter_name)
    kwargs: dict[str, Any] = dict(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        exclude_modules=excluded or None,
        rank_pattern=_pattern(plan, lambda m: m.rank, rank),
        alpha_pattern=_pattern(plan, lambda m: m.settings.alpha, alpha),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None),
        task_type="CAUSAL_LM" if _is_causal_lm(model) else None,
        fan_in_fan_out=any(m.fan_in_fan_out and not m.experts for m in plan.modules),  # Conv1D
        target_parameters=_target_parameters(model, plan) or None,
    )
    if fmt == "peft-bdlora" and plan.global_nblocks > 1:  # one block: plain LoRA, as PEFT writes it
        _warn_conv1d_bdlora(plan, adapter_name)
        bd_a, bd_b = _bd_lists(plan)
        kwargs["use_bdlora"] = BdLoraConfig(
            target_modules_bd_a=bd_a, target_modules_bd_b=bd_b, nblocks=plan.global_nblocks
        )
    out = LoraConfig(**kwargs).to_dict()
    for key in ("target_modules", "exclude_modules"):  # LoraConfig holds lists as sets
        if isinstance(out[key], set):
            out[key] = sorted(out[key])
    return json.loads(json.dumps(out, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))


def _is_parameter_target(m: ModulePlan) -> bool:
    """Adapted through PEFT's ``target_parameters``: an expert tensor, or a MoE router's weight
    (a module PEFT's LoRA layers cannot wrap)."""
    return bool(m.experts) or m.role_source == "router"


def _target_parameters(model: nn.Module, plan: Plan) -> list[str]:
    """PEFT ``target_parameters``: ``experts.gate_up_proj``-style suffixes (``gate.weight`` for
    routers) where every experts module adapts that tensor, else the full names."""
    every = len(list(experts_modules(model)))
    out = []
    for p_name in EXPERT_PARAMS:
        names = [m.name for m in plan.modules if m.experts and m.name.endswith("." + p_name)]
        out += [".".join(names[0].split(".")[-2:])] if names and len(names) == every else names
    routers = [m.name + ".weight" for m in plan.modules if m.role_source == "router"]
    leaves = {".".join(n.split(".")[-2:]) for n in routers}
    out += sorted(leaves) if routers and len(routers) == every and len(leaves) == 1 else routers
    return out


def _check_expert_export(plan: Plan, fmt: str) -> None:
    """PEFT adapts expert tensors as plain LoRA only (``ParamWrapper`` refuses ``use_bdlora``), and
    without dropout."""
    if fmt == "peft-bdlora":
        raise BDLoraConfigError(
            "the adapter adapts MoE expert tensors or routers; PEFT loads those through target_parameters "
            "as plain LoRA only (its ParamWrapper refuses use_bdlora: 'Invalid or unsupported variant "
            "combination'). Save with format='peft-lora' (the same adapter, every block-diagonal factor "
            "expanded to the dense one it equals); bdlora's sharded checkpoints keep the blocks"
        )
    dropped = [m.name for m in plan.modules if m.experts and m.settings.dropout]
    if dropped:
        raise BDLoraConfigError(
            f"expert tensor {dropped[0]!r} has dropout {plan[dropped[0]].settings.dropout}; PEFT's "
            f"target_parameters LoRA refuses lora_dropout != 0 (its delta is folded into the weight)"
        )


def _warn_peft_moe_renaming(model: nn.Module, targets: list[str], adapter_name: str) -> None:
    """PEFT (>= 0.19, transformers 5) rewrites an adapter's ``target_modules`` named like a
    transformers-4 expert linear (``gate_proj``, ``up_proj``, ``down_proj``, ``w1``...) onto the
    fused expert tensors of MoE models whose experts transformers now fuses (DeepSeek-V3,
    Qwen3-MoE, Mixtral, ...), doubling gate_up's rank: a shared expert or dense MLP adapted under
    those names then does not load into PEFT as saved. Its tables are private; read in this one place."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    renamed = getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(family, {})
    hit = sorted(t for t in targets if t in renamed)
    if not hit:
        return
    from peft import __version__ as peft_version

    warnings.warn(
        f"adapter {adapter_name!r}: PEFT {peft_version} rewrites target_modules {hit} of a "
        f"{model_type} model onto its fused expert tensors (its transformers-4 compatibility), so "
        f"PEFT will not load the {hit[0]} adapters of this directory as saved; bdlora.load_adapter "
        f"and bdlora.from_pretrained do. Leave those modules out (patterns {{{hit[0]!r}: None}}) "
        f"for an adapter PEFT loads.",
        stacklevel=4,
    )


def _warn_conv1d_bdlora(plan: Plan, adapter_name: str) -> None:
    """PEFT's BD-LoRA variant (0.21) sizes its block-diagonal factor from ``base_layer.in_features`` /
    ``out_features``, which transformers' Conv1D lacks: PEFT fails to load such an adapter."""
    conv1d = [m.name for m in plan.modules if m.fan_in_fan_out]
    if not conv1d:
        return
    from peft import __version__ as peft_version

    warnings.warn(
        f"adapter {adapter_name!r}: {len(conv1d)} adapted modules are transformers Conv1D layers "
        f"(e.g. {conv1d[0]!r}). bdlora.load_adapter reads this peft-bdlora directory, but PEFT "
        f"{peft_version}'s BD-LoRA cannot build on Conv1D ('Conv1D' object has no attribute "
        f"'out_features'). For PEFT, save with format='peft-lora': the same adapter, its "
        f"block-diagonal factor expanded to a dense one.",
        stacklevel=4,
    )


def adapter_tensors(model: nn.Module, adapter_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """PEFT key -> unsharded tensor for every factor (packed for ``peft-bdlora``, dense for ``peft-lora``).

    On a TP-sharded model this gathers each factor over the TP group: every TP rank must call it.
    """
    plan = adapters_of(model)[adapter_name].plan
    out = {}
    for m in plan.modules:
        a, b = model.get_submodule(m.name).full_factors(adapter_name)
        if m.experts:
            key_a, key_b = _expert_keys(plan, m)
            out[key_a], out[key_b] = to_peft(a, b, m.role, plan.global_nblocks, m.fan_in_fan_out)
            continue
        if fmt == "peft-lora":
            a, b = dense_factors(m.role, a, b, plan.global_nblocks)
        out[f"{PREFIX}{m.name}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{m.name}.lora_B.weight"] = b.contiguous()
    return out


def _expert_keys(plan: Plan, m: ModulePlan) -> tuple[str, str]:
    """PEFT's keys for expert tensor ``m``: named by the experts module, nested by what it adapts."""
    owner, _, p_name = m.name.rpartition(".")
    targeted = [p for p in EXPERT_PARAMS if f"{owner}.{p}" in plan.names]  # registration order
    return peft_param_keys(owner, p_name, targeted)


def write_adapter_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files atomically: each goes to a temporary name first, then is renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    write_file_atomic(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return directory


def save_adapter(
    model: nn.Module, directory: str | Path, format: str = "peft-bdlora", adapter_name: str | None = None
) -> Path:
    """Save one adapter in PEFT's format; ``peft.PeftModel.from_pretrained(base, directory)`` loads it.

    Not TP-sharded: the calling process writes, with no collective, so it may be called on one rank
    alone (``if rank == 0: save_adapter(...)``). TP-sharded: every rank must call it; the factors are
    gathered over TP and global rank 0 writes, the others returning once the files are complete.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    adapter_name = adapter_name or _only_adapter(model)
    state = state_of(model)

    def save() -> None:
        config = peft_config_dict(model, adapter_name, format)
        tensors = adapter_tensors(model, adapter_name, format)
        if not state.sharded or state.parallel.is_writer():
            write_adapter_files(directory, config, tensors)

    on_every_rank(model, "save_adapter", save)
    return Path(directory)


def _only_adapter(model: nn.Module) -> str:
    names = list(adapters_of(model))
    if not names:
        raise ValueError("the model has no bdlora adapter; call apply_bdlora or load_adapter first")
    return "default" if "default" in names else names[0]


def read_adapter_config(directory: str | Path) -> BDLoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a PEFT adapter directory holds {CONFIG_NAME}")
    data = json.loads(path.read_text())
    if data.get("peft_type", "LORA") != "LORA":
        raise BDLoraConfigError(f"{path}: peft_type {data['peft_type']!r} is not LORA")
    return BDLoraConfig.from_peft(data)


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA or BD-LoRA adapter (written by bdlora or by PEFT) into ``model``.

    A TP-sharded model keeps each rank's shard of the factors. Sharded ``"bdlora"``, each rank holds
    whole blocks: the adapter's ``nblocks`` must be a multiple of the TP degree, so a dense one
    (``nblocks=1``) is refused (``check_adapter_tp``). Sharded ``"slora"``, any adapter loads, a
    block-diagonal factor expanded to the dense one it equals. Every rank: only on a TP-sharded
    model (reading issues no collective, but every rank must hold the same adapter).
    """
    return on_every_rank(model, "load_adapter", _load, model, Path(directory), adapter_name)


def _load(model: nn.Module, directory: Path, adapter_name: str) -> nn.Module:
    config = read_adapter_config(directory)
    check_adapter_tp(model, config, directory)
    tensors = _read_tensors(directory, model)
    add_adapter_(model, config, adapter_name, init=False)
    plan = adapters_of(model)[adapter_name].plan
    try:
        _copy_factors(model, plan, tensors, adapter_name, directory, config.nblocks)
    except BDLoraConfigError:  # leave no half-loaded (uninitialised) adapter behind
        remove_adapter_(model, adapter_name)
        raise
    return model


def check_adapter_tp(model: nn.Module, config: BDLoraConfig, directory: str | Path) -> None:
    """Refuse, naming the TP degrees and the sharding that load it, a saved adapter whose blocks a
    BD-LoRA-sharded ``model`` cannot hold whole on each rank (its ``nblocks`` is fixed on disk)."""
    parallel = state_of(model).parallel
    if parallel is None or parallel.tp_size == 1 or parallel.sharding != "bdlora":
        return
    n, tp = config.nblocks, parallel.tp_size
    slora = f"bdlora.from_pretrained(..., sharding='slora', adapter_dir={directory})"
    if n == 1:
        raise BDLoraConfigError(
            f"adapter {directory} is dense LoRA (no block-diagonal factor); a BD-LoRA-sharded model "
            f"holds whole blocks per rank, which a dense factor has not: load it on a model sharded the "
            f"S-LoRA way: {slora} (its forward adds S-LoRA's (tokens, r) collectives), or at TP 1"
        )
    if n % tp:
        degrees = ", ".join(str(t) for t in range(1, n + 1) if n % t == 0)
        raise BDLoraConfigError(
            f"adapter {directory} is BD-LoRA with nblocks={n}; a BD-LoRA-sharded model holds whole "
            f"blocks per rank, so it loads BD-LoRA-sharded at TP {degrees} (the degrees dividing {n}), "
            f"not at TP {tp}. At TP {tp}, load it on a model sharded the S-LoRA way: {slora} (expanded "
            f"to the dense LoRA it equals; its forward adds S-LoRA's (tokens, r) collectives)"
        )


def _read_tensors(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    device = next(model.parameters()).device
    return {_strip_adapter_name(k): v for k, v in load_file(path, device=str(device)).items()}


def _strip_adapter_name(key: str) -> str:
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _copy_factors(
    model: nn.Module,
    plan: Plan,
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    directory,
    stored_nblocks: int,
) -> None:
    """Fill each module's factors from the file's, stored with ``stored_nblocks`` blocks; a plan
    of fewer (S-LoRA sharding holds dense LoRA) gets the block-diagonal factor expanded."""
    expected = set()
    for m in plan.modules:
        layer = model.get_submodule(m.name)
        if m.experts:
            expected.update(_copy_expert_factors(layer, plan, m, tensors, adapter_name, directory))
            continue
        shape_a, shape_b = global_factor_shapes(m.role, m.d_in, m.d_out, m.rank, stored_nblocks)
        a = _take(tensors, f"{PREFIX}{m.name}.lora_A.weight", shape_a, m, stored_nblocks, directory)
        b = _take(tensors, f"{PREFIX}{m.name}.lora_B.weight", shape_b, m, stored_nblocks, directory)
        expected.update((f"{PREFIX}{m.name}.lora_A.weight", f"{PREFIX}{m.name}.lora_B.weight"))
        if plan.global_nblocks != stored_nblocks:
            a, b = dense_factors(m.role, a, b, stored_nblocks)
        layer.set_factors(adapter_name, a, b)
    unused = sorted(set(tensors) - expected)
    if unused:
        raise BDLoraConfigError(
            f"{directory}: {len(unused)} tensors match no adapted module (first: {unused[0]!r}); "
            f"the adapter was trained on a different architecture or target_modules"
        )


def _copy_expert_factors(
    layer: nn.Module, plan: Plan, m: ModulePlan, tensors: dict, adapter_name: str, directory
) -> tuple[str, str]:
    """Fill an expert tensor's factors from PEFT's ``target_parameters`` LoRA (dense, any nblocks=1)."""
    key_a, key_b = _expert_keys(plan, m)
    for key in (key_a, key_b):
        if key not in tensors:
            raise BDLoraConfigError(f"{directory}: missing tensor {key!r} for expert tensor {m.name!r}")
    try:
        a, b = from_peft(tensors[key_a], tensors[key_b], m.experts, m.fan_in_fan_out)
    except ValueError as err:
        raise BDLoraConfigError(f"{directory}: {m.name!r}: {err}") from None
    shape_a, shape_b = layer.factor_shapes(m.rank, 1)
    if (tuple(a.shape), tuple(b.shape)) != (shape_a, shape_b):
        raise BDLoraConfigError(
            f"{directory}: expert tensor {m.name!r} gets factors {tuple(a.shape)}, {tuple(b.shape)} from "
            f"{key_a!r}; rank {m.rank} over {m.experts} experts expects {shape_a}, {shape_b}"
        )
    if plan.global_nblocks != 1:
        raise BDLoraConfigError(
            f"{directory}: expert tensors are stored as plain LoRA; load the adapter with nblocks=1"
        )
    layer.set_factors(adapter_name, a, b)
    return key_a, key_b


def _take(tensors: dict, key: str, shape: tuple, m: ModulePlan, nblocks: int, directory) -> torch.Tensor:
    if key not in tensors:
        raise BDLoraConfigError(f"{directory}: missing tensor {key!r} for module {m.name!r}")
    value = tensors[key]
    if tuple(value.shape) != tuple(shape):
        raise BDLoraConfigError(
            f"{directory}: tensor {key!r} has shape {tuple(value.shape)}, module {m.name!r} "
            f"({m.role.value}, rank {m.rank}, nblocks {nblocks}) expects {tuple(shape)}"
        )
    return value
