"""Process group start-up and the (dp, tp) device mesh, validated before anything is built."""

from __future__ import annotations

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
_KEYS = "bdlora"  # prefix of check_in's keys in the process group's store
OUT_OF_STEP = "the process group is no longer usable for bdlora's collective calls: restart"


class MissingRanksError(RuntimeError):
    """An every-rank call that some ranks did not make: not within the timeout, or not as the same
    call (they entered another every-rank call in its place)."""


class OutOfStepError(MissingRanksError):
    """An every-rank call after an earlier one failed: the ranks' call counts may differ, so no later
    call can be matched across ranks. Raised on every rank, whether or not it made the failed call."""


@dataclass
class _CallLedger:
    """This process's every-rank calls in one process group: how many, and the first failure."""

    group: object  # a new default process group (re-initialised) starts a new ledger
    calls: int = 0
    failure: str | None = None


_LEDGER: list[_CallLedger] = []  # the current default group's (a list: no ``global`` statement)


def _ledger() -> _CallLedger:
    group = dist.group.WORLD
    if not _LEDGER or _LEDGER[0].group is not group:
        _LEDGER[:] = [_CallLedger(group)]
    return _LEDGER[0]


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
    """Wait until every rank of the job has entered ``op`` as the same every-rank call; fail on every
    rank that did, naming the ranks that did not.

    Each rank numbers its every-rank calls, puts ``op`` under this call's number and its rank in the
    process group's store (no collective, so a rank that never calls cannot leave the others blocked
    inside one) and waits for the other ranks' keys. All present with one ``op``: the call runs.
    Present with different ops (a rank skipped or added a call), or absent after ``timeout``: the
    call fails, and its outcome, written once to the store, fails it on a rank that arrives late too.
    From then on the ranks' counts may differ, so the failure is kept (in this process and in the
    store) and every later call on every rank raises ``OutOfStepError`` instead of pairing one
    rank's call with another's different one, or blaming a rank that did call.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    timeout = call_timeout() if timeout is None else timeout
    store = dist.distributed_c10d._get_default_store()
    ledger = _ledger()
    _refuse_if_out_of_step(op, store, ledger)
    ledger.calls += 1
    call, rank, world = ledger.calls, dist.get_rank(), dist.get_world_size()
    keys = [f"{_KEYS}/call/{call}/{r}" for r in range(world)]
    store.set(f"{_KEYS}/last/{rank}", f"{call} {op}")
    store.set(keys[rank], op)
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except dist.DistStoreError:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        summary = f"every-rank call #{call} ({op}): rank(s) {missing} did not make it within {timeout:g} s"
        error = MissingRanksError(_missing_message(op, store, missing, call, timeout))
    else:
        ops = [store.get(key).decode() for key in keys]
        summary = f"every-rank call #{call}: " + ", ".join(f"rank {r} made {o}" for r, o in enumerate(ops))
        error = None if len(set(ops)) == 1 else MissingRanksError(_mismatch_message(op, summary))
    # a rank that arrives just as another times out: whichever writes the outcome first decides
    outcome = store.compare_set(f"{_KEYS}/call/{call}", "", "ok" if error is None else summary).decode()
    if outcome == "ok":
        return
    ledger.failure = outcome
    store.compare_set(f"{_KEYS}/failure", "", outcome)
    raise error or OutOfStepError(_out_of_step_message(op, outcome))


def _refuse_if_out_of_step(op: str, store: dist.Store, ledger: _CallLedger) -> None:
    if ledger.failure is None and store.check([f"{_KEYS}/failure"]):
        ledger.failure = store.get(f"{_KEYS}/failure").decode()
    if ledger.failure is not None:
        raise OutOfStepError(_out_of_step_message(op, ledger.failure))


def _missing_message(op: str, store: dist.Store, missing: list[int], call: int, timeout: float) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = "; ".join(_progress(store, r) for r in missing)
    return (
        f"{op}: rank(s) {missing} of {world} did not call it within {timeout:g} s (rank {rank} did, as "
        f"its every-rank call #{call}; {progress}). On a TP-sharded model {op} must be called on every "
        f"rank, in the same order as bdlora's other every-rank calls (it gathers or changes sharded "
        f"state); calls on one rank only (e.g. under `if rank == 0`) work on models that are not "
        f"TP-sharded. The wait is {CALL_TIMEOUT_ENV} seconds. From now on {OUT_OF_STEP}."
    )


def _progress(store: dist.Store, rank: int) -> str:
    """How far ``rank`` has got in its every-rank calls, from the key it updates on each."""
    key = f"{_KEYS}/last/{rank}"
    if not store.check([key]):
        return f"rank {rank} has made no every-rank call"
    call, op = store.get(key).decode().split(" ", 1)
    return f"rank {rank}'s last every-rank call is #{call} ({op})"


def _mismatch_message(op: str, summary: str) -> str:
    return (
        f"{op}: the ranks entered different every-rank calls at the same point ({summary}): a rank "
        f"skipped a call or made an extra one (e.g. under `if rank == 0`). On a TP-sharded model "
        f"bdlora's every-rank calls must be made on every rank, in the same order. From now on "
        f"{OUT_OF_STEP}."
    )


def _out_of_step_message(op: str, failure: str) -> str:
    return (
        f"{op}: {OUT_OF_STEP}. An earlier every-rank call failed ({failure}), so the ranks' counts of "
        f"these calls may differ and no later call can be matched across ranks; bdlora refuses them on "
        f"every rank instead of pairing different calls or hanging. Restart all ranks, and make "
        f"bdlora's every-rank calls on every rank in the same order (docs/api.md, 'Which ranks call "
        f"what')."
    )
