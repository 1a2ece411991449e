"""Communication, step time, per-rank adapter memory and FLOPs of base, BD-LoRA, S-LoRA and
replicated LoRA under tensor parallelism, in one run.

Every rank builds the same Llama (from a ``LlamaConfig``) four times and shards each over the TP
group: ``base`` (no adapter), ``bdlora`` (nblocks = T, rank R), ``slora`` (dense LoRA, rank R,
S-LoRA sharding) and ``replicated`` (dense LoRA, rank R, ``sharding="replicated"``: column layers
hold A whole and B's rows, row layers A's columns and B whole; the whole factors' gradients are
summed over TP in one all-reduce per backward pass). Every adapter has rank R: S-LoRA and
replicated are the same dense LoRA (equal parameter counts), and BD-LoRA at rank R has fewer
parameters (its column B and row A are block-diagonal, 1/N of dense; the script prints both
counts). In every mode the embedding weight requires grad, so backward runs through every block's
input and the four backward graphs issue the same base collectives (as tests/test_comm.py).

1. One training step per mode under ``CommCounter``: TP collectives, their bytes and the per-rank
   ring wire bytes, forward and backward apart; S-LoRA's measured extra against
   ``slora_extra_bytes`` and replicated's against the bytes of its whole factors (one summed
   all-reduce in backward). Counts are gathered from all ranks and must agree.
2. Per rank: adapter parameters, their AdamW state and gradients (bytes of the tensors held), and
   adapter FLOPs per token of a training step (each factor a rank holds runs on every token:
   replicated's whole factors cost every rank their full FLOPs).
3. Step time (forward + backward + AdamW over the adapter; the base mode runs forward + backward):
   the modes interleave within each repetition, in an order that rotates, after a barrier; a
   step's time is the slowest rank's, and the table reports the median and quartiles.

``--layout vocab`` shards the embedding, LM head and loss along the vocabulary in every mode;
``--layout sequence`` adds sequence parallelism (base and BD-LoRA only: the dense shardings' row
layers need the whole sequence's rank-r partial sums, so bdlora refuses that combination).

    torchrun --nproc-per-node 2 scripts/bench_tp.py               # defaults: about 1 min on 2 cores
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
from bdlora.parallel.styles import replicated_factors
from bdlora.presets import llama_config

MODES = ("base", "bdlora", "slora", "replicated")
LABELS = {"base": "base", "bdlora": "BD-LoRA", "slora": "S-LoRA", "replicated": "replicated"}
MiB = 2**20
COLUMNS = (
    "mode",
    "TP collectives fwd + bwd",
    "TP bytes fwd + bwd",
    "wire bytes/rank fwd + bwd",
    "added vs base",
    "step ms: median (q1-q3)",
)
MEMORY_COLUMNS = (
    "mode",
    "adapter params: total / per rank",
    "adapter MiB/rank",
    "AdamW state MiB/rank",
    "grads MiB/rank",
    "adapter FLOPs/token/rank",
    "/ frozen linears'",
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
    blocks: int = 5
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
    p.add_argument("--steps", type=int, default=60, help="timed repetitions (one step per mode each)")
    p.add_argument(
        "--blocks", type=int, default=5, help="also report the overhead of each run of steps/blocks reps"
    )
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


def sharding_of_mode(mode: str) -> str:
    """The ``parallelize`` sharding a mode runs under (base: no adapter, BD-LoRA's layout)."""
    return mode if mode in ("slora", "replicated") else "bdlora"


def build_model(args: BenchArgs, mode: str, mesh: DeviceMesh) -> nn.Module:
    """A seeded Llama (equal base weights in every mode) on ``mesh``, with ``mode``'s adapter.

    Every adapter has rank R; ``parallelize`` makes the slora and replicated ones dense (nblocks 1)."""
    config = llama_config(
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab, max(args.seq, 128)
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).train()
    parallelize(model, mesh, sharding=sharding_of_mode(mode), **args.parallel_options)
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


def make_train_step(
    model: nn.Module, tokens: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer | None]:
    """forward + backward (+ AdamW over the adapter factors, when there are any), and the optimizer."""
    factors = adapter_factors(model)
    optimizer = torch.optim.AdamW(factors, lr=1e-4) if factors else None

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)  # adapter and embedding grads alike

    return step, optimizer


