"""The BD-LoRA linear layer: a frozen base weight plus named adapters.

Storage follows PEFT: ``y = x W^T``, ``W`` is ``(d_out, d_in)``; an adapter adds
``scale * B (A x)``. One factor is block-diagonal, kept packed as ``(out, in / N)`` with block ``j``
equal to ``weight.chunk(N, 0)[j]``: B for column-parallel layers, A for row-parallel ones.

This module knows nothing of process groups. A layer that ``bdlora.parallelize`` has sharded holds
a ``tp_style`` (from ``bdlora.parallel.styles``) that owns its communication and the placement of
its factor shards; the layer's own code then runs unchanged on the local shards, with
``local_nblocks`` (= N / t) blocks of the block-diagonal factor per rank.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Protocol

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


class _LoraLinear(torch.autograd.Function):
    """``x W^T + scale * (x A^T) B^T`` for a frozen ``W``, forward and backward by hand.

    Against autograd over the separate ops this saves the (tokens, d_out) delta and its sum in
    forward (``addmm_`` into the base output, the scale on the GEMM's alpha) and the extra
    (tokens, d_in) pass that accumulates the adapter's input gradient (``addmm_`` into the base's).

    Every product with a rank-sized side is computed with the rank as its output's rows
    (``h^T = A x^T``, ``B^T grad^T``, ``h^T grad``) and transposed as a view: a CPU BLAS picks a slow
    kernel for an output only r columns wide (3-4x at r = 8); on a GPU the two are one GEMM with
    other transpose flags.

    ==========  ==================  ===================================
    x           (T, d_in)           saved (the base linear saves it too)
    W, A, B     (d_out, d_in), (r, d_in), (d_out, r)
    h^T = A x^T (r, T)              saved
    ==========  ==================  ===================================
    """

    @staticmethod
    def forward(ctx, x, w, a, b, scale: float):
        h_t = a @ x.t()  # (r, T)
        out = (x @ w.t()).addmm_(h_t.t(), b.t(), alpha=scale)  # (T, d_out)
        ctx.save_for_backward(x, w, a, b, h_t)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, a, b, h_t = ctx.saved_tensors
        grad_h_t = (b.t() @ grad_out.t()).mul_(ctx.scale)  # (r, T)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ w).addmm_(grad_h_t.t(), a)  # (T, d_in)
        grad_a = grad_h_t @ x if ctx.needs_input_grad[2] else None  # (r, d_in)
        grad_b = (h_t @ grad_out).mul_(ctx.scale).t() if ctx.needs_input_grad[3] else None  # (d_out, r)
        return grad_x, None, grad_a, grad_b, None


def dense_factors(
    role: Role, a: torch.Tensor, b: torch.Tensor, nblocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the block-diagonal factor expanded: a plain LoRA adapter."""
    if role is Role.COLUMN:
        return a, expand_block_diag(b, nblocks)
    return expand_block_diag(a, nblocks), b


