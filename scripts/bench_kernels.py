"""The adapted linear layer's own cost on one rank's shard, kernel by kernel, with no collective.

``bench_tp.py`` and ``profile_adapter.py`` time whole TP steps, where each rank also waits on the
others. This script times one process, one thread, forward + backward of each linear layer of
``bench_tp.py``'s Llama as a TP rank holds it (BD-LoRA at nblocks = T: one block of rank R/T per
rank), so the adapter's kernels are measured on their own:
- ``base``: the frozen linear layer;
- ``rank-cols``: the fused kernel with rank-sized products as ``(tokens, r)`` outputs (the layout
  before the change; ``profile_adapter.RankColumnsLoraLinear``);
- ``fused``: ``bdlora.layers._LoraLinear``, rank-sized products as ``(r, tokens)`` outputs;
- ``stacked``: ``fused`` with the forward's ``x A^T`` folded into the base GEMM over a stacked
  ``[W; A]`` weight (``StackedLoraLinear`` below), the candidate that would read ``x`` once.

Modes interleave per repetition; the table gives, per layer and summed over the block, each
kernel's overhead over the base (the median of paired ratios) and its multiple of the adapter's
FLOP share (6 FLOPs per factor element against the frozen layer's 4 per weight element).

    python scripts/bench_kernels.py --tp 2          # ~20 s
    python scripts/bench_kernels.py --tp 4 --rank 32
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from profile_adapter import RankColumnsLoraLinear

from bdlora.layers import _LoraLinear

KERNELS = ("base", "rank-cols", "fused", "stacked")


class StackedLoraLinear(torch.autograd.Function):
    """``_LoraLinear`` whose forward reads ``x`` once: one GEMM over ``stacked = [W; A]``
    ((d_out + r, d_in), A's rows refreshed on each call), split into the base output and ``h``."""

    @staticmethod
    def forward(ctx, x, w, a, b, scale: float, stacked: torch.Tensor):
        d_out = w.shape[0]
        stacked[d_out:].copy_(a)
        y = x @ stacked.t()  # (T, d_out + r)
        h_t = y[:, d_out:].t().contiguous()  # (r, T)
        out = y[:, :d_out].addmm_(h_t.t(), b.t(), alpha=scale)  # (T, d_out), rows strided
        ctx.save_for_backward(x, w, a, b, h_t)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_LoraLinear.backward(ctx, grad_out), None)


KERNEL_FUNCTIONS = {"rank-cols": RankColumnsLoraLinear, "fused": _LoraLinear, "stacked": StackedLoraLinear}


