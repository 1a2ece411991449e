"""Who this process is in the job (mesh, ranks) and where the run writes, decided once."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from bdlora.parallel.comm import TPGroup, broadcast_object
from bdlora.parallel.mesh import ParallelDims, build_mesh, device_type, tp_of_mesh


@dataclass
class RunContext:
    """The mesh and this process's place in it; ``is_main`` gates every shared write and log."""

    mesh: DeviceMesh
    tp: TPGroup
    dp_rank: int
    dp_size: int
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("dp") if self.dp_size > 1 else None

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def decide_run_dir(run_dir: str | None, run_name: str) -> Path:
    """Rank 0 picks the directory (timestamp plus a random id, so jobs started in the same second
    never collide) and broadcasts it: every rank writes under the same one."""
    choice = None
    if dist.get_rank() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        choice = run_dir or os.path.join("outputs", run_name, f"{stamp}-{secrets.token_hex(3)}")
    return Path(broadcast_object(choice, src=0)).resolve()


def build_context(tp: int, dp: int | None, run_dir: str | None, run_name: str) -> RunContext:
    world = dist.get_world_size()
    dims = ParallelDims(world, tp=tp, dp=dp)
    mesh = build_mesh(dims)
    device = (
        torch.device(device_type(), torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return RunContext(
        mesh=mesh,
        tp=tp_of_mesh(mesh),
        dp_rank=mesh.get_local_rank("dp"),
        dp_size=dims.dp,
        rank=dist.get_rank(),
        world_size=world,
        device=device,
        run_dir=decide_run_dir(run_dir, run_name),
    )
