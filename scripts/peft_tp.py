"""PEFT LoRA under transformers' own tensor parallelism, beside bdlora, on one checkpoint.

Every rank loads the same saved tiny Llama twice, both sharded over the same 2 ranks:

* ``peft``: ``AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto")`` (transformers' TP, from the
  config's ``base_model_tp_plan``) with PEFT LoRA on top (``get_peft_model``);
* ``bdlora``: ``bdlora.from_pretrained(dir, mesh=..., sharding="replicated", adapter_dir=...)``: dense
  LoRA (nblocks 1) in the ``replicated`` layout, the placement PEFT's TP LoRA uses (column layers:
  A whole, B's rows; row layers: A's columns, B whole).

Both hold the factors of one one-process PEFT model (seeded, B drawn nonzero so the adapter changes
the loss), and see the same batch. The script reports the loss and factor gradients of each against
that one-process PEFT model, the TP collectives of one step (``CommCounter``: ``torch.distributed``
and functional collectives, forward / forward+backward), and the step time (forward, backward,
AdamW over the factors; the slowest rank's, median). Two cases: LoRA on all seven projections, and
on the attention's column projections only (q, k, v).

When PEFT or transformers fails (loading, adapting, forward, backward or the optimizer step), the
exception, the traceback's last frames and the versions of torch, transformers and peft are
printed and written to ``--out``, and the script exits 0: the failure is the finding, and a rerun
shows when a release fixes it. A failure of bdlora's side is an error (exit status 1).

    python scripts/peft_tp.py --out peft_tp.json        # launches torchrun itself (2 ranks)
    torchrun --nproc-per-node 2 scripts/peft_tp.py --out peft_tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import peft
import torch
import torch.distributed as dist
import transformers
from bench_tp import launch, launch_command
from benchlib import gather, time_interleaved
from peft import LoraConfig, get_peft_model
from rank_main import run_rank
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from transformers import AutoConfig, AutoModelForCausalLM

import bdlora
from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.parallel.accounting import CommCounter
from bdlora.presets import build_model

CASES = {
    "all": (
        "all 7 projections",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "qkv": ("attention q/k/v (column layers only)", ("q_proj", "k_proj", "v_proj")),
}
PEFT, BDLORA = "peft_tp", "bdlora"
TRANSFORMERS_BASE, BDLORA_BASE = "transformers_base", "bdlora_base"
THEIRS = (PEFT, TRANSFORMERS_BASE)
LABELS = {
    PEFT: "PEFT LoRA on transformers TP",
    BDLORA: "bdlora, replicated, nblocks 1",
    TRANSFORMERS_BASE: "transformers TP base",
    BDLORA_BASE: "bdlora TP base",
}
# fp32 at TP 2: the row layers' partial sums are added in another order than one process's
LOSS_TOL = GRAD_TOL = 1e-5
FRAMES = 10  # the traceback's last frames kept


@dataclass(frozen=True)
class Args:
    tp: int | None
    out: str | None
    model: str
    rank: int
    alpha: float
    batch: int
    seq: int
    steps: int
    warmup: int
    seed: int
    timeout: int


def parse_args(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, default=None, help="without torchrun: launch this many ranks (2)")
    p.add_argument("--out", default=None, help="write the findings here (JSON)")
    p.add_argument("--model", default="tiny-llama", help="a bdlora preset (saved to a temp dir) or a dir")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300, help="seconds a collective may wait")
    return Args(**vars(p.parse_args(argv)))


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bdlora": metadata.version("bdlora"),
        "python": platform.python_version(),
    }


def print0(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


# -- the reference: one process, PEFT ----------------------------------------------------------------
def lora_config(args: Args, targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(targets))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference(model_dir: Path, adapter_dir: Path, args: Args, targets, tokens) -> dict:
    """A one-process PEFT model: seeded A, B drawn N(0, 0.1^2); saved to ``adapter_dir``; its loss
    and factor gradients on ``tokens``."""
    torch.manual_seed(args.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_config(args, targets))
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in sorted(trainable(model).items()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(adapter_dir)
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    factors = {n: p.detach().clone() for n, p in trainable(model).items()}
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    return {"loss": loss.item(), "factors": factors, "grads": grads}


# -- PEFT on transformers' TP --------------------------------------------------------------------------
class Stage:
    """Which step of a side is running, and in which module a forward failed, for the record."""

    def __init__(self, name: str = "start") -> None:
        self.name = name
        self.module: str | None = None
        self.notes: dict = {}

    def __call__(self, name: str) -> None:
        self.name = name

    @contextmanager
    def tracking(self, model: nn.Module) -> Iterator[None]:
        """Inside, a forward that raises leaves ``module``: the innermost module it was in."""
        names = {id(m): n for n, m in model.named_modules()}
        stack: list[str] = []

        def enter(module: nn.Module, args) -> None:
            if id(module) in names:
                stack.append(names[id(module)])

        def leave(module: nn.Module, args, out) -> None:
            if id(module) in names and stack:
                stack.pop()

        hooks = (register_module_forward_pre_hook(enter), register_module_forward_hook(leave))
        try:
            yield
        except Exception:
            self.module = stack[-1] if stack else None
            raise
        finally:
            for hook in hooks:
                hook.remove()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective) or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Each LoRA factor of ``model`` (a DTensor shard or a whole tensor) set from the reference's."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = trainable(model)
    if params.keys() != factors.keys():
        raise RuntimeError(f"PEFT on TP has factors {sorted(params)}, one process {sorted(factors)}")
    with torch.no_grad():
        for name, param in params.items():
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(factors[name], param.device_mesh, param.placements))
            else:
                param.copy_(factors[name])


def load_tp(model_dir: Path) -> nn.Module:
    """transformers' TP model, sharded by the config's ``base_model_tp_plan`` over all ranks."""
    with warnings.catch_warnings():  # "Passing `tp_plan` directly ... is deprecated" (transformers 5.x)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
        except TypeError:  # the keyword removed: its replacement
            from transformers import DistributedConfig

            config = DistributedConfig(tp_plan="auto")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, distributed_config=config, dtype=torch.float32
            )
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()) and getattr(model, "_tp_size", 1) == 1:
        raise RuntimeError("from_pretrained(tp_plan='auto') returned an unsharded model")
    return model


def peft_tp_model(model_dir: Path, args: Args, targets, factors, stage: Stage) -> nn.Module:
    stage("AutoModelForCausalLM.from_pretrained(tp_plan='auto')")
    base = load_tp(model_dir)
    stage("get_peft_model")
    torch.manual_seed(args.seed)
    model = get_peft_model(base, lora_config(args, targets))
    stage.notes["width_mismatches"] = width_mismatches(model)
    stage("copy factors")
    copy_factors(model, factors)
    return model.train()


def width_mismatches(model: nn.Module) -> list[str]:
    """LoRA factors whose ``in_features``/``out_features`` are not their (global) weight's widths:
    transformers' rowwise style reads ``in_features`` as the global input width."""
    from torch.distributed.tensor import DTensor

    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if ".lora_" in name and isinstance(module, nn.Linear) and isinstance(weight, DTensor):
            declared, actual = (module.out_features, module.in_features), tuple(weight.shape)
            if declared != actual:
                out.append(
                    f"{name}: out/in_features {declared}, weight {actual} {weight.placements} "
                    f"(local {tuple(weight.to_local().shape)})"
                )
    return out


