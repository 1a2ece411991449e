"""The BD-LoRA linear layer: a frozen base weight plus named adapters.

Storage follows PEFT: ``y = x W^T``, ``W`` is ``(d_out, d_in)``; an adapter adds
``scale * B (A x)``. One factor is block-diagonal, kept packed as ``(out, in / N)`` with block ``j``
equal to ``weight.chunk(N, 0)[j]``. Under tensor parallelism (degree ``t``, ``N`` a multiple of ``t``)
each rank holds its contiguous shard of every factor, and the same block-diagonal code runs on
``N/t`` local blocks:

=======  ===================  ======================  =========================  ============
role     A on rank i          B on rank i             local compute              adds
=======  ===================  ======================  =========================  ============
column   ``(r/t, d_in)``      packed ``(d_out/t,      ``W_i x + s B_i (A_i x)``  nothing
                              r/N)``, N/t blocks
row      packed ``(r/t,       ``(d_out, r/t)``        ``W_i x_i + s B_i (A_i     nothing
         d_in/N)``, N/t blks                          x_i)``, then one all-red.
=======  ===================  ======================  =========================  ============

The row-parallel all-reduce runs once, after the adapter's partial output joins the base's, and
before the bias. ``sharding="slora"`` is the dense-LoRA baseline (S-LoRA): column layers shard A
on r and all-gather the ``(tokens, r)`` activation; row layers shard A on d_in and all-reduce the
``(tokens, r)`` partial, adding ``B h`` after the base's all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bdlora.parallel.comm import TPGroup, gather_from_tp, reduce_from_tp
from bdlora.roles import Role

SHARDINGS = ("bdlora", "slora")


def block_diag_matmul(x: torch.Tensor, w_packed: torch.Tensor, nblocks: int) -> torch.Tensor:
    """``x @ block_diag(*w_packed.chunk(nblocks, 0)).T`` as one batched matmul.

    x: (..., N*m), w_packed: (N*n, m) -> (..., N*n).
    """
    n = w_packed.shape[0] // nblocks
    m = w_packed.shape[1]
    x_blocks = x.reshape(-1, nblocks, m).transpose(0, 1)  # (N, T, m)
    w_blocks = w_packed.view(nblocks, n, m)  # (N, n, m)
    out = torch.bmm(x_blocks, w_blocks.transpose(1, 2))  # (N, T, n)
    return out.transpose(0, 1).reshape(*x.shape[:-1], nblocks * n)  # (..., N*n)


def expand_block_diag(w_packed: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The dense matrix of a packed block-diagonal factor: (N*n, m) -> (N*n, N*m)."""
    return torch.block_diag(*w_packed.chunk(nblocks, 0))


