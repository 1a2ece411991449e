"""GPU benchmark of the BD-LoRA layer on real per-shard shapes, and of a ~1B Llama training step.

Part 1 (layers): forward + backward of one linear layer as one tensor-parallel shard holds it, for
Llama-3.1-8B and -70B at TP 1, 2, 4, 8. Column layers (q_proj, k_proj, gate_proj) keep ``d_in``
and hold ``d_out / tp`` outputs; row layers (o_proj, down_proj) hold ``d_in / tp`` inputs and the
full ``d_out``. Variants, timed interleaved (the order flips every repetition), medians reported:

    base             F.linear(x, W) with W frozen; gradient w.r.t. x only
    replicated       dense LoRA of global rank r as the replicated scheme shards it (vLLM's default,
                     torchtitan, PEFT on a TP plan): A (r, d_in), B (d_out, r) on the shard's d_in x
                     d_out, the whole rank on every shard (+ one gradient all-reduce per step, not here)
    slora            dense LoRA of rank r as S-LoRA shards it, compute only (one GPU: its collective
                     per layer, an all-gather or all-reduce of the (T, r) activation, is not timed):
                     column A (r/t, d_in), B (d_out/t, r); row A (r, d_in/t), B (d_out/t, r)
    peft_bdlora      PEFT's own BD-LoRA ``lora.Linear`` (``LoraConfig(use_bdlora=...)``)
    bdlora           ``bdlora.layers.BDLoraLinear``
    bdlora_compiled  the same layer under ``torch.compile`` (CUDA by default, ``--compile`` on CPU)

BD-LoRA uses ``nblocks = tp`` at TP > 1, so each shard holds one block and rank ``r / tp``; at TP 1
it uses ``--nblocks`` (default 8: the adapter a TP-8 server would use). Before timing a shape the
script asserts that bdlora and PEFT give the same output and factor gradients on copied factors.

Part 2 (train): one training step (forward, backward, AdamW, zero_grad) of a random-weight ~1B
Llama with bdlora BD-LoRA on all seven projections against PEFT's standard LoRA at the same rank;
both keep their adapters in the model dtype. Tokens/s of interleaved steps, medians, the ratio.

    python scripts/bench_gpu.py                            # CUDA: full, bf16 (tens of minutes)
    python scripts/bench_gpu.py --ranks 16 --no-compile    # CUDA: one rank, eager only
    python scripts/bench_gpu.py --tiny                     # CPU: tiny shapes, fp32, seconds
    python scripts/bench_gpu.py --tiny --json out.json     # the rows as JSON as well
    python scripts/bench_gpu.py --tiny --threads 1         # a busy CPU: no threads spinning on it

Overheads are ``variant / base - 1`` (lower is better); ``bdlora/peft`` below 1 means bdlora is
faster than PEFT's BD-LoRA on the same work.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft import BdLoraConfig, LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

import bdlora
from bdlora.layers import BDLoraLinear, global_factor_shapes
from bdlora.presets import llama_config
from bdlora.roles import Role

ADAPTER = "default"
SCALE = 2.0  # alpha / r, the same for every variant
TRAIN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative; atol is this times max |want|
Step = Callable[[], None]


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def layers(self) -> dict[str, tuple[Role, int, int]]:
        """Layer name -> (role, unsharded d_in, unsharded d_out)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (Role.COLUMN, self.hidden, q),
            "k_proj": (Role.COLUMN, self.hidden, kv),
            "o_proj": (Role.ROW, q, self.hidden),
            "gate_proj": (Role.COLUMN, self.hidden, self.intermediate),
            "down_proj": (Role.ROW, self.intermediate, self.hidden),
        }


