"""Where the adapter's step time goes under TP, and what the fused path saves, in one run.

Three models with equal base weights are sharded over the TP group (``bench_tp.py``'s model):
``base`` (no adapter); ``unfused``, BD-LoRA with autograd over the separate ops (``h = A x``,
``h * scale``, the block matmul with its reshapes, ``out + delta``, and in backward a separate
pass adding the adapter's input gradient to the base's); and ``fused``, BD-LoRA as it runs
(``BDLoraLinear``'s hand-written forward and backward, which fold the scale, the sum and that
accumulation into the GEMMs). Their training steps interleave, and the table gives the median step
time of each beside the adapter's share of the linear layers' FLOPs. ``torch.profiler`` then splits
one rank's steps by operator: the rows are where the adapter modes spend time the base does not.

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

MODES = ("base", "unfused", "fused")


def build(args: bench_tp.BenchArgs, mode: str, mesh) -> torch.nn.Module:
    model = bench_tp.build_model(args, "base" if mode == "base" else "bdlora", mesh)
    if mode == "unfused":
        for _, layer in bdlora_layers(model):
            layer.fused = False  # autograd over the separate ops
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
    extra = {
        n: max(ops["unfused"].get(n, 0.0), ops["fused"].get(n, 0.0)) - ops["base"].get(n, 0.0) for n in names
    }
    bench_tp.print0("\nrank 0, self CPU ms per step by operator (the largest adapter additions):")
    bench_tp.print0("| operator | base | unfused | fused |")
    bench_tp.print0("|---|---:|---:|---:|")
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
    bench_tp.print0("| mode | median step ms | / base | adapter overhead / its FLOP share |")
    bench_tp.print0("|---|---:|---:|---:|")
    for mode in MODES:
        ratio = med[mode] / med["base"]
        multiple = "-" if mode == "base" else f"{(ratio - 1) / share:.1f}x"
        bench_tp.print0(f"| {mode} | {1e3 * med[mode]:.2f} | {ratio:.3f} | {multiple} |")
    paired = statistics.median(f / u for f, u in zip(times["fused"], times["unfused"]))
    bench_tp.print0(
        f"adapter FLOPs: {100 * share:.2f}% on top of the frozen linears' (per rank, per token); "
        f"fused / unfused step: {med['fused'] / med['unfused']:.3f} (median of paired ratios {paired:.3f})"
    )
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
