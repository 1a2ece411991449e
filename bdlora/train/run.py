"""One training run: checks, build, the step loop with eval and checkpoints, the final export."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import yaml

from bdlora.parallel.mesh import on_all_ranks
from bdlora.peft_io import save_adapter
from bdlora.plan import Plan
from bdlora.roles import role_of
from bdlora.state import state_of
from bdlora.train import deepspeed_engine as ds
from bdlora.train.checkpoint import STATE, Checkpointer
from bdlora.train.config import CheckpointConfig, TrainConfig, TrainConfigError, check_layout, plain
from bdlora.train.context import RunContext, build_context
from bdlora.train.data import build_loaders, fit_seq_len
from bdlora.train.loop import StepResult, Trainer, build_optimizer, build_scheduler
from bdlora.train.metrics import MetricsLogger, peak_memory_mb
from bdlora.train.modeling import build_model, hf_config, parallel_layout, resolve_model_dir, tokenizer_for
from bdlora.train.preemption import StoppedBySignal, StopRequests
from bdlora.train.run_lock import run_dir_locked


def run(
    cfg: TrainConfig,
    run_dir: str | None = None,
    overrides: list[str] | None = None,
    hydra_yaml: str | None = None,
) -> float:
    """Train as ``cfg`` says on the already-initialised process group; returns the final eval loss.

    ``run_dir``: this rank's choice of directory, Hydra's resolved output directory (which is
    ``cfg.run_dir`` when set, or ``cfg.run_dir/<job number>`` in a multirun); rank 0's choice is the
    one every rank uses. Without Hydra, ``cfg.run_dir`` or a fresh ``outputs/<run_name>/<stamp>``.
    """
    ctx = build_context(cfg.parallel.tp, cfg.parallel.dp, run_dir or cfg.run_dir, cfg.run_name)
    cfg.run_dir = str(ctx.run_dir)
    with run_dir_locked(ctx.run_dir, ctx.is_main):  # before anything is written; released at any end
        return _run(cfg, ctx, overrides or [], hydra_yaml)


def _run(cfg: TrainConfig, ctx: RunContext, overrides: list[str], hydra_yaml: str | None) -> float:
    """The run, in its locked directory. Its record (``.hydra/``, ``plan.json``) is written once the
    resume checks passed, so a refused start leaves the run it refused as it was."""
    on_all_ranks(check_run_dir, ctx.run_dir, cfg.checkpoint.resume)
    ds_config = None  # a conflicting DeepSpeed setting fails here, before anything is built
    if cfg.parallel.engine == "deepspeed":
        ds_config = on_all_ranks(ds.build_ds_config, cfg, ctx.dp_size)
    adapter = cfg.adapter.build()
    model_dir = on_all_ranks(resolve_model_dir, cfg.model, ctx.is_main)
    tokenizer = tokenizer_for(cfg.model, model_dir)
    model_config = hf_config(cfg.model, model_dir)
    cfg.data.seq_len = fit_seq_len(cfg.data.seq_len, model_config, ctx.print0)
    check_layout(cfg.parallel, cfg.data.seq_len)  # the length fit_seq_len chose must split over TP
    train_loader, eval_loader = on_all_ranks(
        build_loaders,
        cfg.data,
        tokenizer,
        ctx.dp_rank,
        ctx.dp_size,
        model_config,
        cfg.eval_batches * cfg.data.micro_batch_size,
    )
    config_dict = asdict(cfg)
    model, optimizer, scheduler, engine, trainer = _build_training(cfg, adapter, ctx, model_dir, ds_config)
    (adapter_record,) = state_of(model).adapters.values()  # the trainer adds one adapter
    plan = adapter_record.plan
    checkpointer = Checkpointer(ctx, cfg.checkpoint.keep_last, engine=engine)
    check_plan = partial(
        check_resumed_plan,
        tp_plan=cfg.parallel.tp_plan,
        own_plan=model_config.base_model_tp_plan,
        plan=plan,
        deepspeed=engine is not None,
    )
    start = _resume(cfg.checkpoint, checkpointer, check_plan, model, optimizer, scheduler, train_loader, ctx)
    files = _run_config_files(config_dict, overrides, hydra_yaml)
    on_all_ranks(lambda: _write_run_record(ctx, files, plan) if ctx.is_main else None)
    logger = on_all_ranks(MetricsLogger, cfg.logger, ctx.run_dir, cfg.steps, ctx.is_main, config_dict, start)
    evaluate = (lambda: trainer.evaluate(lambda: iter(eval_loader))) if eval_loader else dict
    initial_eval = evaluate() if start == 0 and cfg.eval_every > 0 else {}
    if initial_eval:
        logger.log(0, initial_eval)  # the base model's eval loss: what training must lower
    save = partial(
        checkpointer.save,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=train_loader,
        config=config_dict,
    )
    try:
        first_loss, last = _train_steps(cfg, start, trainer, train_loader, evaluate, logger, save, ctx)
    finally:
        logger.close()
    on_all_ranks(logger.raise_failure)
    evaluated = last is not None and "eval_loss" in last  # the last step evaluated
    final_eval = {k: v for k, v in last.items() if k.startswith("eval_")} if evaluated else evaluate()
    adapter_dir = ctx.run_dir / "adapter"
    export_format = _export_format(cfg.checkpoint.export_format, plan, ctx)
    with ds.full_parameters(engine):
        if ctx.tp.size > 1 or ctx.is_main:  # sharded: every rank gathers; replicated: rank 0 alone saves
            save_adapter(model, adapter_dir, format=export_format)
    session = range(start + 1, cfg.steps + 1)  # the steps this start ran
    summary = (session, first_loss, last, initial_eval, final_eval, checkpointer, adapter_dir, plan.params)
    on_all_ranks(lambda: _print_summary(ctx, *summary) if ctx.is_main else None)
    if engine is not None:
        engine.destroy()  # DeepSpeed's hooks and buffers go before the process group does
    return float(final_eval.get("eval_loss", math.nan))


def _export_format(requested: str, plan, ctx: RunContext) -> str:
    """The run's adapter format: PEFT loads adapters on MoE expert tensors as plain LoRA only."""
    if requested == "peft-bdlora" and any(m.experts for m in plan.modules):
        ctx.print0(
            "note: the adapter adapts MoE expert tensors, which PEFT loads as plain LoRA only: "
            "RUN_DIR/adapter is written as peft-lora (block-diagonal factors expanded, exact); the "
            "checkpoints keep the blocks"
        )
        return "peft-lora"
    return requested


