"""Data parallelism over the mesh's ``dp`` dimension: adapter gradients averaged in backward.

Like DDP, but only for the trainable (adapter) parameters, in one flat all-reduce per backward
pass: each trainable parameter gets a post-accumulate-grad hook, and the first one to fire in a
backward pass queues the all-reduce to run when that pass ends. Parameters added later (a second
adapter) are hooked at the next forward. ``no_sync`` skips the all-reduce, for all but the last
micro-batch of a gradient-accumulation step.

``sum_grads_in_backward`` (and ``EagerGradientSum``, which applies it to parameters as they appear)
is the per-gradient form, for gradients that another engine reduces as soon as each is ready: it
sums each gradient over a group before autograd accumulates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from bdlora.parallel.comm import average_, sum_

_HOOKED = "_bdlora_dp_hooked"
_SUM_HOOKED = "_bdlora_eager_sum_hooked"


def unmarked(params: list[nn.Parameter], marker: str) -> list[nn.Parameter]:
    """Those of ``params`` not yet carrying ``marker``, which they carry from now on: the parameters
    a forward pre-hook has not hooked yet (an adapter added after the hook was installed)."""
    new = [p for p in params if not getattr(p, marker, False)]
    for p in new:
        setattr(p, marker, True)
    return new


class GradientAverager:
    """Averages trainable gradients over ``group`` once per backward pass (``select``: which
    parameters, all trainable ones by default; ``mean=False`` sums instead)."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup,
        select: Callable[[nn.Module], list[nn.Parameter]] | None = None,
        mean: bool = True,
    ) -> None:
        self.group, self.mean = group, mean
        self.select = select or (lambda m: [p for p in m.parameters() if p.requires_grad])
        self.sync = True
        self._params: list[nn.Parameter] = []
        self._queued = False
        model.register_forward_pre_hook(self._hook_trainable)

    def _hook_trainable(self, model: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self._params = self.select(model)
        for p in unmarked(self._params, _HOOKED):
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, param: nn.Parameter) -> None:
        if self.sync and not self._queued and param.requires_grad:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        for p in self._params:  # every replica flattens the same tensors, in the same order
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        (average_ if self.mean else sum_)([p.grad for p in self._params], self.group)


@contextmanager
def skip_grad_sync(*averagers: GradientAverager | None) -> Iterator[None]:
    live = [a for a in averagers if a is not None]
    previous = [a.sync for a in live]
    for a in live:
        a.sync = False
    try:
        yield
    finally:
        for a, was in zip(live, previous):
            a.sync = was


def sum_grads_in_backward(params: Iterable[nn.Parameter], group: dist.ProcessGroup) -> list[RemovableHandle]:
    """Sum each of ``params``' gradients over ``group`` in backward, before autograd accumulates it.

    Forward: nothing. Backward: a tensor hook on each (leaf) parameter, which fires before its
    ``AccumulateGrad`` and so before any post-accumulate-grad hook, all-reduces (SUM) a copy of the
    incoming gradient over ``group`` and hands the sum on: ``.grad`` and every hook after it (DeepSpeed's
    ZeRO reduction over DP) see the summed gradient. Every rank of ``group`` must run the same
    backward graph (the hooks fire in its order).

    That is one all-reduce per parameter per backward pass (none skipped by ``no_sync``), where
    ``GradientAverager(mean=False)`` sums all of them in one flat all-reduce when the pass ends: too
    late for an engine that reduces each gradient, and may copy it out and take its norm, as soon as
    it is ready (DeepSpeed's ZeRO 2 in its post-accumulate-grad hooks, whenever a bucket fills). The
    bytes are the same. Returns the hooks' handles (``handle.remove()`` takes one off).
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's own buffer
        dist.all_reduce(summed, group=group)
        return summed

    return [p.register_hook(hook) for p in params]


class EagerGradientSum:
    """``sum_grads_in_backward`` over ``group`` for the parameters ``select(model)`` gives, hooked
    when the model runs a forward with grad enabled (so parameters added later, such as an adapter
    applied after ``parallelize``, are summed too); ``handles`` holds every hook's handle."""

    def __init__(
        self, model: nn.Module, group: dist.ProcessGroup, select: Callable[[nn.Module], list[nn.Parameter]]
    ) -> None:
        self.group, self.select = group, select
        self.handles: list[RemovableHandle] = []
        model.register_forward_pre_hook(self._hook_new)

    def _hook_new(self, model: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self.handles += sum_grads_in_backward(unmarked(self.select(model), _SUM_HOOKED), self.group)
