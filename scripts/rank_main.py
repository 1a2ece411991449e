"""The body of one torchrun rank, shared by the benchmark scripts."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

Args = TypeVar("Args")


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    """The command running ``script`` on ``nproc`` local ranks (torchrun need not be on PATH)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        script,
        *args,
    ]


def run_rank(body: Callable[[Args], None], args: Args) -> None:
    """``body(args)`` with transformers' deprecation noise off; the process group destroyed after,
    once every rank has finished (a rank tearing gloo down while another still talks to it can
    abort the process: "terminate called without an active exception")."""
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    try:
        body(args)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
