"""Vocabulary parallelism: the embedding, the LM head and the loss sharded along the vocabulary.

Each of ``t`` ranks holds ``ceil(V/t)`` rows of the embedding and of the LM head (the vocabulary is
padded to a multiple of ``t``; the padding rows are zero and never reach an output), so neither is
replicated, and no rank ever holds the full ``(B, T, V)`` logits while training.

===============  ===========================  =====================================  ==============
module           weight on rank i             forward                                collectives
===============  ===========================  =====================================  ==============
embedding        rows ``[i V', (i+1) V')``    lookup of the ids in range, 0 for the  1 all-reduce
                 ``(V', D)``, ``V' = V/t``    rest: a partial sum over ranks         (forward)
LM head          the same rows (tied: the     ``f(h) W_i^T``: ``(B, T, V')``         f (backward
                 same tensor)                                                        all-reduce)
cross-entropy    -                            max, sum-exp and target logit reduced  2 all-reduces
                                              over TP: ``(N,)`` and ``(N, 2)``       (forward)
===============  ===========================  =====================================  ==============

The head returns this rank's logits when the model is called with ``labels`` (the loss is then the
vocabulary-parallel cross-entropy) and otherwise all-gathers them into the full ``(B, T, V)``, so
``generate`` and evaluation see exactly the unsharded model's logits. With sequence parallelism the
embedding leaves its partial sum to ``sequence.SequenceParallel`` (a reduce-scatter instead of the
all-reduce) and the head's input arrives already all-gathered.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.parallel.comm import TPGroup, copy_to_tp, gather_last, max_over, reduce_from_tp, sum_over

if TYPE_CHECKING:
    from bdlora.parallel.sequence import SequenceParallel


@dataclass(frozen=True)
class VocabShard:
    """Rows ``[start, start + rows)`` of a vocabulary of ``vocab_size`` padded to ``rows * t``."""

    vocab_size: int
    tp: TPGroup

    @property
    def rows(self) -> int:
        return math.ceil(self.vocab_size / self.tp.size)

    @property
    def start(self) -> int:
        return self.tp.rank * self.rows

    @property
    def real_rows(self) -> int:
        """Rows this rank holds that are real tokens, not padding."""
        return max(0, min(self.rows, self.vocab_size - self.start))

    def take(self, weight) -> torch.Tensor:
        """This rank's zero-padded ``(rows, D)`` shard of a full ``(V, D)`` weight: a tensor, or a
        safetensors slice (only this rank's rows are read)."""
        real = weight[self.start : self.start + self.real_rows]  # (real_rows, D)
        return F.pad(real, (0, 0, 0, self.rows - self.real_rows))


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` sharded along the vocabulary; ``weight``: ``(ceil(V/t), D)``.

    ``defer_reduce``: return the partial sum and leave its reduction to the sequence-parallel entry
    (which reduce-scatters it), instead of all-reducing here.
    """

    def __init__(self, weight: nn.Parameter, shard: VocabShard, defer_reduce: bool = False) -> None:
        super().__init__()
        self.weight, self.shard, self.defer_reduce = weight, shard, defer_reduce
        self._partial: weakref.ref | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.real_rows)  # (B, T) ids other ranks hold
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D) partial
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if not self.defer_reduce:
            return reduce_from_tp(out, self.shard.tp)
        self._partial = weakref.ref(out)
        return out

    def is_partial(self, hidden: torch.Tensor) -> bool:
        """Whether ``hidden`` is this embedding's unreduced output (as opposed to inputs_embeds)."""
        return self._partial is not None and self._partial() is hidden

    def extra_repr(self) -> str:
        s = self.shard
        return f"rows={s.start}..{s.start + s.rows} of {s.vocab_size}, dim={self.weight.shape[1]}"


class VocabParallelLMHead(nn.Module):
    """The LM head sharded along the vocabulary; ``weight``: ``(ceil(V/t), D)``.

    ``local_logits`` (set while a call with labels runs): return this rank's ``(B, T, V/t)``
    logits; otherwise the full ``(B, T, V)``. ``sequence`` (a ``sequence.SequenceParallel``, set
    by ``apply_sequence_parallel_``): while it is active the input arrives all-gathered, whose
    backward already sums the ranks' partial gradients, so f is skipped.
    """

    def __init__(self, weight: nn.Parameter, shard: VocabShard) -> None:
        super().__init__()
        self.weight, self.shard = weight, shard
        self.local_logits = False
        self.sequence: SequenceParallel | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gathered = self.sequence is not None and self.sequence.active
        x = hidden if gathered else copy_to_tp(hidden, self.shard.tp)
        logits_local = F.linear(x, self.weight)  # (B, T, V/t)
        if self.local_logits:
            return logits_local
        return gather_last(logits_local, self.shard.tp)[..., : self.shard.vocab_size]  # (B, T, V)

    def extra_repr(self) -> str:
        s = self.shard
        return f"rows={s.start}..{s.start + s.rows} of {s.vocab_size}, dim={self.weight.shape[1]}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Token losses from vocabulary-sharded logits; 2 all-reduces forward, none backward.

    forward: ``log sum_v exp(z_v) - z_target`` with the max, the sum-exp and the target logit
    reduced over the TP group; saves this rank's softmax ``(N, V/t)``. backward:
    ``(softmax - onehot) * grad`` on this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits_local, target, shard: VocabShard, ignore_index: int):
        group = shard.tp.group
        if shard.real_rows < shard.rows:  # padding columns take no probability
            logits_local = logits_local.clone()
            logits_local[:, shard.real_rows :] = float("-inf")
        z_max = max_over(logits_local.max(dim=-1).values, group)  # (N,)
        exp = (logits_local - z_max.unsqueeze(-1)).exp_()  # (N, V/t)
        local_t = target - shard.start
        here = (local_t >= 0) & (local_t < shard.real_rows)  # (N,) targets this rank holds
        local_t = local_t.masked_fill(~here, 0)
        z_t = logits_local.gather(1, local_t.unsqueeze(1)).squeeze(1) - z_max  # (N,)
        parts = torch.stack([exp.sum(-1), z_t.masked_fill(~here, 0.0)], dim=1)  # (N, 2)
        sum_exp, z_target = sum_over(parts, group).unbind(1)
        valid = target != ignore_index
        loss = (sum_exp.log() - z_target).masked_fill(~valid, 0.0)  # (N,)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, here & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, hit, valid = ctx.saved_tensors
        scale = grad_loss.masked_fill(~valid, 0.0)  # (N,)
        grad = softmax * scale.unsqueeze(-1)  # (N, V/t)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= scale * hit
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor, target: torch.Tensor, shard: VocabShard, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross-entropy ``(N,)`` (0 where ``target == ignore_index``) from ``(N, V/t)`` logits."""
    if shard.tp.size == 1:
        return F.cross_entropy(
            logits_local[:, : shard.vocab_size], target, ignore_index=ignore_index, reduction="none"
        )
    return _VocabParallelCrossEntropy.apply(logits_local, target, shard, ignore_index)


class VocabParallelCausalLMLoss:
    """transformers' ``ForCausalLMLoss`` on vocabulary-sharded logits (``model.loss_function``).

    Same shift, ignore index and reductions: the mean over target tokens, or their sum divided by
    ``num_items_in_batch`` when that is given.
    """

    def __init__(self, shard: VocabShard) -> None:
        self.shard = shard

    def __call__(
        self,
        logits,
        labels,
        vocab_size: int | None = None,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels=None,
        **kwargs,
    ) -> torch.Tensor:
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        target = shift_labels.reshape(-1).to(logits.device)  # (N,)
        logits_local = logits.float().reshape(target.shape[0], -1)  # (N, V/t)
        losses = vocab_parallel_cross_entropy(logits_local, target, self.shard, ignore_index)
        if num_items_in_batch is None:
            return losses.sum() / (target != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch


def shard_vocab_(model: nn.Module, tp: TPGroup, defer_reduce: bool) -> VocabShard:
    """Replace ``model``'s embedding and LM head by their vocabulary shards (tied ones stay tied),
    and route calls with labels to the vocabulary-parallel loss. Returns the shard."""
    embedding, head = check_vocab_parallel(model)
    shard = VocabShard(embedding.weight.shape[0], tp)
    tied = head.weight is embedding.weight
    emb_weight = nn.Parameter(shard.take(embedding.weight.data), requires_grad=embedding.weight.requires_grad)
    head_weight = (
        emb_weight
        if tied
        else nn.Parameter(shard.take(head.weight.data), requires_grad=head.weight.requires_grad)
    )
    model.set_input_embeddings(VocabParallelEmbedding(emb_weight, shard, defer_reduce))
    new_head = VocabParallelLMHead(head_weight, shard)
    model.set_output_embeddings(new_head)
    model.loss_function = VocabParallelCausalLMLoss(shard)
    _route_labels(model, new_head)
    return shard


def check_vocab_parallel(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    """The model's embedding and LM head, if bdlora can shard them along the vocabulary."""
    name = type(model).__name__
    get_in, get_out = (
        getattr(model, "get_input_embeddings", None),
        getattr(model, "get_output_embeddings", None),
    )
    if get_in is None or get_out is None:
        raise BDLoraConfigError(
            f"vocab_parallel=True needs a transformers causal LM; {name} has no embeddings"
        )
    embedding, head = get_in(), get_out()
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
        raise BDLoraConfigError(
            f"vocab_parallel=True shards an nn.Embedding and an nn.Linear LM head; {name} has "
            f"{type(embedding).__name__} and {type(head).__name__}"
        )
    if type(embedding).forward is not nn.Embedding.forward:
        raise BDLoraConfigError(
            f"vocab_parallel=True replaces the embedding by a plain vocabulary-sharded lookup; {name}'s "
            f"{type(embedding).__name__} has a forward of its own (Gemma's scales by embed_scale), which "
            f"would be lost. Train it with vocab_parallel=False"
        )
    if head.bias is not None:
        raise BDLoraConfigError(
            f"vocab_parallel=True: {name}'s LM head has a bias, which bdlora does not shard"
        )
    if head.weight.shape != embedding.weight.shape:
        raise BDLoraConfigError(
            f"vocab_parallel=True: the LM head {tuple(head.weight.shape)} and the embedding "
            f"{tuple(embedding.weight.shape)} of {name} differ in vocabulary size"
        )
    return embedding, head


def _route_labels(model: nn.Module, head: VocabParallelLMHead) -> None:
    """While a forward with labels runs, the head returns this rank's logits (for the loss)."""
    params = list(inspect.signature(model.forward).parameters)

    def has_labels(args: tuple, kwargs: dict) -> bool:
        for key in ("labels", "shift_labels"):
            if kwargs.get(key) is not None:
                return True
            if key in params and params.index(key) < len(args) and args[params.index(key)] is not None:
                return True
        return False

    def before(module, args, kwargs):
        head.local_logits = has_labels(args, kwargs)

    def after(module, args, kwargs, output):
        head.local_logits = False

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)
