"""Per-rank memory of BD-LoRA training at each TP degree, beside the unsharded model (TP 1) and
beside what ``bdlora.memory.memory_plan`` plans for the same rank.

The launcher saves a seeded Llama (``bench_loading.save_model``) and starts one torchrun job per TP
degree (``python -m torch.distributed.run``, gloo, CPU, one thread per rank). Each rank:

1. loads the saved model with ``bdlora.from_pretrained`` and records its peak RSS increase
   (``bench_loading.measure_load``; that load's fresh adapter has nblocks = TP, bench_loading's own
   convention, and the replicated layout), then frees it;
2. for each ``--layout``, builds the same Llama, shards it (``parallelize``) and adds BD-LoRA on q,
   k, v, o, gate, up and down (rank R, nblocks N, global); counts its frozen (base) and trainable
   (adapter) parameter bytes, the gradient bytes after one backward and the AdamW state after one
   step;
3. counts the bytes autograd saves for backward during one training forward
   (``benchlib.SavedTensors``: activations, and apart from them the parameters it saves);
4. reports the peak RSS increase over one more training step (VmHWM after resetting it through
   ``/proc/self/clear_refs``, minus RSS before the step).

    python scripts/bench_memory.py                     # TP 1, 2, 4, replicated: ~60 s on 2 cores
    python scripts/bench_memory.py --layout replicated vocab sequence   # the three layouts: ~70 s
    python scripts/bench_memory.py --layout replicated vocab sequence --mmap-threshold 65536
    python scripts/bench_memory.py --tp 2 --hidden 1024 --json memory.json

The first table is MiB on that rank, with its ratio to the unsharded model's in parentheses. TP 1
always runs, as the reference, once: vocabulary and sequence parallelism change nothing at TP 1. At
TP t the adapter, its gradients and its optimizer state should be 1/t of the unsharded ones
(BD-LoRA shards exactly), and the base weights 1/t of every sharded linear plus the embeddings,
norms and lm_head (replicated, or ``ceil(V/t)`` rows each with vocabulary parallelism).

The second table sets the plan (``bdlora plan --memory``, docs/memory.md) beside each measured
row: every byte count with its ratio planned / measured, then the plan's total against the step's
peak RSS increase and against the measured peak (that increase plus the weights, adapter and AdamW
state already resident). glibc keeps freed blocks in its heap, so by default the RSS increase reads
the heap's high-water mark; ``--mmap-threshold 65536`` has every block of 64 KiB or more returned
to the kernel when it is freed, and the increase then follows the live tensor bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import bench_loading
import benchlib
import torch
import torch.distributed as dist
from benchlib import MiB, ModelArgs
from rank_main import run_rank
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bdlora import memory
from bdlora.config import BDLoraConfigError
from bdlora.memory import MemoryPlan, memory_plan
from bdlora.parallel import ParallelDims, build_mesh, init_distributed
from bdlora.plan import resolve_plan

# (key in a rank's result, column title)
FIELDS = (
    ("base", "base weights"),
    ("adapter", "adapter"),
    ("optimizer", "AdamW state"),
    ("grads", "grads"),
    ("activations", "saved activations"),
    ("saved_params", "saved params*"),
    ("step_peak", "step peak RSS"),
    ("loading_peak", "loading peak RSS"),
)
# --layout name: its column title in bdlora.memory.LAYOUTS
LAYOUTS = {"replicated": "replicated", "vocab": "+ vocab parallel", "sequence": "+ vocab + sequence parallel"}
# (key in a rank's result, key in the plan's numbers, column title) of the planned-vs-measured table
COMPARED = (
    ("base", "base", "base weights"),
    ("adapter", "adapter", "adapter"),
    ("optimizer", "optimizer", "AdamW state"),
    ("grads", "grads", "grads"),
    ("activations", "saved_activations", "saved activations"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP degrees, one torchrun each")
    p.add_argument(
        "--layout",
        nargs="+",
        choices=list(LAYOUTS),
        default=["replicated"],
        help="layouts measured at every TP degree > 1: replicated embedding and LM head, vocab "
        "(vocab_parallel=True), sequence (vocab_parallel and sequence_parallel)",
    )
    benchlib.add_model_args(p, hidden=512, intermediate=1376, layers=4, vocab=4096, batch=4)
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="start the ranks with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: every block that large is "
        "returned to the kernel as soon as it is freed, so the step peak RSS follows the live tensor "
        "bytes rather than the heap's high-water mark (docs/memory.md)",
    )
    p.add_argument("--json", default=None, help="write the rows (bytes) to this file")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


# -- one rank ------------------------------------------------------------------------------------
def step_peak_rss(step: Callable[[], None]) -> int:
    """Peak RSS during ``step`` minus RSS before it, after the allocator returned its free pages."""
    benchlib.release_free_memory()
    if not bench_loading.reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM via /proc/self/clear_refs; the peak would be meaningless")
    before = bench_loading.proc_status()["VmRSS"]
    step()
    return bench_loading.proc_status()["VmHWM"] - before


def training_memory(model: nn.Module, tokens: torch.Tensor) -> dict[str, int]:
    """Parameter, gradient, optimizer-state and saved-tensor bytes, and one step's peak RSS."""
    step, optimizer = benchlib.make_train_step(model, tokens)
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = benchlib.grad_bytes(model)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    saved = benchlib.saved_bytes(model, tokens)
    return {
        **benchlib.param_bytes(model),
        "grads": grads,
        "optimizer": benchlib.optimizer_state_bytes(optimizer),
        "activations": saved.activation_bytes,
        "saved_params": saved.parameter_bytes,
        "step_peak": step_peak_rss(step),
    }


