"""Where Megatron's f and g operators run: one boundary per block, read from the model's TP plan.

A *block* is one parent module of the plan's linear layers (``self_attn``, ``mlp``): its
column-parallel layers read the block's replicated input, and its one row-parallel layer's partial
sums are its output. ``BlockBoundary`` applies f to the block's activation argument (found once,
from the module's signature) and g to its output; the linear layers inside compute only locally.

=====  ================  ==========================================  =================================
op     where             forward                                     backward
=====  ================  ==========================================  =================================
f      block input       identity (sequence parallel: all-gather)    all-reduce (reduce-scatter)
g      block output      all-reduce of the partial sums (sequence    identity (all-gather)
                         parallel: reduce-scatter)
=====  ================  ==========================================  =================================

The adapters' partials are inside the row layer's partial sum before g runs, so they add nothing.
A block whose output is not exactly its row layer's output (a decoder layer holding the MLP's
layers and the residual) would have more than partial sums reduced: its first forward refuses it.
Layers between f and g that are not in the plan run whole on every rank (an MLA down-projection,
a per-head norm): their partial input gradients are summed by f with the rest. A layout bdlora
cannot place unambiguously (a parent with two row layers, column layers without a row layer beside
them) is an error naming the module.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.parallel.comm import TPGroup, copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq
from bdlora.roles import Role

if TYPE_CHECKING:
    from bdlora.parallel.sequence import SequenceParallel


class TPPlacementError(BDLoraConfigError):
    """The TP plan gives no single place for a block's f or g operator."""


@dataclass(frozen=True)
class BlockSpec:
    """One block of the TP plan: its parent module, the column layers it opens, the row layer closing it.

    A MoE block (``experts`` set) is the parent of a routed-experts module: its output is the
    experts' partial sum plus a shared expert's (``row``, or None without one), reduced by one g.
    """

    name: str
    columns: tuple[str, ...]
    row: str | None
    experts: str | None = None

    @property
    def rows(self) -> tuple[str, ...]:
        return () if self.row is None else (self.row,)


