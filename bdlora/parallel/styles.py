"""How a TP-sharded ``BDLoraLinear`` holds its factor shards and communicates: one class per sharding.

``BDLoraTP`` is the project's layout; ``SLoraTP`` is the dense-LoRA baseline every benchmark
compares against. Each class carries its placement table (``factor_dims``: the dimension of (A, B)
that TP splits, None for replicated) and its forward; ``bdlora.parallelize`` gives every sharded
layer an instance holding the TP group and the block (``placement.TPBlock``) the layer opens or
closes.

BD-LoRA (``t`` ranks, N blocks, rank i):

=======  ======================  ======================  =============================  ==========
role     A on rank i             B on rank i             local compute                  adds
=======  ======================  ======================  =============================  ==========
column   ``(r/t, d_in)``         packed ``(d_out/t,      ``W_i f(x) + s B_i (A_i f(x))``  nothing
                                 r/N)``, N/t blocks
row      packed ``(r/t,          ``(d_out, r/t)``        ``g(W_i x_i + s B_i (A_i x_i))``  nothing
         d_in/N)``, N/t blocks                           ``+ bias``
=======  ======================  ======================  =============================  ==========

S-LoRA: column layers shard A on r and all-gather the ``(tokens, r)`` activation (backward:
reduce-scatter); row layers shard A on d_in and all-reduce the ``(tokens, r)`` partial, adding
``B h`` after the base's all-reduce.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.layers import BDLoraLinear
from bdlora.parallel.comm import TPGroup, gather_along, gather_from_tp, reduce_from_tp, sum_over
from bdlora.parallel.placement import TPBlock
from bdlora.plan import Plan, check_plan_tp
from bdlora.roles import Role


def take_shard(tensor: torch.Tensor, dim: int | None, tp: TPGroup) -> torch.Tensor:
    """This rank's contiguous shard of an unsharded tensor along ``dim`` (None: all of it)."""
    if dim is None or tp.size == 1:
        return tensor
    return tensor.chunk(tp.size, dim)[tp.rank]