def measure_rank(m: ModelArgs, mesh: DeviceMesh, model_dir: Path, layouts: list[str]) -> list[dict]:
    """One row per layout; the loading peak (of the replicated layout) is measured once."""
    bench_loading.warm_up(model_dir)
    dist.barrier()
    loading_peak = bench_loading.measure_load(model_dir, m.rank, mesh)["peak_delta"]
    benchlib.release_free_memory()
    rows = []
    for name in layouts:
        layout = memory.LAYOUTS[LAYOUTS[name]]
        model = benchlib.build_llama(
            m, mesh, adapter=True, vocab_parallel=layout.vocab_parallel,
            sequence_parallel=layout.sequence_parallel,
        )  # fmt: skip
        rows.append(
            {"layout": name, "loading_peak": loading_peak, **training_memory(model, benchlib.token_batch(m))}
        )
        del model
    return rows


def run_worker(args: argparse.Namespace) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    mesh = build_mesh(ParallelDims(world, tp=world))
    result = measure_rank(benchlib.model_args(args), mesh, Path(args.model_dir), args.layout)
    by_rank = benchlib.gather([{"tp": world, "rank": dist.get_rank(), **row} for row in result])
    benchlib.write_rank0(args.worker_result, [row for layout in zip(*by_rank) for row in layout])


# -- launcher ------------------------------------------------------------------------------------
def save_model(m: ModelArgs, model_dir: Path) -> None:
    """The model every rank loads, saved by bench_loading (the same ``llama_config`` sizes)."""
    sizes = {k: getattr(m, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "rank", "seed")}
    bench_loading.save_model(
        bench_loading.BenchArgs(tp=[], model_dir=None, worker_result=None, **sizes), model_dir
    )


def layouts_at(tp: int, layouts: list[str]) -> list[str]:
    """At TP 1 every layout is the replicated model: it runs once."""
    return ["replicated"] if tp == 1 else layouts


