"""Helpers shared by ``bench_memory.py`` and ``bench_scaling.py``: the model, the byte counts, the launch.

Byte counts are exact (sums of tensor storages); RSS is what the kernel reports. Saved activations
are measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves for
backward passes through the pack hook, and the distinct storages behind them are what the forward
keeps alive until backward.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from bench_tp import adapter_factors
from rank_main import torchrun
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import LlamaForCausalLM

from bdlora import BDLoraConfig, apply_bdlora
from bdlora.config import DEFAULT_TARGETS
from bdlora.parallel import parallelize
from bdlora.presets import llama_config

MiB = 2**20


@dataclass(frozen=True)
class ModelArgs:
    """A small Llama, a token batch and a BD-LoRA adapter on all seven projections."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    rank: int
    nblocks: int
    seed: int


def add_model_args(p: argparse.ArgumentParser, **defaults: int) -> None:
    """The ``ModelArgs`` options; ``defaults`` overrides the small ones below."""
    sizes = dict(hidden=256, intermediate=688, layers=2, heads=8, vocab=2048, seq=128, batch=2)
    sizes.update(rank=16, nblocks=4, seed=0, **defaults)
    helps = {
        "heads": "also the KV heads; must be divisible by every TP degree",
        "rank": "LoRA rank R (global, before sharding)",
        "nblocks": "BD-LoRA blocks N (global); every TP degree must divide it",
    }
    for name in (f.name for f in fields(ModelArgs)):
        p.add_argument(f"--{name}", type=int, default=sizes[name], help=helps.get(name))


def model_args(ns: argparse.Namespace, **changes: int) -> ModelArgs:
    return ModelArgs(**{f.name: changes.get(f.name, getattr(ns, f.name)) for f in fields(ModelArgs)})


def check_tp_degrees(m: ModelArgs, tps: Iterable[int], option: str) -> None:
    """Every TP degree must divide the heads and nblocks, checked before any job starts."""
    for tp in tps:
        if tp < 1 or m.nblocks % tp or m.heads % tp:
            raise SystemExit(
                f"{option} {tp}: every TP degree must be >= 1 and divide --nblocks ({m.nblocks}) and "
                f"--heads ({m.heads}); pick among the common divisors or change those sizes"
            )


def model_argv(m: ModelArgs) -> list[str]:
    """The command-line options that give ``m`` back (for the ranks a launcher starts)."""
    return [f"--{k}={v}" for k, v in asdict(m).items()]


def llama(m: ModelArgs) -> LlamaForCausalLM:
    """The unsharded, seeded Llama of ``m`` (frozen, training mode), on the current default device."""
    torch.manual_seed(m.seed)
    model = LlamaForCausalLM(
        llama_config(m.hidden, m.intermediate, m.layers, m.heads, m.vocab, max(m.seq, 128))
    ).train()
    return model.requires_grad_(False)


def adapter_config(m: ModelArgs) -> BDLoraConfig:
    """BD-LoRA on q, k, v, o, gate, up and down, rank R and nblocks N (global), alpha 2R."""
    return BDLoraConfig(
        rank=m.rank, alpha=2 * m.rank, nblocks=m.nblocks, target_modules=list(DEFAULT_TARGETS)
    )


def build_llama(
    m: ModelArgs,
    mesh: DeviceMesh | None,
    adapter: bool,
    embed_grad: bool = False,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
    sharding: str = "bdlora",
) -> nn.Module:
    """A seeded Llama (equal base weights whatever the adapter), sharded over ``mesh`` when given,
    with an adapter on q, k, v, o, gate, up and down when ``adapter``: BD-LoRA, or under
    ``sharding="slora"`` / ``"replicated"`` dense LoRA of the same rank.

    ``embed_grad``: the embedding weight requires grad, so that backward runs through every block
    even without an adapter (scripts/bench_tp.py does the same for its base mode).
    ``vocab_parallel``, ``sequence_parallel``: the layout, as ``parallelize`` takes it (with a mesh)."""
    model = llama(m)
    if mesh is not None:
        parallel = dict(vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel)
        parallelize(model, mesh, sharding=sharding, **parallel)
    if adapter:
        dense = sharding != "bdlora"
        apply_bdlora(model, adapter_config(replace(m, nblocks=1) if dense else m))
    model.get_input_embeddings().weight.requires_grad_(embed_grad)
    return model


