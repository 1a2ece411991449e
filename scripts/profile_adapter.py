"""Where the adapter's step time goes under TP, and what the fused path saves, in one run.

Four models with equal base weights are sharded over the TP group (``bench_tp.py``'s model):
- ``base``: no adapter;
- ``unfused``: BD-LoRA with autograd over the separate ops (``h = A x``, ``h * scale``, the block
  matmul with its reshapes, ``out + delta``, and in backward a separate pass adding the adapter's
  input gradient to the base's);
- ``rank-cols``: BD-LoRA's fused kernel with every rank-sized product laid out as ``(tokens, r)``,
  r columns wide (``RankColumnsLoraLinear`` below: the kernel before the layout change);
- ``fused``: BD-LoRA as it runs (``BDLoraLinear``'s hand-written forward and backward, which fold
  the scale, the sum and that accumulation into the GEMMs, and lay rank-sized products out as
  ``(r, tokens)``).
Their training steps interleave; the table gives each mode's median step time and its overhead over
the base step as a multiple of the adapter's share of the linear layers' FLOPs (the median of paired
per-repetition ratios, with quartiles). ``torch.profiler`` then splits one rank's steps by operator:
the rows are where the adapter modes spend time the base does not.

    python scripts/profile_adapter.py --tp 2         # launches torchrun itself; ~1 min on 2 cores
    torchrun --nproc-per-node 4 scripts/profile_adapter.py --rank 32
"""

from __future__ import annotations

import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable

import bench_tp  # the sibling script: same model, step and launcher
import torch
from rank_main import run_rank
from torch.profiler import ProfilerActivity, profile

from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh, init_distributed

MODES = ("base", "unfused", "rank-cols", "fused")


class RankColumnsLoraLinear(torch.autograd.Function):
    """``bdlora.layers._LoraLinear`` with ``h``, its gradient and B's gradient computed as
    ``(tokens, r)`` and ``(d_out, r)`` outputs, r columns wide: the kernel the layout change replaced."""

    @staticmethod
    def forward(ctx, x, w, a, b, scale: float):
        h = x @ a.t()  # (T, r)
        out = (x @ w.t()).addmm_(h, b.t(), alpha=scale)  # (T, d_out)
        ctx.save_for_backward(x, w, a, b, h)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, a, b, h = ctx.saved_tensors
        grad_h = (grad_out @ b).mul_(ctx.scale)  # (T, r)
        grad_x = (grad_out @ w).addmm_(grad_h, a) if ctx.needs_input_grad[0] else None  # (T, d_in)
        grad_a = grad_h.t() @ x  # (r, d_in)
        grad_b = (grad_out.t() @ h).mul_(ctx.scale)  # (d_out, r)
        return grad_x, None, grad_a, grad_b, None


def build(args: bench_tp.BenchArgs, mode: str, mesh) -> torch.nn.Module:
    model = bench_tp.build_model(args, "base" if mode == "base" else "bdlora", mesh)
    for _, layer in bdlora_layers(model):
        if mode == "unfused":
            layer.fused = False  # autograd over the separate ops
        elif mode == "rank-cols":
            layer.fused_kernel = RankColumnsLoraLinear
    return model


def op_times(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each operator (this rank)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[event.key] += event.self_cpu_time_total / 1e3 / steps
    return out


def print_profile(ops: dict[str, dict[str, float]], top: int) -> None:
    names = set().union(*ops.values())
    extra = {n: max(ops[m].get(n, 0.0) for m in MODES[1:]) - ops["base"].get(n, 0.0) for n in names}
    bench_tp.print0("\nrank 0, self CPU ms per step by operator (the largest adapter additions):")
    bench_tp.print0("| operator | " + " | ".join(MODES) + " |")
    bench_tp.print0("|---|" + "---:|" * len(MODES))
    for name in sorted(names, key=lambda n: -extra[n])[:top]:
        row = " | ".join(f"{ops[m].get(name, 0.0):.2f}" for m in MODES)
        bench_tp.print0(f"| `{name}` | {row} |")
    totals = " | ".join(f"{sum(ops[m].values()):.2f}" for m in MODES)
    bench_tp.print0(f"| all operators | {totals} |")


def run(args: bench_tp.BenchArgs) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    mesh = build_mesh(ParallelDims(world, tp=world))
    bench_tp.print0("$ " + bench_tp.launch_command())
    bench_tp.print0(
        f"torch {torch.__version__}, gloo, CPU, {world} ranks x 1 thread, fp32; llama hidden={args.hidden} "
        f"intermediate={args.intermediate} layers={args.layers}; batch={args.batch} seq={args.seq}; "
        f"rank={args.rank} nblocks={world}; steps={args.steps} warmup={args.warmup}"
    )
    models = {mode: build(args, mode, mesh) for mode in MODES}
    generator = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=generator)  # (B, T)
    steps = {mode: bench_tp.make_step(models[mode], tokens) for mode in MODES}
    times = bench_tp.time_slowest(steps, args)
    med = {mode: statistics.median(times[mode]) for mode in MODES}
    base_flops, adapter_flops = bench_tp.linear_flops(models["fused"])
    share = adapter_flops / base_flops
    bench_tp.print0(
        f"load average {bench_tp.load_average()}; adapter FLOPs {100 * share:.2f}% on top of the frozen "
        "linears' (per rank, per token)"
    )
    bench_tp.print0("| mode | median step ms | / base | overhead / FLOP share: paired median (quartiles) |")
    bench_tp.print0("|---|---:|---:|---:|")
    for mode in MODES:
        multiple = "-"
        if mode != "base":
            q1, q2, q3 = (q - 1 for q in bench_tp.paired(times, mode, "base"))
            multiple = f"{q2 / share:.2f}x ({q1 / share:.2f}-{q3 / share:.2f}x)"
        bench_tp.print0(f"| {mode} | {1e3 * med[mode]:.2f} | {med[mode] / med['base']:.3f} | {multiple} |")
    for before in ("unfused", "rank-cols"):
        q1, q2, q3 = bench_tp.paired(times, "fused", before)
        bench_tp.print0(f"fused / {before} step: paired median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    ops = {mode: op_times(steps[mode], max(3, args.steps // 4)) for mode in MODES}
    print_profile(ops, top=12)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = bench_tp.parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(bench_tp.launch(argv, args.tp or 2, __file__))
    run_rank(run, args)


if __name__ == "__main__":
    main()
