"""Process group start-up and the (dp, tp) device mesh, validated before anything is built."""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bdlora.parallel.comm import TPGroup
from bdlora.parallel.launcher_env import detect


@dataclass(frozen=True)
class ParallelDims:
    """TP and DP degrees; ``dp`` is inferred from the world size when not given."""

    world_size: int
    tp: int = 1
    dp: int | None = None

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.world_size % self.tp:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tp={self.tp}; launch a multiple "
                f"of {self.tp} processes or pick tp among {_divisors(self.world_size)}"
            )
        dp = self.world_size // self.tp if self.dp is None else self.dp
        if dp * self.tp != self.world_size:
            raise ValueError(f"dp={dp} x tp={self.tp} = {dp * self.tp} != world size {self.world_size}")
        object.__setattr__(self, "dp", dp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> int:
    """Start the default process group (once) from the launcher's environment; returns the world
    size.

    torchrun, ``srun`` with one process per task, and submitit's local executor are recognised
    (``launcher_env.detect``). A single process rendezvouses through a private file, so that
    concurrent single-process runs never compete for a port.
    """
    if not dist.is_initialized():
        launch = detect()
        if launch.world_size == 1:
            store = tempfile.NamedTemporaryFile(prefix="bdlora-pg-", delete=False)  # noqa: SIM115
            store.close()
            os.unlink(store.name)
            dist.init_process_group(
                default_backend(), init_method=f"file://{store.name}", rank=0, world_size=1
            )
            return 1
        launch.export()
        if launch.launcher != "torchrun" and "OMP_NUM_THREADS" not in os.environ:
            # torchrun's default, or the CPUs Slurm gave the task: ranks sharing a node's cores
            # would otherwise each start a thread per core
            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(default_backend())
    return dist.get_world_size()


def build_mesh(dims: ParallelDims) -> DeviceMesh:
    """A 2-D mesh with dims named ``dp`` (outer) and ``tp`` (inner: TP peers are neighbours)."""
    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"mesh for {dims.world_size} ranks, but the process group has {dist.get_world_size()}"
        )
    return init_device_mesh(device_type(), (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))


def tp_of_mesh(mesh: DeviceMesh | None) -> TPGroup:
    if mesh is None:
        return TPGroup(None)
    return TPGroup.from_group(mesh.get_group("tp"))


class RankFailed(RuntimeError):
    """Another rank failed inside ``on_all_ranks``; the message is that rank's."""


def on_all_ranks(fn, *args, **kwargs):
    """Run a validation ``fn`` on every rank; if it fails on any, raise that message on all of them.

    A misconfiguration seen by one rank (a missing file, a bad shape) then stops the whole job with
    the message instead of leaving the other ranks blocked in their next collective.
    """
    error = None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
        error, result = err, None
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} failed: {message}")
    if error is not None:
        raise error
    return result


# How long a rank waits in ``check_in`` for the others before failing; seconds.
CALL_TIMEOUT_ENV = "BDLORA_CALL_TIMEOUT"
DEFAULT_CALL_TIMEOUT = 300.0
_CALLS = itertools.count(1)  # every rank makes bdlora's every-rank calls in the same order


class MissingRanksError(RuntimeError):
    """An every-rank call that some ranks did not make within the timeout."""


def call_timeout() -> float:
    value = os.environ.get(CALL_TIMEOUT_ENV, str(DEFAULT_CALL_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{CALL_TIMEOUT_ENV}={value!r}: give a positive number of seconds")
    return seconds


def check_in(op: str, timeout: float | None = None) -> None:
    """Wait until every rank of the job has entered ``op``; fail naming the ranks that did not.

    Each rank sets a key in the process group's store (no collective, so a rank that never calls
    ``op`` cannot leave the others blocked inside one) and waits for the others' keys. Calls are
    numbered per process, so every rank must make its every-rank calls in the same order.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    timeout = call_timeout() if timeout is None else timeout
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"bdlora/{next(_CALLS)}/{op}"
    store.set(f"{prefix}/{rank}", "in")
    keys = [f"{prefix}/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except dist.DistStoreError:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise MissingRanksError(
            f"{op}: rank(s) {missing} of {world} did not call it within {timeout:g} s (rank {rank} did). "
            f"On a TP-sharded model {op} must be called on every rank, in the same order as bdlora's "
            f"other every-rank calls (it gathers or changes sharded state); calls on one rank only "
            f"(e.g. under `if rank == 0`) work on models that are not TP-sharded. The wait is "
            f"{CALL_TIMEOUT_ENV} seconds."
        ) from None
