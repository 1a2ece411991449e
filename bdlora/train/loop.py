"""The training loop: micro-batches, gradient sync over DP, clipping across TP shards, eval."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from bdlora.model import adapter_parameters, bdlora_layers
from bdlora.parallel import no_sync
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.comm import mean_over, sum_over
from bdlora.train.config import OptimConfig, plain
from bdlora.train.context import RunContext


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = adapter_parameters(model)
    if not params:
        raise ValueError("the model has no trainable (adapter) parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> WarmupCosineLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``steps`` (or constant)."""
    for key, value, valid in (
        ("schedule", cfg.schedule, ("cosine", "constant")),
        ("on_steps_change", cfg.on_steps_change, ("stretch", "keep")),
    ):
        if value not in valid:
            raise ValueError(f"optim.{key}={value!r}; valid: {', '.join(valid)}")
    return WarmupCosineLR(opt, cfg, steps)


class Course(NamedTuple):
    """The cosine's course: at step index ``start`` it stands at ``progress`` (0: lr, 1: min lr) and
    moves linearly to 1 at ``end``."""

    start: int
    progress: float
    end: int

    def at(self, step: int) -> float:
        moved = (step - self.start) / max(1, self.end - self.start)
        return min(1.0, self.progress + (1 - self.progress) * moved)


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup over ``warmup_steps``, then a cosine from ``lr`` down to ``min_lr_ratio * lr`` at
    step ``steps`` (``schedule=constant``: ``lr`` after the warmup). Step index ``i`` (``last_epoch``)
    sets the lr of step ``i + 1``.

    The cosine's :class:`Course` and the ``steps`` it was planned for are saved with the scheduler's
    state. A run resumed with other ``steps`` continues the saved course to the resume step, then
    ``on_steps_change=keep`` keeps it (min lr from its old end on) and ``stretch`` stretches the rest
    of it to end at the new ``steps``. Either way the first resumed step gets the lr the saved run
    would have given it: no jump. ``steps_change`` then says what happened, for the log.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> None:
        self.cfg, self.steps, self.steps_change = cfg, steps, None
        self.course = Course(cfg.warmup_steps, 0.0, steps)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        if self.cfg.schedule == "constant":
            return 1.0
        cosine = 0.5 * (1 + math.cos(math.pi * self.course.at(step)))
        return self.cfg.min_lr_ratio + (1 - self.cfg.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """LRScheduler's state with ``steps`` and ``course``; the rest of the shape is the config's."""
        return {k: v for k, v in super().state_dict().items() if k not in ("cfg", "steps_change")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A saved state (a LambdaLR's, from before courses were saved, resumes as it did then)."""
        steps = self.steps
        super().load_state_dict({k: v for k, v in state.items() if k != "lr_lambdas"})
        saved_steps = state.get("steps", steps)
        self.steps, self.course = steps, Course(*state.get("course", self.course))
        if saved_steps != steps:
            if self.cfg.on_steps_change == "stretch":
                start = max(self.last_epoch, self.course.start)
                self.course = Course(start, self.course.at(start), steps)
            self.steps_change = self._describe_change(saved_steps)

    def _describe_change(self, saved_steps: int) -> str:
        mode = plain(self.cfg.on_steps_change)
        head = f"steps {saved_steps} -> {self.steps} on resume (optim.on_steps_change={mode}): "
        first = self.last_epoch + 1
        if self.steps < first:
            return head + f"the checkpoint is at step {self.last_epoch}: no step is left to train"
        if self.cfg.schedule == "constant":
            what = "optim.schedule=constant does not depend on steps"
        elif mode == "stretch":
            what = f"the rest of the cosine is stretched to end at step {self.steps}"
        else:
            after = ", then min lr" if self.steps > self.course.end else ""
            what = f"the cosine keeps its end at step {self.course.end}{after}"
        lr_first, lr_last = (self.base_lrs[0] * self.factor(s - 1) for s in (first, self.steps))
        return head + f"{what}; lr {lr_first:.2e} at step {first} -> {lr_last:.2e} at step {self.steps}"


def sharded_params(model: nn.Module) -> set[int]:
    """ids of adapter parameters that are TP-sharded (each rank holds a different slice)."""
    out = set()
    for _, layer in bdlora_layers(model):
        if layer.tp_style is None:
            continue
        for store, sharded in zip((layer.lora_A, layer.lora_B), layer.tp_style.sharded_factors()):
            out.update(id(p) for p in store.values() if sharded)
    return out


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: RunContext, sharded: set[int]) -> float:
    """Global L2 norm of the adapter gradients: sharded slices summed over TP, replicated ones once."""
    grads = [(p.grad, id(p) in sharded) for p in adapter_parameters(model) if p.grad is not None]
    local = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sharded, replicated) sums
    for g, is_sharded in grads:
        local[0 if is_sharded else 1] += g.detach().double().pow(2).sum()
    norm = float((sum_over(local[0], ctx.tp.group) + local[1]).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g, _ in grads:
            g.mul_(scale)
    return norm


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    step_time: float
    comm: dict = field(default_factory=dict)


class Trainer:
    """Runs optimizer steps over a batch iterator; knows nothing of checkpoints or logging."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        ctx: RunContext,
        cfg: OptimConfig,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.ctx, self.cfg = ctx, cfg
        self._sharded = sharded_params(model)
        self._autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext()
        )

    def _dp_mean(self, value: torch.Tensor) -> float:
        return float(mean_over(value, self.ctx.dp_group))

    def train_step(self, batches: Iterator, count_comm: bool = False) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches on every DP rank.

        Gradients are averaged over DP (``parallelize``'s hook) in the last micro-batch's backward
        only; the norm is taken across TP shards, then clipped.
        """
        start = time.perf_counter()
        self.model.train()
        counter = self._counter(count_comm)
        with counter or nullcontext():
            micro, per_rank = self.micro_batches(batches)
            total = torch.zeros((), device=self.ctx.device)
            for i, (ids, labels) in enumerate(micro):
                last = i == len(micro) - 1
                with nullcontext() if last else no_sync(self.model):
                    with self._autocast:
                        loss = self.model(input_ids=ids, labels=labels, num_items_in_batch=per_rank).loss
                    loss.backward()
                total += loss.detach()
        norm = clip_grad_norm_(self.model, self.cfg.max_grad_norm, self.ctx, self._sharded)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._result(total, norm, lr, micro, start, counter)

    def micro_batches(self, batches: Iterator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
        """The step's micro-batches, and the divisor that makes their losses one token-weighted mean.

        The loss is the mean over every target token of the step, however micro-batches and DP ranks
        split them: each micro-batch's summed loss is divided by the step's token count (one DP
        all-reduce), times the DP degree that the gradient average divides by.
        """
        micro = [tuple(t.to(self.ctx.device) for t in next(batches)) for _ in range(self.cfg.grad_accum)]
        targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        step_targets = sum_over(torch.tensor(float(targets), device=self.ctx.device), self.ctx.dp_group)
        return micro, float(step_targets.clamp(min=1)) / self.ctx.dp_size

    def _counter(self, count_comm: bool) -> CommCounter | None:
        return CommCounter({"tp": self.ctx.tp.group, "dp": self.ctx.dp_group}) if count_comm else None

    def _result(self, total, norm: float, lr: float, micro: list, start: float, counter) -> StepResult:
        tokens = sum(ids.numel() for ids, _ in micro)
        return StepResult(
            self._dp_mean(total),
            norm,
            lr,
            tokens * self.ctx.dp_size,
            time.perf_counter() - start,
            counter.summary() if counter else {},
        )

    @torch.no_grad()
    def evaluate(self, batches: Callable[[], Iterator]) -> dict[str, float]:
        """Token-weighted mean loss over the whole eval split and its perplexity, at any DP degree.

        Each rank sums its token losses and counts its target tokens; one all-reduce over DP adds
        them up, so the result does not depend on how the split is divided among ranks.
        """
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # (sum of losses, tokens)
        for batch in batches():
            ids, labels = (t.to(self.ctx.device) for t in batch)
            with self._autocast:
                # transformers divides the summed token losses by num_items_in_batch: 1 keeps the sum
                loss_sum = self.model(input_ids=ids, labels=labels, num_items_in_batch=1).loss
            n = int((labels[:, 1:] != -100).sum())
            sums += torch.stack([loss_sum.detach().double(), sums.new_tensor(float(n))])
        sums = sum_over(sums, self.ctx.dp_group)
        loss = float(sums[0] / sums[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
