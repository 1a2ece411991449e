"""BD-LoRA on mixture-of-experts layers: per-expert adapters on transformers' fused expert tensors.

transformers keeps a MoE layer's routed experts as one module holding 3-D parameters:
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) (gpt-oss stores both transposed, ``x @ W``,
and adds per-expert biases). ``BDLoraExperts`` replaces that module: each expert tensor becomes an
``ExpertLinear`` child of the same name (``...experts.gate_up_proj``), a ``BDLoraLinear`` whose
factors carry a leading expert dimension, so the pattern config, checkpoints and exports address
it like any adapted module. ``gate_up_proj`` is column-parallel (B block-diagonal), ``down_proj``
row-parallel (A block-diagonal), exactly as gate/up and down of a dense MLP.

Forward runs each expert that received tokens on its routed tokens only (the base and the
adapter together), as transformers' eager experts do; no expert sees a token it was not routed.
Under tensor or expert parallelism this module holds its rank's experts (``expert_offset``,
``num_local_experts``) and its slices of them; its output is the rank's partial sum, which the MoE
block's boundary reduces with the rest of the block (``bdlora.parallel.placement``).

==================  ===========================  =============================================
factor              shape (unsharded)            notes
==================  ===========================  =============================================
gate_up A           ``(E, r, H)``                dense
gate_up B           ``(E, 2I, r/N)``             packed block-diagonal, per expert
down A              ``(E, r, I/N)``              packed block-diagonal, per expert
down B              ``(E, H, r)``                dense
==================  ===========================  =============================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bdlora.layers import BDLoraLinear, RowAdapters, check_unmerged, expand_block_diag, init_factors
from bdlora.roles import Role

EXPERT_PARAMS = {"gate_up_proj": Role.COLUMN, "down_proj": Role.ROW}
# (adapter, its index in a mixed batch's adapters or None for every token, (A_e, B_e) per expert)
ExpertFactors = tuple[str, int | None, list[tuple[torch.Tensor, torch.Tensor]]]


def is_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D ``gate_up_proj`` and ``down_proj`` (or bdlora's wrapper)."""
    if isinstance(module, BDLoraExperts):
        return True
    params = [getattr(module, n, None) for n in EXPERT_PARAMS]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_experts(module):
            yield name, module


def is_transposed(experts: nn.Module) -> bool:
    """Whether the expert tensors are stored ``(E, d_in, d_out)`` (gpt-oss's ``x @ W``).

    Decided from shapes alone: in (E, out, in) storage gate_up's input dim equals down's output
    dim (both H); transposed, gate_up's last dim is 2I and down's second is I, which never agree.
    """
    if isinstance(experts, BDLoraExperts):
        return experts.gate_up_proj.fan_in_fan_out
    gate_up, down = experts.gate_up_proj, experts.down_proj
    return gate_up.shape[2] != down.shape[1]


def expert_shape(experts: nn.Module, p_name: str) -> tuple[int, int, int]:
    """(E, d_out, d_in) of expert tensor ``p_name``, unsharded, whether ``experts`` is transformers'
    module (gpt-oss storing it transposed) or bdlora's (possibly sharded) wrapper."""
    tensor = getattr(experts, p_name)
    if isinstance(tensor, ExpertLinear):
        return (tensor.num_experts, *tensor.global_shape)
    e, d1, d2 = tensor.shape
    return (e, d2, d1) if is_transposed(experts) else (e, d1, d2)


def dense_expert_factors(
    a: torch.Tensor, b: torch.Tensor, role: Role | str, nblocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors with the block-diagonal one expanded: plain LoRA, per expert.

    Returns A ``(E, r, d_in)`` and B ``(E, d_out, r)``; ``nblocks == 1`` returns them unchanged.
    """
    if nblocks == 1:
        return a, b
    if Role(role) is Role.COLUMN:
        return a, torch.stack([expand_block_diag(b_e, nblocks) for b_e in b])  # (E, d_out, r)
    return torch.stack([expand_block_diag(a_e, nblocks) for a_e in a]), b  # (E, r, d_in)


def gate_layout(experts: nn.Module) -> str | None:
    """How gate and up share ``gate_up``'s output: ``chunk`` (halves), ``interleaved`` (even/odd
    columns), or None when bdlora cannot tell (the module then trains at TP 1 only)."""
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is None:
        return "chunk" if hasattr(experts, "act_fn") else None
    source = inspect.getsource(gate)
    if "::2" in source:
        return "interleaved"
    return "chunk" if "chunk(2" in source else None


class ExpertWeights(nn.Module):
    """One expert tensor and its bias, in the model's own storage layout (the ``base_layer``)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias


