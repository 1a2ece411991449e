"""PEFT's mixed-batch inference: one forward in which each row of the batch runs its own adapter.

``model(input_ids, adapter_names=["a", "b", "__base__"])`` and ``model.generate(input_ids,
adapter_names=[...])`` take one adapter name per row, as PEFT's ``PeftModel`` does; ``"__base__"``
runs a row on the base model alone. The names are checked against the batch and the loaded
adapters before any compute. Each adapted layer then adds, on each row, the delta of that row's
adapter (``BDLoraLinear.rows_forward``; MoE experts and routers per token of the row). Under TP
every rank applies each row's adapter to its own shards of that adapter, exactly as a
single-adapter forward does, so a mixed batch issues the collectives of a single-adapter forward
and no more (``sharding="slora"`` is refused: its column layers need the adapter's gathered
activation).

How the names reach the layers (PEFT injects them with forward pre-hooks too):

======================  ===========================================================================
where                   what
======================  ===========================================================================
model forward           a pre-hook takes ``adapter_names`` out of the call, checks it, and registers
                        on every adapted layer a pre-hook handing it the rows, for this forward only;
                        a forward hook (run even when forward raises) removes them
``model.generate``      takes ``adapter_names`` out of the call (transformers' ``generate`` refuses
                        model kwargs its forward does not name) and passes it to every forward of the
                        generation, each name repeated where generate expands the batch
                        (``num_beams``, ``num_return_sequences``, as PEFT repeats them for beams)
======================  ===========================================================================

Mixed batches are for inference: a model in training mode, or one with a merged adapter, is
refused with PEFT's own messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from bdlora.experts import BDLoraExperts, ExpertLinear
from bdlora.layers import BASE_ADAPTER, BDLoraLinear, RowAdapters
from bdlora.state import state_of


def check_adapter_names(model: nn.Module, adapter_names: Any, batch: int | None = None) -> tuple[str, ...]:
    """``adapter_names`` as a tuple, after PEFT's checks: a list of str, each a loaded adapter or
    ``"__base__"``, one per row of a ``batch`` of that many rows (None: not checked), on a model in
    eval mode with no merged adapter and a sharding that mixes rows locally."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    state = state_of(model)
    unexpected = sorted(set(adapter_names) - set(state.adapters) - {BASE_ADAPTER})
    if unexpected:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unexpected)}. Loaded adapters: "
            f"{', '.join(state.adapters) or 'none'} ({BASE_ADAPTER!r} runs a row on the base model alone)"
        )
    if batch is not None and len(adapter_names) != batch:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {batch} respectively."
        )
    if any(layer.merged for layer in model.modules() if isinstance(layer, BDLoraLinear)):
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call "
            "`bdlora.unmerge_adapter(model)` first."
        )
    if state.parallel is not None:
        state.parallel.check_local_adapters("a mixed batch (adapter_names)")
    return tuple(adapter_names)


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of a causal LM call's ``input_ids`` or ``inputs_embeds`` (positional or keyword)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _row_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that take ``adapter_names``: adapted linear layers (routers included) and MoE
    experts (which hand the rows to their expert tensors)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, BDLoraExperts) or (isinstance(m, BDLoraLinear) and not isinstance(m, ExpertLinear))
    ]


def _hand_rows(module: nn.Module, args: tuple, kwargs: dict, rows: RowAdapters) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": rows}


class MixedBatchHooks:
    """The model's forward pre-hook and forward hook that thread ``adapter_names`` to its layers."""

    def __init__(self) -> None:
        self.handles: list[Any] = []  # the layers' pre-hooks of the forward running now

    def pre(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("adapter_names") is None:
            return None
        kwargs = dict(kwargs)
        names = check_adapter_names(model, kwargs.pop("adapter_names"), batch_size(args, kwargs))
        if self.handles:
            raise RuntimeError("a mixed-batch forward of this model is already running")
        rows = RowAdapters(names)
        hand = partial(_hand_rows, rows=rows)
        self.handles = [m.register_forward_pre_hook(hand, with_kwargs=True) for m in _row_modules(model)]
        return args, kwargs

    def post(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()


def _expand_for_generate(
    model: nn.Module, args: tuple, kwargs: dict, names: tuple[str, ...]
) -> tuple[tuple, dict]:
    """Hand one step of ``generate`` its names: each repeated k times in a row where generate
    repeated each input k times (``repeat_interleave``) for beams or returned sequences."""
    batch = batch_size(args, kwargs)
    if batch is not None and batch != len(names) and names and batch % len(names) == 0:
        names = tuple(n for n in names for _ in range(batch // len(names)))
    return args, {**kwargs, "adapter_names": list(names)}


@dataclass(eq=False)
class MixedBatchGenerate:
    """``model.generate`` that also takes ``adapter_names`` (one per input row), as PEFT's does.

    transformers' ``generate`` validates its model kwargs against ``forward``'s signature, which
    cannot name ``adapter_names``: the instance's ``generate`` is the one place that can take it out
    before that check. A class, so the model still pickles and deep-copies.
    """

    model: nn.Module

    def __call__(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        inputs = [*args[:1], *(kwargs.get(k) for k in ("inputs", "input_ids", "inputs_embeds"))]
        batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor)), None)
        names = check_adapter_names(self.model, adapter_names, batch)
        expand = partial(_expand_for_generate, names=names)
        handle = self.model.register_forward_pre_hook(expand, with_kwargs=True, prepend=True)
        try:
            return generate(self.model, *args, **kwargs)
        finally:
            handle.remove()


def install_mixed_batch(model: nn.Module) -> None:
    """Let ``model(...)`` and ``model.generate(...)`` take ``adapter_names`` (once per model)."""
    state = state_of(model, create=True)
    if state.hooks:
        return
    hooks = MixedBatchHooks()
    state.hooks = [
        model.register_forward_pre_hook(hooks.pre, with_kwargs=True),
        model.register_forward_hook(hooks.post, with_kwargs=True, always_call=True),
    ]
    if callable(getattr(type(model), "generate", None)):
        model.generate = MixedBatchGenerate(model)
