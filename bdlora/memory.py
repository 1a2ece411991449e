"""Per-rank memory of one BD-LoRA training step under tensor parallelism, from the model config alone.

``memory_plan`` counts, for one TP rank, the bytes of the frozen base weights, the adapter, its
gradients and AdamW state, and the activations one training forward leaves for backward, for a
model built on the meta device and a resolved adapter plan. ``bdlora plan --memory`` prints it for
three layouts side by side. docs/memory.md derives every term and says how it was measured.

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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from bdlora.config import BDLoraConfigError
from bdlora.parallel.sequence import decoder_parts
from bdlora.parallel.styles import LinearLayout
from bdlora.parallel.vocab import check_vocab_parallel
from bdlora.plan import ModulePlan, Plan, check_plan_tp
from bdlora.roles import STYLE_ROLES, Role, plan_regexes, planned_role

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention kernels that save q, k, v, the output and the log-sum-exp rather than a (T, T) matrix.
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
_LAYER_MODULE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")
FP32 = torch.float32


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
    inter_local: int
    vocab: int
    layers: int


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
) -> MemoryPlan:
    """Bytes per TP rank of training ``plan``'s adapter on ``model`` at TP degree ``tp``.

    ``model``: the unsharded, unadapted transformers model (the meta device is enough); its config
    gives the sizes and its parameters the base weights. ``dtype``: the parameters' and the
    compute's dtype (the adapter takes the base weights' dtype, as ``apply_bdlora`` does; no
    autocast). One micro-batch of ``micro_batch`` x ``seq_len`` tokens, trained as ``bdlora-train``
    does: ``model(input_ids=..., labels=...)`` without an attention mask, then AdamW.
    Vocabulary and sequence parallelism change nothing at ``tp=1``.
    """
    dtype = resolve_dtype(dtype)
    _check_options(tp, seq_len, micro_batch, vocab_parallel, sequence_parallel)
    check_plan_tp(plan, tp)
    layout = Layout(vocab_parallel and tp > 1, sequence_parallel and tp > 1)
    dims = _dims(model.config, tp, micro_batch, seq_len, layout.sequence_parallel)
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    adapter_params = sum(m.params_per_rank(tp) for m in plan.modules)
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
        base_weights=base_weight_bytes(model, tp, dtype, layout.vocab_parallel),
        adapter=adapter_params * dtype.itemsize,
        grads=adapter_params * dtype.itemsize,
        # exp_avg and exp_avg_sq in the parameter's dtype, and one fp32 ``step`` per parameter tensor
        optimizer=2 * adapter_params * dtype.itemsize + adapter_tensors * FP32.itemsize,
        activations=tuple(_merged(activations)),
    )


def memory_plans(model: nn.Module, plan: Plan, tp: int, **options) -> dict[str, MemoryPlan]:
    """``memory_plan`` for each layout of ``LAYOUTS`` that ``parallelize`` accepts for ``model``, by
    its column title (``memory_notes`` says why a layout is left out)."""
    return {
        title: memory_plan(
            model,
            plan,
            tp,
            vocab_parallel=layout.vocab_parallel,
            sequence_parallel=layout.sequence_parallel,
            **options,
        )
        for title, layout in LAYOUTS.items()
        if _refusal(model, layout) is None
    }


def _refusal(model: nn.Module, layout: Layout) -> str | None:
    """Why ``parallelize`` refuses ``layout`` for ``model`` (None: it accepts it)."""
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


def memory_notes(model: nn.Module, tp: int) -> list[str]:
    """What the memory table leaves out for ``model``: refused layouts, gathered outputs."""
    notes = [
        f"{title}: left out, {why}" for title, layout in LAYOUTS.items() if (why := _refusal(model, layout))
    ]
    tp_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    gathered = sorted(k for k, style in tp_plan.items() if tp > 1 and _gathers(style))
    if gathered:
        notes.append(
            f"the TP plan gathers the output of {', '.join(gathered)}: every rank then computes what "
            f"follows whole, so those blocks' activations are up to {tp}x the table's"
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


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise BDLoraConfigError(f"{what}={size} is not divisible by the TP degree {tp}")
    return size // tp


def _dims(config, tp: int, batch: int, seq: int, sequence_parallel: bool) -> _Dims:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return _Dims(
        tp=tp,
        batch=batch,
        seq=seq,
        seq_outer=seq // tp if sequence_parallel else seq,
        hidden=config.hidden_size,
        heads_local=_split(heads, tp, "num_attention_heads"),
        kv_heads_local=_split(kv_heads, tp, "num_key_value_heads"),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        inter_local=_split(config.intermediate_size, tp, "intermediate_size"),
        vocab=config.vocab_size,
        layers=config.num_hidden_layers,
    )


# -- weights -----------------------------------------------------------------------------------------
def base_weight_bytes(model: nn.Module, tp: int, dtype: torch.dtype, vocab_parallel: bool = False) -> int:
    """This rank's frozen parameters: every linear layer of ``base_model_tp_plan`` holds 1/tp
    (colwise: output rows and bias; rowwise: input columns, bias whole), the embedding and LM head
    ``ceil(V/tp)`` rows each with ``vocab_parallel`` and all of them otherwise (one tensor if tied),
    everything else whole."""
    tp_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    if tp > 1 and not tp_plan:
        raise BDLoraConfigError(
            f"{type(model).__name__} has no base_model_tp_plan in its config: cannot tell how TP shards it"
        )
    regexes = plan_regexes(tp_plan)
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
        planned = planned_role(module_name.removesuffix(".base_layer"), regexes) if tp > 1 else None
        numel += param.numel() if planned is None else _linear_shard(param, name, planned[1], kind, tp)
    return numel * dtype.itemsize


def _linear_shard(param: nn.Parameter, name: str, style: str, kind: str, tp: int) -> int:
    dim = LinearLayout.from_style(style).base_dim(kind)  # the dim TP splits, as sharding.py splits it
    if dim is None:
        return param.numel()
    return param.numel() // param.shape[dim] * _split(param.shape[dim], tp, f"{name} dim {dim}")


# -- activations -------------------------------------------------------------------------------------
def _adapted_by_layer(plan: Plan, layers: int) -> list[dict[str, ModulePlan]]:
    """For each decoder layer, its adapted projections by leaf name (``q_proj``...)."""
    out: list[dict[str, ModulePlan]] = [{} for _ in range(layers)]
    for m in plan.modules:
        match = _LAYER_MODULE.fullmatch(m.name)
        if match is None or match.group(2) not in ATTENTION_LEAVES + MLP_LEAVES:
            raise BDLoraConfigError(
                f"module {m.name!r}: the memory plan models adapters on the projections of decoder "
                f"layers ({', '.join(ATTENTION_LEAVES + MLP_LEAVES)}); exclude it to plan memory"
            )
        out[int(match.group(1))][match.group(2)] = m
    return out


def _decoder_terms(
    d: _Dims, plan: Plan, dtype: torch.dtype, attention: str, checkpointing: bool
) -> list[Term]:
    if attention not in (*FUSED_ATTENTION, "eager"):
        raise BDLoraConfigError(
            f"attention implementation {attention!r}: the memory plan knows eager and "
            f"{', '.join(FUSED_ATTENTION)}"
        )
    adapted = _adapted_by_layer(plan, d.layers)
    # The residual stream needs a gradient from the first adapted layer on (the embedding is frozen).
    grad_in = [any(adapted[:i]) for i in range(d.layers)]
    per_layer = [_layer_terms(d, a, g, dtype, attention) for a, g in zip(adapted, grad_in)]
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
    d: _Dims, adapted: dict[str, ModulePlan], grad_in: bool, dtype: torch.dtype, attention: str
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
    gate_up = [adapted[k] for k in ("gate_proj", "up_proj") if k in adapted]
    terms += _adapter_terms(_Input("gate/up", (*full, d.hidden), mid_grad), gate_up, d, dtype)
    inter = (*full, d.inter_local)
    gate_grad, up_grad = mid_grad or "gate_proj" in adapted, mid_grad or "up_proj" in adapted
    if gate_grad:  # SiLU saves its input; the product saves up's output for SiLU's gradient
        terms += [Term("layers", "gate output", inter, dtype), Term("layers", "up output", inter, dtype)]
    if up_grad:  # the product saves SiLU's output for up's gradient
        terms.append(Term("layers", "SiLU output", inter, dtype))
    if "down_proj" in adapted:
        down_input = _Input("down", inter, gate_grad or up_grad)
        terms += _adapter_terms(down_input, [adapted["down_proj"]], d, dtype)
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


def _adapter_terms(x: _Input, modules: list[ModulePlan], d: _Dims, dtype: torch.dtype) -> list[Term]:
    """The A matmul saves its input (one tensor for the modules without dropout) and the B matmul
    ``h = A x`` ``(B*T, r/t)``. With dropout each module saves its own dropped input, and the mask
    when the input requires grad (bool as CUDA's fused dropout keeps it)."""
    terms = []
    if any(m.settings.dropout == 0 for m in modules) and not x.saved_elsewhere:
        terms.append(Term("layers", f"{x.label} input (adapter A)", x.shape, dtype))
    for m in modules:
        leaf = m.name.rsplit(".", 1)[-1]
        if m.settings.dropout > 0:
            terms.append(Term("layers", f"{leaf} adapter input after dropout", x.shape, dtype))
            if x.requires_grad:
                terms.append(Term("layers", f"{leaf} dropout mask", x.shape, torch.bool))
        terms.append(Term("layers", f"{leaf} adapter h = A x", (d.batch * d.seq, m.rank // d.tp), dtype))
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

    lines = [
        f"per-rank training memory at tp={p.tp}: micro-batch {p.micro_batch} x seq {p.seq_len}, "
        f"{str(p.dtype).removeprefix('torch.')} parameters and compute, {p.attention} attention, "
        f"activation checkpointing {checkpointing}, AdamW",
        format_memory_table(plans),
        f"of logits+loss, saved for backward: {per_column('logits', 'saved')} "
        f"(the rest lives only while the loss is computed)",
    ]
    if p.activation_checkpointing:
        lines.append(
            f"of activations: layers, one layer rebuilt in backward: {per_column('layers', 'recompute')}"
        )
    if p.tp == 1:
        lines.append("tp=1: vocabulary and sequence parallelism change nothing")
    lines.append("total: the sum of the rows, an upper bound on the peak (docs/memory.md)")
    return "\n".join(lines)