def make_train_step(
    model: nn.Module, tokens: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer | None]:
    """forward + backward + AdamW over the adapter factors (never the embedding, even when it
    requires grad) + zero_grad; no optimizer without an adapter."""
    factors = adapter_factors(model)
    optimizer = torch.optim.AdamW(factors, lr=1e-4) if factors else None

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step, optimizer


def token_batch(m: ModelArgs) -> torch.Tensor:
    """(B, T) token ids, equal on every rank."""
    return torch.randint(m.vocab, (m.batch, m.seq), generator=torch.Generator().manual_seed(m.seed + 1))


# -- byte counts -------------------------------------------------------------------------------------
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def param_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's frozen (base) and trainable (adapter) parameter bytes."""
    params = list(model.parameters())
    return {
        "base": tensor_bytes(p for p in params if not p.requires_grad),
        "adapter": tensor_bytes(p for p in params if p.requires_grad),
    }


def grad_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor in ``optimizer.state`` (AdamW: exp_avg, exp_avg_sq and the step count)."""
    return tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


class SavedTensors:
    """Bytes autograd saves for backward while the block runs, split into activations and model state.

    A saved tensor that shares storage with a parameter or buffer of ``model`` (a frozen linear
    saves its weight, or a transposed view of it, to compute the input's gradient) costs nothing:
    the model holds that memory anyway, and it is counted once under base weights. It is reported
    apart as ``parameter_bytes``; ``activation_bytes`` is what the forward adds. Storages are
    counted once however many saved tensors view them, and kept referenced until the block ends so
    that a freed address is never reused (and merged) during the count.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model_ptrs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.activation_bytes = 0
        self.parameter_bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._storages.setdefault(storage.data_ptr(), storage)
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for ptr, storage in self._storages.items():
            if ptr in self._model_ptrs:
                self.parameter_bytes += storage.nbytes()
            else:
                self.activation_bytes += storage.nbytes()
        self._storages.clear()


def saved_bytes(model: nn.Module, tokens: torch.Tensor) -> SavedTensors:
    """Saved tensors of one training forward (its backward then runs, so nothing is left behind)."""
    with SavedTensors(model) as saved:
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the kernel (glibc ``malloc_trim``),
    so that memory freed earlier cannot hide the RSS growth of what runs next."""
    gc.collect()
    name = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if malloc_trim is not None:  # glibc only; elsewhere RSS deltas may read low
        malloc_trim(0)


# -- timing ------------------------------------------------------------------------------------------
def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, reps: int, barrier: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per timed step of each entry; the order rotates every repetition so that drift on a
    busy machine lands on every entry alike. ``barrier`` starts each step on all ranks together."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if barrier is not None:
                barrier()
            start = time.perf_counter()
            steps[name]()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


# -- launching and gathering ---------------------------------------------------------------------------
def run_torchrun(
    script: str, tp: int, argv: list[str], result: Path, env: dict[str, str] | None = None
) -> object:
    """Run ``script`` under ``python -m torch.distributed.run`` with ``tp`` ranks (torchrun need not be
    on PATH); it writes its gathered result to ``--worker-result``, which is returned. ``env``: set
    for the job, on top of this process's environment."""
    cmd = [
        *torchrun(tp, script, *argv),
        f"--worker-result={result}",
    ]
    extra = env or {}
    print("$ " + shlex.join([*(f"{k}={v}" for k, v in extra.items()), *cmd]), flush=True)
    # OMP_NUM_THREADS: torchrun would set it anyway, with a warning
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **extra}, check=True)
    return json.loads(result.read_text())


def gather(obj: object) -> list:
    """``obj`` from every rank, by rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_rank0(path: str, obj: object) -> None:
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(obj))


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
