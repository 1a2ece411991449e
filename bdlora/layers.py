"""The BD-LoRA linear layer: a frozen base weight plus named adapters.

Storage follows PEFT: ``y = x W^T``, ``W`` is ``(d_out, d_in)``; an adapter adds
``scale * B (A x)``. One factor is block-diagonal, kept packed as ``(out, in / N)`` with block ``j``
equal to ``weight.chunk(N, 0)[j]``:

==========  =======================  =======================  ===========================
role        A                        B                        block-diagonal product
==========  =======================  =======================  ===========================
column      dense ``(r, d_in)``      packed ``(d_out, r/N)``  ``B``: N blocks (d_out/N, r/N)
row         packed ``(r, d_in/N)``   dense ``(d_out, r)``     ``A``: N blocks (r/N, d_in/N)
==========  =======================  =======================  ===========================

Under tensor parallelism a layer holds only its rank's shards (see ``bdlora.parallel``): the
shapes above with ``d_out/t`` (column) or ``d_in/t`` (row), ``r/t`` and ``N/t`` blocks, and the same
code runs on them. ``reduce_output`` is the row-parallel all-reduce; it runs once, after the
adapter's partial output joins the base's, and before the bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bdlora.roles import Role


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


def factor_shapes(role: Role, d_in: int, d_out: int, rank: int, nblocks: int) -> tuple[tuple, tuple]:
    """Stored shapes of (A, B) for a layer with these (local) sizes."""
    if role is Role.COLUMN:
        return (rank, d_in), (d_out, rank // nblocks)
    return (rank, d_in // nblocks), (d_out, rank)


@torch.no_grad()
def init_factors(
    a: torch.Tensor, b: torch.Tensor, init: str, base_std: float, d_in: int, generator=None
) -> None:
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
        a.uniform_(-bound, bound, generator=generator)
    elif init == "gaussian":
        a.normal_(0.0, 1.0 / a.shape[0], generator=generator)
    elif init == "base_stats":
        a.normal_(0.0, base_std * math.sqrt(d_in / a.shape[1]), generator=generator)
    else:
        raise ValueError(f"unknown init {init!r}; valid: lora, gaussian, base_stats")


class BDLoraLinear(nn.Module):
    """A frozen linear layer with named BD-LoRA adapters, one active at a time."""

    def __init__(
        self,
        base_layer: nn.Linear,
        role: Role,
        reduce_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.reduce_output = reduce_output
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

    def add_adapter(self, name: str, rank: int, nblocks: int, scale: float, dropout: float = 0.0) -> None:
        """Allocate adapter ``name`` uninitialised (see ``init_factors``).

        ``rank`` and ``nblocks`` are this layer's local share; ``scale`` is the global alpha / r.
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first")
        d_out, d_in = self.base_layer.weight.shape
        shape_a, shape_b = factor_shapes(self.role, d_in, d_out, rank, nblocks)
        w = self.base_layer.weight
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, dtype=w.dtype, device=w.device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, dtype=w.dtype, device=w.device))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scale
        self.nblocks[name] = nblocks
        if self.active_adapter is None:
            self.set_adapter(name)

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
        x = self.lora_dropout[name](x)
        if self.role is Role.COLUMN:
            h = F.linear(x, a)  # (..., r)
            out = block_diag_matmul(h, b, nblocks)  # (..., d_out)
        else:
            h = block_diag_matmul(x, a, nblocks)  # (..., r)
            out = F.linear(h, b)  # (..., d_out)
        return out * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base_layer.weight)
        name = self.active_adapter
        if name is not None and not self.disabled and name not in self.merged:
            out = out + self.lora_delta(x.to(self.lora_A[name].dtype), name).to(out.dtype)
        if self.reduce_output is not None:
            out = self.reduce_output(out)
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B A`` as a dense (d_out, d_in) matrix, in fp32."""
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        nblocks = self.nblocks[name]
        if self.role is Role.COLUMN:
            b = expand_block_diag(b, nblocks)
        else:
            a = expand_block_diag(a, nblocks)
        return (b @ a) * self.scaling[name]

    def dense_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with the block-diagonal factor expanded: a plain LoRA adapter."""
        a, b, nblocks = self.lora_A[name].detach(), self.lora_B[name].detach(), self.nblocks[name]
        if self.role is Role.COLUMN:
            return a, expand_block_diag(b, nblocks)
        return expand_block_diag(a, nblocks), b

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
        return f"role={self.role.value}, adapters={list(self.lora_A)}, active={self.active_adapter}"