class ExpertLinear(BDLoraLinear):
    """One fused expert tensor with per-expert adapters: ``BDLoraLinear`` with an expert dimension.

    ``weight`` is ``(E_local, d_out, d_in)`` (a transposed view of gpt-oss's storage, as Conv1D's
    is for GPT-2); ``global_shape`` is one expert's unsharded ``(d_out, d_in)``.
    """

    def __init__(self, base: ExpertWeights, role: Role, transposed: bool, param_name: str) -> None:
        super().__init__(base, role)
        self.fan_in_fan_out = transposed
        self.param_name = param_name
        self.num_experts, d_out, d_in = self.weight.shape  # unsharded, as global_shape
        self.global_shape = (d_out, d_in)

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.transpose(1, 2) if self.fan_in_fan_out else w

    def checkpoint_key(self, name: str, p_name: str) -> str:
        """transformers' name of base tensor ``p_name`` (``weight``/``bias``) of this layer at ``name``:
        the experts module's parameter ``gate_up_proj`` / ``gate_up_proj_bias``."""
        return name + ("_bias" if p_name == "bias" else "")

    def factor_shapes(self, rank: int, nblocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape_a, shape_b = super().factor_shapes(rank, nblocks)
        return (self.num_experts, *shape_a), (self.num_experts, *shape_b)

    @torch.no_grad()
    def init_full(self, a: torch.Tensor, b: torch.Tensor, init: str, base_std: float, d_in: int) -> None:
        for e in range(a.shape[0]):  # each expert as one linear layer: the same fan-ins
            init_factors(a[e], b[e], init, base_std, d_in)

    def expert_factors(self, rows: RowAdapters | None = None) -> list[ExpertFactors]:
        """The adapters forward adds: the live one on every token, or (``rows``, a mixed batch)
        each of the batch's adapters this tensor holds on its own tokens; with their (A_e, B_e) per
        local expert. Split once per forward: indexing the factors per expert would give each
        expert a backward that writes a whole-tensor gradient."""
        if rows is None:
            name = self.live_adapter()
            picked = [] if name is None else [(name, None)]
        else:
            check_unmerged(self)
            held = [(n, k) for k, n in enumerate(rows.adapters) if n in self.lora_A]
            picked = [] if self.disabled else held
        return [
            (name, k, list(zip(self.lora_A[name].unbind(0), self.lora_B[name].unbind(0))))
            for name, k in picked
        ]

    def expert_forward(
        self, x: torch.Tensor, e: int, factors: list[ExpertFactors], picks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Local expert ``e`` on its routed tokens: x (n, d_in_local) -> (n, d_out_local), bias included
        (a row layer's bias from one rank of the expert's TP group, see ``adds_bias``); ``factors``:
        ``expert_factors()``; ``picks`` (n,): each token's index into a mixed batch's adapters."""
        out = F.linear(x, self.weight[e])  # (n, d_out_local)
        for name, k, per_expert in factors:
            a, b = per_expert[e]
            if k is None:
                out = out + self.factor_delta(x, a, b, name).to(out.dtype)
                continue
            index = (picks == k).nonzero().squeeze(1)  # (n_k,) this adapter's tokens
            if len(index):
                delta = self.factor_delta(x.index_select(0, index), a, b, name)  # (n_k, d_out_local)
                out = out.index_add(0, index, delta.to(out.dtype))
        bias = self.base_layer.bias
        if bias is not None and self.adds_bias():
            out = out + bias[e]
        return out

    def adds_bias(self) -> bool:
        return self.tp_style is None or self.tp_style.adds_bias(self)

    def keep_grads(self) -> torch.Tensor:
        """A zero that depends on the live factors: a rank whose experts got no token still gets
        (zero) gradients for them, as every rank of a data-parallel replica must."""
        name = self.live_adapter()
        if name is None:
            return torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
        return (self.lora_A[name].sum() + self.lora_B[name].sum()) * 0.0

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B_e A_e`` for every local expert, dense, fp32: (E_local, d_out_local, d_in_local)."""
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        a, b = dense_expert_factors(a, b, self.role, self.local_nblocks[name])  # (E, r, d_in), (E, d_out, r)
        return torch.bmm(b, a) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} holds one tensor of a MoE layer's experts; it runs inside "
            f"BDLoraExperts.forward, with the routing"
        )


