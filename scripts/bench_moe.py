"""Training-step time of BD-LoRA on a mixture-of-experts model: attention only, and attention + experts.

A small Qwen3-MoE (built from a ``Qwen3MoeConfig``, random weights, fp32) is built several times
from one seed, so every variant has the same base weights and the same routing:

- ``base``: the frozen base, no adapter;
- ``base-loop`` (TP 1 only): the same frozen base with its experts module replaced by
  ``bdlora.experts.BDLoraExperts`` without an adapter. At TP 1 transformers runs the base experts
  with its default ``experts_implementation`` (``grouped_mm``), while an adapter on the experts
  replaces that module with bdlora's loop over the experts that received tokens; this row
  separates the cost of that loop from the adapter's own. At TP > 1 ``parallelize`` wraps the
  experts in every variant (that is how they are sharded), so ``base`` already runs the loop;
- ``attn``: BD-LoRA on q, k, v and o;
- ``experts``: BD-LoRA on q, k, v, o and every expert's ``gate_up_proj`` and ``down_proj``
  (``target_parameters``): one adapter per expert.

In every variant the input embedding's weight requires grad, so backward runs through every block
even without an adapter (as in scripts/bench_tp.py). One step is forward + backward (+ AdamW over
the adapter factors, when there are any) + zero_grad. The variants interleave within each
repetition, in an order that rotates; under torchrun a step starts after a barrier and its time
is the slowest rank's. The table reports the median, the minimum, the mean and standard
deviation, and, against ``base``, the ratio of medians with the median and quartiles of the
per-repetition (paired) ratios. Under torchrun it also counts the TP group's collectives of one
step per variant with ``CommCounter`` (the adapters should add none).

Adapter FLOP share (analytic, from the config; the script checks it against the factor shapes).
Per token and layer, with hidden size H, h query heads and g KV heads of size d, expert
intermediate size I, k experts per token, rank r and N blocks, a linear layer ``d_in -> d_out``
costs the frozen base ``2 d_in d_out`` FLOPs forward, and BD-LoRA
``2 r (d_in + d_out / N)`` (column: q, k, v, gate_up; B block-diagonal) or
``2 r (d_in / N + d_out)`` (row: o, down; A block-diagonal). Attention linears run on every
token; each expert tensor runs on the k routed visits of each token (the routed tokens: T k in
all, whatever the balance between experts):

    F_base = 2 H (h d + 2 g d) + 2 h d H          + k [2 H 2I + 2 I H]
    F_attn = 2r (H + h d/N) + 2 x 2r (H + g d/N) + 2r (h d/N + H)
    F_exp  = k [2r (H + 2I/N) + 2r (I/N + H)]

In a training step the frozen base runs forward and the input gradient (~2x forward), an adapter
factor forward, input gradient and weight gradient (~3x forward), so the share of the
attention + experts adapter is ``3 (F_attn + F_exp) / (2 F_base)``. Left out of F_base: the
router (2 H E per token), attention scores, norms, the LM head and the embedding gradient. Under
TP every term is split over the ranks alike (with balanced routing), so the share does not depend
on the TP degree. The step-time overhead of ``experts`` over ``base`` is printed as a multiple of
that share, as bench_tp.py does for dense models.

    python scripts/bench_moe.py                        # TP 1, one process, one thread: < 1 min
    python scripts/bench_moe.py --tp 2 --ep 2          # launches torchrun itself (2 ranks)
    torchrun --nproc-per-node 2 scripts/bench_moe.py --ep 1
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from bench_tp import adapter_factors, launch, launch_command
from benchlib import gather, make_train_step, time_interleaved
from rank_main import run_rank
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from bdlora import BDLoraConfig, apply_bdlora
from bdlora.experts import BDLoraExperts, ExpertLinear, experts_modules, is_experts, wrap_experts
from bdlora.model import bdlora_layers
from bdlora.parallel import ParallelDims, build_mesh, init_distributed, parallelize
from bdlora.parallel.accounting import CommCounter
from bdlora.parallel.mesh import tp_of_mesh

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TENSORS = ["gate_up_proj", "down_proj"]
LABELS = {
    "base": "frozen base",
    "base-loop": "frozen base, bdlora's expert loop",
    "attn": "BD-LoRA attention",
    "experts": "BD-LoRA attention + experts",
}


@dataclass(frozen=True)
class BenchArgs:
    tp: int
    ep: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    moe_intermediate: int
    vocab: int
    seq: int
    batch: int
    rank: int
    nblocks: int | None
    steps: int
    warmup: int
    threads: int
    seed: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, default=1, help="ranks; > 1 launches torchrun (default 1: one process)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree, dividing --tp")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="head dim = hidden / heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--moe-intermediate", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank R (global, before sharding)")
    p.add_argument(
        "--nblocks",
        type=int,
        default=None,
        help="BD-LoRA blocks N (default: the smallest valid, 2 unless TP splits experts: 2 tp/ep)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed repetitions (one step per variant each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions")
    p.add_argument(
        "--threads", type=int, default=1, help="per process (TP 1 too: steadier on a busy machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = BenchArgs(**vars(p.parse_args(argv)))
    resolve(args, args.tp)  # fail before launching any rank
    return args


def resolve(args: BenchArgs, tp: int) -> BenchArgs:
    """``args`` at TP degree ``tp`` (torchrun's world size), nblocks defaulted, checked."""
    args = replace(args, tp=tp, nblocks=args.nblocks or default_nblocks(tp, args.ep))
    check_args(args)
    return args


def default_nblocks(tp: int, ep: int) -> int:
    """The smallest N that every layout here accepts: a multiple of 2, of tp, and, where tp/ep > 1
    ranks split each expert, of 2 tp/ep (gate_up's gate and up halves are split alike)."""
    expert_tp = tp // ep if ep >= 1 and tp % ep == 0 else 1
    return math.lcm(2, max(tp, 1), 2 * expert_tp if expert_tp > 1 else 1)


def check_args(args: BenchArgs) -> None:
    if args.tp < 1 or args.ep < 1 or args.tp % args.ep:
        raise SystemExit(f"bench_moe: --ep {args.ep} must be >= 1 and divide --tp {args.tp}")
    problems = []
    if args.nblocks % args.tp:
        problems.append(f"--tp {args.tp} must divide --nblocks {args.nblocks}")
    expert_tp = args.tp // args.ep
    if expert_tp > 1 and args.nblocks % (2 * expert_tp):
        problems.append(
            f"--nblocks {args.nblocks} must be a multiple of 2 x tp/ep = {2 * expert_tp} (each rank "
            f"holds whole blocks of gate_up's gate and up halves); raise it or --ep"
        )
    if args.hidden % args.heads or args.heads % args.kv_heads:
        problems.append("--heads must divide --hidden, and --kv-heads --heads")
    if args.kv_heads % args.tp or args.experts % args.ep or args.top_k > args.experts:
        problems.append("--tp must divide --kv-heads, --ep --experts, and --top-k <= --experts")
    if args.rank % args.nblocks:
        problems.append(f"--nblocks {args.nblocks} must divide --rank {args.rank}")
    if problems:
        raise SystemExit("bench_moe: " + "; ".join(problems))


def moe_config(args: BenchArgs) -> Qwen3MoeConfig:
    """Every layer a MoE layer (no shared expert in Qwen3-MoE), no router aux loss."""
    return Qwen3MoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate,  # dense MLPs: none (decoder_sparse_step 1)
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
        output_router_logits=False,
    )