FULL_MODELS = (
    ModelShape("llama-3.1-8b", 4096, 14336, 32, 8, 128),
    ModelShape("llama-3.1-70b", 8192, 28672, 64, 8, 128),
)
# Same layer set and proportions (GQA, MLP ratio 3.5), divisible by 8 shards of 8 blocks.
TINY_MODELS = (
    ModelShape("tiny-8b-like", 64, 224, 8, 2, 8),
    ModelShape("tiny-70b-like", 128, 448, 16, 2, 8),
)


@dataclass(frozen=True)
class TrainShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int


TRAIN_1B = TrainShape(2048, 5632, 16, 32, 8, 32000, batch=4, seq=1024)
TRAIN_TINY = TrainShape(64, 128, 2, 4, 2, 256, batch=2, seq=32)


@dataclass(frozen=True)
class BenchArgs:
    tiny: bool
    models: tuple[ModelShape, ...]
    layers: tuple[str, ...]
    tps: tuple[int, ...]
    ranks: tuple[int, ...]
    nblocks: int  # at TP 1; at TP > 1 nblocks = tp
    tokens: int
    warmup: int
    reps: int
    compile: bool | None  # None: on for CUDA only
    train: TrainShape | None
    train_rank: int
    train_nblocks: int
    train_steps: int
    dtype: str | None  # None: bf16 on CUDA, fp32 on CPU
    json: Path | None
    threads: int
    seed: int


@dataclass(frozen=True)
class Env:
    device: torch.device
    dtype: torch.dtype
    device_name: str