class BDLoraExperts(nn.Module):
    """A MoE layer's routed experts with BD-LoRA adapters on ``gate_up_proj`` and ``down_proj``.

    Called as transformers' experts are: ``(hidden_states (T, H), top_k_index (T, k), top_k_weights
    (T, k))`` with global expert ids; returns ``(T, H)``, the weighted sum over the routed experts
    this rank holds. ``adapter_names`` (a mixed batch, one name per row of the ``(B, S)`` batch the
    T = B*S tokens were flattened from): each token gets its row's adapter.
    """

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        transposed = is_transposed(experts)
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_layout = gate_layout(experts)
        self.expert_class = type(experts).__name__
        for p_name, role in EXPERT_PARAMS.items():
            base = ExpertWeights(getattr(experts, p_name), getattr(experts, f"{p_name}_bias", None))
            setattr(self, p_name, ExpertLinear(base, role, transposed, p_name))
        self.expert_offset, self.num_local_experts = 0, self.num_experts
        for p_name in list(experts._parameters):  # the tensors live here now, once
            del experts._parameters[p_name]
        self._emptied = (experts,)  # a tuple: not a child; its act_fn / clamp stay in use
        self._activation = _activation(experts)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapter_names: Sequence[str] | RowAdapters | None = None,
    ) -> torch.Tensor:
        rows = RowAdapters.of(adapter_names)
        out = torch.zeros_like(hidden_states)  # (T, H)
        local = top_k_index - self.expert_offset  # (T, k) local expert ids; others out of range
        with torch.no_grad():
            hit = local[(local >= 0) & (local < self.num_local_experts)].unique().tolist()
        if not hit:  # still a function of the input: the block's f must run its backward here too
            return hidden_states * 0.0 + self.gate_up_proj.keep_grads() + self.down_proj.keep_grads()
        gate_up, down = self.gate_up_proj.expert_factors(rows), self.down_proj.expert_factors(rows)
        token_ids = None if rows is None else rows.ids(len(hidden_states), hidden_states.device)  # (T,)
        for e in hit:
            token_idx, slot = torch.where(local == e)  # (n,), (n,)
            picks = None if token_ids is None else token_ids[token_idx]  # (n,)
            h = self.gate_up_proj.expert_forward(hidden_states[token_idx], e, gate_up, picks)  # (n, 2I_local)
            y = self.down_proj.expert_forward(self._activation(h), e, down, picks)  # (n, H), partial under TP
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def base_module(self) -> nn.Module:
        """The transformers experts module again, holding the (merged) base tensors: for unloading."""
        module = self._emptied[0]
        for p_name in EXPERT_PARAMS:
            base = getattr(self, p_name).base_layer
            module.register_parameter(p_name, base.weight)
            if base.bias is not None:
                module.register_parameter(f"{p_name}_bias", base.bias)
        return module

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, local={self.expert_offset}:"
            f"{self.expert_offset + self.num_local_experts}, gate={self.gate_layout}"
        )


def _activation(experts: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """gate_up (n, 2I) -> (n, I) as the model computes it: its own ``_apply_gate``, else
    ``act_fn(gate) * up`` over the two halves."""
    if hasattr(type(experts), "_apply_gate"):
        return experts._apply_gate

    def act(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    return act


def is_router(model: nn.Module, name: str, module: nn.Module) -> bool:
    """A MoE router (``mlp.gate``, ``mlp.router``): not a linear layer, but a module of its own with a
    2-D ``weight`` (one row per expert) beside an experts module."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return False
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return any(is_experts(child) for child in parent.children())


class RouterLinear(BDLoraLinear):
    """A MoE router with an adapter on its weight: the router's own forward (its softmax, top-k,
    scaling) runs on ``W + delta``, so whatever the router does with its logits stays transformers'.

    The delta is (E, H): forming it costs less than the router's own matmul over the tokens. In a
    mixed batch (``adapter_names``) the router runs once per adapter on that adapter's tokens (dim 0
    of its input) and the per-token outputs are put back in order.
    """

    def forward(self, *args, adapter_names: Sequence[str] | RowAdapters | None = None, **kwargs):
        rows = RowAdapters.of(adapter_names)
        if rows is not None:
            check_unmerged(self)
            return self._rows_forward(rows, args, kwargs)
        return self._adapted(self.live_adapter(), args, kwargs)

    def _adapted(self, name: str | None, args: tuple, kwargs: dict):
        if name is None:
            return self.base_layer(*args, **kwargs)
        weight = self.base_layer.weight
        adapted = {"weight": weight + self.delta_weight(name).to(weight.dtype)}  # (E, H)
        return torch.func.functional_call(self.base_layer, adapted, args, kwargs)

    def _rows_forward(self, rows: RowAdapters, args: tuple, kwargs: dict):
        x, rest = args[0], args[1:]  # (T, H)
        groups = rows.groups(len(x), x.device)
        ids = rows.ids(len(x), x.device)
        parts = [(None, (ids < 0).nonzero().squeeze(1))]  # the base's tokens
        parts += [(n if n in self.lora_A and not self.disabled else None, idx) for n, idx in groups]
        parts = [(name, idx) for name, idx in parts if len(idx)]
        outputs = [self._adapted(name, (x.index_select(0, idx), *rest), kwargs) for name, idx in parts]
        order = torch.cat([idx for _, idx in parts]).argsort()  # back to the tokens' order
        return _stitch(outputs, [len(idx) for _, idx in parts], order)


def _stitch(outputs: list, lengths: list[int], order: torch.Tensor):
    """One output from per-group outputs (tensors, or tuples of them, per token along dim 0)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        for out, n in zip(outputs, lengths):
            if out.shape[0] != n:
                raise ValueError(
                    f"router output of shape {tuple(out.shape)} is not per token ({n} tokens): a mixed "
                    f"batch (adapter_names) cannot reassemble it"
                )
        return torch.cat(outputs).index_select(0, order)
    return type(first)(_stitch(list(parts), lengths, order) for parts in zip(*outputs))


def wrap_experts(model: nn.Module, name: str) -> BDLoraExperts:
    """The BDLoraExperts at ``name``, replacing transformers' experts module there on first use."""
    module = model.get_submodule(name)
    if isinstance(module, BDLoraExperts):
        return module
    parent_name, _, child = name.rpartition(".")
    wrapper = BDLoraExperts(module)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return wrapper
