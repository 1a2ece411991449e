"""Tensor and expert parallelism of MoE experts, and where their BD-LoRA factors go.

The experts of a MoE layer are split over the model-parallel (TP) group of ``t`` ranks in two
ways at once: ``ep`` expert-parallel groups each hold ``E/ep`` whole experts, and inside each, the
``t/ep`` ranks split every expert Megatron-style (gate_up by output rows, both gate and up halves
split; down by input columns). Rank ``i`` of the TP group is expert-parallel rank ``i // (t/ep)``
and expert-TP rank ``i % (t/ep)``. Every rank computes its experts on the tokens routed to them
(all ranks of the TP group hold the same tokens) and its partial output joins the MoE block's one
all-reduce (``placement.BlockBoundary``), the same g that sums the attention's partials: tokens
reach their experts without an all-to-all, and the adapters add no collective.

BD-LoRA's factors follow the base exactly (E_l = E/ep experts, t_e = t/ep):

==========  =============================  ===============================  =================
tensor      base on a rank                 A on a rank                      B on a rank
==========  =============================  ===============================  =================
gate_up     ``(E_l, 2I/t_e, H)``           ``(E_l, r/t_e, H)``              ``(E_l, 2I/t_e,
            (each half split)              (rank rows follow the halves)    r/N)``, N/t_e blocks
down        ``(E_l, H, I/t_e)``            ``(E_l, r/t_e, I/N)``,           ``(E_l, H, r/t_e)``
                                           N/t_e blocks
==========  =============================  ===============================  =================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from bdlora.config import BDLoraConfigError
from bdlora.experts import BDLoraExperts, expert_shape, gate_layout, is_transposed
from bdlora.parallel.comm import TPGroup, gather_parts, sum_over
from bdlora.parallel.styles import join, keep_local_shards_, shard_ranges
from bdlora.roles import Role

if TYPE_CHECKING:
    from bdlora.experts import ExpertLinear
    from bdlora.layers import RowAdapters


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert tensor is split: its role, gate/up segments and the expert-parallel degree."""

    role: Role
    segments: int = 1
    ep: int = 1
    transposed: bool = False

    def base_dim(self, param_name: str) -> int | None:
        """The dim TP splits of the stored ``weight`` (E, ., .) or ``bias`` (E, d_out)."""
        if param_name == "bias":
            return 1 if self.role is Role.COLUMN else None
        out_dim, in_dim = (2, 1) if self.transposed else (1, 2)
        return out_dim if self.role is Role.COLUMN else in_dim

    def factor_dims(self) -> tuple[int, int]:
        """The dims of (A, B) split inside an expert (BD-LoRA's, after the expert dim)."""
        return (1, 1) if self.role is Role.COLUMN else (1, 2)

    def base_segments(self, param_name: str) -> int:
        return self.segments if self.role is Role.COLUMN else 1

    def factor_segments(self) -> tuple[int, int]:
        return (self.segments, self.segments) if self.role is Role.COLUMN else (1, 1)

    def unshard(
        self, a_parts: list[torch.Tensor], b_parts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsharded (A, B) from every TP rank's shards, in rank order (no communication)."""
        (dim_a, dim_b), (seg_a, seg_b) = self.factor_dims(), self.factor_segments()
        return _unshard(a_parts, self.ep, dim_a, seg_a), _unshard(b_parts, self.ep, dim_b, seg_b)


def _unshard(parts: list[torch.Tensor], ep: int, dim: int, segments: int) -> torch.Tensor:
    per_group = len(parts) // ep  # the expert-TP ranks of one expert-parallel group
    groups = [parts[g * per_group : (g + 1) * per_group] for g in range(ep)]
    return torch.cat([join(group, dim, segments) for group in groups], 0)  # experts in order


def take_experts(source, first: int, count: int, dim: int | None, rank: int, size: int, segments: int = 1):
    """Experts ``[first, first + count)`` of ``source`` (a tensor or a checkpoint slice), and of each
    this rank's part along ``dim`` (None: whole); one read per segment."""
    experts = slice(first, first + count)
    if dim is None or size == 1:
        return source[experts]
    length = source.shape[dim] if isinstance(source, torch.Tensor) else source.get_shape()[dim]
    parts = []
    for a, b in shard_ranges(length, rank, size, segments):
        index = (experts, *[slice(None)] * (dim - 1), slice(a, b))
        parts.append(source[index])
    return torch.cat(parts, dim)


class ExpertsTP:
    """The sharding of one expert tensor over the TP group (``ExpertLinear.tp_style``)."""

    name: ClassVar[str] = "bdlora"

    def __init__(self, layer_name: str, tp: TPGroup, layout: ExpertLayout, num_experts: int) -> None:
        self.layer_name, self.tp, self.layout = layer_name, tp, layout
        self.expert_tp = tp.size // layout.ep
        self.ep_rank, self.expert_tp_rank = divmod(tp.rank, self.expert_tp)
        self.local_experts = num_experts // layout.ep
        self.first_expert = self.ep_rank * self.local_experts

    def local_nblocks(self, nblocks: int) -> int:
        return nblocks // self.expert_tp

    def _take(self, tensor, dim: int | None, segments: int) -> torch.Tensor:
        return take_experts(
            tensor, self.first_expert, self.local_experts, dim, self.expert_tp_rank, self.expert_tp, segments
        )

    def read_base(self, layer: ExpertLinear, param_name: str, tensor) -> torch.Tensor:
        """This rank's experts, and its slice of each, of the stored ``weight`` or ``bias``."""
        return self._take(tensor, self.layout.base_dim(param_name), self.layout.base_segments(param_name))

    def shard_factors(
        self, layer: ExpertLinear, a_full: torch.Tensor, b_full: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (dim_a, dim_b), (seg_a, seg_b) = self.layout.factor_dims(), self.layout.factor_segments()
        return self._take(a_full, dim_a, seg_a), self._take(b_full, dim_b, seg_b)

    def sharded_factors(self) -> tuple[bool, bool]:
        return self.tp.size > 1, self.tp.size > 1  # each rank holds different experts or slices

    def gather_pair(self, a_local: torch.Tensor, b_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsharded copies of a factor-shaped pair; every TP rank must call it."""
        a_parts, b_parts = gather_parts(a_local, 0, self.tp), gather_parts(b_local, 0, self.tp)
        return self.layout.unshard(a_parts, b_parts)

    def gather_factors(self, layer: ExpertLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather_pair(layer.lora_A[name], layer.lora_B[name])

    def sum_moments(self, moments: torch.Tensor) -> torch.Tensor:
        return sum_over(moments, self.tp.group)  # every rank holds a different part

    def adds_bias(self, layer: ExpertLinear) -> bool:
        """A row tensor's bias joins the partial sum from one expert-TP rank only."""
        return self.layout.role is Role.COLUMN or self.expert_tp_rank == 0

    def check_merge(self, layer: ExpertLinear) -> None:
        """Each rank's ``B_e A_e`` is exactly its slice of expert e's delta."""

    def forward(self, layer: ExpertLinear, x: torch.Tensor, rows: RowAdapters | None = None) -> torch.Tensor:
        return layer.forward(x)  # raises: experts run inside BDLoraExperts

    def __repr__(self) -> str:
        return f"experts:ep{self.ep_rank}/{self.layout.ep},tp{self.expert_tp_rank}/{self.expert_tp}"


def expert_layouts(experts: BDLoraExperts | object, ep: int) -> dict[str, ExpertLayout]:
    """The ExpertLayout of an experts module's two tensors at expert-parallel degree ``ep``."""
    transposed = is_transposed(experts)
    segments = 2 if gate_layout_of(experts) == "chunk" else 1
    return {
        "gate_up_proj": ExpertLayout(Role.COLUMN, segments, ep, transposed),
        "down_proj": ExpertLayout(Role.ROW, 1, ep, transposed),
    }


def gate_layout_of(experts) -> str | None:
    return experts.gate_layout if isinstance(experts, BDLoraExperts) else gate_layout(experts)


def check_experts_tp(name: str, experts, tp: int, ep: int, nblocks: list[int]) -> None:
    """Validate that experts module ``name`` splits over ``tp`` ranks at expert-parallel degree ``ep``
    (and the block-diagonal factors of adapters with ``nblocks``), naming what to change."""
    num_experts = experts.num_experts
    if tp % ep or num_experts % ep:
        raise BDLoraConfigError(
            f"expert parallelism ep={ep} must divide the TP degree {tp} (its ranks are the TP group's) "
            f"and the {num_experts} experts of {name!r}; valid ep: "
            f"{[d for d in range(1, tp + 1) if tp % d == 0 and num_experts % d == 0]}"
        )
    expert_tp = tp // ep
    if expert_tp == 1:
        return
    layout = gate_layout_of(experts)
    if layout is None:
        raise BDLoraConfigError(
            f"{name!r} ({type(experts).__name__}): bdlora cannot tell how its gate and up halves are laid "
            f"out, so it cannot split each expert over {expert_tp} ranks; use ep={tp} (whole experts per "
            f"rank) or TP 1"
        )
    _check_expert_splits(name, experts, expert_tp, 2 if layout == "chunk" else 1, nblocks)


def _check_expert_splits(name: str, experts, expert_tp: int, segments: int, nblocks: list[int]) -> None:
    _, gate_up_out, _ = expert_shape(experts, "gate_up_proj")
    intermediate = gate_up_out // 2
    step = expert_tp * (segments if segments > 1 else 2)  # interleaved: gate/up pairs stay together
    if gate_up_out % step or intermediate % expert_tp:
        raise BDLoraConfigError(
            f"{name!r}: the expert intermediate size {intermediate} does not split over {expert_tp} "
            f"expert-TP ranks (tp / ep); pick ep so that tp / ep divides it"
        )
    for n in nblocks:
        if n % (segments * expert_tp):
            raise BDLoraConfigError(
                f"{name!r}: nblocks={n} must be a multiple of {segments * expert_tp} (gate/up segments "
                f"{segments} x expert-TP ranks {expert_tp}) for each rank to hold whole blocks of every "
                f"expert's adapter; or raise ep"
            )


def shard_experts_(experts: BDLoraExperts, name: str, tp: TPGroup, ep: int) -> None:
    """Keep this rank's experts, its slices of them and of their adapters (validated before)."""
    for p_name, layout in expert_layouts(experts, ep).items():
        style = ExpertsTP(f"{name}.{p_name}", tp, layout, experts.num_experts)
        keep_local_shards_(getattr(experts, p_name), style)
        experts.expert_offset, experts.num_local_experts = style.first_expert, style.local_experts


def check_expert_plan(plan, experts: dict[str, object], tp: int, ep: int, sharding_name: str) -> None:
    """The plan's expert tensors split over ``tp`` ranks at ``ep``: whole blocks per rank, rank
    rows evenly; only BD-LoRA's sharding places expert adapters."""
    if tp == 1:
        return
    expert_tp = tp // ep
    for m in plan.modules:
        if not m.experts:
            continue
        owner = m.name.rpartition(".")[0]
        if sharding_name != "bdlora":
            raise BDLoraConfigError(
                f"expert tensor {m.name!r} is adapted, but sharding={sharding_name!r} places adapters on "
                f"linear layers only; use sharding='bdlora', or drop target_parameters"
            )
        check_experts_tp(owner, experts[owner], tp, ep, [plan.global_nblocks])
        if m.rank % expert_tp:
            raise BDLoraConfigError(
                f"expert tensor {m.name!r}: rank {m.rank} is not divisible by the {expert_tp} expert-TP "
                f"ranks (tp {tp} / ep {ep}) each expert is split over"
            )
