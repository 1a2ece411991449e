"""Data parallelism over the mesh's ``dp`` dimension: adapter gradients averaged in backward.

Like DDP, but only for the trainable (adapter) parameters, in one flat all-reduce per backward
pass: each trainable parameter gets a post-accumulate-grad hook, and the first one to fire in a
backward pass queues the all-reduce to run when that pass ends. Parameters added later (a second
adapter) are hooked at the next forward. ``no_sync`` skips the all-reduce, for all but the last
micro-batch of a gradient-accumulation step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from bdlora.parallel.comm import average_, sum_

_HOOKED = "_bdlora_dp_hooked"


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
        for p in self._params:
            if not getattr(p, _HOOKED, False):
                p.register_post_accumulate_grad_hook(self._on_grad)
                setattr(p, _HOOKED, True)

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