def make_env(args: BenchArgs) -> Env:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    elif args.tiny:
        device, name = torch.device("cpu"), "cpu"
    else:
        raise SystemExit(
            "bench_gpu.py: no CUDA device found; the full benchmark needs one. "
            "On CPU run `python scripts/bench_gpu.py --tiny` (tiny shapes, fp32)."
        )
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return Env(device, DTYPES[dtype_name], name)


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few repetitions (runs on CPU)")
    p.add_argument("--models", nargs="+", help="model names (default: all of the chosen size)")
    p.add_argument("--layers", nargs="+", default=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8], help="TP degrees")
    p.add_argument("--ranks", nargs="+", type=int, help="global ranks (default 16 64; --tiny: 8 16)")
    p.add_argument("--nblocks", type=int, default=8, help="BD-LoRA blocks at TP 1")
    p.add_argument("--tokens", type=int, help="tokens per layer call (default 4096; --tiny: 32)")
    p.add_argument("--warmup", type=int, help="untimed calls or steps per side (default 5; --tiny: 1)")
    p.add_argument("--reps", type=int, help="timed calls per variant (default 20; --tiny: 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on CUDA only")
    p.add_argument("--no-train", action="store_true", help="skip the training-step part")
    p.add_argument("--train-rank", type=int, default=16)
    p.add_argument("--train-nblocks", type=int, default=8)
    p.add_argument("--train-steps", type=int, help="timed steps per side (default 10; --tiny: 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    models = pick_models(TINY_MODELS if a.tiny else FULL_MODELS, a.models)
    return BenchArgs(
        tiny=a.tiny,
        models=models,
        layers=tuple(a.layers),
        tps=tuple(a.tp),
        ranks=tuple(a.ranks or ([8, 16] if a.tiny else [16, 64])),
        nblocks=a.nblocks,
        tokens=a.tokens or (32 if a.tiny else 4096),
        warmup=a.warmup if a.warmup is not None else (1 if a.tiny else 5),
        reps=a.reps or (3 if a.tiny else 20),
        compile=a.compile,
        train=None if a.no_train else (TRAIN_TINY if a.tiny else TRAIN_1B),
        train_rank=a.train_rank,
        train_nblocks=a.train_nblocks,
        train_steps=a.train_steps or (3 if a.tiny else 10),
        dtype=a.dtype,
        json=a.json,
        threads=a.threads,
        seed=a.seed,
    )


def pick_models(known: tuple[ModelShape, ...], names: list[str] | None) -> tuple[ModelShape, ...]:
    if not names:
        return known
    by_name = {m.name: m for m in known}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; valid here: {', '.join(by_name)}")
    return tuple(by_name[n] for n in names)


@dataclass(frozen=True)
class LayerCase:
    """One layer as one TP shard holds it; d_in and d_out are the shard's, rank and nblocks global."""

    model: str
    layer: str
    role: Role
    tp: int
    d_in: int
    d_out: int
    rank: int
    nblocks: int

    @property
    def rank_local(self) -> int:
        return self.rank // self.tp

    @property
    def blocks_local(self) -> int:
        return self.nblocks // self.tp


def shard_shape(role: Role, d_in: int, d_out: int, tp: int) -> tuple[int, int]:
    """(d_in, d_out) of one shard: a column layer splits its outputs, a row layer its inputs."""
    return (d_in, d_out // tp) if role is Role.COLUMN else (d_in // tp, d_out)


def layer_cases(args: BenchArgs) -> list[LayerCase]:
    cases = []
    for model in args.models:
        shapes = model.layers()
        for layer in args.layers:
            if layer not in shapes:
                raise SystemExit(f"--layers: unknown {layer!r}; valid: {', '.join(shapes)}")
            role, d_in, d_out = shapes[layer]
            for tp in args.tps:
                nblocks = args.nblocks if tp == 1 else tp
                for rank in args.ranks:
                    d_in_shard, d_out_shard = shard_shape(role, d_in, d_out, tp)
                    case = LayerCase(model.name, layer, role, tp, d_in_shard, d_out_shard, rank, nblocks)
                    check_case(case, d_in, d_out)
                    cases.append(case)
    return cases


def check_case(case: LayerCase, d_in: int, d_out: int) -> None:
    where = f"{case.model} {case.layer} at TP {case.tp}, rank {case.rank}"
    split = d_out if case.role is Role.COLUMN else d_in
    if split % case.nblocks or case.rank % case.nblocks:
        raise SystemExit(
            f"{where}: the split dimension {split} and the rank must be divisible by nblocks="
            f"{case.nblocks} (= TP degree, or --nblocks at TP 1); choose --ranks/--nblocks accordingly"
        )


def adapter_flops(role: Role, tokens: int, d_in: int, d_out: int, rank: int, nblocks: int) -> int:
    """FLOPs of one adapter forward + backward on ``tokens`` tokens, for the shapes it is given.

    Counted: the two factor matmuls at 2 FLOPs per multiply-add, each once forward and twice
    backward (gradient of its input, gradient of the factor). A block-diagonal factor costs only its
    packed entries, so each matmul is ``2 * tokens * numel(factor)``. Not counted: the scaling, the
    add into the base output, dropout.
    """
    shape_a, shape_b = global_factor_shapes(role, d_in, d_out, rank, nblocks)
    return 3 * 2 * tokens * (math.prod(shape_a) + math.prod(shape_b))


def base_flops(tokens: int, d_in: int, d_out: int) -> int:
    """Frozen base matmul: forward plus the input gradient (no weight gradient)."""
    return 2 * 2 * tokens * d_in * d_out


@dataclass
class Layers:
    """The variants of one case, all on the same frozen base weight."""

    base: nn.Linear
    lora_a: nn.Parameter  # (r, d_in)
    lora_b: nn.Parameter  # (d_out, r)
    bd: BDLoraLinear
    peft_layer: nn.Module  # peft.tuners.lora.Linear


@torch.no_grad()
def fill_normal_(w: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1/fan_in) in place: every variant's output then has unit scale for unit-scale x."""
    values = torch.randn(w.shape, generator=generator, device=w.device) / math.sqrt(fan_in)
    return w.copy_(values)


def build_layers(case: LayerCase, device: torch.device, dtype: torch.dtype, seed: int) -> Layers:
    generator = torch.Generator(device).manual_seed(seed)  # on the device: no host-side 0.5 GB weights
    base = nn.Linear(case.d_in, case.d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    fill_normal_(base.weight, case.d_in, generator)
    lora_a = nn.Parameter(torch.empty(case.rank, case.d_in, device=device, dtype=dtype))
    lora_b = nn.Parameter(torch.empty(case.d_out, case.rank, device=device, dtype=dtype))
    fill_normal_(lora_a, case.d_in, generator)
    fill_normal_(lora_b, case.rank, generator)
    bd = BDLoraLinear(base, case.role)
    bd.add_adapter(ADAPTER, case.rank_local, case.blocks_local, SCALE)
    a_local, b_local = bd.lora_A[ADAPTER], bd.lora_B[ADAPTER]
    fill_normal_(a_local, a_local.shape[1], generator)  # (r/t, d_in) or packed (r/t, d_in/n)
    fill_normal_(b_local, b_local.shape[1], generator)  # packed (d_out/t, r/t/n) or (d_out, r/t)
    peft_layer = build_peft_layer(case, base)
    copy_factors_(bd, peft_layer)
    return Layers(base, lora_a, lora_b, bd, peft_layer)


def build_peft_layer(case: LayerCase, base: nn.Linear) -> nn.Module:
    """PEFT's BD-LoRA layer around ``base`` (shared with bdlora's layer; both leave it frozen)."""
    holder = nn.Module()
    holder.add_module(case.layer, base)
    bd_a, bd_b = ([case.layer], []) if case.role is Role.ROW else ([], [case.layer])
    config = LoraConfig(
        r=case.rank_local,
        lora_alpha=SCALE * case.rank_local,
        target_modules=[case.layer],
        use_bdlora=BdLoraConfig(
            target_modules_bd_a=bd_a, target_modules_bd_b=bd_b, nblocks=case.blocks_local
        ),
    )
    # PEFT upcasts bf16 adapters to fp32 by default; bdlora keeps the model dtype: compare like with like.
    model = get_peft_model(holder, config, autocast_adapter_dtype=False)
    return model.get_submodule(f"base_model.model.{case.layer}")


@torch.no_grad()
def copy_factors_(bd: BDLoraLinear, peft_layer: nn.Module) -> None:
    """bdlora's packed factors into PEFT's: both pack block j as ``weight.chunk(n, 0)[j]``."""
    for factor in ("lora_A", "lora_B"):
        src, dst = getattr(bd, factor)[ADAPTER], getattr(peft_layer, factor)[ADAPTER].weight
        if src.shape != dst.shape:
            raise RuntimeError(f"{factor}: bdlora packs {tuple(src.shape)}, PEFT {tuple(dst.shape)}")
        dst.copy_(src)


def peft_factors(peft_layer: nn.Module) -> list[nn.Parameter]:
    return [peft_layer.lora_A[ADAPTER].weight, peft_layer.lora_B[ADAPTER].weight]


def bd_factors(bd: BDLoraLinear) -> list[nn.Parameter]:
    return [bd.lora_A[ADAPTER], bd.lora_B[ADAPTER]]


def check_equal_work(
    bd: BDLoraLinear, peft_layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, tol: float
) -> None:
    """Assert equal outputs and equal (A, B) gradients of the two BD-LoRA layers on the same x."""
    out_bd, out_peft = bd(x), peft_layer(x)  # (T, d_out)
    assert_near(out_bd, out_peft, tol, "output")
    grads_bd = torch.autograd.grad(out_bd, bd_factors(bd), grad_out)
    grads_peft = torch.autograd.grad(out_peft, peft_factors(peft_layer), grad_out)
    for name, got, want in zip(("grad A", "grad B"), grads_bd, grads_peft):
        assert_near(got, want, tol, name)


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    atol = tol * want.detach().abs().max().item()
    torch.testing.assert_close(
        got, want, rtol=tol, atol=atol, msg=lambda m: f"bdlora vs PEFT BD-LoRA, {what}: {m}"
    )


def fwd_bwd(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: list[nn.Parameter],
    gy: torch.Tensor,
) -> Step:
    """One forward + backward: gradients of x and of ``params`` (fresh, as after zero_grad)."""
    inputs = [x, *params]

    def step() -> None:
        torch.autograd.grad(forward(x), inputs, gy)

    return step


def dense_lora(layers: Layers) -> Callable[[torch.Tensor], torch.Tensor]:
    w, a, b = layers.base.weight, layers.lora_a, layers.lora_b

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, a) * SCALE  # (T, r)
        return F.linear(x, w) + F.linear(h, b)  # (T, d_out)

    return forward


def slora_lora(layers: Layers, role: Role, tp: int) -> tuple[Callable, list[nn.Parameter]]:
    """S-LoRA's per-shard work on the same shapes; the collective between shrink and expand is
    stood in for by a copy of the right size (a ``cat``), so the expand sees S-LoRA's shapes."""
    w, d_out = layers.base.weight, layers.base.weight.shape[0]
    rank = layers.lora_a.shape[0]
    if role is Role.COLUMN:
        a = nn.Parameter(layers.lora_a.detach()[: rank // tp].clone())  # (r/t, d_in)
        b = layers.lora_b  # (d_out/t, r): the shard's output rows, the whole rank

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([F.linear(x, a)] * tp, dim=-1) * SCALE  # all-gather stand-in: (T, r)
            return F.linear(x, w) + F.linear(h, b)  # (T, d_out/t)

    else:
        a = layers.lora_a  # (r, d_in/t)
        b = nn.Parameter(layers.lora_b.detach()[: d_out // tp].clone())  # (d_out/t, r)

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = F.linear(x, a) * SCALE  # (T, r): a partial sum, all-reduced in S-LoRA
            out = F.linear(x, w)  # (T, d_out)
            return torch.cat([out[:, : d_out // tp] + F.linear(h, b), out[:, d_out // tp :]], dim=-1)

    return forward, [a, b]


def variant_steps(layers: Layers, x: torch.Tensor, gy: torch.Tensor, role: Role, tp: int) -> dict[str, Step]:
    w = layers.base.weight
    slora, slora_params = slora_lora(layers, role, tp)
    return {
        "base": fwd_bwd(lambda v: F.linear(v, w), x, [], gy),
        "replicated": fwd_bwd(dense_lora(layers), x, [layers.lora_a, layers.lora_b], gy),
        "slora": fwd_bwd(slora, x, slora_params, gy),
        "peft_bdlora": fwd_bwd(layers.peft_layer, x, peft_factors(layers.peft_layer), gy),
        "bdlora": fwd_bwd(layers.bd, x, bd_factors(layers.bd), gy),
    }


class Compiler:
    """``torch.compile`` of the bdlora layer; after the first failure it says why once and stops."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.skipped: str | None = None if enabled else "off (--compile to enable)"

    def step(self, layers: Layers, x: torch.Tensor, gy: torch.Tensor) -> Step | None:
        if not self.enabled:
            return None
        torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no dynamic shapes
        step = fwd_bwd(torch.compile(layers.bd, dynamic=False), x, bd_factors(layers.bd), gy)
        try:
            step()  # compiles forward and backward
        except Exception as err:
            self.enabled = False
            self.skipped = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"bdlora_compiled skipped from here on: torch.compile failed ({self.skipped})")
            return None
        return step


def timed_ms(step: Step, device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    step()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event)


def run_interleaved(
    steps: dict[str, Step], warmup: int, reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Per-call ms of each variant; the order flips every repetition (A B C, C B A, ...)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for rep in range(warmup + reps):
        for name in names if rep % 2 == 0 else reversed(names):
            ms = timed_ms(steps[name], device)
            if rep >= warmup:
                times[name].append(ms)
    return times


def bench_case(case: LayerCase, args: BenchArgs, env: Env, compiler: Compiler) -> dict[str, Any]:
    layers = build_layers(case, env.device, env.dtype, args.seed)
    generator = torch.Generator(env.device).manual_seed(args.seed + 1)
    like = dict(generator=generator, device=env.device, dtype=env.dtype)
    x = torch.randn(args.tokens, case.d_in, **like).requires_grad_(True)  # (T, d_in)
    gy = torch.randn(args.tokens, case.d_out, **like)  # (T, d_out)
    check_equal_work(layers.bd, layers.peft_layer, x, gy, TOLERANCE[env.dtype])
    steps = variant_steps(layers, x, gy, case.role, case.tp)
    compiled = compiler.step(layers, x, gy)
    if compiled is not None:
        steps["bdlora_compiled"] = compiled
    times = run_interleaved(steps, args.warmup, args.reps, env.device)
    return layer_row(case, args.tokens, {name: statistics.median(ms) for name, ms in times.items()})


def layer_row(case: LayerCase, tokens: int, ms: dict[str, float]) -> dict[str, Any]:
    flops = base_flops(tokens, case.d_in, case.d_out) + adapter_flops(
        case.role, tokens, case.d_in, case.d_out, case.rank_local, case.blocks_local
    )
    row = {k: v.value if isinstance(v, Role) else v for k, v in asdict(case).items()}
    row.update(tokens=tokens, rank_local=case.rank_local, blocks_local=case.blocks_local)
    for name in ("base", "replicated", "slora", "peft_bdlora", "bdlora", "bdlora_compiled"):
        row[f"ms_{name}"] = ms.get(name)
    row["tflops_bdlora"] = flops / (ms["bdlora"] * 1e-3) / 1e12
    for name in ("replicated", "slora", "peft_bdlora", "bdlora"):
        row[f"overhead_{name}"] = ms[name] / ms["base"] - 1
    row["bdlora_over_peft"] = ms["bdlora"] / ms["peft_bdlora"]
    return row


LAYER_COLUMNS = [
    ("model", "model", "{}"),
    ("layer", "layer", "{}"),
    ("tp", "tp", "{}"),
    ("shape", "d_in x d_out", "{}"),
    ("rank", "rank", "{}"),
    ("rank_local", "r/shard", "{}"),
    ("blocks", "blocks local/N", "{}"),
    ("ms_base", "base ms", "{:.3f}"),
    ("ms_replicated", "replicated ms", "{:.3f}"),
    ("ms_slora", "S-LoRA ms", "{:.3f}"),
    ("ms_peft_bdlora", "peft ms", "{:.3f}"),
    ("ms_bdlora", "bdlora ms", "{:.3f}"),
    ("ms_bdlora_compiled", "compiled ms", "{:.3f}"),
    ("tflops_bdlora", "bdlora TFLOP/s", "{:.3g}"),
    ("overhead_bdlora", "bdlora/base-1", "{:+.3f}"),
    ("overhead_replicated", "replicated/base-1", "{:+.3f}"),
    ("overhead_slora", "S-LoRA/base-1", "{:+.3f}"),
    ("overhead_peft_bdlora", "peft/base-1", "{:+.3f}"),
    ("bdlora_over_peft", "bdlora/peft", "{:.3f}"),
]

TRAIN_COLUMNS = [
    ("impl", "impl", "{}"),
    ("trainable", "trainable", "{:,}"),
    ("ms_median", "median ms", "{:.2f}"),
    ("ms_min", "min ms", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("ratio", "time / peft_lora", "{:.3f}"),
]


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def display_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "shape": f"{row['d_in']} x {row['d_out']}",
        "blocks": f"{row['blocks_local']}/{row['nblocks']}",
    }


def bench_layers(args: BenchArgs, env: Env) -> list[dict[str, Any]]:
    compiler = Compiler(args.compile if args.compile is not None else env.device.type == "cuda")
    rows = [bench_case(case, args, env, compiler) for case in layer_cases(args)]
    print(f"\n## Layer forward + backward, {args.tokens} tokens per call, median of {args.reps}\n")
    print(markdown_table([display_row(r) for r in rows], LAYER_COLUMNS))
    print(
        "\nequal work: every shape's bdlora and PEFT BD-LoRA outputs and factor gradients matched on "
        f"copied factors; bdlora_compiled: {compiler.skipped or 'on'}"
    )
    return rows


def build_train_pair(shape: TrainShape, args: BenchArgs, env: Env) -> tuple[nn.Module, nn.Module]:
    """(bdlora BD-LoRA model, PEFT standard LoRA model) on identical random base weights."""
    config = llama_config(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab)
    config.num_key_value_heads = shape.kv_heads  # llama_config sets as many KV heads as heads
    torch.manual_seed(args.seed)
    with torch.device(env.device):
        base = LlamaForCausalLM(config).to(env.dtype).train()
    rank, nblocks = args.train_rank, args.train_nblocks
    bd_config = bdlora.BDLoraConfig(
        rank=rank, alpha=SCALE * rank, nblocks=nblocks, target_modules=TRAIN_TARGETS
    )
    ours = bdlora.apply_bdlora(copy.deepcopy(base), bd_config)
    lora_config = LoraConfig(r=rank, lora_alpha=SCALE * rank, target_modules=TRAIN_TARGETS)
    theirs = get_peft_model(base, lora_config, autocast_adapter_dtype=False)
    return ours, theirs


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, tokens: torch.Tensor) -> Step:
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(shape: TrainShape, args: BenchArgs, env: Env) -> list[dict[str, Any]]:
    ours, theirs = build_train_pair(shape, args, env)
    generator = torch.Generator().manual_seed(args.seed + 2)
    tokens = torch.randint(shape.vocab, (shape.batch, shape.seq), generator=generator)  # (B, T)
    tokens = tokens.to(env.device)
    steps = {"bdlora": train_step(ours, tokens), "peft_lora": train_step(theirs, tokens)}
    times = run_interleaved(steps, args.warmup, args.train_steps, env.device)
    models = {"bdlora": ours, "peft_lora": theirs}
    rows = [train_row(name, times[name], models[name], shape, times["peft_lora"]) for name in steps]
    print(
        f"\n## Training step: Llama hidden={shape.hidden} intermediate={shape.intermediate} "
        f"layers={shape.layers} heads={shape.heads}/{shape.kv_heads} vocab={shape.vocab}, "
        f"batch {shape.batch} x seq {shape.seq}; rank {args.train_rank} on {len(TRAIN_TARGETS)} "
        f"projections, bdlora nblocks {args.train_nblocks}; median of {args.train_steps}\n"
    )
    print(markdown_table(rows, TRAIN_COLUMNS))
    return rows


def train_row(
    name: str, ms: list[float], model: nn.Module, shape: TrainShape, ref: list[float]
) -> dict[str, Any]:
    median = statistics.median(ms)
    return {
        "impl": name,
        "trainable": sum(p.numel() for p in trainable(model)),
        "ms_median": median,
        "ms_min": min(ms),
        "tokens_per_s": shape.batch * shape.seq / (median * 1e-3),
        "ratio": median / statistics.median(ref),
    }


def header(args: BenchArgs, env: Env) -> dict[str, Any]:
    return {
        "device": env.device_name,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "dtype": str(env.dtype).removeprefix("torch."),
        "tokens": args.tokens,
        "warmup": args.warmup,
        "reps": args.reps,
        "tiny": args.tiny,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    print("$ python scripts/bench_gpu.py " + shlex.join(argv))
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = make_env(args)
    head = header(args, env)
    print(
        f"device {head['device']}, torch {head['torch']}, peft {head['peft']}, dtype {head['dtype']}, "
        f"threads {head['threads']}"
    )
    result = {"header": head, "layers": bench_layers(args, env)}
    result["train"] = bench_train(args.train, args, env) if args.train else []
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
