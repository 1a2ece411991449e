"""Per-rank memory of one BD-LoRA training step under tensor parallelism, from the model config alone.

``memory_plan`` counts, for one TP rank, the bytes of the frozen base weights, the adapter, its
gradients and AdamW state, and the activations one training forward leaves for backward, for a
model built on the meta device and a resolved adapter plan. ``bdlora plan --memory`` prints it for
three layouts side by side. docs/memory.md derives every term and says how it was measured.

The adapter sharding (``parallelize(..., sharding=...)``) decides the adapter's share of a rank:

==========  ===============================================  ======================================
sharding    per rank, a module of rank r                     ``h = A x`` saved per module
==========  ===============================================  ======================================
bdlora      every factor split: ``params / t``               ``(B*T, r/t)``
slora       dense LoRA; column: A on r, B on d_out;          ``(B*T, r)``, gathered or summed
            row: A on d_in, B ``(d_out, r)`` whole
replicated  dense LoRA; column: A ``(r, d_in)`` whole,       ``(B*T, r)``: A whole, or a row
            B on d_out; row: A on d_in, B ``(d_out, r)``     layer's partial sum
            whole
==========  ===============================================  ======================================

``replicated`` also sums its whole factors' gradients over TP once per step
(``tp_grad_sum_params``); slora's whole row B gets its complete gradient on every rank.

The activation terms follow what autograd saves in transformers' Llama-family decoder (Llama,
Mistral, Qwen2) with a frozen base and BD-LoRA adapters on the seven projections:

=====================  ==================================  =======================================
where                  saved per layer (B, T, per rank)    dtype
=====================  ==================================  =======================================
each RMSNorm           input ``(B, T_o, D)``, rsqrt         fp32 (the norm upcasts)
                       ``(B, T_o, 1)``
adapters               the A matmul's input, ``h = A x``   model dtype (inputs shared by q/k/v and
                       ``(B*T, r/t)`` per module           by gate/up; o's is the attention output)
attention (fused)      q, k, v, output, log-sum-exp        model dtype, log-sum-exp fp32
attention (eager)      q, repeated k and v, probabilities  probabilities fp32 and model dtype
                       ``(B, H/t, T, T)``
MLP                    gate and up outputs, SiLU output    model dtype
=====================  ==================================  =======================================

``T_o`` is ``T / t`` with sequence parallelism and ``T`` otherwise; everything inside the blocks
keeps the full ``T``. A frozen linear layer saves only its weight, never its input.

Mixture-of-experts layers (transformers 5.x: the routed experts of layer ``n`` are one module
``layers.n.mlp.experts`` holding fused 3-D ``gate_up_proj`` and ``down_proj``) are split by an
expert-parallel degree ``ep`` dividing ``t``: each rank holds ``E/ep`` whole experts, each split
``t/ep`` ways (gate_up by output rows, down by input columns), so ``E 3 H I / t`` weights per
module and rank; a gate_up bias splits like its rows, a down bias stays whole per local expert.
Routers and shared-expert gates are replicated; shared experts are sharded like a dense MLP.
An MoE layer's MLP terms, with ``N = B*T`` tokens, top-``k`` routing and ``n_e = k N / ep`` tokens
routed to this rank's experts (an average: it assumes uniform routing), ``s = t/ep``:

=====================  ==================================  =======================================
where                  saved per MoE layer (per rank)      dtype
=====================  ==================================  =======================================
router                 probabilities ``(N, E)``, top-k      fp32, int64
                       indices ``(N, k)``
experts                gathered routed inputs ``(n_e, H)``  model dtype (the inputs are saved by
                       gate_up output ``(n_e, 2I/s)``,      gate_up's adapter A); gpt-oss's clamped
                       activation                           SwiGLU saves 4 activation tensors
                       output ``(n_e, I/s)``, down's
                       adapter input ``(n_e, I/s)``,
                       ``h = A x`` ``(n_e, r/s)`` per
                       adapted tensor
routing                expert output ``(n_e, H)`` and       model dtype; indices int64
                       weights ``(n_e, 1)`` (their
                       product's gradients); with expert
                       adapters (bdlora's expert loop)
                       the weighted output ``(n_e, H)``
                       that ``index_add_`` saves, and
                       token and slot indices ``(n_e,)``
                       (without: transformers' grouped
                       forward, three indices ``(n_e,)``)
shared expert          as a dense MLP of its own ``I``;     model dtype
                       a sigmoid gate saves ``(N, 1)`` and
                       the shared output ``(N, H)``
=====================  ==================================  =======================================

Measured at TP 1 (``tests/test_memory_moe.py``, every token reaches its top-k experts, so the
count is exact there), Mixtral, Qwen2-MoE and gpt-oss with adapters on the experts plan their
saved activations within 2.5%; Qwen3-MoE's q and k norms are missing, as for Qwen3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.experts import expert_shape, experts_modules
from bdlora.parallel.sequence import decoder_parts
from bdlora.parallel.styles import SHARDINGS, LinearLayout, ReplicatedTP, TPSharding, sharding_class
from bdlora.parallel.vocab import check_vocab_parallel
from bdlora.plan import ModulePlan, Plan, check_plan_tp
from bdlora.roles import STYLE_ROLES, Role, plan_regexes, planned_role

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention kernels that save q, k, v, the output and the log-sum-exp rather than a (T, T) matrix.
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
# Adapted MoE tensors by their key in a layer: routed experts' fused tensors, shared experts' linears.
EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")
SHARED_KEYS = tuple(f"shared.{leaf}" for leaf in MLP_LEAVES)
_LAYER_MODULE = re.compile(
    r"(?:.*\.)?layers\.(\d+)\.(?:self_attn\.(?P<attn>\w+)|mlp\.(?P<mlp>(?:experts\.|shared_experts?\.)?\w+))"
)
_LAYER_INDEX = re.compile(r"(?:.*\.)?layers\.(\d+)\.")
# Shared experts (Qwen2-MoE's shared_expert, DeepSeek's shared_experts) are TP-sharded like a dense MLP.
_SHARED_EXPERT = re.compile(r"(?:.*\.)?layers\.\d+\.mlp\.shared_experts?\.(gate_proj|up_proj|down_proj)")
_SHARED_STYLES = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
FP32 = torch.float32
SHARDING_NAMES = tuple(SHARDINGS)  # bdlora, slora, replicated


@dataclass(frozen=True)
class Layout:
    """How the vocabulary and the sequence are split over the TP ranks (see ``bdlora.parallelize``)."""

    vocab_parallel: bool = False
    sequence_parallel: bool = False


LAYOUTS = {
    "replicated": Layout(),
    "+ vocab parallel": Layout(vocab_parallel=True),
    "+ vocab + sequence parallel": Layout(vocab_parallel=True, sequence_parallel=True),
}


@dataclass(frozen=True)
class Term:
    """``count`` tensors of ``shape`` and ``dtype`` on one rank.

    ``part``: ``layers`` (decoder layers and the final norm) or ``logits`` (LM head and loss).
    ``kind``: ``saved`` (autograd holds it from the forward until backward), ``transient`` (live
    while the loss is computed, freed before backward starts), ``backward`` (the loss's gradients,
    live while its backward runs; the table counts the larger of these and the transients),
    ``recompute`` (one decoder layer's activations, rebuilt during backward under activation
    checkpointing: a peak, not a sum).
    """

    part: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = "saved"
    count: int = 1

    @property
    def bytes(self) -> int:
        return self.count * math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one TP rank; ``activations`` itemises the activation rows."""

    tp: int
    seq_len: int
    micro_batch: int
    dtype: torch.dtype
    layout: Layout
    activation_checkpointing: bool
    attention: str
    base_weights: int
    adapter: int
    grads: int
    optimizer: int
    activations: tuple[Term, ...]
    ep: int = 1  # expert-parallel degree (MoE layers)
    moe_layers: int = 0  # decoder layers with routed experts
    sharding: str = "bdlora"  # the adapter sharding (``SHARDING_NAMES``)

    def activation_bytes(self, part: str | None = None, kind: str | None = None) -> int:
        return sum(
            t.bytes
            for t in self.activations
            if (part is None or t.part == part) and (kind is None or t.kind == kind)
        )

    @property
    def saved_activations(self) -> int:
        """What autograd holds for backward when the forward ends (``saved_tensors_hooks`` sees it)."""
        return self.activation_bytes(kind="saved")

    def activation_peak(self, part: str) -> int:
        """Saved and recomputed bytes, plus the larger of the loss's forward temporaries and its
        backward's gradients (they are never live together)."""
        kind = lambda k: self.activation_bytes(part, k)  # noqa: E731
        return kind("saved") + kind("recompute") + max(kind("transient"), kind("backward"))

    def rows(self) -> list[tuple[str, int]]:
        """The table rows, total last: activations count every kind (an upper bound on the peak)."""
        items = [
            ("base weights", self.base_weights),
            ("adapter", self.adapter),
            ("AdamW state", self.optimizer),
            ("grads", self.grads),
            ("activations: layers", self.activation_peak("layers")),
            ("activations: logits+loss", self.activation_peak("logits")),
        ]
        return [*items, ("total", sum(b for _, b in items))]

    @property
    def total(self) -> int:
        return self.rows()[-1][1]


