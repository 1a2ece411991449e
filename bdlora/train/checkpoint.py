"""Training checkpoints: sharded adapter + optimizer, scheduler, data position, RNG; atomic; keep-last-K.

``checkpoints/step_00000050/`` holds:

==============================  ================================================================
``adapter-tp{i}-of-{t}``        adapter shards (``bdlora.parallel.checkpoint``), one per TP rank
``optim-tp{i}-of-{t}``          AdamW ``exp_avg`` / ``exp_avg_sq`` sharded like their parameters
``deepspeed/``                  DeepSpeed's own checkpoint (``parallel.engine=deepspeed`` only)
``trainer_state.json``          step, AdamW step, scheduler, data loader position, the run config
``rng-rank{r}.safetensors``     every rank's torch (and CUDA) RNG state, with Python's ``random``
                                state as JSON in its metadata (restored when the world size matches)
``MANIFEST.json``               size and SHA-256 of every file above
``COMPLETE``                    written last
==============================  ================================================================

Every rank writes into ``.step_00000050.partial``; after a barrier rank 0 writes ``MANIFEST.json``
and ``COMPLETE`` and renames the directory into place, so a crash at any moment leaves only complete
checkpoints under their final names. Optimizer state reshards like the adapter, so a resume may
change the TP degree. DeepSpeed runs write the same files (their moments gathered from ZeRO's
partitions) beside ``deepspeed/``: the native engine resumes them at any layout; DeepSpeed itself
reads ``deepspeed/``, at the layout it was saved at.

A checkpoint is read only after :func:`verify_checkpoint` found every file as its manifest lists it
and nothing else beside them: a truncated shard or a file dropped in later (say a pickle) is refused
before anything is loaded, and :func:`newest_intact` falls back to an older checkpoint. Nothing is
ever unpickled: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bdlora.fsutil import write_file_atomic
from bdlora.parallel.checkpoint import (
    FACTORS,
    adapter_layers,
    full_factors,
    open_shards,
    read_shard_meta,
    restore_adapter_,
    save_shard_file,
    save_sharded_adapter,
    saved_layout,
)
from bdlora.parallel.comm import broadcast_object
from bdlora.parallel.mesh import on_all_ranks
from bdlora.parallel.styles import sharding_class
from bdlora.train.context import RunContext
from bdlora.train.deepspeed_engine import full_parameters

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
DEEPSPEED_TAG = "deepspeed"


PYTHON_RNG = "python_random"  # the safetensors metadata key of ``random.getstate()``, as JSON


class CheckpointDamaged(ValueError):
    """A checkpoint whose files differ from its manifest (or that has none): it is never loaded."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.safetensors"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


# -- manifest -------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, ``/``-separated) but the two written after the list."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in (MANIFEST, COMPLETE))


def write_manifest(directory: Path) -> Path:
    """Write ``MANIFEST.json``: relative name -> ``{"size": bytes, "sha256": hex}`` for every file."""
    directory = Path(directory)
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in _listed_files(directory)
    }
    text = json.dumps({"files": files}, indent=2)
    return write_file_atomic(directory / MANIFEST, lambda p: Path(p).write_text(text))


def _read_manifest(directory: Path) -> dict[str, dict]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointDamaged(
            f"{directory}: no {MANIFEST}, so its files cannot be verified (damaged, or written by a "
            "bdlora older than manifests); it is not loaded"
        )
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()):
            raise TypeError("an entry without an integer size and a string sha256")
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name in files):
            raise ValueError("a name outside the checkpoint directory")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointDamaged(f"{directory}: {MANIFEST} is not a valid manifest ({err})") from None
    return files


def _file_damage(directory: Path, name: str, entry: dict) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{name}: size differs (expected {entry['size']} bytes, found {size})"
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        return f"{name}: checksum differs (sha256 {digest[:16]}..., expected {entry['sha256'][:16]}...)"
    return None