def make_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """forward + backward (+ AdamW over the adapter factors, when there are any)."""
    return make_train_step(model, tokens)[0]


EMPTY = {"count": 0, "bytes": 0, "wire_bytes": 0.0, "ops": {}}


def minus(total: dict, part: dict) -> dict:
    """One ``CommCounter`` summary less an earlier one of the same counter (backward = total - forward)."""
    ops = {op: n - part["ops"].get(op, 0) for op, n in total["ops"].items()}
    return {
        "count": total["count"] - part["count"],
        "bytes": total["bytes"] - part["bytes"],
        "wire_bytes": total["wire_bytes"] - part["wire_bytes"],
        "ops": {op: n for op, n in ops.items() if n},
    }


def count_step(model: nn.Module, tokens: torch.Tensor, group: dist.ProcessGroup) -> dict:
    """TP-group collectives of one forward, its backward and both; this rank's adapter gradient bytes."""
    with CommCounter({"tp": group}) as comm:
        loss = model(input_ids=tokens, labels=tokens).loss
        forward = comm.summary().get("tp", EMPTY)
        loss.backward()
    total = comm.summary().get("tp", EMPTY)
    grads = storage_bytes(p.grad for p in adapter_factors(model) if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"forward": forward, "backward": minus(total, forward), "total": total, "grad_bytes": grads}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def adapter_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """This rank's adapter parameters (elements and bytes) and AdamW state bytes (after a step)."""
    factors = adapter_factors(model)
    moments = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()]
    return {
        "params": sum(p.numel() for p in factors),
        "bytes": storage_bytes(factors),
        "optimizer": storage_bytes(v for v in moments if isinstance(v, torch.Tensor)),
    }


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


def load_average() -> str:
    """The machine's 1/5/15-minute load average: other work on the cores skews every timing."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fmt_mib(n: float) -> str:
    return f"{n / MiB:.3f} MiB"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); one value gives itself three times."""
    if len(values) < 2:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt_ops(summary: dict) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(summary["ops"].items())) or "none"


def print_table(comm: dict, times: dict[str, list[float]], modes: tuple[str, ...]) -> None:
    """One row per mode; counts, bytes and wire bytes as forward + backward of one step."""
    base = comm["base"]["total"]
    print0("| " + " | ".join(COLUMNS) + " |")
    print0("|" + "---|" * len(COLUMNS))
    for mode in modes:
        fwd, bwd, tot = (comm[mode][k] for k in ("forward", "backward", "total"))
        added = f"+{tot['count'] - base['count']} coll, +{fmt_mib(tot['bytes'] - base['bytes'])}"
        q1, q2, q3 = (1e3 * q for q in quartiles(times[mode]))
        print0(
            f"| {LABELS[mode]} | {fwd['count']} ({fmt_ops(fwd)}) + {bwd['count']} ({fmt_ops(bwd)}) "
            f"| {fmt_mib(fwd['bytes'])} + {fmt_mib(bwd['bytes'])} "
            f"| {fmt_mib(fwd['wire_bytes'])} + {fmt_mib(bwd['wire_bytes'])} "
            f"| {added} | {q2:.1f} ({q1:.1f}-{q3:.1f}) |"
        )
    print0(
        "(collectives, bytes and wire bytes: forward + backward of one step; step ms over the slowest rank)"
    )


def print_extra_check(measured: dict, predicted: dict) -> None:
    for key, value in measured.items():
        want = predicted[key]
        verdict = "match" if abs(value - want) <= 1e-6 * max(abs(want), 1) else "MISMATCH"
        print0(f"  {key:<19} predicted {want:>14,.1f}   measured {value:>14,.1f}   {verdict}")


