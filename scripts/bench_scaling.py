"""Step time and memory of BD-LoRA against the frozen base as sequence length, rank, nblocks and TP grow.

Each sweep moves one quantity, the others at their defaults: sequence length, LoRA rank R, BD-LoRA
blocks N (in this process, one thread), and the TP degree (one torchrun job per degree, gloo, CPU,
one thread per rank). At every point two models with equal base weights are built: ``base`` (no
adapter) and ``bdlora`` (BD-LoRA on q, k, v, o, gate, up and down). In both the embedding weight
requires grad, so backward runs through every block (as scripts/bench_tp.py does); a step is
forward + backward (+ AdamW over the adapter factors). The two alternate within each repetition,
in a rotating order; a step's time is its slowest rank's and the tables report medians, and the
overhead ratio BD-LoRA / base. Memory per rank (the largest over ranks): the bytes autograd saves
for backward in one forward (``benchlib.SavedTensors``, parameters left out) for both models, and
the adapter factors plus their AdamW state.

    python scripts/bench_scaling.py                  # all four sweeps: ~1.5 min on 2 busy cores
    python scripts/bench_scaling.py --quick          # tiny sizes, for tests
    python scripts/bench_scaling.py --seqs 128 1024 --ranks 16 --nblocks-sweep 4 --tps 2

Writes ``scaling_{seq,rank,nblocks,tp}.png`` to ``--out-dir`` (step time, overhead ratio, memory)
and prints one markdown table per sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import benchlib
import matplotlib
import torch
import torch.distributed as dist
from benchlib import MiB, ModelArgs
from rank_main import run_rank
from torch.distributed.device_mesh import DeviceMesh

from bdlora import BDLoraConfig
from bdlora.parallel import ParallelDims, build_mesh, init_distributed

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

MODES = ("base", "bdlora")
# The TP sweep also times the dense-LoRA shardings, at the same rank R (their parameter count is
# BD-LoRA's plus its block-diagonal factor's dense remainder).
TP_MODES = ("base", "bdlora", "slora", "replicated")
LABELS = {"base": "base", "bdlora": "BD-LoRA", "slora": "S-LoRA", "replicated": "replicated"}
# sweep name -> (the ModelArgs field it moves, axis label)
SWEEPS = {
    "seq": ("seq", "sequence length"),
    "rank": ("rank", "LoRA rank R"),
    "nblocks": ("nblocks", "nblocks N"),
}
QUICK = dict(
    hidden=64,
    intermediate=128,
    layers=1,
    heads=4,
    vocab=256,
    seq=32,
    seqs=[16, 32],
    ranks=[8, 16],
    nblocks_sweep=[2, 4],
    tps=[1, 2],
    warmup=1,
    reps=2,
)
COLUMNS = (
    "base ms",
    "BD-LoRA ms",
    "BD-LoRA / base",
    "saved act. base MiB",
    "saved act. BD-LoRA MiB",
    "adapter + AdamW MiB",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    benchlib.add_model_args(p)
    p.add_argument("--seqs", type=int, nargs="*", default=[64, 128, 256, 512])
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--nblocks-sweep", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--tps", type=int, nargs="*", default=[1, 2, 4], help="TP degrees, one torchrun each")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per point")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short sweeps (tests)")
    p.add_argument("--out-dir", default="docs/benchmarks", help="where the PNGs go")
    p.add_argument("--json", default=None, help="write every point to this file")
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.quick:  # explicit options still win over the quick sizes
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def check_sweeps(args: argparse.Namespace) -> None:
    """Every point's adapter config and TP degree, validated before anything is timed."""
    m = benchlib.model_args(args)
    for r in args.ranks:
        BDLoraConfig(rank=r, nblocks=m.nblocks)
    for n in args.nblocks_sweep:
        BDLoraConfig(rank=m.rank, nblocks=n)
    benchlib.check_tp_degrees(m, args.tps, "--tps")