def verify_checkpoint(directory: Path) -> None:
    """Raise :class:`CheckpointDamaged` naming every file that is missing, resized, altered or unlisted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    if not (directory / COMPLETE).is_file():
        raise CheckpointDamaged(
            f"{directory}: no {COMPLETE} marker (removed: a save is renamed into place with it)"
        )
    listed = _read_manifest(directory)
    damage = [d for name, entry in listed.items() if (d := _file_damage(directory, name, entry))]
    damage += [
        f"{name}: not in {MANIFEST} (added after the checkpoint was saved; never loaded)"
        for name in _listed_files(directory)
        if name not in listed
    ]
    if damage:
        raise CheckpointDamaged(f"{directory}: " + "; ".join(damage))


def newest_intact(root: Path, report: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under ``root`` that verifies, None if there is none at all.

    ``report`` hears of every newer one skipped as damaged, and of the fallback. Checkpoints of
    which none verifies are an error naming the run and the newest one's damage.
    """
    # every published step: a step_* directory lacks COMPLETE only if the marker was removed (saves
    # go to a .partial directory, renamed into place with COMPLETE in it), so it counts as damage
    found = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    newest_damage = None
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as err:
            newest_damage = newest_damage or err
            report(f"skipping damaged checkpoint {err}")
            continue
        if newest_damage is not None:
            report(f"falling back to {path.name}, the newest checkpoint that verifies")
        return path
    if newest_damage is not None:
        raise CheckpointDamaged(
            f"run {root.parent}: none of its {len(found)} checkpoints verifies; the newest, "
            f"{newest_damage}. Restore the damaged files, or move checkpoints/ aside to start over"
        )
    return None