def extra_over_base(comm: dict, mode: str) -> dict[str, float]:
    run, base = comm[mode], comm["base"]
    return {
        "count": run["total"]["count"] - base["total"]["count"],
        "bytes": run["total"]["bytes"] - base["total"]["bytes"],
        "wire_bytes": run["total"]["wire_bytes"] - base["total"]["wire_bytes"],
        "forward_wire_bytes": run["forward"]["wire_bytes"] - base["forward"]["wire_bytes"],
    }


def print_slora_check(comm: dict, predicted: dict, tokens: int, tp: int) -> None:
    """S-LoRA's measured traffic over the base's against ``slora_extra_bytes``."""
    print0(f"S-LoRA extra over base vs slora_extra_bytes(plan, tokens={tokens}, tp={tp}):")
    print_extra_check(extra_over_base(comm, "slora"), predicted)


def replicated_extra_bytes(model: nn.Module, tp: int) -> dict[str, float]:
    """What ``replicated`` adds to the base: one all-reduce, in backward, of its whole factors'
    gradients (column A, row B), flattened; nothing in forward. Independent of the tokens."""
    size = sum(p.numel() * p.element_size() for p in replicated_factors(model))
    return {"count": 1, "bytes": size, "wire_bytes": 2 * (tp - 1) / tp * size, "forward_wire_bytes": 0.0}


def print_replicated_check(comm: dict, predicted: dict, tp: int) -> None:
    print0(f"replicated extra over base vs one all-reduce of its whole factors' gradients (tp={tp}):")
    print_extra_check(extra_over_base(comm, "replicated"), predicted)


def linear_flops(model: nn.Module) -> tuple[float, float]:
    """Per token, this rank: (frozen linears, adapter) FLOPs of a training step.

    A frozen linear computes its output and its input gradient (2 GEMMs: 4 FLOPs per weight
    element); an adapter factor also its weight gradient (3 GEMMs: 6 FLOPs per element). Every
    factor a rank holds runs on every token, so the count follows the elements it holds: a whole
    (replicated) factor costs every rank all of its FLOPs.
    """
    base = adapter = 0.0
    for _, layer in bdlora_layers(model):
        base += 4 * layer.base_layer.weight.numel()
        adapter += 6 * sum(p.numel() for p in (*layer.lora_A.values(), *layer.lora_B.values()))
    return base, adapter


def print_memory(state: dict, totals: dict, flops: dict, modes: tuple[str, ...]) -> None:
    """Per rank (the largest over ranks): adapter, AdamW state, gradients and adapter FLOPs."""
    print0("| " + " | ".join(MEMORY_COLUMNS) + " |")
    print0("|" + "---|" * len(MEMORY_COLUMNS))
    for mode in modes:
        base_flops, adapter_flops = flops[mode]
        s = state[mode]
        print0(
            f"| {LABELS[mode]} | {totals[mode]:,} / {s['params']:,} | {s['bytes'] / MiB:.3f} "
            f"| {s['optimizer'] / MiB:.3f} | {s['grad_bytes'] / MiB:.3f} "
            f"| {adapter_flops:,.0f} | {100 * adapter_flops / base_flops:.2f}% |"
        )
    print0(
        "(per rank, the largest over ranks; grads after one backward; AdamW state after the timed "
        "steps: exp_avg, exp_avg_sq and a step count per factor; FLOPs per token of a training step)"
    )