def adapter_config(args: BenchArgs, variant: str) -> BDLoraConfig:
    return BDLoraConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        nblocks=args.nblocks,
        target_modules=ATTENTION,
        target_parameters=EXPERT_TENSORS if variant == "experts" else [],
    )


def build_model(args: BenchArgs, variant: str, mesh) -> nn.Module:
    """A seeded Qwen3-MoE (equal base weights in every variant), parallel over ``mesh`` when given,
    with ``variant``'s adapter; the base frozen, the embedding weight requiring grad."""
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(moe_config(args)).train()
    if mesh is not None:
        parallelize(model, mesh, ep=args.ep)
    if variant == "base-loop":
        for name, _ in list(experts_modules(model)):
            wrap_experts(model, name)
    if variant in ("attn", "experts"):
        apply_bdlora(model, adapter_config(args, variant))
    model.requires_grad_(False)
    for factor in adapter_factors(model):
        factor.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(True)  # backward reaches every block
    return model


# -- FLOPs ---------------------------------------------------------------------------------------------
def analytic_flops(args: BenchArgs) -> dict[str, float]:
    """Forward FLOPs per token of the frozen linears and of each adapter (the docstring's formula)."""
    h, r, n, k = args.hidden, args.rank, args.nblocks, args.top_k
    q, kv, i = args.heads * args.head_dim, args.kv_heads * args.head_dim, args.moe_intermediate

    def column(d_in: int, d_out: int) -> float:
        return 2 * r * (d_in + d_out / n)

    def row(d_in: int, d_out: int) -> float:
        return 2 * r * (d_in / n + d_out)

    base = 2 * h * (q + 2 * kv) + 2 * q * h + k * (2 * h * 2 * i + 2 * i * h)
    attn = column(h, q) + 2 * column(h, kv) + row(q, h)
    experts = k * (column(h, 2 * i) + row(i, h))
    return {"base": args.layers * base, "attn": args.layers * attn, "experts": args.layers * experts}


