"""Tensor-parallel roles of linear layers, read from a model's ``base_model_tp_plan``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from typing import Any

# transformers' TP styles that shard a linear layer the Megatron way (``parallel.styles.Layout``
# adds how each places its input and output).
STYLE_ROLES = {
    "colwise": "column",
    "local_colwise": "column",
    "colwise_gather_output": "column",
    "colwise_rep": "column",
    "packed_colwise": "column",
    "rowwise": "row",
    "local_rowwise": "row",
    "rowwise_split_input": "row",
    "rowwise_rep": "row",
}
# Plan styles of linear layers that every rank holds whole (MLA's joint KV down-projection).
REPLICATED_STYLES = frozenset({"mla_kv_a_proj", "replicated_with_grad_allreduce"})

# Used only where a model config has no base_model_tp_plan. Packed q/k/v projections (GPT-2's
# c_attn, GPT-NeoX's query_key_value) are column-parallel like q, k and v alone.
_NAME_ROLES = {
    "column": (
        "c_attn",
        "query_key_value",
        "dense_h_to_4h",
        "q_proj",
        "k_proj",
        "v_proj",
        "gate_proj",
        "up_proj",
        "query",
        "key",
        "value",
        "fc1",
        "c_fc",
        "w1",
        "w3",
        "wq",
        "wk",
        "wv",
    ),
    "row": ("o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj", "w2", "wo", "dense_4h_to_h"),
}


class Role(str, Enum):
    """Megatron role of a linear layer: which of its weight's dimensions TP splits."""

    COLUMN = "column"  # W split by output rows; B is block-diagonal
    ROW = "row"  # W split by input columns; A is block-diagonal

    @property
    def bd_factor(self) -> str:
        return "B" if self is Role.COLUMN else "A"

    @classmethod
    def parse(cls, value: Any, where: str) -> Role:
        if isinstance(value, Role):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"{where}: unknown role {value!r}; valid: column, row") from None


class UnsupportedTPStyle(ValueError):
    """A targeted module's TP style has no BD-LoRA layout."""


def plan_regexes(tp_plan: dict[str, str]) -> list[tuple[re.Pattern[str], str, str]]:
    """Compile ``base_model_tp_plan`` keys (``layers.*.mlp.up_proj``) into suffix regexes."""
    out = []
    for key, style in tp_plan.items():
        body = r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in key.split("."))
        out.append((re.compile(rf"(?:.*\.)?{body}"), key, style))
    return out


def planned_role(name: str, regexes: list[tuple[re.Pattern[str], str, str]]) -> tuple[Role, str] | None:
    """(role, style) of ``name`` if the TP plan shards it, else None (unlisted, or kept whole);
    UnsupportedTPStyle for a style bdlora cannot shard."""
    for regex, key, style in regexes:
        if regex.fullmatch(name):
            if style in REPLICATED_STYLES:
                return None
            if style not in STYLE_ROLES:
                raise UnsupportedTPStyle(
                    f"module {name!r} has TP style {style!r} (plan key {key!r}); bdlora supports "
                    f"{', '.join(sorted(STYLE_ROLES))}. Exclude it with patterns: "
                    f"{{{name.rsplit('.', 1)[-1]!r}: None}} or force one with a 'role' override."
                )
            return Role(STYLE_ROLES[style]), style
    return None


def name_role(name: str) -> Role | None:
    """The role a module's leaf name says (``q_proj``: column, ``o_proj``: row), if it says one."""
    leaf = name.rsplit(".", 1)[-1]
    for role, leaves in _NAME_ROLES.items():
        if leaf in leaves:
            return Role(role)
    return None


def role_of(name: str, tp_plan: dict[str, str] | None) -> tuple[Role, str]:
    """The role of module ``name`` and where it came from (shown in the plan output).

    Raises UnsupportedTPStyle for a planned style bdlora cannot shard, and ValueError when there is
    no plan entry and the name says nothing.
    """
    planned = planned_role(name, plan_regexes(tp_plan)) if tp_plan else None
    if planned is not None:
        return planned[0], f"tp_plan:{planned[1]}"
    role = name_role(name)
    if role is not None:
        return role, "name"
    raise ValueError(
        f"cannot tell whether module {name!r} is column- or row-parallel: the model config has no "
        f"base_model_tp_plan entry for it; add a 'role' override in patterns"
    )


# Styles of modules other than linear layers, which bdlora leaves as they are; MoE experts' own
# styles among them: bdlora splits every experts module itself (``parallel.experts``, ``ep=``).
_OTHER_STYLES = frozenset(
    {
        "embedding_rowwise",
        "embedding_colwise",
        "sequence_parallel",
        "moe_tp_experts",
        "grouped_gemm",
        "ep_dispatch_experts",
        "ep_router",
    }
)


def check_tp_plan(tp_plan: Any) -> dict[str, str]:
    """A user-given TP plan as a plain dict, or a ValueError naming the bad key or style."""
    if not isinstance(tp_plan, Mapping) or not tp_plan:
        raise ValueError(
            f"tp_plan must be a non-empty mapping of module pattern to TP style "
            f'(e.g. {{"layers.*.mlp.fc_in": "colwise", "layers.*.mlp.fc_out": "rowwise"}}); got {tp_plan!r}'
        )
    valid = sorted(STYLE_ROLES) + sorted(REPLICATED_STYLES) + sorted(_OTHER_STYLES)
    for key, style in tp_plan.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tp_plan key {key!r}: a module pattern such as 'layers.*.self_attn.q_proj'")
        if style not in valid:
            raise ValueError(f"tp_plan[{key!r}] = {style!r} is not a TP style bdlora knows; valid: {valid}")
    return {str(k): str(v) for k, v in tp_plan.items()}
