"""``parallelize``: the one place a built model becomes a parallel one.

In order, as torchtitan applies its plans: tensor parallelism (base weights, adapters and the
f/g operators, from the model's TP plan), then activation checkpointing, then data parallelism
(adapter gradients averaged over the mesh's ``dp`` dimension in backward). What was done is kept
in ``model.bdlora_state.parallel``, a ``ParallelState``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.experts import experts_modules
from bdlora.parallel.comm import TPGroup
from bdlora.parallel.data_parallel import EagerGradientSum, GradientAverager, skip_grad_sync
from bdlora.parallel.mesh import check_in, on_all_ranks
from bdlora.parallel.placement import BlockBoundary, BlockSpec, format_blocks
from bdlora.parallel.sequence import SequenceParallel, apply_sequence_parallel_, decoder_parts
from bdlora.parallel.sharding import check_adapter_plan, check_model_tp, shard_tp_
from bdlora.parallel.styles import (
    BDLoraTP,
    LinearLayout,
    ReplicatedTP,
    TPSharding,
    replicated_factors,
    sharding_class,
)
from bdlora.parallel.vocab import VocabShard, check_vocab_parallel, shard_vocab_
from bdlora.plan import Plan
from bdlora.roles import check_tp_plan
from bdlora.state import state_of


@dataclass
class ParallelState:
    """How a model was parallelized (``model.bdlora_state.parallel``).

    ``tp``: the TP group and this rank's place in it; ``sharding_class``: the adapter sharding
    (``BDLoraTP`` or ``SLoraTP``); ``blocks``: the boundaries where f and g run; ``layouts``: the
    sharded linear layers' layouts; ``dp_group``: the group adapter gradients are averaged over
    (None at DP 1). ``replicated`` at TP > 1 sums its whole factors' partial gradients over TP in
    ``tp_grads`` (one flat all-reduce after backward), or, with ``data_parallel=False``, in
    ``tp_grad_hooks`` (each gradient before it is accumulated, for an engine that reduces it then).
    """

    mesh: DeviceMesh | None
    tp: TPGroup
    sharding_class: type[TPSharding]
    blocks: list[BlockBoundary] = field(default_factory=list)
    layouts: dict[str, LinearLayout] = field(default_factory=dict)
    dp_group: dist.ProcessGroup | None = None
    dp_rank: int = 0
    dp_size: int = 1
    ep: int = 1
    model: nn.Module | None = field(default=None, repr=False)
    activation_checkpointing: bool = False
    grads: GradientAverager | None = None
    tp_grads: GradientAverager | None = None  # ``replicated``: its whole factors' partial gradients
    tp_grad_hooks: EagerGradientSum | None = None  # the same, per gradient (``data_parallel=False``)
    vocab: VocabShard | None = None
    sequence: SequenceParallel | None = None

    @property
    def vocab_parallel(self) -> bool:
        return self.vocab is not None

    @property
    def sequence_parallel(self) -> bool:
        return self.sequence is not None

    @property
    def sharding(self) -> str:
        return self.sharding_class.name

    @property
    def tp_size(self) -> int:
        return self.tp.size

    def adapter_config(self, config: BDLoraConfig) -> BDLoraConfig:
        return self.sharding_class.adapter_config(config)

    def check_plan(self, plan: Plan) -> None:
        experts = dict(experts_modules(self.model)) if self.model is not None else {}
        check_adapter_plan(plan, self.tp.size, self.sharding_class, self.layouts, experts, self.ep)

    def call_on_every_rank(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` as a call every rank makes: all ranks must enter it (``check_in``), and a
        failure on any rank is raised on all of them."""
        check_in(op)
        return on_all_ranks(fn, *args)

    def is_writer(self) -> bool:
        """Global rank 0 writes files that all ranks produced together."""
        return not dist.is_initialized() or dist.get_rank() == 0

    def check_local_adapters(self, op: str) -> None:
        """Refuse ``op`` (a mixed batch, a combination of adapters) where the sharding cannot run it
        on each rank's own shards (``TPSharding.local_adapters``)."""
        if self.tp.size > 1 and not self.sharding_class.local_adapters:
            raise BDLoraConfigError(
                f"{op} is not supported on a model sharded {self.sharding!r} at TP {self.tp.size}: its "
                f"column layers split the adapter's rank dim in A but not in B, so rows or adapters "
                f"cannot be mixed on each rank's shards without extra collectives. Use sharding='bdlora' "
                f"(or 'replicated'), or TP 1"
            )

    def describe(self) -> str:
        return format_blocks([b.spec for b in self.blocks], self.tp.size, self.sharding)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    sharding: str = "bdlora",
    tp_plan: dict[str, str] | None = None,
    ep: int = 1,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
    data_parallel: bool = True,
) -> nn.Module:
    """Make ``model`` parallel over ``mesh`` in place and return it. Every rank must call it.

    1. TP over ``mesh["tp"]``: each linear layer in the model config's ``base_model_tp_plan`` keeps
       its shard of the base weight and of every adapter already added (adapters added later are
       created sharded); f and g run where the plan places them (``bdlora plan --tp`` shows it).
       ``vocab_parallel``: the embedding and LM head keep ``ceil(V/t)`` rows each, and calls with
       labels compute a vocabulary-parallel loss (``bdlora.parallel.vocab``).
       ``sequence_parallel`` (needs ``vocab_parallel``): activations between blocks are split along
       the sequence, f and g become all-gather and reduce-scatter (``bdlora.parallel.sequence``).
       MoE experts (``bdlora.parallel.experts``): ``ep`` (dividing the TP degree) groups of ranks
       each hold ``E/ep`` whole experts, split ``tp/ep`` ways inside the group; the MoE block's g
       sums every rank's routed experts' partials with the shared expert's.
    2. Activation checkpointing of every decoder layer (transformers' non-reentrant checkpointing).
    3. DP over ``mesh["dp"]``: trainable gradients are averaged in backward; wrap all but the last
       micro-batch of an accumulation step in ``bdlora.no_sync(model)``.

    ``mesh``: a ``DeviceMesh`` with a ``tp`` and optionally a ``dp`` dimension
    (``bdlora.parallel.build_mesh``), or None for one process. ``sharding``: ``"bdlora"``, or
    ``"slora"`` for the dense S-LoRA baseline. ``tp_plan``: module pattern -> TP style, in the form
    of transformers' ``base_model_tp_plan``, for a model whose config has none (or to replace it);
    it becomes the config's plan. ``data_parallel=False`` leaves step 3 to another
    engine (DeepSpeed's ZeRO), which may reduce each gradient as soon as it is ready: ``replicated``
    then sums its whole factors' gradients over TP one by one before they are accumulated
    (``sum_grads_in_backward``; every backward, ``no_sync`` or not) instead of in one all-reduce
    after backward. Everything is validated before any weight moves.
    Issues no collective itself; replicas must start from equal weights (``apply_bdlora`` draws the
    same factors on every rank from the same seed).
    """
    cls = sharding_class(sharding)
    state = state_of(model)
    if state.parallel is not None:
        raise ValueError("the model is already parallelized; build a fresh model to change its layout")
    tp_size = _tp_size(mesh)
    if tp_plan is not None:
        model.config.base_model_tp_plan = check_tp_plan(tp_plan)
    if ep != 1 and (not isinstance(ep, int) or ep < 1 or tp_size % ep):
        raise ValueError(
            f"ep={ep!r}: expert parallelism splits the experts over the TP group's ranks, so ep must "
            f"divide the TP degree {tp_size}; valid: {[d for d in range(1, tp_size + 1) if tp_size % d == 0]}"
        )
    blocks, layouts = check_model_tp(model, tp_size, cls, ep) if tp_size > 1 else ([], {})
    _check_vocab_sequence(model, cls, vocab_parallel, sequence_parallel)
    if activation_checkpointing and not hasattr(model, "activation_checkpointing_enable"):
        raise ValueError(
            f"activation_checkpointing=True needs a transformers model; {type(model).__name__} has no "
            f"activation_checkpointing_enable"
        )
    tp, dp_group, dp_rank, dp_size = _mesh_groups(mesh)
    parallel = ParallelState(mesh, tp, cls, layouts=layouts, dp_group=dp_group, model=model)
    parallel.dp_rank, parallel.dp_size = dp_rank, dp_size
    parallel.ep = ep
    parallel.blocks = shard_tp_(model, tp, cls, blocks, layouts, ep) if blocks else []
    if vocab_parallel and tp.size > 1:
        parallel.vocab = shard_vocab_(model, tp, defer_reduce=sequence_parallel)
    if sequence_parallel and tp.size > 1:
        parallel.sequence = apply_sequence_parallel_(model, tp)
        for block in parallel.blocks:
            block.sequence = parallel.sequence
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        parallel.activation_checkpointing = True
    if cls is ReplicatedTP and tp.size > 1 and data_parallel:  # one sum per backward, skipped by no_sync
        parallel.tp_grads = GradientAverager(model, tp.group, select=replicated_factors, mean=False)
    elif cls is ReplicatedTP and tp.size > 1:  # another engine's DP reduction must see summed gradients
        parallel.tp_grad_hooks = EagerGradientSum(model, tp.group, select=replicated_factors)
    if dp_group is not None and data_parallel:
        parallel.grads = GradientAverager(model, dp_group)
    state_of(model, create=True).parallel = parallel
    return model


