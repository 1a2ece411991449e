"""``parallel.engine=deepspeed``: DeepSpeed's ZeRO over the mesh's DP group; bdlora's TP unchanged.

The model is built and ``parallelize``d exactly as for the native engine, except that DP gradient
averaging is left to DeepSpeed (``data_parallel=False``). DeepSpeed may reduce a gradient over DP
as soon as it is ready (ZeRO 2, in its backward hooks, whenever a bucket fills), so the
``replicated`` sharding's whole factors have their partial gradients summed over TP one by one
before they are accumulated (``parallelize``'s ``tp_grad_hooks``), not in the native engine's one
all-reduce after backward, which could come too late. Only the adapter parameters go to
``deepspeed.initialize``, with bdlora's own AdamW and schedule, the mesh as DeepSpeed's
model-parallel unit, and every TP-sharded trainable parameter marked for a TP-aware clip norm
(``bdlora.parallel.deepspeed_mpu``; ``replicated``'s whole factors, equal on every TP rank once
summed, unmarked: counted once).

The DeepSpeed config is derived from the trainer's settings (micro batch, accumulation, clipping)
and merged with ``deepspeed.config`` (the ``deepspeed/`` config group: ``zero1``, ``zero2``,
``zero3``) and ``deepspeed.config_file`` (a JSON or YAML of your own). A value there that
contradicts a trainer setting is an error naming both; so is an ``optimizer`` or ``scheduler``
section, which the trainer's ``optim`` settings decide.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from bdlora.parallel.deepspeed_mpu import MeshMPU, mark_tp_sharded
from bdlora.state import state_of
from bdlora.train.config import TrainConfig, TrainConfigError
from bdlora.train.context import RunContext
from bdlora.train.loop import StepResult, Trainer

OWNED_SECTIONS = {"optimizer": "optim.lr / optim.betas / optim.weight_decay", "scheduler": "optim.schedule"}


def derived_settings(cfg: TrainConfig, dp_size: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key -> (value, the trainer setting that decides it)."""
    micro, accum = cfg.data.micro_batch_size, cfg.optim.grad_accum
    return {
        "train_micro_batch_size_per_gpu": (micro, "data.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "optim.grad_accum"),
        "train_batch_size": (micro * accum * dp_size, "data.micro_batch_size * optim.grad_accum * dp"),
        "gradient_clipping": (max(cfg.optim.max_grad_norm, 0.0), "optim.max_grad_norm"),
    }


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"deepspeed.config_file={path!r}: no such file")
    text = file.read_text()
    data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise TrainConfigError(f"deepspeed.config_file={path!r} holds no mapping of DeepSpeed settings")
    return data