def plan_blocks(linears: list[tuple[str, Role]], moe_blocks: dict[str, str] | None = None) -> list[BlockSpec]:
    """Group the plan's (name, role) linear layers into blocks; ambiguous layouts raise TPPlacementError.

    ``moe_blocks`` (MoE block -> its experts module): every linear under such a block (a shared
    expert's) belongs to it, wherever it sits below.
    """
    moe_blocks = moe_blocks or {}
    parents: dict[str, dict[Role, list[str]]] = {b: {Role.COLUMN: [], Role.ROW: []} for b in moe_blocks}
    for name, role in linears:
        parent = next((b for b in moe_blocks if name.startswith(b + ".")), name.rpartition(".")[0])
        parents.setdefault(parent, {Role.COLUMN: [], Role.ROW: []})[role].append(name)
    blocks = []
    for parent, members in parents.items():
        columns, rows = members[Role.COLUMN], members[Role.ROW]
        where = repr(parent or "<root>")
        if parent in moe_blocks and len(rows) == len(columns) == 0:
            blocks.append(BlockSpec(parent, (), None, moe_blocks[parent]))
            continue
        if len(rows) > 1:
            raise TPPlacementError(
                f"module {where} holds {len(rows)} row-parallel layers {rows}: bdlora cannot tell which "
                f"closes the block its column-parallel layers {columns} open (g), nor where each f goes. "
                f"Each block must be a module of its own with one row-parallel layer (as Llama's self_attn "
                f"and mlp are); give the model such a TP plan"
            )
        if not rows:
            raise TPPlacementError(
                f"column-parallel layer(s) {columns} under module {where} have no row-parallel layer "
                f"beside them to close their block: their sharded outputs would never be summed (g). "
                f"bdlora supports plans where each block's column layers and its row layer share a parent"
            )
        if not columns:
            raise TPPlacementError(
                f"row-parallel layer {rows[0]!r} has no column-parallel layer beside it under module "
                f"{where}: nothing produces the sharded input it expects, so f has no place"
            )
        blocks.append(BlockSpec(parent, tuple(columns), rows[0], moe_blocks.get(parent)))
    return blocks


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def format_blocks(blocks: list[BlockSpec], tp: int, sharding: str = "bdlora") -> str:
    """The f/g placement as ``bdlora plan --tp`` prints it, blocks of every layer grouped."""
    grouped: dict[tuple, list[int]] = {}
    for block in blocks:
        match = re.search(r"\.(\d+)(\.|$)", block.name)
        template = block.name if match is None else re.sub(r"\.(\d+)(\.|$)", r".{}\2", block.name, count=1)
        closing = [*map(_leaf, block.rows), *([_leaf(block.experts)] if block.experts else [])]
        key = (template, tuple(map(_leaf, block.columns)), " + ".join(closing))
        grouped.setdefault(key, []).append(int(match.group(1)) if match else -1)
    lines = [
        f"TP communication at tp={tp}, placed from base_model_tp_plan (one block per parent module):",
        "  f = copy_to_tp on the block's input: forward identity, backward all-reduce",
        "  g = reduce_from_tp on the block's output, the adapter's partial included: forward all-reduce",
    ]
    rows = []
    for (template, columns, row), layers in grouped.items():
        name = template.format("{" + _ranges(layers) + "}") if "{}" in template else template
        rows.append((name, f"f -> {', '.join(columns) or row}", f"g <- {row}"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines += [f"  {n.ljust(widths[0])}  {f.ljust(widths[1])}  {g}" for n, f, g in rows]
    added = "no collective" if sharding == "bdlora" else "S-LoRA's all-gathers and all-reduces of (tokens, r)"
    lines.append(f"adapters add {added}; per block: 1 all-reduce forward (g), 1 backward (f)")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    spans, start, prev = [], numbers[0], numbers[0]
    for cur in [*numbers[1:], None]:
        if cur is None or cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
        prev = cur
    return ",".join(spans)


class BlockBoundary:
    """f before one block module and g after it, as forward hooks on that module.

    ``sequence``: while its pass is split along the sequence, f gathers and g reduce-scatters.
    """

    def __init__(self, spec: BlockSpec, model: nn.Module, tp: TPGroup) -> None:
        self.spec, self.tp = spec, tp
        self.sequence: SequenceParallel | None = None
        module = model.get_submodule(spec.name)
        self.position, self.arg_name = activation_argument(module, spec.name)
        self._row_output: torch.Tensor | None = None
        module.register_forward_pre_hook(self._enter, with_kwargs=True)
        module.register_forward_hook(self._exit)
        if spec.experts is None:  # a MoE block sums its experts' and shared expert's partials
            model.get_submodule(spec.row).register_forward_hook(self._row_done)

    def split(self) -> bool:
        return self.sequence is not None and self.sequence.active

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) > self.position:
            x = args[self.position]
            args = (*args[: self.position], self._f(x), *args[self.position + 1 :])
        elif self.arg_name in kwargs:
            kwargs = {**kwargs, self.arg_name: self._f(kwargs[self.arg_name])}
        else:
            raise TPPlacementError(
                f"module {self.spec.name!r} was called without its activation argument "
                f"{self.arg_name!r}, so f (copy_to_tp) has nothing to act on"
            )
        return args, kwargs

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return gather_seq(x, self.tp) if self.split() else copy_to_tp(x, self.tp)  # (B, T, D)

    def _g(self, partial: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_seq(partial, self.tp) if self.split() else reduce_from_tp(partial, self.tp)

    def _row_done(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._row_output = output

    def _exit(self, module: nn.Module, args: tuple, output):
        partial = output[0] if isinstance(output, tuple) and output else output  # attention: (out, weights)
        row_output, self._row_output = self._row_output, None
        if self.spec.experts is None and partial is not row_output:
            raise TPPlacementError(
                f"module {self.spec.name!r} returns more than its row-parallel layer {self.spec.row!r}'s "
                f"output (a residual, a norm, another layer): g would sum all of it over the TP ranks. "
                f"bdlora needs every block of the TP plan to end at its row layer; keep this model at "
                f"TP 1, or shard only blocks that do"
            )
        g = self._g(partial)
        return (g, *output[1:]) if isinstance(output, tuple) else g


def activation_argument(module: nn.Module, name: str) -> tuple[int, str]:
    """(position, name) of a block module's activation: ``hidden_states``, else its first argument."""
    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for position, param in enumerate(params):
        if param.name == "hidden_states":
            return position, param.name
    if not params:
        raise TPPlacementError(
            f"module {name!r} ({type(module).__name__}) takes no positional argument, so bdlora cannot "
            f"tell which holds the block's activation for f; its forward needs a `hidden_states` argument"
        )
    return 0, params[0].name