def layer_shapes(hidden: int, intermediate: int, tp: int) -> list[tuple[str, int, int, int]]:
    """(name, d_in, d_out, layers per block) of each linear layer's shard on one rank (the KV
    heads equal the heads, as in ``bench_tp.py``)."""
    return [
        ("q/k/v_proj", hidden, hidden // tp, 3),
        ("o_proj", hidden // tp, hidden, 1),
        ("gate/up_proj", hidden, intermediate // tp, 2),
        ("down_proj", intermediate // tp, hidden, 1),
    ]


def kernel_step(kernel: str, x, w, a, b, grad_out, stacked) -> Callable[[], None]:
    extra = (stacked,) if kernel == "stacked" else ()

    def step() -> None:
        if kernel == "base":
            out = x @ w.t()
        else:
            out = KERNEL_FUNCTIONS[kernel].apply(x, w, a, b, 2.0, *extra)
        out.backward(grad_out)
        x.grad = a.grad = b.grad = None

    return step


def check_equal(x, w, a, b, grad_out, stacked) -> None:
    """Every adapter kernel gives the separate ops' output and gradients (fp32, another order of
    summation), so the timings compare equal work."""
    results = {}
    for kernel in ("unfused", *KERNELS[1:]):
        if kernel == "unfused":
            out = x @ w.t() + 2.0 * (x @ a.t()) @ b.t()
        else:
            out = KERNEL_FUNCTIONS[kernel].apply(x, w, a, b, 2.0, *([stacked] if kernel == "stacked" else []))
        out.backward(grad_out)
        results[kernel] = [out.detach(), x.grad, a.grad, b.grad]
        x.grad = a.grad = b.grad = None
    for kernel in KERNELS[1:]:
        for got, want in zip(results[kernel], results["unfused"], strict=True):
            # sums over hundreds of tokens: rounding scales with the largest entry; a wrong layout
            # is off by the entries themselves
            atol = 1e-5 * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m, k=kernel: f"{k}: {m}")


def time_kernels(d_in: int, d_out: int, r: int, tokens: int, reps: int) -> dict[str, list[float]]:
    """Seconds per forward + backward of each kernel, interleaved, the order rotating."""
    x = torch.randn(tokens, d_in, requires_grad=True)
    w = torch.randn(d_out, d_in) / d_in**0.5
    a = torch.randn(r, d_in, requires_grad=True)
    b = torch.randn(d_out, r, requires_grad=True)
    grad_out = torch.randn(tokens, d_out)
    stacked = torch.empty(d_out + r, d_in)
    stacked[:d_out] = w
    check_equal(x, w, a, b, grad_out, stacked)
    steps = {k: kernel_step(k, x, w, a, b, grad_out, stacked) for k in KERNELS}
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for rep in range(reps + 5):
        shift = rep % len(KERNELS)
        for k in KERNELS[shift:] + KERNELS[:shift]:
            start = time.perf_counter()
            steps[k]()
            if rep >= 5:
                times[k].append(time.perf_counter() - start)
    return times


def overhead(times: dict[str, list[float]], kernel: str) -> float:
    return statistics.median(t / b - 1 for t, b in zip(times[kernel], times["base"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, default=2, help="the TP degree whose per-rank shards to time")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank R; a rank holds R/T")
    p.add_argument("--tokens", type=int, default=512, help="batch x seq of bench_tp.py's step")
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    print("$ python " + shlex.join(["scripts/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    r = args.rank // args.tp
    print(
        f"torch {torch.__version__}, CPU, 1 thread, fp32; per-rank shards at TP {args.tp} of "
        f"hidden={args.hidden} "
        f"intermediate={args.intermediate}; local rank {r}; tokens={args.tokens}; reps={args.reps}"
    )
    print(
        "| layer (d_in x d_out) | FLOP share | "
        + " | ".join(f"{k}: overhead (/ share)" for k in KERNELS[1:])
        + " |"
    )
    print("|---|---:|" + "---:|" * (len(KERNELS) - 1))
    base_total, extra_total = 0.0, {k: 0.0 for k in KERNELS[1:]}
    adapter_flops = frozen_flops = 0
    for name, d_in, d_out, count in layer_shapes(args.hidden, args.intermediate, args.tp):
        share = 6 * r * (d_in + d_out) / (4 * d_in * d_out)
        times = time_kernels(d_in, d_out, r, args.tokens, args.reps)
        base = statistics.median(times["base"])
        base_total += count * base
        adapter_flops += count * 6 * r * (d_in + d_out)
        frozen_flops += count * 4 * d_in * d_out
        cells = []
        for k in KERNELS[1:]:
            o = overhead(times, k)
            extra_total[k] += count * o * base
            cells.append(f"{100 * o:.1f}% ({o / share:.2f}x)")
        print(f"| {name} ({d_in} x {d_out}) | {100 * share:.1f}% | " + " | ".join(cells) + " |")
    share = adapter_flops / frozen_flops
    cells = [
        f"{100 * extra_total[k] / base_total:.1f}% ({extra_total[k] / base_total / share:.2f}x)"
        for k in KERNELS[1:]
    ]
    print(f"| one block (q, k, v, o, gate, up, down) | {100 * share:.1f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