def peft_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in trainable(model).items()}


# -- bdlora ---------------------------------------------------------------------------------------------
def bdlora_model(model_dir: Path, adapter_dir: Path, mesh) -> nn.Module:
    return bdlora.from_pretrained(
        model_dir, mesh=mesh, sharding="replicated", adapter_dir=adapter_dir
    ).train()


def bdlora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole factor gradients under PEFT's names (``base_model.model.<module>.lora_A.default.weight``)."""
    out = {}
    for name, layer in bdlora_layers(model):
        if "default" not in layer.lora_A:  # parallelized, not adapted
            continue
        a, b = layer.lora_A["default"].grad, layer.lora_B["default"].grad
        a, b = layer.tp_style.gather_pair(a, b) if layer.tp_style else (a, b)
        out[f"base_model.model.{name}.lora_A.default.weight"] = a
        out[f"base_model.model.{name}.lora_B.default.weight"] = b
    return out


def bdlora_factors(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in bdlora_layers(model) for p in (*layer.lora_A.values(), *layer.lora_B.values())]


# -- one side: loss, gradients, collectives, a step ------------------------------------------------------
def grad_diff(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |difference| of A's and of B's gradients against the one-process model's."""
    if grads.keys() != ref.keys():
        raise RuntimeError(f"gradients of {sorted(grads)} against {sorted(ref)}")
    out = {"lora_A": 0.0, "lora_B": 0.0}
    for name, grad in grads.items():
        kind = "lora_A" if ".lora_A." in name else "lora_B"
        out[kind] = max(out[kind], (grad - ref[name]).abs().max().item())
    return out


def tp_group(model: nn.Module, mesh=None) -> dist.ProcessGroup:
    """The TP process group: of bdlora's ``mesh``, or of transformers' mesh on ``model``."""
    if mesh is None:
        mesh = next(m._device_mesh for m in model.modules() if getattr(m, "_device_mesh", None) is not None)
    names = mesh.mesh_dim_names or ()
    return mesh["tp"].get_group() if "tp" in names and mesh.ndim > 1 else mesh.get_group()


def count_collectives(model: nn.Module, tokens, group: dist.ProcessGroup) -> dict:
    """The TP collectives of one forward and of one forward+backward (``CommCounter``)."""
    empty = {"count": 0, "bytes": 0, "wire_bytes": 0.0, "ops": {}}
    with CommCounter({"tp": group}) as comm:
        loss = model(input_ids=tokens, labels=tokens).loss
        forward = merged(comm.summary(), empty)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": forward, "total": merged(comm.summary(), empty)}


def merged(summary: dict[str, dict], empty: dict) -> dict:
    """Every process group's collectives together (a group not named is counted at world 1)."""
    out = {**empty, "ops": {}}
    for entry in summary.values():
        out["count"] += entry["count"]
        out["bytes"] += entry["bytes"]
        out["wire_bytes"] += entry["wire_bytes"]
        for op, n in entry["ops"].items():
            out["ops"][op] = out["ops"].get(op, 0) + n
    return out


def measure(model: nn.Module, grads_of, tokens, ref: dict, group, stage: Stage) -> dict:
    """Loss and factor gradients of one forward+backward against the reference, then the
    collectives of a second one (counted apart: the counter is not in the first one's way)."""
    stage("forward")
    with stage.tracking(model):
        loss = model(input_ids=tokens, labels=tokens).loss
    stage("backward")
    loss.backward()
    stage("gather gradients")
    diffs = grad_diff(grads_of(model), ref["grads"])
    model.zero_grad(set_to_none=True)
    value = loss.item()
    stage("counted forward+backward")
    comm = count_collectives(model, tokens, group)
    return {
        "loss": value,
        "loss_diff": abs(value - ref["loss"]),
        "grad_diff": diffs,
        "loss_equal": abs(value - ref["loss"]) <= LOSS_TOL,
        "grads_equal": max(diffs.values()) <= GRAD_TOL,
        "comm": comm,
    }


class PeftStepError(Exception):
    """PEFT's or transformers' step failed while being timed (the cause is chained)."""


def make_step(model: nn.Module, params: list[nn.Parameter], tokens, theirs: bool) -> Callable[[], None]:
    """forward + backward + AdamW over ``params`` (none: forward + backward)."""
    # foreach=False: PEFT's factors mix DTensors (the sharded ones) and plain tensors
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False) if params else None

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    def their_step() -> None:
        try:
            step()
        except Exception as err:
            raise PeftStepError(str(err)) from err

    return their_step if theirs else step