def _train_steps(cfg: TrainConfig, start: int, trainer, loader, evaluate, logger, save, ctx: RunContext):
    """Steps ``start + 1 .. cfg.steps`` with their evals, metrics and checkpoints; returns the first
    step's loss and the last step's metrics. SIGTERM / SIGUSR1 end it after a step, checkpointed."""
    first_loss = last = None
    with StopRequests(ctx.device) as stop:
        for step in range(start + 1, cfg.steps + 1):
            count = step == start + 1 or (cfg.logger.comm_every and step % cfg.logger.comm_every == 0)
            result = trainer.train_step(loader, count_comm=bool(count))
            first_loss = result.loss if first_loss is None else first_loss
            last = {
                **_step_metrics(result, ctx),
                **(evaluate() if _due(step, cfg.eval_every, cfg.steps) else {}),
            }
            if _due(step, cfg.logger.log_every, 0) or "eval_loss" in last:
                logger.log(step, last)
            logger.advance()
            signum = stop.agreed()  # the same on every rank, so all of them save and stop together
            if _due(step, cfg.checkpoint.every, cfg.steps) or signum:
                on_all_ranks(logger.raise_failure)  # a failed metrics write stops every rank here
                saved = save(step)
            if signum:
                raise StoppedBySignal(signum, step, saved)
    return first_loss, last


