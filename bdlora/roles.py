"""Tensor-parallel roles of linear layers, read from a model's ``base_model_tp_plan``."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

# transformers' TP styles that shard a linear layer the Megatron way.
_STYLE_ROLES = {
    "colwise": "column",
    "local_colwise": "column",
    "rowwise": "row",
    "local_rowwise": "row",
}

# Used only where a model config has no base_model_tp_plan.
_NAME_ROLES = {
    "column": (
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
    "row": ("o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj", "w2", "wo"),
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
    """(role, style) of ``name`` if the TP plan lists it, else None; UnsupportedTPStyle for a style
    bdlora cannot shard (packed, gather, ...)."""
    for regex, key, style in regexes:
        if regex.fullmatch(name):
            if style not in _STYLE_ROLES:
                raise UnsupportedTPStyle(
                    f"module {name!r} has TP style {style!r} (plan key {key!r}); bdlora supports "
                    f"{', '.join(sorted(_STYLE_ROLES))}. Exclude it with patterns: "
                    f"{{{name.rsplit('.', 1)[-1]!r}: None}} or force one with a 'role' override."
                )
            return Role(_STYLE_ROLES[style]), style
    return None


def role_of(name: str, tp_plan: dict[str, str] | None) -> tuple[Role, str]:
    """The role of module ``name`` and where it came from (shown in the plan output).

    Raises UnsupportedTPStyle for a planned style bdlora cannot shard, and ValueError when there is
    no plan entry and the name says nothing.
    """
    planned = planned_role(name, plan_regexes(tp_plan)) if tp_plan else None
    if planned is not None:
        return planned[0], f"tp_plan:{planned[1]}"
    leaf = name.rsplit(".", 1)[-1]
    for role, leaves in _NAME_ROLES.items():
        if leaf in leaves:
            return Role(role), "name"
    raise ValueError(
        f"cannot tell whether module {name!r} is column- or row-parallel: the model config has no "
        f"base_model_tp_plan entry for it; add a 'role' override in patterns"
    )
