"""Data parallelism over the mesh's ``dp`` dimension: adapter gradients averaged in backward.

Like DDP, but only for the trainable (adapter) parameters, in one flat all-reduce per backward
pass: each trainable parameter gets a post-accumulate-grad hook, and the first one to fire in a
backward pass queues the all-reduce to run when that pass ends. Parameters added later (a second
adapter) are hooked at the next forward. ``no_sync`` skips the all-reduce, for all but the last
micro-batch of a gradient-accumulation step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from bdlora.parallel.comm import average_

_HOOKED = "_bdlora_dp_hooked"


class GradientAverager:
    """Averages trainable gradients over ``group`` once per backward pass."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup) -> None:
        self.group = group
        self.sync = True
        self._params: list[nn.Parameter] = []
        self._queued = False
        model.register_forward_pre_hook(self._hook_trainable)

    def _hook_trainable(self, model: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self._params = [p for p in model.parameters() if p.requires_grad]
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
        average_([p.grad for p in self._params], self.group)


@contextmanager
def skip_grad_sync(averager: GradientAverager | None) -> Iterator[None]:
    if averager is None:
        yield
        return
    previous, averager.sync = averager.sync, False
    try:
        yield
    finally:
        averager.sync = previous
