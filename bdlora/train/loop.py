"""The training loop: micro-batches, gradient sync over DP, clipping across TP shards, eval."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from bdlora.model import adapter_parameters, bdlora_layers
from bdlora.parallel import no_sync
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.comm import mean_over, sum_over
from bdlora.train.config import OptimConfig
from bdlora.train.context import RunContext


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = adapter_parameters(model)
    if not params:
        raise ValueError("the model has no trainable (adapter) parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps: int):
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` (or constant)."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule={cfg.schedule!r}; valid: cosine, constant")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