@dataclass(frozen=True)
class _Dims:
    """Per-rank sizes of one micro-batch: ``seq`` inside the blocks, ``seq_outer`` between them."""

    tp: int
    batch: int
    seq: int
    seq_outer: int
    hidden: int
    heads_local: int
    kv_heads_local: int
    head_dim: int
    inter_local: int  # a dense MLP's intermediate size / t (0 when every layer is MoE)
    vocab: int
    layers: int
    ep: int = 1
    moe: tuple[_Moe | None, ...] = ()  # per layer: its routed experts, None for a dense MLP
    adapter_split: int = 0  # the ways ``h = A x`` is split over ranks: t (BD-LoRA), 1 (dense); 0: t


@dataclass(frozen=True)
class _Moe:
    """One MoE layer's sizes (unsharded): ``experts`` routed experts of intermediate size ``inter``,
    ``top_k`` of them per token, and a shared expert of ``shared_inter`` (0: none), gated or not.
    ``activation_saves``: ``act(gate) * up`` saves ``act(gate)`` (1); gpt-oss's clamped SwiGLU
    ``(clamp(up) + 1) * g sigmoid(alpha g)`` with ``g = clamp(gate)`` saves g, the sigmoid, ``up + 1``
    and the gated product (4)."""

    experts: int
    top_k: int
    inter: int
    shared_inter: int = 0
    shared_gate: bool = False
    activation_saves: int = 1  # (n_e, I/s) tensors the activation saves beyond gate_up's output


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise BDLoraConfigError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")