def _write_run_record(ctx: RunContext, config_files: dict[str, str], plan: Plan) -> None:
    """``.hydra/`` (:func:`_run_config_files`) and ``plan.json``: the resolved per-module adapter
    settings (the pattern config applied)."""
    hydra_dir = ctx.run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name, text in config_files.items():
        (hydra_dir / name).write_text(text)
    (ctx.run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    ctx.print0(f"adapter         {len(plan.modules)} modules, {plan.params:,} parameters (plan.json)")


def _build_training(cfg: TrainConfig, adapter, ctx: RunContext, model_dir, ds_config: dict | None):
    """The model, optimizer, schedule, DeepSpeed engine (None for the native engine) and trainer."""
    deepspeed = ds_config is not None
    model = build_model(
        cfg.model,
        adapter,
        ctx,
        model_dir,
        parallel_layout(cfg.parallel),
        data_parallel=not deepspeed,  # DeepSpeed averages over DP itself
    )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    if not deepspeed:
        return model, optimizer, scheduler, None, Trainer(model, optimizer, scheduler, ctx, cfg.optim)
    engine = on_all_ranks(ds.initialize, model, optimizer, scheduler, ctx, ds_config)
    return model, optimizer, scheduler, engine, ds.DeepSpeedTrainer(engine, ctx, cfg.optim)


def check_run_dir(run_dir: Path, resume: str) -> None:
    """One run, one directory: a new run (``resume=never``) may not start where another one wrote."""
    if resume != "never" or not run_dir.is_dir():
        return
    found = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_OUTPUTS)
    if found:
        raise TrainConfigError(
            f"run directory {run_dir} already holds another run ({', '.join(found)}). Continue that run "
            f"with checkpoint.resume=auto, or start this one in a new directory (run_dir=... or "
            f"hydra.run.dir=...)"
        )


# what a run writes into its directory; any of them there means another run used it
RUN_OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "summary.json")


def _due(step: int, every: int, total: int) -> bool:
    """Step ``total`` always; otherwise every ``every`` steps (0: never)."""
    return step == total or (every > 0 and step % every == 0)


def _resume(
    cfg: CheckpointConfig,
    checkpointer: Checkpointer,
    check_plan: Callable[[Path], None],
    model,
    optimizer,
    scheduler,
    loader,
    ctx: RunContext,
) -> int:
    if cfg.resume == "never":
        return 0
    # verified before anything is read: resume=auto skips damaged checkpoints, a named one must be whole
    path = checkpointer.latest_intact() if cfg.resume == "auto" else checkpointer.verified(Path(cfg.resume))
    if path is None:
        ctx.print0(f"resume=auto: no complete checkpoint under {checkpointer.root}; starting at step 0")
        return 0
    on_all_ranks(check_plan, path)
    state = on_all_ranks(checkpointer.restore, path, model, optimizer, scheduler, loader)
    ctx.print0(f"resumed from {path} at step {state['step']} (saved at tp={state['tp']})")
    return int(state["step"])


