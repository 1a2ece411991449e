"""Where Megatron's f and g operators run, read from the model's TP plan.

A *block* is one parent module of the plan's linear layers (``self_attn``, ``mlp``): its
column-parallel layers read one replicated input, and its one row-parallel layer closes it.

=====  ===========================================  ==============================  =========
op     where                                        forward                         backward
=====  ===========================================  ==============================  =========
f      the input the block's column layers share    identity                        all-reduce
g      inside the row layer, after its adapter's    all-reduce of the partial sums  identity
       partial output joined the base's
=====  ===========================================  ==============================  =========

f is applied to the tensor the first column layer of a pass receives, and handed to the block's
other column layers when they receive that same tensor: nothing guesses which argument of a
parent module's forward holds the activation. A layout bdlora cannot place unambiguously (a parent
with two row layers, column layers without a row layer beside them, column layers of one block fed
different tensors) is an error naming the module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from bdlora.config import BDLoraConfigError
from bdlora.parallel.comm import TPGroup, copy_to_tp, reduce_from_tp
from bdlora.roles import Role

if TYPE_CHECKING:
    from bdlora.parallel.sequence import SequenceParallel


class TPPlacementError(BDLoraConfigError):
    """The TP plan gives no single place for a block's f or g operator."""


@dataclass(frozen=True)
class BlockSpec:
    """One block of the TP plan: its parent module, the column layers it opens, the row layer closing it."""

    name: str
    columns: tuple[str, ...]
    row: str


def plan_blocks(linears: list[tuple[str, Role]]) -> list[BlockSpec]:
    """Group the plan's (name, role) linear layers into blocks; ambiguous layouts raise TPPlacementError."""
    parents: dict[str, dict[Role, list[str]]] = {}
    for name, role in linears:
        parent = name.rpartition(".")[0]
        parents.setdefault(parent, {Role.COLUMN: [], Role.ROW: []})[role].append(name)
    blocks = []
    for parent, members in parents.items():
        columns, rows = members[Role.COLUMN], members[Role.ROW]
        where = repr(parent or "<root>")
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
        blocks.append(BlockSpec(parent, tuple(columns), rows[0]))
    return blocks


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def format_blocks(blocks: list[BlockSpec], tp: int, sharding: str = "bdlora") -> str:
    """The f/g placement as ``bdlora plan --tp`` prints it, blocks of every layer grouped."""
    grouped: dict[tuple, list[int]] = {}
    for block in blocks:
        match = re.search(r"\.(\d+)(\.|$)", block.name)
        template = block.name if match is None else re.sub(r"\.(\d+)(\.|$)", r".{}\2", block.name, count=1)
        key = (template, tuple(map(_leaf, block.columns)), _leaf(block.row))
        grouped.setdefault(key, []).append(int(match.group(1)) if match else -1)
    lines = [
        f"TP communication at tp={tp}, placed from base_model_tp_plan (one block per parent module):",
        "  f = copy_to_tp on the input its column layers share: forward identity, backward all-reduce",
        "  g = reduce_from_tp in the block's row layer, after the adapter's partial: forward all-reduce",
    ]
    rows = []
    for (template, columns, row), layers in grouped.items():
        name = template.format("{" + _ranges(layers) + "}") if "{}" in template else template
        rows.append((name, f"f -> {', '.join(columns)}", f"g <- {row}"))
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


@dataclass
class TPBlock:
    """A block at run time: applies f once per pass to the input its column layers share.

    A pass opens when a column layer arrives with no pass open, or when one arrives that has already
    run in the open pass (the previous pass ended early, e.g. an exception or recomputation that
    stopped before the row layer); the row layer closes it and drops the cached tensors. While
    sequence parallelism is active, f and g run at the block module's boundary instead
    (``sequence.SequenceParallel``) and the block passes its tensors through unchanged.
    """

    spec: BlockSpec
    tp: TPGroup
    sequence: SequenceParallel | None = None  # while active, f and g run at the block's boundary
    _input: torch.Tensor | None = field(default=None, repr=False)
    _output: torch.Tensor | None = field(default=None, repr=False)
    _seen: set[str] = field(default_factory=set, repr=False)

    def enter(self, layer_name: str, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` for column layer ``layer_name``; the same tensor for the whole pass."""
        if self._input is None or layer_name in self._seen:
            self._input, self._output, self._seen = x, self._f(x), set()
        elif x is not self._input:
            first = next(iter(self._seen))
            raise TPPlacementError(
                f"module {layer_name!r} (column-parallel, block {self.spec.name!r}) received a different "
                f"input tensor than {first!r} in the same pass. bdlora applies one f (copy_to_tp) per "
                f"block, to the input its column layers share; this architecture feeds them different "
                f"tensors, so its TP plan cannot be sharded as one block"
            )
        self._seen.add(layer_name)
        return self._output

    def exit(self, partial: torch.Tensor) -> torch.Tensor:
        """``g(partial)`` for the row layer, which closes the pass; with the sequence split, the
        partial itself (the block module's output is reduce-scattered by ``SequenceParallel``)."""
        out = partial if self.split() else reduce_from_tp(partial, self.tp)
        self.close()
        return out

    def split(self) -> bool:
        """Whether this pass runs sequence-parallel: the block's input arrives all-gathered."""
        return self.sequence is not None and self.sequence.active

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.split() else copy_to_tp(x, self.tp)

    def close(self) -> None:
        self._input = self._output = None
        self._seen = set()
