"""Count every collective issued inside a block: op, process group, bytes.

Collectives reach the dispatcher as ``c10d.*`` ops (``torch.distributed`` calls) or
``_c10d_functional.*`` ops (functional collectives, DTensor redistribution), so one
``TorchDispatchMode`` sees both, in forward and in backward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_NAMESPACES = ("c10d", "_c10d_functional")
_SKIP = ("wait_tensor", "_wrap_tensor_autograd", "monitored_barrier")
# Per-rank traffic of a ring algorithm, as a multiple of (t-1)/t times the full tensor's bytes.
_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}


def _canonical(op: str) -> str:
    name = op.split(".")[1].strip("_")
    for key, canon in (
        ("allreduce", "all_reduce"),
        ("all_reduce", "all_reduce"),
        ("allgather", "all_gather"),
        ("all_gather", "all_gather"),
        ("reduce_scatter", "reduce_scatter"),
        ("broadcast", "broadcast"),
        ("barrier", "barrier"),
    ):
        if key in name:
            return canon
    return name


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


@dataclass
class CollectiveRecord:
    op: str
    group: str
    bytes: int  # the full (largest) tensor the collective produces or consumes
    world: int

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends with a ring algorithm: 2(t-1)/t n for all-reduce, (t-1)/t n otherwise."""
        return _RING_FACTOR.get(self.op, 1.0) * (self.world - 1) / self.world * self.bytes


class CommCounter(TorchDispatchMode):
    """Context manager recording collectives; ``groups`` names process groups (e.g. tp, dp).

    >>> with CommCounter({"tp": tp_group}) as comm:
    ...     loss.backward()
    >>> comm.summary()["tp"]  # {"count": ..., "bytes": ..., "wire_bytes": ..., "ops": {...}}
    """

    def __init__(self, groups: dict[str, dist.ProcessGroup | None] | None = None) -> None:
        super().__init__()
        self.groups = dict(groups or {})
        self.records: list[CollectiveRecord] = []
        self._names = {g.group_name: label for label, g in self.groups.items() if g is not None}

    def _label(self, args) -> tuple[str, int]:
        for arg in args:
            if isinstance(arg, str) and arg in self._names:
                return self._names[arg], dist.get_world_size(self.groups[self._names[arg]])
            if isinstance(arg, torch.ScriptObject):
                try:
                    pg = dist.ProcessGroup.unbox(arg)
                except (RuntimeError, TypeError):
                    continue
                return self._names.get(pg.group_name, pg.group_name), pg.size()
        for arg in args:
            if isinstance(arg, str):
                return arg, 1
        return "?", 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace in _NAMESPACES and not any(s in func.__name__ for s in _SKIP):
            group, world = self._label(args)
            size = max(sum(t.numel() * t.element_size() for t in _tensors(x)) for x in (*args, out))
            self.records.append(CollectiveRecord(_canonical(str(func)), group, size, world))
        return out

    def summary(self) -> dict[str, dict]:
        """Per group: collective count, bytes, per-rank ring wire bytes, and counts per op."""
        out: dict[str, dict] = defaultdict(
            lambda: {"count": 0, "bytes": 0, "wire_bytes": 0.0, "ops": defaultdict(int)}
        )
        for r in self.records:
            entry = out[r.group]
            entry["count"] += 1
            entry["bytes"] += r.bytes
            entry["wire_bytes"] += r.wire_bytes
            entry["ops"][r.op] += 1
        return {k: {**v, "ops": dict(v["ops"])} for k, v in out.items()}


def slora_extra_bytes(plan, tokens: int, tp: int, element_size: int = 4) -> dict[str, float]:
    """Per-step TP traffic S-LoRA adds on top of the base (``plan``: the dense-LoRA plan).

    Each column layer all-gathers its ``(tokens, r)`` activation forward and reduce-scatters its
    gradient backward; each row layer all-reduces a ``(tokens, r)`` partial forward. Per attention
    block (q, k, v, o) the forward is ``5 (t-1) r S / t`` elements per rank (BDLORA.md).
    Returns full-tensor ``bytes``, per-rank ring ``wire_bytes`` and the collective ``count``.
    """
    from bdlora.roles import Role

    frac = (tp - 1) / tp
    out = {"bytes": 0.0, "wire_bytes": 0.0, "count": 0, "forward_wire_bytes": 0.0}
    for m in plan.modules:
        size = tokens * m.rank * element_size
        if m.role is Role.COLUMN:  # all-gather forward, reduce-scatter backward
            out["bytes"] += 2 * size
            out["wire_bytes"] += 2 * frac * size
            out["forward_wire_bytes"] += frac * size
            out["count"] += 2
        else:  # all-reduce forward, identity backward
            out["bytes"] += size
            out["wire_bytes"] += 2 * frac * size
            out["forward_wire_bytes"] += 2 * frac * size
            out["count"] += 1
    return out