# -- one point -----------------------------------------------------------------------------------
def measure_point(
    m: ModelArgs, mesh: DeviceMesh | None, warmup: int, reps: int, modes: tuple[str, ...] = MODES
) -> dict:
    """This rank's step times (s) and bytes for the base and each adapted model at ``m``."""
    tokens = benchlib.token_batch(m)
    models = {
        mode: benchlib.build_llama(
            m, mesh, adapter=mode != "base", embed_grad=True, sharding="bdlora" if mode == "base" else mode
        )
        for mode in modes
    }
    out = {
        f"act_{mode}": benchlib.saved_bytes(model, tokens).activation_bytes for mode, model in models.items()
    }
    steps, optimizers = {}, {}
    for mode, model in models.items():
        steps[mode], optimizers[mode] = benchlib.make_train_step(model, tokens)
    barrier = dist.barrier if mesh is not None else None
    out["times"] = benchlib.time_interleaved(steps, warmup, reps, barrier)
    for mode in modes[1:]:
        factors = benchlib.adapter_factors(models[mode])
        opt = benchlib.optimizer_state_bytes(optimizers[mode])
        out[f"adapter_opt_{mode}"] = benchlib.tensor_bytes(factors) + opt
    out["adapter_opt"] = out["adapter_opt_bdlora"]
    return out


def summarize(per_rank: list[dict]) -> dict:
    """One point from every rank's measurements: the slowest rank per repetition, the largest bytes."""
    point = {key: max(r[key] for r in per_rank) for key in per_rank[0] if key != "times"}
    for mode in per_rank[0]["times"]:
        slowest = [max(ts) for ts in zip(*(r["times"][mode] for r in per_rank))]
        point[f"{mode}_ms"] = benchlib.median_ms(slowest)
        point[f"ratio_{mode}"] = point[f"{mode}_ms"] / point["base_ms"] if mode != "base" else 1.0
    point["ratio"] = point["ratio_bdlora"]
    return point


def run_worker(args: argparse.Namespace) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    mesh = build_mesh(ParallelDims(world, tp=world))
    result = measure_point(benchlib.model_args(args), mesh, args.warmup, args.reps, TP_MODES)
    benchlib.write_rank0(args.worker_result, summarize(benchlib.gather(result)))


# -- launcher ------------------------------------------------------------------------------------
def local_sweep(m: ModelArgs, field: str, values: list[int], args: argparse.Namespace) -> list[dict]:
    points = []
    for value in values:
        point = summarize([measure_point(replace(m, **{field: value}), None, args.warmup, args.reps)])
        points.append({"x": value, **point})
        print(f"  {field}={value}: {point['bdlora_ms']:.1f} ms / {point['base_ms']:.1f} ms", flush=True)
    return points


def tp_sweep(m: ModelArgs, args: argparse.Namespace) -> list[dict]:
    points = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for tp in args.tps:
            argv = [*benchlib.model_argv(m), f"--warmup={args.warmup}", f"--reps={args.reps}"]
            points.append({"x": tp, **benchlib.run_torchrun(__file__, tp, argv, Path(tmp) / f"tp{tp}.json")})
    return points


def table(label: str, points: list[dict]) -> str:
    rows = [
        [
            p["x"],
            f"{p['base_ms']:.1f}",
            f"{p['bdlora_ms']:.1f}",
            f"{p['ratio']:.2f}",
            f"{p['act_base'] / MiB:.2f}",
            f"{p['act_bdlora'] / MiB:.2f}",
            f"{p['adapter_opt'] / MiB:.3f}",
        ]
        for p in points
    ]
    return benchlib.markdown_table([label, *COLUMNS], rows)