def measure(m: ModelArgs, tps: list[int], layouts: list[str], mmap_threshold: int | None) -> list[dict]:
    """Every rank's row at every TP degree (TP 1 first, added when missing) and layout."""
    env = {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        model_dir = Path(tmp) / "model"
        save_model(m, model_dir)
        for tp in sorted({1, *tps}):
            argv = [*benchlib.model_argv(m), f"--model-dir={model_dir}", "--layout", *layouts_at(tp, layouts)]
            rows += benchlib.run_torchrun(__file__, tp, argv, Path(tmp) / f"tp{tp}.json", env)
    return rows


def plan_for(m: ModelArgs, tp: int, layout: str) -> MemoryPlan:
    """``memory_plan`` of the model and adapter every rank builds (fp32, no checkpointing)."""
    with torch.device("meta"):
        model = benchlib.llama(m)
    flags = memory.LAYOUTS[LAYOUTS[layout]]
    return memory_plan(
        model, resolve_plan(model, benchlib.adapter_config(m)), tp, seq_len=m.seq, micro_batch=m.batch,
        dtype=torch.float32, vocab_parallel=flags.vocab_parallel, sequence_parallel=flags.sequence_parallel,
    )  # fmt: skip


def planned_numbers(
    m: ModelArgs, tps: list[int], layouts: list[str]
) -> dict[tuple[int, str], dict[str, int]]:
    """The plan's bytes by (TP degree, layout); raises before any job starts if a layout cannot run."""
    out = {}
    for tp in sorted({1, *tps}):
        for layout in layouts_at(tp, layouts):
            p = plan_for(m, tp, layout)
            out[tp, layout] = {
                "base": p.base_weights,
                "adapter": p.adapter,
                "optimizer": p.optimizer,
                "grads": p.grads,
                "saved_activations": p.saved_activations,
                "step": p.grads + p.activation_peak("layers") + p.activation_peak("logits"),
                "total": p.total,
            }
    return out


def cell(value: int, unsharded: int) -> str:
    ratio = f"{value / unsharded:.2f}" if unsharded else "-"
    return f"{value / MiB:.2f} ({ratio})"


def print_tables(
    m: ModelArgs, rows: list[dict], plans: dict[tuple[int, str], dict[str, int]], mmap_threshold: int | None
) -> None:
    malloc = "glibc malloc defaults" if mmap_threshold is None else f"MALLOC_MMAP_THRESHOLD_={mmap_threshold}"
    print(
        f"torch {torch.__version__}, gloo, CPU, 1 thread per rank, fp32, {malloc}; llama hidden={m.hidden} "
        f"intermediate={m.intermediate} layers={m.layers} heads={m.heads} vocab={m.vocab}; "
        f"batch={m.batch} seq={m.seq}; BD-LoRA on q,k,v,o,gate,up,down rank={m.rank} nblocks={m.nblocks}"
    )
    print_measured(rows)
    print()
    print_planned(rows, plans)


def print_measured(rows: list[dict]) -> None:
    unsharded = next(r for r in rows if r["tp"] == 1)
    columns = ["tp", "layout", "rank", *(f"{title} MiB (x TP 1)" for _, title in FIELDS)]
    cells = [
        [r["tp"], r["layout"], r["rank"], *(cell(r[key], unsharded[key]) for key, _ in FIELDS)] for r in rows
    ]
    print(benchlib.markdown_table(columns, cells))
    print(
        "* saved params: parameter storages autograd saves (frozen weights, for the input gradient); "
        "already counted in base weights and adapter, so not added by the forward; AdamW state is "
        "2 x adapter plus a 4-byte step count per factor, on every rank. Loading peak RSS: "
        "from_pretrained in the replicated layout, once per rank (repeated in each layout's row). "
        "TP 1 runs once: vocabulary and sequence parallelism change nothing there"
    )
    for (tp, layout), ranks in groups(rows).items():
        for key in ("adapter", "grads") if tp > 1 else ():
            total = sum(r[key] for r in ranks)
            verdict = "==" if total == unsharded[key] else "!="
            where = f"tp {tp} {layout}: {key} summed over ranks"
            print(f"{where} {total:,} B {verdict} unsharded {unsharded[key]:,} B")


def print_planned(rows: list[dict], plans: dict[tuple[int, str], dict[str, int]]) -> None:
    """Each row's plan beside it; the plan's total against the measured peak."""
    columns = [
        "tp", "layout", "rank", *(f"{title} planned MiB (/ measured)" for *_, title in COMPARED),
        "plan total MiB", "step peak RSS MiB", "plan total / step peak RSS", "measured peak MiB",
        "plan total / measured peak",
    ]  # fmt: skip
    cells, exact, saved, ratios = [], [], [], {"rss": [], "peak": [], "step": []}
    for r in rows:
        plan = plans[r["tp"], r["layout"]]
        exact += [plan[p] == r[k] for k, p, _ in COMPARED if k != "activations"]
        saved.append(plan["saved_activations"] / r["activations"])
        peak = r["base"] + r["adapter"] + r["optimizer"] + r["step_peak"]
        ratios["rss"].append(plan["total"] / r["step_peak"])
        ratios["peak"].append(plan["total"] / peak)
        ratios["step"].append(plan["step"] / r["step_peak"])
        cells.append([
            r["tp"], r["layout"], r["rank"],
            *(f"{plan[p] / MiB:.2f} ({plan[p] / r[k]:.4f})" for k, p, _ in COMPARED),
            f"{plan['total'] / MiB:.2f}", f"{r['step_peak'] / MiB:.2f}", f"{ratios['rss'][-1]:.2f}",
            f"{peak / MiB:.2f}", f"{ratios['peak'][-1]:.2f}",
        ])  # fmt: skip
    print(benchlib.markdown_table(columns, cells))
    print(
        "plan total: every row of `bdlora plan --memory`; step peak RSS: its rise over one step; "
        "measured peak: base weights + adapter + AdamW state (resident before the step) + that rise"
    )
    verdict = "equal to the byte on every row" if all(exact) else "NOT equal on some rows (see the ratios)"
    print(f"base weights, adapter, AdamW state, grads: planned and measured are {verdict}")
    print(f"saved activations: planned / measured {span(saved, 4)} (docs/memory.md: within 5%)")
    print(f"the plan's total / the step peak RSS rise: {span(ratios['rss'])}")
    print(f"the plan's total / the measured peak: {span(ratios['peak'])}")
    print(f"the plan's grads + activations / the step peak RSS rise: {span(ratios['step'])}")


def span(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f} to {max(values):.{digits}f}"


def groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """The rows of each (TP degree, layout), in order."""
    out: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["tp"], r["layout"]), []).append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" in os.environ:
        run_rank(run_worker, args)
        return
    print("$ python " + shlex.join([sys.argv[0], *argv]), flush=True)
    m = benchlib.model_args(args)
    benchlib.check_tp_degrees(m, args.tp, "--tp")
    try:
        plans = planned_numbers(m, args.tp, args.layout)
    except BDLoraConfigError as err:
        raise SystemExit(f"--layout {' '.join(args.layout)}: {err}") from err
    rows = measure(m, args.tp, args.layout, args.mmap_threshold)
    print_tables(m, rows, plans, args.mmap_threshold)
    if args.json:
        for r in rows:
            r["plan"] = plans[r["tp"], r["layout"]]
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
