"""Per-rank memory of BD-LoRA training at each TP degree, beside the unsharded model (TP 1).

The launcher saves a seeded Llama (``bench_loading.save_model``) and starts one torchrun job per TP
degree (``python -m torch.distributed.run``, gloo, CPU, one thread per rank). Each rank:

1. loads the saved model with ``bdlora.from_pretrained`` and records its peak RSS increase
   (``bench_loading.measure_load``; that load's fresh adapter has nblocks = TP, bench_loading's own
   convention), then frees it;
2. builds the same Llama, shards it (``parallelize``) and adds BD-LoRA on q, k, v, o, gate, up and
   down (rank R, nblocks N, global); counts its frozen (base) and trainable (adapter) parameter
   bytes, the gradient bytes after one backward and the AdamW state after one step;
3. counts the bytes autograd saves for backward during one training forward
   (``benchlib.SavedTensors``: activations, and apart from them the parameters it saves);
4. reports the peak RSS increase over one more training step (VmHWM after resetting it through
   ``/proc/self/clear_refs``, minus RSS before the step).

    python scripts/bench_memory.py                     # TP 1, 2, 4: ~70 s on 2 busy cores
    python scripts/bench_memory.py --tp 2 --hidden 1024 --json memory.json

Every cell is MiB on that rank, with its ratio to the unsharded model's in parentheses. TP 1 always
runs, as the reference. At TP t the adapter, its gradients and its optimizer state should be 1/t of
the unsharded ones (BD-LoRA shards exactly), and the base weights 1/t of every sharded linear plus
the replicated embeddings, norms and lm_head.
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

from bdlora.parallel import ParallelDims, build_mesh, init_distributed

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP degrees, one torchrun each")
    benchlib.add_model_args(p, hidden=512, intermediate=1376, layers=4, vocab=4096, batch=4)
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


def measure_rank(m: ModelArgs, mesh: DeviceMesh, model_dir: Path) -> dict[str, int]:
    bench_loading.warm_up(model_dir)
    dist.barrier()
    loading_peak = bench_loading.measure_load(model_dir, m.rank, mesh)["peak_delta"]
    benchlib.release_free_memory()
    model = benchlib.build_llama(m, mesh, adapter=True)
    return {"loading_peak": loading_peak, **training_memory(model, benchlib.token_batch(m))}


def run_worker(args: argparse.Namespace) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    mesh = build_mesh(ParallelDims(world, tp=world))
    result = measure_rank(benchlib.model_args(args), mesh, Path(args.model_dir))
    rows = benchlib.gather({"tp": world, "rank": dist.get_rank(), **result})
    benchlib.write_rank0(args.worker_result, rows)


# -- launcher ------------------------------------------------------------------------------------
def save_model(m: ModelArgs, model_dir: Path) -> None:
    """The model every rank loads, saved by bench_loading (the same ``llama_config`` sizes)."""
    sizes = {k: getattr(m, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "rank", "seed")}
    bench_loading.save_model(
        bench_loading.BenchArgs(tp=[], model_dir=None, worker_result=None, **sizes), model_dir
    )


def measure(m: ModelArgs, tps: list[int]) -> list[dict[str, int]]:
    """Every rank's row at every TP degree (TP 1 first, added when missing)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        model_dir = Path(tmp) / "model"
        save_model(m, model_dir)
        for tp in sorted({1, *tps}):
            argv = [*benchlib.model_argv(m), f"--model-dir={model_dir}"]
            rows += benchlib.run_torchrun(__file__, tp, argv, Path(tmp) / f"tp{tp}.json")
    return rows


def cell(value: int, unsharded: int) -> str:
    ratio = f"{value / unsharded:.2f}" if unsharded else "-"
    return f"{value / MiB:.2f} ({ratio})"


def print_tables(m: ModelArgs, rows: list[dict[str, int]]) -> None:
    print(
        f"torch {torch.__version__}, gloo, CPU, 1 thread per rank, fp32; llama hidden={m.hidden} "
        f"intermediate={m.intermediate} layers={m.layers} heads={m.heads} vocab={m.vocab}; "
        f"batch={m.batch} seq={m.seq}; BD-LoRA on q,k,v,o,gate,up,down rank={m.rank} nblocks={m.nblocks}"
    )
    unsharded = next(r for r in rows if r["tp"] == 1)
    columns = ["tp", "rank", *(f"{title} MiB (x TP 1)" for _, title in FIELDS)]
    cells = [[r["tp"], r["rank"], *(cell(r[key], unsharded[key]) for key, _ in FIELDS)] for r in rows]
    print(benchlib.markdown_table(columns, cells))
    print(
        "* saved params: parameter storages autograd saves (frozen weights, for the input gradient); "
        "already counted in base weights and adapter, so not added by the forward; AdamW state is "
        "2 x adapter plus a 4-byte step count per factor, on every rank"
    )
    for tp in sorted({r["tp"] for r in rows} - {1}):
        ranks = [r for r in rows if r["tp"] == tp]
        for key in ("adapter", "grads"):
            total = sum(r[key] for r in ranks)
            verdict = "==" if total == unsharded[key] else "!="
            print(f"tp {tp}: {key} summed over ranks {total:,} B {verdict} unsharded {unsharded[key]:,} B")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" in os.environ:
        run_rank(run_worker, args)
        return
    print("$ python " + shlex.join([sys.argv[0], *argv]), flush=True)
    m = benchlib.model_args(args)
    benchlib.check_tp_degrees(m, args.tp, "--tp")
    rows = measure(m, args.tp)
    print_tables(m, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
