"""Which launcher started this process, and the rank, world size and rendezvous it implies.

Three launchers start bdlora's ranks:

=================  ==========================================  =====================================
launcher           rank / world size / local rank              rendezvous
=================  ==========================================  =====================================
torchrun           ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``  ``MASTER_ADDR``:``MASTER_PORT``
``srun`` (Slurm)   ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``  first node of ``SLURM_STEP_NODELIST``,
                   / ``SLURM_LOCALID``                         port from the job id
submitit (local)   ``SUBMITIT_LOCAL_GLOBALID`` / ``..._NTASKS``  127.0.0.1, port from the job id
                   / ``..._LOCALID``
=================  ==========================================  =====================================

torchrun's variables win when present (``srun torchrun ...`` sets both). A Slurm allocation with one
task per step (``sbatch`` running ``python`` directly, an ``salloc`` shell) is a world of one.
``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment are kept, so a job can pin its port.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known
# and registered services most clusters run, below Linux's default ephemeral range (32768+).
PORT_BASE = 15000
PORT_SPAN = 15000


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in the job, as its launcher described it."""

    launcher: str  # "torchrun", "slurm", "submitit-local" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def export(self) -> None:
        """Write torchrun's variables, so ``init_process_group("env://")`` and tools that read
        ``LOCAL_RANK`` see one convention whichever launcher ran."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def port_for_job(job_id: str) -> int:
    """A rendezvous port fixed by the job id: every rank of a job computes the same one, and two
    jobs on one node (consecutive ids) get different ones."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"job id {job_id!r} has no digits to derive a rendezvous port from")
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match or not nodelist:
        raise ValueError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _env_int(env: dict[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


def _rendezvous(env: dict[str, str], addr: str, job_id: str) -> tuple[str, int]:
    if "MASTER_PORT" in env:
        return env.get("MASTER_ADDR", addr), _env_int(env, "MASTER_PORT")
    return env.get("MASTER_ADDR", addr), port_for_job(job_id)


def detect(env: dict[str, str] | None = None) -> LaunchEnv:
    """This process's launcher and place in the job (see the module table)."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            "torchrun",
            _env_int(env, "RANK"),
            _env_int(env, "WORLD_SIZE"),
            int(env.get("LOCAL_RANK", "0")),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
        )
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 and "SUBMITIT_LOCAL_GLOBALID" in env:
        addr, port = _rendezvous(env, "127.0.0.1", env["SUBMITIT_LOCAL_JOB_ID"])
        return LaunchEnv(
            "submitit-local",
            _env_int(env, "SUBMITIT_LOCAL_GLOBALID"),
            _env_int(env, "SUBMITIT_LOCAL_NTASKS"),
            _env_int(env, "SUBMITIT_LOCAL_LOCALID"),
            addr,
            port,
        )
    tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
    if int(tasks) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        addr, port = _rendezvous(env, first_host(nodes), env["SLURM_JOB_ID"])
        return LaunchEnv(
            "slurm",
            _env_int(env, "SLURM_PROCID"),
            int(tasks),
            _env_int(env, "SLURM_LOCALID"),
            addr,
            port,
        )
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", 0)