class BDLoraTP:
    """BD-LoRA under TP: every factor shard lines up with the base shard; adds no collective."""

    name: ClassVar[str] = "bdlora"
    # (A, B) shard dims per role: column A on r, packed B on d_out; row packed A on r, B on r
    factor_dims: ClassVar[dict[Role, tuple[int | None, int | None]]] = {
        Role.COLUMN: (0, 0),
        Role.ROW: (0, 1),
    }
    # the base weight's and bias's shard dims; a row layer's bias is replicated and added after g
    base_dims: ClassVar[dict[Role, tuple[int, int | None]]] = {Role.COLUMN: (0, 0), Role.ROW: (1, None)}

    def __init__(self, layer_name: str, tp: TPGroup, block: TPBlock) -> None:
        self.layer_name, self.tp, self.block = layer_name, tp, block

    # -- the sharding as a whole (class level) ---------------------------------------------------
    @classmethod
    def adapter_config(cls, config: BDLoraConfig) -> BDLoraConfig:
        return config

    @classmethod
    def check_plan(cls, plan: Plan, tp: int) -> None:
        check_plan_tp(plan, tp, whole_blocks=True)

    @classmethod
    def check_layer(cls, name: str, layer: BDLoraLinear) -> None:
        """An adapter added before sharding must suit this sharding."""

    # -- one layer (the TPStyle protocol of bdlora.layers) ---------------------------------------
    def local_nblocks(self, nblocks: int) -> int:
        return nblocks // self.tp.size

    def shard_factors(
        self, layer: BDLoraLinear, a_full: torch.Tensor, b_full: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim_a, dim_b = self.factor_dims[layer.role]
        return take_shard(a_full, dim_a, self.tp), take_shard(b_full, dim_b, self.tp)

    def gather_factors(self, layer: BDLoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        dim_a, dim_b = self.factor_dims[layer.role]
        return gather_along(layer.lora_A[name], dim_a, self.tp), gather_along(
            layer.lora_B[name], dim_b, self.tp
        )

    def sum_moments(self, moments: torch.Tensor) -> torch.Tensor:
        return sum_over(moments, self.tp.group)

    def check_merge(self, layer: BDLoraLinear) -> None:
        """Each rank's ``B_i A_i`` is exactly its shard of the merged weight's delta."""

    def forward(self, layer: BDLoraLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.role is Role.COLUMN:
            return layer.add_bias(layer.partial_forward(self.block.enter(self.layer_name, x)))
        if self.block.split():  # the partial sum leaves the block to be reduce-scattered
            partial = self.block.exit(layer.partial_forward(x))
            return layer.add_bias(partial) if self.tp.rank == 0 else partial  # bias once in the sum
        return layer.add_bias(self.block.exit(layer.partial_forward(x)))  # g: adapter partial included

    def __repr__(self) -> str:
        return f"{self.name}:{self.tp.rank}/{self.tp.size}"


class SLoraTP(BDLoraTP):
    """The S-LoRA baseline: dense LoRA whose factor shards need the ``(tokens, r)`` collectives."""

    name: ClassVar[str] = "slora"
    factor_dims: ClassVar[dict[Role, tuple[int | None, int | None]]] = {
        Role.COLUMN: (0, 0),  # A on r, B on d_out
        Role.ROW: (1, None),  # A on d_in, B replicated
    }

    @classmethod
    def adapter_config(cls, config: BDLoraConfig) -> BDLoraConfig:
        return replace(config, nblocks=1)  # dense LoRA

    @classmethod
    def check_plan(cls, plan: Plan, tp: int) -> None:
        check_plan_tp(plan, tp, whole_blocks=False)

    @classmethod
    def check_layer(cls, name: str, layer: BDLoraLinear) -> None:
        if any(n > 1 for n in layer.local_nblocks.values()):
            raise BDLoraConfigError(
                f"module {name!r} holds block-diagonal adapters (nblocks > 1); sharding='slora' trains "
                f"dense LoRA: add the adapter with nblocks=1, or after parallelize"
            )

    def local_nblocks(self, nblocks: int) -> int:
        return nblocks

    def check_merge(self, layer: BDLoraLinear) -> None:
        raise NotImplementedError(
            "merging a TP-sharded S-LoRA adapter needs its gathered A; save it and merge at TP 1"
        )

    def forward(self, layer: BDLoraLinear, x: torch.Tensor) -> torch.Tensor:
        name = layer.live_adapter()
        if layer.role is Role.COLUMN:
            x = self.block.enter(self.layer_name, x)
            out = F.linear(x, layer.weight)  # (..., d_out/t)
            if name is not None:
                h = F.linear(layer.adapter_input(x, name), layer.lora_A[name])  # (..., r/t)
                h = gather_from_tp(h, self.tp)  # (..., r)
                out = out + F.linear(h * layer.scaling[name], layer.lora_B[name]).to(out.dtype)
            return layer.add_bias(out)
        delta = None
        if name is not None:
            h = reduce_from_tp(
                F.linear(layer.adapter_input(x, name), layer.lora_A[name]), self.tp
            )  # (..., r)
            delta = F.linear(h * layer.scaling[name], layer.lora_B[name])  # (..., d_out), complete
        out = reduce_from_tp(F.linear(x, layer.weight), self.tp)
        self.block.close()
        if delta is not None:
            out = out + delta.to(out.dtype)
        return layer.add_bias(out)


SHARDINGS: dict[str, type[BDLoraTP]] = {cls.name: cls for cls in (BDLoraTP, SLoraTP)}


def sharding_class(name: str) -> type[BDLoraTP]:
    if name not in SHARDINGS:
        raise ValueError(f"unknown sharding {name!r}; valid: {', '.join(SHARDINGS)}")
    return SHARDINGS[name]


def factor_shard_dims(role: Role, sharding: str = "bdlora") -> tuple[int | None, int | None]:
    """The dimension of (A, B) that TP splits under ``sharding`` (None: replicated)."""
    return sharding_class(sharding).factor_dims[role]