def global_factor_shapes(
    role: Role, d_in: int, d_out: int, rank: int, nblocks: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Unsharded (A, B) shapes; the block-diagonal factor is packed (``nblocks=1``: dense LoRA)."""
    if role is Role.COLUMN:
        return (rank, d_in), (d_out, rank // nblocks)
    return (rank, d_in // nblocks), (d_out, rank)


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


def weight_moments(w: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of a weight (shard) in float64: shards' moments add up."""
    w = w.detach().double()
    return torch.stack([w.sum(), (w * w).sum(), w.new_tensor(float(w.numel()))])


def std_from_moments(moments: torch.Tensor) -> float:
    """The unbiased standard deviation from ``weight_moments`` (summed over shards)."""
    total, sq, n = moments.tolist()
    return math.sqrt(max(sq - total * total / n, 0.0) / (n - 1))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer storing ``W^T``, ``(d_in, d_out)``, ``y = x W^T + b``.

    Looked up in ``sys.modules``: a model holding a Conv1D has imported it, and ``import bdlora``
    stays free of the transformers import.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """A layer ``BDLoraLinear`` can wrap: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


BASE_ADAPTER = "__base__"  # PEFT's name for a row of a mixed batch that runs the base model alone


class RowAdapters:
    """The adapter of each row of a mixed batch (PEFT's ``adapter_names``), and the rows each takes.

    A layer's input has the batch as dim 0, or the batch and sequence flattened row-major into it
    (a MoE block's ``(B*T, H)``): ``groups`` maps either to each adapter's items of that dim. The
    index tensors are built once per length and device, so a forward's layers share them.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.adapters = tuple(dict.fromkeys(n for n in self.names if n != BASE_ADAPTER))  # in order
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    @classmethod
    def of(cls, adapter_names: Sequence[str] | RowAdapters | None) -> RowAdapters | None:
        if adapter_names is None or isinstance(adapter_names, RowAdapters):
            return adapter_names
        return cls(adapter_names)

    def __len__(self) -> int:
        return len(self.names)

    def per_item(self, length: int) -> int:
        """Items of a dim 0 of ``length`` per batch row (1, or the sequence length when flattened)."""
        rows = len(self.names)
        if rows == 0 or length % rows:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{rows} and {length} respectively."
            )
        return length // rows

    def groups(self, length: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter, indices into a dim 0 of ``length``) for every adapter of the batch, in order;
        rows of ``__base__`` are in none."""
        key = (length, torch.device(device))
        if key not in self._groups:
            per_row = self.per_item(length)
            out = []
            for name in self.adapters:
                rows = [r for r, n in enumerate(self.names) if n == name]
                items = [r * per_row + i for r in rows for i in range(per_row)]
                out.append((name, torch.tensor(items, dtype=torch.long, device=device)))
            self._groups[key] = out
        return self._groups[key]

    def ids(self, length: int, device: torch.device) -> torch.Tensor:
        """(length,) index into ``adapters`` of each item of a dim 0 of ``length``; -1 for the base."""
        out = torch.full((length,), -1, dtype=torch.long, device=device)
        for k, (_, index) in enumerate(self.groups(length, device)):
            out[index] = k
        return out


def check_unmerged(layer: nn.Module) -> None:
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call "
            "`bdlora.unmerge_adapter(model)` first."
        )


class TPStyle(Protocol):
    """What a sharded layer delegates to its ``tp_style`` (implemented in ``bdlora.parallel.styles``)."""

    def local_nblocks(self, nblocks: int) -> int: ...

    def shard_factors(
        self, layer: BDLoraLinear, a_full: torch.Tensor, b_full: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def gather_factors(self, layer: BDLoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sum_moments(self, moments: torch.Tensor) -> torch.Tensor: ...

    def check_merge(self, layer: BDLoraLinear) -> None: ...

    def forward(
        self, layer: BDLoraLinear, x: torch.Tensor, rows: RowAdapters | None = None
    ) -> torch.Tensor: ...


class BDLoraLinear(nn.Module):
    """A frozen linear layer with named BD-LoRA adapters, one active at a time (or, in a mixed
    batch, each row its own: ``forward(x, adapter_names=[...])``).

    ``global_shape`` is the unsharded base weight's ``(d_out, d_in)``; under TP ``base_layer`` holds
    this rank's shard and ``tp_style`` says how the shards combine. A transformers ``Conv1D`` base
    (``fan_in_fan_out``, as PEFT calls it) stays the ``base_layer``, in its own ``(d_in, d_out)``
    layout; ``weight`` is always the ``(d_out, d_in)`` view, which all math reads and merging writes.
    """

    # Forward and backward through ``fused_kernel`` where it applies; False: autograd over the
    # separate ops (``lora_delta``), the reference the fused path is tested and profiled against.
    fused: bool = True
    # (x, W, A, B, scale) -> x W^T + scale (x A^T) B^T; a benchmark may set another on a layer
    fused_kernel: type[torch.autograd.Function] = _LoraLinear

    def __init__(self, base_layer: nn.Module, role: Role) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.role = role
        self.tp_style: TPStyle | None = None
        self.global_shape = tuple(self.weight.shape)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.local_nblocks: dict[str, int] = {}  # blocks of the block-diagonal factor on this rank
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in)`` (a transposed view of a Conv1D's)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, rank: int, nblocks: int, scale: float, dropout: float = 0.0) -> None:
        """Allocate adapter ``name`` (global ``rank``, ``nblocks``), factors left to ``set_factors``."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first")
        shape_a, shape_b = self.factor_shapes(rank, nblocks)
        w = self.weight
        a_full = torch.empty(shape_a, dtype=w.dtype, device="meta")
        b_full = torch.empty(shape_b, dtype=w.dtype, device="meta")
        a_local, b_local = self._shard(a_full, b_full)
        self.lora_A[name] = nn.Parameter(torch.empty(a_local.shape, dtype=w.dtype, device=w.device))
        self.lora_B[name] = nn.Parameter(torch.empty(b_local.shape, dtype=w.dtype, device=w.device))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scale
        self.local_nblocks[name] = self.tp_style.local_nblocks(nblocks) if self.tp_style else nblocks
        self.set_adapter(self.active_adapter or name)  # the new adapter trains only once active

    def factor_shapes(self, rank: int, nblocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Unsharded (A, B) shapes, the block-diagonal factor packed."""
        d_out, d_in = self.global_shape
        return global_factor_shapes(self.role, d_in, d_out, rank, nblocks)

    @torch.no_grad()
    def init_full(self, a: torch.Tensor, b: torch.Tensor, init: str, base_std: float, d_in: int) -> None:
        """Initialise unsharded factors in place (``init_factors``)."""
        init_factors(a, b, init, base_std, d_in)

    def _shard(self, a_full: torch.Tensor, b_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tp_style is None:
            return a_full, b_full
        return self.tp_style.shard_factors(self, a_full, b_full)

    @torch.no_grad()
    def set_factors(self, name: str, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Fill adapter ``name`` from unsharded factors (a sharded layer keeps its shard)."""
        a_local, b_local = self._shard(a_full, b_full)
        self.lora_A[name].copy_(a_local)
        self.lora_B[name].copy_(b_local)

    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsharded (A, B) of ``name`` (a copy); on a sharded layer every TP rank must call it."""
        if self.tp_style is None:
            return self.lora_A[name].detach().clone(), self.lora_B[name].detach().clone()
        return self.tp_style.gather_factors(self, name)

    def weight_std(self) -> float:
        """Standard deviation of the unsharded base weight (every TP rank calls it when sharded)."""
        moments = weight_moments(self.weight)
        if self.tp_style is not None:
            moments = self.tp_style.sum_moments(moments)
        return std_from_moments(moments)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.scaling[name], self.local_nblocks[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if len(self.lora_A):
                self.set_adapter(next(iter(self.lora_A)))

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter; only its factors train.

        The weight holds at most the active adapter's delta: another adapter merged into it is
        unmerged first (PEFT unmerges too; ``bdlora.set_adapter`` warns when it does).
        """
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer; have: {', '.join(self.lora_A)}")
        for key in [key for key in self.merged if key != name]:
            self.unmerge(key)
        self.active_adapter = name
        for key in self.lora_A:
            self.lora_A[key].requires_grad_(key == name)
            self.lora_B[key].requires_grad_(key == name)

    def live_adapter(self) -> str | None:
        """The adapter forward adds: the active one unless disabled or merged into the weight (the
        only adapter the weight may hold, see ``set_adapter``)."""
        name = self.active_adapter
        return None if name is None or self.disabled or name in self.merged else name

    def adapter_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.lora_dropout[name](x.to(self.lora_A[name].dtype))

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scale * B (A x)`` on the local shards; x: (..., d_in_local) -> (..., d_out_local).

        The rank-sized activation h is scaled, not the d_out-sized output: a pass over (tokens, r)
        instead of (tokens, d_out), forward and backward.
        """
        return self.factor_delta(x, self.lora_A[name], self.lora_B[name], name)

    def factor_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        """``scale * B (A x)`` for local factors ``a``, ``b`` of adapter ``name`` (``lora_delta``)."""
        nblocks = self.local_nblocks[name]
        x = self.adapter_input(x, name)
        if self.role is Role.COLUMN:
            h = F.linear(x, a) * self.scaling[name]  # (..., r_local)
            return block_diag_matmul(h, b, nblocks)  # (..., d_out_local)
        h = block_diag_matmul(x, a, nblocks) * self.scaling[name]  # (..., r_local)
        return F.linear(h, b)  # (..., d_out)

    def partial_forward(self, x: torch.Tensor, rows: RowAdapters | None = None) -> torch.Tensor:
        """``W x`` plus the live adapter's delta (``rows``: each row's adapter's), before the bias
        (a row shard's partial sum)."""
        if rows is not None:
            return self.rows_forward(x, rows)
        name = self.live_adapter()
        if name is None:
            return F.linear(x, self.weight)
        if self.fused and self._fusable(x, name):
            return self._fused_forward(x, name)
        return F.linear(x, self.weight) + self.lora_delta(x, name).to(x.dtype)

    def rows_forward(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """``W x`` plus, on each row of dim 0, the delta of that row's adapter (none for
        ``__base__``, or an adapter this layer does not hold), before the bias.

        Each adapter runs on its own rows' local shards: under TP nothing is added to the base
        layer's own communication. Disabled adapters leave the base alone, as in PEFT.
        """
        check_unmerged(self)
        out = F.linear(x, self.weight)  # (B, ..., d_out_local)
        if self.disabled:
            return out
        for name, index in rows.groups(x.shape[0], x.device):
            if name not in self.lora_A:
                continue
            if len(index) == x.shape[0]:  # every row: no gather
                out = out + self.lora_delta(x, name).to(out.dtype)
                continue
            delta = self.lora_delta(x.index_select(0, index), name)  # (rows, ..., d_out_local)
            out = out.index_add(0, index, delta.to(out.dtype))
        return out

    def _fusable(self, x: torch.Tensor, name: str) -> bool:
        """One block of the block-diagonal factor on this rank (BD-LoRA at TP = nblocks, or plain
        LoRA), one dtype, and no dropout (the adapter then sees the base's own input). More blocks
        take the packed ``bmm``: a dense expansion would multiply that factor's FLOPs by the blocks.
        """
        w, a = self.weight, self.lora_A[name]
        return (
            self.local_nblocks[name] == 1
            and x.dtype == w.dtype == a.dtype
            and isinstance(self.lora_dropout[name], nn.Identity)
        )

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x_2d = x.reshape(-1, x.shape[-1])  # (T, d_in)
        a, b = self.lora_A[name], self.lora_B[name]
        out = self.fused_kernel.apply(x_2d, self.weight, a, b, self.scaling[name])  # (T, d_out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return out if bias is None else out + bias

    def forward(
        self, x: torch.Tensor, adapter_names: Sequence[str] | RowAdapters | None = None
    ) -> torch.Tensor:
        """``x W^T + b`` plus the live adapter's delta; with ``adapter_names`` (one name per row of
        dim 0, ``"__base__"`` for none: PEFT's mixed batch), each row's own adapter's delta."""
        rows = RowAdapters.of(adapter_names)
        if self.tp_style is not None:
            return self.tp_style.forward(self, x, rows)
        return self.add_bias(self.partial_forward(x, rows))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B A`` on this rank's shard of the weight, as a dense matrix in fp32."""
        if self.tp_style is not None:
            self.tp_style.check_merge(self)
        a, b = dense_factors(
            self.role, self.lora_A[name].float(), self.lora_B[name].float(), self.local_nblocks[name]
        )
        return (b @ a) * self.scaling[name]

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold ``name`` (default: the active adapter) into the weight and make it the active one.

        Forward then computes ``W + delta(name)`` alone: any other merged adapter is unmerged first
        (``set_adapter``), so the weight never holds two adapters.
        """
        name = name or self.active_adapter
        if name is None or name in self.merged:
            return
        self.set_adapter(name)
        w = self.weight  # a view: writes through to a Conv1D's (d_in, d_out) storage
        w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        for key in [name] if name else list(reversed(self.merged)):
            if key in self.merged:
                w = self.weight
                w.copy_((w.float() - self.delta_weight(key)).to(w.dtype))
                self.merged.remove(key)

    def extra_repr(self) -> str:
        return (
            f"role={self.role.value}, tp={self.tp_style or 'none'}, "
            f"adapters={list(self.lora_A)}, active={self.active_adapter}"
        )