def flop_share(flops: dict[str, float], variant: str) -> float:
    """Adapter FLOPs of a training step (3x forward) over the frozen linears' (2x forward)."""
    adapter = flops["attn"] + (flops["experts"] if variant == "experts" else 0.0)
    return 3 * adapter / (2 * flops["base"])


def counted_flops(model: nn.Module, top_k: int, num_experts: int) -> dict[str, float]:
    """The same forward FLOPs per token on this rank, from the tensors it holds: 2 per weight or
    factor element, an expert tensor's scaled by ``k / E`` (its expected routed visits per token)."""
    routed = top_k / num_experts
    base = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            base += 2 * module.weight.numel()
        if is_experts(module):
            for p_name in EXPERT_TENSORS:
                tensor = getattr(module, p_name)
                weight = tensor.weight if isinstance(tensor, nn.Module) else tensor
                base += 2 * routed * weight.numel()
    out = {"base": base, "attn": 0.0, "experts": 0.0}
    for _, layer in bdlora_layers(model):
        numel = sum(p.numel() for p in (*layer.lora_A.values(), *layer.lora_B.values()))
        if isinstance(layer, ExpertLinear):
            out["experts"] += 2 * routed * numel
        else:
            out["attn"] += 2 * numel
    return out


# -- collectives -----------------------------------------------------------------------------------------
def count_step(model: nn.Module, tokens: torch.Tensor, group) -> dict:
    """TP-group collectives of one forward and one forward+backward."""
    empty = {"count": 0, "bytes": 0, "wire_bytes": 0.0, "ops": {}}
    with CommCounter({"tp": group}) as comm:
        loss = model(input_ids=tokens, labels=tokens).loss
        forward = comm.summary().get("tp", empty)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": forward, "total": comm.summary().get("tp", empty)}


# -- report ----------------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def ratio_to(times: dict[str, list[float]], variant: str, ref: str) -> dict[str, float]:
    paired = [a / b for a, b in zip(times[variant], times[ref])]
    low, high = quartiles(paired)
    return {
        "medians": statistics.median(times[variant]) / statistics.median(times[ref]),
        "paired": statistics.median(paired),
        "q1": low,
        "q3": high,
    }