def build_ds_config(cfg: TrainConfig, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's sections, then the trainer's settings, checked for conflicts."""
    user = read_config_file(cfg.deepspeed.config_file) if cfg.deepspeed.config_file else {}
    user = _deep_merge(user, cfg.deepspeed.config)
    for section, decided_by in OWNED_SECTIONS.items():
        if section in user:
            raise TrainConfigError(
                f"the DeepSpeed config has a {section!r} section; the trainer's {decided_by} decide it "
                f"(the same for both engines): remove the section"
            )
    stage = (user.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3 and cfg.parallel.tp > 1:
        # ZeRO 3's hooks hand on a new tensor for every module's output, so a TP block's output is
        # never its row layer's by identity: parallelize's boundary would refuse each block with a
        # message about residuals that does not apply
        raise TrainConfigError(
            f"ZeRO stage 3 (deepspeed=zero3) with parallel.tp={cfg.parallel.tp}: ZeRO 3's hooks replace "
            f"every module's output, so bdlora cannot see a TP block end at its row-parallel layer; use "
            f"deepspeed=zero1 or zero2 at parallel.tp > 1 (ZeRO 3 works at parallel.tp=1)"
        )
    out = {**user, "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    for key, (value, setting) in derived_settings(cfg, dp_size).items():
        if key in user and user[key] != value:
            raise TrainConfigError(
                f"the DeepSpeed config sets {key}={user[key]!r}, but {setting} gives {value!r}; the "
                f"trainer's setting decides it: remove {key} or change {setting}"
            )
        out[key] = value
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def initialize(model: nn.Module, optimizer, scheduler, ctx: RunContext, ds_config: dict[str, Any]):
    """The DeepSpeed engine over the adapter parameters (``ds_config`` from ``build_ds_config``);
    its DP and TP sizes checked against the mesh."""
    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_prebuilt_ops()
    import deepspeed

    _local_rank_for_a_world_of_one()
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    check_no_native_sync(model)
    mark_tp_sharded(model)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=MeshMPU(ctx.mesh),
        config=ds_config,
    )
    check_engine_layout(engine.dp_world_size, engine.mp_world_size, ctx)
    return engine


def check_no_native_sync(model: nn.Module) -> None:
    """The model was ``parallelize``d with ``data_parallel=False``: no native gradient sync after
    backward (DP average, ``replicated``'s bucketed TP sum) that DeepSpeed's would add to or precede."""
    parallel = state_of(model).parallel
    if parallel is not None and (parallel.grads is not None or parallel.tp_grads is not None):
        raise ValueError(
            "the model syncs its gradients natively after backward (parallelize(data_parallel=True)); "
            "under DeepSpeed build it with data_parallel=False"
        )


def use_prebuilt_ops() -> None:
    """DeepSpeed's ops as ``make setup`` compiled them into the environment
    (``<sys.prefix>/torch_extensions``), unless ``TORCH_EXTENSIONS_DIR`` says otherwise: without it
    torch compiles them again into the user's cache (about 30 s). ``launch/deepspeed.sh`` and the
    tests apply the same rule; here it holds for every launcher (torchrun, srun, a plain process)."""
    prebuilt = Path(sys.prefix) / "torch_extensions"
    if not os.environ.get("TORCH_EXTENSIONS_DIR") and prebuilt.is_dir():
        os.environ["TORCH_EXTENSIONS_DIR"] = str(prebuilt)


def _local_rank_for_a_world_of_one() -> None:
    """DeepSpeed's engine asserts that ``LOCAL_RANK`` is set. Every launcher sets it (torchrun, the
    ``deepspeed`` launcher, and ``launcher_env.LaunchEnv.export`` for Slurm and submitit), but a plain
    ``bdlora-train`` process starts a group of one on its own (``mesh.init_distributed``), without it."""
    if "LOCAL_RANK" not in os.environ and dist.get_world_size() == 1:
        os.environ["LOCAL_RANK"] = "0"


def check_engine_layout(dp: int, tp: int, ctx: RunContext) -> None:
    if (dp, tp) != (ctx.dp_size, ctx.tp.size):
        raise TrainConfigError(
            f"DeepSpeed runs at dp={dp} x tp={tp} but the mesh is dp={ctx.dp_size} x tp={ctx.tp.size}: "
            f"it was not given the mesh's groups, and would average different TP shards"
        )


@contextmanager
def full_parameters(engine) -> Iterator[None]:
    """Under ZeRO 3, the trainable parameters gathered whole (every rank enters); else nothing."""
    if engine is None or engine.zero_optimization_stage() < 3:
        yield
        return
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


class DeepSpeedTrainer(Trainer):
    """``Trainer``'s step and eval, with the backward, DP averaging, clipping and AdamW step done
    by the DeepSpeed engine (``engine.step`` steps the optimizer at the accumulation boundary)."""

    def __init__(self, engine, ctx: RunContext, cfg) -> None:
        super().__init__(engine, engine.optimizer, engine.lr_scheduler, ctx, cfg)
        self.engine = engine

    def train_step(self, batches: Iterator, count_comm: bool = False) -> StepResult:
        start = time.perf_counter()
        self.engine.train()
        counter = self._counter(count_comm)
        lr = self.optimizer.param_groups[0]["lr"]
        # counted as in the native step: forward and backward, not the optimizer step (whose clip
        # norm all-reduces one float over TP in both engines)
        with counter or nullcontext():
            micro, per_rank = self.micro_batches(batches)
        total = torch.zeros((), device=self.ctx.device)
        for ids, labels in micro:
            with counter or nullcontext():
                with self._autocast:
                    loss = self.engine(input_ids=ids, labels=labels, num_items_in_batch=per_rank).loss
                self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already the step's mean
            self.engine.step()
            total += loss.detach()
        norm = self.engine.get_global_grad_norm()
        return self._result(total, float(norm or 0.0), lr, micro, start, counter)