def dense_factors(
    role: Role, a: torch.Tensor, b: torch.Tensor, nblocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the block-diagonal factor expanded: a plain LoRA adapter."""
    if role is Role.COLUMN:
        return a, expand_block_diag(b, nblocks)
    return expand_block_diag(a, nblocks), b


def base_shard_dims(role: Role) -> tuple[int, int | None]:
    """The dimension of the base (weight, bias) that TP splits; a row layer's bias is replicated
    and added once, after the all-reduce."""
    return (0, 0) if role is Role.COLUMN else (1, None)


def factor_shard_dims(role: Role, sharding: str = "bdlora") -> tuple[int | None, int | None]:
    """The dimension of (A, B) that TP splits (None: replicated); the one place placements live."""
    if sharding == "slora":
        return (0, 0) if role is Role.COLUMN else (1, None)
    return (0, 0) if role is Role.COLUMN else (0, 1)


def global_factor_shapes(
    role: Role, d_in: int, d_out: int, rank: int, nblocks: int, sharding: str = "bdlora"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Unsharded (A, B) shapes; S-LoRA is dense LoRA (no block-diagonal factor)."""
    if sharding == "slora":
        return (rank, d_in), (d_out, rank)
    if role is Role.COLUMN:
        return (rank, d_in), (d_out, rank // nblocks)
    return (rank, d_in // nblocks), (d_out, rank)


def take_shard(tensor: torch.Tensor, dim: int | None, tp: TPGroup) -> torch.Tensor:
    """This rank's contiguous shard of an unsharded tensor along ``dim`` (None: all of it)."""
    if dim is None or tp.size == 1:
        return tensor
    return tensor.chunk(tp.size, dim)[tp.rank]


def shard_shape(shape: tuple[int, int], dim: int | None, size: int) -> tuple[int, int]:
    if dim is None:
        return shape
    out = list(shape)
    out[dim] //= size
    return tuple(out)


@torch.no_grad()
def init_factors(a: torch.Tensor, b: torch.Tensor, init: str, base_std: float, d_in: int) -> None:
    """Initialise A and B in place; every strategy leaves ``B = 0`` so the step-0 output is the base's.

    - ``lora``: PEFT's default, A kaiming-uniform (a = sqrt(5)) over its own fan-in.
    - ``gaussian``: A ~ N(0, 1/r^2), PEFT's ``init_lora_weights="gaussian"``.
    - ``base_stats``: A ~ N(0, sigma^2), ``sigma = std(W) * sqrt(d_in / fan_in(A))``: each
      coordinate of ``A x`` then has the variance of a coordinate of ``W x`` whatever r and N
      (fan_in(A) is d_in for a dense A, d_in/N for a block-diagonal one), so B's first updates act
      on activations of the base layer's own scale. B = 0 keeps the step-0 output unchanged.
    """
    b.zero_()
    if init == "lora":
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in
        a.uniform_(-bound, bound)
    elif init == "gaussian":
        a.normal_(0.0, 1.0 / a.shape[0])
    elif init == "base_stats":
        a.normal_(0.0, base_std * math.sqrt(d_in / a.shape[1]))
    else:
        raise ValueError(f"unknown init {init!r}; valid: lora, gaussian, base_stats")


class BDLoraLinear(nn.Module):
    """A frozen linear layer with named BD-LoRA adapters, one active at a time."""

    def __init__(
        self, base_layer: nn.Linear, role: Role, tp: TPGroup | None = None, sharding: str = "bdlora"
    ) -> None:
        super().__init__()
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {sharding!r}; valid: {', '.join(SHARDINGS)}")
        self.base_layer = base_layer
        self.role = role
        self.tp = tp or TPGroup(None)
        self.sharding = sharding
        # (d_out, d_in) of the unsharded base weight; the local weight is a shard of it
        self.global_shape = tuple(base_layer.weight.shape)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.nblocks: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def factor_shapes(self, rank: int, nblocks: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(global, local) shapes of (A, B) for a global ``rank`` and ``nblocks``."""
        d_out, d_in = self.global_shape
        shapes = global_factor_shapes(self.role, d_in, d_out, rank, nblocks, self.sharding)
        dims = factor_shard_dims(self.role, self.sharding)
        local = tuple(shard_shape(sh, d, self.tp.size) for sh, d in zip(shapes, dims))
        return shapes, local

    def add_adapter(self, name: str, rank: int, nblocks: int, scale: float, dropout: float = 0.0) -> None:
        """Allocate adapter ``name`` (global ``rank``, ``nblocks``) uninitialised; see ``init_factors``."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first")
        if self.sharding == "slora":
            nblocks = 1
        _, (shape_a, shape_b) = self.factor_shapes(rank, nblocks)
        w = self.base_layer.weight
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, dtype=w.dtype, device=w.device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, dtype=w.dtype, device=w.device))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scale
        self.nblocks[name] = max(nblocks // self.tp.size, 1)  # blocks held locally
        self.set_adapter(self.active_adapter or name)  # the new adapter trains only once active

    @torch.no_grad()
    def set_factors(self, name: str, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Fill adapter ``name`` from unsharded factors (this rank keeps its shard)."""
        dim_a, dim_b = factor_shard_dims(self.role, self.sharding)
        self.lora_A[name].copy_(take_shard(a_full, dim_a, self.tp))
        self.lora_B[name].copy_(take_shard(b_full, dim_b, self.tp))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.scaling[name], self.nblocks[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if len(self.lora_A):
                self.set_adapter(next(iter(self.lora_A)))

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter; only its factors train."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer; have: {', '.join(self.lora_A)}")
        self.active_adapter = name
        for key in self.lora_A:
            self.lora_A[key].requires_grad_(key == name)
            self.lora_B[key].requires_grad_(key == name)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scale * B (A x)`` for adapter ``name``; x: (..., d_in) -> (..., d_out)."""
        a, b, nblocks = self.lora_A[name], self.lora_B[name], self.nblocks[name]
        # scale the rank-sized activation h, not the d_out-sized output: a pass over (tokens, r)
        # instead of (tokens, d_out), forward and backward
        scale = self.scaling[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        if self.sharding == "slora":
            h = F.linear(x, a)  # column: (..., r/t); row: partial (..., r)
            if self.role is Role.COLUMN:
                h = gather_from_tp(h, self.tp)  # (..., r)
            else:
                h = reduce_from_tp(h, self.tp)  # (..., r)
            return F.linear(h * scale, b)  # column: (..., d_out/t); row: (..., d_out)
        if self.role is Role.COLUMN:
            h = F.linear(x, a) * scale  # (..., r/t)
            return block_diag_matmul(h, b, nblocks)  # (..., d_out/t)
        h = block_diag_matmul(x, a, nblocks) * scale  # (..., r/t)
        return F.linear(h, b)  # (..., d_out) partial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base_layer.weight)  # column: (..., d_out/t); row: partial (..., d_out)
        name = self.active_adapter
        delta = None
        if name is not None and not self.disabled and name not in self.merged:
            delta = self.lora_delta(x, name).to(out.dtype)
        # BD-LoRA's partial joins the base's before the one all-reduce; S-LoRA's row output is
        # already complete, so it is added after.
        after_reduce = self.sharding == "slora" and self.role is Role.ROW
        if delta is not None and not after_reduce:
            out = out + delta
        if self.role is Role.ROW:
            out = reduce_from_tp(out, self.tp)
        if delta is not None and after_reduce:
            out = out + delta
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B A`` as a dense (d_out, d_in) matrix, in fp32."""
        if self.sharding == "slora" and self.tp.size > 1:
            raise NotImplementedError("merging a TP-sharded S-LoRA adapter needs its gathered A")
        a, b = dense_factors(
            self.role, self.lora_A[name].float(), self.lora_B[name].float(), self.nblocks[name]
        )
        return (b @ a) * self.scaling[name]

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name is None or name in self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        for key in [name] if name else list(reversed(self.merged)):
            if key in self.merged:
                w = self.base_layer.weight
                w.copy_((w.float() - self.delta_weight(key)).to(w.dtype))
                self.merged.remove(key)

    def extra_repr(self) -> str:
        return (
            f"role={self.role.value}, sharding={self.sharding}, tp={self.tp.rank}/{self.tp.size}, "
            f"adapters={list(self.lora_A)}, active={self.active_adapter}"
        )