def memory_plan(
    model: nn.Module,
    plan: Plan,
    tp: int,
    seq_len: int,
    micro_batch: int,
    dtype: str | torch.dtype,
    activation_checkpointing: bool = False,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
    ep: int = 1,
    sharding: str = "bdlora",
) -> MemoryPlan:
    """Bytes per TP rank of training ``plan``'s adapter on ``model`` at TP degree ``tp``.

    ``model``: the unsharded, unadapted transformers model (the meta device is enough); its config
    gives the sizes and its parameters the base weights. ``dtype``: the parameters' and the
    compute's dtype (the adapter takes the base weights' dtype, as ``apply_bdlora`` does; no
    autocast). One micro-batch of ``micro_batch`` x ``seq_len`` tokens, trained as ``bdlora-train``
    does: ``model(input_ids=..., labels=...)`` without an attention mask, then AdamW.
    Vocabulary and sequence parallelism change nothing at ``tp=1``.

    ``ep``: the expert-parallel degree of MoE layers, dividing ``tp`` and every layer's number of
    experts: each rank holds ``E/ep`` experts, each split ``tp/ep`` ways. Expert adapters (plan
    modules with ``experts`` > 0) hold ``params / tp`` per rank like any other. Tokens routed to a
    rank's experts are counted as ``top_k * B * T / ep``: uniform routing, an average, not a bound.

    ``sharding``: ``bdlora``, or ``slora`` / ``replicated`` for dense LoRA at the plan's ranks (its
    nblocks ignored, as ``parallelize`` trains them at nblocks 1), placed as the module docstring
    says; the dense shardings take no expert adapters and no sequence parallelism.
    """
    dtype = resolve_dtype(dtype)
    cls = _sharding(sharding)
    plan = sharded_plan(plan, sharding)
    _check_options(tp, seq_len, micro_batch, vocab_parallel, sequence_parallel)
    if sequence_parallel and tp > 1 and not cls.whole_blocks:
        raise BDLoraConfigError(
            f"sequence_parallel=True supports sharding='bdlora', not {sharding!r} (as bdlora.parallelize)"
        )
    experts = dict(experts_modules(model))
    _check_ep(ep, tp, experts)
    check_plan_tp(plan, tp, whole_blocks=cls.whole_blocks)
    layout = Layout(vocab_parallel and tp > 1, sequence_parallel and tp > 1)
    dims = _dims(model, tp, ep, micro_batch, seq_len, layout.sequence_parallel, experts)
    dims = replace(dims, adapter_split=tp if cls.whole_blocks else 1)
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    adapter_params = adapter_params_per_rank(plan, tp, sharding)
    adapter_tensors = 2 * len(plan.modules)  # A and B of each module
    activations = _decoder_terms(dims, plan, dtype, attention, activation_checkpointing)
    activations += _logits_terms(dims, dtype, layout.vocab_parallel)
    return MemoryPlan(
        tp=tp,
        seq_len=seq_len,
        micro_batch=micro_batch,
        dtype=dtype,
        layout=layout,
        activation_checkpointing=activation_checkpointing,
        attention=attention,
        base_weights=base_weight_bytes(model, tp, dtype, layout.vocab_parallel, ep),
        adapter=adapter_params * dtype.itemsize,
        grads=adapter_params * dtype.itemsize,
        # exp_avg and exp_avg_sq in the parameter's dtype, and one fp32 ``step`` per parameter tensor
        optimizer=2 * adapter_params * dtype.itemsize + adapter_tensors * FP32.itemsize,
        activations=tuple(_merged(activations)),
        ep=ep,
        moe_layers=sum(m is not None for m in dims.moe),
        sharding=sharding,
    )


# -- the adapter under each sharding --------------------------------------------------------------
def _sharding(name: str) -> type[TPSharding]:
    try:
        return sharding_class(name)
    except ValueError as err:
        raise BDLoraConfigError(str(err)) from None


def sharded_plan(plan: Plan, sharding: str = "bdlora") -> Plan:
    """``plan`` as ``parallelize`` trains it under ``sharding``: the dense shardings at nblocks 1
    (expert adapters refused: only BD-LoRA's sharding places them)."""
    cls = _sharding(sharding)
    if cls.whole_blocks:
        return plan
    for m in plan.modules:
        if m.experts:
            raise BDLoraConfigError(
                f"expert tensor {m.name!r} is adapted, but sharding={sharding!r} places adapters on "
                f"linear layers only; use sharding='bdlora', or drop target_parameters"
            )
    dense = [replace(m, global_nblocks=1) for m in plan.modules]
    return replace(plan, global_nblocks=1, modules=dense)


