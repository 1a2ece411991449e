"""Per-expert adapters of fused MoE tensors <-> PEFT's ``target_parameters`` LoRA (pure tensor code).

bdlora keeps one adapter per expert, always in the canonical ``(out, in)`` orientation with a
leading expert dim: A ``(E, r, d_in)``, B ``(E, d_out, r)``, one of them packed block-diagonal
(column role, ``gate_up_proj``: B ``(E, d_out, r/N)``; row role, ``down_proj``: A ``(E, r, d_in/N)``).
PEFT adapts such a 3-D parameter with ``LoraConfig(target_parameters=[...])`` through
``peft.tuners.lora.layer.ParamWrapper``. Everything below was read from PEFT 0.21.2 and checked by
saving and loading adapters on tiny Mixtral and gpt-oss models (transformers 5.x).

PEFT's factors
--------------
For a parameter of shape ``(E, p, q)`` PEFT builds ``lora_A = nn.Linear(in, r*E)`` (weight
``(r*E, in)``) and ``lora_B = nn.Linear(r*E, out)`` (weight ``(out, r*E)``), and reads

- expert e's A as ``lora_A.weight.reshape(E, r, in)[e]``: rows are expert-major (row ``e*r + k``);
- expert e's B as ``lora_B.weight.reshape(out, r, E)[:, :, e]``: columns are rank-major, experts
  interleaved (column ``k*E + e``).

``in``/``out`` come from the base module's ``is_transposed`` attribute (missing = False): False
means storage ``(E, out, in)`` (``F.linear(x, W[e])``; PEFT swaps p and q) and the delta is
``scale * B_e @ A_e``; True means ``(E, in, out)`` (``x @ W[e]``) and the delta is its transpose.
transformers sets the flag on every experts class decorated with ``use_experts_implementation``
(Mixtral, Qwen2/3-MoE: False; gpt-oss: True), so there PEFT's ``in``/``out`` are the math's and
the PEFT factors are the same for both layouts. A module whose storage disagrees with its flag
(Llama-4's ``Llama4TextExperts``: ``(E, in, out)``, no flag) gets A and B swapped and transposed;
pass ``peft_transposed`` for it. ``scale = lora_alpha / r`` (``use_rslora`` must stay false).

Keys in ``adapter_model.safetensors``
-------------------------------------
The key names the wrapped *module*, not the parameter, and carries no adapter name:
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, e.g.
``base_model.model.model.layers.0.mlp.experts.lora_A.weight`` (same for Mixtral and gpt-oss).
When several parameters of one module are targeted, PEFT nests one ``ParamWrapper`` per parameter:
the first targeted parameter in the module's registration order (``named_parameters(recurse=False)``;
gate_up_proj before down_proj in every transformers MoE) is innermost, and each level of nesting
adds ``.base_layer``. Targeting both gate_up_proj and down_proj gives::

    ...mlp.experts.base_layer.lora_A.weight   gate_up_proj   (r*E, H)
    ...mlp.experts.base_layer.lora_B.weight   gate_up_proj   (2I, r*E)
    ...mlp.experts.lora_A.weight              down_proj      (r*E, I)
    ...mlp.experts.lora_B.weight              down_proj      (H, r*E)

whatever order ``target_parameters`` lists them in. Targeting one of them alone gives the
un-nested keys. The parameter name appears only in the config.

``adapter_config.json``
-----------------------
``target_parameters`` entries match a parameter's full name or a ``.``-separated suffix of it
(``"mlp.experts.gate_up_proj"``); write ``target_modules: []`` (not null) so PEFT targets nothing
else; ``rank_pattern`` / ``alpha_pattern`` keys match the parameter name (``"gate_up_proj"``).
``ParamWrapper`` refuses ``lora_dropout != 0``, ``fan_in_fan_out``, ``lora_bias``, ``use_dora`` and
every LoRA variant. All adapters of one PeftModel that use ``target_parameters`` must target the
same parameters.

BD-LoRA
-------
PEFT 0.21.2 has no block-diagonal form for parameters: ``get_peft_model`` and
``PeftModel.from_pretrained`` with ``use_bdlora`` set and any ``target_parameters`` fail in
``ParamWrapper.update_layer`` with ``ValueError: Invalid or unsupported variant combination:
('use_bdlora',)``, whatever ``target_modules_bd_a`` / ``_bd_b`` / ``match_strict`` say; a config
with attention ``target_modules`` + expert ``target_parameters`` + ``use_bdlora`` fails the same
way, so the whole adapter does not load (``resolve_lora_variant`` knows no variant for a
ParamWrapper). An adapter with expert tensors therefore goes to PEFT as plain LoRA, the
block-diagonal factors expanded to dense (exact); that config, attention targets included, loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bdlora.experts import dense_expert_factors
from bdlora.roles import Role

PEFT_PREFIX = "base_model.model."


def _swaps(transposed: bool, peft_transposed: bool | None) -> bool:
    """Whether PEFT's in/out are the math's out/in: its ``is_transposed`` flag disagrees with storage."""
    return peft_transposed is not None and peft_transposed != transposed


def to_peft(
    a: torch.Tensor,
    b: torch.Tensor,
    role: Role | str,
    nblocks: int,
    transposed: bool,
    *,
    peft_transposed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A.weight`` ``(r*E, in)`` and ``lora_B.weight`` ``(out, r*E)`` for one expert tensor.

    ``a``/``b`` are bdlora's canonical factors (one packed block-diagonal per ``role``);
    ``transposed`` says whether the parameter is stored ``(E, d_in, d_out)``; ``peft_transposed``
    is the experts module's ``is_transposed`` as PEFT reads it (``getattr(m, "is_transposed",
    False)``), None when it matches ``transposed`` (every transformers experts class but Llama-4's).
    PEFT's delta then equals bdlora's for every expert, in the parameter's own layout.
    """
    a, b = dense_expert_factors(a, b, role, nblocks)  # (E, r, d_in), (E, d_out, r)
    if _swaps(transposed, peft_transposed):  # PEFT's delta B'A' must be (B A)^T = A^T B^T
        a, b = b.transpose(1, 2), a.transpose(1, 2)  # (E, r, d_out), (E, d_in, r)
    num_experts, rank, d_in = a.shape
    lora_a = a.reshape(num_experts * rank, d_in)  # (E*r, in): row e*r + k
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], rank * num_experts)  # (out, r*E): column k*E + e
    return lora_a.contiguous(), lora_b.contiguous()


