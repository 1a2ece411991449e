"""Communication and step time of base, BD-LoRA and S-LoRA under tensor parallelism, in one run.

Every rank builds the same Llama (from a ``LlamaConfig``) three times and shards each over the TP
group: ``base`` (no adapter), ``bdlora`` (nblocks = T, rank R) and ``slora`` (dense LoRA, rank R,
S-LoRA sharding). In every mode the embedding weight requires grad, so backward runs through every
block's input and the three backward graphs issue the same base collectives (as tests/test_comm.py).

1. One training step per mode under ``CommCounter``: TP collectives, their bytes and the per-rank
   ring wire bytes, forward and forward+backward; S-LoRA's measured extra against
   ``slora_extra_bytes``. Counts are gathered from all ranks and must agree.
2. Step time (forward + backward + AdamW over the adapter; the base mode runs forward + backward):
   the three modes interleave within each repetition, in an order that rotates, after a barrier;
   a step's time is the slowest rank's, and the table reports the median.

``--layout vocab`` shards the embedding, LM head and loss along the vocabulary in every mode;
``--layout sequence`` adds sequence parallelism (base and BD-LoRA only: S-LoRA's row layers need
the whole sequence's rank-r partial sums, so bdlora refuses that combination).

    torchrun --nproc-per-node 2 scripts/bench_tp.py               # defaults: < 2 min on 2 cores
    torchrun --nproc-per-node 4 scripts/bench_tp.py --rank 32
    python scripts/bench_tp.py --tp 2                             # launches torchrun itself
    python scripts/bench_tp.py --tp 4 --layout sequence
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rank_main import run_rank, torchrun
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import LlamaForCausalLM

from bdlora import BDLoraConfig, apply_bdlora
from bdlora.model import adapters_of, bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh, init_distributed, parallelize
from bdlora.parallel.accounting import CommCounter, slora_extra_bytes
from bdlora.parallel.mesh import tp_of_mesh
from bdlora.presets import llama_config

MODES = ("base", "bdlora", "slora")
LABELS = {"base": "base", "bdlora": "BD-LoRA", "slora": "S-LoRA"}
MiB = 2**20
COLUMNS = (
    "mode",
    "TP collectives/step",
    "TP bytes/step",
    "wire bytes/rank",
    "added vs base",
    "median step ms",
)


@dataclass(frozen=True)
class BenchArgs:
    tp: int | None
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    rank: int
    steps: int
    warmup: int
    seed: int
    layout: str = "replicated"

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.layout != "sequence" else ("base", "bdlora")

    @property
    def parallel_options(self) -> dict[str, bool]:
        return {"vocab_parallel": self.layout != "replicated", "sequence_parallel": self.layout == "sequence"}


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, default=None, help="without torchrun: launch this many ranks (2)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="also the KV heads; must be divisible by T")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank R (global, before sharding)")
    p.add_argument("--steps", type=int, default=20, help="timed repetitions (one step per mode each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=("replicated", "vocab", "sequence"),
        default="replicated",
        help="vocab: vocabulary-parallel embedding, LM head and loss; sequence: and sequence parallelism",
    )
    return BenchArgs(**vars(p.parse_args(argv)))


def launch(argv: list[str], tp: int, script: str = __file__) -> int:
    """Re-run ``script`` (this one) under ``torch.distributed.run`` (torchrun need not be on PATH)."""
    cmd = torchrun(tp, script, *argv)
    print("$ python " + shlex.join(sys.argv), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun would set it anyway, with a warning
    return subprocess.run(cmd, env=env, check=False).returncode


def launch_command() -> str:
    """The torchrun command line that started this rank (the agent is our parent process)."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        words = [w.decode() for w in parent if w]
    except OSError:
        words = []
    if len(words) > 1 and Path(words[1]).name == "torchrun":  # python .../torchrun ...
        return shlex.join(["torchrun", *words[2:]])
    if "torch.distributed.run" in words:
        return shlex.join(words)
    world = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "?"))
    return shlex.join(["torchrun", f"--nproc-per-node={world}", *sys.argv])


