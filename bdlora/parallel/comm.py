"""Collectives: TP mappings as named autograd functions, then bookkeeping reductions.

Megatron's mappings: ``copy_to_tp`` ("f": forward identity, backward all-reduce) sits where a
replicated activation enters column-parallel layers; ``reduce_from_tp`` ("g": forward all-reduce,
backward identity) sums row-parallel partial outputs. ``gather_from_tp`` exists only for the
S-LoRA baseline, which needs the full rank dimension of a sharded activation.

Sequence parallelism splits the activations between blocks along the sequence (dim 1 of
``(B, T, D)``): ``gather_seq`` replaces f (forward all-gather, backward reduce-scatter) and
``reduce_scatter_seq`` replaces g (forward reduce-scatter, backward all-gather), the same bytes as
the all-reduces they stand for. ``gather_last`` and ``split_last`` serve the TP plan's
``colwise_gather_output`` / ``rowwise_split_input`` layers (and vocabulary-parallel logits);
``once_in_sum`` lets a complete value join a row layer's partial sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """The tensor-parallel process group a model is sharded over, and this process's place in it."""

    group: dist.ProcessGroup | None
    rank: int = 0
    size: int = 1

    @classmethod
    def from_group(cls, group: dist.ProcessGroup) -> TPGroup:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce of grad_x over the TP group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce (sum) of the partial outputs; backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # never reduce a tensor autograd saved
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather along the last dim (..., k) -> (..., t*k); backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim(grad, grad.dim() - 1, ctx.group), None


def _all_gather_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Shards of ``x`` along ``dim`` concatenated in rank order."""
    t = dist.get_world_size(group)
    x_front = x.movedim(dim, 0).contiguous()  # (k, ...)
    out = x_front.new_empty((t * x_front.shape[0], *x_front.shape[1:]))  # (t*k, ...)
    dist.all_gather_single(out, x_front, group=group)
    # contiguous: layers that reshape it would each keep a copy of a strided view for backward
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum of ``x`` over the group."""
    t = dist.get_world_size(group)
    x_front = x.movedim(dim, 0).contiguous()  # (t*k, ...)
    out = x_front.new_empty((x_front.shape[0] // t, *x_front.shape[1:]))  # (k, ...)
    dist.reduce_scatter_single(out, x_front, group=group)
    return out.movedim(0, dim).contiguous()


class _GatherSeq(torch.autograd.Function):
    """forward: all-gather along the sequence (B, T/t, D) -> (B, T, D); backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim(grad, 1, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """forward: reduce-scatter of partial sums along the sequence (B, T, D) -> (B, T/t, D);
    backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, 1, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """forward: this rank's chunk of the sequence (B, T, D) -> (B, T/t, D); backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        t, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(t, 1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, 1, ctx.group), None


class _GatherLast(torch.autograd.Function):
    """forward: all-gather along the last dim (..., k) -> (..., t*k) of a tensor whose consumers
    then compute the same on every rank; backward: this rank's chunk of the (replicated) gradient.

    Assembles a ``colwise_gather_output`` layer's output, and vocabulary-parallel logits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rank, ctx.local = dist.get_rank(group), x.shape[-1]
        return _all_gather_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(-1, ctx.rank * ctx.local, ctx.local), None


class _SplitLast(torch.autograd.Function):
    """forward: this rank's chunk of the last dim (..., t*k) -> (..., k) of a replicated tensor;
    backward: all-gather of the chunks' gradients (``rowwise_split_input``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        t, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(t, -1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, grad.dim() - 1, ctx.group), None


class _OnceInSum(torch.autograd.Function):
    """forward: ``x`` on TP rank 0, zeros elsewhere, so a complete value joins a partial sum once;
    backward: identity (every rank receives the summed output's gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return x if dist.get_rank(group) == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def gather_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherSeq.apply(x, tp.group)


def scatter_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ScatterSeq.apply(x, tp.group)


def reduce_scatter_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceScatterSeq.apply(x, tp.group)


def gather_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherLast.apply(x, tp.group)


def split_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _SplitLast.apply(x, tp.group)


def once_in_sum(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _OnceInSum.apply(x, tp.group)


def copy_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp.group)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp.group)


def gather_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp.group)


# Outside autograd: collectives of bookkeeping (init statistics, checkpoint gathers, gradient sync,
# metrics, the run directory). Each runs on every rank of ``group`` and returns the same result on
# all of them.


def broadcast_object(obj, src: int = 0):
    """``obj`` from global rank ``src`` on every rank (picklable objects; a no-op in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_over(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A copy of ``tensor`` summed over ``group`` (the tensor itself when there is no group)."""
    return _all_reduced(tensor, group, dist.ReduceOp.SUM)


def max_over(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A copy of ``tensor``'s elementwise maximum over ``group`` (the tensor itself without one)."""
    return _all_reduced(tensor, group, dist.ReduceOp.MAX)


def _all_reduced(tensor: torch.Tensor, group: dist.ProcessGroup | None, op) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def mean_over(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None:
        return tensor
    return sum_over(tensor, group) / dist.get_world_size(group)


def gather_parts(local: torch.Tensor, dim: int | None, tp: TPGroup) -> list[torch.Tensor]:
    """Every rank's shard of a tensor split along ``dim``, in rank order (None: replicated, one copy)."""
    local = local.detach().contiguous()
    if dim is None or tp.size == 1:
        return [local.clone()]
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(parts, local, group=tp.group)
    return parts


def average_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average ``tensors`` in place over ``group`` in one flat all-reduce."""
    _reduce_flat_(tensors, group, mean=True)


def sum_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum ``tensors`` in place over ``group`` in one flat all-reduce."""
    _reduce_flat_(tensors, group, mean=False)


def _reduce_flat_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, mean: bool) -> None:
    if group is None or dist.get_world_size(group) == 1 or not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    if mean:
        flat /= dist.get_world_size(group)
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)