def print_table(
    times: dict[str, list[float]], shares: dict[str, float], params: dict[str, int], comm: dict | None
) -> None:
    columns = [
        "variant",
        "adapter params (rank 0)",
        "adapter FLOPs / base",
        "median ms",
        "min ms",
        "mean ± sd ms",
    ]
    columns += ["/ base (paired)"]
    if comm is not None:
        columns += ["TP collectives fwd / total", "added vs base"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for variant, ts in times.items():
        sd = statistics.stdev(ts) if len(ts) > 1 else 0.0
        share = f"{100 * shares[variant]:.2f}%" if variant in shares else "-"
        if variant == "base":
            rel = "1.000"
        else:
            r = ratio_to(times, variant, "base")
            rel = f"{r['medians']:.3f} ({r['paired']:.3f})"
        cells = [LABELS[variant], f"{params[variant]:,}", share, f"{1e3 * statistics.median(ts):.1f}"]
        cells += [f"{1e3 * min(ts):.1f}"]
        cells += [f"{1e3 * statistics.mean(ts):.1f} ± {1e3 * sd:.1f}", rel]
        if comm is not None:
            tot, base = comm[variant]["total"], comm["base"]["total"]
            ops = ", ".join(f"{op} {n}" for op, n in sorted(tot["ops"].items()))
            cells += [f"{comm[variant]['forward']['count']} / {tot['count']} ({ops})"]
            cells += [f"+{tot['count'] - base['count']} coll, +{tot['bytes'] - base['bytes']} B"]
        print("| " + " | ".join(cells) + " |")


def print_ratios(times: dict[str, list[float]], shares: dict[str, float]) -> None:
    pairs = [(v, "base") for v in ("base-loop", "attn", "experts") if v in times]
    if "base-loop" in times:
        pairs.append(("experts", "base-loop"))
    for variant, ref in pairs:
        r = ratio_to(times, variant, ref)
        label = f"step time {variant} / {ref}:"
        print(
            f"{label:<34} {r['medians']:.3f}   (paired median {r['paired']:.3f}, "
            f"quartiles {r['q1']:.3f}-{r['q3']:.3f})"
        )
    for variant in ("attn", "experts"):
        overhead = ratio_to(times, variant, "base")["medians"] - 1
        print(
            f"overhead {variant} over base: {100 * overhead:.1f}% = "
            f"{overhead / shares[variant]:.2f}x its FLOP share ({100 * shares[variant]:.2f}%)"
        )


# -- the run -----------------------------------------------------------------------------------------------
def run(args: BenchArgs) -> None:
    multi = "RANK" in os.environ
    world = init_distributed() if multi else 1
    if multi and world != args.tp != 1:
        raise SystemExit(f"--tp {args.tp} but torchrun started {world} ranks; drop --tp or match them")
    args = resolve(args, world)
    torch.set_num_threads(args.threads)
    mesh = build_mesh(ParallelDims(world, tp=world)) if multi and world > 1 else None
    rank0 = not multi or dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    say("$ " + (launch_command() if multi else "python " + shlex.join(sys.argv)), flush=True)
    say(
        f"torch {torch.__version__}, CPU, fp32, {world} process(es) x {torch.get_num_threads()} thread(s)"
        f"{', gloo' if mesh is not None else ''}; tp={args.tp} ep={args.ep}; qwen3_moe hidden={args.hidden} "
        f"layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} experts={args.experts} "
        f"top_k={args.top_k} moe_intermediate={args.moe_intermediate} vocab={args.vocab}; "
        f"batch={args.batch} seq={args.seq}; rank={args.rank} alpha={2 * args.rank} "
        f"nblocks={args.nblocks}; steps={args.steps} warmup={args.warmup}",
        flush=True,
    )
    variants = ["base", *(["base-loop"] if mesh is None else []), "attn", "experts"]
    models = {v: build_model(args, v, mesh) for v in variants}
    if any(not isinstance(m, BDLoraExperts) for _, m in experts_modules(models["experts"])):
        raise RuntimeError("the experts variant has an experts module without BD-LoRA")
    tokens = torch.randint(
        args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1)
    )
    flops = analytic_flops(args)
    shares = {v: flop_share(flops, v) for v in ("attn", "experts")}
    counted = counted_flops(models["experts"], args.top_k, args.experts)
    check = {key: counted[key] * args.tp / flops[key] for key in flops}  # per rank x tp vs whole model
    if any(not math.isclose(c, 1.0, rel_tol=1e-9) for c in check.values()):
        raise RuntimeError(f"counted / analytic FLOPs per token: {check}")
    say(
        f"forward FLOPs per token (analytic = counted from the factors x tp): frozen linears "
        f"{flops['base']:,.0f}, attention adapter {flops['attn']:,.0f}, expert adapters "
        f"{flops['experts']:,.0f}",
        flush=True,
    )
    comm = None
    if mesh is not None:
        group = tp_of_mesh(mesh).group
        comm = {v: count_step(models[v], tokens, group) for v in variants}
        all_comm = gather(comm)
        if any(c != all_comm[0] for c in all_comm):
            raise RuntimeError(f"ranks counted different collectives: {all_comm}")
    steps = {v: make_train_step(models[v], tokens)[0] for v in variants}
    barrier = dist.barrier if mesh is not None else None
    times = time_interleaved(steps, args.warmup, args.steps, barrier)
    if mesh is not None:  # each step's time on the slowest rank
        per_rank = gather(times)
        times = {v: [max(r[v][i] for r in per_rank) for i in range(args.steps)] for v in variants}
    params = {v: sum(p.numel() for p in adapter_factors(models[v])) for v in variants}
    if rank0:
        print_table(times, shares, params, comm)
        print_ratios(times, shares)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ and args.tp > 1:
        sys.exit(launch(argv, args.tp, script=__file__))
    run_rank(run, args)


if __name__ == "__main__":
    main()