def print0(*args, **kwargs) -> None:
    if dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def build_model(args: BenchArgs, mode: str, mesh: DeviceMesh) -> nn.Module:
    """A seeded Llama (equal base weights in every mode) on ``mesh``, with ``mode``'s adapter."""
    config = llama_config(
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab, max(args.seq, 128)
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).train()
    parallelize(model, mesh, sharding="slora" if mode == "slora" else "bdlora", **args.parallel_options)
    if mode != "base":
        apply_bdlora(model, BDLoraConfig(rank=args.rank, alpha=2 * args.rank, nblocks=mesh.size()))
    model.requires_grad_(False)  # the base is frozen in every mode (apply_bdlora freezes it too) ...
    if mode != "base":
        for factor in adapter_factors(model):
            factor.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(True)  # ... but backward reaches every block
    return model


def adapter_factors(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's A and B shards (the embedding also requires grad, but is not trained)."""
    return [p for _, layer in bdlora_layers(model) for p in (*layer.lora_A.values(), *layer.lora_B.values())]


def make_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """forward + backward (+ AdamW over the adapter factors, when there are any)."""
    factors = adapter_factors(model)
    optimizer = torch.optim.AdamW(factors, lr=1e-4) if factors else None

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)  # adapter and embedding grads alike

    return step


def count_step(model: nn.Module, tokens: torch.Tensor, group: dist.ProcessGroup) -> dict:
    """TP-group collectives of one forward and one forward+backward."""
    empty = {"count": 0, "bytes": 0, "wire_bytes": 0.0, "ops": {}}
    with CommCounter({"tp": group}) as comm:
        loss = model(input_ids=tokens, labels=tokens).loss
        forward = comm.summary().get("tp", empty)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": forward, "total": comm.summary().get("tp", empty)}


def time_interleaved(steps: dict[str, Callable[[], None]], args: BenchArgs) -> dict[str, list[float]]:
    """This rank's seconds per timed step of each mode; the mode order rotates every repetition."""
    modes = list(steps)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(args.warmup + args.steps):
        shift = rep % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            dist.barrier()  # every rank starts the step together
            start = time.perf_counter()
            steps[mode]()
            if rep >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    return times


def time_slowest(steps: dict[str, Callable[[], None]], args: BenchArgs) -> dict[str, list[float]]:
    """Per mode, each timed step's seconds on the slowest rank."""
    per_rank = gather(time_interleaved(steps, args))
    return {mode: [max(r[mode][i] for r in per_rank) for i in range(args.steps)] for mode in steps}


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fmt_mib(n: float) -> str:
    return f"{n / MiB:.3f} MiB"


def print_table(comm: dict, medians: dict[str, float], modes: tuple[str, ...]) -> None:
    """One row per mode; counts, bytes and wire bytes as forward / forward+backward of one step."""
    base = comm["base"]["total"]
    print0("| " + " | ".join(COLUMNS) + " |")
    print0("|" + "---|" * len(COLUMNS))
    for mode in modes:
        fwd, tot = comm[mode]["forward"], comm[mode]["total"]
        ops = ", ".join(f"{op} {n}" for op, n in sorted(tot["ops"].items()))
        added = f"+{tot['count'] - base['count']} coll, +{fmt_mib(tot['bytes'] - base['bytes'])}"
        print0(
            f"| {LABELS[mode]} | {fwd['count']} fwd / {tot['count']} total ({ops}) "
            f"| {fmt_mib(fwd['bytes'])} / {fmt_mib(tot['bytes'])} "
            f"| {fmt_mib(fwd['wire_bytes'])} / {fmt_mib(tot['wire_bytes'])} "
            f"| {added} | {1e3 * medians[mode]:.2f} |"
        )
    print0("(collectives, bytes and wire bytes: forward / forward+backward of one step)")


