"""Rank-0 metrics: a JSONL file always, a progress bar, and wandb (offline unless asked otherwise)."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from bdlora.train.config import LoggerConfig


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLogger:
    """Writes metrics only where ``enabled`` (rank 0); every method is a no-op elsewhere."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        run_config: dict[str, Any],
        start_step: int = 0,
    ) -> None:
        self.cfg, self.enabled = cfg, enabled
        self._file = self._bar = self._wandb = None
        if not enabled:
            return
        if cfg.jsonl:
            path = run_dir / "metrics.jsonl"
            _drop_records_after(path, start_step)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.wandb.enabled:
            self._wandb = _start_wandb(cfg, run_dir, run_config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self._file:
            self._file.write(json.dumps(record) + "\n")
        if self._wandb:
            self._wandb.log(metrics, step=step)
        if self._bar and "loss" in metrics:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}"
            )

    def advance(self, steps: int = 1) -> None:
        if self._bar:
            self._bar.update(steps)

    def close(self) -> None:
        for handle in (self._bar, self._file):
            if handle:
                handle.close()
        if self._wandb:
            self._wandb.finish()


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: keep one record per step."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _start_wandb(cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any]):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    # the API key is read from the environment by wandb itself and never written to config or logs
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        name=run_dir.name,
        tags=list(cfg.wandb.tags),
        config=run_config,
    )
