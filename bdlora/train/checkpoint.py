"""Training checkpoints: sharded adapter + optimizer, scheduler, data position, RNG; atomic; keep-last-K.

``checkpoints/step_00000050/`` holds:

==============================  ================================================================
``adapter-tp{i}-of-{t}``        adapter shards (``bdlora.parallel.checkpoint``), one per TP rank
``optim-tp{i}-of-{t}``          AdamW ``exp_avg`` / ``exp_avg_sq`` sharded like their parameters
``trainer_state.json``          step, AdamW step, scheduler, data loader position, the run config
``rng-rank{r}.pt``              every rank's RNG state (restored when the world size matches)
``COMPLETE``                    written last
==============================  ================================================================

Every rank writes into ``.step_00000050.partial``; after a barrier rank 0 writes ``COMPLETE`` and
renames the directory into place, so a crash at any moment leaves only complete checkpoints under
their final names. Optimizer state reshards like the adapter, so a resume may change the TP degree.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdlora.fsutil import write_file_atomic
from bdlora.parallel.checkpoint import (
    factor_items,
    open_shards,
    restore_adapter_,
    save_shard_file,
    save_sharded_adapter,
    unshard,
)
from bdlora.parallel.mesh import on_all_ranks
from bdlora.parallel.styles import take_shard
from bdlora.train.context import RunContext

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


class Checkpointer:
    """Saves and restores everything a resumed run needs to continue bit-for-bit (CPU, fp32)."""

    def __init__(self, ctx: RunContext, keep_last: int = 2, adapter_name: str = "default") -> None:
        self.ctx, self.keep_last, self.adapter = ctx, keep_last, adapter_name
        self.root = ctx.run_dir / "checkpoints"

    # -- save -------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer, scheduler, loader, config: dict) -> Path:
        """Write a checkpoint; each phase ends with every rank agreeing it succeeded everywhere."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.partial"
        on_all_ranks(self._prepare, tmp)
        on_all_ranks(self._write_shards, tmp, step, model, optimizer, scheduler, loader, config)
        on_all_ranks(self._publish, tmp, final, step)
        return final

    def _prepare(self, tmp: Path) -> None:
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            tmp.mkdir(parents=True)

    def _write_shards(self, tmp: Path, step: int, model, optimizer, scheduler, loader, config) -> None:
        writes_shard = self.ctx.dp_rank == 0  # DP replicas hold the same shards
        save_sharded_adapter(model, tmp, self.adapter, write=writes_shard)
        if writes_shard:
            save_shard_file(tmp, "optim", self._moments(model, optimizer), self.ctx.tp.rank, self.ctx.tp.size)
        torch.save(_rng_state(), tmp / f"rng-rank{self.ctx.rank:05d}.pt")
        if self.ctx.is_main:
            state = {
                "step": step,
                "adam_step": _adam_step(optimizer),
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
                "world_size": self.ctx.world_size,
                "tp": self.ctx.tp.size,
                "config": config,
            }
            write_file_atomic(tmp / STATE, lambda p: Path(p).write_text(json.dumps(state, indent=2)))

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        if self.ctx.is_main:
            (tmp / COMPLETE).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()

    def _moments(self, model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
        out = {}
        for key, layer, factor, _ in factor_items(model, self.adapter):
            state = optimizer.state.get(getattr(layer, factor)[self.adapter], {})
            for moment in MOMENTS:
                if moment in state:
                    out[f"{key}.{moment}"] = state[moment]
        return out

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def restore(self, path: Path, model: nn.Module, optimizer, scheduler, loader) -> dict[str, Any]:
        """Load ``path`` into the live objects; returns the saved trainer state."""
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        state = json.loads((path / STATE).read_text())
        restore_adapter_(model, path, self.adapter)
        self._restore_moments(path, state, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        # the scheduler's state holds the lr it last set, but the rebuilt optimizer still has step 0's
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        loader.load_state_dict(state["loader"])
        rng = path / f"rng-rank{self.ctx.rank:05d}.pt"
        if state["world_size"] == self.ctx.world_size and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return state

    @torch.no_grad()
    def _restore_moments(self, path: Path, state: dict, model: nn.Module, optimizer) -> None:
        if state["adam_step"] is None:
            return
        with open_shards(path, "optim", state["tp"]) as shards:
            for key, layer, factor, dim in factor_items(model, self.adapter):
                param = getattr(layer, factor)[self.adapter]
                optimizer.state[param] = {
                    "step": torch.tensor(float(state["adam_step"])),
                    **{
                        m: take_shard(unshard(shards, f"{key}.{m}", dim), dim, self.ctx.tp)
                        .clone()
                        .to(param.device)
                        for m in MOMENTS
                    },
                }


def _adam_step(optimizer) -> float | None:
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
