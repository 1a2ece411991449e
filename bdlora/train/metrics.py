"""Rank-0 metrics: a JSONL file always, a progress bar, and wandb (offline unless asked otherwise)."""

from __future__ import annotations

import json
import os
import resource
import secrets
import warnings
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
    """Writes metrics only where ``enabled`` (rank 0); every method is a no-op elsewhere.

    Build it through ``on_all_ranks`` so a failure to open the file or start wandb stops every rank.
    A write that fails later is kept, not raised, until ``raise_failure`` (which the run calls on
    every rank, through ``on_all_ranks``, at each checkpoint and at the end).
    """

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
        self._failure: Exception | None = None
        if not enabled:
            return
        if cfg.jsonl:
            path = run_dir / "metrics.jsonl"
            # a run from step 0 (a new one, or a restart that found no checkpoint) logs step 0 again
            # and every step after it: whatever an earlier start logged goes, as after a resume
            if start_step:
                _drop_records_after(path, start_step)
            self._file = open(path, "a" if start_step else "w", buffering=1)  # noqa: SIM115
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.wandb.enabled:
            self._wandb = _start_wandb(cfg, run_dir, run_config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or self._failure is not None:
            return
        try:
            self._write(step, metrics)
        except Exception as err:  # noqa: BLE001  (raised on every rank by raise_failure)
            self._failure = err

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise OSError(f"writing metrics failed: {self._failure}") from self._failure

    def _write(self, step: int, metrics: dict[str, Any]) -> None:
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
    """A resumed run repeats the steps after its checkpoint: keep one record per step.

    A line that is no record, such as the last one torn by an interrupted write, is dropped with a
    warning: the step it was for is run again.
    """
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept, unreadable = [], []
    for number, line in enumerate(lines, start=1):
        record = _record(line)
        if record is None and line.strip():
            unreadable.append(number)
        elif record is not None and record["step"] <= step:
            kept.append(line)
    if unreadable:
        why = "the last, torn by an interrupted write" if unreadable == [len(lines)] else "not JSON records"
        warnings.warn(f"{path}: dropped line(s) {unreadable} of {len(lines)} on resume ({why})", stacklevel=2)
    path.write_text("".join(f"{line}\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` in order, without lines that are none (a torn last write)."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [record for record in map(_record, lines) if record is not None]


def _record(line: str) -> dict | None:
    """A metrics record, or None for a line that is not one (a torn last write, say)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any]):
    """A wandb run whose id is kept in the run directory: a resumed run continues the same one."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    # the API key is read from the environment by wandb itself and never written to config or logs
    try:
        run = _wandb_init(cfg, run_dir, run_id, run_config)
    except wandb.errors.Error as err:
        raise ValueError(
            f"logger.wandb (mode={cfg.wandb.mode}) could not start: {err} Set WANDB_API_KEY in the "
            f"environment, or use logger.wandb.mode=offline"
        ) from err
    id_file.write_text(run_id)
    return run


def _wandb_init(cfg: LoggerConfig, run_dir: Path, run_id: str, run_config: dict[str, Any]):
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        tags=list(cfg.wandb.tags),
        config=run_config,
    )