def paired(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    return quartiles([x / y for x, y in zip(times[a], times[b])])


def print_ratios(times: dict[str, list[float]], flops: dict, modes: tuple[str, ...], blocks: int) -> None:
    medians = {mode: statistics.median(times[mode]) for mode in modes}
    pairs = [("bdlora", "base"), *(("bdlora", m) for m in ("slora", "replicated") if m in modes)]
    pairs += [(m, "base") for m in ("slora", "replicated") if m in modes]
    for a, b in pairs:
        q1, q2, q3 = paired(times, a, b)
        label = f"step time {LABELS[a]} / {LABELS[b]}:"
        print0(
            f"{label:<31} {medians[a] / medians[b]:.3f}   "
            f"(paired ratios: median {q2:.3f}, quartiles {q1:.3f}-{q3:.3f})"
        )
    for mode in (m for m in modes if m != "base"):
        print_overhead(mode, times, flops[mode], blocks)


def print_overhead(mode: str, times: dict[str, list[float]], flops: tuple[float, float], blocks: int) -> None:
    """The adapter's step-time overhead over the frozen base as a multiple of its FLOP share.

    Each repetition times every mode back to back, so its ratio to the base's step of the same
    repetition cancels the machine's drift; the median over repetitions is the answer, the
    quartiles its spread, and the medians of ``blocks`` consecutive runs of repetitions show how
    far a shorter run would have strayed.
    """
    base_flops, adapter_flops = flops
    share = adapter_flops / base_flops
    overheads = [t / b - 1 for t, b in zip(times[mode], times["base"])]  # paired, per repetition
    q1, q2, q3 = quartiles(overheads)
    size = max(1, len(overheads) // max(1, blocks))
    per_block = [statistics.median(overheads[i : i + size]) / share for i in range(0, len(overheads), size)]
    print0(
        f"{LABELS[mode]} adapter FLOPs {100 * share:.2f}% of the frozen linears'; step-time overhead "
        f"{100 * q2:.1f}% (quartiles {100 * q1:.1f}-{100 * q3:.1f}%) = {q2 / share:.2f}x its FLOP share "
        f"({q1 / share:.2f}-{q3 / share:.2f}x); medians of {len(per_block)} runs of {size} repetitions: "
        f"{min(per_block):.2f}-{max(per_block):.2f}x"
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
        f"batch={args.batch} seq={args.seq}; rank={args.rank} alpha={2 * args.rank} (every adapter) "
        f"nblocks={world} (BD-LoRA; S-LoRA and replicated: dense); steps={args.steps} "
        f"warmup={args.warmup}; layout={args.layout}; load average {load_average()}"
    )
    modes = args.modes
    models = {mode: build_model(args, mode, mesh) for mode in modes}
    generator = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=generator)  # (B, T), every rank
    comm = {mode: count_step(models[mode], tokens, tp.group) for mode in modes}
    all_comm = gather({m: {k: c[k] for k in ("forward", "backward", "total")} for m, c in comm.items()})
    if any(c != all_comm[0] for c in all_comm):
        raise RuntimeError(f"ranks counted different collectives: {all_comm}")
    totals = {mode: adapters_of(models[mode])["default"].plan.params for mode in modes if mode != "base"}
    print0(
        f"collective counts identical on all {world} ranks; adapter params (unsharded, rank R={args.rank}): "
        + ", ".join(f"{LABELS[m]} {n:,}" for m, n in totals.items())
    )
    built = {mode: make_train_step(models[mode], tokens) for mode in modes}
    slowest = time_slowest({mode: step for mode, (step, _) in built.items()}, args)
    print_table(comm, slowest, modes)
    if "slora" in modes:
        extra = slora_extra_bytes(adapters_of(models["slora"])["default"].plan, args.batch * args.seq, world)
        print_slora_check(comm, extra, args.batch * args.seq, world)
    if "replicated" in modes:
        print_replicated_check(comm, replicated_extra_bytes(models["replicated"], world), world)
    adapters = tuple(m for m in modes if m != "base")
    local = {
        m: {**adapter_state(models[m], built[m][1]), "grad_bytes": comm[m]["grad_bytes"]} for m in adapters
    }
    per_rank = gather(local)
    state = {m: {k: max(r[m][k] for r in per_rank) for k in local[m]} for m in adapters}
    flops = {m: linear_flops(models[m]) for m in modes}  # equal on every rank (even splits)
    print_memory(state, totals, flops, adapters)
    print_ratios(slowest, flops, modes, args.blocks)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(argv, args.tp or 2))
    run_rank(run, args)


if __name__ == "__main__":
    main()