def _factor_params(m: ModulePlan, tp: int, sharding: str) -> tuple[int, int, bool, bool]:
    """This rank's elements of ``m``'s dense A and B, and whether each is whole on every rank."""
    a, b = m.copies * m.rank * m.d_in, m.copies * m.d_out * m.rank
    dim_a, dim_b = _sharding(sharding).factor_dims(LinearLayout(m.role))
    whole_a, whole_b = dim_a is None or tp == 1, dim_b is None or tp == 1
    return (a if whole_a else a // tp), (b if whole_b else b // tp), whole_a, whole_b


def module_params_per_rank(m: ModulePlan, tp: int, sharding: str = "bdlora") -> int:
    """This rank's adapter elements of ``m`` under ``sharding``: BD-LoRA splits every factor
    (``params / t``); slora and replicated hold dense LoRA, each factor split or whole as the
    sharding's ``factor_dims`` places it (a whole factor costs every rank all of its elements)."""
    if _sharding(sharding).whole_blocks:
        return m.params_per_rank(tp)
    a, b, _, _ = _factor_params(m, tp, sharding)
    return a + b


def adapter_params_per_rank(plan: Plan, tp: int, sharding: str = "bdlora") -> int:
    """This rank's adapter elements (the largest rank's: every sharding splits evenly). Each element
    also runs on every token this rank computes, so ``6 x`` this is the adapter's training FLOPs per
    token and rank (``adapter_flops_per_token``)."""
    plan = sharded_plan(plan, sharding)
    return sum(module_params_per_rank(m, tp, sharding) for m in plan.modules)


def tp_grad_sum_params(plan: Plan, tp: int, sharding: str = "bdlora") -> int:
    """Elements whose gradients are summed over TP once per step: ``replicated``'s whole factors
    (column A, row B), whose per-rank gradients are partial sums (one flat all-reduce per backward);
    nothing under bdlora or slora (slora's whole row B gets its complete gradient on every rank)."""
    if tp == 1 or _sharding(sharding) is not ReplicatedTP:
        return 0
    total = 0
    for m in sharded_plan(plan, sharding).modules:
        a, b, whole_a, whole_b = _factor_params(m, tp, sharding)
        total += (a if whole_a else 0) + (b if whole_b else 0)
    return total


def adapter_flops_per_token(plan: Plan, tp: int, sharding: str = "bdlora") -> tuple[int, int]:
    """Per token of a training step, on one rank: (the adapted modules' frozen linears, the adapter)
    FLOPs. A frozen linear computes its output and input gradient (4 FLOPs per weight element it
    holds, ``d_in d_out / t``); an adapter factor also its weight gradient (6 per element it holds).
    Dense modules only: expert tensors see only their routed tokens."""
    plan = sharded_plan(plan, sharding)
    if any(m.experts for m in plan.modules):
        raise BDLoraConfigError(
            "adapter_flops_per_token counts dense modules; the plan adapts expert tensors"
        )
    base = sum(m.d_in * m.d_out for m in plan.modules) // tp
    return 4 * base, 6 * adapter_params_per_rank(plan, tp, sharding)


def memory_plans(
    model: nn.Module, plan: Plan, tp: int, sharding: str = "bdlora", **options
) -> dict[str, MemoryPlan]:
    """``memory_plan`` for each layout of ``LAYOUTS`` that ``parallelize`` accepts for ``model`` and
    ``sharding``, by its column title (``memory_notes`` says why a layout is left out)."""
    return {
        title: memory_plan(
            model,
            plan,
            tp,
            vocab_parallel=layout.vocab_parallel,
            sequence_parallel=layout.sequence_parallel,
            sharding=sharding,
            **options,
        )
        for title, layout in LAYOUTS.items()
        if _refusal(model, layout, sharding) is None
    }


def _refusal(model: nn.Module, layout: Layout, sharding: str = "bdlora") -> str | None:
    """Why ``parallelize`` refuses ``layout`` for ``model`` and ``sharding`` (None: it accepts it)."""
    if layout.sequence_parallel and not _sharding(sharding).whole_blocks:
        return f"sequence parallelism supports sharding='bdlora', not {sharding!r}"
    try:
        if layout.vocab_parallel:
            check_vocab_parallel(model)
        if layout.sequence_parallel:
            decoder_parts(model)
    except BDLoraConfigError as err:
        return str(err)
    return None


def _gathers(style: str) -> bool:
    if style not in STYLE_ROLES:
        return False
    layout = LinearLayout.from_style(style)
    return layout.whole_io and layout.role is Role.COLUMN


def memory_notes(model: nn.Module, tp: int, sharding: str = "bdlora") -> list[str]:
    """What the memory table leaves out for ``model``: refused layouts, gathered outputs."""
    notes = [
        f"{title}: left out, {why}"
        for title, layout in LAYOUTS.items()
        if (why := _refusal(model, layout, sharding))
    ]
    tp_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    gathered = sorted(k for k, style in tp_plan.items() if tp > 1 and _gathers(style))
    if gathered:
        notes.append(
            f"the TP plan gathers the output of {', '.join(gathered)}: every rank then computes what "
            f"follows whole, so those blocks' activations are up to {tp}x the table's"
        )
    if tp > 1 and not _attention_sharded(model):
        notes.append(
            "the TP plan shards no q_proj: every rank holds and computes the attention whole, as the "
            "table counts it"
        )
    return notes


def _check_options(tp: int, seq_len: int, micro_batch: int, vocab: bool, sequence: bool) -> None:
    for name, value in (("tp", tp), ("seq_len", seq_len), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or value < 1:
            raise BDLoraConfigError(f"{name}={value!r}: must be a positive integer")
    if sequence and not vocab:
        raise BDLoraConfigError(
            "sequence_parallel=True needs vocab_parallel=True (as bdlora.parallelize does)"
        )
    if sequence and seq_len % tp:
        raise BDLoraConfigError(
            f"sequence parallelism splits the sequence over the {tp} TP ranks: seq_len={seq_len} is not "
            f"divisible by tp={tp}; use a multiple of {tp} (e.g. {tp * math.ceil(seq_len / tp)})"
        )


def _check_ep(ep: int, tp: int, experts: dict[str, nn.Module]) -> None:
    """``ep`` divides ``tp`` and every experts module's expert count."""
    if not isinstance(ep, int) or ep < 1:
        raise BDLoraConfigError(f"ep={ep!r}: must be a positive integer")
    if ep == 1:
        return
    if not experts:
        raise BDLoraConfigError(
            f"ep={ep}: the model has no MoE experts for expert parallelism to split; use ep=1"
        )
    counts = sorted({m.gate_up_proj.shape[0] for m in experts.values()})
    if tp % ep or any(e % ep for e in counts):
        common = math.gcd(tp, *counts)
        valid = [d for d in range(1, common + 1) if common % d == 0]
        raise BDLoraConfigError(
            f"ep={ep} must divide tp={tp} and the number of experts "
            f"({', '.join(map(str, counts))}): valid ep at tp={tp}: {valid}"
        )


def _moe_of(block: nn.Module, experts: nn.Module, config) -> _Moe:
    """The sizes of the MoE block ``block`` (``mlp``) around ``experts``."""
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(router, "top_k", None)
    if not top_k:
        raise BDLoraConfigError(
            f"{type(block).__name__}: cannot tell how many experts a token visits (no num_experts_per_tok)"
        )
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    shared_gate = isinstance(getattr(block, "shared_expert_gate", None), nn.Linear)
    shared_inter = (
        shared.gate_proj.out_features if isinstance(getattr(shared, "gate_proj", None), nn.Linear) else 0
    )
    clamped_swiglu = hasattr(experts, "alpha") and hasattr(experts, "limit")  # gpt-oss's _apply_gate
    return _Moe(
        experts.gate_up_proj.shape[0],
        top_k,
        expert_shape(experts, "down_proj")[2],
        shared_inter,
        shared_gate,
        activation_saves=4 if clamped_swiglu else 1,
    )


def _check_expert_split(inter: int, tp: int, ep: int, where: str) -> None:
    if inter % (tp // ep):
        valid = [e for e in range(1, tp + 1) if tp % e == 0 and inter % (tp // e) == 0]
        raise BDLoraConfigError(
            f"{where}: the expert intermediate size {inter} is not divisible by tp/ep = {tp}/{ep} = "
            f"{tp // ep}, the ways each expert is split; ep whose tp/ep divides {inter}: {valid}"
        )


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise BDLoraConfigError(f"{what}={size} is not divisible by the TP degree {tp}")
    return size // tp


def _dims(
    model: nn.Module,
    tp: int,
    ep: int,
    batch: int,
    seq: int,
    sequence_parallel: bool,
    experts: dict[str, nn.Module],
) -> _Dims:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attn_tp = tp if _attention_sharded(model) else 1  # a TP plan without attention keeps it whole
    moe: list[_Moe | None] = [None] * config.num_hidden_layers
    for name, module in experts.items():
        index = _LAYER_INDEX.match(name)
        if index is None:
            raise BDLoraConfigError(f"MoE experts {name!r} sit outside the decoder layers (layers.N.)")
        block = model.get_submodule(name.rpartition(".")[0])
        layer = moe[int(index.group(1))] = _moe_of(block, module, config)
        _check_expert_split(layer.inter, tp, ep, name)
        _split(layer.shared_inter, tp, f"{name.rpartition('.')[0]}: the shared expert's intermediate size")
    dense = any(m is None for m in moe)
    return _Dims(
        tp=tp,
        batch=batch,
        seq=seq,
        seq_outer=seq // tp if sequence_parallel else seq,
        hidden=config.hidden_size,
        heads_local=_split(heads, attn_tp, "num_attention_heads"),
        kv_heads_local=_split(kv_heads, attn_tp, "num_key_value_heads"),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        inter_local=_split(config.intermediate_size, tp, "intermediate_size") if dense else 0,
        vocab=config.vocab_size,
        layers=config.num_hidden_layers,
        ep=ep,
        moe=tuple(moe),
    )


def _attention_sharded(model: nn.Module) -> bool:
    """Whether the TP plan shards the attention (its q_proj), as it does for every Llama-family model;
    gpt-oss's own plan in transformers 5 lists only the embedding."""
    regexes = plan_regexes(getattr(model.config, "base_model_tp_plan", None) or {})
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj") and isinstance(module, nn.Linear):
            try:
                return planned_role(name, regexes) is not None
            except ValueError:  # a style bdlora cannot shard: parallelize says so
                return True
    return True  # no q_proj: nothing to say


# -- weights -----------------------------------------------------------------------------------------
def base_weight_bytes(
    model: nn.Module, tp: int, dtype: torch.dtype, vocab_parallel: bool = False, ep: int = 1
) -> int:
    """This rank's frozen parameters: every linear layer of ``base_model_tp_plan`` holds 1/tp
    (colwise: output rows and bias; rowwise: input columns, bias whole), the embedding and LM head
    ``ceil(V/tp)`` rows each with ``vocab_parallel`` and all of them otherwise (one tensor if tied).
    MoE experts: ``E/ep`` experts per rank, each split ``tp/ep`` ways, so ``gate_up_proj``,
    ``down_proj`` and ``gate_up_proj_bias`` hold 1/tp and ``down_proj_bias`` 1/ep; shared experts'
    gate/up/down are split like a dense MLP's when the TP plan does not list them. Everything else
    (routers, norms) whole."""
    tp_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    if tp > 1 and not tp_plan:
        raise BDLoraConfigError(
            f"{type(model).__name__} has no base_model_tp_plan in its config: cannot tell how TP shards it"
        )
    regexes = plan_regexes(tp_plan)
    experts = dict(experts_modules(model))
    vocab_ids = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
    numel = 0
    for name, param in model.named_parameters():  # a tied weight is listed once
        if ".lora_" in name:
            continue
        if id(param) in vocab_ids:
            rows, cols = param.shape
            numel += (math.ceil(rows / tp) if vocab_parallel else rows) * cols
            continue
        module_name, _, kind = name.rpartition(".")
        module_name = module_name.removesuffix(".base_layer")
        if module_name in experts:
            numel += _expert_shard(param, name, kind, experts[module_name], tp, ep)
            continue
        planned = planned_role(module_name, regexes) if tp > 1 else None
        if planned is None and tp > 1 and (shared := _SHARED_EXPERT.fullmatch(module_name)):
            planned = (None, _SHARED_STYLES[shared.group(1)])
        numel += param.numel() if planned is None else _linear_shard(param, name, planned[1], kind, tp)
    return numel * dtype.itemsize


def _expert_shard(param: nn.Parameter, name: str, kind: str, experts: nn.Module, tp: int, ep: int) -> int:
    """This rank's part of one tensor of an experts module: ``E/ep`` experts, each split ``tp/ep``
    ways (gate_up and its bias by output rows, down by input columns; down's bias whole)."""
    if tp == 1:
        return param.numel()
    _check_expert_split(expert_shape(experts, "down_proj")[2], tp, ep, name)
    if kind in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
        return param.numel() // tp
    if kind == "down_proj_bias":
        return param.numel() // ep
    return param.numel()


def _linear_shard(param: nn.Parameter, name: str, style: str, kind: str, tp: int) -> int:
    dim = LinearLayout.from_style(style).base_dim(kind)  # the dim TP splits, as sharding.py splits it
    if dim is None:
        return param.numel()
    return param.numel() // param.shape[dim] * _split(param.shape[dim], tp, f"{name} dim {dim}")


# -- activations -------------------------------------------------------------------------------------
def _adapted_by_layer(plan: Plan, d: _Dims) -> list[dict[str, ModulePlan]]:
    """For each decoder layer, its adapted projections by key: leaf name (``q_proj``...) for attention
    and a dense MLP, ``experts.gate_up_proj``/``experts.down_proj`` for routed experts and
    ``shared.gate_proj``... for a shared expert."""
    out: list[dict[str, ModulePlan]] = [{} for _ in range(d.layers)]
    for m in plan.modules:
        match = _LAYER_MODULE.fullmatch(m.name)
        key = None
        if match is not None:
            key = match["attn"] or re.sub(r"^shared_experts?\.", "shared.", match["mlp"])
            moe = d.moe[int(match.group(1))] if int(match.group(1)) < d.layers else None
            mlp_keys = MLP_LEAVES if moe is None else EXPERT_KEYS + (SHARED_KEYS if moe.shared_inter else ())
            if key not in (ATTENTION_LEAVES if match["attn"] else mlp_keys):
                key = None
        if key is None:
            raise BDLoraConfigError(
                f"module {m.name!r}: the memory plan models adapters on the projections of decoder "
                f"layers ({', '.join(ATTENTION_LEAVES + MLP_LEAVES)}, MoE experts' "
                f"{' and '.join(k.split('.')[1] for k in EXPERT_KEYS)}, shared experts' "
                f"{', '.join(MLP_LEAVES)}); exclude it to plan memory"
            )
        out[int(match.group(1))][key] = m
    return out


def _decoder_terms(
    d: _Dims, plan: Plan, dtype: torch.dtype, attention: str, checkpointing: bool
) -> list[Term]:
    if attention not in (*FUSED_ATTENTION, "eager"):
        raise BDLoraConfigError(
            f"attention implementation {attention!r}: the memory plan knows eager and "
            f"{', '.join(FUSED_ATTENTION)}"
        )
    adapted = _adapted_by_layer(plan, d)
    # The residual stream needs a gradient from the first adapted layer on (the embedding is frozen).
    grad_in = [any(adapted[:i]) for i in range(d.layers)]
    per_layer = [
        _layer_terms(d, a, g, dtype, attention, moe)
        for a, g, moe in zip(adapted, grad_in, d.moe, strict=True)
    ]
    final_norm = _norm_terms("final norm", d) if any(adapted) else []
    if checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; backward rebuilds one layer at a time.
        inputs = Term("layers", "layer input (checkpointed)", (d.batch, d.seq_outer, d.hidden), dtype)
        peak = max(per_layer, key=lambda terms: sum(t.bytes for t in terms))
        return [replace(inputs, count=d.layers), *(replace(t, kind="recompute") for t in peak), *final_norm]
    rope_saved = any(g or {"q_proj", "k_proj"} & a.keys() for a, g in zip(adapted, grad_in))
    rope = [Term("layers", "rotary cos, sin (all layers share them)", (1, d.seq, d.head_dim), dtype, count=2)]
    return [t for terms in per_layer for t in terms] + (rope if rope_saved else []) + final_norm


def _layer_terms(
    d: _Dims,
    adapted: dict[str, ModulePlan],
    grad_in: bool,
    dtype: torch.dtype,
    attention: str,
    moe: _Moe | None = None,
) -> list[Term]:
    """What one decoder layer saves; ``grad_in``: whether its input requires grad."""
    full = (d.batch, d.seq)
    terms = _norm_terms("input norm", d) if grad_in else []
    qkv = [adapted[k] for k in ("q_proj", "k_proj", "v_proj") if k in adapted]
    terms += _adapter_terms(_Input("q/k/v", (*full, d.hidden), grad_in), qkv, d, dtype)
    qkv_grad = grad_in or bool(qkv)
    if qkv_grad:
        terms += _attention_terms(d, dtype, attention)
    if "o_proj" in adapted:
        # A fused kernel's saved output is o's input (transformers' reshape is a view of it).
        shared = qkv_grad and attention in FUSED_ATTENTION
        o_input = _Input("o", (*full, d.heads_local * d.head_dim), qkv_grad, saved_elsewhere=shared)
        terms += _adapter_terms(o_input, [adapted["o_proj"]], d, dtype)
    mid_grad = qkv_grad or "o_proj" in adapted
    if mid_grad:
        terms += _norm_terms("post-attention norm", d)
    if moe is None:
        return terms + _mlp_terms(d, adapted, mid_grad, dtype, d.inter_local)
    return terms + _moe_terms(d, moe, adapted, mid_grad, dtype)


def _mlp_terms(
    d: _Dims, adapted: dict[str, ModulePlan], mid_grad: bool, dtype: torch.dtype, inter_local: int, label=""
) -> list[Term]:
    """A gate/up/down MLP of intermediate size ``inter_local`` per rank; ``adapted`` by leaf name,
    ``label`` prefixes its terms' names (a shared expert's)."""
    full = (d.batch, d.seq)
    gate_up = [adapted[k] for k in ("gate_proj", "up_proj") if k in adapted]
    terms = _adapter_terms(_Input(f"{label}gate/up", (*full, d.hidden), mid_grad), gate_up, d, dtype)
    inter = (*full, inter_local)
    gate_grad, up_grad = mid_grad or "gate_proj" in adapted, mid_grad or "up_proj" in adapted
    if gate_grad:  # SiLU saves its input; the product saves up's output for SiLU's gradient
        terms += [
            Term("layers", f"{label}gate output", inter, dtype),
            Term("layers", f"{label}up output", inter, dtype),
        ]
    if up_grad:  # the product saves SiLU's output for up's gradient
        terms.append(Term("layers", f"{label}SiLU output", inter, dtype))
    if "down_proj" in adapted:
        down_input = _Input(f"{label}down", inter, gate_grad or up_grad)
        terms += _adapter_terms(down_input, [adapted["down_proj"]], d, dtype)
    return terms


def _moe_terms(
    d: _Dims, moe: _Moe, adapted: dict[str, ModulePlan], mid_grad: bool, dtype: torch.dtype
) -> list[Term]:
    """One MoE layer's MLP on this rank: the router on all ``N`` tokens, then the ``n_e = k N / ep``
    tokens routed to this rank's ``E/ep`` experts (uniform routing assumed), each expert ``tp/ep``
    ways narrow, and a shared expert.

    The router's softmax saves its fp32 probabilities ``(N, E)`` and top-k its int64 indices
    ``(N, k)``. Inside the experts, as in a dense MLP: gate_up's adapter A saves the gathered routed
    inputs, the activation saves gate_up's output, the product of gate and up saves the activation's
    output, down's adapter A saves its input, each adapter's B saves ``h = A x`` ``(n_e, r/s)``.
    The routing weight's product saves each expert's output and the weights ``(n_e, 1)``; the
    ``index_add_`` that sums the experts saves its source, the weighted output ``(n_e, H)``; the
    gathers save the routed tokens' int64 token and top-k slot indices ``(n_e,)``."""
    split = d.tp // d.ep
    tokens = d.batch * d.seq
    routed = math.ceil(moe.top_k * tokens / d.ep)
    inter = moe.inter // split
    gate_up = [adapted[k] for k in ("experts.gate_up_proj",) if k in adapted]
    down = [adapted[k] for k in ("experts.down_proj",) if k in adapted]
    act_grad = mid_grad or bool(gate_up)  # gate_up's output requires grad
    out_grad = act_grad or bool(down)  # the experts' output requires grad
    terms = []
    if mid_grad:  # the router's input requires grad
        terms += [
            Term("layers", "router probabilities (fp32)", (tokens, moe.experts), FP32),
            Term("layers", "router top-k indices", (tokens, moe.top_k), torch.int64),
        ]
    routed_input = _Input("experts gate_up", (routed, d.hidden), mid_grad)
    terms += _adapter_terms(routed_input, gate_up, d, dtype, tokens=routed, split=split)
    if act_grad:
        terms += [
            Term("layers", "experts gate_up output", (routed, 2 * inter), dtype),
            Term("layers", "experts activation output", (routed, inter), dtype, count=moe.activation_saves),
        ]
    terms += _adapter_terms(_Input("experts down", (routed, inter), act_grad), down, d, dtype, routed, split)
    if out_grad:
        terms.append(Term("layers", "routing weights of the routed tokens", (routed, 1), dtype))
    if mid_grad:  # the routing weights require grad
        terms.append(Term("layers", "experts output (for the routing weights)", (routed, d.hidden), dtype))
    if gate_up or down:  # bdlora's expert loop: index_add_ saves its source; token and slot indices
        terms += [
            Term("layers", "experts weighted output (index_add_ source)", (routed, d.hidden), dtype),
            Term("layers", "routed token and top-k slot indices", (routed,), torch.int64, count=2),
        ]
    elif mid_grad:  # transformers' own (grouped) experts forward: three int64 indices per routed token
        terms.append(Term("layers", "routed token indices", (routed,), torch.int64, count=3))
    if moe.shared_inter:
        shared = {k.removeprefix("shared."): m for k, m in adapted.items() if k.startswith("shared.")}
        terms += _mlp_terms(d, shared, mid_grad, dtype, moe.shared_inter // d.tp, label="shared expert ")
        if moe.shared_gate and mid_grad:  # sigmoid(gate(x)) * out saves both factors
            terms += [
                Term("layers", "shared expert gate: sigmoid output", (tokens, 1), dtype),
                Term("layers", "shared expert output (for its gate)", (tokens, d.hidden), dtype),
            ]
    return terms


def _norm_terms(name: str, d: _Dims) -> list[Term]:
    """RMSNorm upcasts to fp32 and saves that input and its rsqrt (the weight is frozen)."""
    return [
        Term("layers", f"{name}: fp32 input", (d.batch, d.seq_outer, d.hidden), FP32),
        Term("layers", f"{name}: rsqrt", (d.batch, d.seq_outer, 1), FP32),
    ]


@dataclass(frozen=True)
class _Input:
    """The tensor a group of adapted projections reads; ``saved_elsewhere``: already counted."""

    label: str
    shape: tuple[int, ...]
    requires_grad: bool
    saved_elsewhere: bool = False


def _adapter_terms(
    x: _Input,
    modules: list[ModulePlan],
    d: _Dims,
    dtype: torch.dtype,
    tokens: int | None = None,
    split: int | None = None,
) -> list[Term]:
    """The A matmul saves its input (one tensor for the modules without dropout) and the B matmul
    ``h = A x`` ``(tokens, r/split)`` (default ``(B*T, r/t)``). With dropout each module saves its own
    dropped input, and the mask when the input requires grad (bool as CUDA's fused dropout keeps it)."""
    tokens = d.batch * d.seq if tokens is None else tokens
    split = (d.adapter_split or d.tp) if split is None else split
    terms = []
    if any(m.settings.dropout == 0 for m in modules) and not x.saved_elsewhere:
        terms.append(Term("layers", f"{x.label} input (adapter A)", x.shape, dtype))
    for m in modules:
        leaf = m.name.rsplit(".", 1)[-1]
        if m.settings.dropout > 0:
            terms.append(Term("layers", f"{leaf} adapter input after dropout", x.shape, dtype))
            if x.requires_grad:
                terms.append(Term("layers", f"{leaf} dropout mask", x.shape, torch.bool))
        terms.append(Term("layers", f"{leaf} adapter h = A x", (tokens, m.rank // split), dtype))
    return terms


def _attention_terms(d: _Dims, dtype: torch.dtype, attention: str) -> list[Term]:
    q = (d.batch, d.heads_local, d.seq, d.head_dim)
    if attention in FUSED_ATTENTION:  # GQA without repeating k and v: no attention mask is passed
        kv = (d.batch, d.kv_heads_local, d.seq, d.head_dim)
        return [
            Term("layers", "attention q (after rotary)", q, dtype),
            Term("layers", "attention k (after rotary), v", kv, dtype, count=2),
            Term("layers", "attention output", (d.batch, d.seq, d.heads_local * d.head_dim), dtype),
            Term("layers", "attention log-sum-exp", (d.batch, d.heads_local, d.seq), FP32),
        ]
    scores = (d.batch, d.heads_local, d.seq, d.seq)
    terms = [
        Term("layers", "attention q, repeated k and v", q, dtype, count=3),
        Term("layers", "attention probabilities, fp32", scores, FP32),
    ]
    if dtype != FP32:
        terms.append(Term("layers", "attention probabilities", scores, dtype))
    return terms


def _logits_terms(d: _Dims, dtype: torch.dtype, vocab_parallel: bool) -> list[Term]:
    """The frozen LM head saves nothing; the loss upcasts the logits and saves the fp32
    log-softmax (replicated) or softmax (vocab parallel, this rank's ``ceil(V/t)`` columns). The
    mean over target tokens saves its divisor: a fp32 total weight inside ``F.cross_entropy``
    (replicated), the int64 count of targets that ``VocabParallelCausalLMLoss`` divides by."""
    tokens = d.batch * d.seq
    vocab = math.ceil(d.vocab / d.tp) if vocab_parallel else d.vocab
    terms = [Term("logits", "logits (LM head output)", (tokens, vocab), dtype, kind="transient")]
    if dtype != FP32:
        terms.append(Term("logits", "logits, fp32 copy", (tokens, vocab), FP32, kind="transient"))
    if not vocab_parallel:
        return [
            *terms,
            Term(
                "logits",
                "log-softmax backward: its incoming and input gradients",
                (tokens, vocab),
                FP32,
                kind="backward",
                count=2,
            ),
            Term("logits", "log-softmax", (tokens, vocab), FP32),
            Term("logits", "targets", (tokens,), torch.int64),
            Term("logits", "loss total weight", (), FP32),
        ]
    if vocab * d.tp > d.vocab:  # the padding columns are masked on a copy
        terms.append(Term("logits", "logits with padding masked", (tokens, vocab), FP32, kind="transient"))
    backward = [
        Term("logits", "softmax backward: the logits' gradient", (tokens, vocab), FP32, kind="backward")
    ]
    if dtype != FP32:
        backward.append(
            Term("logits", "the gradient cast to the logits' dtype", (tokens, vocab), dtype, kind="backward")
        )
    return [
        *terms,
        *backward,
        Term("logits", "softmax", (tokens, vocab), FP32),
        Term("logits", "local targets", (tokens,), torch.int64),
        Term("logits", "target masks", (tokens,), torch.bool, count=2),
        Term("logits", "loss divisor (target count)", (), torch.int64),
    ]


def _merged(terms: list[Term]) -> list[Term]:
    """Equal terms (same part, name, shape, dtype, kind) added up, in first-seen order."""
    out: dict[tuple, Term] = {}
    for t in terms:
        key = (t.part, t.name, t.shape, t.dtype, t.kind)
        out[key] = replace(t, count=out[key].count + t.count) if key in out else t
    return list(out.values())


# -- the table ---------------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_memory_table(plans: dict[str, MemoryPlan]) -> str:
    """One row per item, one column per layout."""
    first = next(iter(plans.values()))
    rows = [["per rank", *plans]]
    for i, (label, _) in enumerate(first.rows()):
        rows.append([label, *(format_bytes(p.rows()[i][1]) for p in plans.values())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    return "\n".join(lines)


def describe(plans: dict[str, MemoryPlan]) -> str:
    """The settings the table assumes, the table, and what its activation rows hold."""
    p = next(iter(plans.values()))
    checkpointing = "on" if p.activation_checkpointing else "off"

    def per_column(part: str, kind: str) -> str:
        return " | ".join(format_bytes(q.activation_bytes(part, kind)) for q in plans.values())

    parallel = f"tp={p.tp}" + (f", ep={p.ep}" if p.moe_layers else "")
    lines = [
        f"per-rank training memory at {parallel}: micro-batch {p.micro_batch} x seq {p.seq_len}, "
        f"{str(p.dtype).removeprefix('torch.')} parameters and compute, {p.attention} attention, "
        f"activation checkpointing {checkpointing}, AdamW, {p.sharding} adapter sharding",
        format_memory_table(plans),
        f"of logits+loss, saved for backward: {per_column('logits', 'saved')} "
        f"(the rest lives only while the loss is computed)",
    ]
    if p.activation_checkpointing:
        lines.append(
            f"of activations: layers, one layer rebuilt in backward: {per_column('layers', 'recompute')}"
        )
    if p.moe_layers:
        lines.append(
            f"{p.moe_layers} MoE layers: each rank holds E/{p.ep} experts, each "
            f"{p.tp // p.ep}-way tensor-parallel; the tokens routed to its experts are counted as "
            f"top_k x tokens / {p.ep}, which assumes uniform routing (an average: an unbalanced "
            f"router puts more on some ranks)"
        )
    if p.tp == 1:
        lines.append("tp=1: vocabulary and sequence parallelism change nothing")
    lines.append("total: the sum of the rows, an upper bound on the peak (docs/memory.md)")
    return "\n".join(lines)