class Checkpointer:
    """Saves and restores everything a resumed run needs to continue bit-for-bit (CPU, fp32)."""

    def __init__(
        self, ctx: RunContext, keep_last: int = 2, adapter_name: str = "default", engine=None
    ) -> None:
        """``engine``: a DeepSpeed engine, whose own checkpoint (adapter and partitioned optimizer
        state, frozen base excluded) goes into ``deepspeed/`` beside bdlora's files."""
        self.ctx, self.keep_last, self.adapter, self.engine = ctx, keep_last, adapter_name, engine
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
        if self.engine is not None:
            self.engine.save_checkpoint(
                tmp, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True
            )
        with full_parameters(self.engine):  # the adapter shards bdlora reads back, and export reads
            save_sharded_adapter(model, tmp, self.adapter, write=writes_shard)
        moments = self._moments(model, optimizer)  # every rank: DeepSpeed gathers them over DP
        if writes_shard:
            save_shard_file(tmp, "optim", moments, self.ctx.tp.rank, self.ctx.tp.size)
        _save_rng_state(tmp / rng_file_name(self.ctx.rank))
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
            write_manifest(tmp)  # every rank's files are in: the previous phase ended in agreement
            (tmp / COMPLETE).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()

    def _moments(self, model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
        """This TP rank's AdamW moments, each shaped like its parameter (shard)."""
        out = {}
        for name, layer in adapter_layers(model, self.adapter):
            for factor in FACTORS:
                param = getattr(layer, factor)[self.adapter]
                for moment in MOMENTS:
                    value = _deepspeed_moment(param, moment) if self.engine is not None else None
                    if value is None:  # the native engine, or DeepSpeed without ZeRO: torch's AdamW
                        value = optimizer.state.get(param, {}).get(moment)
                    if value is not None:
                        out[f"{name}.{factor}.{moment}"] = value
        return out

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def latest_intact(self) -> Path | None:
        """The newest checkpoint that verifies (:func:`newest_intact`), rank 0's choice on every rank."""
        choice = on_all_ranks(self._on_main, newest_intact, self.root, self._report)
        choice = broadcast_object(None if choice is None else str(choice), src=0)
        return None if choice is None else Path(choice)

    def verified(self, path: Path) -> Path:
        """``path``, once rank 0 has verified it; a damaged checkpoint raises on every rank."""
        on_all_ranks(self._on_main, verify_checkpoint, path)
        return path

    def _on_main(self, fn: Callable, *args):
        """``fn`` read from one rank only, so that every rank acts on the same answer."""
        return fn(*args) if self.ctx.is_main else None

    def _report(self, message: str) -> None:
        self.ctx.print0(f"resume=auto: {message}")

    def restore(self, path: Path, model: nn.Module, optimizer, scheduler, loader) -> dict[str, Any]:
        """Load ``path`` into the live objects; returns the saved trainer state."""
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        state = json.loads((path / STATE).read_text())
        if self.engine is not None:
            self._restore_engine(path, state)
        else:
            restore_adapter_(model, path, self.adapter)
            self._restore_moments(path, state, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        if getattr(scheduler, "steps_change", None):
            self.ctx.print0(scheduler.steps_change)
        # the scheduler's state holds the lr it last set, but the rebuilt optimizer still has step 0's
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        loader.load_state_dict(state["loader"])
        rng = path / rng_file_name(self.ctx.rank)
        if state["world_size"] == self.ctx.world_size and rng.is_file():
            _load_rng_state(rng)
        return state

    def _restore_engine(self, path: Path, state: dict) -> None:
        """DeepSpeed's checkpoint: the adapter and its partitioned optimizer state, same layout only."""
        if not (path / DEEPSPEED_TAG).is_dir():
            raise CheckpointDamaged(
                f"{path} was written by the native engine (no {DEEPSPEED_TAG}/); resume it with "
                "parallel.engine=native, or export its adapter and start a new DeepSpeed run"
            )
        saved = (state["world_size"], state["tp"])
        if saved != (self.ctx.world_size, self.ctx.tp.size):
            raise ValueError(
                f"{path}: a DeepSpeed checkpoint resumes at the layout it was saved at (world size "
                f"{saved[0]}, tp={saved[1]}; now {self.ctx.world_size}, tp={self.ctx.tp.size}) because ZeRO "
                "partitions the optimizer state by it; resume with that layout, or with the native engine "
                "(parallel.engine=native resumes the adapter and its AdamW moments at any TP degree)"
            )
        self.engine.load_checkpoint(
            path, tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
        )

    @torch.no_grad()
    def _restore_moments(self, path: Path, state: dict, model: nn.Module, optimizer) -> None:
        if state["adam_step"] is None:
            return
        if (path / DEEPSPEED_TAG).is_dir() and not list(path.glob("optim-tp*.safetensors")):
            self.ctx.print0(
                f"warning: {path} is a DeepSpeed checkpoint without bdlora's optim-tp* files (saved "
                "before they were written): its adapter, step, data position and RNG resume; AdamW's "
                "moments and step count start again from zero"
            )
            return
        meta = read_shard_meta(path)
        sharding = sharding_class(meta["sharding"])
        step = torch.tensor(float(state["adam_step"]))
        with open_shards(path, "optim", state["tp"]) as shards:
            for name, layer in adapter_layers(model, self.adapter):
                layout = saved_layout(meta, name, layer)
                moments = {m: full_factors(shards, name, layout, sharding, f".{m}") for m in MOMENTS}
                if layer.tp_style is not None:
                    moments = {m: layer.tp_style.shard_factors(layer, *ab) for m, ab in moments.items()}
                for i, factor in enumerate(FACTORS):
                    param = getattr(layer, factor)[self.adapter]
                    optimizer.state[param] = {
                        "step": step.clone(),
                        **{m: ab[i].to(param.device, param.dtype, copy=True) for m, ab in moments.items()},
                    }


def _deepspeed_moment(param: nn.Parameter, moment: str) -> torch.Tensor | None:
    """``param``'s whole AdamW ``moment`` from ZeRO's partitions (a collective over DP; every DP rank
    calls it for the same parameters in the same order); None without ZeRO."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, moment)


def _adam_step(optimizer) -> float | None:
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def _save_rng_state(path: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss_next = random.getstate()
    metadata = {PYTHON_RNG: json.dumps([version, list(internal), gauss_next])}
    write_file_atomic(path, lambda p: save_file(tensors, p, metadata=metadata))


def _load_rng_state(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        torch.set_rng_state(f.get_tensor("torch"))
        if "cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("cuda"))
        version, internal, gauss_next = json.loads(f.metadata()[PYTHON_RNG])
    random.setstate((version, tuple(internal), gauss_next))
