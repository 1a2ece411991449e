"""Training-step speed of bdlora against PEFT's own BD-LoRA at TP degree 1, side by side.

One step is forward + backward + AdamW step + zero_grad on a small Llama built from a
``LlamaConfig``. Both models start from the same base weights and the same adapter factors
(bdlora's, copied into PEFT through PEFT's own state-dict loader), and the script asserts that
they give the same loss and the same adapter gradients before it times anything, so the two
columns measure equal work. Steps alternate A B, B A, ... so drift (thermal, other processes)
lands on both sides alike; the table reports medians, and the quartiles of the per-repetition
ratios show how much of the difference is noise.

    python scripts/bench_tp1.py                        # defaults: well under a minute on 2 cores
    python scripts/bench_tp1.py --rank 32 --nblocks 4

A third column, ``peft_lora``, is PEFT's standard LoRA at the rank whose parameter count is nearest
bdlora's (BD-LoRA's block-diagonal factor has 1/nblocks of the parameters, so that rank is lower).
The ratios ``bdlora / peft`` and ``bdlora / peft_lora`` are lower-is-better.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import peft
import torch
from peft import BdLoraConfig, LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import nn
from transformers import LlamaForCausalLM

import bdlora
from bdlora.model import bdlora_layers
from bdlora.peft_io import adapter_tensors
from bdlora.presets import llama_config

ROW_TARGETS = ["o_proj", "down_proj"]
COLUMN_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
ADAPTER = "default"


@dataclass(frozen=True)
class BenchArgs:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    rank: int
    nblocks: int
    steps: int
    warmup: int
    threads: int
    seed: int


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--nblocks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: all")
    p.add_argument("--seed", type=int, default=0)
    return BenchArgs(**vars(p.parse_args(argv)))


def build_base(args: BenchArgs, device: torch.device) -> nn.Module:
    config = llama_config(
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab, max(args.seq, 128)
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.float32).train()


def build_pair(args: BenchArgs, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(bdlora model, PEFT model) on identical base weights and identical adapter factors."""
    base = build_base(args, device)
    targets = ROW_TARGETS + COLUMN_TARGETS
    config = bdlora.BDLoraConfig(
        rank=args.rank, alpha=2 * args.rank, nblocks=args.nblocks, target_modules=targets
    )
    ours = bdlora.apply_bdlora(copy.deepcopy(base), config)
    theirs = get_peft_model(
        base,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=targets,
            use_bdlora=BdLoraConfig(
                target_modules_bd_a=ROW_TARGETS, target_modules_bd_b=COLUMN_TARGETS, nblocks=args.nblocks
            ),
        ),
    )
    # B = 0 at init would make any adapter bug invisible to the loss check: give B real values.
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for _, layer in bdlora_layers(ours):
            b = layer.lora_B[ADAPTER]
            b.copy_(0.02 * torch.randn(b.shape, generator=generator))
    result = set_peft_model_state_dict(theirs, adapter_tensors(ours, ADAPTER, "peft-bdlora"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"factor copy into PEFT failed: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return ours, theirs


def build_peft_lora(args: BenchArgs, device: torch.device, params: int) -> tuple[nn.Module, int]:
    """PEFT's standard LoRA on the same base, at the rank whose parameter count is nearest ``params``."""
    base = build_base(args, device)
    targets = ROW_TARGETS + COLUMN_TARGETS
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    rank = max(1, round(params / per_rank))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    return model, rank


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def check_equal_work(ours: nn.Module, theirs: nn.Module, tokens: torch.Tensor) -> float:
    """Assert equal trainable counts, losses and adapter gradients; returns the loss."""
    n_ours, n_theirs = (sum(p.numel() for p in trainable(m)) for m in (ours, theirs))
    assert n_ours == n_theirs, f"trainable params differ: bdlora {n_ours} vs peft {n_theirs}"
    loss_ours, loss_theirs = loss_of(ours, tokens), loss_of(theirs, tokens)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    for name, layer in bdlora_layers(ours):
        peer = theirs.get_submodule(f"base_model.model.{name}")
        for factor in ("lora_A", "lora_B"):
            got = getattr(layer, factor)[ADAPTER].grad
            want = getattr(peer, factor)[ADAPTER].weight.grad
            where = f"{name}.{factor}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
    return float(loss_ours.detach())


def make_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        loss_of(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one step, with the device queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_interleaved(steps: dict[str, Callable[[], None]], args: BenchArgs, device: torch.device):
    """Per-step seconds of each implementation; the order rotates every repetition."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.steps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(steps[name], device)
            if rep >= args.warmup:
                times[name].append(seconds)
    return times


def report(times: dict[str, list[float]], params: dict[str, int], tokens_per_step: int) -> None:
    print(f"{'impl':<8} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'tokens/s':>10} {'trainable':>11}")
    for name, seconds in times.items():
        med = statistics.median(seconds)
        print(
            f"{name:<8} {1e3 * med:>10.2f} {1e3 * min(seconds):>9.2f} {1e3 * max(seconds):>9.2f} "
            f"{tokens_per_step / med:>10.0f} {params[name]:>11,}"
        )
    for other in [name for name in times if name != "bdlora"]:
        paired = [a / b for a, b in zip(times["bdlora"], times[other])]
        low, mid, high = statistics.quantiles(paired, n=4)
        ratio = statistics.median(times["bdlora"]) / statistics.median(times[other])
        print(
            f"ratio bdlora / {other} (of median steps): {ratio:.3f}; paired per-repetition ratios: "
            f"median {mid:.3f}, quartiles {low:.3f}-{high:.3f}  [lower is better]"
        )


def main(argv: list[str] | None = None) -> None:
    print("$ python " + shlex.join(sys.argv))
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, device {device}, threads "
        f"{torch.get_num_threads()}, fp32"
    )
    print(
        f"llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
        f"heads={args.heads} vocab={args.vocab}; batch={args.batch} seq={args.seq}; "
        f"rank={args.rank} alpha={2 * args.rank} nblocks={args.nblocks}; "
        f"steps={args.steps} warmup={args.warmup}"
    )
    ours, theirs = build_pair(args, device)
    generator = torch.Generator().manual_seed(args.seed + 2)
    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=generator).to(device)  # (B, T)
    loss = check_equal_work(ours, theirs, tokens)
    print(f"equal work: loss {loss:.6f} and adapter grads match on copied factors")
    n_ours = sum(p.numel() for p in trainable(ours))
    lora, lora_rank = build_peft_lora(args, device, n_ours)
    print(f"peft_lora: PEFT standard LoRA, rank {lora_rank} (the parameter count nearest bdlora's)")
    models = {"bdlora": ours, "peft": theirs, "peft_lora": lora}
    times = run_interleaved({name: make_step(m, tokens) for name, m in models.items()}, args, device)
    params = {name: sum(p.numel() for p in trainable(m)) for name, m in models.items()}
    report(times, params, args.batch * args.seq)


if __name__ == "__main__":
    main()