def from_peft(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    num_experts: int,
    transposed: bool,
    *,
    peft_transposed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical dense A ``(E, r, d_in)`` and B ``(E, d_out, r)`` from PEFT's factors (``to_peft``'s inverse).

    Block-diagonal structure is not recovered: the factors come back dense, as PEFT holds them.
    """
    rank_e = lora_a.shape[0]
    if rank_e % num_experts or lora_b.shape[1] != rank_e:
        raise ValueError(
            f"PEFT factors lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)} do not hold "
            f"{num_experts} experts of one rank"
        )
    rank = rank_e // num_experts
    a = lora_a.reshape(num_experts, rank, lora_a.shape[1])  # (E, r, in)
    b = lora_b.reshape(lora_b.shape[0], rank, num_experts).permute(2, 0, 1)  # (E, out, r)
    if _swaps(transposed, peft_transposed):
        a, b = b.transpose(1, 2), a.transpose(1, 2)  # (E, r, d_in), (E, d_out, r)
    return a.contiguous(), b.contiguous()


def peft_param_keys(module_name: str, param_name: str, targeted: Sequence[str]) -> tuple[str, str]:
    """The ``adapter_model.safetensors`` keys (lora_A, lora_B) of ``param_name`` on ``module_name``.

    ``module_name`` is the experts module's name in the model PEFT wraps
    (``model.layers.0.mlp.experts`` for a causal LM). ``targeted`` lists every targeted parameter of
    that module in registration order, ``[n for n, _ in experts.named_parameters(recurse=False) if n
    in targets]``: PEFT nests one wrapper per parameter, the first innermost, and each later one adds
    a ``.base_layer`` level to this one's key.
    """
    order = list(targeted)
    if param_name not in order or len(set(order)) != len(order):
        raise ValueError(f"{param_name!r} is not among the targeted parameters {order} (each once)")
    depth = len(order) - 1 - order.index(param_name)
    stem = f"{PEFT_PREFIX}{module_name}" + ".base_layer" * depth
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
