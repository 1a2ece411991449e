"""A weighted combination of adapters as one new adapter, exact and still block-diagonal.

``combine_adapters(model, {"a": 0.7, "b": 0.3}, name="ab")`` adds adapter ``ab`` whose delta on
every module is ``0.7 * delta_a + 0.3 * delta_b`` exactly: the factors are concatenated along the
rank dim (PEFT's ``add_weighted_adapter(..., combination_type="cat")``, no SVD), each A scaled by
its weight times its adapter's ``alpha / r``, and the new adapter has ``alpha = r`` (scale 1).

The rank dim is ordered block by block: block ``j``'s rank rows are adapter a's block-``j`` rows,
then adapter b's, and so on. So the new adapter's packed block-diagonal factor is PEFT's (block
``j`` = ``weight.chunk(N, 0)[j]``), and each TP rank's shard of it is the same concatenation of
its own shards of the sources (rank ``i`` holds blocks ``i N/t .. (i+1) N/t - 1`` of every
factor). Under TP each rank combines its own shards, with no collective.

==========  ==================================  =============================================
factor      rank dim (local)                    combined
==========  ==================================  =============================================
A           dim -2, ``N/t`` blocks              block by block: ``[w_a s_a A_a^j, w_b s_b A_b^j, ..]``
B column    dim -1 of packed ``(d_out, r/N)``   ``[B_a, B_b, ..]`` (each block's rank grows)
B row       dim -1, ``N/t`` blocks              block by block: ``[B_a^j, B_b^j, ..]``
==========  ==================================  =============================================

Expert tensors carry a leading expert dim and combine the same way. Dense adapters (``nblocks=1``,
the ``replicated`` sharding) are the one-block case.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.layers import BASE_ADAPTER, BDLoraLinear
from bdlora.model import adapters_of, add_adapter_, remove_adapter_
from bdlora.plan import ModulePlan, Plan
from bdlora.roles import Role
from bdlora.state import AdapterRecord, on_every_rank, state_of


def combine_adapters(model: nn.Module, weights: Mapping[str, float], name: str) -> nn.Module:
    """Add adapter ``name`` with ``delta = sum_i weights[i] * delta_i`` on every adapted module.

    ``weights``: adapter name -> weight (any real number). The adapters must have the same
    ``nblocks`` and adapt the same modules; their ranks and alphas may differ, per adapter and per
    module. The new adapter's rank on a module is the sum of theirs, its alpha equals its rank, and
    it has the first adapter's dropout; it is neither activated nor merged (``set_adapter``), and it
    saves, exports and loads like any other (``save_adapter``: PEFT loads it, its
    ``rank_pattern`` / ``alpha_pattern`` per module). Returns ``model``.

    Every rank: only on a TP-sharded model, where each rank combines its own shards with no
    collective (not with ``sharding="slora"``, which splits a column layer's rank dim in A only).
    """
    pairs = _check_request(model, weights, name)
    config = combined_config([adapters_of(model)[n] for n, _ in pairs])
    return on_every_rank(model, "combine_adapters", _combine_, model, pairs, name, config)


def _check_request(model: nn.Module, weights: Mapping[str, float], name: str) -> list[tuple[str, float]]:
    """The (adapter, weight) pairs, after every check that needs no factor."""
    adapters = adapters_of(model)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty mapping of adapter name -> weight, got {weights!r}")
    for key, weight in weights.items():
        if key not in adapters:
            raise KeyError(f"no adapter {key!r} to combine; have: {', '.join(adapters) or 'none'}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights[{key!r}] = {weight!r}: give a finite number")
    if not isinstance(name, str) or not name or name == BASE_ADAPTER:
        raise ValueError(f"name={name!r}: give the new adapter a name (not {BASE_ADAPTER!r})")
    if name in adapters:
        raise ValueError(f"adapter {name!r} already exists; pick another name or delete it first")
    parallel = state_of(model).parallel
    if parallel is not None:
        parallel.check_local_adapters("combine_adapters")
    first, *others = weights
    for other in others:
        _check_same_layout(first, adapters[first].plan, other, adapters[other].plan)
    return [(key, float(weight)) for key, weight in weights.items()]


def _check_same_layout(first: str, plan: Plan, other: str, other_plan: Plan) -> None:
    if plan.global_nblocks != other_plan.global_nblocks:
        raise BDLoraConfigError(
            f"adapters {first!r} (nblocks={plan.global_nblocks}) and {other!r} "
            f"(nblocks={other_plan.global_nblocks}) have different nblocks; only adapters with the same "
            f"blocks concatenate into one block-diagonal adapter"
        )
    names, other_names = set(plan.names), set(other_plan.names)
    if names != other_names:
        module = next(n for n in [*plan.names, *other_plan.names] if n not in names & other_names)
        has, lacks = (first, other) if module in names else (other, first)
        raise BDLoraConfigError(
            f"module {module!r} is adapted by {has!r} but not by {lacks!r}; combine adapters that adapt "
            f"the same modules ({len(names ^ other_names)} differ)"
        )
    for m in plan.modules:
        o = other_plan[m.name]
        if o.role is not m.role:
            raise BDLoraConfigError(
                f"module {m.name!r} is {m.role.value}-parallel in {first!r} but {o.role.value}-parallel in "
                f"{other!r}: their block-diagonal factors differ"
            )


def combined_config(records: list[AdapterRecord]) -> BDLoraConfig:
    """The config that resolves to the combined adapter's plan: the first adapter's targets, with
    keys before its own patterns giving every adapted module its summed rank, alpha = rank, its role
    and the first adapter's dropout (first match wins, so the first adapter's exclusions still hold)."""
    first = records[0]
    settings = {
        m.name: (sum(r.plan[m.name].rank for r in records), m.role.value, m.settings.dropout)
        for m in first.plan.modules
    }
    rank = Counter(r for r, _, _ in settings.values()).most_common(1)[0][0]
    groups: dict[tuple, list[str]] = {}
    for module, key in settings.items():
        groups.setdefault(key, []).append(module)
    patterns = {
        _names_key(names): {"rank": r, "alpha": float(r), "role": role, "dropout": dropout}
        for (r, role, dropout), names in groups.items()
    }
    return replace(first.config, rank=rank, alpha=float(rank), patterns={**patterns, **first.config.patterns})


def _names_key(names: list[str]) -> str:
    """A pattern key matching exactly ``names`` (full names; layer indices folded into one group)."""
    templates: dict[tuple[str, str | None], list[str]] = {}
    for n in names:
        match = re.search(r"\.(\d+)\.", n)
        head, tail = (n[: match.start()], n[match.end() :]) if match else (n, None)
        templates.setdefault((head, tail), []).append(match[1] if match else "")
    parts = [
        re.escape(head) if tail is None else rf"{re.escape(head)}\.(?:{'|'.join(idx)})\.{re.escape(tail)}"
        for (head, tail), idx in templates.items()
    ]
    return r"\A(?:" + "|".join(parts) + ")"


def _combine_(model: nn.Module, pairs: list[tuple[str, float]], name: str, config: BDLoraConfig) -> nn.Module:
    adapters = adapters_of(model)
    sources = [adapters[n].plan for n, _ in pairs]
    add_adapter_(model, config, name, init=False)
    try:
        for m in adapters[name].plan.modules:
            _check_resolved(m, sum(plan[m.name].rank for plan in sources), sources[0][m.name])
            layer = model.get_submodule(m.name)
            a, b = combined_factors(layer, pairs)
            with torch.no_grad():
                layer.lora_A[name].copy_(a)
                layer.lora_B[name].copy_(b)
    except BaseException:  # no adapter of uninitialised factors left behind
        remove_adapter_(model, name)
        raise
    return model


def _check_resolved(m: ModulePlan, rank: int, source: ModulePlan) -> None:
    if (m.rank, m.settings.scale, m.role) != (rank, 1.0, source.role):
        raise RuntimeError(
            f"module {m.name!r}: the combined config resolved to rank {m.rank}, scale "
            f"{m.settings.scale}, {m.role.value} role; expected rank {rank}, scale 1, {source.role.value}"
        )


def combined_factors(
    layer: BDLoraLinear, pairs: list[tuple[str, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of the combination ``pairs`` (adapter, weight) on ``layer``, from its
    local shards alone: A's rank rows and a row layer's B columns block by block, a column layer's
    packed B along its per-block rank."""
    blocks = layer.local_nblocks[pairs[0][0]]
    a_parts = [layer.lora_A[n].detach().float() * (w * layer.scaling[n]) for n, w in pairs]
    b_parts = [layer.lora_B[n].detach() for n, _ in pairs]
    a = _cat_by_block(a_parts, -2, blocks)  # (..., r_new_local, d_in or d_in/N local)
    b = _cat_by_block(b_parts, -1, blocks if layer.role is Role.ROW else 1)
    return a.to(layer.lora_A[pairs[0][0]].dtype), b


def _cat_by_block(parts: list[torch.Tensor], dim: int, blocks: int) -> torch.Tensor:
    """Concatenate along ``dim`` block by block: block j of the result is every part's block j."""
    chunks = [p.chunk(blocks, dim) for p in parts]  # [part][block]
    return torch.cat([c[j] for j in range(blocks) for c in chunks], dim)