def tp_table(points: list[dict]) -> str:
    """The TP sweep: every sharding's step time, its ratio to the base, and its adapter + AdamW."""
    adapted = TP_MODES[1:]
    header = ["TP degree", "base ms"]
    header += [f"{LABELS[m]} ms (/ base)" for m in adapted]
    header += [f"adapter + AdamW MiB/rank: {' / '.join(LABELS[m] for m in adapted)}"]
    rows = [
        [p["x"], f"{p['base_ms']:.1f}"]
        + [f"{p[f'{m}_ms']:.1f} ({p[f'ratio_{m}']:.2f})" for m in adapted]
        + [" / ".join(f"{p[f'adapter_opt_{m}'] / MiB:.3f}" for m in adapted)]
        for p in points
    ]
    return benchlib.markdown_table(header, rows)


def plot(label: str, points: list[dict], path: Path) -> None:
    """Step time, overhead ratio and memory against the swept quantity, side by side."""
    x = [p["x"] for p in points]
    fig, (ax_ms, ax_ratio, ax_mem) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    adapted = [m for m in TP_MODES[1:] if f"{m}_ms" in points[0]]
    style = {mode: (f"C{i + 1}", marker) for i, (mode, marker) in enumerate(zip(adapted, "s^v"))}  # per mode
    ax_ms.plot(x, [p["base_ms"] for p in points], "o-", color="C0", label="frozen base")
    for mode, (color, marker) in style.items():
        ax_ms.plot(x, [p[f"{mode}_ms"] for p in points], f"{marker}-", color=color, label=LABELS[mode])
        ax_ratio.plot(x, [p[f"ratio_{mode}"] for p in points], f"{marker}-", color=color, label=LABELS[mode])
    ax_ms.set(ylabel="median step time (ms)", title="step time")
    ax_ratio.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_ratio.set(ylabel="adapted / base", title="step-time overhead")
    ax_mem.plot(x, [p["act_base"] / MiB for p in points], "o:", color="C0", label="saved activations, base")
    ax_mem.plot(
        x, [p["act_bdlora"] / MiB for p in points], "s:", color="C1", label="saved activations, BD-LoRA"
    )
    for mode, (color, marker) in style.items():
        adapter_mib = [p[f"adapter_opt_{mode}"] / MiB for p in points]
        ax_mem.plot(x, adapter_mib, f"{marker}-", color=color, label=f"{LABELS[mode]} + AdamW")
    ax_mem.set(ylabel="MiB per rank", title="memory")
    for ax in (ax_ms, ax_ratio, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    ax_ms.legend()
    ax_ratio.legend(fontsize="small")
    ax_mem.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_launcher(args: argparse.Namespace, argv: list[str]) -> None:
    print("$ python " + shlex.join([sys.argv[0], *argv]), flush=True)
    check_sweeps(args)
    torch.set_num_threads(1)  # as every torchrun rank
    m = benchlib.model_args(args)
    print(
        f"torch {torch.__version__}, CPU, 1 thread per process, fp32; llama hidden={m.hidden} "
        f"intermediate={m.intermediate} layers={m.layers} heads={m.heads} vocab={m.vocab}; batch={m.batch}; "
        f"defaults seq={m.seq} rank={m.rank} nblocks={m.nblocks} tp=1; warmup={args.warmup} reps={args.reps}",
        flush=True,
    )
    values = {"seq": args.seqs, "rank": args.ranks, "nblocks": args.nblocks_sweep}
    sweeps = {name: local_sweep(m, field, values[name], args) for name, (field, _) in SWEEPS.items()}
    sweeps["tp"] = tp_sweep(m, args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {name: label for name, (_, label) in SWEEPS.items()} | {"tp": "TP degree"}
    for name, points in sweeps.items():
        print(f"\n{labels[name]} sweep:")
        print(tp_table(points) if name == "tp" else table(labels[name], points))
        plot(labels[name], points, out_dir / f"scaling_{name}.png")
    print(f"\nwrote {', '.join(f'scaling_{name}.png' for name in sweeps)} to {out_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "sweeps": sweeps}, indent=1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        run_launcher(args, argv)
        return
    run_rank(run_worker, args)


if __name__ == "__main__":
    main()
