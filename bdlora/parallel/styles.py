"""How a TP-sharded ``BDLoraLinear`` holds its shards: the base layout, and one adapter sharding.

Two things decide a sharded layer's placement:

- its ``LinearLayout``, read from the model's TP plan: the role (column or row), whether its output is
  packed from equal segments (``packed_colwise``: gate and up), and whether the plan gathers its
  output (``colwise_gather_output``) or splits its input (``rowwise_split_input``);
- the adapter sharding, one sibling class of ``TPSharding`` per scheme: ``BDLoraTP`` (the
  project's layout, adds no collective) and ``SLoraTP`` (the dense-LoRA baseline the benchmarks
  compare against). Each owns where its factors go; no caller reads a placement table.

The layer computes only locally: f and g run at the block's boundary (``placement``).

BD-LoRA (``t`` ranks, N blocks, rank i; f and g at the block boundary):

=======  ======================  ======================  ===============================  ========
role     A on rank i             B on rank i             local compute                    adds
=======  ======================  ======================  ===============================  ========
column   ``(r/t, d_in)``         packed ``(d_out/t,      ``W_i x + s B_i (A_i x) + b_i``  nothing
                                 r/N)``, N/t blocks
row      packed ``(r/t,          ``(d_out, r/t)``        ``W_i x_i + s B_i (A_i x_i)``    nothing
         d_in/N)``, N/t blocks                           (+ b on rank 0)
=======  ======================  ======================  ===============================  ========

A packed column layer of S segments holds the i-th slice of every segment, and so do A's rank
rows and B's blocks (N a multiple of S t): rank i's blocks are exactly PEFT's blocks
``{s N/S + i N/(S t) + j}``, so the unsharded adapter is PEFT's, block for block.

S-LoRA: column layers shard A on r and all-gather the ``(tokens, r)`` activation (backward:
reduce-scatter); row layers shard A on d_in and all-reduce the ``(tokens, r)`` partial; ``B h``
joins the row layer's partial sum once (from TP rank 0).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.parallel.comm import (
    TPGroup,
    gather_from_tp,
    gather_last,
    gather_parts,
    once_in_sum,
    reduce_from_tp,
    split_last,
    sum_over,
)
from bdlora.plan import ModulePlan, Plan, check_plan_tp
from bdlora.roles import STYLE_ROLES, Role

if TYPE_CHECKING:
    from bdlora.layers import BDLoraLinear, RowAdapters

# transformers' TP styles beyond their role (``roles.STYLE_ROLES``): packed segments (transformers'
# ``packed_colwise`` packs gate and up), and an output gathered or an input split whole.
_PACKED = {"packed_colwise": 2}
_WHOLE_IO = frozenset({"colwise_gather_output", "colwise_rep", "rowwise_split_input", "rowwise_rep"})
PLAN_STYLES = frozenset(STYLE_ROLES)


@dataclass(frozen=True)
class LinearLayout:
    """Where transformers' TP style puts one linear layer's base weight, and its input and output.

    ``segments``: the output is that many equal packed parts (gate, up), each split over TP.
    ``whole_io``: a column layer's output is all-gathered (forward; backward: this rank's chunk),
    or a row layer's whole input is split to this rank's chunk (backward: all-gather).
    """

    role: Role
    segments: int = 1
    whole_io: bool = False

    @classmethod
    def from_style(cls, style: str) -> LinearLayout:
        return cls(Role(STYLE_ROLES[style]), _PACKED.get(style, 1), style in _WHOLE_IO)

    def base_dim(self, param_name: str) -> int | None:
        """The dim TP splits of the base ``weight`` or ``bias`` (a row layer's bias is whole)."""
        if self.role is Role.COLUMN:
            return 0
        return 1 if param_name == "weight" else None


def shard_ranges(length: int, rank: int, size: int, segments: int = 1) -> list[tuple[int, int]]:
    """The [start, stop) spans rank ``rank`` of ``size`` holds: its slice of each equal segment."""
    seg, part = length // segments, length // segments // size
    return [(s * seg + rank * part, s * seg + (rank + 1) * part) for s in range(segments)]


def take(tensor, dim: int | None, tp: TPGroup, segments: int = 1):
    """This rank's shard along ``dim`` (None: all of it) of a tensor or a safetensors slice."""
    if dim is None or tp.size == 1:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[...]
    length = tensor.shape[dim] if isinstance(tensor, torch.Tensor) else tensor.get_shape()[dim]
    spans = shard_ranges(length, tp.rank, tp.size, segments)
    if isinstance(tensor, torch.Tensor):
        return torch.cat([tensor.narrow(dim, a, b - a) for a, b in spans], dim)
    index = (lambda a, b: (slice(a, b),)) if dim == 0 else (lambda a, b: (slice(None), slice(a, b)))
    return torch.cat([tensor[index(a, b)] for a, b in spans], dim)


def join(parts: list[torch.Tensor], dim: int | None, segments: int = 1) -> torch.Tensor:
    """The unsharded tensor from every rank's shard (``take``'s inverse; None: replicated)."""
    if dim is None:
        return parts[0]
    chunks = [p.chunk(segments, dim) for p in parts]  # [rank][segment]
    return torch.cat([chunks[r][s] for s in range(segments) for r in range(len(parts))], dim)


class TPSharding(ABC):
    """One adapter sharding scheme for one sharded layer: its factor placements and local forward.

    Class-level methods judge a whole adapter plan; an instance serves one layer, holding the TP
    group and the layer's ``LinearLayout``.
    """

    name: ClassVar[str]
    whole_blocks: ClassVar[bool]  # each rank holds whole blocks of the block-diagonal factor
    # each rank can apply any adapter to its rows, and combine adapters, from its own shards alone
    # (``bdlora.mixed_batch``, ``bdlora.combine``): the adapter's rank dim is never split apart
    # from the layer's other factor
    local_adapters: ClassVar[bool] = True

    def __init__(self, layer_name: str, tp: TPGroup, layout: LinearLayout) -> None:
        self.layer_name, self.tp, self.layout = layer_name, tp, layout

    # -- the scheme as a whole --------------------------------------------------------------------
    @classmethod
    def adapter_config(cls, config: BDLoraConfig) -> BDLoraConfig:
        return config

    @classmethod
    def check_plan(cls, plan: Plan, tp: int, layouts: dict[str, LinearLayout]) -> None:
        """Every adapted module is sharded by the TP plan and its factors split evenly."""
        check_plan_tp(plan, tp, whole_blocks=cls.whole_blocks)
        loose = [m.name for m in plan.modules if m.name not in layouts]
        if tp > 1 and loose:
            raise BDLoraConfigError(
                f"module(s) {loose[:3]} are adapted but not sharded by the TP plan: every rank would hold "
                f"them whole and their adapter gradients would be partial sums. Exclude them with "
                f"patterns ({{{loose[0].rsplit('.', 1)[-1]!r}: None}}) or add them to the TP plan"
            )

    @classmethod
    def check_layer(cls, name: str, layer: BDLoraLinear) -> None:  # noqa: B027  (optional hook)
        """An adapter added before sharding must suit this sharding (any does, by default)."""
        return

    @classmethod
    @abstractmethod
    def factor_dims(cls, layout: LinearLayout) -> tuple[int | None, int | None]:
        """The dim of (A, B) TP splits (None: whole on every rank)."""

    @classmethod
    def factor_segments(cls, layout: LinearLayout) -> tuple[int, int]:
        return 1, layout.segments if layout.role is Role.COLUMN else 1

    @classmethod
    def unshard_factors(
        cls, layout: LinearLayout, a_parts: list[torch.Tensor], b_parts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsharded (A, B) from every rank's shards, in rank order (no communication)."""
        (dim_a, dim_b), (seg_a, seg_b) = cls.factor_dims(layout), cls.factor_segments(layout)
        return join(a_parts, dim_a, seg_a), join(b_parts, dim_b, seg_b)

    # -- one layer ----------------------------------------------------------------------------------
    def local_nblocks(self, nblocks: int) -> int:
        return nblocks

    def sharded_factors(self) -> tuple[bool, bool]:
        """Whether each rank holds a different slice of A, of B."""
        dim_a, dim_b = self.factor_dims(self.layout)
        return dim_a is not None, dim_b is not None

    def shard_factors(
        self, layer: BDLoraLinear, a_full: torch.Tensor, b_full: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (dim_a, dim_b), (seg_a, seg_b) = self.factor_dims(self.layout), self.factor_segments(self.layout)
        return take(a_full, dim_a, self.tp, seg_a), take(b_full, dim_b, self.tp, seg_b)

    def gather_pair(self, a_local: torch.Tensor, b_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsharded copies of a factor-shaped pair (the factors, or their gradients); collective."""
        (dim_a, dim_b) = self.factor_dims(self.layout)
        a_parts, b_parts = gather_parts(a_local, dim_a, self.tp), gather_parts(b_local, dim_b, self.tp)
        return self.unshard_factors(self.layout, a_parts, b_parts)

    def gather_factors(self, layer: BDLoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather_pair(layer.lora_A[name], layer.lora_B[name])

    def read_base(self, layer: BDLoraLinear, param_name: str, tensor) -> torch.Tensor:
        """This rank's shard of the base ``weight`` or ``bias`` (a tensor or a checkpoint slice)."""
        segments = self.layout.segments if self.layout.role is Role.COLUMN else 1
        return take(tensor, self.layout.base_dim(param_name), self.tp, segments)

    def sum_moments(self, moments: torch.Tensor) -> torch.Tensor:
        return sum_over(moments, self.tp.group)

    def check_merge(self, layer: BDLoraLinear) -> None:  # noqa: B027  (optional hook)
        """Each rank's ``B_i A_i`` is exactly its shard of the merged weight's delta."""

    def forward(self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None = None) -> torch.Tensor:
        """The layer's local output: a column shard, or a row layer's partial sum (bias from rank 0).
        ``rows``: a mixed batch, each row its own adapter."""
        if self.layout.role is Role.ROW:
            if self.layout.whole_io:
                x = split_last(x, self.tp)  # (..., d_in) -> (..., d_in/t)
            out = self.local_forward(layer, x, rows)
            return layer.add_bias(out) if self.tp.rank == 0 else out  # the bias once in the sum
        out = layer.add_bias(self.local_forward(layer, x, rows))  # (..., d_out/t)
        return gather_last(out, self.tp) if self.layout.whole_io else out

    @abstractmethod
    def local_forward(self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None) -> torch.Tensor:
        """Base plus adapter (or each row's adapter) on this rank's shards, before the bias."""

    def __repr__(self) -> str:
        return f"{self.name}:{self.tp.rank}/{self.tp.size}"


class BDLoraTP(TPSharding):
    """BD-LoRA under TP: every factor shard lines up with the base shard; adds no collective."""

    name: ClassVar[str] = "bdlora"
    whole_blocks: ClassVar[bool] = True

    @classmethod
    def check_plan(cls, plan: Plan, tp: int, layouts: dict[str, LinearLayout]) -> None:
        super().check_plan(plan, tp, layouts)
        for m in plan.modules:
            _check_packed(m, layouts.get(m.name), tp, plan.global_nblocks)

    @classmethod
    def factor_dims(cls, layout: LinearLayout) -> tuple[int | None, int | None]:
        # column: A on r, packed B on d_out; row: packed A on r (its blocks), B on r
        return (0, 0) if layout.role is Role.COLUMN else (0, 1)

    @classmethod
    def factor_segments(cls, layout: LinearLayout) -> tuple[int, int]:
        return (layout.segments, layout.segments) if layout.role is Role.COLUMN else (1, 1)

    def local_nblocks(self, nblocks: int) -> int:
        return nblocks // self.tp.size

    def local_forward(self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None) -> torch.Tensor:
        return layer.partial_forward(x, rows)


def _check_packed(m: ModulePlan, layout: LinearLayout | None, tp: int, nblocks: int) -> None:
    if layout is None or layout.segments == 1 or tp == 1:
        return
    if nblocks % (layout.segments * tp):
        raise BDLoraConfigError(
            f"module {m.name!r} packs {layout.segments} segments (packed_colwise): each rank holds its "
            f"slice of every segment, so nblocks={nblocks} must be a multiple of segments x TP = "
            f"{layout.segments * tp} for B's blocks to follow the segments"
        )


class DenseLoraTP(TPSharding):
    """The dense-LoRA baselines' common ground: one block (nblocks forced to 1), which an adapter
    added before sharding must already have."""

    whole_blocks: ClassVar[bool] = False

    @classmethod
    def adapter_config(cls, config: BDLoraConfig) -> BDLoraConfig:
        return replace(config, nblocks=1)  # dense LoRA

    @classmethod
    def check_layer(cls, name: str, layer: BDLoraLinear) -> None:
        if any(n > 1 for n in layer.local_nblocks.values()):
            raise BDLoraConfigError(
                f"module {name!r} holds block-diagonal adapters (nblocks > 1); sharding={cls.name!r} "
                f"trains dense LoRA: add the adapter with nblocks=1, or after parallelize"
            )


class SLoraTP(DenseLoraTP):
    """The S-LoRA baseline: dense LoRA whose factor shards need the ``(tokens, r)`` collectives."""

    name: ClassVar[str] = "slora"
    # a column layer's rank dim is split over A's shards but whole in B: mixing or concatenating
    # adapters would need their gathered activations
    local_adapters: ClassVar[bool] = False

    @classmethod
    def factor_dims(cls, layout: LinearLayout) -> tuple[int | None, int | None]:
        # column: A on r, B on d_out; row: A on d_in, B whole
        return (0, 0) if layout.role is Role.COLUMN else (1, None)

    def check_merge(self, layer: BDLoraLinear) -> None:
        raise NotImplementedError(
            "merging a TP-sharded S-LoRA adapter needs its gathered A; save it and merge at TP 1"
        )

    def local_forward(self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None) -> torch.Tensor:
        if rows is not None:
            raise BDLoraConfigError(
                f"module {self.layer_name!r}: a mixed batch (adapter_names) is not supported with "
                f"sharding='slora'; use sharding='bdlora' or 'replicated'"
            )
        out = F.linear(x, layer.weight)  # (..., d_out/t) or a row partial (..., d_out)
        name = layer.live_adapter()
        if name is None:
            return out
        h = F.linear(layer.adapter_input(x, name), layer.lora_A[name])  # (..., r/t) or partial (..., r)
        if layer.role is Role.COLUMN:
            h = gather_from_tp(h, self.tp)  # (..., r)
            return out + F.linear(h * layer.scaling[name], layer.lora_B[name]).to(out.dtype)
        h = reduce_from_tp(h, self.tp)  # (..., r), complete
        delta = F.linear(h * layer.scaling[name], layer.lora_B[name])  # (..., d_out), complete
        return out + once_in_sum(delta, self.tp).to(out.dtype)


class ReplicatedTP(DenseLoraTP):
    """Dense LoRA with one factor replicated, as torchtitan's LoRA, PEFT's LoRA on a transformers TP
    plan and vLLM's default LoRA place it: the forward adds no collective, but every rank computes
    and stores the replicated factor whole, and its gradient is a partial sum that must be summed
    over TP once per step (``parallelize`` installs that all-reduce).

    ======  ==========================  ==========================  ==============================
    role    A on rank i                 B on rank i                 local compute
    ======  ==========================  ==========================  ==============================
    column  ``(r, d_in)``, replicated   ``(d_out/t, r)``            ``W_i x + s B_i (A x)``
    row     ``(r, d_in/t)``             ``(d_out, r)``, replicated  ``W_i x_i + s B (A_i x_i)``
    ======  ==========================  ==========================  ==============================
    """

    name: ClassVar[str] = "replicated"

    @classmethod
    def factor_dims(cls, layout: LinearLayout) -> tuple[int | None, int | None]:
        # column: A whole, B on d_out; row: A on d_in, B whole
        return (None, 0) if layout.role is Role.COLUMN else (1, None)

    def local_forward(self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None) -> torch.Tensor:
        return layer.partial_forward(x, rows)  # a row layer's B (A_i x_i) is a partial sum, as W_i x_i is


def replicated_factors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable factors every TP rank holds whole but whose gradients are partial sums (the
    ``replicated`` sharding's column A and row B), in the model's order."""
    out = []
    for module in model.modules():
        style = getattr(module, "tp_style", None)
        if isinstance(style, ReplicatedTP):
            sharded_a, sharded_b = style.sharded_factors()
            for store, sharded in ((module.lora_A, sharded_a), (module.lora_B, sharded_b)):
                out += [p for p in store.values() if not sharded and p.requires_grad]
    return out


def keep_local_shards_(layer: BDLoraLinear, style) -> None:
    """Replace ``layer``'s base tensors and adapter factors by this rank's shards under ``style``
    (a ``TPSharding``, or an expert tensor's ``ExpertsTP``), which the layer then keeps."""
    base = layer.base_layer
    for p_name in ("weight", "bias"):
        param = getattr(base, p_name)
        if param is not None:
            local = style.read_base(layer, p_name, param.data).clone()
            setattr(base, p_name, torch.nn.Parameter(local, requires_grad=False))
    for adapter in layer.lora_A:
        a_full, b_full = layer.lora_A[adapter].data, layer.lora_B[adapter].data
        a_local, b_local = style.shard_factors(layer, a_full, b_full)
        for store, local in ((layer.lora_A, a_local), (layer.lora_B, b_local)):
            store[adapter] = torch.nn.Parameter(local.clone(), requires_grad=store[adapter].requires_grad)
        layer.local_nblocks[adapter] = style.local_nblocks(layer.local_nblocks[adapter])
    layer.tp_style = style


SHARDINGS: dict[str, type[TPSharding]] = {cls.name: cls for cls in (BDLoraTP, SLoraTP, ReplicatedTP)}


def sharding_class(name: str) -> type[TPSharding]:
    if name not in SHARDINGS:
        raise ValueError(f"unknown sharding {name!r}; valid: {', '.join(SHARDINGS)}")
    return SHARDINGS[name]