def check_resumed_plan(
    checkpoint: Path, tp_plan: dict | None, own_plan: dict | None, plan: Plan, deepspeed: bool
) -> None:
    """A resume may change ``parallel.tp_plan`` where it may change ``parallel.tp``: the native engine
    reshards exactly (the checkpoint records each packed module's segments), while DeepSpeed's ZeRO
    state holds each rank's shards as the saved plan laid them out. A plan that moves an adapted
    module between column and row moves its block-diagonal factor: another adapter, refused like a
    changed ``adapter.*`` setting. ``own_plan``: the model config's, which a null setting means."""
    state = json.loads((checkpoint / STATE).read_text())
    saved_setting = state.get("config", {}).get("parallel", {}).get("tp_plan")
    saved = saved_setting or own_plan
    if saved == (tp_plan or own_plan):
        return
    if deepspeed:
        raise TrainConfigError(
            f"{checkpoint} was saved with parallel.tp_plan={saved_setting!r} (now {tp_plan!r}); a DeepSpeed "
            f"checkpoint holds each rank's shards as its plan laid them out: resume with that plan, or with "
            f"parallel.engine=native (which reshards between plans)"
        )
    moved = []
    for m in plan.modules:  # a pattern's role override and dense factors (nblocks=1) ignore the plan
        was = m.role if m.settings.role is not None or m.global_nblocks == 1 else role_of(m.name, saved)[0]
        if was is not m.role:
            moved.append(f"{m.name} ({was.value} -> {m.role.value})")
    if moved:
        raise TrainConfigError(
            f"{checkpoint} was saved with parallel.tp_plan={saved_setting!r}; the plan now given moves "
            f"{', '.join(moved)}, and with it the block-diagonal factor: that is another adapter. Resume "
            f"with the saved plan, or give these modules their saved role"
        )


def _step_metrics(result: StepResult, ctx: RunContext) -> dict:
    out = {
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": result.tokens / max(result.step_time, 1e-9),
        "step_time": result.step_time,
        "peak_mem_mb": peak_memory_mb(ctx.device),
    }
    for group in ("tp", "dp"):
        if group in result.comm:
            out[f"{group}_collectives"] = result.comm[group]["count"]
            out[f"{group}_bytes"] = result.comm[group]["bytes"]
    return out


def _run_config_files(config: dict, overrides: list[str], hydra_yaml: str | None) -> dict[str, str]:
    """What ``.hydra/`` holds, as Hydra writes it: the resolved config, Hydra's own, the overrides."""
    files = {
        "config.yaml": yaml.safe_dump(plain(config), sort_keys=False),
        "overrides.yaml": yaml.safe_dump(list(overrides)),
    }
    if hydra_yaml is not None:
        files["hydra.yaml"] = hydra_yaml
    return files


def _print_summary(
    ctx: RunContext,
    session: range,
    first_loss,
    last,
    initial_eval,
    final_eval,
    checkpointer,
    adapter_dir,
    plan_params,
) -> None:
    """The run's closing lines, and ``summary.json``: ``final``, the last step's train metrics (None
    if this start ran no step); ``eval``, the final eval. The train loss covers the steps this start
    ran (``session``; from ``first_step`` in the JSON), which for a resumed run the line says."""
    if not ctx.is_main:
        return
    lines = [
        "",
        f"run directory   {ctx.run_dir}",
        f"mesh            dp={ctx.dp_size} x tp={ctx.tp.size} ({ctx.world_size} ranks, {ctx.device.type})",
    ]
    if first_loss is not None:
        steps = f" (steps {session[0]}-{session[-1]}, this session)" if session[0] > 1 else ""
        lines.append(f"train loss      {first_loss:.4f} -> {last['loss']:.4f}{steps}")
    if "eval_loss" in final_eval:
        before = f"{initial_eval['eval_loss']:.4f} -> " if initial_eval else ""
        lines.append(
            f"eval loss       {before}{final_eval['eval_loss']:.4f} (ppl {final_eval['eval_ppl']:.2f})"
        )
    lines += [
        f"checkpoint      {checkpointer.latest()}",
        f"adapter (PEFT)  {adapter_dir}",
        f"metrics         {ctx.run_dir / 'metrics.jsonl'}",
        f"config          {ctx.run_dir / '.hydra' / 'config.yaml'}",
        f"finished        {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    print("\n".join(lines), flush=True)
    (ctx.run_dir / "summary.json").write_text(
        json.dumps(
            {
                "run_dir": str(ctx.run_dir),
                "first_step": session.start if session else None,
                "first_loss": first_loss,
                "final": None if last is None else {k: v for k, v in last.items() if k not in final_eval},
                "eval": final_eval,
                "adapter": str(adapter_dir),
                "adapter_params": plan_params,
            },
            indent=2,
        )
    )