def _check_vocab_sequence(model: nn.Module, cls: type[TPSharding], vocab: bool, sequence: bool) -> None:
    if vocab:
        check_vocab_parallel(model)
    if not sequence:
        return
    if not vocab:
        raise ValueError(
            "sequence_parallel=True needs vocab_parallel=True: the sequence is gathered again only for "
            "a vocabulary-parallel LM head"
        )
    if cls is not BDLoraTP:
        raise ValueError(f"sequence_parallel=True supports sharding='bdlora', not {cls.name!r}")
    decoder_parts(model)


def _dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    names = tuple(mesh.mesh_dim_names or ())
    if "tp" not in names or any(n not in ("dp", "tp") for n in names):
        raise ValueError(
            f"mesh dims {list(names)}: bdlora needs a mesh with a 'tp' dimension and optionally 'dp' "
            f"(bdlora.parallel.build_mesh makes one)"
        )
    return names


def _tp_size(mesh: DeviceMesh | None) -> int:
    return 1 if mesh is None else mesh.size(_dim_names(mesh).index("tp"))


def _mesh_groups(mesh: DeviceMesh | None) -> tuple[TPGroup, dist.ProcessGroup | None, int, int]:
    if mesh is None:
        return TPGroup(None), None, 0, 1
    names = _dim_names(mesh)
    tp = TPGroup.from_group(mesh.get_group("tp"))
    if "dp" not in names or mesh.size(names.index("dp")) == 1:
        return tp, None, 0, 1
    return tp, mesh.get_group("dp"), mesh.get_local_rank("dp"), mesh.size(names.index("dp"))


def blocks_of(model: nn.Module) -> list[BlockSpec]:
    parallel = state_of(model).parallel
    return [] if parallel is None else [b.spec for b in parallel.blocks]


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Inside the block, backward leaves gradients unaveraged over DP (they keep accumulating).

    Like DDP's ``no_sync``: for all but the last micro-batch of a gradient-accumulation step.
    Issues no collective; a no-op on a model without data parallelism.
    """
    parallel = state_of(model).parallel
    with skip_grad_sync(*(() if parallel is None else (parallel.grads, parallel.tp_grads))):
        yield


def tp_of(model: nn.Module) -> TPGroup:
    """The TP group ``model`` is sharded over (a world of one when it is not)."""
    parallel = state_of(model).parallel
    return TPGroup(None) if parallel is None else parallel.tp


def sharding_of(model: nn.Module) -> type[TPSharding]:
    parallel = state_of(model).parallel
    return BDLoraTP if parallel is None else parallel.sharding_class