def print_slora_check(comm: dict, predicted: dict, tokens: int, tp: int) -> None:
    """S-LoRA's measured traffic over the base's against ``slora_extra_bytes``."""
    slora, base = comm["slora"], comm["base"]
    measured = {
        "count": slora["total"]["count"] - base["total"]["count"],
        "bytes": slora["total"]["bytes"] - base["total"]["bytes"],
        "wire_bytes": slora["total"]["wire_bytes"] - base["total"]["wire_bytes"],
        "forward_wire_bytes": slora["forward"]["wire_bytes"] - base["forward"]["wire_bytes"],
    }
    print0(f"S-LoRA extra over base vs slora_extra_bytes(plan, tokens={tokens}, tp={tp}):")
    for key, value in measured.items():
        want = predicted[key]
        verdict = "match" if abs(value - want) <= 1e-6 * max(abs(want), 1) else "MISMATCH"
        print0(f"  {key:<19} predicted {want:>14,.1f}   measured {value:>14,.1f}   {verdict}")


def linear_flops(model: nn.Module) -> tuple[float, float]:
    """Per token, this rank: (frozen linears, adapter) FLOPs of a training step.

    A frozen linear computes its output and its input gradient (2 GEMMs: 4 FLOPs per weight
    element); an adapter factor also its weight gradient (3 GEMMs: 6 FLOPs per element).
    """
    base = adapter = 0.0
    for _, layer in bdlora_layers(model):
        base += 4 * layer.base_layer.weight.numel()
        adapter += 6 * sum(p.numel() for p in (*layer.lora_A.values(), *layer.lora_B.values()))
    return base, adapter


def print_ratios(times: dict[str, list[float]], medians: dict[str, float], flop_share: float) -> None:
    for other in (m for m in ("base", "slora") if m in times):
        paired = statistics.median(a / b for a, b in zip(times["bdlora"], times[other]))
        label = f"step time BD-LoRA / {LABELS[other]}:"
        print0(
            f"{label:<28} {medians['bdlora'] / medians[other]:.3f}   (median of paired ratios {paired:.3f})"
        )
    overhead = medians["bdlora"] / medians["base"] - 1
    print0(
        f"adapter FLOPs: {100 * flop_share:.2f}% on top of the frozen linears'; its step-time overhead "
        f"{100 * overhead:.1f}% is {overhead / flop_share:.1f}x its FLOP share"
    )


def run(args: BenchArgs) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    if args.tp is not None and args.tp != world:
        raise SystemExit(f"--tp {args.tp} but torchrun started {world} ranks; drop --tp or match them")
    mesh = build_mesh(ParallelDims(world, tp=world))
    tp = tp_of_mesh(mesh)
    print0("$ " + launch_command())
    print0(
        f"torch {torch.__version__}, gloo, CPU, {world} ranks x 1 thread, fp32; llama hidden={args.hidden} "
        f"intermediate={args.intermediate} layers={args.layers} heads={args.heads} vocab={args.vocab}; "
        f"batch={args.batch} seq={args.seq}; rank={args.rank} alpha={2 * args.rank} nblocks={world}; "
        f"steps={args.steps} warmup={args.warmup}; layout={args.layout}"
    )
    modes = args.modes
    models = {mode: build_model(args, mode, mesh) for mode in modes}
    generator = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=generator)  # (B, T), every rank
    comm = {mode: count_step(models[mode], tokens, tp.group) for mode in modes}
    all_comm = gather(comm)
    if any(c != all_comm[0] for c in all_comm):
        raise RuntimeError(f"ranks counted different collectives: {all_comm}")
    params = {mode: sum(p.numel() for p in adapter_factors(models[mode])) for mode in modes if mode != "base"}
    print0(
        f"collective counts identical on all {world} ranks; adapter params on rank 0: "
        + ", ".join(f"{LABELS[m]} {n:,}" for m, n in params.items())
    )
    steps = {mode: make_step(models[mode], tokens) for mode in modes}
    slowest = time_slowest(steps, args)
    medians = {mode: statistics.median(slowest[mode]) for mode in modes}
    print_table(comm, medians, modes)
    if "slora" in modes:
        extra = slora_extra_bytes(adapters_of(models["slora"])["default"].plan, args.batch * args.seq, world)
        print_slora_check(comm, extra, args.batch * args.seq, world)
    base_flops, adapter_flops = linear_flops(models["bdlora"])
    print_ratios(slowest, medians, adapter_flops / base_flops)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(argv, args.tp or 2))
    run_rank(run, args)


if __name__ == "__main__":
    main()
