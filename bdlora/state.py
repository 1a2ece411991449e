"""The one record bdlora keeps on a model: ``model.bdlora_state``.

``apply_bdlora`` and ``bdlora.parallelize`` create it; every other call reads it. It holds the
adapters (their config and resolved plan, which ``save_adapter`` writes back out) and, once the
model is parallelized, the parallel layout (``bdlora.parallel.parallelize.ParallelState``: mesh,
TP group, sharding mode, where Megatron's f and g operators run, DP gradient averaging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from bdlora.config import BDLoraConfig
from bdlora.plan import Plan

STATE_ATTR = "bdlora_state"


@dataclass
class AdapterRecord:
    """What ``save_adapter`` needs to write an adapter back out."""

    config: BDLoraConfig
    plan: Plan


class ParallelRecord(Protocol):
    """The parallel layout as the core package sees it (``ParallelState`` implements it)."""

    sharding: str  # "bdlora" or "slora"
    tp_size: int

    def adapter_config(self, config: BDLoraConfig) -> BDLoraConfig: ...

    def check_plan(self, plan: Plan) -> None: ...

    def call_on_every_rank(self, op: str, fn: Callable[..., Any], *args: Any) -> Any: ...

    def is_writer(self) -> bool: ...

    def check_local_adapters(self, op: str) -> None: ...


@dataclass
class BDLoraState:
    """Everything bdlora knows about one model.

    ``adapters``: adapter name -> its config and plan, in the order they were added.
    ``parallel``: set by ``bdlora.parallelize``; ``None`` for a model that is not parallelized, on
    which no bdlora call issues a collective (so rank-0-only calls are safe).
    ``hooks``: the model's own forward hooks that take PEFT's ``adapter_names`` (``bdlora.mixed_batch``).
    """

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    parallel: ParallelRecord | None = None
    hooks: list[Any] = field(default_factory=list)

    @property
    def tp_size(self) -> int:
        return 1 if self.parallel is None else self.parallel.tp_size

    @property
    def sharded(self) -> bool:
        """True when the model is TP-sharded: calls that gather or load must run on every rank."""
        return self.tp_size > 1


class SavePretrainedError(RuntimeError):
    """``save_pretrained`` on a model holding bdlora layers, whose state dict transformers cannot load."""


def state_of(model: nn.Module, create: bool = False) -> BDLoraState:
    """The model's record; ``create=True`` attaches a new one (and guards ``save_pretrained``)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = BDLoraState()
        if create:
            setattr(model, STATE_ATTR, state)
            _guard_save_pretrained(model)
    return state


def _guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` raise instead of writing a checkpoint that loads wrongly.

    With bdlora's layers in place the state dict holds ``...q_proj.base_layer.weight`` and
    ``...lora_A.default`` (and, under TP, only this rank's shards); transformers would load such a
    directory with every adapted projection missing and randomly initialised, without an error.
    """
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = RefuseSavePretrained(type(model).__name__)


@dataclass(frozen=True)
class RefuseSavePretrained:
    """Stands in for ``save_pretrained`` on an adapted model (a class, so the model still pickles)."""

    model_class: str

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise SavePretrainedError(
            f"{self.model_class}.save_pretrained would write bdlora's wrapped layers "
            "('...base_layer.weight', '...lora_A.<adapter>' keys, TP shards), which transformers loads "
            "as missing weights. Save the adapter with bdlora.save_adapter(model, directory) (PEFT "
            "format: PeftModel.from_pretrained(base_model, directory) loads it); for a merged model call "
            "bdlora.merge_and_unload(model) first (one process, unsharded) or run "
            "`bdlora export RUN_DIR --format merged --out DIR` on a trained run."
        )


def release_(model: nn.Module) -> None:
    """Drop the record, the ``save_pretrained`` guard and the mixed-batch hooks and ``generate``
    (the model holds no bdlora layer any more)."""
    state = model.__dict__.pop(STATE_ATTR, None)
    for handle in state.hooks if state is not None else []:
        handle.remove()
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("generate", None)


def on_every_rank(model: nn.Module, op: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``; on a TP-sharded model as a call every rank must make (see ``ParallelState``).

    A model that is not TP-sharded runs ``fn`` directly: no store round trip, no collective.
    """
    state = state_of(model)
    if not state.sharded:
        return fn(*args)
    return state.parallel.call_on_every_rank(op, fn, *args)
