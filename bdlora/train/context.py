"""Who this process is in the job (mesh, ranks) and where the run writes, decided once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from bdlora.parallel.comm import TPGroup, broadcast_object
from bdlora.parallel.mesh import ParallelDims, build_mesh, device_type, tp_of_mesh
from bdlora.train.config import new_stamp


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


def decide_run_dir(local_choice: str | None, run_name: str) -> Path:
    """Rank 0's choice of run directory, on every rank.

    Each rank's Hydra resolved (and created) its own output directory; they agree unless a
    user's ``hydra.run.dir`` holds something per-process such as ``${now:...}``. A rank whose own
    choice differs removes it if still empty, so no rank leaves a directory of its own behind.
    ``local_choice`` None (no Hydra): ``outputs/<run_name>/<date>-<time>-<random id>``.
    """
    mine = Path(local_choice or os.path.join("outputs", run_name, new_stamp())).resolve()
    chosen = Path(broadcast_object(str(mine), src=0))
    if mine != chosen and mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    return chosen


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