def failure(err: BaseException, stage: Stage) -> dict:
    if isinstance(err, PeftStepError) and err.__cause__ is not None:
        err = err.__cause__
    frames = traceback.extract_tb(err.__traceback__)[-FRAMES:]
    return {
        "stage": stage.name,
        "module": stage.module,
        "type": type(err).__name__,
        "message": str(err).strip(),
        "frames": [f"{f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames],
        **stage.notes,
    }


def agreed(results: list[dict], what: str) -> dict:
    """Rank 0's record, after checking that every rank found the same (losses to ``LOSS_TOL``)."""
    first = results[0]
    for rank, other in enumerate(results[1:], 1):
        if first.get("ok") != other.get("ok"):
            first.setdefault("rank_disagreement", []).append(f"rank {rank}: {other}")
            first["ok"] = False  # a step on some ranks only cannot be timed
            first.setdefault("error", other.get("error"))
        elif not first["ok"] and first["error"]["message"] != other["error"]["message"]:
            first["error"].setdefault("other_ranks", {})[rank] = other["error"]["message"]
        elif first["ok"] and "loss" in first and abs(first["loss"] - other["loss"]) > LOSS_TOL:
            raise RuntimeError(f"{what}: rank 0 loss {first['loss']} but rank {rank} {other['loss']}")
    return first


def time_sides(steps: dict[str, Callable[[], None]], records: dict[str, dict], args: Args) -> None:
    """Median step ms (the slowest rank's) into ``records``; a PEFT/transformers step that fails
    while timed is recorded as its failure, and the rest are timed again without it."""
    steps = dict(steps)
    while steps:
        try:
            times = time_interleaved(steps, args.warmup, args.steps, barrier=dist.barrier)
        except PeftStepError as err:
            name = next(n for n in steps if n in THEIRS)  # ours raise anything but PeftStepError
            records[name] = {"ok": False, "error": failure(err, Stage("timed step"))}
            del steps[name]
            continue
        per_rank = gather(times)
        for name in steps:
            slowest = [max(r[name][i] for r in per_rank) for i in range(args.steps)]
            records[name]["step_ms"] = 1e3 * statistics.median(slowest)
        return


# -- the frozen bases: transformers' TP and bdlora's, no adapter -------------------------------------------
def run_bases(args: Args, model_dir: Path, mesh, tokens) -> dict:
    """Forward + backward of each TP base with the embedding trainable (so backward reaches every
    block, as with an adapter in every layer): its collectives and step time."""
    records: dict[str, dict] = {}
    steps: dict[str, Callable[[], None]] = {}
    stage = Stage()
    try:
        theirs = load_tp(model_dir).train()
        theirs.requires_grad_(False)
        theirs.get_input_embeddings().weight.requires_grad_(True)
        stage("counted forward+backward")
        result = {"ok": True, "comm": count_collectives(theirs, tokens, tp_group(theirs))}
        steps[TRANSFORMERS_BASE] = make_step(theirs, [], tokens, theirs=True)
    except Exception as err:  # transformers' failure is a finding
        result = {"ok": False, "error": failure(err, stage)}
    records[TRANSFORMERS_BASE] = agreed(gather(result), "transformers")
    if not records[TRANSFORMERS_BASE]["ok"]:
        steps.pop(TRANSFORMERS_BASE, None)
    ours = bdlora.from_pretrained(model_dir, mesh=mesh, sharding="replicated").train()
    ours.requires_grad_(False)
    ours.get_input_embeddings().weight.requires_grad_(True)
    records[BDLORA_BASE] = {"ok": True, "comm": count_collectives(ours, tokens, tp_group(ours, mesh))}
    steps[BDLORA_BASE] = make_step(ours, [], tokens, theirs=False)
    time_sides(steps, records, args)
    return records


# -- one case --------------------------------------------------------------------------------------------
def run_case(targets, args: Args, model_dir: Path, work: Path, mesh, tokens) -> dict:
    adapter_dir = work / f"adapter_{len(targets)}_{targets[-1]}"
    ref = None
    if dist.get_rank() == 0:
        ref = reference(model_dir, adapter_dir, args, targets, tokens)
    [ref] = broadcast([ref])  # every rank copies the same factors

    stage = Stage()
    steps: dict[str, Callable[[], None]] = {}
    try:
        model = peft_tp_model(model_dir, args, targets, ref["factors"], stage)
        result = {
            "ok": True,
            **measure(model, peft_grads, tokens, ref, tp_group(model), stage),
            **stage.notes,
        }
        stage("optimizer step")
        step = make_step(model, list(trainable(model).values()), tokens, theirs=True)
        step()
        steps[PEFT] = step
    except Exception as err:  # PEFT's or transformers' failure is the finding
        result = {"ok": False, "error": failure(err, stage)}
    records = {PEFT: agreed(gather(result), "PEFT")}
    if not records[PEFT]["ok"]:
        steps.pop(PEFT, None)  # failed here or on another rank

    ours = bdlora_model(model_dir, adapter_dir, mesh)
    result = {"ok": True, **measure(ours, bdlora_grads, tokens, ref, tp_group(ours, mesh), Stage())}
    records[BDLORA] = agreed(gather(result), "bdlora")
    if not (records[BDLORA]["loss_equal"] and records[BDLORA]["grads_equal"]):
        raise RuntimeError(f"bdlora differs from one process: {records[BDLORA]}")
    steps[BDLORA] = make_step(ours, bdlora_factors(ours), tokens, theirs=False)
    time_sides(steps, records, args)
    return {"targets": list(targets), "reference_loss": ref["loss"], **records}


def broadcast(objs: list) -> list:
    dist.broadcast_object_list(objs, src=0)
    return objs


# -- report ----------------------------------------------------------------------------------------------
def fmt_comm(c: dict) -> str:
    fwd, tot = c["forward"], c["total"]
    ops = ", ".join(f"{op} {n}" for op, n in sorted(tot["ops"].items())) or "none"
    return f"{fwd['count']} fwd / {tot['count']} total ({ops}); {tot['bytes'] / 1024:.1f} KiB"


def fmt_ms(rec: dict) -> str:
    return f"{rec['step_ms']:.2f}" if "step_ms" in rec else "-"


def print_failure(name: str, err: dict) -> None:
    where = f" (module {err['module']})" if err.get("module") else ""
    print0(f"{LABELS[name]} failed in {err['stage']}{where}:")
    print0(f"  {err['type']}: {err['message']}")
    print0("  last frames:")
    for frame in err["frames"]:
        print0(f"    {frame}")
    mismatches = err.get("width_mismatches") or []
    if mismatches:
        print0(f"  {len(mismatches)} LoRA factors declare other widths than their weights, e.g.:")
        rowwise = [m for m in mismatches if ".lora_A." in m]  # the ones the rowwise style reads
        print0(f"    {(rowwise or mismatches)[0]}")


def report_case(label: str, case: dict) -> None:
    targets, loss = ", ".join(case["targets"]), case["reference_loss"]
    print0(f"\n{label}: LoRA on {targets}; one-process PEFT loss {loss:.6f}")
    print0("| side | loss | vs one process | max grad diff A / B | TP collectives, fwd / fwd+bwd | step ms |")
    print0("|---|---:|---:|---:|---|---:|")
    for name in (PEFT, BDLORA):
        rec = case[name]
        if not rec["ok"]:
            err = rec["error"]
            print0(f"| {LABELS[name]} | failed in {err['stage']}: {err['type']}: {err['message']} | | | | |")
            continue
        g = rec["grad_diff"]
        print0(
            f"| {LABELS[name]} | {rec['loss']:.6f} | {rec['loss_diff']:.1e} | {g['lora_A']:.1e} / "
            f"{g['lora_B']:.1e} | {fmt_comm(rec['comm'])} | {fmt_ms(rec)} |"
        )
    if not case[PEFT]["ok"]:
        print_failure(PEFT, case[PEFT]["error"])


def report_bases(bases: dict) -> None:
    print0("\nfrozen bases (no adapter; the embedding trainable, so backward reaches every block):")
    print0("| side | TP collectives, fwd / fwd+bwd | step ms |")
    print0("|---|---|---:|")
    for name, rec in bases.items():
        if rec["ok"]:
            print0(f"| {LABELS[name]} | {fmt_comm(rec['comm'])} | {fmt_ms(rec)} |")
        else:
            print0(f"| {LABELS[name]} | failed: {rec['error']['type']}: {rec['error']['message']} | |")
    for name, rec in bases.items():
        if not rec["ok"]:
            print_failure(name, rec["error"])


def run(args: Args) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    world = dist.get_world_size()
    torch.set_num_threads(1)
    if args.tp is not None and args.tp != world:
        raise SystemExit(f"--tp {args.tp} but torchrun started {world} ranks; drop --tp or match them")
    mesh = build_mesh(ParallelDims(world, tp=world))
    found = {
        "command": launch_command(),
        "versions": versions(),
        "ranks": world,
        "backend": "gloo, CPU, 1 thread per rank, fp32",
        "model": args.model,
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0},
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "tolerance": {"loss": LOSS_TOL, "grad": GRAD_TOL},
    }
    print0("$ " + found["command"])
    print0(", ".join(f"{k} {v}" for k, v in found["versions"].items()) + f"; gloo, CPU, {world} ranks")
    print0(
        f"model {args.model}; batch {args.batch} x {args.seq} tokens; LoRA r={args.rank} alpha={args.alpha}; "
        f"step times: median of {args.steps} (after {args.warmup}), the slowest rank's"
    )
    with tempfile.TemporaryDirectory(prefix="peft_tp_") as tmp:
        [work] = broadcast([tmp])  # rank 0's directory: the ranks share one filesystem
        work = Path(work)
        model_dir = Path(args.model) if Path(args.model).is_dir() else work / "model"
        if dist.get_rank() == 0 and model_dir == work / "model":
            build_model(args.model, seed=args.seed).save_pretrained(model_dir)
        dist.barrier()
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        tokens = torch.randint(
            vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed)
        )
        found["cases"] = {}
        for key, (label, targets) in CASES.items():
            found["cases"][key] = {"label": label, **run_case(targets, args, model_dir, work, mesh, tokens)}
            report_case(label, found["cases"][key])
        found["bases"] = run_bases(args, model_dir, mesh, tokens)
        report_bases(found["bases"])
        dist.barrier()  # rank 0 keeps the directory until every rank is done with it
    found["peft_tp_works"] = {
        key: case[PEFT]["ok"] and case[PEFT]["loss_equal"] and case[PEFT]["grads_equal"]
        for key, case in found["cases"].items()
    }
    found["peft_tp_errors"] = {
        key: f"{err['type']}: {err['message']}"
        for key, case in found["cases"].items()
        if (err := case[PEFT].get("error"))
    }
    print0(f"\nPEFT on transformers' TP matches one process (loss and gradients): {found['peft_tp_works']}")
    if args.out and dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(found, indent=1) + "\n")
        print(f"findings written to {args.out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(argv, args.tp or 2, script=__file__))
    run_rank(run, args)


if __name__ == "__main__":
    main()
